"""Empirical privacy auditing: an ε lower bound from one training run with canaries.

Every other test of this package checks a mechanism against its formula. An
audit looks at the guarantee from outside: train once with canaries, then
measure how well an attacker tells the canaries that were trained on from
those that were not. If the run is (ε, δ)-DP, the attacker cannot do better
than a coin of bias ``e^ε/(1+e^ε)`` on each canary; doing better refutes the
claim, and gives a lower bound ``ε_lb`` on the run's real ε.

**One-run audit** (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023, arXiv:2305.08846). ``m`` canaries are each
included in the training set independently with probability 1/2
(``S ∈ {−1, +1}^m``); one model is trained; the attacker scores every canary
and guesses "in" for the ``k₊`` highest scores and "out" for the ``k₋``
lowest, abstaining on the rest (``r = k₊ + k₋`` guesses, ``v`` of them
correct). Their Theorem 5.2 (δ > 0; Theorem 3.1 for δ = 0): if the training
is (ε, δ)-DP, then for every v,

    P[W ≥ v] ≤ β + 2mδ·α,   β = P[Bin(r, p) ≥ v],   p = e^ε / (1 + e^ε),
    α = max_{1 ≤ i ≤ v}  P[v − i ≤ Bin(r, p) < v] / i,

so a run with ``v`` correct guesses has p-value ``min(1, β + 2mδα)`` against
"the run is (ε, δ)-DP"; ``ε_lb`` is the largest ε rejected at significance
``1 − confidence`` (:func:`one_run_p_value`, :func:`epsilon_lower_bound`).
With δ = 0 and every guess right, ``ε_lb = logit((1 − confidence)^{1/r})``.

**f-DP variant** (Mahloujifar, Melis & Chaudhuri, "Auditing f-Differential
Privacy in One Run", 2024, arXiv:2410.22235): the same experiment, tested
against the Gaussian trade-off curve ``f_μ`` whose Gaussian mechanism is
(ε, δ)-DP (``μ = 1/σ(ε, δ)``); usually a tighter bound, but it refutes
"the run is μ-GDP", which DP-SGD only approximately is
(:func:`gdp_epsilon_lower_bound`).

Both agree with ``jax_privacy.auditing.CanaryScoreAuditor`` (2.0.0) on the
same scores (``tests/test_auditing.py``).

**Canaries and scores.** Black-box canaries are inputs scored by their loss
under the trained model (:func:`mislabeled_canaries`,
:func:`ood_canaries`, :func:`loss_scores`). White-box *gradient* canaries
(:func:`dirac_canaries`) are examples whose gradient points in a fixed
direction: each one uses its own input coordinate, which no real example
uses, so its gradient lives on its own row of the first Dense kernel; it is
scored by the alignment of the model's total update with that direction
(:func:`canary_directions`, :func:`alignment_scores`).

**The audited path is the package's.** :func:`run_audit` trains with
``tan_keras.make_private`` (default clipping), ``tan_keras.DPSGD`` (or the
optimizer you pass), ``tan_keras.sampling.private_fit`` (Poisson sampler,
``expected_batch_size = qN``) and claims the ε of
``tan_keras.accounting.epsilon``. An audit of a special path audits nothing.

A bound below the claimed ε does not prove the run private (audits are
lower bounds, and one-run audits are loose); a bound above it, at the
stated confidence, proves the claim wrong.
"""

import dataclasses
import math

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

__all__ = [
    "one_run_p_value", "epsilon_lower_bound", "gdp_epsilon_lower_bound", "AuditResult", "audit_scores",
    "default_guesses", "CanarySet", "mislabeled_canaries", "ood_canaries", "dirac_canaries",
    "pad_features", "loss_scores", "canary_directions", "alignment_scores", "AuditRun", "run_audit",
]

METHODS = ("one_run", "gdp")


# -- statistics (numpy / scipy only) -----------------------------------------------------------------


def _check_counts(num_canaries, num_guesses, num_correct):
    for name, value in (("num_canaries", num_canaries), ("num_guesses", num_guesses),
                        ("num_correct", num_correct)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"`{name}` must be an int >= 0, got {value!r}.")
    if not num_correct <= num_guesses <= num_canaries:
        raise ValueError(f"Need num_correct <= num_guesses <= num_canaries, got "
                         f"{num_correct}, {num_guesses}, {num_canaries}.")
    return int(num_canaries), int(num_guesses), int(num_correct)


def _check_delta_confidence(delta, confidence):
    if isinstance(delta, bool) or not isinstance(delta, (int, float, np.floating)) or not 0 <= delta < 1:
        raise ValueError(f"`delta` must be in [0, 1), got {delta!r}.")
    if isinstance(confidence, bool) or not isinstance(confidence, (float, np.floating)) or not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be a float in (0, 1), e.g. 0.95, got {confidence!r}.")
    return float(delta), float(confidence)


def one_run_p_value(num_canaries, num_guesses, num_correct, epsilon, delta=0.0):
    """p-value of ``num_correct`` right guesses out of ``num_guesses`` if the run is (ε, δ)-DP.

    Steinke, Nasr & Jagielski (2023), Theorem 5.2 (Theorem 3.1 when δ = 0):
    ``min(1, β + 2mδα)`` with ``β = P[Bin(r, p) ≥ v]``, ``p = e^ε/(1+e^ε)``,
    ``α = max_{1≤i≤v} P[v−i ≤ Bin(r, p) < v]/i`` (see the module docstring).
    """
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    if epsilon < 0 or math.isnan(epsilon):
        raise ValueError(f"`epsilon` must be >= 0, got {epsilon!r}.")
    p = scipy.special.expit(epsilon)
    beta = scipy.stats.binom.sf(v - 1, r, p)
    if delta == 0 or v == 0:
        return float(min(beta, 1.0))
    i = np.arange(1, v + 1)
    # P[v − i ≤ W < v] = P[W ≥ v − i] − P[W ≥ v]
    alpha = np.max((scipy.stats.binom.sf(v - i - 1, r, p) - beta) / i)
    return float(min(beta + 2 * m * delta * alpha, 1.0))


def _largest_rejected(rejects, hi_start=1.0):
    """The largest ε ≥ 0 with ``rejects(ε)`` (a decreasing predicate), or 0 if ``rejects(0)`` is False."""
    if not rejects(0.0):
        return 0.0
    lo, hi = 0.0, hi_start
    while rejects(hi):
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            return math.inf
    while hi - lo > 1e-7:  # bisection; the result is rejected, so it stays a valid lower bound
        mid = 0.5 * (lo + hi)
        if rejects(mid):
            lo = mid
        else:
            hi = mid
    return lo


def epsilon_lower_bound(num_canaries, num_guesses, num_correct, delta, confidence=0.95):
    """ε_lb: the largest ε for which "(ε, δ)-DP" is rejected at ``1 − confidence`` (Steinke et al. 2023).

    ``P[ε_lb > true ε] ≤ 1 − confidence`` over the canaries' inclusion coins
    and the training randomness, for a guess rule fixed in advance. Returns 0
    if even ε = 0 is not rejected.
    """
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    delta, confidence = _check_delta_confidence(delta, confidence)
    significance = 1 - confidence
    return _largest_rejected(lambda eps: one_run_p_value(m, r, v, eps, delta) <= significance)


def _gaussian_sigma(epsilon, delta):
    """σ of the Gaussian mechanism (sensitivity 1) that is exactly (ε, δ)-DP (Balle & Wang 2018)."""
    import dp_accounting

    return dp_accounting.get_sigma_gaussian(epsilon, delta)


def _gdp_rejects(m, r, v, epsilon, delta, significance):
    """Mahloujifar et al. (2024)'s test of the Gaussian trade-off f_μ, μ = 1/σ(ε, δ), with a cap.

    Walks the guesses from the last correct one down, tracking ``(r_i, h_i)``:
    upper bounds on the probability mass of "i correct" / "wrong" guess
    events that an f_μ-DP mechanism allows, given an overall failure
    probability ``significance``; rejects if the observed ``v`` correct of
    ``r`` guesses needs more mass (``r_0 + h_0``) than ``r/m`` allows.
    """
    sigma = _gaussian_sigma(epsilon, delta)
    if sigma == 0:
        inverse = lambda x: float(x == 1.0)  # noqa: E731
    else:
        mu = 1.0 / sigma
        inverse = lambda x: float(scipy.special.ndtr(scipy.special.ndtri(x) - mu))  # noqa: E731
    correct = significance * v / m
    wrong = significance * (r - v) / m
    for i in range(v - 1, -1, -1):
        wrong_new = max(wrong, inverse(correct))
        if wrong_new == wrong:
            break
        correct = min(correct + (i / (r - i)) * (wrong_new - wrong), 1.0)
        wrong = wrong_new
    return correct + wrong - r / m > 0


def gdp_epsilon_lower_bound(num_canaries, num_guesses, num_correct, delta, confidence=0.95):
    """ε_lb under the f-DP test of Mahloujifar et al. (2024), for the Gaussian trade-off family.

    The largest ε such that "the run is f_μ-DP with μ = 1/σ(ε, δ)" (the
    Gaussian mechanism that is (ε, δ)-DP) is rejected at ``1 − confidence``.
    Tighter than :func:`epsilon_lower_bound` for Gaussian-like mechanisms;
    it refutes μ-GDP, not (ε, δ)-DP in general.
    """
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    delta, confidence = _check_delta_confidence(delta, confidence)
    if delta == 0:
        raise ValueError("The Gaussian (f-DP) audit needs delta > 0: a Gaussian mechanism is never (ε, 0)-DP.")
    significance = 1 - confidence
    if v == 0:
        return 0.0
    return _largest_rejected(lambda eps: _gdp_rejects(m, r, v, max(eps, 1e-9), delta, significance))


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """The outcome of one audit: ``epsilon`` is the lower bound ε_lb.

    Attributes:
      epsilon: ε_lb at ``confidence`` for ``delta`` (0: nothing refuted).
      confidence: 1 − significance, for the whole search over guess counts.
      delta: the δ of the refuted (ε, δ) claims.
      method: ``"one_run"`` (Steinke et al.) or ``"gdp"`` (Mahloujifar et al.).
      num_canaries: m.
      num_guesses, num_correct: r and v of the best guess rule.
      guesses: ``(k₊, k₋)`` of the best rule: "in" for the k₊ top scores,
        "out" for the k₋ bottom ones.
      num_rules: guess rules searched (Bonferroni: each was tested at
        significance ``(1 − confidence)/num_rules``).
    """

    epsilon: float
    confidence: float
    delta: float
    method: str
    num_canaries: int
    num_guesses: int
    num_correct: int
    guesses: tuple
    num_rules: int


def default_guesses(num_canaries):
    """Guess rules ``(k₊, k₋)`` searched by default: one- and two-sided, from 1 % to all canaries.

    ``k ∈ {1, 2, 5, 10, 20, 30, 50} %`` of m guessed "in" at the top, alone
    or with as many guessed "out" at the bottom, and every canary guessed
    (``(m/2, m − m/2)``): 15 rules.
    """
    m = int(num_canaries)
    ks = sorted({max(1, round(m * f)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)})
    rules = [(k, 0) for k in ks] + [(k, k) for k in ks if 2 * k <= m]
    rules.append((m // 2, m - m // 2))
    return list(dict.fromkeys(rules))


def audit_scores(scores, included, delta, confidence=0.95, guesses=None, method="one_run"):
    """ε_lb from canary scores (higher = more likely trained on) and the true inclusion coins.

    Each rule ``(k₊, k₋)`` of ``guesses`` (default :func:`default_guesses`)
    guesses "in" for the k₊ highest scores and "out" for the k₋ lowest and is
    tested at significance ``(1 − confidence)/len(guesses)``; the best bound
    is returned (valid at ``confidence`` by the union bound). Ties are broken
    by canary index, which is independent of the inclusion coins.

    Args:
      scores: (m,) float array.
      included: (m,) bool array: whether canary i was in the training set
        (drawn with probability 1/2 each, independently).
      delta: δ of the tested claims.
      confidence: e.g. 0.95.
      guesses: list of ``(k₊, k₋)`` with ``k₊ + k₋ ≤ m``.
      method: ``"one_run"`` or ``"gdp"``.
    """
    scores = np.asarray(scores, np.float64)
    included = np.asarray(included)
    if scores.ndim != 1 or included.shape != scores.shape:
        raise ValueError(f"`scores` and `included` must be 1-D of the same length, got {scores.shape} "
                         f"and {included.shape}.")
    if included.dtype != bool:
        raise ValueError("`included` must be a bool array (True: the canary was trained on).")
    if not np.all(np.isfinite(scores)):
        raise ValueError("`scores` must be finite (a NaN score means the training or scoring diverged).")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    delta, confidence = _check_delta_confidence(delta, confidence)
    m = len(scores)
    guesses = default_guesses(m) if guesses is None else [tuple(int(k) for k in g) for g in guesses]
    if not guesses or any(kp < 0 or km < 0 or kp + km > m or kp + km == 0 for kp, km in guesses):
        raise ValueError(f"Each guess rule (k_plus, k_minus) needs 0 < k_plus + k_minus <= m = {m}, got {guesses}.")
    order = np.argsort(-scores, kind="stable")
    ranked = included[order]
    per_rule = 1 - (1 - confidence) / len(guesses)
    bound = epsilon_lower_bound if method == "one_run" else gdp_epsilon_lower_bound
    best = None
    for kp, km in guesses:
        v = int(np.sum(ranked[:kp])) + int(np.sum(~ranked[m - km:])) if km else int(np.sum(ranked[:kp]))
        eps = bound(m, kp + km, v, delta, per_rule)
        if best is None or eps > best[0]:
            best = (eps, kp + km, v, (kp, km))
    return AuditResult(epsilon=best[0], confidence=confidence, delta=delta, method=method, num_canaries=m,
                       num_guesses=best[1], num_correct=best[2], guesses=best[3], num_rules=len(guesses))


# -- canaries (numpy only) ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CanarySet:
    """``m`` canary examples: inputs ``x``, integer labels ``y`` and how they were made (``kind``)."""

    x: np.ndarray
    y: np.ndarray
    kind: str

    def __len__(self):
        return len(self.y)


def _rng(seed):
    return np.random.default_rng(seed)


def mislabeled_canaries(x, y, num_canaries, num_classes, seed=0):
    """Black-box canaries: ``num_canaries`` real examples (never trained on otherwise), each with a wrong label.

    Pass examples held out of the training set. The new label is uniform over
    the ``num_classes − 1`` wrong ones.
    """
    x, y = np.asarray(x), np.asarray(y).astype(np.int64).reshape(-1)
    if num_canaries > len(y):
        raise ValueError(f"Asked for {num_canaries} canaries from {len(y)} examples.")
    rng = _rng(seed)
    idx = rng.choice(len(y), num_canaries, replace=False)
    wrong = (y[idx] + rng.integers(1, num_classes, size=num_canaries)) % num_classes
    return CanarySet(x[idx].copy(), wrong.astype(np.int32), "mislabeled")


def ood_canaries(input_shape, num_canaries, num_classes, seed=0, low=0.0, high=1.0):
    """Black-box canaries: out-of-distribution inputs (i.i.d. uniform pixels) with random labels."""
    rng = _rng(seed)
    x = rng.uniform(low, high, size=(num_canaries, *tuple(input_shape))).astype(np.float32)
    return CanarySet(x, rng.integers(0, num_classes, size=num_canaries).astype(np.int32), "ood")


def dirac_canaries(num_features, num_canaries, num_classes, scale=10.0, seed=0):
    """White-box gradient canaries on ``num_features + num_canaries`` input features.

    Canary j is ``scale · e_{num_features + j}`` with a random label: a
    coordinate that real examples (padded by :func:`pad_features`) leave at
    0. Under a model whose first layer is ``Dense`` on the flat input, its
    gradient on that kernel is ``scale · e_{d+j} ⊗ ∂ℓ/∂z``: a row no other
    example touches, so the direction of its update is fixed up to the
    output gradient. Choose ``scale`` so that its gradient norm exceeds C
    (it is then clipped to exactly C).
    """
    rng = _rng(seed)
    x = np.zeros((num_canaries, num_features + num_canaries), np.float32)
    x[np.arange(num_canaries), num_features + np.arange(num_canaries)] = scale
    return CanarySet(x, rng.integers(0, num_classes, size=num_canaries).astype(np.int32), "dirac")


def pad_features(x, num_canaries):
    """Real inputs flattened and padded with ``num_canaries`` zero features, for :func:`dirac_canaries`."""
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    return np.concatenate([x, np.zeros((len(x), num_canaries), np.float32)], axis=1)


# -- scores (Keras) ----------------------------------------------------------------------------------------


def loss_scores(model, canaries, batch_size=1024):
    """Black-box scores: ``−ℓ(model(x_j), y_j)`` per canary (a trained-on canary has a lower loss)."""
    import keras

    logits = model.predict(canaries.x, batch_size=batch_size, verbose=0)
    losses = keras.losses.sparse_categorical_crossentropy(canaries.y, logits, from_logits=True)
    return -np.asarray(keras.ops.convert_to_numpy(losses), np.float64)


def _flatten(arrays):
    return np.concatenate([np.reshape(np.asarray(a, np.float64), (-1,)) for a in arrays])


def canary_directions(model, canaries, loss=None):
    """White-box directions: each canary's negative gradient at the current weights, unit norm, (m, P).

    Call it on the freshly built model, before training: the direction an
    SGD step on the canary alone would move the weights. Uses
    ``tan_keras.per_example_gradients`` with the compiled loss.
    """
    import keras

    from tan_keras import per_example

    grads = per_example.per_example_gradients(model, canaries.x, canaries.y)
    flat = np.concatenate([np.reshape(np.asarray(keras.ops.convert_to_numpy(g), np.float64), (len(canaries), -1))
                           for g in grads], axis=1)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("A canary has a zero gradient at these weights, so it has no direction to score.")
    return -flat / norms


def alignment_scores(model, initial_weights, directions):
    """White-box scores: ``⟨θ_final − θ_init, u_j⟩`` for each canary direction ``u_j`` (rows of ``directions``)."""
    import keras

    final = _flatten([keras.ops.convert_to_numpy(v) for v in model.trainable_variables])
    return directions @ (final - _flatten(initial_weights))


# -- the audit run (the package's real training path) -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AuditRun:
    """One audited training run.

    Attributes:
      claimed_epsilon: ε of ``tan_keras.accounting.epsilon`` for the run's
        (σ, q, S, δ) (RDP accountant, Poisson sampling).
      result: the :class:`AuditResult` (``result.epsilon`` is ε_lb).
      gdp_result: the same scores under the f-DP (Gaussian) test, or None.
      scores, included: the canaries' scores and inclusion coins.
      noise_multiplier, sampling_rate, steps, delta: the claim's parameters.
      model: the trained model.
    """

    claimed_epsilon: float
    result: AuditResult
    gdp_result: object
    scores: np.ndarray
    included: np.ndarray
    noise_multiplier: float
    sampling_rate: float
    steps: int
    delta: float
    model: object


def run_audit(build_model, x, y, canaries, *, optimizer, steps, sampling_rate, delta, score="alignment",
              confidence=0.95, seed=0, physical_batch_size=None, loss=None, gdp=False, guesses=None):
    """Trains once with each canary included w.p. 1/2 and returns the claimed ε and the audit's ε_lb.

    The path is the package's: ``tan_keras.make_private(build_model())``
    (default clipping), compiled with ``optimizer`` (a ``tan_keras.DPSGD``
    or DPAdam: its ``noise_multiplier`` is the claim), trained by
    ``tan_keras.sampling.private_fit`` (Poisson sampling at rate
    ``sampling_rate``, ``expected_batch_size = qN``) for ``steps`` steps, and
    accounted by ``tan_keras.accounting.epsilon``.

    Args:
      build_model: no-argument callable returning an uncompiled Keras model
        whose outputs are logits.
      x, y: the real training examples (never audited).
      canaries: a :class:`CanarySet` shaped like ``x``.
      optimizer: the private optimizer to audit.
      steps, sampling_rate, delta: S, q and δ of the claim.
      score: ``"alignment"`` (white-box, :func:`alignment_scores`) or
        ``"loss"`` (black-box, :func:`loss_scores`).
      confidence: of the bound.
      seed: seeds the inclusion coins and the Poisson sampler.
      physical_batch_size: chunk size of the private step (memory).
      loss: the training loss (default sparse categorical cross-entropy on logits).
      gdp: also compute the f-DP (Gaussian) bound.
      guesses: guess rules for :func:`audit_scores`.
    """
    import keras

    from tan_keras import accounting, private_model, sampling

    if score not in ("alignment", "loss"):
        raise ValueError(f"`score` must be 'alignment' or 'loss', got {score!r}.")
    if not getattr(optimizer, "requires_per_example", False):
        raise ValueError("run_audit audits a clipping DP optimizer (tan_keras.DPSGD / DPAdam).")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(18,)))
    included = rng.random(len(canaries)) < 0.5
    x_train = np.concatenate([np.asarray(x, np.float32), canaries.x[included]], axis=0)
    y_train = np.concatenate([np.asarray(y).astype(np.int32).reshape(-1), canaries.y[included]], axis=0)

    model = private_model.make_private(build_model(), physical_batch_size=physical_batch_size)
    loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss)
    model(canaries.x[:1])  # build
    initial = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]
    directions = canary_directions(model, canaries) if score == "alignment" else None
    sampling.private_fit(model, x_train, y_train, steps=steps, sampling_rate=sampling_rate, seed=seed,
                         verbose=0)
    scores = alignment_scores(model, initial, directions) if score == "alignment" else loss_scores(model, canaries)
    claimed = accounting.epsilon(optimizer.noise_multiplier, steps, delta, sampling_rate=sampling_rate)
    result = audit_scores(scores, included, delta, confidence, guesses=guesses)
    gdp_result = audit_scores(scores, included, delta, confidence, guesses=guesses, method="gdp") if gdp else None
    return AuditRun(claimed_epsilon=claimed, result=result, gdp_result=gdp_result, scores=scores,
                    included=included, noise_multiplier=optimizer.noise_multiplier, sampling_rate=sampling_rate,
                    steps=steps, delta=delta, model=model)
