"""JAX backend of ghost clipping: one forward pass, one backward pass, no per-example grads.

``clipped_grad_sum`` runs the batched model once under ``jax.vjp`` with
respect to *probes*: a probe is a zero input added to the pre-activation
output ``z`` of each watched layer (``tan_keras.ghost``), so the
cotangent it receives is ``∂ℓ/∂z``. Then:

1. ``vjp(1)``: the probes' cotangents are ``∂(Σ_i ℓ_i)/∂z``, whose example-i
   slice is ``g_i = ∂ℓ_i/∂z_i`` (examples do not interact); with the recorded
   layer inputs ``a_i`` they give the per-example norms ``‖∇ℓ_i‖`` (ghost norms)
   and the clip factors ``c_i = min(1, C/‖∇ℓ_i‖)``. The trainable values are
   constants of this pass, so it computes no weight gradient;
2. book-keeping (``tan_keras.ghost.bookkeeping``): each layer's share
   of ``Σ_i clip_C(∇ℓ_i)`` is the VJP of that layer alone, at its recorded
   arguments, with cotangent ``c ⊙ g`` (the weight-gradient half of a
   backward pass, without a second pass through the network), or
   ``Σ_i c_i G_i`` where the norm formed the per-example gradients ``G_i``.

Under ``jit``, XLA drops the layer re-calls' unused forward outputs. Models
with a layer that has no ghost-norm rule use the vectorized path
(``vectorized.clipped_sum``), with a logged reason.
"""

import jax
import jax.numpy as jnp
import keras

from tan_keras.ghost.bookkeeping import norms_and_clipped_sum
from tan_keras.ghost.capture import LayerCall, call_inputs, capture, foreign_read_reason, pre_activation_output
from tan_keras.ghost.registry import check_calls, ghost_plan, log_fallback
from tan_keras.per_example.jax import vectorized
from tan_keras.per_example.jax.common import as_arrays, call_kwargs, scalar_loss, values


def _forward(model, watch, trainable, non_trainable, x, tap, foreign_reads=None):
    with capture(watch, tap, foreign_reads) as calls:
        y_pred, non_trainable, losses = model.stateless_call(
            trainable, non_trainable, x, return_losses=True, **call_kwargs(model))
    return y_pred, non_trainable, losses, calls


def _abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def _trace(model, watch, trainable, non_trainable, x):
    """Shapes of the watched outputs, and a reason to fall back found while tracing (or None)."""
    found = {}

    def fn(trainable, non_trainable, x):
        reads = []
        _, _, losses, calls = _forward(model, watch, trainable, non_trainable, x, lambda k, z: z, reads)
        found["reason"] = check_calls(watch, calls, jax.tree_util.tree_leaves(x)[0].shape[0]) or (
            "the model adds losses in its forward pass (add_loss)" if losses else None) or (
            foreign_read_reason(reads))
        return [call.output for call in calls]

    shapes = jax.eval_shape(fn, *_abstract((trainable, non_trainable, x)))
    return shapes, found["reason"]


def per_example_losses(model, trainable, non_trainable, metrics_variables, x, y, y_pred, sample_weight):
    """``ℓ_i``: the compiled loss of each example alone (a batch of one), as the vectorized path computes it."""

    def one(xi, yi, pi, wi):
        xi, yi, pi, wi = jax.tree_util.tree_map(lambda a: a[None], (xi, yi, pi, wi))
        loss, _ = model.stateless_compute_loss(
            trainable, non_trainable, metrics_variables, x=xi, y=yi, y_pred=pi, sample_weight=wi, training=True)
        return scalar_loss(loss)

    return jax.vmap(one)(x, y, y_pred, sample_weight)


def clipped_grad_sum(model, trainable, non_trainable, metrics_variables, optimizer_variables,
                     x, y, sample_weight, l2_norm_clip, data_axis=None):
    """``Σ_i clip_C(∇ℓ_i)`` by ghost clipping (or the vectorized path if a layer has no rule).

    Args:
      model: a built, compiled Keras model.
      trainable, non_trainable, metrics_variables, optimizer_variables: the
        state lists of Keras's JAX trainer.
      x, y, sample_weight: one chunk of examples (leading axis = example);
        ``sample_weight`` is a (B,) array (ones if unweighted).
      l2_norm_clip: C.
      data_axis: inside the step's per-device ``shard_map``, its mesh axis:
        the probes are then marked device-varying, so that their cotangents
        are each device's own ``∂ℓ_i/∂z_i`` (constants are device-invariant,
        and ``vjp`` w.r.t. an invariant value sums the cotangents over the
        devices).

    Returns:
      ``(grad_sum, norms, losses, y_pred, non_trainable)``: the clipped sum
      (aligned with ``trainable``), the (B,) per-example gradient norms before
      clipping, the (B,) per-example losses ``ℓ_i``, the batched predictions,
      and the updated non-trainable variables.
    """
    watch = ghost_plan(model)
    reason = watch.reason
    if reason is None:
        shapes, reason = _trace(model, watch, trainable, non_trainable, x)
    if reason is not None:
        log_fallback(model, reason)
        return vectorized.clipped_sum(model, trainable, non_trainable, metrics_variables, optimizer_variables,
                                      x, y, sample_weight, l2_norm_clip)

    probes = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    if data_axis is not None:
        probes = jax.lax.pcast(probes, data_axis, to="varying")
    watched = []

    def losses_fn(probes):
        watched.clear()
        y_pred, new_nt, _, calls = _forward(model, watch, trainable, non_trainable, x,
                                            lambda k, z: z + probes[k])
        arguments = []
        for call in calls:
            leaves, treedef = jax.tree_util.tree_flatten((call.args, call.kwargs))
            is_array = [isinstance(leaf, jax.Array) for leaf in leaves]
            watched.append((call.layer, call.rule, treedef, is_array,
                            [None if a else leaf for a, leaf in zip(is_array, leaves)]))
            arguments.append([leaf for a, leaf in zip(is_array, leaves) if a])
        losses = per_example_losses(model, trainable, new_nt, metrics_variables, x, y, y_pred, sample_weight)
        return losses, (y_pred, new_nt, arguments)

    # Pass 1 only: the trainable values are constants here, so no weight gradient is built.
    losses, vjp_fn, (y_pred, new_nt, arguments) = jax.vjp(losses_fn, probes, has_aux=True)
    (output_grads,) = vjp_fn(jnp.ones_like(losses))
    calls = [_rebuild_call(entry, array_leaves) for entry, array_leaves in zip(watched, arguments)]
    mapping = list(zip(model.trainable_variables, trainable)) + list(zip(model.non_trainable_variables, new_nt))
    values = {id(v): value for v, value in mapping}

    def layer_vjp(call, variables, cotangent):
        def pre_activation(own_values):
            with keras.StatelessScope(state_mapping=mapping + list(zip(variables, own_values))):
                return pre_activation_output(call)

        z, pullback = jax.vjp(pre_activation, [values[id(v)] for v in variables])
        return pullback(cotangent.astype(z.dtype))[0]

    with keras.StatelessScope(state_mapping=mapping):  # the rules read layer weights (GroupNorm, WS conv)
        grad_sum, norms = norms_and_clipped_sum(model, calls, output_grads, l2_norm_clip,
                                                            layer_vjp, losses)
    return grad_sum, norms, losses, y_pred, new_nt


def _rebuild_call(entry, array_leaves):
    """A ``LayerCall`` with the traced arrays that came out of ``jax.vjp`` put back in its arguments."""
    layer, rule, treedef, is_array, static = entry
    arrays = iter(array_leaves)
    leaves = [next(arrays) if a else leaf for a, leaf in zip(is_array, static)]
    args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
    return LayerCall(layer, rule, call_inputs(layer, args, kwargs), None, tuple(args),
                                 dict(kwargs))


def clipped_chunk(model, plan, trainable, non_trainable, metrics_variables, optimizer_variables, xc, yc, swc):
    """``(Σ_i clip_C(∇ℓ_i), loss sum, ŷ, norms, example mask, non_trainable)`` for one chunk (the step's interface)."""
    grad_sum, norms, losses, y_pred, new_nt = clipped_grad_sum(
        model, trainable, non_trainable, metrics_variables, optimizer_variables, xc, yc, swc,
        model.optimizer.l2_norm_clip, plan.data_axis)
    return grad_sum, jnp.sum(losses), y_pred, norms, (swc != 0).astype(trainable[0].dtype), new_nt


def clipped_grad_sum_of(model, x, y, l2_norm_clip, sample_weight=None):
    """Tool/test entry point: ``(clipped grad sum, per-example norms)`` at the model's current weights (jitted)."""
    x, y, sample_weight = as_arrays(x, y, sample_weight)
    optimizer_variables = values(model.optimizer.variables) if model.optimizer else None

    @jax.jit
    def run(trainable, non_trainable, metrics_variables, optimizer_variables, x, y, weights):
        grad_sum, norms, _, _, _ = clipped_grad_sum(model, trainable, non_trainable, metrics_variables,
                                                    optimizer_variables, x, y, weights, l2_norm_clip)
        return grad_sum, norms

    return run(values(model.trainable_variables), values(model.non_trainable_variables),
               values(model.metrics_variables), optimizer_variables, x, y, sample_weight)
