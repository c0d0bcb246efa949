"""JAX reference per-example gradients: one example at a time, no ``vmap`` (``check_per_example``)."""

import jax
import jax.numpy as jnp
import numpy as np

from tan_keras.per_example.jax.common import call_kwargs, leading_dim, scalar_loss, values


def loop_per_example_gradients(model, x, y=None, sample_weight=None):
    """``∇ℓ_i`` one example at a time, by ``jax.grad`` of a batch-of-one loss (lists of numpy arrays)."""
    x, y = jax.tree_util.tree_map(jnp.asarray, (x, y))
    non_trainable = values(model.non_trainable_variables)
    metrics_variables = values(model.metrics_variables)
    kwargs = call_kwargs(model)

    @jax.jit
    def grad_one(trainable, xi, yi, wi):
        def loss(trainable):
            y_pred, _ = model.stateless_call(trainable, non_trainable, xi, **kwargs)
            value, _ = model.stateless_compute_loss(trainable, non_trainable, metrics_variables, x=xi, y=yi,
                                                    y_pred=y_pred, sample_weight=wi, training=True)
            return scalar_loss(value)

        return jax.grad(loss)(trainable)

    trainable = values(model.trainable_variables)
    out = []
    for i in range(leading_dim(x)):
        xi, yi = jax.tree_util.tree_map(lambda a: a[i:i + 1], (x, y))
        wi = None if sample_weight is None else jnp.asarray(sample_weight)[i:i + 1]
        out.append([np.asarray(g) for g in grad_one(trainable, xi, yi, wi)])
    return out
