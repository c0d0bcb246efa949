"""``check_per_example``: does the train step clip what a one-example loop would clip?

DP-SGD's guarantee rests on one fact: the step adds ``Σ_i clip_C(∇ℓ_i)``
with ``‖clip_C(∇ℓ_i)‖ ≤ C``, where ``∇ℓ_i`` is example i's gradient *alone*.
Three things can break it without any error:

* a wrong kernel: TensorFlow's oneDNN ``BatchMatMulV2`` returned wrong
  per-example gradients under ``tf.vectorized_map`` (examples 3 and up,
  AVX-512 CPUs; ``docs/tf_onednn_batch_matmul.md``);
* a layer that mixes examples in the batched forward pass (BatchNorm is
  refused, but a weightless ``t - mean(t, axis=0)`` is not seen by any layer
  check), which the ghost (batched) strategy cannot notice;
* a ghost-norm rule that is wrong for a custom layer.

``check_per_example(model, x, y)`` runs the strategy the model's train step
uses (ghost/book-keeping or vectorized, compiled as in the step) on a small
batch, and compares its per-example norms ``‖∇ℓ_i‖`` and its clipped sum
with a reference computed one example at a time, each example in a batch of
one with the backend's own autodiff (``tf.GradientTape`` / ``jax.grad``, no
``vectorized_map``/``vmap``, no ghost norms). It raises
``PerExampleCheckError`` naming the worst example and the worst layer.
Run it once on a new architecture, on a few real examples, before a private
run.

.. warning:: Stochastic layers (Dropout) draw different masks in the loop
   and in the step; build the model with rate 0 (or without them) for the
   check. Microbatches are not checked: the check clips examples.
"""

import dataclasses

import numpy as np

from tan_keras import per_example


class PerExampleCheckError(ValueError):
    """The train step's per-example norms or clipped sum differ from the one-example loop's."""


@dataclasses.dataclass(frozen=True)
class PerExampleReport:
    """What ``check_per_example`` measured (returned when it passes).

    Attributes:
      strategy: ``"ghost"`` or ``"vectorized"``: what the train step uses.
      l2_norm_clip: the C used for the clipped sum.
      norms: the loop's per-example gradient norms.
      max_norm_error: ``max_i |‖g_i‖_step − ‖g_i‖_loop| / max(‖g_i‖_loop, atol)``.
      max_sum_error: ``max |Σ_step − Σ_loop|`` over the entries of the worst
        variable, relative to the largest entry of the loop's clipped sum.
    """

    strategy: str
    l2_norm_clip: float
    norms: np.ndarray
    max_norm_error: float
    max_sum_error: float


def _layer_of(model, variable):
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if any(v is variable for v in layer._trainable_variables):
            return layer.name
    return getattr(variable, "path", variable.name).split("/")[0]


def check_per_example(model, x, y=None, sample_weight=None, *, l2_norm_clip=None, rtol=1e-3, atol=1e-5):
    """Checks the train step's per-example clipping against a one-example-at-a-time loop.

    Args:
      model: a compiled ``tan_keras.PrivateModel`` / ``make_private`` model
        (or any compiled Keras model: it is then checked on the vectorized
        path). Its weights are read, never changed.
      x, y, sample_weight: a small batch (4 to 32 real examples is plenty;
        the loop runs one example at a time).
      l2_norm_clip: C for the clipped sum. Default: the model's DP optimizer's
        ``l2_norm_clip`` if finite, else the median loop norm (so that some
        examples are clipped and some are not).
      rtol, atol: the tolerance, relative to each norm (and to the clipped
        sum's largest entry per variable); ``atol`` bounds tiny norms.

    Returns:
      A ``PerExampleReport``.

    Raises:
      PerExampleCheckError: with the worst example (its step and loop norms)
        and the worst layer of the clipped sum.
    """
    variables = model.trainable_variables
    if not variables:
        raise ValueError("check_per_example needs a model with trainable weights (build it first).")
    if not getattr(model, "compiled", False):
        raise ValueError("check_per_example needs a compiled model: call model.compile(optimizer=..., loss=...).")
    loop = per_example.loop_per_example_gradients(model, x, y, sample_weight)
    loop_norms = np.array([np.sqrt(sum(float(np.sum(np.square(g.astype(np.float64)))) for g in grads))
                           for grads in loop])
    if l2_norm_clip is None:
        c = getattr(getattr(model, "optimizer", None), "l2_norm_clip", None)
        l2_norm_clip = c if c is not None and np.isfinite(c) else float(np.median(loop_norms)) or 1.0
    factors = np.minimum(1.0, l2_norm_clip / np.maximum(loop_norms, 1e-30))
    loop_sum = [sum(f * grads[j].astype(np.float64) for f, grads in zip(factors, loop))
                for j in range(len(variables))]

    step_sum, step_norms = per_example.clipped_sum_and_norms(model, x, y, l2_norm_clip, sample_weight)
    step_norms = np.asarray(step_norms, np.float64)
    step_sum = [np.asarray(g, np.float64) for g in step_sum]
    from tan_keras.ghost import ghost_plan

    ghost = getattr(model, "uses_ghost_clipping", False) and ghost_plan(model).reason is None
    strategy = "ghost" if ghost else "vectorized"

    norm_errors = np.abs(step_norms - loop_norms) / np.maximum(loop_norms, atol)
    norm_errors = np.where(np.isfinite(norm_errors), norm_errors, np.inf)
    # Relative to the largest entry of the whole clipped sum: a variable whose
    # gradient cancels to ~0 (a conv bias before GroupNorm) has no scale of its own.
    scale = max(max((float(np.max(np.abs(w))) for w in loop_sum if w.size), default=0.0), atol)
    sum_errors = [float(np.max(np.abs(got - want))) / scale if want.size else 0.0
                  for got, want in zip(step_sum, loop_sum)]
    sum_errors = [e if np.isfinite(e) else np.inf for e in sum_errors]
    worst_example = int(np.argmax(norm_errors))
    worst_variable = int(np.argmax(sum_errors))
    if norm_errors[worst_example] > rtol or sum_errors[worst_variable] > rtol:
        variable = variables[worst_variable]
        raise PerExampleCheckError(
            f"The {strategy} train step of model '{model.name}' does not clip what a one-example-at-a-time "
            f"loop clips, so its DP bound does not hold. Worst example: #{worst_example}, gradient norm "
            f"{step_norms[worst_example]:.6g} in the step vs {loop_norms[worst_example]:.6g} alone (relative "
            f"error {norm_errors[worst_example]:.3g}). Worst layer of the clipped sum (C={l2_norm_clip:.4g}): "
            f"'{_layer_of(model, variable)}' (variable '{variable.path}', relative error "
            f"{sum_errors[worst_variable]:.3g}). Causes: a layer that mixes the examples of a batch "
            "(normalization or statistics over the batch axis), a wrong ghost-norm rule for a custom layer "
            "(try clipping='vectorized'), stochastic layers (set their rate to 0 for the check), or a "
            "backend kernel bug (report it with this message).")
    return PerExampleReport(strategy, float(l2_norm_clip), loop_norms, float(np.max(norm_errors)),
                            float(max(sum_errors)))
