"""TensorFlow helpers shared by the step and both strategies: the XLA boundary, the scalar loss, the batch size."""

import contextlib

import tensorflow as tf
from keras.src.losses import loss as keras_loss


def compiled(fn):
    """``fn`` compiled with XLA: every per-example computation on TensorFlow goes through here.

    Why: under ``tf.vectorized_map``, a per-example matmul against a shared
    weight becomes a ``BatchMatMulV2`` of a ``[B, 1, M, K]`` input with a
    broadcast ``[K, N]`` kernel. oneDNN's kernel for that op (the default on
    x86) returns wrong rows for examples 3 and up and can corrupt the heap on
    AVX-512 CPUs (TF 2.21; ``docs/tf_onednn_batch_matmul.md``). A wrong
    per-example norm is a wrong clip factor, which voids the DP bound. XLA
    compiles the computation with its own kernels, whatever oneDNN does, and
    was measured faster than the oneDNN graph on CPU for both strategies. The
    rest of the step (noise, optimizer update, metrics) follows
    ``compile(jit_compile=...)``.

    Models with ops XLA cannot compile (``tf.py_function``, string ops) cannot
    use the TensorFlow per-example path; use the JAX backend for those.
    """
    return tf.function(fn, jit_compile=True)


def leading_dim(x):
    """The batch size: static if known, else a scalar tensor."""
    first = tf.nest.flatten(x)[0]
    static = first.shape[0]
    return static if static is not None else tf.shape(first)[0]


def call_model(model, x):
    return model(x, training=True) if model._call_has_training_arg else model(x)


@contextlib.contextmanager
def _unscaled_for_distribution():
    """Keras's losses as on one device, in a ``tf.distribute`` replica context (at trace time).

    Under a strategy with R > 1 replicas Keras multiplies its reduced losses
    (mean-type reductions and ``add_loss`` terms) by 1/R
    (``keras.src.losses.loss.scale_loss_for_distribution``), because its own
    step sums the R replicas' mean gradients. The private step clips each
    example's gradient and sums across replicas itself: a scaled ``ℓ_i``
    would shrink every unclipped gradient by R. Keras looks the function up
    on its module at each call, so swapping it for the identity while the
    loss is traced turns that scaling off, and only that. (``MirroredStrategy``
    traces its replicas' threads one at a time between merge points, and the
    swap holds no merge point, so no other replica's trace sees it.)
    """
    if tf.distribute.get_strategy().num_replicas_in_sync <= 1:
        yield
        return
    original = keras_loss.scale_loss_for_distribution
    keras_loss.scale_loss_for_distribution = lambda value: value
    try:
        yield
    finally:
        keras_loss.scale_loss_for_distribution = original


def compute_loss(model, x, y, y_pred, sample_weight):
    """The compiled loss as a scalar: the mean over examples of a ``reduction="none"`` loss (TF Privacy's
    convention), which is what Keras's default ``"sum_over_batch_size"`` gives. Under ``tf.distribute`` it
    is the loss as on one device (not Keras's per-replica 1/R share)."""
    with _unscaled_for_distribution():
        loss = model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
    return tf.reduce_mean(loss) if loss.shape.rank else loss


def as_tensors(x, y, sample_weight):
    """Tool entry points: tensors, with unit sample weights if none are given."""
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    y = tf.nest.map_structure(tf.convert_to_tensor, y) if y is not None else None
    weights = tf.ones((leading_dim(x),)) if sample_weight is None else tf.convert_to_tensor(sample_weight)
    return x, y, weights
