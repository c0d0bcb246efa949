"""TAN's exponential moving average of the weights, as a Keras callback.

:class:`EMA` follows facebookresearch/tan (``EMA_without_class.update``): an
average with warm-up, kept on device, evaluated with ``swapped``. It is
post-processing of the DP iterates, so it costs no privacy.
"""

import contextlib
import math

import keras
import numpy as np
from keras import ops

__all__ = ["EMA"]


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
