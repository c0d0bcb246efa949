"""Pure-JAX repro: per-example Conv gradients (vmap of grad) are wrong when the batch is sharded.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python docs/repro/jax_vmap_conv_grad_sharded.py

``jit(vmap(grad(loss)))`` of a one-example convolution loss, with the batch
sharded over a 1-D mesh, against a one-example loop. Seen wrong on JAX/jaxlib
0.10.2 (CPU, 2 and 4 devices): examples off the first shard get other
examples' gradients. Summed gradients (no vmap) are right. Exit status 1 when
wrong.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

rng = np.random.default_rng(0)
x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
w = rng.normal(size=(3, 3, 3, 4)).astype("float32")


def loss(w, xi):
    out = jax.lax.conv_general_dilated(xi[None], w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(out ** 2)


loop = np.stack([np.asarray(jax.grad(loss)(w, x[i])) for i in range(len(x))])
per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))
mesh = Mesh(np.array(jax.devices()), ("batch",))
got = np.asarray(per_example(jax.device_put(w, NamedSharding(mesh, P())),
                             jax.device_put(x, NamedSharding(mesh, P("batch")))))
err = np.abs(got - loop).reshape(len(x), -1).max(1) / np.abs(loop).max()
print(f"jax {jax.__version__}, jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else '?'}, "
      f"{len(jax.devices())} x {jax.devices()[0].platform}: relative error per example {np.round(err, 3).tolist()}")
sys.exit(1 if err.max() > 1e-4 else 0)
