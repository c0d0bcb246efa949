"""JAX private train step: layout, chunk loop and padding, statistics, hand-off to the optimizer.

The step runs inside the ``jax.jit`` that Keras's JAX trainer builds around
``train_step``. Chunks of ``physical_batch_size`` examples go through
``lax.scan`` (one chunk runs without a loop). Strategies (each gives the
clipped sum of one chunk; the step never lends them anything back):
``vectorized.clipped_chunk`` and ``ghost.clipped_chunk``;
``vectorized.summed_chunk`` for Noisy-SGD (no clipping).

Under a Keras distribution with a data axis (``keras.distribution.DataParallel``,
or ``ModelParallel``'s batch axis) of R > 1 devices, the chunk loop runs per
device (``_accumulate_per_device``): inside ``jax.shard_map`` over that axis,
each device clips its own B/R rows in chunks of ``physical_batch_size`` (a
per-device bound), then the clipped sums, loss sums and clip statistics are
summed across the devices once (``psum``; no collective inside the loop).
The noise is drawn after that, outside ``shard_map``, from the optimizer's
replicated seed state: every device draws the same ``N(0, σ²C² I)`` and adds
it to the same reduced sum, so the noise reaches the sum **once**, with std
σC (not σC·√R), and the normaliser is the global B. Why not let XLA's SPMD
partitioner split the global step: it compiles ``vmap(grad(conv))`` with a
sharded batch wrongly on JAX 0.10.2 (``docs/repro/jax_vmap_conv_grad_sharded.py``)
and all-reduces inside the chunk loop.
"""

import jax
import jax.numpy as jnp
import keras
from jax.sharding import PartitionSpec

from tan_keras import clipping
from tan_keras.layer_checks import check_private_layers
from tan_keras.per_example import plan as plans
from tan_keras.per_example.jax import ghost, vectorized
from tan_keras.per_example.jax.common import as_arrays, leading_dim, loss_fn, values


def _pad_chunks(tree, plan):
    """Zero-pads the leading axis to ``plan.padded_size`` and splits it into chunks."""
    pad = plan.padded_size - plan.batch_size

    def one(a):
        if pad:
            a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)], axis=0)
        return a.reshape((plan.num_chunks, plan.chunk_size) + a.shape[1:])

    return jax.tree_util.tree_map(one, tree)


def scan_chunks(body, init, chunks, plan):
    """``lax.scan`` of ``body`` over the chunks; returns (carry, y_pred of the real examples).

    One chunk runs without a loop: XLA:CPU runs convolutions (and their
    gradients) inside a while loop an order of magnitude slower.
    """
    if plan.num_chunks == 1:
        carry, y_pred = body(init, jax.tree_util.tree_map(lambda a: a[0], chunks))
        y_pred = jax.tree_util.tree_map(lambda a: a[None], y_pred)
    else:
        carry, y_pred = jax.lax.scan(body, init, chunks)
    y_pred = jax.tree_util.tree_map(
        lambda a: a.reshape((plan.padded_size,) + a.shape[2:])[: plan.batch_size], y_pred)
    return carry, y_pred


def _chunk_fn(model, plan):
    """The chosen strategy for one chunk: ``(trainable, nt, mv, ov, xc, yc, swc) -> (sum, loss, ŷ, stats, nt)``."""
    if not plan.per_example:
        def unclipped(*args):
            grads, loss, y_pred, new_nt = vectorized.summed_chunk(model, plan, *args)
            return grads, loss, y_pred, jnp.zeros((4,), grads[0].dtype), new_nt

        return unclipped
    clipped = ghost.clipped_chunk if plans.strategy(model) == "ghost" else vectorized.clipped_chunk

    def chunk(*args):
        grads, loss, y_pred, norms, unit_mask, new_nt = clipped(model, plan, *args)
        stats = clipping.unit_stats(norms, unit_mask, model.optimizer.l2_norm_clip)
        return grads, loss, y_pred, stats.astype(grads[0].dtype), new_nt

    return chunk


def _accumulate(model, plan, state, x, y, sample_weight):
    """Scans the chunks; returns (gradient sum, loss sum, y_pred, non-trainables, stats)."""
    trainable, non_trainable, optimizer_variables, metrics_variables = state
    chunk = _chunk_fn(model, plan)

    def body(carry, batch):
        grad_sum, loss_sum, stats_sum, nt = carry
        chunk_sum, loss, y_pred, stats, nt = chunk(trainable, nt, metrics_variables, optimizer_variables, *batch)
        grad_sum = [a + b for a, b in zip(grad_sum, chunk_sum)]
        return (grad_sum, loss_sum + loss, stats_sum + stats, nt), y_pred

    dtype = trainable[0].dtype
    loss_init, stats_init = jnp.zeros((), dtype), jnp.zeros((4,), dtype)
    if plan.data_axis is not None:  # per device: the scan carry holds device-varying sums
        loss_init, stats_init = jax.lax.pcast((loss_init, stats_init), plan.data_axis, to="varying")
    init = ([jnp.zeros_like(v) for v in trainable], loss_init, stats_init, non_trainable)
    chunks = _pad_chunks((x, y, sample_weight), plan)
    (grad_sum, loss_sum, stats, non_trainable), y_pred = scan_chunks(body, init, chunks, plan)
    return grad_sum, loss_sum, y_pred, non_trainable, stats


def data_parallel_axis():
    """``(axis name, R, jax Mesh)`` of the set Keras distribution's data axis, or None (no split)."""
    distribution = keras.distribution.distribution()
    axis = getattr(distribution, "batch_dim_name", None)
    if axis is None:
        return None
    mesh = distribution.device_mesh.backend_mesh
    replicas = int(mesh.shape[axis])
    return (axis, replicas, mesh) if replicas > 1 else None


def _agreed(tree, axis):
    """Non-trainable values updated on every device made device-invariant: floats averaged, others (seed
    states, counters: the same on every device) by max."""

    def one(a):
        return jax.lax.pmean(a, axis) if jnp.issubdtype(a.dtype, jnp.inexact) else jax.lax.pmax(a, axis)

    return jax.tree_util.tree_map(one, tree)


def _accumulate_per_device(model, plan, split, state, x, y, sample_weight):
    """``_accumulate`` on each device's rows inside ``shard_map``; sums, loss and stats ``psum``-ed once.

    The state is marked device-varying (``pcast``): otherwise the transpose
    of the replicated weights' use in ``grad`` would sum each example's
    gradient with its partners on the other devices.
    """
    axis, replicas, mesh = split
    local_plan = plans.shard_plan(plan, replicas, model.physical_batch_size, axis)

    def local(state, x, y, sample_weight):
        state = jax.lax.pcast(state, axis, to="varying")
        grad_sum, loss_sum, y_pred, non_trainable, stats = _accumulate(model, local_plan, state, x, y,
                                                                       sample_weight)
        grad_sum, loss_sum, stats = jax.lax.psum((grad_sum, loss_sum, stats), axis)
        return grad_sum, loss_sum, y_pred, _agreed(non_trainable, axis), stats

    replicated, rows = PartitionSpec(), PartitionSpec(axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(replicated, rows, rows, rows),
                         out_specs=(replicated, replicated, rows, replicated, replicated))(
        state, x, y, sample_weight)


def _updated(variables, old_values, scope):
    out = []
    for ref, old in zip(variables, old_values):
        new = scope.get_current_value(ref)
        out.append(old if new is None else new)
    return out


def private_train_step(model, state, data):
    trainable, non_trainable, optimizer_variables, metrics_variables = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    check_private_layers(model)  # at trace time: layers added or built after compile
    batch_size = leading_dim(x)
    optimizer = model.optimizer
    plan = plans.make_plan(batch_size, optimizer, model.physical_batch_size)
    weights = sample_weight if sample_weight is not None else jnp.ones((batch_size,), trainable[0].dtype)
    split = data_parallel_axis()
    if split is None:
        grad_sum, loss_sum, y_pred, non_trainable, stats = _accumulate(model, plan, state, x, y, weights)
    else:
        grad_sum, loss_sum, y_pred, non_trainable, stats = _accumulate_per_device(
            model, plan, split, state, x, y, weights)

    mapping = list(zip(model.trainable_variables, trainable)) + list(zip(optimizer.variables, optimizer_variables))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        noise_norm, signal_norm = optimizer.apply_private(grad_sum, plan.normalizer)
    new_trainable = _updated(model.trainable_variables, trainable, scope)
    new_optimizer_variables = _updated(optimizer.variables, optimizer_variables, scope)
    # Non-finite weights or noise: the update is not applied and the step is counted
    # (``nonfinite_updates``); ``fit`` then stops with an error at the end of the epoch
    # (``PrivateTrainerMixin``). No host callback in the step: one per step cost 2.6 ms of a
    # 30 ms WRN-16-4 step on an H200.
    finite = clipping.all_finite(list(new_trainable) + [noise_norm])
    keep = lambda new, old: [jnp.where(finite, a, b) for a, b in zip(new, old)]  # noqa: E731
    trainable, optimizer_variables = keep(new_trainable, trainable), keep(new_optimizer_variables,
                                                                           optimizer_variables)

    dp_values = clipping.dp_metric_values(stats, signal_norm, noise_norm, finite)
    with keras.StatelessScope(state_mapping=list(zip(model.metrics_variables, metrics_variables))) as scope:
        # Mean over real examples: zero-weight rows are Poisson padding.
        num_real = jnp.maximum(jnp.sum(weights != 0).astype(loss_sum.dtype), 1.0)
        model._loss_tracker.update_state(loss_sum / num_real, sample_weight=num_real)
        for tracker, value in zip(model._dp_metrics(), dp_values):
            tracker.update_state(value)
        logs = model.compute_metrics(x, y, y_pred, sample_weight)
    metrics_variables = _updated(model.metrics_variables, metrics_variables, scope)
    return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)


def per_example_gradients(model, x, y=None, sample_weight=None):
    """Per-example gradients of the compiled loss (leading axis = example), jitted as in the step."""
    x, y, weights = as_arrays(x, y, sample_weight)
    optimizer_variables = values(model.optimizer.variables) if model.optimizer else None
    loss = loss_fn(model, values(model.metrics_variables), optimizer_variables)

    @jax.jit  # compiled, like the train step (XLA and eager CPU kernels round differently)
    def grads_fn(trainable, non_trainable, x, y, weights):
        return vectorized.per_example_fn(loss, trainable, non_trainable)(x, y, weights)[0]

    return grads_fn(values(model.trainable_variables), values(model.non_trainable_variables), x, y, weights)


def clipped_sum_and_norms(model, x, y, l2_norm_clip, sample_weight=None):
    """``(Σ_i clip_C(∇ℓ_i), (‖∇ℓ_i‖)_i)`` by the strategy the model's train step uses, jitted as there."""
    x, y, weights = as_arrays(x, y, sample_weight)
    if plans.strategy(model) == "ghost":
        return ghost.clipped_grad_sum_of(model, x, y, l2_norm_clip, weights)
    grads = per_example_gradients(model, x, y, weights)
    norms = clipping.global_norms(grads)
    return clipping.weighted_sum(grads, clipping.clip_factors(norms, l2_norm_clip)), norms
