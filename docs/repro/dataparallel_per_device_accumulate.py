"""Prototype for the train-step owner: accumulate the clipped sum per device, all-reduce it once.

    /work/main/.venv/bin/python docs/repro/dataparallel_per_device_accumulate.py

Under ``keras.distribution.DataParallel`` the JAX step as it is today (1)
gets vectorized per-example Conv gradients wrong (see
docs/repro/dataparallel_vectorized_conv.py), and (2) with ``physical_batch_size``
chunks the *global* batch: XLA then all-gathers part of the inputs and
all-reduces the clipped sum inside the ``lax.scan`` body, once per chunk.

This script patches ``tan_keras.per_example.jax._accumulate`` and
``tan_keras.per_example.ghost_jax.accumulate`` with one wrapper: under a
DataParallel distribution it runs the unchanged accumulate inside
``jax.shard_map`` over the data axis on each device's local rows (a local
plan: local batch, the same chunk size), with the state marked
device-varying (``jax.lax.pcast(..., to="varying")``, so gradients stay
per device), and ``psum``s the clipped sum, the loss sum and the clip
statistics once. The noise is still drawn after it, on the replicated sum.

It prints, for Conv2D → GroupNorm → Dense in both clipping modes, with one
chunk and with chunks of 2 per device, the max difference of the update
from the single-device step, and the collectives XLA compiled into the
train step (all-reduce / all-gather, inside or outside a loop body).
Ghost clipping needs one more change inside shard_map: its probes (the
zeros added to each watched layer's output, whose cotangents are the
per-example output gradients) are constants, i.e. device-invariant, so
``jax.vjp`` w.r.t. them psums the output gradients over the devices. The
script makes them varying (``ghost_jax.clipped_grad_sum``, the line
``probes = [jnp.zeros(s.shape, s.dtype) for s in shapes]``) by
re-executing that function's module source with the one line changed.

Exit status 0 when every case matches the single-device step.
"""

import glob
import os
import shutil
import tempfile

DUMP = tempfile.mkdtemp(prefix="tan_dp_hlo_")
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count=4 --xla_dump_to={DUMP} "
                           "--xla_dump_hlo_module_re=.*train_step.*")
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.getcwd())
import tan_keras  # noqa: E402
from tan_keras.per_example import ghost_jax  # noqa: E402
from tan_keras.per_example import jax as per_example_jax  # noqa: E402
from tan_keras.per_example.plan import make_plan  # noqa: E402


def per_device(accumulate):
    def sharded_accumulate(model, plan, state, x, y, sample_weight):
        distribution = keras.distribution.distribution()
        if not isinstance(distribution, keras.distribution.DataParallel):
            return accumulate(model, plan, state, x, y, sample_weight)
        axis = distribution.batch_dim_name
        mesh = distribution.device_mesh.backend_mesh
        replicas = mesh.shape[axis]
        if plan.batch_size % replicas:
            raise ValueError(f"batch {plan.batch_size} is not a multiple of the {replicas} data-parallel devices")
        local_plan = make_plan(plan.batch_size // replicas, model.optimizer, model.physical_batch_size)

        def local(state, x, y, sample_weight):
            state = jax.lax.pcast(state, axis, to="varying")
            AXIS.append(axis)
            try:
                grad_sum, loss_sum, y_pred, non_trainable, stats = accumulate(
                    model, local_plan, state, x, y, sample_weight)
            finally:
                AXIS.pop()
            grad_sum, loss_sum, stats = jax.lax.psum((grad_sum, loss_sum, stats), axis)
            non_trainable = jax.lax.pmean(non_trainable, axis)
            return grad_sum, loss_sum, y_pred, non_trainable, stats

        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis), P(axis), P(axis)),
                             out_specs=(P(), P(), P(axis), P(), P()))(state, x, y, sample_weight)

    return sharded_accumulate


#: The data axis while a per-device accumulate is traced (read by the patched ghost probes).
AXIS = []


def ghost_with_varying_probes():
    """``ghost_jax.clipped_grad_sum`` with its probes marked device-varying under shard_map."""
    path = ghost_jax.__file__
    source = open(path).read()
    line = "probes = [jnp.zeros(s.shape, s.dtype) for s in shapes]"
    if line not in source:
        raise RuntimeError(f"{path} changed: cannot find {line!r} to patch")
    source = source.replace(line, line + "\n    if AXIS: probes = jax.lax.pcast(probes, AXIS[-1], to='varying')")
    namespace = {"__name__": "ghost_jax_varying_probes", "__file__": path, "AXIS": AXIS}
    exec(compile(source, path, "exec"), namespace)
    return namespace["clipped_grad_sum"]


def update(distributed, clipping, physical_batch_size):
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()) if distributed else None)
    init = keras.initializers.GlorotUniform
    model = tan_keras.PrivateSequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, kernel_initializer=init(1)),
        keras.layers.GroupNormalization(2), keras.layers.Flatten(),
        keras.layers.Dense(3, kernel_initializer=init(2))], clipping=clipping, physical_batch_size=physical_batch_size)
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=0.5, noise_multiplier=1.0, seed=0, learning_rate=1.0,
                                            expected_batch_size=12.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 16).astype("int32")
    w = np.r_[np.ones(12), np.zeros(4)].astype("float32")
    before = [np.array(v) for v in model.get_weights()]
    model.train_on_batch(x, y, sample_weight=w)
    return np.concatenate([(b - np.array(a)).ravel() for b, a in zip(before, model.get_weights())])


def collectives():
    """Collectives in the last compiled distributed train step: (op, computation it sits in)."""
    files = sorted(glob.glob(os.path.join(DUMP, "*train_step*after_optimizations.txt")), key=os.path.getmtime)
    found, computation = [], None
    with open(files[-1]) as f:
        for line in f:
            if line.endswith("{\n") and not line.startswith(" "):
                computation = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
            op = re.search(r"= \S+ (all-reduce|all-gather|all-to-all|reduce-scatter)\(", line) or \
                re.search(r"\) (all-reduce|all-gather|all-to-all|reduce-scatter)\(", line)
            if op:
                found.append((op.group(1), computation))
    return found


def run(label):
    worst = 0.0
    for clipping in ("vectorized", "ghost"):
        for p in (None, 2):
            single = update(False, clipping, p if p is None else p * 4)  # same global chunk size
            distributed = update(True, clipping, p if p is None else p * 4)
            seen = collectives()
            diff = float(np.abs(distributed - single).max())
            worst = max(worst, diff)
            summary = sorted({f"{op} in {'ENTRY' if where == 'ENTRY' else 'a sub-computation'}" for op, where in seen})
            print(f"{label} {clipping:10s} physical_batch_size={p and p * 4}: max |Δ update| = {diff:.1e} "
                  f"(|update| max {np.abs(single).max():.3f}); collectives: {len(seen)} {summary}")
    return worst


if __name__ == "__main__":
    try:
        unchanged = run("[as is]  ")
        per_example_jax._accumulate, ghost_jax.accumulate = (per_device(per_example_jax._accumulate),
                                                             per_device(ghost_jax.accumulate))
        probes_as_is = run("[per-device accumulate]")
        ghost_jax.clipped_grad_sum = ghost_with_varying_probes()
        patched = run("[per-device accumulate + varying ghost probes]")
    finally:
        shutil.rmtree(DUMP, ignore_errors=True)
    print(f"worst max |Δ update|: as is {unchanged:.1e}; per-device accumulate {probes_as_is:.1e}; "
          f"+ varying ghost probes {patched:.1e}")
    sys.exit(0 if patched < 1e-5 else 1)
