"""The privacy budget callback: one ledger event per logical step, ε logged, the budget enforced.

:class:`PrivacyBudget` is where sampling, the optimizer and accounting meet
(STYLE §1): it keeps the run's :class:`~tan_keras.ledger.PrivacyLedger`, one
DP event per logical step, with the sampler that actually fed ``fit``; it
refuses a plan that would exceed ε, logs ε each epoch and stops before the
step that would cross it.
"""

import math
import warnings

import keras

from tan_keras import accounting
from tan_keras.ledger import LedgerRecord, PrivacyLedger

__all__ = ["PrivacyBudget"]

_MAX_SEARCH_STEPS = 10**9


def _sampler_of(model, sampler=None):
    return sampler if sampler is not None else getattr(model, "_tan_sampler", None)


class PrivacyBudget(keras.callbacks.Callback):
    """Accounts every logical step, logs ``epsilon`` each epoch, and enforces ``target_epsilon``.

    Args:
      target_epsilon: the budget ε at ``delta``.
      delta: δ (TAN uses ≈ 1/N).
      noise_multiplier: σ; must equal the optimizer's.
      sampling_rate: q of the data feeding ``fit``, optional: the budget reads
        it from the sampler (``sampler=`` or the one ``PoissonSampler.configure``
        tagged the model with), or, for a plain ``fit(x, y, batch_size=B)``,
        as ``B/N`` from what ``fit`` batches. A ``sampling_rate`` that differs
        from what the budget sees is refused (ValueError).
      sampling: how batches are drawn (``accounting.SAMPLING_METHODS``). For
        ``"poisson"`` and ``"sampled_without_replacement"`` the run must be fed
        by a ``tan_keras.sampling.PoissonSampler`` of that kind: a plain
        ``fit(x, y, batch_size=B)`` walks through shuffled fixed batches and
        may only be accounted as ``"shuffle"`` (no amplification).
      accountant: ``"rdp"`` (the paper's) or ``"pld"``.
      ledger: a ``PrivacyLedger`` to continue (e.g. restored from a
        checkpoint); a new one by default. It is ``self.ledger``.
      sampler: the ``PoissonSampler`` feeding ``fit`` (optional if the model was
        configured with it).
      over_budget: ``"refuse"`` (default): ``on_train_begin`` raises ValueError
        if the planned ``params["steps"] × epochs`` steps would exceed the
        budget, giving the largest number of steps allowed. ``"stop"``: start
        anyway and stop after the last step whose ε is within budget. Either
        way, a run of unknown length stops there.

    Each logical step (one ``train_step``: one noise draw) is recorded as one
    event. ``model.stop_training`` is set after step t when ε(t+1) would exceed
    the target, so the last step taken is the last one within budget.

    A plain ``fit(x, y, batch_size=B)`` (only ``sampling="shuffle"``) is
    accounted with the B and N that ``fit`` batches (``N`` after
    ``validation_split``): epochs of ``ceil(N/B)`` steps, one un-amplified
    Gaussian each. Its input must be arrays on a tan_keras private model
    (``PrivateTrainerMixin.fit`` notes B and N; Keras tells callbacks only
    ``steps`` and ``epochs``); a dataset or generator without a sampler is
    refused, since its B and N cannot be seen, and so is a new ``fit`` after
    one that stopped mid-epoch (it would start a pass the ledger does not
    charge). Arrays fed to a model configured with a sampler are refused
    before the first step.

    ``num_microbatches``: with TF-Privacy-style microbatches of more than one
    example the sensitivity is 2C, so the ledger records ``σ/2``; with one
    example per microbatch (m = B) it records σ
    (``accounting.effective_noise_multiplier``).
    """

    def __init__(self, target_epsilon, delta, noise_multiplier, sampling_rate=None, sampling="poisson",
                 accountant="rdp", ledger=None, *, sampler=None, over_budget="refuse"):
        super().__init__()
        if sampling not in accounting.SAMPLING_METHODS:
            raise ValueError(f"`sampling` must be one of {accounting.SAMPLING_METHODS}, got {sampling!r}.")
        if accountant not in accounting.ACCOUNTANTS:
            raise ValueError(f"`accountant` must be one of {accounting.ACCOUNTANTS}, got {accountant!r}.")
        if over_budget not in ("refuse", "stop"):
            raise ValueError(f"`over_budget` must be 'refuse' or 'stop', got {over_budget!r}.")
        self.target_epsilon = accounting._check_epsilon(target_epsilon, "target_epsilon")
        self.delta = accounting._check_delta(delta)
        self.noise_multiplier = accounting._check_noise_multiplier(noise_multiplier)
        self.sampling_rate = None if sampling_rate is None else accounting._check_sampling_rate(sampling_rate)
        self.sampling = sampling
        self.accountant = accountant
        self.ledger = ledger if ledger is not None else PrivacyLedger()
        self.sampler = sampler
        self.over_budget = over_budget
        self.max_steps = None  # total ledger steps allowed, set in on_train_begin
        self._eps_cache = None  # {total steps: ε} during a fit

    # -- the event of one step ------------------------------------------------------------------

    def _event_kwargs(self):
        kwargs = {"sampling": self.sampling}
        if self._batch_size is not None:
            kwargs.update(batch_size=self._batch_size, num_examples=self._num_examples)
        return kwargs

    def _epsilon_after(self, extra_steps):
        """ε of the ledger plus ``extra_steps`` more steps of this run's mechanism.

        Cached by total step count: within one ``fit`` the ledger only grows by
        steps of that same mechanism, so the total determines ε.
        """
        key = self.ledger.steps + extra_steps
        if key not in self._eps_cache:
            ledger = PrivacyLedger(self.ledger.records)
            if extra_steps:
                ledger.record(self._sigma, self._q, extra_steps, **self._event_kwargs())
            self._eps_cache[key] = ledger.epsilon(self.delta, self.accountant)
        return self._eps_cache[key]

    def _max_extra_steps(self, planned):
        """Largest s with ε(ledger + s steps) <= target (``planned`` if that fits); None: unlimited."""
        ok = lambda s: self._epsilon_after(s) <= self.target_epsilon  # noqa: E731
        if planned is not None:
            if ok(planned):
                return planned
            lo, hi = 0, planned
        else:
            lo, hi = 0, 1
            while ok(hi):
                if hi >= _MAX_SEARCH_STEPS:
                    return None  # never limited by privacy
                lo, hi = hi, min(2 * hi, _MAX_SEARCH_STEPS)
        while hi - lo > 1:  # ε is non-decreasing in steps; ok(lo) (or lo = 0), not ok(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo

    # -- checks ---------------------------------------------------------------------------------

    def _check_run(self):
        model = self.model
        optimizer = model.optimizer
        sigma = getattr(optimizer, "noise_multiplier", None)
        if sigma is None:
            raise ValueError(
                f"PrivacyBudget needs a tan_keras private optimizer (DPSGD, DPAdam), got "
                f"{type(optimizer).__name__}: nothing would bound any example's influence.")
        if not math.isclose(sigma, self.noise_multiplier, rel_tol=1e-9):
            raise ValueError(
                f"The optimizer's noise_multiplier is {sigma}, but PrivacyBudget accounts "
                f"noise_multiplier={self.noise_multiplier}; they must be the same σ.")
        if not getattr(optimizer, "requires_per_example", True):
            warnings.warn("NoisySGD does not clip gradients: the ε this callback reports is not a "
                          "differential-privacy guarantee for this run.", stacklevel=3)
        sampler = _sampler_of(model, self.sampler)
        self._batch_size = self._num_examples = None
        if sampler is None:
            self._check_fit_feed(model)
        else:
            self._check_sampler(model, sampler)
        num_microbatches = getattr(optimizer, "num_microbatches", None)
        self._sigma = self.noise_multiplier
        if num_microbatches is not None:
            # σ/2 when a microbatch holds more than one example (sensitivity 2C), σ when m = B.
            self._sigma = accounting.effective_noise_multiplier(self.noise_multiplier, num_microbatches,
                                                                self._batch_size)
        if sampler is None:
            self._check_epoch_continues()

    def _check_fit_feed(self, model):
        """A fit without a sampler: B and N are what ``fit`` batches (``PrivateTrainerMixin.fit`` notes them)."""
        if self.sampling != "shuffle":
            raise ValueError(
                f"PrivacyBudget(sampling={self.sampling!r}) cannot check that fit is fed by a "
                f"{self.sampling} sampler. Feed fit with tan_keras.sampling.PoissonSampler(...)"
                ".dataset(x, y, steps_per_epoch=..., model=model) (or sampling.private_fit), or pass "
                "sampler=. A plain fit(x, y, batch_size=B) walks through shuffled fixed batches: "
                "account it with sampling='shuffle' (no amplification, much larger ε).")
        feed = getattr(model, "_tan_fit_feed", None)
        if feed is None:
            raise ValueError(
                "PrivacyBudget(sampling='shuffle') cannot see the batch size B and the number of examples N "
                "that this fit walks through (its input is a dataset, a generator or a PyDataset, or the "
                "model is not a tan_keras private model), so it cannot know the ε of an epoch. Feed fit "
                "with arrays, fit(x, y, batch_size=B), on a tan_keras.PrivateModel / make_private(model), "
                "or with tan_keras.sampling.PoissonSampler(N, batch_size=B, sampling='shuffle')"
                ".dataset(x, y, steps_per_epoch=..., model=model).")
        b, n = feed
        if self.sampling_rate is not None and not math.isclose(self.sampling_rate, b / n, rel_tol=1e-9):
            raise ValueError(
                f"PrivacyBudget accounts sampling_rate={self.sampling_rate}, but fit walks through batches "
                f"of B={b} from N={n} examples: q = B/N = {b / n:.6g}. Leave sampling_rate unset (the "
                "budget reads B and N from fit) or pass q = B/N.")
        self._q = b / n
        self._batch_size, self._num_examples = b, n
        self._served = None

    def _check_sampler(self, model, sampler):
        if getattr(model, "_tan_fit_feed", None) is not None:  # seen before any step; datasets are checked after one
            raise RuntimeError(
                "PrivacyBudget: this fit's batches did not come from the sampler the budget accounts (fit was "
                "given arrays, which it batches itself). Feed fit with sampler.dataset(...).")
        if sampler.sampling != self.sampling:
            raise ValueError(
                f"fit is fed by a sampler with sampling={sampler.sampling!r}, but PrivacyBudget accounts "
                f"sampling={self.sampling!r}. The ledger must record the sampler that ran.")
        if self.sampling_rate is not None and not math.isclose(self.sampling_rate, sampler.sampling_rate,
                                                               rel_tol=1e-9):
            raise ValueError(
                f"PrivacyBudget accounts sampling_rate={self.sampling_rate}, but the sampler draws with "
                f"q={sampler.sampling_rate}.")
        sampler.check(model)  # expected_batch_size = qN, per-example clipping, chunk sizes
        self._q = sampler.sampling_rate
        if sampler.sampling != "poisson":  # fixed batches of B: account with the integers B and N
            self._batch_size, self._num_examples = sampler.batch_size, sampler.num_examples
        self._sampler = sampler
        self._served = sampler.batches_served

    def _check_epoch_continues(self):
        """Refuses a plain fit that would restart an epoch the ledger counts as still running.

        The ledger merges consecutive steps of one mechanism and charges
        ``ceil(S / ceil(N/B))`` shuffle epochs; a new ``fit(x, y)`` starts a new
        pass over the data, so after a fit that stopped mid-epoch the merged
        count would miss one epoch.
        """
        records = self.ledger.records
        if not records:
            return
        last, per_epoch = records[-1], -(-self._num_examples // self._batch_size)
        this = LedgerRecord(self._sigma, self._q, 1, **self._event_kwargs())
        if last.same_mechanism(this) and last.steps % per_epoch:
            raise ValueError(
                f"The ledger ends {last.steps % per_epoch} steps into an epoch of {per_epoch} steps "
                f"(B={self._batch_size}, N={self._num_examples}), and a new fit(x, y) starts a new pass over "
                "the data, which the 'shuffle' count (one Gaussian per started epoch) would not charge. Run "
                "whole epochs in each fit (no steps_per_epoch, or steps_per_epoch × epochs a multiple of "
                f"{per_epoch}), or feed fit with tan_keras.sampling.PoissonSampler(..., sampling='shuffle')"
                ".dataset(...), whose epochs follow the step count across fits.")

    # -- Keras hooks ----------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._eps_cache = {}
        self._check_run()
        steps, epochs = self.params.get("steps"), self.params.get("epochs")
        planned = steps * epochs if steps and epochs else None
        extra = self._max_extra_steps(planned)
        spent = self.ledger.steps
        if extra == 0:
            raise ValueError(
                f"The privacy budget ε={self.target_epsilon} (δ={self.delta}) is spent: the ledger holds "
                f"{spent} steps at ε={self._epsilon_after(0):.4g}, and one more step would give "
                f"ε={self._epsilon_after(1):.4g}.")
        if planned is not None and extra < planned and self.over_budget == "refuse":
            raise ValueError(
                f"This run plans {planned} steps ({steps} per epoch × {epochs} epochs), which would reach "
                f"ε={self._epsilon_after(planned):.4g} > target_epsilon={self.target_epsilon} (δ={self.delta}, "
                f"σ={self._sigma}, q={self._q}, sampling={self.sampling!r}, {spent} steps already spent). "
                f"At most {extra} more steps fit the budget ({spent + extra} in total): lower the number of "
                "epochs or steps, or pass over_budget='stop' to stop there.")
        self.max_steps = None if extra is None else spent + extra
        self._steps_per_call = int(getattr(self.model, "steps_per_execution", 1) or 1)
        self._done_in_epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._done_in_epoch = 0

    def on_train_batch_end(self, batch, logs=None):
        new = batch + 1 - self._done_in_epoch
        if new <= 0:
            return
        if self._served is not None:
            if self._sampler.batches_served == self._served:
                raise RuntimeError(
                    "PrivacyBudget: this step's batch did not come from the sampler the budget accounts "
                    "(fit was given other data). Feed fit with sampler.dataset(...).")
            self._served = None  # checked once per run
        self._done_in_epoch = batch + 1
        self.ledger.record(self._sigma, self._q, new, **self._event_kwargs())
        if self.max_steps is not None and self.ledger.steps + self._steps_per_call > self.max_steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epsilon"] = self.epsilon()

    def on_train_end(self, logs=None):
        self._eps_cache = None

    def epsilon(self):
        """ε of every step recorded so far, at ``delta``."""
        if self._eps_cache is not None and hasattr(self, "_q"):
            return self._epsilon_after(0)
        return self.ledger.epsilon(self.delta, self.accountant)

    def get_state(self):
        return {"ledger": self.ledger.to_json(), "target_epsilon": self.target_epsilon, "delta": self.delta,
                "noise_multiplier": self.noise_multiplier, "sampling": self.sampling,
                "accountant": self.accountant}
