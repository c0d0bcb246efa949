"""Per-example conv kernel gradients + square sums + clipped sum, one layer, B = 1,024, fp32 (TF32) / bf16:
the current explicit form (patches' batched matmul or fused kernel) against cuDNN grouped convolutions."""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
import keras
from tan_keras.ghost import keras_layers as kl, registry
from tan_keras import clipping

B = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
out = []

def timeit(f, *args, n=30):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return round(1e3 * float(np.median(ts)), 3)

for dt in ("float32", "bfloat16"):
    for h, c, p in [(16, 128, 128), (32, 64, 64), (8, 256, 256)]:
        layer = keras.layers.Conv2D(p, 3, padding="same", use_bias=False)
        layer.build((None, h, h, c))
        x = jax.random.normal(jax.random.PRNGKey(0), (B, h, h, c), jnp.float32).astype(dt)
        g = jax.random.normal(jax.random.PRNGKey(1), (B, h, h, p), jnp.float32).astype(dt)
        cf = jax.random.uniform(jax.random.PRNGKey(2), (B,), jnp.float32)

        def explicit(x, g, cf):
            with registry.norm_mode("explicit"):
                (v, grads, sq), = kl.conv_per_example_grads(layer, x, g)
            return sq, clipping.weighted_sum([grads], cf, False)[0]

        def grouped_grads(x, g):
            xr = jnp.transpose(x, (1, 2, 0, 3)).reshape(1, h, h, B * c)
            gr = jnp.transpose(g, (1, 2, 0, 3)).reshape(1, h, h, B * p)
            f = lambda w: jax.lax.conv_general_dilated(xr, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                       feature_group_count=B)
            _, vjp = jax.vjp(f, jnp.zeros((3, 3, c, B * p), x.dtype))
            return vjp(gr)[0].reshape(3, 3, c, B, p)

        def grouped(x, g, cf):
            G = grouped_grads(x, g).astype(jnp.float32)
            sq = jnp.sum(jnp.square(G), axis=(0, 1, 2, 4))
            return sq, jnp.sum(G * cf[None, None, None, :, None], axis=3)

        def vmapped(x, g, cf):
            def one(xi, gi):
                f = lambda w: jax.lax.conv_general_dilated(xi[None], w, (1, 1), "SAME",
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
                _, vjp = jax.vjp(f, jnp.zeros((3, 3, c, p), x.dtype))
                return vjp(gi[None])[0]
            G = jax.vmap(one)(x, g).astype(jnp.float32)
            return jnp.sum(jnp.square(G), axis=(1, 2, 3, 4)), jnp.sum(G * cf[:, None, None, None, None], axis=0)

        def batch_wgrad(x, g):
            f = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            _, vjp = jax.vjp(f, jnp.zeros((3, 3, c, p), x.dtype))
            return vjp(g)[0]

        row = {"config": f"{h}x{h} {c}->{p}", "dtype": dt, "B": B}
        for name, f, args in [("explicit", explicit, (x, g, cf)), ("grouped", grouped, (x, g, cf)),
                              ("vmapped", vmapped, (x, g, cf)), ("batch_wgrad_cudnn", batch_wgrad, (x, g))]:
            try:
                row[name] = timeit(jax.jit(f), *args)
            except Exception as e:  # noqa
                row[name] = f"error: {type(e).__name__}: {str(e)[:150]}"
        try:
            se, _ = jax.jit(explicit)(x, g, cf); sg, _ = jax.jit(grouped)(x, g, cf)
            row["grouped_norm_rel_diff"] = float(jnp.max(jnp.abs(se - sg) / se))
        except Exception as e:  # noqa
            row["grouped_norm_rel_diff"] = str(e)[:150]
        print(json.dumps(row), flush=True)
        out.append(row)
json.dump(out, open("/tmp/r/grouped.json", "w"), indent=1)
