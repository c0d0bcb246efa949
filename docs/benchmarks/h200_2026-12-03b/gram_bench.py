"""Gram of (B, T, d) fp32 and the ghost norm of one Dense layer, formulations timed on the GPU (JAX only)."""
import json, sys, time
import jax, jax.numpy as jnp

def gram(x, k):
    B, T, d = x.shape
    if k == 1:
        return jnp.einsum("btd,bsd->bts", x, x, preferred_element_type=jnp.float32)
    xs = x.reshape(B, T, k, d // k)
    return jnp.einsum("btkd,bskd->bkts", xs, xs, preferred_element_type=jnp.float32).sum(1)

def norm(a, g, ka, kg):
    ga, gg = gram(a, ka), gram(g, kg)
    eye = jnp.eye(a.shape[1], dtype=jnp.float32)
    return (ga * gg).sum((1, 2)), (ga * eye).sum((1, 2)), (gg * eye).sum((1, 2))

def timeit(f, *args, n=50):
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e3

key = jax.random.PRNGKey(0)
res = {}
for d in (384, 1536):
    x = jax.random.normal(key, (256, 64, d), jnp.float32)
    for k in (1, 2, 4, 8):
        res[f"gram d={d} split={k}"] = timeit(lambda x, k=k: gram(x, k), x)
a = jax.random.normal(key, (256, 64, 384), jnp.float32); g = jax.random.normal(key, (256, 64, 1536), jnp.float32)
for kg in (1, 2, 4, 8):
    res[f"dense 384->1536 norm+traces split_g={kg}"] = timeit(lambda a, g, kg=kg: norm(a, g, 1, kg), a, g)
for k, v in res.items():
    print(f"{v:8.4f} ms  {k}")
json.dump(res, open(sys.argv[1], "w"), indent=1)
