"""Per-example clipping math: norms, clip factors, clipped sums, sensitivity.

Pure tensor math in backend-neutral ``keras.ops``. Nothing here knows about
models, optimizers, sampling or accounting: the train step (one per backend
in ``tan_keras.per_example``) is the only place where they meet.

DP-SGD (TAN Eq. 2, Abadi et al. 2016) replaces the mean gradient by

    g = (1/B) (Σ_i clip_C(∇ℓ_i) + N(0, σ²C² I)),   clip_C(v) = v · min(1, C/‖v‖₂),

so the sum ``Σ_i clip_C(∇ℓ_i)`` has L2 sensitivity C under add/remove-one.
"""

import math

from keras import ops


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
    """Factors ``min(1, C/‖g_i‖)`` written as ``C / max(‖g_i‖, C)``.

    The second form never divides by zero and gives a clipped norm that is
    ``≤ C`` in floating point. ``C = inf`` means no clipping (factor 1).
    """
    if math.isinf(l2_norm_clip):
        return ops.ones_like(norms)
    clip = ops.cast(l2_norm_clip, norms.dtype)
    return clip / ops.maximum(norms, clip)


def weighted_sum(per_unit_grads, weights):
    """``Σ_i w_i · g_i`` for each parameter: the clipped sum when w = clip factors."""
    return [ops.tensordot(ops.cast(weights, g.dtype), g, axes=1) for g in per_unit_grads]


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
