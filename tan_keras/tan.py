"""TAN: the Total Amount of Noise and the scaling rules built on it.

Sander, Stock, Sablayrolles, "TAN Without a Burn: Scaling Laws of DP-SGD"
(ICML 2023, arXiv 2210.03403). Plain Python + numpy: no Keras.

DP-SGD with sampling rate ``q = B/N``, noise multiplier σ and S steps has

* per-step signal-to-noise ratio ``η_step = q/(√2·σ)`` (TAN §3.1),
* individual signal-to-noise ratio ``η = √(q²S/(2σ²)) = √S·η_step``
  (TAN Def. 3.1); the Total Amount of Noise is ``Σ = 1/η``.

For σ ≳ 2 the RDP guarantee depends on (q, σ, S) only through η (TAN §3.2):

    ε ≈ ε_TAN(η) = η² + 2η·√log(1/δ)         (TAN Eq. 4)

Hence the paper's recipe (TAN §1.3, §4): keep S and ``σ/B`` fixed and shrink
B by a factor k -- same η, k× less compute -- to run the hyper-parameter
search cheaply on a *simulated*, non-private run; then transfer the
hyper-parameters unchanged to one private run at the reference batch size.

Sharp edges:

* A simulated run is NOT private: its σ is k× smaller, and its real ε is
  enormous. Only its η (hence its training dynamics) matches the reference.
* ``ε ≈ ε_TAN`` only holds for σ ≳ 2; below σ ≈ 0.5 the real ε is far above
  ε_TAN (the "privacy wall", TAN Fig. 2). :func:`check_regime` says which
  side of it a σ is on.
"""

import dataclasses
import enum
import math
import warnings

import numpy as np

from tan_keras import accounting

__all__ = [
    "eta",
    "eta_step",
    "eps_tan",
    "TanConfig",
    "SimulatedConfig",
    "simulate",
    "trade_steps_for_batch",
    "RegimeLevel",
    "Regime",
    "TanRegimeWarning",
    "TanRegimeError",
    "check_regime",
    "warn_regime",
    "report",
    "ScalingLaw",
    "fit_scaling_law",
]

# σ thresholds of the regimes (TAN §3.2, Fig. 2-3).
WALL_NOISE_MULTIPLIER = 0.5
TAN_NOISE_MULTIPLIER = 2.0


def eta_step(sampling_rate, noise_multiplier):
    """Per-step signal-to-noise ratio ``η_step = q/(√2·σ)`` (TAN §3.1)."""
    q = accounting._check_sampling_rate(sampling_rate)
    sigma = accounting._check_noise_multiplier(noise_multiplier)
    return q / (math.sqrt(2.0) * sigma)


def eta(sampling_rate, noise_multiplier, steps):
    """Individual signal-to-noise ratio ``η = √(q²S/(2σ²))`` (TAN Def. 3.1).

    ``1/η`` is the Total Amount of Noise Σ; ``η² = S·η_step²``.
    """
    steps = accounting._check_steps(steps)
    return eta_step(sampling_rate, noise_multiplier) * math.sqrt(steps)


def eps_tan(eta, delta):
    """``ε_TAN(η) = η² + 2η·√log(1/δ)`` (TAN Eq. 4).

    The RDP ε of DP-SGD is ≈ ε_TAN when σ ≳ 2 (and a bit below it, since the
    reported ε uses the Balle et al. 2020 conversion).
    """
    e = accounting._check_real("eta", eta)
    if not (e >= 0 and math.isfinite(e)):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}.")
    d = accounting._check_delta(delta)
    return e * e + 2.0 * e * math.sqrt(math.log(1.0 / d))


@dataclasses.dataclass(frozen=True)
class TanConfig:
    """Privacy parameters ``(B, σ, S)`` on N examples, Poisson-sampled with q = B/N.

    Attributes:
      batch_size: B, the expected batch size (1 <= B <= N).
      noise_multiplier: σ > 0.
      steps: S >= 1.
      num_examples: N.
      learning_rate: optional; carried through the scaling rules.
    """

    batch_size: int
    noise_multiplier: float
    steps: int
    num_examples: int
    learning_rate: float | None = None

    def __post_init__(self):
        b = accounting._check_int("batch_size", self.batch_size, 1)
        n = accounting._check_int("num_examples", self.num_examples, 1)
        if b > n:
            raise ValueError(
                f"batch_size={b} is larger than num_examples={n}; lower batch_size "
                "(q = B/N must be <= 1)."
            )
        object.__setattr__(self, "batch_size", b)
        object.__setattr__(self, "num_examples", n)
        object.__setattr__(self, "steps", accounting._check_steps(self.steps))
        object.__setattr__(
            self, "noise_multiplier", accounting._check_noise_multiplier(self.noise_multiplier)
        )
        if self.learning_rate is not None:
            lr = accounting._check_real("learning_rate", self.learning_rate)
            if not (lr > 0 and math.isfinite(lr)):
                raise ValueError(f"learning_rate must be > 0 or None, got {self.learning_rate!r}.")
            object.__setattr__(self, "learning_rate", lr)

    @property
    def sampling_rate(self):
        """``q = B/N`` (TAN §2)."""
        return self.batch_size / self.num_examples

    @property
    def eta(self):
        """``η = √(q²S/(2σ²))`` (TAN Def. 3.1)."""
        return eta(self.sampling_rate, self.noise_multiplier, self.steps)

    @property
    def eta_step(self):
        """``η_step = q/(√2·σ)`` (TAN §3.1)."""
        return eta_step(self.sampling_rate, self.noise_multiplier)

    @property
    def epochs(self):
        """Passes over the data, ``S·B/N`` (a float; the TAN code runs ``ceil`` of it)."""
        return self.steps * self.batch_size / self.num_examples

    @property
    def examples_processed(self):
        """Compute, in examples (forward+backward passes): ``B·S``."""
        return self.batch_size * self.steps

    def epsilon(self, delta, accountant="rdp", **kwargs):
        """ε of this config (Poisson sampling, q = B/N); see ``accounting.epsilon``."""
        return accounting.epsilon(self.noise_multiplier, self.steps, delta,
                                  batch_size=self.batch_size,
                                  num_examples=self.num_examples,
                                  accountant=accountant, **kwargs)


@dataclasses.dataclass(frozen=True)
class SimulatedConfig:
    """A TAN-simulated run: same η and S as ``reference``, batch B, σ = σ_ref·B/B_ref.

    Attributes:
      config: the simulated ``TanConfig`` (same S and learning rate).
      reference: the reference (private) ``TanConfig``.
      compute_ratio: ``B_ref/B``, how many times cheaper than the reference
        (< 1 when scaling up).
      is_private: ``B >= B_ref``, i.e. σ >= σ_ref so ε <= the reference's ε.
        A run with ``B < B_ref`` is NOT private in any meaningful sense.
      note: human-readable explanation of the above.
    """

    config: TanConfig
    reference: TanConfig
    compute_ratio: float
    is_private: bool
    note: str

    @property
    def batch_size(self):
        return self.config.batch_size

    @property
    def noise_multiplier(self):
        return self.config.noise_multiplier

    @property
    def steps(self):
        return self.config.steps

    @property
    def learning_rate(self):
        return self.config.learning_rate

    @property
    def eta(self):
        return self.config.eta


def simulate(reference, batch_size):
    """The TAN simulation of ``reference`` at a different batch size (TAN §1.3, §4.2).

    Keeps S, the learning rate and ``η_step = q/(√2σ)`` fixed, so

        σ = σ_ref · B / B_ref

    exactly as facebookresearch/tan's ``get_noise_from_bs``. η equals the
    reference's η, so training dynamics (and, per TAN, the best
    hyper-parameters) transfer; compute drops by ``B_ref/B``.

    A simulated run with ``B < B_ref`` is **not private**: its σ is
    ``B_ref/B`` times smaller and its real ε is enormous (ε ≈ ε_TAN fails
    far below σ = 2). Use it only to search hyper-parameters. ``B > B_ref``
    scales the run up: σ grows, ε falls below the reference's, and it costs
    ``B/B_ref`` times more compute.
    """
    if not isinstance(reference, TanConfig):
        raise ValueError(f"reference must be a TanConfig, got {type(reference).__name__}.")
    b = accounting._check_int("batch_size", batch_size, 1)
    if b > reference.num_examples:
        raise ValueError(
            f"batch_size={b} is larger than reference.num_examples="
            f"{reference.num_examples}; lower batch_size."
        )
    sigma = reference.noise_multiplier * b / reference.batch_size
    config = TanConfig(b, sigma, reference.steps, reference.num_examples,
                       reference.learning_rate)
    ratio = reference.batch_size / b
    is_private = b >= reference.batch_size
    if b < reference.batch_size:
        note = (
            f"SIMULATION, NOT PRIVATE: σ={sigma:.4g} is {ratio:.4g}× smaller than the "
            f"reference σ={reference.noise_multiplier:.4g}, so its real ε is huge. It has "
            f"the reference's η={config.eta:.4g} and S={config.steps}, costs {ratio:.4g}× "
            "less compute, and is meant for hyper-parameter search only; transfer the "
            f"hyper-parameters unchanged to the private run at B={reference.batch_size}."
        )
    elif b == reference.batch_size:
        note = "This is the reference (private) run itself."
    else:
        note = (
            f"Scaled-up run: σ={sigma:.4g} >= reference σ, so it is at least as private "
            f"as the reference (ε <= reference ε) at the same η, for {1 / ratio:.4g}× "
            "the compute."
        )
    return SimulatedConfig(config, reference, ratio, is_private, note)


def trade_steps_for_batch(reference, steps):
    """Same σ and η as ``reference`` with ``steps`` steps (TAN §4.3, Tables 3–4).

    At fixed σ, ``η² = q²S/(2σ²)`` is constant when ``B ∝ 1/√S``, and the
    paper scales the learning rate inversely to S:

        B  = round(B_ref · √(S_ref/S)),     lr = lr_ref · S_ref/S.

    B is rounded to the nearest integer, so η matches the reference only up
    to a relative error of at most ``0.5/B``. Example (TAN Table 3):
    (B, S, lr) = (256, 72k, 8) → (512, 18k, 32) and (128, 288k, 2).

    Raises:
      ValueError: if the resulting B falls outside [1, N].
    """
    if not isinstance(reference, TanConfig):
        raise ValueError(f"reference must be a TanConfig, got {type(reference).__name__}.")
    s = accounting._check_steps(steps)
    b = round(reference.batch_size * math.sqrt(reference.steps / s))
    if not 1 <= b <= reference.num_examples:
        raise ValueError(
            f"steps={s} needs batch_size={b} to keep η fixed, outside [1, "
            f"num_examples={reference.num_examples}]; choose steps between "
            f"{math.ceil(reference.steps * (reference.batch_size / reference.num_examples) ** 2)} "
            f"and {math.floor(reference.steps * reference.batch_size ** 2)}."
        )
    lr = None
    if reference.learning_rate is not None:
        lr = reference.learning_rate * reference.steps / s
    return TanConfig(b, reference.noise_multiplier, s, reference.num_examples, lr)


class RegimeLevel(str, enum.Enum):
    """Severity of a σ regime; compares equal to its string value."""

    OK = "ok"
    WARNING = "warning"
    ERROR = "error"


@dataclasses.dataclass(frozen=True)
class Regime:
    """Where σ sits with respect to the TAN approximation ε ≈ ε_TAN."""

    level: RegimeLevel
    noise_multiplier: float
    message: str


class TanRegimeWarning(UserWarning):
    """σ is outside the range where ε ≈ ε_TAN (0.5 <= σ < 2)."""


class TanRegimeError(TanRegimeWarning):
    """σ < 0.5: past the privacy wall, the TAN scaling rule breaks.

    A *warning* category, not an exception: nothing is less private than
    the accountant says -- ε from ``accounting.epsilon`` is still exact --
    only the assumption ε ≈ ε_TAN (and so the TAN compute-saving recipe
    applied to this σ as a *target*) is invalid. Simulated runs legitimately
    use tiny σ. Turn it into an exception with
    ``warnings.simplefilter("error", TanRegimeError)``.
    """


def check_regime(noise_multiplier):
    """Classifies σ by how well ε ≈ ε_TAN holds (TAN §3.2, Figs. 2–3).

    * σ < 0.5 → ``"error"``: the "privacy wall" (TAN Fig. 2): the real ε is
      far above ε_TAN, and halving σ and B no longer keeps ε fixed.
    * 0.5 <= σ < 2 → ``"warning"``: ε is noticeably above ε_TAN; the per-step
      RDP cost exceeds ``α·η_step²`` (TAN Fig. 3).
    * σ >= 2 → ``"ok"``: ε ≈ ε_TAN; TAN recommends σ ∈ [2, 4] (TAN §3.4).
    """
    sigma = accounting._check_noise_multiplier(noise_multiplier)
    if sigma < WALL_NOISE_MULTIPLIER:
        return Regime(RegimeLevel.ERROR, sigma, (
            f"noise_multiplier={sigma:.4g} < {WALL_NOISE_MULTIPLIER}: past the privacy wall "
            "(TAN Fig. 2). ε is far above ε_TAN and the TAN scaling rule (same η ⇒ same ε) "
            "breaks. Fine for a non-private simulated run; for a private run use σ >= 2."
        ))
    if sigma < TAN_NOISE_MULTIPLIER:
        return Regime(RegimeLevel.WARNING, sigma, (
            f"noise_multiplier={sigma:.4g} < {TAN_NOISE_MULTIPLIER}: ε is no longer ≈ ε_TAN "
            "(TAN §3.2, Fig. 3); doubling σ and B would buy a much better ε at "
            "similar accuracy (TAN §3.4)."
        ))
    return Regime(RegimeLevel.OK, sigma, (
        f"noise_multiplier={sigma:.4g} >= {TAN_NOISE_MULTIPLIER}: ε ≈ ε_TAN (TAN Eq. 4)."
        + (" σ > 4: halving σ and B keeps ε and halves compute (TAN §3.4)."
           if sigma > 4 else "")
    ))


def warn_regime(noise_multiplier, stacklevel=2):
    """:func:`check_regime`, emitting a warning unless the level is ``"ok"``.

    ``"warning"`` → ``TanRegimeWarning``; ``"error"`` → ``TanRegimeError``,
    which is also a ``UserWarning`` (see its docstring for why it does not
    raise). Returns the :class:`Regime`.
    """
    regime = check_regime(noise_multiplier)
    if regime.level == RegimeLevel.ERROR:
        warnings.warn(regime.message, TanRegimeError, stacklevel=stacklevel)
    elif regime.level == RegimeLevel.WARNING:
        warnings.warn(regime.message, TanRegimeWarning, stacklevel=stacklevel)
    return regime


def report(config, delta, accountant="rdp", *,
           pld_discretization=accounting.DEFAULT_PLD_DISCRETIZATION):
    """ε (RDP and PLD) next to η and ε_TAN for a Poisson-sampled ``config``.

    Returns a dict with keys ``epsilon`` (from ``accountant``),
    ``epsilon_rdp``, ``epsilon_pld``, ``eta``, ``eta_step``, ``eps_tan``,
    ``regime`` (a :class:`Regime`), ``sampling_rate``, ``epochs``,
    ``examples_processed`` and ``delta``.
    """
    if not isinstance(config, TanConfig):
        raise ValueError(f"config must be a TanConfig, got {type(config).__name__}.")
    accounting._check_accountant(accountant)
    delta = accounting._check_delta(delta)
    eps = {
        acc: config.epsilon(delta, accountant=acc, pld_discretization=pld_discretization)
        for acc in accounting.ACCOUNTANTS
    }
    return {
        "epsilon": eps[accountant],
        "epsilon_rdp": eps["rdp"],
        "epsilon_pld": eps["pld"],
        "eta": config.eta,
        "eta_step": config.eta_step,
        "eps_tan": eps_tan(config.eta, delta),
        "regime": check_regime(config.noise_multiplier),
        "sampling_rate": config.sampling_rate,
        "epochs": config.epochs,
        "examples_processed": config.examples_processed,
        "delta": delta,
    }


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
    """``accuracy ≈ intercept + slope · ln(B)`` (TAN Fig. 4, §3.4)."""

    slope: float
    intercept: float
    r_squared: float

    @property
    def slope_per_doubling(self):
        """Accuracy change when B doubles: ``slope · ln 2``."""
        return self.slope * math.log(2.0)

    def predict(self, batch_size):
        """Predicted accuracy at ``batch_size`` (scalar or array)."""
        b = np.asarray(batch_size, dtype=float)
        if np.any(~(b > 0)):
            raise ValueError(f"batch_size must be > 0, got {batch_size!r}.")
        out = self.intercept + self.slope * np.log(b)
        return float(out) if out.ndim == 0 else out


def fit_scaling_law(batch_sizes, accuracies):
    """Least-squares fit of accuracy on ln(B) (TAN §3.4, Fig. 4).

    TAN predicts the accuracy of the expensive large-batch run from cheap
    simulated runs at constant η_step and S; on ImageNet it falls
    log-linearly in B, on CIFAR-10 it is roughly flat. ``r_squared`` is 1 when
    all accuracies are equal (a perfect flat fit).
    """
    b = np.asarray(batch_sizes, dtype=float).ravel()
    a = np.asarray(accuracies, dtype=float).ravel()
    if b.shape != a.shape:
        raise ValueError(
            f"batch_sizes and accuracies must have the same length, got {b.size} and {a.size}."
        )
    if b.size < 2:
        raise ValueError(f"batch_sizes needs at least 2 points to fit a line, got {b.size}.")
    if np.any(~(b > 0)) or not np.all(np.isfinite(b)):
        raise ValueError(f"batch_sizes must be finite and > 0, got {list(batch_sizes)!r}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"accuracies must be finite, got {list(accuracies)!r}.")
    x = np.log(b)
    if np.ptp(x) == 0:
        raise ValueError(
            f"batch_sizes must contain at least two distinct values, got {list(batch_sizes)!r}."
        )
    slope, intercept = np.polyfit(x, a, 1)
    resid = a - (intercept + slope * x)
    ss_tot = float(np.sum((a - a.mean()) ** 2))
    ss_res = float(np.sum(resid ** 2))
    r2 = 1.0 if ss_tot == 0 else 1.0 - ss_res / ss_tot
    return ScalingLaw(float(slope), float(intercept), r2)
