"""Privacy accounting for DP-SGD: ε(q, σ, S, δ), δ(ε) and calibration of σ, S or B.

A thin, validated wrapper around Google's ``dp_accounting`` (0.6.0). Plain
Python + ``dp_accounting``: this module imports no Keras, TensorFlow or JAX.

How each ``sampling`` (``"poisson"``, ``"sampled_without_replacement"``,
``"shuffle"`` -- ⚠ no amplification ⚠) maps to a ``dp_accounting`` event is
``tan_keras.dp_events``' docstring; the run's ledger (``LedgerRecord``,
``PrivacyLedger``) is ``tan_keras.ledger``. Both are re-exported here, so
``tan_keras.accounting.make_dp_event`` and ``tan_keras.accounting.PrivacyLedger``
keep working. Import order: ``dp_events`` ← ``ledger`` ← ``accounting``.

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

import math

import dp_accounting
from dp_accounting import rdp as _rdp

from tan_keras.dp_events import (  # noqa: F401  (re-exported: tan.py and callbacks validate with these)
    ACCOUNTANTS,
    DEFAULT_PLD_DISCRETIZATION,
    SAMPLING_METHODS,
    _check_accountant,
    _check_delta,
    _check_epsilon,
    _check_int,
    _check_noise_multiplier,
    _check_pld_discretization,
    _check_real,
    _check_sampling,
    _check_sampling_rate,
    _check_steps,
    _composed_accountant,
    _make_accountant,
    _Relation,
    _resolve_sampling,
    make_dp_event,
    neighboring_relation,
    quiet_rdp_convergence_warnings,
    shuffle_epochs,
)
from tan_keras.ledger import LedgerRecord, PrivacyLedger  # noqa: F401  (re-exported)

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
    "quiet_rdp_convergence_warnings",
    "LedgerRecord",
    "PrivacyLedger",
]


# Search limits for the calibration routines.
_MAX_NOISE_MULTIPLIER = 1e3
_MIN_NOISE_MULTIPLIER = 1e-2
_MAX_STEPS = 10**9


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


@quiet_rdp_convergence_warnings()
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


@quiet_rdp_convergence_warnings()
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


@quiet_rdp_convergence_warnings()
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
