"""Augmentation multiplicity (AugMult): average K augmentations' gradients, then clip.

TAN App. C, Eq. 5 (after De et al. 2022)::

    w ← w − η ( (1/B) Σ_{i∈B} clip_C( (1/K) Σ_{j=1..K} ∇ℓ(f_w(aug_j(x_i)), y_i) ) + N(0, σ²C²/B²) )

Each example's gradient is the **mean over its K augmented views, taken
before clipping**, so one example still moves the sum by at most C: privacy
is unchanged, K multiplies compute (not B), and the noise is unchanged.

:class:`AugMultModel` gets this out of the unchanged per-example train step:

1. ``train_step`` draws the K views of every example of the batch on device
   (``keras.ops``; default: random crop with reflect padding 4 and horizontal
   flip, as facebookresearch/tan's CIFAR code), giving inputs of shape
   ``(n, K, H, W, C)``. Random parameters are drawn for the whole batch from
   the model's own ``SeedGenerator`` (part of its state, hence checkpointed),
   before the per-example ``vmap`` / ``vectorized_map``.
2. ``call`` on ``(n, K, ...)`` runs the wrapped model on the ``n·K`` views and
   returns ``(n, K, classes)``.
3. ``compute_loss`` repeats each label and sample weight K times and averages
   the loss over the ``n·K`` views. For the single example the per-example
   step differentiates, this loss is ``w_i · (1/K) Σ_j ℓ(f(aug_j(x_i)), y_i)``,
   whose gradient is exactly the mean of the K view gradients; the step then
   clips it. (Averaging the K *outputs* instead would not give this.)

Train metrics see the mean of the K views' outputs. ``evaluate`` / ``predict``
take ordinary ``(n, H, W, C)`` inputs and run the wrapped model once, without
augmentation.

.. warning:: ``physical_batch_size`` counts examples: a chunk of p examples
   runs the network on ``p·K`` images. Divide it by K to keep memory flat.
Clipping strategies. Both clip the *example* (the mean of its K views), never
a view:

* ghost (the default ``clipping="auto"`` when every layer has a ghost-norm rule
  that groups views): the inner network runs once on the ``n·K`` views, and
  the norms treat an example's K views as one example whose positions are the
  views' positions together (``∇W_i = Σ_j a_ijᵀ g_ij``,
  ``tan_keras.ghost.norms``); the example's clip factor scales the output
  gradients of all K views in book-keeping;
* vectorized: per-example gradients of the loss above (``vmap`` /
  ``vectorized_map`` over examples, each running its K views).

.. warning:: The inner network sees ``n·K`` rows, K per example. A
   per-example-norm shortcut that treats each row as an example would clip
   each *view*; ghost rules group rows by ``model.views_per_example``
   (``register_ghost_norm(..., views=True)``), and a model with a rule that
   does not falls back to the vectorized path.
"""

import numbers

import keras
from keras import ops

from tan_keras.private_model import PrivateTrainerMixin

__all__ = ["AugMultModel", "wrap", "random_crop_flip"]


def random_crop_flip(images, seed=None, padding=4):
    """Random ``padding``-pixel crop of the reflect-padded image, then a random horizontal flip.

    ``images``: ``(m, H, W, C)`` (channels last). Each image gets its own
    offsets and flip. The crop is a product with one-hot row / column
    selectors, which keeps it exact and free of dynamic shapes.
    """
    height, width = images.shape[1], images.shape[2]
    m = ops.shape(images)[0]
    padded = ops.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]], mode="reflect")
    offsets = keras.random.randint((m, 2), 0, 2 * padding + 1, seed=seed)
    rows = ops.one_hot(offsets[:, :1] + ops.arange(height)[None, :], height + 2 * padding, dtype=images.dtype)
    cols = ops.one_hot(offsets[:, 1:] + ops.arange(width)[None, :], width + 2 * padding, dtype=images.dtype)
    crops = ops.einsum("mhp,mpqc->mhqc", rows, padded)
    crops = ops.einsum("mwq,mhqc->mhwc", cols, crops)
    flip = keras.random.uniform((m,), seed=seed) < 0.5
    return ops.where(flip[:, None, None, None], ops.flip(crops, axis=2), crops)


def _crop_flip_views(padding):
    def augment(views, seed):
        shape = ops.shape(views)
        flat = ops.reshape(views, (-1,) + tuple(views.shape[2:]))
        return ops.reshape(random_crop_flip(flat, seed, padding), shape)

    return augment


@keras.saving.register_keras_serializable(package="tan_keras")
class AugMultModel(PrivateTrainerMixin, keras.Model):
    """Trains ``model`` with K augmentations per example averaged before clipping (TAN Eq. 5).

    Args:
      model: the network (a Keras model or layer taking one tensor of
        examples, e.g. images ``(n, H, W, C)``).
      k: K, the number of augmented views per example (``k=1`` is plain
        augmentation).
      augment: ``"crop_flip"`` (random crop, reflect padding ``padding``, and
        horizontal flip) or a function ``augment(views, seed) -> views`` on
        ``views`` of shape ``(n, K, *example_shape)`` that draws its
        randomness from the ``keras.random.SeedGenerator`` ``seed`` with
        ``keras.ops`` / ``keras.random``.
      padding: crop padding for ``"crop_flip"``.
      seed: int seed of the augmentations.
      physical_batch_size: examples per on-device chunk (each runs p·K views).
      clipping: ``"auto"`` (ghost clipping when every layer's rule groups the
        views, else vectorized), ``"ghost"`` or ``"vectorized"``, as
        ``make_private``.
    """

    def __init__(self, model, k, augment="crop_flip", padding=4, seed=None, physical_batch_size=None,
                 clipping="auto", **kwargs):
        # Not a subclass of PrivateModel: once PrivateModel(inputs, outputs) has been called, Keras
        # rewrites PrivateModel's bases to Functional for the whole process (inject_functional_model_class).
        super().__init__(**kwargs)
        self._init_private(physical_batch_size, clipping)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"`k` (augmentation multiplicity K) must be a positive int, got {k!r}.")
        if augment == "crop_flip":
            augment_fn = _crop_flip_views(padding)
        elif callable(augment):
            augment_fn = augment
        else:
            raise ValueError(f"`augment` must be 'crop_flip' or a callable(views, seed), got {augment!r}.")
        self.inner = model
        self.k = int(k)
        self.padding = padding
        self._augment_name = augment if isinstance(augment, str) else None
        self._augment_fn = augment_fn
        self.augment_seed = keras.random.SeedGenerator(seed, name="augmult_seed")
        inputs = getattr(model, "inputs", None)
        self._example_ndim = len(inputs[0].shape) - 1 if inputs else None
        if getattr(model, "built", False):
            self.built = True  # no weights of its own: built once the network is (tools can run before fit)

    @property
    def views_per_example(self):
        """K: consecutive rows of the inner network's batch that form one example."""
        return self.k

    # -- views ----------------------------------------------------------------------------------

    def _is_views(self, x):
        return self._example_ndim is not None and len(x.shape) == self._example_ndim + 2

    def call(self, x, training=None):
        if not self._is_views(x):
            return self.inner(x, training=training)
        flat = ops.reshape(x, (-1,) + tuple(x.shape[2:]))
        out = self.inner(flat, training=training)
        return ops.reshape(out, (-1, self.k) + tuple(out.shape[1:]))

    def augment_batch(self, x):
        """``(n, *example_shape)`` → the K augmented views, ``(n, K, *example_shape)``."""
        if self._example_ndim is None:
            self._example_ndim = len(x.shape) - 1
        views = ops.repeat(ops.expand_dims(x, 1), self.k, axis=1)
        return self._augment_fn(views, self.augment_seed)

    def _with_views(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        return keras.utils.pack_x_y_sample_weight(self.augment_batch(x), y, sample_weight)

    def train_step(self, *args):
        if len(args) == 1:  # TensorFlow (and torch): train_step(data)
            return super().train_step(self._with_views(args[0]))
        # JAX: train_step(state, data) is stateless; draw the views with the seed
        # generator's state taken from (and returned in) the non-trainable state.
        state, data = args
        trainable, non_trainable, optimizer_variables, metrics_variables = state
        with keras.StatelessScope(state_mapping=list(zip(self.non_trainable_variables, non_trainable))) as scope:
            data = self._with_views(data)
        non_trainable = [
            old if scope.get_current_value(ref) is None else scope.get_current_value(ref)
            for ref, old in zip(self.non_trainable_variables, non_trainable)
        ]
        return super().train_step((trainable, non_trainable, optimizer_variables, metrics_variables), data)

    # -- loss and metrics ----------------------------------------------------------------------

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Mean loss over the n·K views: per example, ``w_i · mean_j ℓ(f(aug_j x_i), y_i)``."""
        if x is not None and self._is_views(x):
            y_pred = ops.reshape(y_pred, (-1,) + tuple(y_pred.shape[2:]))
            y = None if y is None else ops.repeat(y, self.k, axis=0)
            if sample_weight is not None:
                sample_weight = ops.repeat(sample_weight, self.k, axis=0)
                if len(sample_weight.shape) == 1 and len(y_pred.shape) > 2:
                    # One weight per view, broadcast over the loss's other axes (a sequence output's
                    # (n·K, T) loss): Keras would broadcast a (n·K,) weight against its last axis.
                    sample_weight = ops.reshape(sample_weight, (-1,) + (1,) * (len(y_pred.shape) - 2))
        return super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Train metrics on the mean of the K views' outputs."""
        if self._is_views(x):
            y_pred = ops.mean(y_pred, axis=1)
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def get_config(self):
        if self._augment_name is None:
            raise NotImplementedError("An AugMultModel with a custom `augment` function cannot be serialized.")
        return {"model": keras.saving.serialize_keras_object(self.inner), "k": self.k,
                "augment": self._augment_name, "padding": self.padding,
                "physical_batch_size": self.physical_batch_size, "clipping": self.clipping, "name": self.name}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"], custom_objects=custom_objects)
        return cls(**config)


def wrap(model, k, augment="crop_flip", **kwargs):
    """``AugMultModel(model, k, augment, **kwargs)``: K augmentations averaged before clipping."""
    return AugMultModel(model, k, augment=augment, **kwargs)
