"""TensorFlow backend of the private step: ``step`` (the train step), ``vectorized`` and ``ghost`` (strategies)."""

from tan_keras.per_example.tensorflow.common import (einsum_f32, float32_matmul_bits,
                                                     fused_conv_per_example_grads, fused_conv_weight_grad,
                                                     round_significand)
from tan_keras.per_example.tensorflow.reference import loop_per_example_gradients
from tan_keras.per_example.tensorflow.step import clipped_sum_and_norms, per_example_gradients, private_train_step

__all__ = ["private_train_step", "per_example_gradients", "clipped_sum_and_norms", "loop_per_example_gradients",
           "einsum_f32", "float32_matmul_bits", "round_significand", "fused_conv_per_example_grads",
           "fused_conv_weight_grad"]
