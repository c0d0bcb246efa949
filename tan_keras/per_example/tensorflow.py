"""TensorFlow backend: ``tf.vectorized_map`` over a per-example ``GradientTape``.

The step runs inside the ``tf.function`` Keras's TF trainer builds around
``train_step`` and so honours ``compile(jit_compile=...)``; the per-example
part of each chunk always runs under XLA (``compiled``: oneDNN's batched
matmul is wrong for the shapes ``vectorized_map`` produces). Chunks of
``physical_batch_size`` examples are processed in a ``tf.while_loop``. Keras
traces with ``reduce_retracing=True``, so the batch size may be dynamic here:
the layout is computed with tensors, and ``plan.make_plan`` is used only when
the batch size is static.
"""


import keras
import tensorflow as tf

from tan_keras import clipping
from tan_keras.layer_checks import check_private_layers
from tan_keras.per_example.plan import make_plan


def _leading_dim(x):
    first = tf.nest.flatten(x)[0]
    static = first.shape[0]
    return static if static is not None else tf.shape(first)[0]


def compute_loss(model, x, y, y_pred, sample_weight):
    """The compiled loss as a scalar: the mean over examples of a ``reduction="none"`` loss (TF Privacy's
    convention), which is what Keras's default ``"sum_over_batch_size"`` gives."""
    loss = model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
    return tf.reduce_mean(loss) if loss.shape.rank else loss


def _example_grads_fn(model, variables):
    def one(args):
        x, y, sample_weight = tf.nest.map_structure(lambda a: a[None], args)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True) if model._call_has_training_arg else model(x)
            loss = compute_loss(model, x, y, y_pred, sample_weight)
        grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return grads, loss, tf.nest.map_structure(lambda a: a[0], y_pred)

    return one


def compiled(fn):
    """``fn`` compiled with XLA: every per-example computation on TensorFlow goes through here.

    Why: under ``tf.vectorized_map``, a per-example matmul against a shared
    weight becomes a ``BatchMatMulV2`` of a ``[B, 1, M, K]`` input with a
    broadcast ``[K, N]`` kernel. oneDNN's kernel for that op (the default on
    x86 since TF 2.9) returns wrong rows for examples 3 and up and can corrupt
    the heap on AVX-512 CPUs (TF 2.21; ``docs/tf_onednn_batch_matmul.md``).
    A wrong per-example norm is a wrong clip factor, which voids the DP
    bound. XLA compiles the computation with its own kernels, whatever
    oneDNN does, and was measured faster than the oneDNN graph on CPU for both
    strategies. The rest of the step (noise, optimizer update, metrics)
    follows ``compile(jit_compile=...)``.

    Models with ops XLA cannot compile (``tf.py_function``, string ops) cannot
    use the TensorFlow per-example path; use the JAX backend for those.
    """
    return tf.function(fn, jit_compile=True)


def _chunk_grads(model, variables, per_example, unit_size, xc, yc, swc):
    """Returns (summed chunk gradients, loss sum, y_pred, ``clipping.unit_stats``).

    The per-example branch runs under XLA (``compiled``).
    """
    if per_example:
        return compiled(lambda xc, yc, swc: _chunk_grads_impl(model, variables, per_example, unit_size,
                                                              xc, yc, swc))(xc, yc, swc)
    return _chunk_grads_impl(model, variables, per_example, unit_size, xc, yc, swc)


def _chunk_grads_impl(model, variables, per_example, unit_size, xc, yc, swc):
    optimizer = model.optimizer
    if per_example:
        grads, losses, y_pred = tf.vectorized_map(_example_grads_fn(model, variables), (xc, yc, swc))
        real = tf.cast(swc != 0, grads[0].dtype)
        if optimizer.num_microbatches is not None:
            # ``unit_size`` may be a tensor (a partial last batch): group with shapes, never a Python bool.
            groups = tf.shape(swc)[0] // unit_size
            grads = clipping.group_microbatches(grads, groups)
            real = tf.reduce_max(tf.reshape(real, (groups, -1)), axis=1)  # a group with a real example
        norms = clipping.global_norms(grads)
        factors = clipping.clip_factors(norms, optimizer.l2_norm_clip)
        stats = clipping.unit_stats(norms, real, optimizer.l2_norm_clip)
        return clipping.weighted_sum(grads, factors), tf.reduce_sum(losses), y_pred, stats
    with tf.GradientTape() as tape:
        y_pred = model(xc, training=True) if model._call_has_training_arg else model(xc)
        mean_loss = compute_loss(model, xc, yc, y_pred, swc)
    size = tf.cast(tf.shape(swc)[0], mean_loss.dtype)
    grads = tape.gradient(mean_loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [g * size for g in grads], mean_loss * size, y_pred, tf.zeros((4,), mean_loss.dtype)


def _layout(model, batch_size):
    """(units per batch, unit size, chunk size, chunks, normaliser) — static or tensors."""
    optimizer = model.optimizer
    if isinstance(batch_size, int):
        plan = make_plan(batch_size, optimizer, model.physical_batch_size)
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


def private_train_step(model, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if not model.built:  # subclassed models create their variables on first call
        model(x, training=False)
    check_private_layers(model)  # at trace time: layers added or built after compile
    variables = model.trainable_variables
    dtype = variables[0].dtype
    n = _leading_dim(x)
    weights = sample_weight if sample_weight is not None else tf.ones((n,), dtype)
    per_example, unit_size, p, num_chunks, normalizer = _layout(model, n)
    chunk_grads = _chunk_grads
    if model.uses_ghost_clipping:
        from tan_keras.per_example import ghost_tensorflow

        chunk_grads = ghost_tensorflow.chunk_grads

    if isinstance(p, int) and isinstance(num_chunks, int) and num_chunks == 1:
        grad_sum, loss_sum, y_pred, stats = chunk_grads(model, variables, per_example, unit_size, x, y, weights)
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
            g, loss, y_pred, st = chunk_grads(model, variables, per_example, unit_size,
                                               tf.nest.map_structure(sl, xs), tf.nest.map_structure(sl, ys),
                                               sl(sws))
            structure["y_pred"] = y_pred
            arrays = [ta.write(i, tf.cast(v, ta.dtype)) for ta, v in zip(arrays, tf.nest.flatten(y_pred))]
            return i + 1, [a + b for a, b in zip(grad_sum, g)], loss_sum + loss, stats + st, arrays

        init = (tf.constant(0), [tf.zeros_like(v) for v in variables], tf.zeros((), dtype),
                tf.zeros((4,), dtype), arrays)
        _, grad_sum, loss_sum, stats, arrays = tf.while_loop(
            lambda i, *_: i < num_chunks, body, init)
        y_pred = tf.nest.pack_sequence_as(structure["y_pred"], [ta.concat()[:n] for ta in arrays])

    noise_norm, signal_norm = model.optimizer.apply_private(grad_sum, normalizer, variables)
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables] + [tf.math.is_finite(noise_norm)])
    tf.debugging.Assert(finite, [clipping.NONFINITE_STEP_MESSAGE])
    dp_values = clipping.dp_metric_values(stats, signal_norm, noise_norm)
    # Mean over real examples: zero-weight rows are Poisson padding.
    num_real = tf.maximum(tf.reduce_sum(tf.cast(weights != 0, loss_sum.dtype)), 1.0)
    model._loss_tracker.update_state(loss_sum / num_real, sample_weight=num_real)
    for tracker, value in zip(model._dp_metrics(), dp_values):
        tracker.update_state(value)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def per_example_gradients(model, x, y=None, sample_weight=None):
    """Per-example gradients of the compiled loss (leading axis = example), under XLA as in the step."""
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    y = tf.nest.map_structure(tf.convert_to_tensor, y) if y is not None else None
    n = _leading_dim(x)
    weights = tf.ones((n,)) if sample_weight is None else tf.convert_to_tensor(sample_weight)

    def grads(x, y, weights):
        return tf.vectorized_map(_example_grads_fn(model, model.trainable_variables), (x, y, weights))[0]

    return compiled(grads)(x, y, weights)




def clipped_sum_and_norms(model, x, y, l2_norm_clip, sample_weight=None):
    """``(Σ_i clip_C(∇ℓ_i), (‖∇ℓ_i‖)_i)`` by the strategy the model's train step uses, compiled as there."""
    if getattr(model, "uses_ghost_clipping", False):
        from tan_keras.per_example import ghost_tensorflow

        return ghost_tensorflow.clipped_grad_sum_of(model, x, y, l2_norm_clip, sample_weight=sample_weight)
    grads = per_example_gradients(model, x, y, sample_weight)
    norms = clipping.global_norms(grads)
    return clipping.weighted_sum(grads, clipping.clip_factors(norms, l2_norm_clip)), norms


def loop_per_example_gradients(model, x, y=None, sample_weight=None):
    """Reference: ``∇ℓ_i`` one example at a time, each in its own eager ``GradientTape`` (no vectorization)."""
    n = int(_leading_dim(x))
    variables = model.trainable_variables
    out = []
    for i in range(n):
        xi, yi = tf.nest.map_structure(lambda a: tf.convert_to_tensor(a[i:i + 1]), (x, y))
        wi = None if sample_weight is None else tf.convert_to_tensor(sample_weight[i:i + 1])
        with tf.GradientTape() as tape:
            y_pred = model(xi, training=True) if model._call_has_training_arg else model(xi)
            loss = compute_loss(model, xi, yi, y_pred, wi)
        grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        out.append([tf.convert_to_tensor(g).numpy() for g in grads])
    return out
