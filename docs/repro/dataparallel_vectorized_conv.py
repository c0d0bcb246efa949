"""FAILS on JAX 0.10.2: vectorized per-example Conv gradients under keras DataParallel are wrong.

Run from the repository root (it sets its own XLA_FLAGS and backend):

    /work/main/.venv/bin/python docs/repro/dataparallel_vectorized_conv.py

1. Pure JAX: ``jit(vmap(grad(conv loss)))`` with the batch sharded over 4
   CPU devices differs from the unsharded result (and from a one-example
   loop) for every example off the first shard. The vmapped weight gradient
   is one convolution with ``feature_group_count = batch``; the SPMD
   partitioner shards that group dimension and reassembles it with an
   all-to-all, which puts the wrong groups in place (compiled HLO:
   ``convolution(... feature_group_count=4)`` → pad → all-to-all).
   Summed gradients (no vmap) are right, so plain Keras training is fine.
2. tan_keras: one DPSGD step (σ = 0) of Conv2D → Flatten → Dense with
   ``clipping="vectorized"`` under ``DataParallel(devices=jax.devices())``
   differs from the same step on one device (the Conv kernel's update);
   Dense-only and ``clipping="ghost"`` models match (tests/test_distributed_jax.py).
3. The proposed fix: compute the per-example gradients inside
   ``jax.shard_map`` over the data axis, after marking the weights as
   device-varying (``jax.lax.pcast(w, axis, to="varying")``; without it
   shard_map's transpose psums each example's gradient with its partners
   on the other devices). This script patches
   ``tan_keras.per_example.jax._per_example_fn`` that way and shows the
   distributed step then equals the single-device one.

Exit status: 1 while step 2 differs (the bug), 0 once it matches.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.getcwd())
import tan_keras  # noqa: E402
from tan_keras.per_example import jax as per_example_jax  # noqa: E402


def pure_jax_repro():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    w = rng.normal(size=(3, 3, 3, 4)).astype("float32")

    def loss(w, xi):
        out = jax.lax.conv_general_dilated(xi[None], w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(out ** 2)

    per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))
    loop = np.stack([np.asarray(jax.grad(loss)(w, x[i])) for i in range(len(x))])
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    sharded = per_example(jax.device_put(w, NamedSharding(mesh, P())), jax.device_put(x, NamedSharding(mesh, P("batch"))))
    err = np.abs(np.asarray(sharded) - loop).reshape(len(x), -1).max(1)
    print(f"[1] pure JAX vmap(grad(conv)), batch sharded over 4 devices: max error per example vs loop "
          f"{np.round(err, 1).tolist()} (|grad| max {np.abs(loop).max():.1f}); unsharded error "
          f"{np.abs(np.asarray(per_example(w, x)) - loop).max():.1e}")


def step_update(distributed, physical_batch_size=None):
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()) if distributed else None)
    init = keras.initializers.GlorotUniform
    model = tan_keras.PrivateSequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, kernel_initializer=init(1)), keras.layers.Flatten(),
        keras.layers.Dense(3, kernel_initializer=init(2))], clipping="vectorized",
        physical_batch_size=physical_batch_size)
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=0.5, noise_multiplier=0.0, seed=0, learning_rate=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 16).astype("int32")
    before = [np.array(v) for v in model.get_weights()]
    model.train_on_batch(x, y)
    return [b - np.array(a) for b, a in zip(before, model.get_weights())]


def compare(label, physical_batch_size=None):
    single = step_update(False, physical_batch_size)
    distributed = step_update(True, physical_batch_size)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(single, distributed)]
    print(f"{label}: max |Δw distributed − Δw single| per variable (conv kernel, conv bias, dense kernel, "
          f"dense bias) = {['%.1e' % d for d in diffs]}; max |Δw| = {max(np.abs(a).max() for a in single):.3f}")
    return max(diffs)


def shard_mapped_per_example_fn(loss_fn, trainable, non_trainable):
    """The proposed ``_per_example_fn``: per-example gradients computed per device under shard_map."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(trainable, non_trainable, x, y, sample_weight):
        add_axis = lambda a: a[None]  # noqa: E731
        (loss, (y_pred, new_nt)), grads = grad_fn(
            trainable, non_trainable, *jax.tree_util.tree_map(add_axis, (x, y, sample_weight)))
        return grads, loss, jax.tree_util.tree_map(lambda a: a[0], y_pred), new_nt

    vectorized = jax.vmap(one, in_axes=(None, None, 0, 0, 0))
    distribution = keras.distribution.distribution()
    if not isinstance(distribution, keras.distribution.DataParallel):
        return lambda x, y, sw: vectorized(trainable, non_trainable, x, y, sw)
    axis = distribution.batch_dim_name

    def local(trainable, non_trainable, x, y, sw):
        # Weights are replicated (unvarying); a gradient w.r.t. an unvarying value is psum'd over the
        # axis by shard_map's transpose. Marking them varying keeps each example's gradient its own.
        trainable, non_trainable = jax.lax.pcast((trainable, non_trainable), axis, to="varying")
        return vectorized(trainable, non_trainable, x, y, sw)

    sharded = jax.shard_map(local, mesh=distribution.device_mesh.backend_mesh,
                            in_specs=(P(), P(), P(axis), P(axis), P(axis)), out_specs=P(axis))
    return lambda x, y, sw: sharded(trainable, non_trainable, x, y, sw)


if __name__ == "__main__":
    pure_jax_repro()
    unchanged = compare("[2] tan_keras step as is, Conv2D, clipping='vectorized'")
    original = per_example_jax._per_example_fn
    per_example_jax._per_example_fn = shard_mapped_per_example_fn
    try:
        fixed = max(compare("[3] with _per_example_fn under shard_map + pcast(varying)"),
                    compare("[3] the same, 2 chunks of 8 (physical_batch_size=8, lax.scan)", 8))
    finally:
        per_example_jax._per_example_fn = original
    print(f"unchanged step: {'MATCHES' if unchanged < 1e-5 else 'DIFFERS'}; "
          f"shard_map fix: {'MATCHES' if fixed < 1e-5 else 'DIFFERS'}")
    sys.exit(0 if unchanged < 1e-5 else 1)
