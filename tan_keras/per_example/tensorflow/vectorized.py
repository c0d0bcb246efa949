"""TensorFlow vectorized strategy: ``tf.vectorized_map`` over a per-example ``GradientTape``.

Gives the clipped sum of one chunk from materialized per-example (or
per-microbatch) gradients; any layer works. Traced with pfor's batch-matmul
converter rewritten (``common.exact_batch_matmul``) so that no broadcast
``BatchMatMulV2`` reaches oneDNN. Also the unclipped sum of one chunk, for
Noisy-SGD.
"""

import tensorflow as tf

from tan_keras import clipping
from tan_keras.per_example.tensorflow.common import call_model, compute_loss, exact_batch_matmul


def example_grads_fn(model, variables):
    """``(x_i, y_i, w_i) -> (∇ℓ_i, ℓ_i, ŷ_i)`` for one example, as a batch of one."""

    def one(args):
        x, y, sample_weight = tf.nest.map_structure(lambda a: a[None], args)
        with tf.GradientTape() as tape:
            y_pred = call_model(model, x)
            loss = compute_loss(model, x, y, y_pred, sample_weight)
        grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return grads, loss, tf.nest.map_structure(lambda a: a[0], y_pred)

    return one


def clipped_chunk(model, variables, unit_size, xc, yc, swc):
    """``(Σ_units clip_C(g_u), loss sum, ŷ, unit norms, unit mask)`` for one chunk.

    Units are examples, or TF Privacy's microbatches (means of ``unit_size``
    consecutive examples; ``unit_size`` may be a tensor for a partial batch).
    """
    optimizer = model.optimizer
    with exact_batch_matmul():
        grads, losses, y_pred = tf.vectorized_map(example_grads_fn(model, variables), (xc, yc, swc))
    real = tf.cast(swc != 0, grads[0].dtype)
    if optimizer.num_microbatches is not None:
        groups = tf.shape(swc)[0] // unit_size  # shapes, never a Python bool on a tensor
        grads = clipping.group_microbatches(grads, groups)
        real = tf.reduce_max(tf.reshape(real, (groups, -1)), axis=1)  # a group with a real example
    norms = clipping.global_norms(grads)
    factors = clipping.clip_factors(norms, optimizer.l2_norm_clip)
    return clipping.weighted_sum(grads, factors), tf.reduce_sum(losses), y_pred, norms, real


def summed_chunk(model, variables, xc, yc, swc):
    """``(Σ_i ∇ℓ_i, loss sum, ŷ)`` for one chunk, unclipped (Noisy-SGD): one batched backward pass."""
    with tf.GradientTape() as tape:
        y_pred = call_model(model, xc)
        mean_loss = compute_loss(model, xc, yc, y_pred, swc)
    size = tf.cast(tf.shape(swc)[0], mean_loss.dtype)
    grads = tape.gradient(mean_loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [g * size for g in grads], mean_loss * size, y_pred


def clipped_sum(model, variables, x, y, sample_weight, l2_norm_clip):
    """``(Σ_i clip_C(∇ℓ_i), norms, losses, ŷ)`` of per-example units (the ghost strategy's fallback)."""
    with exact_batch_matmul():
        grads, losses, y_pred = tf.vectorized_map(example_grads_fn(model, variables), (x, y, sample_weight))
    norms = clipping.global_norms(grads)
    return clipping.weighted_sum(grads, clipping.clip_factors(norms, l2_norm_clip)), norms, losses, y_pred


def per_example_gradients(model, x, y, sample_weight):
    """Per-example gradients of the compiled loss (leading axis = example), traced as in the step."""

    @tf.function
    def grads(x, y, weights):
        with exact_batch_matmul():
            return tf.vectorized_map(example_grads_fn(model, model.trainable_variables), (x, y, weights))[0]

    return grads(x, y, sample_weight)
