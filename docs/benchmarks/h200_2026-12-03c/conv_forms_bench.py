"""One conv layer's DP work in fp32 (H200 default TF32 matmuls), B = 1,024: norm + clipped share, per form."""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
import keras
from tan_keras.ghost import keras_layers as kl, norms, registry
from tan_keras import clipping

B = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
DT = sys.argv[2] if len(sys.argv) > 2 else "float32"
CONFIGS = [(16, 128, 128), (8, 256, 256), (32, 64, 64)]
out = []

def timeit(f, *args, n=30):
    r = f(*args); jax.block_until_ready(r)
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts)), 1e3 * float(np.min(ts))

for cfg in CONFIGS:
    h, c, p = cfg[:3]; s = cfg[3] if len(cfg) > 3 else 1
    hin = h * s
    layer = keras.layers.Conv2D(p, 3, strides=s, padding="same", use_bias=False)
    layer.build((None, hin, hin, c))
    k = jax.random.PRNGKey(0)
    x = jax.random.normal(k, (B, hin, hin, c), jnp.float32).astype(DT)
    g = jax.random.normal(jax.random.PRNGKey(1), (B, h, h, p), jnp.float32).astype(DT)
    cf = jax.random.uniform(jax.random.PRNGKey(2), (B,), jnp.float32)
    kern = layer.kernel.value.astype(DT)

    def explicit(x, g, cf):
        with registry.norm_mode("explicit"):
            pairs = kl.conv_per_example_grads(layer, x, g)
        (v, grads, sq), = pairs
        return sq, clipping.weighted_sum([grads], cf, False)[0]

    def ghost_sq(x, g):
        with registry.norm_mode("ghost"), norms.operand_norms() as prods:
            sq = kl.conv_sq_norms(layer, x, g)
        return sq, prods[0]

    def ghost_bk(x, g, cf):
        sq, prod = ghost_sq(x, g)
        cot = g * cf[:, None, None, None].astype(DT)
        (v, share), = kl.conv_weight_grads(layer, x, cot)
        return sq, prod, share

    def ghost_cudnn(x, g, cf):
        sq, prod = ghost_sq(x, g)
        cot = g * cf[:, None, None, None].astype(DT)
        f = lambda w: jax.lax.conv_general_dilated(x, w, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        _, vjp = jax.vjp(f, kern)
        return sq, prod, vjp(cot)[0]

    def bk_only(x, g, cf):
        cot = g * cf[:, None, None, None].astype(DT)
        (v, share), = kl.conv_weight_grads(layer, x, cot)
        return share

    def xgram(x):
        return norms.patch_gram(x, (3, 3), (s, s), "same", (1, 1))

    def ggram(g):
        gg = norms.positions(g, p)
        return norms.einsum_f32("btp,bsp->bts", gg, gg)

    row = {"config": f"{h}x{h} {c}->{p} stride {s}", "B": B, "dtype": DT}
    for name, f, args in [("explicit", explicit, (x, g, cf)), ("ghost_sq", ghost_sq, (x, g)),
                          ("ghost_bk", ghost_bk, (x, g, cf)), ("ghost_cudnn_bk", ghost_cudnn, (x, g, cf)),
                          ("bk_only", bk_only, (x, g, cf)), ("patch_gram", xgram, (x,)), ("g_gram", ggram, (g,))]:
        try:
            med, mn = timeit(jax.jit(f), *args)
            row[name] = round(med, 3); row[name + "_min"] = round(mn, 3)
        except Exception as e:  # noqa
            row[name] = f"error: {type(e).__name__}: {str(e)[:200]}"
    # agreement of the two forms' norms
    try:
        se, _ = jax.jit(explicit)(x, g, cf); sg, _ = jax.jit(ghost_sq)(x, g)
        row["norm_rel_diff"] = float(jnp.max(jnp.abs(se - sg) / se))
    except Exception as e:  # noqa
        row["norm_rel_diff"] = str(e)[:200]
    print(json.dumps(row), flush=True)
    out.append(row)
json.dump(out, open(f"/tmp/r/conv_forms_{DT}.json", "w"), indent=1)
