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

import warnings

import keras

from tan_keras import optimizers as dp_optimizers
from tan_keras import per_example

#: Layers that mix information across the examples of a batch. Their per-example
#: "gradients" depend on the other examples, so clipping bounds nothing.
_EXAMPLE_MIXING_LAYERS = (keras.layers.BatchNormalization,)

#: ``"vectorized"``: per-example gradients (vmap / vectorized_map), any layer.
#: ``"ghost"``: per-example norms from layer inputs and output gradients
#: (``tan_keras.ghost_norms``), then a reweighted backward pass; models with a
#: layer the registry does not cover fall back to ``"vectorized"``.
CLIPPING_MODES = ("vectorized", "ghost")


def check_private_layers(model):
    """Raises ValueError if ``model`` holds a layer that mixes examples."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, _EXAMPLE_MIXING_LAYERS) or getattr(layer, "mixes_examples", False):
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) mixes information across the "
                "examples of a batch, so per-example gradient clipping cannot bound any one "
                "example's influence and DP-SGD would not be private. Replace it with "
                "keras.layers.GroupNormalization (or LayerNormalization), or remove it."
            )


class PrivateTrainerMixin:
    """Overrides ``compile`` (checks) and ``train_step`` (per-example clipping)."""

    _dp_metric_names = ("clip_fraction", "per_example_norm", "signal_norm", "noise_norm")

    def _init_private(self, physical_batch_size=None, clipping="vectorized"):
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
        if getattr(self, "clipping", "vectorized") != "ghost":
            return False
        if getattr(self, "views_per_example", 1) > 1:
            # AugMult: the inner model sees n·K rows; a view is not a unit of privacy.
            warnings.warn("Ghost clipping does not group AugMult views; using vectorized per-example "
                          "gradients, which average the K views before clipping.", stacklevel=2)
            return False
        return True

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
        clipping = config.pop("clipping", "vectorized")
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

        given = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs).arguments
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
        return super().fit(*args, **kwargs)


@keras.saving.register_keras_serializable(package="tan_keras")
class PrivateModel(PrivateTrainerMixin, keras.Model):
    """A ``keras.Model`` (functional or subclassed) that trains with DP-SGD.

    Functional: ``PrivateModel(inputs, outputs, physical_batch_size=256)``.
    Subclassed: ``class MyNet(tan_keras.PrivateModel): ...``.
    """

    def __init__(self, *args, physical_batch_size=None, clipping="vectorized", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_private(physical_batch_size, clipping)



@keras.saving.register_keras_serializable(package="tan_keras")
class PrivateSequential(PrivateTrainerMixin, keras.Sequential):
    """A ``keras.Sequential`` that trains with DP-SGD under a private optimizer."""

    def __init__(self, layers=None, *args, physical_batch_size=None, clipping="vectorized", **kwargs):
        super().__init__(layers, *args, **kwargs)
        self._init_private(physical_batch_size, clipping)



def make_private(model, physical_batch_size=None, clipping="vectorized"):
    """Returns a private-trainable version of ``model``, sharing its layers and weights.

    * ``keras.Sequential`` → ``PrivateSequential`` over the same layers.
    * functional ``keras.Model`` → ``PrivateModel(model.inputs, model.outputs)``.
    * subclassed model → the same object, its class swapped in place for a
      subclass that adds the private ``train_step`` (to save and reload such a
      model, subclass ``tan_keras.PrivateModel`` directly instead).

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
        model.__class__ = type(f"Private{cls.__name__}", (PrivateTrainerMixin, cls), {})
        model._init_private(physical_batch_size, clipping)
        return model
    return private
