"""Backend-neutral layout of one private step: units, chunks, normaliser, and the choice of strategy."""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """How a batch of ``batch_size`` examples is processed in one private step.

    Attributes:
      batch_size: examples in the batch fed to ``train_step`` (static).
      per_example: whether per-unit gradients are clipped (DP-SGD) or not (Noisy-SGD).
      num_units: clipping units: examples, or microbatches.
      unit_size: examples per unit (1 without microbatches).
      chunk_size: examples per physical chunk (a multiple of ``unit_size``).
      num_chunks: chunks per step; the batch is zero-weight padded to
        ``num_chunks * chunk_size`` examples.
      normalizer: B in ``(Σ clip + noise) / B``: the optimizer's
        ``expected_batch_size`` (per unit) if set, else ``num_units``. Always
        the *global* B: a per-device plan (``shard_plan``) keeps it.
      data_axis: the mesh axis the batch is split over when the step
        accumulates per device (JAX ``shard_map`` under a Keras
        distribution), else None. Strategies use it to mark the constants
        they differentiate against as device-varying.
    """

    batch_size: int
    per_example: bool
    num_units: int
    unit_size: int
    chunk_size: int
    num_chunks: int
    normalizer: float
    data_axis: str = None

    @property
    def padded_size(self):
        return self.num_chunks * self.chunk_size


def make_plan(batch_size, optimizer, physical_batch_size):
    n = int(batch_size)
    m = getattr(optimizer, "num_microbatches", None)
    per_example = bool(optimizer.requires_per_example)
    if m is None or not per_example:
        m, k = n, 1
    else:
        if n % m:
            raise ValueError(
                f"num_microbatches={m} does not divide the batch size {n}. Use a batch size that is a "
                f"multiple of {m} (and `drop_remainder=True` in tf.data, or a dataset size that "
                "batches evenly), or set num_microbatches=None to clip every example."
            )
        k = n // m
    p = physical_batch_size or n
    p = min(p, n)
    if k > 1:
        if p % k or n % p:
            raise ValueError(
                f"physical_batch_size={physical_batch_size} must divide the batch size {n} and be a "
                f"multiple of the microbatch size {k} (= batch size / num_microbatches)."
            )
    num_chunks = math.ceil(n / p)
    expected = getattr(optimizer, "expected_batch_size", None)
    normalizer = float(expected) / k if expected is not None else float(m)
    return StepPlan(n, per_example, m, k, p, num_chunks, normalizer)


def shard_plan(plan, num_shards, physical_batch_size, data_axis):
    """The plan of one of ``num_shards`` devices that each hold ``batch_size / num_shards`` rows of ``plan``.

    Each device clips its own rows in chunks of ``physical_batch_size`` (a
    per-device memory bound); the clipped sums are then summed across the
    devices, so the normaliser stays the global B. Microbatches (units of
    ``unit_size`` consecutive examples) must not straddle two devices.
    """
    n = plan.batch_size
    if n % num_shards:
        raise ValueError(
            f"The batch of {n} examples does not split evenly over the {num_shards} data-parallel devices. "
            f"Feed batches whose size is a multiple of {num_shards} (tan_keras.sampling pads Poisson draws to "
            f"multiples of physical_batch_size·num_shards: choose physical_batch_size so that this is a "
            f"multiple of {num_shards}).")
    local = n // num_shards
    k = plan.unit_size
    if plan.num_units % num_shards or local % k:
        raise ValueError(
            f"num_microbatches={plan.num_units} does not split over the {num_shards} data-parallel devices "
            f"(each device holds {local} examples, microbatches of {k}): use a num_microbatches that is a "
            f"multiple of {num_shards}, or num_microbatches=None.")
    p = min(physical_batch_size or local, local)
    if k > 1 and (p % k or local % p):
        raise ValueError(
            f"physical_batch_size={physical_batch_size} must divide the per-device batch size {local} and be "
            f"a multiple of the microbatch size {k}.")
    return StepPlan(local, plan.per_example, plan.num_units // num_shards, k, p, math.ceil(local / p),
                    plan.normalizer, data_axis)


def strategy(model):
    """Which strategy gives the clipped sum of a chunk: ``"ghost"`` or ``"vectorized"``.

    Ghost (book-keeping) when the model asks for it (``clipping="auto"`` or
    ``"ghost"``: ``PrivateTrainerMixin.uses_ghost_clipping``; an AugMult
    wrapper's norms group each example's K views) and its units are examples;
    TF Privacy's microbatches (means of several examples) are clipped on the
    vectorized path. A model whose layers lack a
    ghost-norm rule, or whose traced forward pass breaks book-keeping (shared
    layers, tied weights, ``add_loss``), still asks for ghost here: the ghost
    strategy falls back to the vectorized clipped sum itself, with the reason
    logged once (``tan_keras.ghost.registry.log_fallback``).
    """
    if not getattr(model, "uses_ghost_clipping", False):
        return "vectorized"
    optimizer = getattr(model, "optimizer", None)
    if getattr(optimizer, "num_microbatches", None) is not None:
        return "vectorized"
    return "ghost"
