"""TensorFlow helpers shared by the step and both strategies: the oneDNN workarounds, the scalar loss, the batch size."""

import contextlib
import functools

import numpy as np
import tensorflow as tf
from keras.src.losses import loss as keras_loss

from tan_keras.per_example import rounding


def compiled(fn):
    """``fn`` compiled with XLA: the ghost strategy's chunk runs through here.

    Why: TensorFlow 2.21's oneDNN ``BatchMatMulV2`` returns wrong rows (and can
    corrupt the heap) for a ``[B, 1, M, K]`` input with a broadcast ``[K, N]``
    matrix on AVX-512 CPUs (``docs/tf_onednn_batch_matmul.md``). XLA compiles
    the computation with its own kernels, whatever oneDNN does; for the ghost
    strategy it is also faster than the oneDNN graph on CPU (benchmark CNN,
    B = 256: 31.4 vs 65.2 ms per step). The vectorized strategy is not
    compiled: XLA:CPU runs pfor's per-example loop for convolution weight
    gradients about 20× slower than the oneDNN graph (WRN-16-4 on TF, B = 64:
    65.5 s per step), so it avoids the broken op pattern instead
    (``exact_batch_matmul``). The rest of the step (noise, optimizer update,
    metrics) follows ``compile(jit_compile=...)``.

    Models with ops XLA cannot compile (``tf.py_function``, string ops) use
    ``clipping="vectorized"`` on TensorFlow, or the JAX backend.
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


def _batch_matmul_converter(original):
    """pfor's ``BatchMatMulV2`` converter, rewritten so that no broadcast batch matmul reaches oneDNN.

    ``vectorized_map`` turns a per-example ``[1, M, K] @ [K, N]`` into
    ``[B, 1, M, K] @ [K, N]``, the broadcast case that oneDNN gets wrong
    (``docs/tf_onednn_batch_matmul.md``). With the weight unstacked and
    without batch dimensions of its own, this is one 2-D matmul of the
    reshaped ``[B·M, K]`` input (what pfor does for ``MatMul``); any other
    mix of stacked and unstacked operands is broadcast explicitly first, so
    the kernel sees equal batch shapes.
    """
    from tensorflow.python.ops.parallel_for.pfor import wrap

    def convert(pfor_input):
        x, x_stacked, _ = pfor_input.input(0)
        y, y_stacked, _ = pfor_input.input(1)
        adj_x, adj_y = pfor_input.get_attr("adj_x"), pfor_input.get_attr("adj_y")
        if x_stacked and not y_stacked and y.shape.rank is not None and all(d == 1 for d in y.shape[:-2]):
            if y.shape.rank > 2:
                y = tf.reshape(y, tf.shape(y)[-2:])
            if adj_x:
                x = tf.linalg.adjoint(x)
            shape = tf.shape(x)
            out = tf.matmul(tf.reshape(x, [-1, shape[-1]]), y, adjoint_b=adj_y)
            return wrap(tf.reshape(out, tf.concat([shape[:-1], tf.shape(out)[-1:]], 0)), True)
        if x_stacked != y_stacked:
            pfor_input.stack_inputs()
            x, y = pfor_input.stacked_input(0), pfor_input.stacked_input(1)
            batch = tf.broadcast_dynamic_shape(tf.shape(x)[:-2], tf.shape(y)[:-2])
            x = tf.broadcast_to(x, tf.concat([batch, tf.shape(x)[-2:]], 0))
            y = tf.broadcast_to(y, tf.concat([batch, tf.shape(y)[-2:]], 0))
            return wrap(tf.matmul(x, y, adjoint_a=adj_x, adjoint_b=adj_y), True)
        return original(pfor_input)

    return convert


@contextlib.contextmanager
def exact_batch_matmul():
    """While tracing a ``vectorized_map``: pfor converts ``BatchMatMulV2`` without the broken broadcast case.

    Scoped to the trace (the process's pfor registry is restored on exit), so
    the user's own ``vectorized_map`` calls are untouched.
    """
    from tensorflow.python.ops.parallel_for import pfor

    registry = pfor._pfor_converter_registry
    original = registry["BatchMatMulV2"]
    registry["BatchMatMulV2"] = _batch_matmul_converter(original)
    try:
        yield
    finally:
        registry["BatchMatMulV2"] = original


def einsum_f32(equation, a, b):
    """einsum in at least float32 (``tf.einsum`` has no accumulation type: the operands are cast; float64 stays)."""
    dtype = tf.float64 if tf.float64 in (tf.as_dtype(a.dtype), tf.as_dtype(b.dtype)) else tf.float32
    return tf.einsum(equation, tf.cast(a, dtype), tf.cast(b, dtype))


@functools.lru_cache(maxsize=None)
def _probed_bits(tensor_float_32, gpus):
    with tf.init_scope():  # eagerly, on the default device, even while a step is traced
        rows, identity = rounding.probe_operands()
        product = tf.matmul(tf.constant(rows), tf.constant(identity)).numpy()
    return rounding.kept_bits(product)


def float32_matmul_bits():
    """Significand bits a float32 matmul keeps of its operands here (``rounding``): 24 on a CPU, 11 on a GPU
    with TensorFloat-32 execution (TensorFlow's default). Probed once per setting and set of GPUs."""
    gpus = tuple(d.name for d in tf.config.list_logical_devices("GPU"))
    return _probed_bits(tf.config.experimental.tensor_float_32_execution_enabled(), gpus)


def round_significand(x, bits):
    """float32 ``x`` rounded to nearest (ties to even) at ``bits`` significant bits; non-finite values kept
    (on the bit pattern, as the JAX backend's)."""
    drop = rounding.FLOAT32_BITS - bits
    if drop <= 0:
        return x
    u = tf.bitcast(x, tf.int32)
    last_kept = tf.bitwise.bitwise_and(tf.bitwise.right_shift(u, drop), 1)
    u = tf.bitwise.bitwise_and(u + ((1 << (drop - 1)) - 1) + last_kept, -(1 << drop))
    return tf.where(tf.math.is_finite(x), tf.bitcast(u, tf.float32), x)


def fused_conv_per_example_grads(x, g, kernel_size, strides, padding, dilation_rate, views=1):
    """No fused per-example conv kernel on TensorFlow: None, and the caller forms the patches (``ghost.norms``)."""
    return None


def fused_conv_weight_grad(x, g, kernel_size, strides, padding, dilation_rate):
    """No fused conv kernel on TensorFlow: None, and the caller takes one matmul per kernel offset (``ghost.norms``)."""
    return None
