"""Privacy-safe checkpoint and resume of a private run.

:class:`PrivateCheckpoint` / :func:`save_checkpoint` / :func:`restore_checkpoint`
save and restore, together, everything a run's future depends on: weights,
optimizer state (with the noise RNG), the sampler's RNG state, the EMA, and the
budget's ledger. A resumed run continues the ε count and redraws the same
batches and noise as an uninterrupted run.
"""

import contextlib
import json
import os
import shutil

import keras
import numpy as np
from keras import ops

from tan_keras.callbacks.budget import _sampler_of
from tan_keras.ledger import PrivacyLedger

__all__ = ["PrivateCheckpoint", "save_checkpoint", "latest_checkpoint", "restore_checkpoint"]

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
        # Under tf.distribute the optimizer's variables must be created in the model's strategy scope.
        strategy = getattr(model, "distribute_strategy", None)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
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
        budget.ledger = PrivacyLedger.from_json(state["ledger"])
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
