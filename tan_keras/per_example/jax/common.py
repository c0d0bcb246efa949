"""JAX helpers shared by the step and both strategies: the loss of Keras's JAX trainer, pytree shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tan_keras.per_example import rounding


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


@functools.lru_cache(maxsize=None)
def _probed_bits(platform, precision):
    with jax.ensure_compile_time_eval():  # run now, on the default device, even while a step is traced
        rows, identity = rounding.probe_operands()
        product = np.asarray(jnp.matmul(jnp.asarray(rows), jnp.asarray(identity)))
    return rounding.kept_bits(product)


def float32_matmul_bits():
    """Significand bits a default-precision float32 matmul keeps of its operands here (``rounding``): 24 on a
    CPU, 11 (TF32) on a recent NVIDIA GPU at JAX's default precision. Probed once per platform and precision."""
    return _probed_bits(jax.default_backend(), str(jax.config.jax_default_matmul_precision))


def round_significand(x, bits):
    """float32 ``x`` rounded to nearest (ties to even) at ``bits`` significant bits; non-finite values kept.

    On the bit pattern: add just under half of the dropped part (plus the
    kept part's last bit, for ties), clear the dropped bits. A carry moves
    into the exponent, as a rounding up to the next power of two does.
    """
    drop = rounding.FLOAT32_BITS - bits
    if drop <= 0:
        return x
    u = jax.lax.bitcast_convert_type(x, jnp.int32)
    u = (u + ((1 << (drop - 1)) - 1) + ((u >> drop) & 1)) & -(1 << drop)
    return jnp.where(jnp.isfinite(x), jax.lax.bitcast_convert_type(u, jnp.float32), x)
