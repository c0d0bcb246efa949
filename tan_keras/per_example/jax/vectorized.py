"""JAX vectorized strategy: ``jax.vmap(jax.grad(...))`` over ``compute_loss_and_updates``.

Gives the clipped sum of one chunk from materialized per-example (or
per-microbatch) gradients; any layer works. Also the unclipped sum of one
chunk, for Noisy-SGD.
"""

import jax
import jax.numpy as jnp

from tan_keras import clipping
from tan_keras.per_example.jax.common import loss_fn


def per_example_fn(loss, trainable, non_trainable):
    """``vmap`` over examples of ``(x_i, y_i, w_i) -> (∇ℓ_i, ℓ_i, ŷ_i, non_trainable)``, each a batch of one."""
    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def one(x, y, sample_weight):
        add_axis = lambda a: a[None]  # noqa: E731
        (value, (y_pred, new_nt)), grads = grad_fn(
            trainable, non_trainable, *jax.tree_util.tree_map(add_axis, (x, y, sample_weight))
        )
        return grads, value, jax.tree_util.tree_map(lambda a: a[0], y_pred), new_nt

    return jax.vmap(one)


def clipped_chunk(model, plan, trainable, non_trainable, metrics_variables, optimizer_variables, xc, yc, swc):
    """``(Σ_units clip_C(g_u), loss sum, ŷ, unit norms, unit mask, non_trainable)`` for one chunk.

    Units are examples, or TF Privacy's microbatches (means of
    ``plan.unit_size`` consecutive examples).
    """
    loss = loss_fn(model, metrics_variables, optimizer_variables)
    grads, losses, y_pred, new_nt = per_example_fn(loss, trainable, non_trainable)(xc, yc, swc)
    new_nt = jax.tree_util.tree_map(lambda a: a[0], new_nt)
    dtype = trainable[0].dtype
    if plan.unit_size > 1:
        grads = clipping.group_microbatches(grads, plan.chunk_size // plan.unit_size)
        unit_mask = jnp.ones((plan.chunk_size // plan.unit_size,), dtype)
    else:
        unit_mask = (swc != 0).astype(dtype)
    norms = clipping.global_norms(grads)
    factors = clipping.clip_factors(norms, model.optimizer.l2_norm_clip)
    return clipping.weighted_sum(grads, factors), jnp.sum(losses), y_pred, norms, unit_mask, new_nt


def summed_chunk(model, plan, trainable, non_trainable, metrics_variables, optimizer_variables, xc, yc, swc):
    """``(Σ_i ∇ℓ_i, loss sum, ŷ, non_trainable)`` for one chunk, unclipped (Noisy-SGD): one batched pass."""
    loss = loss_fn(model, metrics_variables, optimizer_variables)
    (mean_loss, (y_pred, new_nt)), grads = jax.value_and_grad(loss, has_aux=True)(
        trainable, non_trainable, xc, yc, swc)
    return [g * plan.chunk_size for g in grads], mean_loss * plan.chunk_size, y_pred, new_nt


def clipped_sum(model, trainable, non_trainable, metrics_variables, optimizer_variables, x, y, sample_weight,
                l2_norm_clip):
    """``(Σ_i clip_C(∇ℓ_i), norms, losses, ŷ, non_trainable)`` of per-example units (the ghost fallback)."""
    loss = loss_fn(model, metrics_variables, optimizer_variables)
    grads, losses, y_pred, new_nt = per_example_fn(loss, trainable, non_trainable)(x, y, sample_weight)
    new_nt = jax.tree_util.tree_map(lambda a: a[0], new_nt)
    norms = clipping.global_norms(grads)
    grad_sum = clipping.weighted_sum(grads, clipping.clip_factors(norms, l2_norm_clip))
    return grad_sum, norms, losses, y_pred, new_nt
