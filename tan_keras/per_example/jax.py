"""JAX backend: ``jax.vmap(jax.grad(...))`` over ``stateless_call``, chunks in ``lax.scan``.

The step runs inside the ``jax.jit`` that Keras's JAX trainer builds around
``train_step``.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np

from tan_keras import clipping
from tan_keras.layer_checks import check_private_layers
from tan_keras.per_example.plan import make_plan


def _leading_dim(x):
    return jax.tree_util.tree_leaves(x)[0].shape[0]


def _pad_chunks(tree, plan):
    """Zero-pads the leading axis to ``plan.padded_size`` and splits it into chunks."""
    pad = plan.padded_size - plan.batch_size

    def one(a):
        if pad:
            a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)], axis=0)
        return a.reshape((plan.num_chunks, plan.chunk_size) + a.shape[1:])

    return jax.tree_util.tree_map(one, tree)


def scalar_loss(loss):
    """A ``reduction="none"`` loss (TF Privacy's convention) as its mean, which is Keras's default reduction."""
    return jnp.mean(loss) if jnp.ndim(loss) else loss


def _loss_fn(model, metrics_variables, optimizer_variables):
    def loss_fn(trainable, non_trainable, x, y, sample_weight):
        loss, (_, y_pred, non_trainable, _) = model.compute_loss_and_updates(
            trainable, non_trainable, metrics_variables, x, y, sample_weight,
            training=True, optimizer_variables=optimizer_variables,
        )
        return scalar_loss(loss), (y_pred, non_trainable)

    return loss_fn


def _per_example_fn(loss_fn, trainable, non_trainable):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(x, y, sample_weight):
        add_axis = lambda a: a[None]  # noqa: E731
        (loss, (y_pred, new_nt)), grads = grad_fn(
            trainable, non_trainable, *jax.tree_util.tree_map(add_axis, (x, y, sample_weight))
        )
        return grads, loss, jax.tree_util.tree_map(lambda a: a[0], y_pred), new_nt

    return jax.vmap(one)


def _clipped_chunk(plan, l2_norm_clip, grads, unit_mask):
    if plan.unit_size > 1:
        grads = clipping.group_microbatches(grads, plan.chunk_size // plan.unit_size)
    norms = clipping.global_norms(grads)
    factors = clipping.clip_factors(norms, l2_norm_clip)
    return clipping.weighted_sum(grads, factors), clipping.unit_stats(norms, unit_mask, l2_norm_clip)


def _accumulate(model, plan, state, x, y, sample_weight):
    """Scans the chunks; returns (gradient sum, loss sum, y_pred, non-trainables, stats)."""
    trainable, non_trainable, optimizer_variables, metrics_variables = state
    optimizer = model.optimizer
    loss_fn = _loss_fn(model, metrics_variables, optimizer_variables)
    xs, ys, sws = _pad_chunks((x, y, sample_weight), plan)

    def body(carry, chunk):
        grad_sum, loss_sum, stats_sum, nt = carry
        xc, yc, swc = chunk
        if plan.per_example:
            grads, losses, y_pred, new_nt = _per_example_fn(loss_fn, trainable, nt)(xc, yc, swc)
            new_nt = jax.tree_util.tree_map(lambda a: a[0], new_nt)
            unit_mask = (swc != 0).astype(grad_sum[0].dtype) if plan.unit_size == 1 else jnp.ones(
                (plan.chunk_size // plan.unit_size,), grad_sum[0].dtype)
            chunk_sum, stats = _clipped_chunk(plan, optimizer.l2_norm_clip, grads, unit_mask)
            loss = jnp.sum(losses)
        else:
            (mean_loss, (y_pred, new_nt)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                trainable, nt, xc, yc, swc)
            chunk_sum = [g * plan.chunk_size for g in grads]
            loss = mean_loss * plan.chunk_size
            stats = jnp.zeros((4,), grad_sum[0].dtype)
        grad_sum = [a + b for a, b in zip(grad_sum, chunk_sum)]
        return (grad_sum, loss_sum + loss, stats_sum + stats, new_nt), y_pred

    init = ([jnp.zeros_like(v) for v in trainable], jnp.zeros((), trainable[0].dtype),
            jnp.zeros((4,), trainable[0].dtype), non_trainable)
    (grad_sum, loss_sum, stats, non_trainable), y_pred = scan_chunks(body, init, (xs, ys, sws), plan)
    return grad_sum, loss_sum, y_pred, non_trainable, stats


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


def _updated(variables, values, scope):
    out = []
    for ref, old in zip(variables, values):
        new = scope.get_current_value(ref)
        out.append(old if new is None else new)
    return out


def _raise_if_not_finite(finite):
    if not bool(finite):
        raise FloatingPointError(clipping.NONFINITE_STEP_MESSAGE)


def private_train_step(model, state, data):
    trainable, non_trainable, optimizer_variables, metrics_variables = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    check_private_layers(model)  # at trace time: layers added or built after compile
    batch_size = _leading_dim(x)
    optimizer = model.optimizer
    plan = make_plan(batch_size, optimizer, model.physical_batch_size)
    weights = sample_weight if sample_weight is not None else jnp.ones((batch_size,), trainable[0].dtype)

    accumulate = _accumulate
    if model.uses_ghost_clipping:
        from tan_keras.per_example import ghost_jax

        accumulate = ghost_jax.accumulate
    grad_sum, loss_sum, y_pred, non_trainable, stats = accumulate(model, plan, state, x, y, weights)

    mapping = list(zip(model.trainable_variables, trainable)) + list(zip(optimizer.variables, optimizer_variables))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        noise_norm, signal_norm = optimizer.apply_private(grad_sum, plan.normalizer)
    trainable = _updated(model.trainable_variables, trainable, scope)
    optimizer_variables = _updated(optimizer.variables, optimizer_variables, scope)

    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in trainable] + [jnp.isfinite(noise_norm)]))
    jax.debug.callback(_raise_if_not_finite, finite)
    dp_values = clipping.dp_metric_values(stats, signal_norm, noise_norm)
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
    """Per-example gradients of the compiled loss (leading axis = example)."""
    x, y = jax.tree_util.tree_map(jnp.asarray, (x, y))
    n = _leading_dim(x)
    weights = jnp.ones((n,)) if sample_weight is None else jnp.asarray(sample_weight)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    metrics_variables = [v.value for v in model.metrics_variables]
    optimizer_variables = [v.value for v in model.optimizer.variables] if model.optimizer else None
    loss_fn = _loss_fn(model, metrics_variables, optimizer_variables)

    @jax.jit  # compiled, like the train step (XLA and eager CPU kernels round differently)
    def grads_fn(trainable, non_trainable, x, y, weights):
        return _per_example_fn(loss_fn, trainable, non_trainable)(x, y, weights)[0]

    return grads_fn(trainable, non_trainable, x, y, weights)


def clipped_sum_and_norms(model, x, y, l2_norm_clip, sample_weight=None):
    """``(Σ_i clip_C(∇ℓ_i), (‖∇ℓ_i‖)_i)`` by the strategy the model's train step uses, jitted as there."""
    if getattr(model, "uses_ghost_clipping", False):
        from tan_keras.per_example import ghost_jax

        return ghost_jax.clipped_grad_sum_of(model, x, y, l2_norm_clip, sample_weight=sample_weight)
    grads = per_example_gradients(model, x, y, sample_weight)
    norms = clipping.global_norms(grads)
    return clipping.weighted_sum(grads, clipping.clip_factors(norms, l2_norm_clip)), norms


def loop_per_example_gradients(model, x, y=None, sample_weight=None):
    """Reference: ``∇ℓ_i`` one example at a time, by ``jax.grad`` of a batch-of-one loss (no ``vmap``)."""
    x, y = jax.tree_util.tree_map(jnp.asarray, (x, y))
    n = _leading_dim(x)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    metrics_variables = [v.value for v in model.metrics_variables]
    kwargs = {"training": True} if model._call_has_training_arg else {}

    @jax.jit
    def grad_one(trainable, xi, yi, wi):
        def loss(trainable):
            y_pred, _ = model.stateless_call(trainable, non_trainable, xi, **kwargs)
            value, _ = model.stateless_compute_loss(trainable, non_trainable, metrics_variables, x=xi, y=yi,
                                                    y_pred=y_pred, sample_weight=wi, training=True)
            return scalar_loss(value)

        return jax.grad(loss)(trainable)

    out = []
    for i in range(n):
        xi, yi = jax.tree_util.tree_map(lambda a: a[i:i + 1], (x, y))
        wi = None if sample_weight is None else jnp.asarray(sample_weight)[i:i + 1]
        out.append([np.asarray(g) for g in grad_one(trainable, xi, yi, wi)])
    return out
