"""JAX helpers shared by the step and both strategies: the loss of Keras's JAX trainer, pytree shapes."""

import jax
import jax.numpy as jnp


def leading_dim(x):
    return jax.tree_util.tree_leaves(x)[0].shape[0]


def scalar_loss(loss):
    """A ``reduction="none"`` loss (TF Privacy's convention) as its mean, which is Keras's default reduction."""
    return jnp.mean(loss) if jnp.ndim(loss) else loss


def call_kwargs(model):
    return {"training": True} if model._call_has_training_arg else {}


def loss_fn(model, metrics_variables, optimizer_variables):
    """``(trainable, non_trainable, x, y, w) -> (scalar loss, (ŷ, non_trainable))`` of the compiled loss."""

    def fn(trainable, non_trainable, x, y, sample_weight):
        loss, (_, y_pred, non_trainable, _) = model.compute_loss_and_updates(
            trainable, non_trainable, metrics_variables, x, y, sample_weight,
            training=True, optimizer_variables=optimizer_variables,
        )
        return scalar_loss(loss), (y_pred, non_trainable)

    return fn


def values(variables):
    return [v.value for v in variables]


def as_arrays(x, y, sample_weight):
    """Tool entry points: arrays, with unit sample weights if none are given."""
    x, y = jax.tree_util.tree_map(jnp.asarray, (x, y))
    weights = jnp.ones((leading_dim(x),)) if sample_weight is None else jnp.asarray(sample_weight)
    return x, y, weights


def einsum_f32(equation, a, b):
    """einsum accumulated in at least float32: low-precision operands multiplied exactly (float64 stays float64)."""
    accumulate = jnp.promote_types(jnp.float32, jnp.result_type(a, b))
    return jnp.einsum(equation, a, b, preferred_element_type=accumulate)
