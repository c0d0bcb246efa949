"""Models whose ``fit`` computes clipped per-example gradients.

``PrivateModel`` / ``PrivateSequential`` / ``make_private(model)`` override
only ``train_step``. With one of tan_keras's private optimizers the step
computes per-example gradients in vectorized form (``tan_keras.per_example``:
``tf.vectorized_map`` on TensorFlow, ``jax.vmap(jax.grad)`` on JAX), clips and
sums them, and hands the sum to ``optimizer.apply_private``, which adds the
noise once and runs the Keras update. With any other optimizer the step is
Keras's own, so the same model trains exactly as Keras would.

``physical_batch_size`` bounds memory: the batch is processed in chunks of
that many examples inside the compiled step (``lax.scan`` / ``tf.while_loop``),
the clipped sums are accumulated, and noise is added once.
"""

import keras

from tan_keras import optimizers as dp_optimizers
from tan_keras import per_example
from tan_keras.layer_checks import check_private_layers  # noqa: F401 (public: tan_keras.check_private_layers)

#: ``"auto"`` (the default): ghost clipping (book-keeping) when every trainable
#: layer has a ghost-norm rule (for an AugMult wrapper: one that groups the K
#: views of an example), else vectorized, with the reason logged once (INFO).
#: ``"vectorized"``: per-example gradients (vmap / vectorized_map), any layer.
#: ``"ghost"``: per-example norms from layer inputs and output gradients
#: (``tan_keras.ghost``), then the book-keeping clipped sum; models with
#: a layer the registry does not cover fall back to ``"vectorized"`` with a
#: logged warning.
CLIPPING_MODES = ("auto", "vectorized", "ghost")


class PrivateTrainerMixin:
    """Overrides ``compile`` (checks) and ``train_step`` (per-example clipping)."""

    #: Per step: the fraction of clipped examples, their mean gradient norm, the number of examples
    #: whose gradient was not finite (dropped: they contribute 0, see ``clipping.clip_factors``),
    #: and the norms of the summed signal and of the noise (both divided by B).
    #: ``nonfinite_updates``: steps whose weights or noise were not finite (the JAX step then skips
    #: the update and ``fit`` raises at the end of the epoch; TensorFlow raises in the step).
    _dp_metric_names = ("clip_fraction", "per_example_norm", "nonfinite_examples", "signal_norm", "noise_norm",
                        "nonfinite_updates")

    def _init_private(self, physical_batch_size=None, clipping="auto"):
        if clipping not in CLIPPING_MODES:
            raise ValueError(f"`clipping` must be one of {CLIPPING_MODES}, got {clipping!r}.")
        self.clipping = clipping
        if physical_batch_size is not None and (
            isinstance(physical_batch_size, bool) or not isinstance(physical_batch_size, int) or physical_batch_size < 1
        ):
            raise ValueError(f"`physical_batch_size` must be a positive int or None, got {physical_batch_size!r}.")
        self.physical_batch_size = physical_batch_size

    def compile(self, optimizer="rmsprop", *args, **kwargs):
        super().compile(optimizer, *args, **kwargs)
        if dp_optimizers.is_private_optimizer(self.optimizer):
            if self.optimizer.requires_per_example:
                check_private_layers(self)
            if not hasattr(self, "_dp_trackers"):
                # Means over the epoch, shown in the progress bar and History.
                # Set with object.__setattr__: Keras's state tracking is locked once the
                # model is built; ``metrics`` below lists these trackers explicitly.
                object.__setattr__(self, "_dp_trackers", [keras.metrics.Mean(name=n) for n in self._dp_metric_names])

    def compile_from_config(self, config):
        # Keras skips compile-on-load for models that override compile(); ours
        # only adds checks, so re-run it (as keras.Model does) when loading.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    @property
    def uses_ghost_clipping(self):
        """Whether the step tries ghost clipping (it still falls back per model, see ``tan_keras.ghost.ghost_plan``)."""
        # AugMult (``views_per_example`` K > 1) included: its norms group each example's K views.
        return getattr(self, "clipping", "auto") != "vectorized"

    @property
    def is_private(self):
        return dp_optimizers.is_private_optimizer(getattr(self, "optimizer", None))

    def train_step(self, *args):
        if not self.is_private:
            return super().train_step(*args)
        return per_example.private_train_step(self, *args)

    def _dp_metrics(self):
        return list(getattr(self, "_dp_trackers", []))

    @property
    def metrics(self):
        return super().metrics + self._dp_metrics()

    def evaluate(self, *args, **kwargs):
        # The DP statistics describe training steps; evaluation (and fit's
        # validation, which calls evaluate) reports only the model's metrics.
        object.__setattr__(self, "_dp_evaluating", True)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            object.__setattr__(self, "_dp_evaluating", False)

    def get_metrics_result(self):
        result = super().get_metrics_result()
        if getattr(self, "_dp_evaluating", False):
            for name in self._dp_metric_names:
                result.pop(name, None)
        return result

    @classmethod
    def from_config(cls, config, custom_objects=None):
        physical_batch_size = config.pop("physical_batch_size", None)
        clipping = config.pop("clipping", "auto")
        model = super().from_config(config, custom_objects=custom_objects)
        model._init_private(physical_batch_size, clipping)
        return model

    def get_config(self):
        config = super().get_config()
        config["physical_batch_size"] = self.physical_batch_size
        config["clipping"] = self.clipping
        return config

    def fit(self, *args, **kwargs):
        """Keras's ``fit``; first notes the batch size B and examples N it will batch.

        Keras tells callbacks only ``steps`` and ``epochs``, so
        ``tan_keras.callbacks.PrivacyBudget`` reads ``_tan_fit_feed``: ``(B, N)``
        for array inputs, as Keras batches them (B defaults to 32, or
        ``ceil(N/steps_per_epoch)``; N leaves out ``validation_split``), None
        for a dataset, generator or PyDataset.
        """
        import inspect

        bound = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs)
        given = bound.arguments
        leaves = keras.tree.flatten(given.get("x"))
        feed = None
        if leaves and all(len(getattr(a, "shape", ())) > 0 for a in leaves):
            n = int(leaves[0].shape[0])
            if given.get("validation_split") and given.get("validation_data") is None:
                n = int(n * (1.0 - given["validation_split"]))
            steps = given.get("steps_per_epoch")
            b = given.get("batch_size") or (-(-n // steps) if steps else 32)
            feed = (min(int(b), n), n) if n > 0 else None
        object.__setattr__(self, "_tan_fit_feed", feed)
        if self.is_private:
            given["callbacks"] = list(given.get("callbacks") or []) + [_StopOnNonFiniteUpdate()]
        return super().fit(*bound.args[1:], **bound.kwargs)


class _StopOnNonFiniteUpdate(keras.callbacks.Callback):
    """Raises at the end of an epoch that had a non-finite update (weights or noise), naming the causes.

    Only ``on_epoch_end``: a per-batch check would make Keras wait for every step.
    """

    def on_epoch_end(self, epoch, logs=None):
        if (logs or {}).get("nonfinite_updates", 0) > 0:
            from tan_keras import clipping

            raise FloatingPointError(clipping.NONFINITE_STEP_MESSAGE)


@keras.saving.register_keras_serializable(package="tan_keras")
class PrivateModel(PrivateTrainerMixin, keras.Model):
    """A ``keras.Model`` (functional or subclassed) that trains with DP-SGD.

    Functional: ``PrivateModel(inputs, outputs, physical_batch_size=256)``.
    Subclassed: ``class MyNet(tan_keras.PrivateModel): ...``.
    """

    def __init__(self, *args, physical_batch_size=None, clipping="auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_private(physical_batch_size, clipping)



@keras.saving.register_keras_serializable(package="tan_keras")
class PrivateSequential(PrivateTrainerMixin, keras.Sequential):
    """A ``keras.Sequential`` that trains with DP-SGD under a private optimizer."""

    def __init__(self, layers=None, *args, physical_batch_size=None, clipping="auto", **kwargs):
        super().__init__(layers, *args, **kwargs)
        self._init_private(physical_batch_size, clipping)



def make_private(model, physical_batch_size=None, clipping="auto"):
    """Returns a private-trainable version of ``model``, sharing its layers and weights.

    * ``keras.Sequential`` → ``PrivateSequential`` over the same layers.
    * functional ``keras.Model`` → ``PrivateModel(model.inputs, model.outputs)``.
    * subclassed model → the same object, its class swapped in place for a
      subclass that adds the private ``train_step`` (to save and reload such a
      model, subclass ``tan_keras.PrivateModel`` directly instead).

    A compiled ``model`` gives a private model compiled with the same
    arguments (the same optimizer object, loss and metrics).

    Raises ValueError for layers that mix examples (BatchNormalization).
    """
    if isinstance(model, PrivateTrainerMixin):
        model._init_private(physical_batch_size or model.physical_batch_size, clipping)
        return model
    if not isinstance(model, keras.Model):
        raise TypeError(f"make_private expects a keras.Model, got {type(model).__name__}.")
    check_private_layers(model)
    if isinstance(model, keras.Sequential):
        layers = list(model.layers)
        if model.built and getattr(model, "inputs", None):
            spec = model.inputs[0]
            layers = [keras.Input(batch_shape=spec.shape, dtype=spec.dtype)] + layers
        private = PrivateSequential(layers, name=model.name, physical_batch_size=physical_batch_size,
                                    clipping=clipping)
    elif getattr(model, "_is_graph_network", False) or hasattr(model, "_nodes_by_depth"):
        private = PrivateModel(model.inputs, model.outputs, name=model.name,
                               physical_batch_size=physical_batch_size, clipping=clipping)
    else:
        cls = type(model)
        # ``_private_base`` lets class-keyed registries (ghost-norm rules) see the user's class.
        model.__class__ = type(f"Private{cls.__name__}", (PrivateTrainerMixin, cls), {"_private_base": cls})
        model._init_private(physical_batch_size, clipping)
        if getattr(model, "compiled", False):
            model.compile(**model._compile_config.config)  # re-run: the private checks and DP metrics
        return model
    if getattr(model, "compiled", False):
        # Keep the user's compile (same optimizer object, loss and metrics) on the private copy.
        private.compile(**model._compile_config.config)
    return private
