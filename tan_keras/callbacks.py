"""Callbacks: privacy budget, EMA of the weights, privacy-safe checkpoint and resume.

This is where sampling, the optimizer and accounting meet (STYLE §1):

* :class:`PrivacyBudget` keeps the run's :class:`~tan_keras.accounting.PrivacyLedger`,
  one DP event per logical step, with the sampler that actually fed ``fit``;
  it refuses a plan that would exceed ε, logs ε each epoch and stops before
  the step that would cross it.
* :class:`EMA` is TAN's exponential moving average of the weights with
  warm-up (facebookresearch/tan ``EMA_without_class.update``).
* :class:`PrivateCheckpoint` / :func:`save_checkpoint` / :func:`restore_checkpoint`
  save and restore, together, everything a run's future depends on: weights,
  optimizer state (with the noise RNG), the sampler's RNG state, EMA, and the
  ledger. A resumed run continues the ε count and redraws the same batches
  and noise as an uninterrupted run.
"""

import contextlib
import json
import math
import os
import shutil
import warnings

import keras
import numpy as np
from keras import ops

from tan_keras import accounting

__all__ = ["PrivacyBudget", "EMA", "PrivateCheckpoint", "save_checkpoint", "restore_checkpoint"]

_MAX_SEARCH_STEPS = 10**9


def _sampler_of(model, sampler=None):
    return sampler if sampler is not None else getattr(model, "_tan_sampler", None)


# ---------------------------------------------------------------------------
# Privacy budget
# ---------------------------------------------------------------------------


class PrivacyBudget(keras.callbacks.Callback):
    """Accounts every logical step, logs ``epsilon`` each epoch, and enforces ``target_epsilon``.

    Args:
      target_epsilon: the budget ε at ``delta``.
      delta: δ (TAN uses ≈ 1/N).
      noise_multiplier: σ; must equal the optimizer's.
      sampling_rate: q of the sampler feeding ``fit``; defaults to the
        sampler's (``sampler=`` or the one ``PoissonSampler.configure`` tagged
        the model with).
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

    ``num_microbatches``: with TF-Privacy-style microbatches the sensitivity
    is 2C, so the ledger records ``σ/2`` (``accounting.effective_noise_multiplier``).
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
        self.ledger = ledger if ledger is not None else accounting.PrivacyLedger()
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
            ledger = accounting.PrivacyLedger(self.ledger.records)
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
        self._sigma = self.noise_multiplier
        if getattr(optimizer, "num_microbatches", None) is not None:
            self._sigma = self.noise_multiplier / 2  # sensitivity 2C: see effective_noise_multiplier

        sampler = _sampler_of(model, self.sampler)
        self._batch_size = self._num_examples = None
        if sampler is None:
            if self.sampling != "shuffle":
                raise ValueError(
                    f"PrivacyBudget(sampling={self.sampling!r}) cannot check that fit is fed by a "
                    f"{self.sampling} sampler. Feed fit with tan_keras.sampling.PoissonSampler(...)"
                    ".dataset(x, y, steps_per_epoch=..., model=model) (or sampling.private_fit), or pass "
                    "sampler=. A plain fit(x, y, batch_size=B) walks through shuffled fixed batches: "
                    "account it with sampling='shuffle' (no amplification, much larger ε).")
            if self.sampling_rate is None:
                raise ValueError("Pass `sampling_rate` (q = B/N) to account a run without a sampler.")
            self._q = self.sampling_rate
            self._served = None
            return
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
        if sampler.sampling == "sampled_without_replacement":
            self._batch_size, self._num_examples = sampler.batch_size, sampler.num_examples
        self._sampler = sampler
        self._served = sampler.batches_served

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


# ---------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------


class EMA(keras.callbacks.Callback):
    """Exponential moving average of the trainable weights, with TAN's warm-up.

    At the t-th logical step (t = 1, 2, ...; one ``train_step``)::

        d_t = min(decay, (1 + t) / (10 + t))
        ema ← ema − (1 − d_t) (ema − θ)

    as facebookresearch/tan (``src/models/EMA_without_class.update``, called
    with the step count after incrementing it). The average starts from the
    weights at ``on_train_begin`` and lives on device (backend tensors). It
    is post-processing of the DP iterates, so it costs no privacy.

    Evaluate with the averaged weights with ``with ema.swapped(model):
    model.evaluate(...)``, or pass ``validation_data`` to log
    ``ema_val_<metric>`` (e.g. ``ema_val_loss``, ``ema_val_accuracy``) each
    epoch. ``ema.apply_to(model)`` copies the average into the model for
    good (e.g. before saving it). Non-trainable weights are not averaged.

    .. note:: On JAX, reading the weights each step syncs Keras's training
       state to the variables once per step.
    """

    def __init__(self, decay=0.999, validation_data=None, validation_batch_size=None):
        super().__init__()
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"`decay` must be in [0, 1), got {decay!r} (TAN searches 0.9 ... 0.99999).")
        self.decay = float(decay)
        self.validation_data = validation_data
        self.validation_batch_size = validation_batch_size
        self.updates = 0
        self.average = None  # list of backend tensors, aligned with model.trainable_variables

    def decay_at(self, t):
        """``min(decay, (1 + t) / (10 + t))``, the decay of the t-th update."""
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def on_train_begin(self, logs=None):
        if int(getattr(self.model, "steps_per_execution", 1) or 1) > 1:
            raise ValueError("EMA updates once per logical step and needs compile(steps_per_execution=1).")
        variables = self.model.trainable_variables
        if self.average is None:
            self.average = [ops.copy(v.value) for v in variables]
        elif [tuple(a.shape) for a in self.average] != [tuple(v.shape) for v in variables]:
            raise ValueError("The EMA state does not match the model's trainable weights.")

    def on_train_batch_end(self, batch, logs=None):
        self.updates += 1
        rate = 1.0 - self.decay_at(self.updates)
        variables = self.model.trainable_variables
        self.average = [a - ops.cast(rate, a.dtype) * (a - v.value) for a, v in zip(self.average, variables)]

    def on_epoch_end(self, epoch, logs=None):
        if self.validation_data is None or logs is None:
            return
        data = self.validation_data
        x, y, sample_weight = data if isinstance(data, tuple) and len(data) == 3 else (*data, None)
        with self.swapped(self.model):
            results = self.model.evaluate(x, y, sample_weight=sample_weight, batch_size=self.validation_batch_size,
                                          verbose=0, return_dict=True)
        skip = set(getattr(self.model, "_dp_metric_names", ()))  # training-only DP statistics
        logs.update({f"ema_val_{k}": v for k, v in results.items() if k not in skip})

    @contextlib.contextmanager
    def swapped(self, model):
        """Context in which ``model`` holds the EMA weights; its own are restored afterwards."""
        if self.average is None:
            raise ValueError("The EMA has no average yet: train with this callback first.")
        variables = model.trainable_variables
        saved = [ops.copy(v.value) for v in variables]
        for v, a in zip(variables, self.average):
            v.assign(ops.copy(a))  # a copy: JAX may donate (delete) the variables' buffers
        try:
            yield model
        finally:
            for v, s in zip(variables, saved):
                v.assign(s)

    def apply_to(self, model):
        """Copies the EMA weights into ``model``."""
        for v, a in zip(model.trainable_variables, self.average):
            v.assign(ops.copy(a))

    def get_state(self):
        return {"decay": self.decay, "updates": self.updates}, [np.asarray(a) for a in (self.average or [])]

    def set_state(self, state, arrays):
        if not math.isclose(state["decay"], self.decay):
            raise ValueError(f"The checkpointed EMA has decay {state['decay']}, this one {self.decay}.")
        self.updates = int(state["updates"])
        self.average = [ops.convert_to_tensor(a) for a in arrays] if arrays else None


# ---------------------------------------------------------------------------
# Checkpoint and resume
# ---------------------------------------------------------------------------

_SCHEMA = "tan_keras.checkpoint"
_LATEST = "latest"


def _arrays(variables):
    return {f"v{i:05d}": np.asarray(v.value) for i, v in enumerate(variables)}


def _load_into(variables, archive, what):
    values = [archive[f"v{i:05d}"] for i in range(len(archive.files))]
    if [tuple(v.shape) for v in variables] != [tuple(a.shape) for a in values]:
        raise ValueError(
            f"The checkpoint's {what} ({len(values)} arrays) do not match this model's "
            f"({len(variables)} variables): resume with the same model and optimizer.")
    for v, a in zip(variables, values):
        v.assign(a)


def save_checkpoint(directory, model, *, sampler=None, ema=None, budget=None, ledger=None, max_to_keep=2):
    """Saves everything a private run's future depends on, together, under ``directory``.

    Written to ``directory/ckpt-<step>/`` (``model.npz``: all model variables,
    including non-trainable and RNG states; ``optimizer.npz``: slots,
    iteration count and the DP noise RNG state; ``ema.npz``; ``state.json``:
    step, sampler state, EMA and budget state, ledger JSON), then
    ``directory/latest`` is switched to it atomically, so a crash mid-save
    leaves the previous checkpoint in force.

    The optimizer's ``iterations`` (the number of logical steps taken) and
    the sampler's seed and offset fix every future batch (the sampler draws
    step ``offset + iterations``). ``ledger`` defaults to ``budget.ledger``.

    .. warning:: The checkpoint holds the noise and sampler seeds: whoever
       reads it can strip the noise. Release only (EMA) weights.
    """
    sampler = _sampler_of(model, sampler)
    if ledger is None and budget is not None:
        ledger = budget.ledger
    optimizer = model.optimizer
    step = int(ops.convert_to_numpy(optimizer.iterations))
    name = f"ckpt-{int(step):010d}"
    final = os.path.join(directory, name)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    np.savez(os.path.join(tmp, "model.npz"), **_arrays(model.variables))
    np.savez(os.path.join(tmp, "optimizer.npz"), **_arrays(optimizer.variables))
    state = {
        "schema": _SCHEMA, "version": 1, "step": step,
        "backend": keras.backend.backend(),
        "sampler": None if sampler is None else sampler.get_state(),
        "ledger": None if ledger is None else ledger.to_json(),
        "budget": None if budget is None else {k: v for k, v in budget.get_state().items() if k != "ledger"},
        "ema": None,
    }
    if ema is not None:
        ema_state, ema_arrays = ema.get_state()
        state["ema"] = ema_state
        np.savez(os.path.join(tmp, "ema.npz"), **{f"v{i:05d}": a for i, a in enumerate(ema_arrays)})
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = os.path.join(directory, _LATEST)
    with open(pointer + ".tmp", "w") as f:
        f.write(name)
    os.replace(pointer + ".tmp", pointer)
    old = sorted(d for d in os.listdir(directory) if d.startswith("ckpt-") and not d.endswith(".tmp"))
    for d in old[:-max_to_keep] if max_to_keep else []:
        if d != name:
            shutil.rmtree(os.path.join(directory, d), ignore_errors=True)
    return final


def latest_checkpoint(directory):
    """Path of the checkpoint ``directory/latest`` points to, or None."""
    pointer = os.path.join(directory, _LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(directory, f.read().strip())


def restore_checkpoint(directory, model, *, sampler=None, ema=None, budget=None):
    """Restores :func:`save_checkpoint`'s state into ``model`` (compiled) and the given objects.

    Weights and optimizer state are assigned in place (the optimizer is built
    first if needed); the sampler's seed and next step are set; the EMA
    average and update count are restored; ``budget.ledger`` is replaced by the
    checkpoint's ledger, so ε continues from the saved count. Raises
    ValueError if a component saved in the checkpoint is not given here, or
    differs (sampler config, EMA decay, budget σ / δ / sampling). Returns the
    state dict (``state["step"]``: the logical steps taken).
    """
    path = latest_checkpoint(directory) if os.path.exists(os.path.join(directory, _LATEST)) else directory
    if path is None or not os.path.exists(os.path.join(path, "state.json")):
        raise ValueError(f"No tan_keras checkpoint in {directory!r}.")
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    if state.get("schema") != _SCHEMA:
        raise ValueError(f"{path!r} is not a tan_keras checkpoint.")
    sampler = _sampler_of(model, sampler)
    for what, saved, given in (("sampler", state["sampler"], sampler), ("ema", state["ema"], ema),
                               ("ledger", state["ledger"], budget)):
        if saved is not None and given is None:
            raise ValueError(
                f"The checkpoint holds the run's {what} state; pass the {'budget' if what == 'ledger' else what} "
                "to restore_checkpoint, or the resumed run would not continue the same privacy-accounted run.")
    optimizer = model.optimizer
    if optimizer is None:
        raise ValueError("Compile the model before restoring a checkpoint.")
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    with np.load(os.path.join(path, "model.npz")) as archive:
        _load_into(model.variables, archive, "model weights")
    with np.load(os.path.join(path, "optimizer.npz")) as archive:
        _load_into(optimizer.variables, archive, "optimizer state")
    if sampler is not None and state["sampler"] is not None:
        sampler.set_state(state["sampler"])
        sampler.configure(model)
    if ema is not None and state["ema"] is not None:
        with np.load(os.path.join(path, "ema.npz")) as archive:
            ema.set_state(state["ema"], [archive[f"v{i:05d}"] for i in range(len(archive.files))])
    if budget is not None and state["ledger"] is not None:
        saved = state["budget"] or {}
        for key in ("noise_multiplier", "delta", "sampling", "accountant", "target_epsilon"):
            if key in saved and saved[key] != getattr(budget, key):
                raise ValueError(f"The checkpointed run used {key}={saved[key]!r}; this budget has "
                                 f"{getattr(budget, key)!r}.")
        budget.ledger = accounting.PrivacyLedger.from_json(state["ledger"])
        budget._eps_cache = None
    return state


class PrivateCheckpoint(keras.callbacks.Callback):
    """Saves a :func:`save_checkpoint` every ``save_freq`` ("epoch", or every n logical steps).

    Pass the run's ``sampler`` (default: the one the model was configured
    with), ``ema`` and ``budget`` so they are saved with the weights. Resume
    with :func:`restore_checkpoint` and a new ``fit`` on
    ``sampler.dataset(...)``: it continues at the restored iteration count.

    A save due after step t happens once every callback has seen step t (at
    the next ``on_train_batch_begin``, or at the end of the epoch / run), so
    the position of this callback in the list does not matter.
    """

    def __init__(self, directory, *, sampler=None, ema=None, budget=None, save_freq="epoch", max_to_keep=2):
        super().__init__()
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1):
            raise ValueError(f"`save_freq` must be 'epoch' or a positive int, got {save_freq!r}.")
        self.directory = directory
        self.sampler, self.ema, self.budget = sampler, ema, budget
        self.save_freq = save_freq
        self.max_to_keep = max_to_keep
        self._done_in_epoch = 0
        self._steps = 0
        self._pending = False

    def _save(self):
        self._pending = False
        model = self.model  # on JAX this syncs the training state to the variables
        save_checkpoint(self.directory, model, sampler=_sampler_of(model, self.sampler), ema=self.ema, budget=self.budget,
                        max_to_keep=self.max_to_keep)

    def on_epoch_begin(self, epoch, logs=None):
        self._done_in_epoch = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self._pending:
            self._save()

    def on_train_batch_end(self, batch, logs=None):
        new = batch + 1 - self._done_in_epoch
        self._done_in_epoch = batch + 1
        if self.save_freq != "epoch":
            before, self._steps = self._steps, self._steps + new
            self._pending = self._pending or self._steps // self.save_freq > before // self.save_freq

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch" or self._pending:
            self._save()

    def on_train_end(self, logs=None):
        if self._pending:
            self._save()
