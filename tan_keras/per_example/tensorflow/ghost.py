"""TensorFlow backend of ghost clipping: one forward pass, one backward pass, no per-example grads.

``clipped_grad_sum`` runs the batched model once under a ``GradientTape``
with every watched layer's pre-activation output ``z`` recorded
(``tan_keras.ghost.capture``). Then:

1. ``tape.gradient(ŷ, z, output_gradients=∂ℓ/∂ŷ)``: the example-i slice of
   ``∂(Σ_i ℓ_i)/∂z`` is ``g_i = ∂ℓ_i/∂z_i`` (examples do not interact); with
   the recorded layer inputs it gives the per-example norms ``‖∇ℓ_i‖`` (ghost
   norms) and the clip factors ``c_i = min(1, C/‖∇ℓ_i‖)``;
2. book-keeping (``tan_keras.ghost.bookkeeping``): each layer's share
   of ``Σ_i clip_C(∇ℓ_i)`` is that layer's own weight gradient at its
   recorded arguments with output gradient ``c ⊙ g`` (or ``Σ_i c_i G_i``
   where the norm formed the per-example gradients ``G_i``); nothing is
   backpropagated through the network a second time.

``∂ℓ_i/∂ŷ_i`` comes from ``per_example_losses`` (a batch-of-one loss per
example, as the vectorized path computes it).

Models with a layer that has no ghost-norm rule use the vectorized path
(``vectorized.clipped_sum``), with a logged reason. The step runs the
chunk under XLA (``common.compiled``).
"""

import tensorflow as tf

from tan_keras.ghost.bookkeeping import norms_and_clipped_sum
from tan_keras.ghost.capture import capture, foreign_read_reason, pre_activation_output
from tan_keras.ghost.registry import check_calls, ghost_plan, log_fallback
from tan_keras.per_example.tensorflow import vectorized
from tan_keras.per_example.tensorflow.common import as_tensors, call_model, compiled, compute_loss, exact_batch_matmul


def per_example_losses(model, x, y, y_pred, sample_weight):
    """``(ℓ_i, ∂ℓ_i/∂ŷ_i)``: each example's compiled loss alone (a batch of one) and its gradient.

    The gradients w.r.t. the predictions are taken inside ``tf.vectorized_map``
    and handed to the model's tape as ``output_gradients``, so no gradient
    flows *through* ``vectorized_map`` (whose gradient makes XLA recompile the
    step every time the weights change).
    """

    def one(args):
        xi, yi, pi, wi = tf.nest.map_structure(lambda a: a[None], args)
        with tf.GradientTape() as tape:
            tape.watch(pi)
            loss = compute_loss(model, xi, yi, pi, wi)
        grads = tape.gradient(loss, pi, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, tf.nest.map_structure(lambda a: a[0], grads)

    with exact_batch_matmul():
        if y is None:
            return tf.vectorized_map(lambda args: one((args[0], None, args[1], args[2])), (x, y_pred, sample_weight))
        return tf.vectorized_map(one, (x, y, y_pred, sample_weight))


def clipped_grad_sum(model, variables, x, y, sample_weight, l2_norm_clip):
    """``Σ_i clip_C(∇ℓ_i)`` by ghost clipping (or the vectorized path if a layer has no rule).

    Args:
      model: a built, compiled Keras model.
      variables: ``model.trainable_variables``.
      x, y, sample_weight: one chunk of examples (leading axis = example);
        ``sample_weight`` is a (B,) tensor (ones if unweighted).
      l2_norm_clip: C.

    Returns:
      ``(grad_sum, norms, losses, y_pred)``: the clipped sum (aligned with
      ``variables``), the (B,) per-example gradient norms before clipping, the
      (B,) per-example losses ``ℓ_i`` and the batched predictions.
      Non-trainable variables (seed generators) are updated in place, as in a
      plain Keras step.
    """
    watch = ghost_plan(model)
    reason = watch.reason
    if reason is None:
        reads = []
        with tf.GradientTape() as tape:
            with capture(watch, lambda k, z: z, reads) as calls:
                y_pred = call_model(model, x)
        reason = check_calls(watch, calls, tf.nest.flatten(x)[0].shape[0]) or (
            "the model adds losses in its forward pass (add_loss)" if model.losses else None) or (
            foreign_read_reason(reads))
    if reason is not None:
        log_fallback(model, reason)
        return vectorized.clipped_sum(model, variables, x, y, sample_weight, l2_norm_clip)

    losses, loss_grads = per_example_losses(model, x, y, y_pred, sample_weight)
    output_grads = tape.gradient(tf.nest.flatten(y_pred), [call.output for call in calls],
                                 output_gradients=tf.nest.flatten(loss_grads),
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
    del tape
    grad_sum, norms = norms_and_clipped_sum(model, calls, output_grads, l2_norm_clip, _layer_vjp,
                                                        losses)
    # Embedding gradients come as IndexedSlices; the accumulators expect dense tensors.
    grad_sum = [tf.convert_to_tensor(g) for g in grad_sum]
    return grad_sum, norms, losses, y_pred


def _layer_vjp(call, variables, cotangent):
    """``(∂z/∂W)ᵀ cotangent`` for one captured layer call, re-run under its own tape."""
    with tf.GradientTape() as tape:
        z = pre_activation_output(call)
    return tape.gradient(z, variables, output_gradients=tf.cast(cotangent, z.dtype),
                         unconnected_gradients=tf.UnconnectedGradients.ZERO)


def clipped_chunk(model, variables, xc, yc, swc):
    """``(Σ_i clip_C(∇ℓ_i), loss sum, ŷ, norms, example mask)`` for one chunk (the step's strategy interface)."""
    grads, norms, losses, y_pred = clipped_grad_sum(model, variables, xc, yc, swc, model.optimizer.l2_norm_clip)
    return grads, tf.reduce_sum(losses), y_pred, norms, tf.cast(swc != 0, norms.dtype)


def clipped_grad_sum_of(model, x, y, l2_norm_clip, sample_weight=None):
    """Tool/test entry point: ``(clipped grad sum, per-example norms)`` at the model's current weights (XLA)."""
    x, y, sample_weight = as_tensors(x, y, sample_weight)

    @compiled  # as in the step
    def run(x, y, weights):
        grad_sum, norms, _, _ = clipped_grad_sum(model, model.trainable_variables, x, y, weights, l2_norm_clip)
        return grad_sum, norms

    return run(x, y, sample_weight)
