"""Per-example clipping math: norms, clip factors, clipped sums, sensitivity.

Pure tensor math in backend-neutral ``keras.ops``. Nothing here knows about
models, optimizers, sampling or accounting: the train step (one per backend
in ``tan_keras.per_example``) is the only place where they meet. The one fact
about the device read here is whether its float32 matmuls round their
operands (``weighted_sum``).

DP-SGD (TAN Eq. 2, Abadi et al. 2016) replaces the mean gradient by

    g = (1/B) (Σ_i clip_C(∇ℓ_i) + N(0, σ²C² I)),   clip_C(v) = v · min(1, C/‖v‖₂),

so the sum ``Σ_i clip_C(∇ℓ_i)`` has L2 sensitivity C under add/remove-one.
"""

import math

import keras
from keras import ops

from tan_keras import per_example


def global_norms(per_unit_grads):
    """Per-unit global L2 norms ``‖(g_1[i], ..., g_P[i])‖₂`` over all parameters.

    Args:
      per_unit_grads: list of tensors, each of shape ``(U, *param_shape)``; the
        leading axis indexes the clipping units (examples or microbatches).

    Returns:
      A ``(U,)`` tensor of norms.
    """
    squares = [
        ops.sum(ops.reshape(ops.square(g), (ops.shape(g)[0], -1)), axis=1)
        for g in per_unit_grads
    ]
    return ops.sqrt(ops.sum(ops.stack(squares, axis=0), axis=0))


def clip_factors(norms, l2_norm_clip):
    """Factors ``min(1, C/‖g_i‖)`` written as ``C / max(‖g_i‖, C)``; 0 for a non-finite norm.

    The second form never divides by zero and gives a clipped norm that is
    ``≤ C`` in floating point. ``C = inf`` means no clipping (factor 1).
    A unit whose gradient holds a NaN or an infinity (a corrupt input, an
    overflowing loss) has a non-finite norm and gets factor 0: it contributes
    nothing, which keeps the sensitivity ≤ C (``weighted_sum`` zeroes its
    row, since ``0 · NaN = NaN``). The step counts such units in the
    ``nonfinite_examples`` metric (``unit_stats``).
    """
    finite = ops.isfinite(norms)
    if math.isinf(l2_norm_clip):
        return ops.cast(finite, norms.dtype)
    clip = ops.cast(l2_norm_clip, norms.dtype)
    return ops.where(finite, clip / ops.maximum(norms, clip), ops.zeros_like(norms))


def zero_rows(x, keep):
    """``x`` with the rows (leading axis) where ``keep`` is False set to 0 (not multiplied: NaN · 0 = NaN)."""
    mask = ops.reshape(keep, (-1,) + (1,) * (len(x.shape) - 1))
    return ops.where(mask, x, ops.zeros_like(x))


def all_finite(tensors):
    """True iff every entry of every tensor is finite (a scalar boolean tensor)."""
    return ops.all(ops.stack([ops.all(ops.isfinite(t)) for t in tensors]))


def weighted_sum(per_unit_grads, weights, drop=None):
    """``Σ_i w_i · g_i`` for each parameter: the clipped sum when w = clip factors.

    Rows with ``w_i = 0`` are left out entirely, so a non-finite gradient
    with factor 0 (``clip_factors``) adds exactly nothing (``0 · NaN`` would be
    NaN). The rows are zeroed only in a step that has such a unit
    (``ops.cond``, one per call: the vectorized strategy calls this once per
    chunk; the ghost strategy branches once per chunk around all its layers,
    ``ghost.bookkeeping``). ``drop=True`` / ``False`` takes that path without
    the branch (for a caller that has branched already).

    16-bit ``g_i`` (a fused kernel's per-example gradients of a bf16 layer)
    are summed in float32 with float32 weights: ``w_i`` is not rounded, and the
    sum is in float32, of the same 16-bit values the norms squared. So are
    float32 ``g_i`` where the device's float32 matmuls round their operands
    (TF32 on a GPU, ``per_example.float32_matmul_bits``): as a matmul, the sum
    would add ``tf32(w_i)·tf32(g_i)``, up to ``(1 + 2⁻¹¹)²·C`` for a clipped
    unit; elementwise products keep ``‖w_i g_i‖ ≤ C`` to float32 rounding.
    """
    keep = weights != 0
    rounding_matmuls = per_example.float32_matmul_bits() < 24

    def one(g, drop):
        g = zero_rows(g, keep) if drop else g
        dtype = keras.backend.standardize_dtype(g.dtype)
        if dtype in ("bfloat16", "float16") or (dtype == "float32" and rounding_matmuls):
            w = ops.reshape(ops.cast(weights, "float32"), (-1,) + (1,) * (len(g.shape) - 1))
            return ops.sum(w * ops.cast(g, "float32"), axis=0)
        return ops.tensordot(ops.cast(weights, g.dtype), g, axes=1)

    def summed(drop):
        return [one(g, drop) for g in per_unit_grads]

    if drop is not None:
        return summed(drop)
    return ops.cond(ops.all(keep), lambda: summed(False), lambda: summed(True))


def unit_stats(norms, unit_mask, l2_norm_clip):
    """``[clipped, Σ finite norms, units, non-finite units]`` over the real units (``unit_mask`` = 1).

    Summed over chunks by the step; ``clip_fraction = clipped / units`` and
    ``per_example_norm = Σ norms / (units − non-finite)``.
    """
    finite = ops.isfinite(norms)
    mask = ops.cast(unit_mask, norms.dtype)
    safe = ops.where(finite, norms, ops.zeros_like(norms))
    clipped = ops.cast(ops.logical_and(finite, norms > l2_norm_clip), norms.dtype)
    return ops.stack([ops.sum(mask * clipped), ops.sum(mask * safe), ops.sum(mask),
                      ops.sum(mask * (1.0 - ops.cast(finite, norms.dtype)))])


def group_microbatches(per_example_grads, num_microbatches):
    """Means of per-example gradients over ``num_microbatches`` contiguous groups.

    TF Privacy's ``num_microbatches`` semantics: the batch of n examples is cut
    into m groups of n/m consecutive examples; each group's *mean* gradient is
    one clipping unit. See ``microbatch_sensitivity`` for the privacy cost.
    """
    out = []
    for g in per_example_grads:
        shape = ops.shape(g)
        grouped = ops.reshape(g, (num_microbatches, shape[0] // num_microbatches) + tuple(shape[1:]))
        out.append(ops.mean(grouped, axis=1))
    return out


def microbatch_sensitivity(l2_norm_clip, num_microbatches, batch_size):
    """L2 sensitivity of the clipped sum under add/remove-one.

    One example per unit: C. With microbatches of more than one example, adding
    or removing an example changes the content of one microbatch, whose clipped
    mean can move from one point of the C-ball to another: sensitivity 2C
    (TF Privacy, ``compute_dp_sgd_privacy_lib``). The accountant must then be
    given σ/2 (``tan_keras.accounting.effective_noise_multiplier``).
    """
    if num_microbatches is None or num_microbatches >= batch_size:
        return l2_norm_clip
    return 2.0 * l2_norm_clip


def dp_metric_values(stats, signal_norm, noise_norm, finite_update):
    """The step's logged DP values from the summed ``unit_stats``, the optimizer's norms and the update check.

    ``(clip_fraction, per_example_norm, nonfinite_examples, signal_norm,
    noise_norm, nonfinite_updates)``, in the order of
    ``PrivateTrainerMixin._dp_metric_names``.
    """
    units = ops.maximum(stats[2], 1.0)
    finite_units = ops.maximum(stats[2] - stats[3], 1.0)
    return (stats[0] / units, stats[1] / finite_units, stats[3], signal_norm, noise_norm,
            1.0 - ops.cast(finite_update, stats.dtype))


NONFINITE_STEP_MESSAGE = (
    "The DP step produced non-finite weights or noise. This is not one bad example: an example whose "
    "gradient is NaN/inf contributes zero and is counted in the `nonfinite_examples` metric. Check the "
    "model's weights before training (a NaN in loaded weights), the learning rate (divergence), and "
    "`noise_multiplier` / `l2_norm_clip` (finite, C = inf only with σ = 0).")

