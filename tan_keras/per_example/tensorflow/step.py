"""TensorFlow private train step: layout, chunk loop and padding, statistics, hand-off to the optimizer.

The step runs inside the ``tf.function`` Keras's TF trainer builds around
``train_step`` and so honours ``compile(jit_compile=...)``. oneDNN's batched
matmul is wrong for the shapes ``vectorized_map`` produces
(``docs/tf_onednn_batch_matmul.md``): the ghost strategy's chunk runs under
XLA (``common.compiled``), the vectorized one is traced with pfor's
batch-matmul converter rewritten (``common.exact_batch_matmul``). Chunks of ``physical_batch_size`` examples are
processed in a ``tf.while_loop``. Keras traces with
``reduce_retracing=True``, so the batch size may be dynamic here: the layout
is computed with tensors, and ``plan.make_plan`` is used only when the batch
size is static.

Strategies (each gives the clipped sum of one chunk; the step never lends
them anything back): ``vectorized.clipped_chunk`` and ``ghost.clipped_chunk``;
``vectorized.summed_chunk`` for Noisy-SGD (no clipping).

Under ``tf.distribute`` (``MirroredStrategy``, ``MultiWorkerMirroredStrategy``)
Keras runs this step once per replica on the replica's share of the global
batch. Each replica clips its own examples; the clipped sums, loss sums, clip
statistics and example counts are then summed across the R replicas with one
``all_reduce`` (``_sum_across_replicas``). The noise is **added once**, to
that global sum: every replica holds the same sum and the same mirrored seed
state, so every replica draws the same ``N(0, σ²C² I)`` and computes the same
update ``(Σ_{all replicas} clip + z) / B``, with B the global batch
(``expected_batch_size``, or the global number of units); the optimizer
skips Keras's own cross-replica gradient sum for it
(``apply_private(..., summed_across_replicas=True)``). The noise std on the
sum is σC, as on one device, and with the same seed the draw is the
single-device draw.
"""

import keras
import tensorflow as tf

from tan_keras import clipping
from tan_keras.ghost.registry import ghost_plan, log_fallback
from tan_keras.layer_checks import check_private_layers
from tan_keras.per_example import plan as plans
from tan_keras.per_example.tensorflow import ghost, vectorized
from tan_keras.per_example.tensorflow.common import as_tensors, compiled, leading_dim


def _layout(model, batch_size):
    """(per_example, unit size, chunk size, chunks, normaliser) — static or tensors."""
    optimizer = model.optimizer
    if isinstance(batch_size, int):
        plan = plans.make_plan(batch_size, optimizer, model.physical_batch_size)
        return plan.per_example, plan.unit_size, plan.chunk_size, plan.num_chunks, plan.normalizer
    per_example = optimizer.requires_per_example
    n = batch_size
    m = optimizer.num_microbatches if per_example else None
    if m is not None:
        tf.debugging.assert_equal(n % m, 0, message=f"num_microbatches={m} must divide the batch size.")
        unit_size = n // m
    else:
        unit_size = 1
    p = tf.minimum(model.physical_batch_size or n, n)
    if m is not None:
        tf.debugging.assert_equal(n % p, 0, message="physical_batch_size must divide the batch size.")
        tf.debugging.assert_equal(p % unit_size, 0,
                                  message="physical_batch_size must be a multiple of the microbatch size.")
    num_chunks = (n + p - 1) // p
    expected = optimizer.expected_batch_size
    if expected is not None:
        normalizer = tf.cast(expected, tf.float32) / tf.cast(unit_size, tf.float32)
    else:
        normalizer = tf.cast(m if m is not None else n, tf.float32)
    return per_example, unit_size, p, num_chunks, normalizer


def _chunk_fn(model, variables, per_example, unit_size):
    """The chosen strategy for one chunk: ``(xc, yc, swc) -> (grad_sum, loss_sum, ŷ, stats)``."""
    optimizer = model.optimizer
    if not per_example:
        def unclipped(xc, yc, swc):
            grads, loss, y_pred = vectorized.summed_chunk(model, variables, xc, yc, swc)
            return grads, loss, y_pred, tf.zeros((4,), loss.dtype)

        return unclipped
    strategy = plans.strategy(model)
    if strategy == "ghost":
        reason = ghost_plan(model).reason
        if reason is not None:  # a layer without a rule: vectorized, outside XLA (see ``common.compiled``)
            log_fallback(model, reason)
            strategy = "vectorized"
    if strategy == "ghost":
        clipped = lambda xc, yc, swc: ghost.clipped_chunk(model, variables, xc, yc, swc)  # noqa: E731
    else:
        clipped = lambda xc, yc, swc: vectorized.clipped_chunk(model, variables, unit_size, xc, yc, swc)  # noqa: E731

    def chunk(xc, yc, swc):
        grads, loss, y_pred, norms, unit_mask = clipped(xc, yc, swc)
        stats = clipping.unit_stats(norms, unit_mask, optimizer.l2_norm_clip)
        return grads, loss, y_pred, tf.cast(stats, loss.dtype)

    # Ghost under XLA (exact whatever oneDNN does, and faster); vectorized traced with
    # ``exact_batch_matmul`` instead (XLA:CPU runs its conv loop ~20× slower).
    return compiled(chunk) if strategy == "ghost" else chunk


def _replica_context():
    """The ``tf.distribute`` replica context when the step runs on one of R > 1 replicas, else None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def _sum_across_replicas(context, model, grad_sum, loss_sum, stats, num_real, normalizer):
    """Sums over the replicas, in one ``all_reduce``: the normaliser becomes the global B."""
    optimizer = model.optimizer
    if optimizer.requires_per_example and optimizer.num_microbatches is not None:
        raise ValueError(
            f"num_microbatches={optimizer.num_microbatches} under tf.distribute with "
            f"{context.num_replicas_in_sync} replicas: microbatches would be cut from each replica's "
            "share of the batch. Use num_microbatches=None (clip every example), or one device.")
    global_units = optimizer.expected_batch_size is None
    values = [grad_sum, loss_sum, stats, num_real] + ([tf.cast(normalizer, loss_sum.dtype)] if global_units else [])
    summed = context.all_reduce(tf.distribute.ReduceOp.SUM, values)
    grad_sum, loss_sum, stats, num_real = summed[:4]
    return grad_sum, loss_sum, stats, num_real, summed[4] if global_units else normalizer


def private_train_step(model, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if not model.built:  # subclassed models create their variables on first call
        model(x, training=False)
    check_private_layers(model)  # at trace time: layers added or built after compile
    variables = model.trainable_variables
    dtype = variables[0].dtype
    n = leading_dim(x)
    weights = sample_weight if sample_weight is not None else tf.ones((n,), dtype)
    per_example, unit_size, p, num_chunks, normalizer = _layout(model, n)
    chunk = _chunk_fn(model, variables, per_example, unit_size)

    if isinstance(p, int) and isinstance(num_chunks, int) and num_chunks == 1:
        grad_sum, loss_sum, y_pred, stats = chunk(x, y, weights)
    else:
        padded = num_chunks * p

        def pad(a):
            extra = padded - tf.shape(a)[0]
            return tf.concat([a, tf.zeros(tf.concat([[extra], tf.shape(a)[1:]], 0), a.dtype)], 0)

        xs, ys, sws = tf.nest.map_structure(pad, (x, y, weights))
        # Per-chunk predictions go to one TensorArray per output leaf; the
        # structure of y_pred is recorded when the loop body is traced.
        leaf_specs = tf.nest.flatten(model.compute_output_spec(tf.nest.map_structure(
            lambda a: keras.KerasTensor((1,) + tuple(a.shape[1:]), dtype=a.dtype.name), x)))
        arrays = [tf.TensorArray(dtype=spec.dtype, size=num_chunks, infer_shape=False,
                                 element_shape=tf.TensorShape([None] + list(spec.shape[1:])))
                  for spec in leaf_specs]
        structure = {}

        def body(i, grad_sum, loss_sum, stats, arrays):
            sl = lambda a: a[i * p:(i + 1) * p]  # noqa: E731
            g, loss, y_pred, st = chunk(tf.nest.map_structure(sl, xs), tf.nest.map_structure(sl, ys), sl(sws))
            structure["y_pred"] = y_pred
            arrays = [ta.write(i, tf.cast(v, ta.dtype)) for ta, v in zip(arrays, tf.nest.flatten(y_pred))]
            return i + 1, [a + b for a, b in zip(grad_sum, g)], loss_sum + loss, stats + st, arrays

        init = (tf.constant(0), [tf.zeros_like(v) for v in variables], tf.zeros((), dtype),
                tf.zeros((4,), dtype), arrays)
        _, grad_sum, loss_sum, stats, arrays = tf.while_loop(
            lambda i, *_: i < num_chunks, body, init)
        y_pred = tf.nest.pack_sequence_as(structure["y_pred"], [ta.concat()[:n] for ta in arrays])

    # Mean over real examples: zero-weight rows are Poisson padding.
    num_real = tf.reduce_sum(tf.cast(weights != 0, loss_sum.dtype))
    context = _replica_context()
    if context is not None:
        grad_sum, loss_sum, stats, num_real, normalizer = _sum_across_replicas(
            context, model, grad_sum, loss_sum, stats, num_real, normalizer)
    noise_norm, signal_norm = model.optimizer.apply_private(grad_sum, normalizer, variables,
                                                            summed_across_replicas=context is not None)
    finite = clipping.all_finite(list(variables) + [noise_norm])
    tf.debugging.Assert(finite, [clipping.NONFINITE_STEP_MESSAGE])
    dp_values = clipping.dp_metric_values(stats, signal_norm, noise_norm, finite)
    num_real = tf.maximum(num_real, 1.0)
    model._loss_tracker.update_state(loss_sum / num_real, sample_weight=num_real)
    for tracker, value in zip(model._dp_metrics(), dp_values):
        tracker.update_state(value)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def per_example_gradients(model, x, y=None, sample_weight=None):
    """Per-example gradients of the compiled loss (leading axis = example), traced as the vectorized step is."""
    return vectorized.per_example_gradients(model, *as_tensors(x, y, sample_weight))


def clipped_sum_and_norms(model, x, y, l2_norm_clip, sample_weight=None):
    """``(Σ_i clip_C(∇ℓ_i), (‖∇ℓ_i‖)_i)`` by the strategy the model's train step uses, compiled as there."""
    x, y, weights = as_tensors(x, y, sample_weight)
    if plans.strategy(model) == "ghost":
        return ghost.clipped_grad_sum_of(model, x, y, l2_norm_clip, weights)
    grads = vectorized.per_example_gradients(model, x, y, weights)
    norms = clipping.global_norms(grads)
    return clipping.weighted_sum(grads, clipping.clip_factors(norms, l2_norm_clip)), norms
