"""The DP events of DP-SGD steps: sampling methods, validated arguments, neighbouring relations.

The lowest layer of the accounting (``tan_keras.accounting`` computes ε and
calibrates from these events, ``tan_keras.ledger`` composes them over a run).
Plain Python + ``dp_accounting``: this module imports no Keras, TensorFlow or JAX.

One DP-SGD step releases a clipped gradient sum plus Gaussian noise of std
``σC`` (TAN Eq. 2). Its privacy depends on how the batch was drawn; each
supported ``sampling`` maps to one ``dp_accounting`` event:

``"poisson"`` (what the paper and Opacus use; TAN §2)
    Each example joins each step's batch independently with probability
    ``q`` (expected batch ``B = qN``). Event: ``S × PoissonSampledDpEvent(q,
    GaussianDpEvent(σ))`` under add/remove-one neighbouring.

``"sampled_without_replacement"``
    Every step draws a fixed-size batch of ``B`` examples uniformly without
    replacement from the ``N``. Event: ``S × SampledWithoutReplacementDpEvent(
    N, B, GaussianDpEvent(σ))`` under *replace-one* neighbouring (the only
    relation this event is analysed for). Only the RDP accountant supports it.

``"shuffle"`` -- ⚠ NO AMPLIFICATION ⚠
    Shuffle once per epoch and walk through fixed batches (the usual
    ``tf.data`` / ``DataLoader(shuffle=True)`` pipeline). **No privacy
    amplification by sampling is known for this scheme** (see
    tensorflow/privacy#483), so it is accounted conservatively: each example
    is used once per epoch, and each epoch is charged as one *un-amplified*
    ``GaussianDpEvent(σ)``, for ``ceil(S / ceil(N/B))`` epochs (an epoch is
    ``ceil(N/B)`` steps, the last batch shorter; a started epoch counts in
    full; :func:`shuffle_epochs`), under add/remove-one. The resulting ε is typically one to two
    orders of magnitude larger than the Poisson ε for the same (B, σ, S):
    if you want the paper's ε, use a Poisson sampler.

Every public entry point of the accounting validates its arguments with the
``_check_*`` helpers below, so a bad value fails where it is given, with a
message that names it.
"""

import contextlib
import logging
import math
import numbers

import dp_accounting
from dp_accounting import pld as _pld
from dp_accounting import rdp as _rdp

__all__ = [
    "SAMPLING_METHODS",
    "ACCOUNTANTS",
    "DEFAULT_PLD_DISCRETIZATION",
    "make_dp_event",
    "neighboring_relation",
    "shuffle_epochs",
    "quiet_rdp_convergence_warnings",
]

SAMPLING_METHODS = ("poisson", "sampled_without_replacement", "shuffle")
ACCOUNTANTS = ("rdp", "pld")
DEFAULT_PLD_DISCRETIZATION = 1e-4

_Relation = dp_accounting.NeighboringRelation


# ---------------------------------------------------------------------------
# Input validation: every public entry point funnels through these.
# ---------------------------------------------------------------------------


def _check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN.")
    return value


def _check_int(name, value, minimum=1, fix=""):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer, got {value!r}.{fix}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.{fix}")
    return value


def _check_noise_multiplier(noise_multiplier):
    sigma = _check_real("noise_multiplier", noise_multiplier)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(
            f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}. "
            "σ = 0 is not differentially private; pass the noise std divided by the "
            "clipping norm C (DP-SGD adds N(0, σ²C²) to the clipped sum)."
        )
    return sigma


def _check_sampling_rate(sampling_rate):
    q = _check_real("sampling_rate", sampling_rate)
    if not 0 < q <= 1:
        raise ValueError(
            f"sampling_rate must be in (0, 1], got {sampling_rate!r}. It is the "
            "probability q that an example is in a batch (q = B/N for Poisson "
            "sampling with expected batch size B out of N examples)."
        )
    return q


def _check_delta(delta, name="delta"):
    d = _check_real(name, delta)
    if not 0 < d < 1:
        raise ValueError(
            f"{name} must be in (0, 1), got {delta!r}. The paper uses δ ≈ 1/N "
            "(e.g. 1e-5 for CIFAR-10, 8e-7 for ImageNet)."
        )
    return d


def _check_epsilon(epsilon, name="epsilon"):
    e = _check_real(name, epsilon)
    if not (e > 0 and math.isfinite(e)):
        raise ValueError(f"{name} must be a finite number > 0, got {epsilon!r}.")
    return e


def _check_steps(steps, name="steps"):
    return _check_int(
        name, steps, 1, " Pass the number of noisy gradient steps S (at least 1)."
    )


def _check_sampling(sampling):
    if sampling not in SAMPLING_METHODS:
        raise ValueError(f"sampling must be one of {SAMPLING_METHODS}, got {sampling!r}.")
    return sampling


def _check_accountant(accountant):
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"accountant must be one of {ACCOUNTANTS}, got {accountant!r} "
            "('rdp': Rényi DP as in the paper; 'pld': tighter privacy loss distributions)."
        )
    return accountant


def _check_pld_discretization(value):
    v = _check_real("pld_discretization", value)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(
            f"pld_discretization must be > 0, got {value!r} (dp_accounting's default is 1e-4)."
        )
    return v


def _resolve_sampling(sampling_rate, batch_size, num_examples, sampling):
    """Validates the sampling arguments; returns ``(q, B or None, N or None)``."""
    sampling = _check_sampling(sampling)
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)
    if num_examples is not None:
        num_examples = _check_int("num_examples", num_examples, 1)
    if (batch_size is None) != (num_examples is None):
        missing = "num_examples" if num_examples is None else "batch_size"
        raise ValueError(
            f"{missing} is missing: batch_size and num_examples must be given "
            f"together (q = batch_size/num_examples), got batch_size={batch_size!r}, "
            f"num_examples={num_examples!r}."
        )
    if batch_size is not None and batch_size > num_examples:
        raise ValueError(
            f"batch_size={batch_size} is larger than num_examples={num_examples}; "
            "a batch cannot hold more examples than the dataset (lower batch_size)."
        )
    if sampling_rate is None and batch_size is None:
        raise ValueError(
            "sampling_rate is missing: pass sampling_rate=q, or batch_size and "
            "num_examples (then q = batch_size/num_examples)."
        )
    q = None if sampling_rate is None else _check_sampling_rate(sampling_rate)
    if batch_size is not None:
        q_bn = batch_size / num_examples
        if q is not None and not math.isclose(q, q_bn, rel_tol=1e-9, abs_tol=0.0):
            raise ValueError(
                f"sampling_rate={q!r} conflicts with batch_size/num_examples = "
                f"{batch_size}/{num_examples} = {q_bn!r}. Pass only sampling_rate "
                "(the sampler's actual q, e.g. sampling_rate_from_loader(...)) or only "
                "batch_size and num_examples."
            )
        q = q_bn
    if sampling == "sampled_without_replacement" and batch_size is None:
        raise ValueError(
            "sampling='sampled_without_replacement' needs batch_size and num_examples "
            f"(fixed batches of B out of N), got only sampling_rate={sampling_rate!r}."
        )
    return q, batch_size, num_examples


def shuffle_epochs(steps, sampling_rate=None, *, batch_size=None, num_examples=None):
    """Epochs charged by ``sampling="shuffle"``: ``ceil(S / ceil(N/B))``.

    A shuffled walk through fixed batches of B takes ``P = ceil(N/B)`` steps
    per epoch, the last batch shorter when B does not divide N (Keras's
    ``fit(x, y, batch_size=B)`` and ``PoissonSampler(sampling="shuffle")``
    both keep it). Each example is in exactly one batch of an epoch, so S steps
    touch ``ceil(S/P)`` epochs (a started epoch counts in full). For example
    one epoch of N = 4,000 at B = 256 is 16 steps, charged as one epoch (not
    ``ceil(16·256/4000) = 2``).

    Exact integer arithmetic when ``batch_size`` and ``num_examples`` are
    given; with only ``sampling_rate`` q, ``P = ceil(1/q)`` with a 1e-9 slack
    against float error (exact for ``q = B/N`` and for the loader's
    ``q = 1/ceil(N/B)``).

    .. warning:: A pipeline that drops the last partial batch
       (``drop_remainder=True``) walks ``floor(N/B)`` steps per epoch: account
       it with ``num_examples = B·floor(N/B)``, or ε is undercounted.
    """
    steps = _check_steps(steps)
    q, b, n = _resolve_sampling(sampling_rate, batch_size, num_examples, "shuffle")
    steps_per_epoch = -(-n // b) if b is not None else max(1, math.ceil(1.0 / q - 1e-9))
    return -(-steps // steps_per_epoch)


def neighboring_relation(sampling):
    """The neighbouring relation under which ``sampling`` is accounted.

    ``REPLACE_ONE`` for ``"sampled_without_replacement"``, ``ADD_OR_REMOVE_ONE``
    otherwise.
    """
    if _check_sampling(sampling) == "sampled_without_replacement":
        return _Relation.REPLACE_ONE
    return _Relation.ADD_OR_REMOVE_ONE


def make_dp_event(
    noise_multiplier,
    steps,
    *,
    sampling_rate=None,
    batch_size=None,
    num_examples=None,
    sampling="poisson",
):
    """The ``dp_accounting`` event of ``steps`` DP-SGD steps (see module doc)."""
    sigma = _check_noise_multiplier(noise_multiplier)
    steps = _check_steps(steps)
    q, b, n = _resolve_sampling(sampling_rate, batch_size, num_examples, sampling)
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    if sampling == "poisson":
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, gaussian), steps
        )
    if sampling == "sampled_without_replacement":
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(n, b, gaussian), steps
        )
    epochs = shuffle_epochs(steps, q if b is None else None, batch_size=b, num_examples=n)
    return dp_accounting.SelfComposedDpEvent(gaussian, epochs)


def _make_accountant(accountant, relation, pld_discretization):
    if accountant == "rdp":
        return _rdp.RdpAccountant(neighboring_relation=relation)
    return _pld.PLDAccountant(
        neighboring_relation=relation,
        value_discretization_interval=_check_pld_discretization(pld_discretization),
    )


def _composed_accountant(event, relation, accountant, pld_discretization, what):
    acc = _make_accountant(_check_accountant(accountant), relation, pld_discretization)
    if not acc.supports(event):
        raise ValueError(
            f"accountant={accountant!r} cannot account for {what} (dp_accounting has "
            f"no {accountant.upper()} analysis of this event under {relation.name} "
            "neighbouring). Use accountant='rdp', or Poisson sampling."
        )
    return acc.compose(event)


_NON_CONVERGENCE = "_compute_log_a_frac failed to converge"


class _DropNonConvergence(logging.Filter):
    def filter(self, record):
        return not str(record.msg).startswith(_NON_CONVERGENCE)


@contextlib.contextmanager
def quiet_rdp_convergence_warnings():
    """Within the block (or decorated call), drops dp_accounting's ``_compute_log_a_frac failed to converge``.

    At a fractional order α, the RDP of the Poisson-subsampled Gaussian is a
    series (Mironov et al. 2019, "Rényi DP of the Sampled Gaussian Mechanism",
    §3.3). At small σ it does not converge within dp_accounting's 1000 terms;
    dp_accounting then logs this warning and sets that order's RDP to +∞, which
    drops the order from ``ε = min_α (...)``. Every order gives a valid bound, so
    ε stays an upper bound (at worst a little looser, from the remaining
    orders): the warning is harmless. Calibration probes small σ while it
    brackets the root and would print one warning per fractional order and probe
    (60 for ``target_epsilon=50`` on CIFAR-10). Other warnings pass; the filter
    on the ``absl`` logger is removed on exit.
    """
    logger = logging.getLogger("absl")
    drop = _DropNonConvergence()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
