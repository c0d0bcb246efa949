"""DP-SGD, DP-Adam and Noisy-SGD as Keras 3 optimizers.

Each optimizer *privatizes* the gradient and then runs Keras's own update step
(``SGD.update_step`` / ``Adam.update_step``), as optax chains
``differentially_private_aggregate`` with ``sgd``.

* DP-SGD (TAN Eq. 2)::

      g = (1/B) (Σ_i clip_C(∇ℓ_i) + N(0, σ²C² I))

* Noisy-SGD (Implicit-bias paper, Eq. 11): DP-SGD without clipping::

      g = (1/B) Σ_i ∇ℓ_i + N(0, σ²/B² I)

``B`` is the *expected* (logical) batch size: with Poisson sampling the drawn
batch varies in size but we always divide by ``B = qN`` so the sensitivity of
the normalised sum stays C/B. When ``expected_batch_size`` is left ``None`` the
batch's own size is used, which is right for fixed-size batches only.

The clipped sum is computed by ``tan_keras.PrivateModel``'s train step; the
optimizer receives it through ``apply_private``. A DP optimizer compiled into a
plain ``keras.Model`` raises, because it would only ever see the mean gradient
and could not bound any example's influence.

Noise seed: ``seed=None`` (the default) seeds the noise from the operating
system's entropy, never from Keras's / Python's / numpy's global seed, so
``keras.utils.set_random_seed(0)`` does not make the noise predictable; an
int ``seed`` makes it reproducible. Either way the RNG state is an optimizer
variable (saved in checkpoints, so a resumed run continues the same noise).
``secure_noise=True`` refuses a seed and XORs every noise seed with a key
held only in memory, so a checkpoint does not determine the noise and a
resumed run draws fresh noise.
"""

import math
import numbers
import secrets

import keras
import numpy as np
from keras import ops


def _is_real(value):
    """A real number (Python or numpy scalar such as ``np.float32(1.0)``), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_int(value):
    """An integer (Python or numpy scalar such as ``np.int64(4)``), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_positive(name, value, allow_inf=False):
    if not _is_real(value):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    value = float(value)
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(
            f"`{name}` must be {'> 0' if allow_inf else 'a finite number > 0'}, got {value!r}."
        )
    return value


def _os_entropy_seed():
    """A seed in [1, 2³¹ − 1) from the operating system's CSPRNG (``secrets``).

    Never derived from Python's ``random``, numpy's or Keras's global seed, so
    ``keras.utils.set_random_seed(0)`` in two processes still gives two
    different noise streams. The bound keeps it valid as a TensorFlow int32
    and a JAX uint32 seed word.
    """
    return 1 + secrets.randbelow(2**31 - 2)


class _SecureSeedGenerator(keras.random.SeedGenerator):
    """A ``SeedGenerator`` whose draws are ``state XOR key``, with a key that is never saved.

    ``state`` is the usual ``[s, t]`` counter (an optimizer variable, so it
    advances inside compiled steps and is saved with the optimizer); ``key`` is
    two words from the OS CSPRNG held only in this process's memory (and, as a
    constant, in the compiled step). A checkpoint or ``.keras`` file therefore
    holds a counter that predicts nothing: a resumed or reloaded optimizer gets
    a new key and draws fresh noise.
    """

    def __init__(self, name=None):
        super().__init__(seed=_os_entropy_seed(), name=name)
        self._key = (_os_entropy_seed(), _os_entropy_seed())

    def next(self, ordered=True):
        seed = super().next(ordered=ordered)
        key = self.backend.convert_to_tensor(list(self._key), dtype=seed.dtype)
        return self.backend.numpy.bitwise_xor(seed, key)

    def get_config(self):
        return {"name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class _PrivateOptimizerMixin:
    """Privatization shared by the DP optimizers; mixed in before a Keras optimizer."""

    #: Whether the train step must compute (and clip) per-example gradients.
    requires_per_example = True

    def _init_privacy(self, noise_multiplier, l2_norm_clip, num_microbatches, expected_batch_size, seed,
                      secure_noise=False):
        if not _is_real(noise_multiplier):
            raise ValueError(f"`noise_multiplier` must be a number ≥ 0, got {noise_multiplier!r}.")
        if math.isnan(noise_multiplier) or noise_multiplier < 0 or math.isinf(noise_multiplier):
            raise ValueError(
                f"`noise_multiplier` (σ) must be a finite number ≥ 0, got {noise_multiplier!r}. "
                "σ = 0 gives no privacy; use a value such as 1.0 (TAN recommends σ in [2, 4])."
            )
        noise_multiplier = float(noise_multiplier)
        if self.requires_per_example:
            l2_norm_clip = _check_positive("l2_norm_clip", l2_norm_clip, allow_inf=True)
            if math.isinf(l2_norm_clip) and noise_multiplier > 0:
                raise ValueError(
                    f"`l2_norm_clip`=inf with `noise_multiplier`={noise_multiplier}: the noise std σ·C "
                    "would be infinite and every weight would become NaN. C = inf (no clipping) is "
                    "meaningful only with σ = 0 (plain SGD, no privacy). For DP-SGD pass a finite "
                    "`l2_norm_clip` (e.g. 1.0); for SGD with noise but no clipping use "
                    "tan_keras.NoisySGD(noise_multiplier)."
                )
        if num_microbatches is not None:
            if not _is_int(num_microbatches) or num_microbatches < 1:
                raise ValueError(f"`num_microbatches` must be a positive int or None, got {num_microbatches!r}.")
            num_microbatches = int(num_microbatches)
        if expected_batch_size is not None:
            value = _check_positive("expected_batch_size", expected_batch_size)
            expected_batch_size = int(expected_batch_size) if _is_int(expected_batch_size) else value
        if not isinstance(secure_noise, bool):
            raise ValueError(f"`secure_noise` must be True or False, got {secure_noise!r}.")
        if seed is not None:
            if not _is_int(seed) or seed < 0:
                raise ValueError(f"`seed` must be a non-negative int or None, got {seed!r}.")
            if secure_noise:
                raise ValueError(
                    f"`secure_noise=True` refuses a user-given `seed` (got seed={seed!r}): anyone who "
                    "knows the seed can regenerate and subtract the noise. Pass seed=None (secure noise "
                    "draws its seed from the OS), or secure_noise=False for a reproducible debug run.")
            seed = int(seed)
        if self.gradient_accumulation_steps:
            raise ValueError(
                f"{type(self).__name__} does not support Keras's `gradient_accumulation_steps`: it would "
                "average k separately-noised updates, so each logical step would carry σ/√k of the "
                "noise the accountant assumes. Use `PrivateModel(physical_batch_size=...)` (or "
                "`tan_keras.make_private(model, physical_batch_size=...)`), which sums clipped "
                "gradients over memory-sized chunks and adds the noise once per logical batch."
            )
        self.noise_multiplier = noise_multiplier
        self.l2_norm_clip = l2_norm_clip if self.requires_per_example else None
        self.num_microbatches = num_microbatches
        self.expected_batch_size = expected_batch_size
        self.seed = seed
        self.secure_noise = secure_noise
        self._in_private_apply = False
        name = f"{self.name}_dp_noise_seed"
        if secure_noise:
            self._noise_seed_generator = _SecureSeedGenerator(name=name)
        else:
            # seed=None: OS entropy, never Keras's / Python's global seed (issue 15.6).
            self._noise_seed_generator = keras.random.SeedGenerator(
                _os_entropy_seed() if seed is None else seed, name=name)
        self._track_variable(self._noise_seed_generator.state)

    @property
    def noise_stddev(self):
        """Std of the Gaussian added to the *sum* of gradients: σC (DP-SGD) or σ (Noisy-SGD)."""
        if self.noise_multiplier == 0:
            return 0.0  # also for C = inf (no clipping, no noise), where σC would be 0·inf = nan
        return self.noise_multiplier * (self.l2_norm_clip if self.requires_per_example else 1.0)

    def privatize(self, grad_sum, normalizer):
        """Returns ``((Σ + N(0, std² I)) / normalizer, noise_norm, signal_norm)``.

        ``noise_norm`` and ``signal_norm`` are the L2 norms of the noise and of
        the summed gradient, both divided by ``normalizer`` (the Implicit-bias
        paper's Fig. 2 compares these two).
        """
        normalizer = ops.cast(normalizer, grad_sum[0].dtype)
        std = self.noise_stddev
        noised, noise_sq, signal_sq = [], 0.0, 0.0
        for g in grad_sum:
            signal_sq = signal_sq + ops.sum(ops.square(g))
            if std > 0:
                z = keras.random.normal(ops.shape(g), stddev=std, dtype=g.dtype, seed=self._noise_seed_generator)
                noise_sq = noise_sq + ops.sum(ops.square(z))
                g = g + z
            noised.append(g / normalizer)
        return noised, ops.sqrt(noise_sq) / normalizer, ops.sqrt(signal_sq) / normalizer

    def apply_private(self, grad_sum, normalizer, trainable_variables=None, summed_across_replicas=False):
        """Noise the (clipped) gradient sum, normalise, then run the Keras update.

        ``summed_across_replicas=True`` (TensorFlow, in a ``tf.distribute``
        replica context): ``grad_sum`` is already the sum over all replicas
        and every replica holds the same value, draws the same noise from the
        mirrored seed state, and applies the same update to its copy of the
        variables; Keras's cross-replica sum of the gradients is then skipped
        (it would add the noised gradient R times).
        """
        noised, noise_norm, signal_norm = self.privatize(grad_sum, normalizer)
        self._in_private_apply = True
        self._private_sum_is_global = summed_across_replicas
        try:
            self.apply(noised, trainable_variables)
        finally:
            self._in_private_apply = False
            self._private_sum_is_global = False
        return noise_norm, signal_norm

    def _all_reduce_sum_gradients(self, grads_and_vars):
        """Keras's TF optimizer sums the gradients across replicas here; not a sum that is already global."""
        if self._in_private_apply and getattr(self, "_private_sum_is_global", False):
            return list(grads_and_vars)
        return super()._all_reduce_sum_gradients(grads_and_vars)

    def apply(self, grads, trainable_variables=None):
        if self._in_private_apply:
            return super().apply(grads, trainable_variables)
        if self.requires_per_example:
            raise ValueError(
                f"{type(self).__name__} received an already-averaged gradient, so it cannot clip "
                "each example's contribution and the run would not be differentially private. "
                "This happens when a DP optimizer is compiled into a plain keras.Model. Wrap the "
                "model first: `model = tan_keras.make_private(model)` (or build it as "
                "tan_keras.PrivateModel / tan_keras.PrivateSequential)."
            )
        # Noisy-SGD on a plain Keras model: grads are the mean gradient.
        if self.expected_batch_size is None:
            raise ValueError(
                "NoisySGD on a plain keras.Model needs `expected_batch_size=B` to add noise of std "
                "σ/B to the mean gradient (Implicit-bias paper, Eq. 11). Pass it, or wrap the model "
                "with tan_keras.make_private(model), which uses the batch's size."
            )
        noised, _, _ = self.privatize(
            [g * self.expected_batch_size for g in grads], self.expected_batch_size
        )
        return super().apply(noised, trainable_variables)

    def get_config(self):
        config = super().get_config()
        config.update(noise_multiplier=self.noise_multiplier, expected_batch_size=self.expected_batch_size,
                      seed=self.seed, secure_noise=self.secure_noise)
        if self.requires_per_example:
            config.update(l2_norm_clip=self.l2_norm_clip, num_microbatches=self.num_microbatches)
        return config


@keras.saving.register_keras_serializable(package="tan_keras")
class DPSGD(_PrivateOptimizerMixin, keras.optimizers.SGD):
    """Differentially private SGD (Abadi et al. 2016; TAN Eq. 2).

    ``g = (1/B) (Σ_{i∈batch} clip_C(∇ℓ_i) + N(0, σ²C² I))``, then the usual SGD
    update with ``momentum`` / ``nesterov``.

    Args:
      l2_norm_clip: C, the per-example (or per-microbatch) L2 clipping norm.
      noise_multiplier: σ; the noise on the summed gradient has std σC.
      num_microbatches: TF Privacy's meaning. ``None`` clips every example.
        An int m splits the batch into m groups of B/m consecutive examples
        and clips each group's *mean* gradient; the result is divided by m.
        ⚠ With groups of more than one example the add/remove sensitivity is
        2C, not C: account with σ/2
        (``tan_keras.accounting.effective_noise_multiplier``).
      expected_batch_size: B in ``1/B``. Set it to ``q·N`` under Poisson
        sampling (``tan_keras.sampling`` does this); ``None`` uses the batch's
        own size, correct only for fixed-size batches.
      seed: int seed of the noise, for reproducible runs. ``None`` draws the
        seed from the operating system's entropy (``secrets``), never from
        Keras's, Python's or numpy's global seed: two processes that both
        call ``keras.utils.set_random_seed(0)`` get different noise. ⚠ Anyone
        who knows the seed (or a checkpoint's optimizer state, which stores the
        RNG state) can subtract the noise: keep both secret and release
        weights only.
      secure_noise: if True, the noise seed comes from OS entropy and is
        combined with a key held only in memory: a user-given ``seed`` is
        refused, and the RNG state saved in checkpoints / ``.keras`` files
        does not determine the noise, so a resumed run draws fresh noise (and
        is not bit-identical to an uninterrupted one). It does not protect
        against floating-point attacks on Gaussian sampling (see the README's
        sharp edges).
      learning_rate, momentum, nesterov, **kwargs: as ``keras.optimizers.SGD``.

    .. warning:: Needs per-example gradients: compile it into a
       ``tan_keras.PrivateModel`` / ``make_private(model)``.
    """

    def __init__(self, l2_norm_clip, noise_multiplier, num_microbatches=None, expected_batch_size=None,
                 seed=None, learning_rate=0.01, momentum=0.0, nesterov=False, name="DPSGD", *,
                 secure_noise=False, **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, name=name, **kwargs)
        self._init_privacy(noise_multiplier, l2_norm_clip, num_microbatches, expected_batch_size, seed,
                           secure_noise)


@keras.saving.register_keras_serializable(package="tan_keras")
class DPAdam(_PrivateOptimizerMixin, keras.optimizers.Adam):
    """Differentially private Adam: the DP-SGD gradient (TAN Eq. 2) fed to Adam.

    Same privacy arguments as :class:`DPSGD` (``seed``, ``secure_noise``
    included); ``beta_1``, ``beta_2``,
    ``epsilon`` and ``amsgrad`` are Adam's. Adam's moments are a
    post-processing of the privatized gradient, so privacy is unchanged.
    """

    def __init__(self, l2_norm_clip, noise_multiplier, num_microbatches=None, expected_batch_size=None,
                 seed=None, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False,
                 name="DPAdam", *, secure_noise=False, **kwargs):
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         amsgrad=amsgrad, name=name, **kwargs)
        self._init_privacy(noise_multiplier, l2_norm_clip, num_microbatches, expected_batch_size, seed,
                           secure_noise)


@keras.saving.register_keras_serializable(package="tan_keras")
class NoisySGD(_PrivateOptimizerMixin, keras.optimizers.SGD):
    """Noisy-SGD: DP-SGD without clipping (Implicit-bias paper, Eq. 11).

    ``g = (1/B) Σ_i ∇ℓ_i + N(0, σ²/B² I)``: Gaussian noise of std σ/B on the
    mean gradient ("effective noise" σ/B, TAN §3.1). Without clipping the
    sensitivity is unbounded, so this is **not** differentially private; it is
    the object of study of the Implicit-bias paper (it keeps, and can
    strengthen, SGD's small-batch implicit bias).

    Needs no per-example gradients: it works with a plain ``keras.Model`` when
    ``expected_batch_size`` is given, and with ``tan_keras.PrivateModel``
    (which uses the batch's size when ``expected_batch_size`` is ``None``).
    ``seed`` and ``secure_noise`` are as in :class:`DPSGD` (``seed=None``
    seeds from OS entropy, not from Keras's global seed).
    """

    requires_per_example = False

    def __init__(self, noise_multiplier, expected_batch_size=None, seed=None, learning_rate=0.01,
                 momentum=0.0, nesterov=False, name="NoisySGD", *, secure_noise=False, **kwargs):
        kwargs.pop("num_microbatches", None)
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, name=name, **kwargs)
        self._init_privacy(noise_multiplier, None, None, expected_batch_size, seed, secure_noise)


def is_private_optimizer(optimizer):
    """True for tan_keras's noise-adding optimizers."""
    return isinstance(optimizer, _PrivateOptimizerMixin)
