"""Privacy accounting for DP-SGD: ε(q, σ, S, δ), calibration and a ledger.

A thin, validated wrapper around Google's ``dp_accounting`` (0.6.0). Plain
Python + numpy: this module imports no Keras, TensorFlow or JAX.

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
    ``GaussianDpEvent(σ)``, for ``ceil(S·B/N)`` epochs (a started epoch counts
    in full), under add/remove-one. The resulting ε is typically one to two
    orders of magnitude larger than the Poisson ε for the same (B, σ, S):
    if you want the paper's ε, use a Poisson sampler.

Accountants (``accountant=``):

``"rdp"``
    ``dp_accounting.rdp.RdpAccountant`` with its default orders
    (1.1, 1.2, ..., 10.9, 11, ..., 63, 128, 256, 512, 1024). Its RDP→(ε, δ)
    conversion (``rdp_privacy_accountant.compute_epsilon``) is
    ``ε = min_α  rdp(α) + log((α−1)/α) − (log δ + log α)/(α−1)``,
    i.e. Balle et al. 2020 ("Hypothesis testing interpretations and Rényi DP",
    Thm 21; also Canonne et al. 2020 Prop. 12) -- the same conversion as
    ``opacus.accountants.RDPAccountant`` (v1.1.2) that the TAN paper used for
    every reported ε (TAN §2). It is slightly below TAN Eq. 3's
    ``min_α S·g_α + log(1/δ)/(α−1)``. The orders are a superset of Opacus'
    ``DEFAULT_ALPHAS``; for the paper's configs the optimal order (≈4) is in
    both, so the numbers coincide.
``"pld"``
    ``dp_accounting.pld.PLDAccountant`` (privacy loss distributions): a
    numerically tight accountant, typically 5–10% below RDP at the paper's
    settings. ``pld_discretization`` trades accuracy (it is a pessimistic
    upper bound whatever the value) for speed.

Sampling rate: the API always takes the sampler's *actual* ``q``. Pass
``sampling_rate`` directly, or ``batch_size`` and ``num_examples`` to mean
``q = B/N`` (the paper's definition, TAN §2). See
:func:`sampling_rate_from_loader` for the Opacus loader's different ``q``.
"""

import dataclasses
import json
import math
import numbers

import dp_accounting
from dp_accounting import pld as _pld
from dp_accounting import rdp as _rdp

__all__ = [
    "SAMPLING_METHODS",
    "ACCOUNTANTS",
    "DEFAULT_PLD_DISCRETIZATION",
    "epsilon",
    "delta_for_epsilon",
    "calibrate_noise_multiplier",
    "calibrate_steps",
    "calibrate_batch_size",
    "sampling_rate_from_loader",
    "effective_noise_multiplier",
    "make_dp_event",
    "neighboring_relation",
    "shuffle_epochs",
    "LedgerRecord",
    "PrivacyLedger",
]

SAMPLING_METHODS = ("poisson", "sampled_without_replacement", "shuffle")
ACCOUNTANTS = ("rdp", "pld")
DEFAULT_PLD_DISCRETIZATION = 1e-4

# Search limits for the calibration routines.
_MAX_NOISE_MULTIPLIER = 1e3
_MIN_NOISE_MULTIPLIER = 1e-2
_MAX_STEPS = 10**9

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
    """Epochs charged by ``sampling="shuffle"``: ``ceil(S·B/N)`` (= ``ceil(S·q)``).

    Exact integer arithmetic when ``batch_size`` and ``num_examples`` are
    given; otherwise ``ceil(S·q)`` with a 1e-9 slack against float error.
    """
    steps = _check_steps(steps)
    q, b, n = _resolve_sampling(sampling_rate, batch_size, num_examples, "shuffle")
    if b is not None:
        return -(-steps * b // n)
    return max(1, math.ceil(steps * q - 1e-9))


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


def _accountant_for(noise_multiplier, steps, sampling_rate, batch_size, num_examples,
                    sampling, accountant, pld_discretization):
    event = make_dp_event(
        noise_multiplier,
        steps,
        sampling_rate=sampling_rate,
        batch_size=batch_size,
        num_examples=num_examples,
        sampling=sampling,
    )
    return _composed_accountant(
        event, neighboring_relation(sampling), accountant, pld_discretization,
        f"sampling={sampling!r}",
    )


# ---------------------------------------------------------------------------
# ε and δ
# ---------------------------------------------------------------------------


def epsilon(
    noise_multiplier,
    steps,
    delta,
    *,
    sampling_rate=None,
    batch_size=None,
    num_examples=None,
    sampling="poisson",
    accountant="rdp",
    pld_discretization=DEFAULT_PLD_DISCRETIZATION,
):
    """ε of ``steps`` DP-SGD steps at noise multiplier σ and target δ.

    For Poisson sampling with the RDP accountant this is TAN §2's ε: the
    per-step Rényi divergence ``g_α(σ, q) = D_α((1−q)N(0,σ²) + qN(1,σ²) ‖
    N(0,σ²))`` (Mironov et al. 2019) is composed over S steps and converted
    with Balle et al. 2020 (see the module docstring), as the paper did via
    Opacus. TAN Eq. 4 approximates it by ``ε_TAN(η)`` for σ ≳ 2
    (``tan_keras.tan.eps_tan``).

    Args:
      noise_multiplier: σ, noise std divided by the clipping norm C (> 0).
      steps: S, number of noisy steps (>= 1).
      delta: target δ in (0, 1).
      sampling_rate: q in (0, 1], the sampler's actual rate. Or give
      batch_size, num_examples: B and N, meaning q = B/N (B <= N).
      sampling: one of ``SAMPLING_METHODS`` (see the module docstring; note
        that ``"shuffle"`` gets no amplification).
      accountant: ``"rdp"`` (paper) or ``"pld"`` (tighter).
      pld_discretization: PLD value discretization interval (coarser = faster,
        still an upper bound).

    Returns:
      ε as a float (``inf`` if the accountant cannot bound it).

    Raises:
      ValueError: on an invalid argument, or if ``accountant`` cannot express
        ``sampling`` (PLD with ``"sampled_without_replacement"``).
    """
    delta = _check_delta(delta)
    acc = _accountant_for(noise_multiplier, steps, sampling_rate, batch_size,
                          num_examples, sampling, accountant, pld_discretization)
    return float(acc.get_epsilon(delta))


def delta_for_epsilon(
    epsilon,
    noise_multiplier,
    steps,
    *,
    sampling_rate=None,
    batch_size=None,
    num_examples=None,
    sampling="poisson",
    accountant="rdp",
    pld_discretization=DEFAULT_PLD_DISCRETIZATION,
):
    """δ at which ``steps`` DP-SGD steps are (ε, δ)-DP; the inverse of :func:`epsilon`.

    The RDP conversion is the matching Balle et al. 2020 / Canonne et al.
    2020 (Prop. 12) bound. Arguments as in :func:`epsilon`.
    """
    eps = _check_epsilon(epsilon)
    acc = _accountant_for(noise_multiplier, steps, sampling_rate, batch_size,
                          num_examples, sampling, accountant, pld_discretization)
    return float(acc.get_delta(eps))


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------


def calibrate_noise_multiplier(
    target_epsilon,
    steps,
    delta,
    *,
    sampling_rate=None,
    batch_size=None,
    num_examples=None,
    sampling="poisson",
    accountant="rdp",
    pld_discretization=DEFAULT_PLD_DISCRETIZATION,
    rtol=1e-4,
):
    """Smallest σ (up to relative tolerance ``rtol``) with ε(σ) <= target_epsilon.

    ε decreases in σ. The root is bracketed by geometric steps from the σ
    that TAN Eq. 4 predicts, within [0.01, 1000], then found with
    ``dp_accounting.calibrate_dp_mechanism``
    (Brent's method, tolerance ``rtol·σ_lo``), which guarantees
    ``epsilon(σ, ...) <= target_epsilon`` for the returned σ; a plain
    bisection in log σ is the fallback if ε is infinite at the lower end.

    Raises:
      ValueError: on invalid arguments, or if the target is unreachable
        (σ would have to exceed 1000), or so loose that σ = 0.01 meets it.
    """
    target = _check_epsilon(target_epsilon, "target_epsilon")
    delta = _check_delta(delta)
    steps = _check_steps(steps)
    rtol = _check_real("rtol", rtol)
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}.")
    relation = neighboring_relation(sampling)

    def event(sigma):
        return make_dp_event(sigma, steps, sampling_rate=sampling_rate,
                             batch_size=batch_size, num_examples=num_examples,
                             sampling=sampling)

    cache = {}

    def eps(sigma):
        if sigma not in cache:
            cache[sigma] = _composed_accountant(
                event(sigma), relation, accountant, pld_discretization,
                f"sampling={sampling!r}").get_epsilon(delta)
        return cache[sigma]

    def ok(sigma):
        return eps(sigma) <= target

    # Start from the TAN guess: ε ≈ ε_TAN(η) = η² + 2η√log(1/δ) (TAN Eq. 4)
    # inverted for η, then σ = q√(S/2)/η. Close for Poisson sampling at σ ≳ 2
    # (where ε is just below ε_TAN); elsewhere it is only a starting point.
    q, _, _ = _resolve_sampling(sampling_rate, batch_size, num_examples, sampling)
    log_inv_delta = math.log(1.0 / delta)
    eta = math.sqrt(log_inv_delta + target) - math.sqrt(log_inv_delta)
    guess = q * math.sqrt(steps / 2.0) / eta
    guess = min(max(guess, _MIN_NOISE_MULTIPLIER), _MAX_NOISE_MULTIPLIER)
    factor = 1.25  # squared after each failed expansion
    lo = hi = guess
    if ok(hi):
        while ok(lo):
            if lo <= _MIN_NOISE_MULTIPLIER:
                raise ValueError(
                    f"target_epsilon={target} is so loose that even noise_multiplier="
                    f"{lo} meets it (ε={eps(lo):.4g}); no meaningful σ to calibrate. "
                    "Lower target_epsilon."
                )
            hi, lo = lo, max(lo / factor, _MIN_NOISE_MULTIPLIER)
            factor *= factor
    else:
        while not ok(hi):
            if hi >= _MAX_NOISE_MULTIPLIER:
                raise ValueError(
                    f"target_epsilon={target} is unreachable: even noise_multiplier={hi} "
                    f"gives ε={eps(hi):.4g} > target at steps={steps}, delta={delta}. "
                    "Reduce steps or the sampling rate (batch size), or raise "
                    "target_epsilon/delta."
                )
            lo, hi = hi, min(hi * factor, _MAX_NOISE_MULTIPLIER)
            factor *= factor
    # Invariant: ok(hi) and not ok(lo).
    if math.isfinite(eps(lo)):
        sigma = dp_accounting.calibrate_dp_mechanism(
            lambda: _make_accountant(accountant, relation, pld_discretization),
            event,
            target,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
            tol=rtol * lo,
        )
        if ok(sigma):
            return float(sigma)
    while hi / lo > 1 + rtol:
        mid = math.sqrt(lo * hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _epsilon_of_steps(noise_multiplier, delta, sampling_rate, batch_size,
                      num_examples, sampling, accountant, pld_discretization):
    """``S -> epsilon(σ, S, δ, ...)``; for RDP, composes one step once and scales.

    RDP composes additively, so ε(S) only needs ``S·rdp₁`` -- bit-identical
    to what ``RdpAccountant`` computes for the S-step event.
    """
    if accountant != "rdp":
        return lambda s: epsilon(noise_multiplier, s, delta, sampling_rate=sampling_rate,
                                 batch_size=batch_size, num_examples=num_examples,
                                 sampling=sampling, accountant=accountant,
                                 pld_discretization=pld_discretization)
    one = _accountant_for(noise_multiplier, 1, sampling_rate, batch_size, num_examples,
                          sampling, accountant, pld_discretization)
    orders, rdp_one = one.orders, one.rdp

    def eps(s):
        if sampling == "shuffle":
            count = shuffle_epochs(s, sampling_rate if batch_size is None else None,
                                   batch_size=batch_size, num_examples=num_examples)
        else:
            count = s
        return float(_rdp.compute_epsilon(orders, count * rdp_one, delta)[0])

    return eps


def _largest_int_ok(ok, lo, hi):
    """Largest integer x in [lo, hi] with ok(x), for monotone ok and ok(lo) true."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def calibrate_steps(
    target_epsilon,
    noise_multiplier,
    delta,
    *,
    sampling_rate=None,
    batch_size=None,
    num_examples=None,
    sampling="poisson",
    accountant="rdp",
    pld_discretization=DEFAULT_PLD_DISCRETIZATION,
    max_steps=_MAX_STEPS,
):
    """Largest S with ε(S) <= target_epsilon (ε is non-decreasing in S).

    Exponential search for an upper bracket, then integer bisection.

    Raises:
      ValueError: if even S = 1 exceeds the budget, or if the budget still
        holds at ``max_steps`` (the run is never limited by privacy).
    """
    target = _check_epsilon(target_epsilon, "target_epsilon")
    delta = _check_delta(delta)
    max_steps = _check_int("max_steps", max_steps, 1)

    eps = _epsilon_of_steps(noise_multiplier, delta, sampling_rate, batch_size,
                            num_examples, sampling, _check_accountant(accountant),
                            pld_discretization)

    def ok(s):
        return eps(s) <= target

    if not ok(1):
        raise ValueError(
            f"target_epsilon={target} is unreachable: even steps=1 gives ε={eps(1):.4g} "
            f"at noise_multiplier={noise_multiplier}, delta={delta}. Raise "
            "noise_multiplier, lower the sampling rate, or raise target_epsilon."
        )
    lo, hi = 1, 2
    while ok(hi):
        if hi >= max_steps:
            raise ValueError(
                f"target_epsilon={target} is never reached: ε({max_steps} steps) = "
                f"{eps(max_steps):.4g} is still within budget. Lower noise_multiplier or "
                "raise the sampling rate, or pass a larger max_steps."
            )
        lo, hi = hi, min(hi * 2, max_steps)
    return _largest_int_ok(ok, lo, hi - 1)


def calibrate_batch_size(
    target_epsilon,
    noise_multiplier,
    steps,
    delta,
    num_examples,
    *,
    sampling="poisson",
    accountant="rdp",
    pld_discretization=DEFAULT_PLD_DISCRETIZATION,
):
    """Largest batch size B in [1, N] with ε(q = B/N) <= target_epsilon.

    ε is non-decreasing in B, so this is an integer bisection. Returns N if
    even full-batch training meets the target.

    Raises:
      ValueError: if even B = 1 exceeds the budget.
    """
    target = _check_epsilon(target_epsilon, "target_epsilon")
    delta = _check_delta(delta)
    n = _check_int("num_examples", num_examples, 1)

    def eps(b):
        return epsilon(noise_multiplier, steps, delta, batch_size=b, num_examples=n,
                       sampling=sampling, accountant=accountant,
                       pld_discretization=pld_discretization)

    def ok(b):
        return eps(b) <= target

    if not ok(1):
        raise ValueError(
            f"target_epsilon={target} is unreachable: even batch_size=1 gives "
            f"ε={eps(1):.4g} (steps={steps}, noise_multiplier={noise_multiplier}, "
            f"delta={delta}). Reduce steps, raise noise_multiplier or target_epsilon."
        )
    if ok(n):
        return n
    return _largest_int_ok(ok, 1, n - 1)


# ---------------------------------------------------------------------------
# Sampler and microbatch conventions
# ---------------------------------------------------------------------------


def sampling_rate_from_loader(batch_size, num_examples):
    """``q = 1/ceil(N/B)``: the sampling rate an Opacus ``DPDataLoader`` uses.

    The TAN paper defines ``q = B/N`` (TAN §2), but facebookresearch/tan builds
    its loader with Opacus 1.1.2, whose ``DPDataLoader.from_data_loader`` sets
    ``sample_rate = 1/len(data_loader) = 1/ceil(N/B)``. The two differ when B
    does not divide N: for CIFAR-10 at B = 4096, ``B/N = 0.08192`` but the
    loader's q is ``1/13 ≈ 0.0769`` (expected batch 3846); for ImageNet at
    B = 32768, ``0.02558`` vs ``1/40``. The paper's reported ε (8.00 on
    ImageNet, 7.1 on CIFAR-10) match ``q = B/N``.

    Every function in this module takes the sampler's *actual* q: pass
    ``sampling_rate=sampling_rate_from_loader(B, N)`` if that is how you
    sample, or ``batch_size=B, num_examples=N`` for ``q = B/N``.
    """
    b = _check_int("batch_size", batch_size, 1)
    n = _check_int("num_examples", num_examples, 1)
    if b > n:
        raise ValueError(f"batch_size={b} is larger than num_examples={n} (lower batch_size).")
    return 1.0 / math.ceil(n / b)


def effective_noise_multiplier(noise_multiplier, num_microbatches, batch_size):
    """σ to give the accountant when gradients are clipped per *microbatch*.

    Returns ``σ/2`` if the microbatch size ``B/num_microbatches`` exceeds 1
    (``num_microbatches is not None and num_microbatches < batch_size``), else σ.

    With TF-Privacy-style microbatches, each microbatch's *mean* gradient is
    clipped to C and the clipped microbatch gradients are summed. Under
    add/remove-one neighbouring, adding or removing one example changes the
    content of one microbatch (and, with fixed-size microbatches, shifts which
    examples land in it), so that microbatch's clipped gradient can change
    from one vector of norm ≤ C to another: the L2 sensitivity of the sum is
    ``2C``, not ``C``. Noise ``N(0, σ²C²)`` against sensitivity 2C is a
    Gaussian mechanism with noise multiplier ``σ/2``. TF Privacy's
    ``compute_dp_sgd_privacy_lib`` makes the same correction
    (``noise_multiplier /= 2`` when microbatching is used). With one example
    per microbatch (``num_microbatches == batch_size`` or ``None``) the
    sensitivity is C and σ is unchanged.
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    b = _check_int("batch_size", batch_size, 1)
    if num_microbatches is None:
        return sigma
    m = _check_int("num_microbatches", num_microbatches, 1)
    if m > b:
        raise ValueError(
            f"num_microbatches={m} exceeds batch_size={b}; a microbatch needs at least "
            "one example (use num_microbatches <= batch_size, or None for per-example)."
        )
    return sigma / 2 if m < b else sigma


# ---------------------------------------------------------------------------
# Ledger
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LedgerRecord:
    """``steps`` consecutive DP-SGD steps with the same (σ, q, sampling, B, N)."""

    noise_multiplier: float
    sampling_rate: float
    steps: int
    sampling: str = "poisson"
    num_examples: int | None = None
    batch_size: int | None = None

    def __post_init__(self):
        sigma = _check_noise_multiplier(self.noise_multiplier)
        steps = _check_steps(self.steps)
        q, b, n = _resolve_sampling(self.sampling_rate, self.batch_size,
                                    self.num_examples, self.sampling)
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(
            self, "sampling_rate", q if self.sampling_rate is None else float(self.sampling_rate)
        )
        object.__setattr__(self, "batch_size", b)
        object.__setattr__(self, "num_examples", n)

    def same_mechanism(self, other):
        """True if ``other`` differs from this record only in ``steps``."""
        return dataclasses.replace(self, steps=1) == dataclasses.replace(other, steps=1)

    def dp_event(self):
        """This record's ``dp_accounting`` event (see :func:`make_dp_event`)."""
        if self.batch_size is not None:
            return make_dp_event(self.noise_multiplier, self.steps,
                                 batch_size=self.batch_size,
                                 num_examples=self.num_examples, sampling=self.sampling)
        return make_dp_event(self.noise_multiplier, self.steps,
                             sampling_rate=self.sampling_rate, sampling=self.sampling)


class PrivacyLedger:
    """The composed DP events of a training run, serializable with checkpoints.

    Each :meth:`record` call appends DP-SGD steps; a record identical to the
    previous one except for ``steps`` is merged into it (one
    ``SelfComposedDpEvent``), so a ledger fed once per step stays one entry
    long while (σ, q) do not change. ε is computed from the composition of
    all records, so runs that change σ, q or the sampler mid-way are
    accounted correctly.

    ``to_json`` / ``from_json`` round-trip exactly (floats are written with
    ``repr`` precision). Schema (version 1)::

        {"schema": "tan_keras.PrivacyLedger", "version": 1,
         "records": [{"noise_multiplier": σ, "sampling_rate": q, "steps": S,
                      "sampling": "poisson", "num_examples": N|null,
                      "batch_size": B|null}, ...]}
    """

    SCHEMA = "tan_keras.PrivacyLedger"
    VERSION = 1

    def __init__(self, records=()):
        self._records = []
        for r in records:
            if not isinstance(r, LedgerRecord):
                raise ValueError(f"records must be LedgerRecord instances, got {r!r}.")
            self._append(r)

    def _append(self, rec):
        if self._records and self._records[-1].same_mechanism(rec):
            last = self._records[-1]
            self._records[-1] = dataclasses.replace(last, steps=last.steps + rec.steps)
        else:
            self._records.append(rec)

    def record(self, noise_multiplier, sampling_rate, steps=1, *, sampling="poisson",
               num_examples=None, batch_size=None):
        """Appends ``steps`` steps at noise multiplier σ and sampling rate q.

        For ``sampling="sampled_without_replacement"`` (and optionally for the
        others) also give ``batch_size`` and ``num_examples``; they must agree
        with ``sampling_rate = B/N``.
        """
        self._append(LedgerRecord(noise_multiplier, sampling_rate, steps, sampling,
                                  num_examples, batch_size))
        return self

    @property
    def records(self):
        """The (merged) records, oldest first, as a tuple."""
        return tuple(self._records)

    @property
    def steps(self):
        """Total number of recorded steps."""
        return sum(r.steps for r in self._records)

    def __len__(self):
        return len(self._records)

    def dp_event(self):
        """The ``dp_accounting.ComposedDpEvent`` of all records."""
        return dp_accounting.ComposedDpEvent([r.dp_event() for r in self._records])

    def _relation(self):
        relations = {neighboring_relation(r.sampling) for r in self._records}
        if len(relations) > 1:
            raise ValueError(
                "the ledger mixes sampling methods accounted under different "
                "neighbouring relations (sampled_without_replacement uses REPLACE_ONE, "
                "the others ADD_OR_REMOVE_ONE); their ε cannot be composed. Use one "
                "family of samplers within a run."
            )
        return relations.pop() if relations else _Relation.ADD_OR_REMOVE_ONE

    def _accountant(self, accountant, pld_discretization):
        samplings = sorted({r.sampling for r in self._records})
        return _composed_accountant(self.dp_event(), self._relation(), accountant,
                                    pld_discretization, f"sampling={samplings}")

    def epsilon(self, delta, accountant="rdp", *,
                pld_discretization=DEFAULT_PLD_DISCRETIZATION):
        """ε of everything recorded so far, at target δ (0 for an empty ledger)."""
        delta = _check_delta(delta)
        _check_accountant(accountant)
        if not self._records:
            return 0.0
        return float(self._accountant(accountant, pld_discretization).get_epsilon(delta))

    def delta(self, epsilon, accountant="rdp", *,
              pld_discretization=DEFAULT_PLD_DISCRETIZATION):
        """δ of everything recorded so far, at ε (0 for an empty ledger)."""
        eps = _check_epsilon(epsilon)
        _check_accountant(accountant)
        if not self._records:
            return 0.0
        return float(self._accountant(accountant, pld_discretization).get_delta(eps))

    def to_json(self):
        """Serializes the ledger (see the class docstring for the schema)."""
        return json.dumps({
            "schema": self.SCHEMA,
            "version": self.VERSION,
            "records": [dataclasses.asdict(r) for r in self._records],
        })

    @classmethod
    def from_json(cls, s):
        """Inverse of :meth:`to_json`; validates the schema and every record."""
        try:
            data = json.loads(s)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"s is not a PrivacyLedger JSON string: {e}.") from e
        if not isinstance(data, dict) or data.get("schema") != cls.SCHEMA:
            raise ValueError(
                f"s is not a PrivacyLedger JSON document (expected schema {cls.SCHEMA!r}, "
                f"got {data.get('schema') if isinstance(data, dict) else data!r})."
            )
        if data.get("version") != cls.VERSION:
            raise ValueError(
                f"PrivacyLedger JSON version {data.get('version')!r} is not supported "
                f"(this tan_keras reads version {cls.VERSION})."
            )
        fields = {f.name for f in dataclasses.fields(LedgerRecord)}
        records = []
        for i, r in enumerate(data.get("records", [])):
            if not isinstance(r, dict) or set(r) != fields:
                raise ValueError(
                    f"records[{i}]={r!r} must have exactly the keys {sorted(fields)}."
                )
            records.append(LedgerRecord(**r))
        return cls(records)

    def __eq__(self, other):
        if not isinstance(other, PrivacyLedger):
            return NotImplemented
        return self._records == other._records

    __hash__ = None

    def __repr__(self):
        return f"PrivacyLedger(steps={self.steps}, records={self._records!r})"
