"""Per-example gradients and the private train step, one module per backend.

This package is the only place in tan_keras that imports TensorFlow or JAX
(the way Keras keeps ``keras/src/backend/<name>/``). Each backend module
provides:

* ``private_train_step(model, ...)``: the DP train step (signature of that
  backend's ``Model.train_step``);
* ``per_example_gradients(model, x, y, sample_weight=None)``: the list of
  per-example gradients (leading axis = example), aligned with
  ``model.trainable_variables``, for the compiled loss. Used by tests and
  tools.
"""

import keras


def _backend_module():
    name = keras.backend.backend()
    if name == "tensorflow":
        from tan_keras.per_example import tensorflow as module
    elif name == "jax":
        from tan_keras.per_example import jax as module
    else:
        raise NotImplementedError(
            f"tan_keras supports the 'tensorflow' and 'jax' Keras backends; KERAS_BACKEND is '{name}'."
        )
    return module


def private_train_step(model, *args):
    return _backend_module().private_train_step(model, *args)


def per_example_gradients(model, x, y=None, sample_weight=None):
    """Per-example gradients of the compiled loss, as numpy-convertible tensors."""
    return _backend_module().per_example_gradients(model, x, y, sample_weight)


def clipped_sum_and_norms(model, x, y, l2_norm_clip, sample_weight=None):
    """``(Σ_i clip_C(∇ℓ_i), per-example norms)`` by the strategy of the model's train step (ghost or vectorized)."""
    return _backend_module().clipped_sum_and_norms(model, x, y, l2_norm_clip, sample_weight)


def loop_per_example_gradients(model, x, y=None, sample_weight=None):
    """Reference per-example gradients, one example at a time with the backend's autodiff (numpy lists)."""
    return _backend_module().loop_per_example_gradients(model, x, y, sample_weight)


def einsum_f32(equation, a, b):
    """``einsum(equation, a, b)`` with float32 results for bf16/fp16/fp32 operands (float64 stays float64).

    bf16 / fp16 operands are multiplied exactly and accumulated in float32 (JAX:
    ``preferred_element_type``), not cast to float32 first: the ghost norms of a
    ``mixed_bfloat16`` model read half the bytes and run on the bf16 matmul
    units, with the accuracy of a float32 product of the same bf16 values.
    """
    return _backend_module().einsum_f32(equation, a, b)


def fused_conv_per_example_grads(x, g, kernel_size, strides, padding, dilation_rate, views=1):
    """``(grads, sum_sq)`` from a fused kernel, or None where there is none.

    ``grads``: ``(n, k·C, P)`` per-example conv kernel gradients (float32, or
    the operands' 16-bit dtype, rounded once from float32 sums);
    ``sum_sq``: their (n,) square sums. ``x`` (n·K, *spatial, C) and ``g``
    (n·K, *spatial_out, P) are channels-last; K = ``views`` rows per example
    are summed. JAX on a GPU: one Pallas kernel that never forms the input
    patches (``jax/conv_grads.py``); elsewhere None.
    """
    return _backend_module().fused_conv_per_example_grads(x, g, kernel_size, strides, padding, dilation_rate,
                                                          views=views)


def fused_conv_weight_grad(x, g, kernel_size, strides, padding, dilation_rate):
    """``(k·C, P)`` a conv's kernel gradient summed over the batch in float32 from a fused kernel, or None.

    ``x`` (B, *spatial, C) and ``g`` (B, *spatial_out, P) channels-last. JAX
    on a GPU: the per-example kernel with the batch's rows summed in its
    float32 accumulators (``jax/conv_grads.py``); elsewhere None.
    """
    return _backend_module().fused_conv_weight_grad(x, g, kernel_size, strides, padding, dilation_rate)


def float32_matmul_bits():
    """Significand bits a default-precision float32 matmul keeps of its operands on this backend's device.

    24 (all) on a CPU; 11 where a GPU multiplies float32 as TF32 (JAX's
    default matmul precision, TensorFlow's TensorFloat-32 execution): each
    operand rounded to 11 bits, exact products, float32 sums. Probed with
    one small matmul on the device (``rounding``).
    """
    return _backend_module().float32_matmul_bits()


def round_significand(x, bits):
    """float32 ``x`` rounded to nearest (ties to even) at ``bits`` significant bits (24: unchanged).

    A matmul that keeps ``bits`` bits multiplies such values exactly: what
    ghost book-keeping feeds a TF32 matmul so that its measurement of the
    clipped contribution and the contribution read the same values.
    """
    return _backend_module().round_significand(x, bits)
