"""Custom layers and initializers shared by the image models.

Everything here speaks ``keras.ops`` only, so it runs on every Keras backend,
and mixes no information across the examples of a batch (DP-safe: no
BatchNormalization, no batch statistics).

* ``FanInTruncatedNormal``: the TAN WideResNet init (``init=0``),
  ``trunc_normal_(std=1/sqrt(fan_in))`` cut at absolute bounds [-2, 2].
* ``ScaledWSConv2D``: scaled weight-standardized conv of NF-ResNets
  (Brock et al. 2021), ``MyScaledStdConv2d`` in facebookresearch/tan.
* ``ScaledActivation``: ``gamma * act(x)``, the variance-preserving
  activation of NF-ResNets (``gamma = RELU_GAMMA`` for ReLU).
* ``SkipInitGain``: ``alpha * skip_gain * x`` with a learnable scalar
  ``skip_gain`` (TAN's ``Expand`` parameter, SkipInit of De & Smith 2020).

``ScaledWSConv2D`` and ``SkipInitGain`` register their ghost-norm rules (fast
per-example clipping, ``tan_keras.ghost.register_ghost_norm``) next to their
definitions, as any custom layer would.
"""

import math
import random as pyrandom

import keras
import numpy as np
from keras import ops

from tan_keras.ghost import (cheaper_patch_gram, conv_per_example_grads, conv_weight_grad, example_sums,
                             matmul_grad_sq_norms, per_example, position_sum_sq, positions, register_ghost_norm,
                             shifted_inputs, sq_norms_from, use_ghost)

#: gamma such that ``gamma * relu(z)`` has unit variance for ``z ~ N(0, 1)``.
#: Analytically ``Var(relu(z)) = (1 - 1/pi) / 2``, i.e. ``gamma = sqrt(2 / (1 - 1/pi))
#: = 1.71286``; we use the (Monte-Carlo) constant of DeepMind's nfnets code and
#: timm (``_nonlin_gamma['relu']``), 0.06% larger, to match the reference models.
RELU_GAMMA = 1.7139588594436646


@keras.saving.register_keras_serializable(package="tan_keras")
class FanInTruncatedNormal(keras.initializers.Initializer):
    """Truncated normal with ``std = scale / sqrt(fan_in)``, cut at ``[lower, upper]``.

    This is ``torch.nn.init.trunc_normal_(w, std=1/sqrt(fan_in))`` as used by
    the TAN WideResNet (``init=0``, "as in DeepMind's paper"). The bounds are
    *absolute* (torch's defaults ``a=-2, b=2``), not multiples of the std, so
    for ``fan_in >= 27`` the draw is, in practice, an untruncated normal whose
    std really is ``1/sqrt(fan_in)`` (i.e. Kaiming-normal, ``fan_in``,
    "linear"). ``keras.initializers.TruncatedNormal`` instead cuts at 2 std,
    which shrinks the std by ~12%.

    ``fan_in = prod(shape[:-1])``: ``kh*kw*in`` for a channels-last conv kernel
    ``(kh, kw, in, out)``, ``in`` for a Dense kernel ``(in, out)``.

    Values are drawn on the host with NumPy (normal draws, out-of-bounds ones
    redrawn: exactly the truncated law), which costs no per-shape XLA compile
    on JAX. As Keras's own initializers, an instance returns the same values
    on every call: an unseeded one draws its seed when created, from Python's
    RNG, so ``keras.utils.set_random_seed`` makes models reproducible. Use one
    instance per layer.
    """

    def __init__(self, scale=1.0, lower=-2.0, upper=2.0, seed=None):
        if not scale > 0:
            raise ValueError(f"`scale` must be > 0, got {scale!r}.")
        if not lower < upper:
            raise ValueError(f"`lower` must be < `upper`, got lower={lower!r}, upper={upper!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be None or an int, got {seed!r}.")
        self.scale = float(scale)
        self.lower = float(lower)
        self.upper = float(upper)
        self.seed = seed
        self._seed = seed if seed is not None else pyrandom.randint(1, int(1e9))

    def __call__(self, shape, dtype=None):
        shape = tuple(int(d) for d in shape)
        fan_in = max(1, math.prod(shape[:-1]))
        std = self.scale / math.sqrt(fan_in)
        mass = 0.5 * (math.erf(self.upper / (std * math.sqrt(2))) - math.erf(self.lower / (std * math.sqrt(2))))
        if mass < 1e-3:
            raise ValueError(
                f"[lower, upper] = [{self.lower}, {self.upper}] holds only {mass:.2e} of the mass of "
                f"N(0, {std:.3g}^2) for shape {shape}."
            )
        rng = np.random.default_rng(self._seed)
        w = rng.standard_normal(shape) * std
        outside = (w < self.lower) | (w > self.upper)
        while outside.any():
            w[outside] = rng.standard_normal(int(outside.sum())) * std
            outside = (w < self.lower) | (w > self.upper)
        return ops.convert_to_tensor(w.astype(keras.backend.standardize_dtype(dtype or keras.config.floatx())))

    def get_config(self):
        return {"scale": self.scale, "lower": self.lower, "upper": self.upper, "seed": self.seed}


def standardize_kernel(kernel, gain=None, eps=1e-4):
    """Scaled weight standardization of a channels-last kernel ``(..., in, out)``.

    ``W_hat = gain * (W - mean) / sqrt(var * fan_in + eps)``, with ``mean`` and
    ``var`` taken per output channel over all other (fan-in) axes, so each
    output channel of ``W_hat`` has zero mean and ``sum(W_hat**2) = gain**2``
    (up to eps): a unit-variance, zero-mean input gives a unit-variance output.

    ``var`` is the population (biased) variance, as in Brock et al.'s JAX code
    and timm's ``F.batch_norm`` form; the TAN code's ``torch.var`` is the
    unbiased one, which differs by a factor ``fan_in / (fan_in - 1)``.
    """
    axes = tuple(range(len(kernel.shape) - 1))
    fan_in = math.prod(kernel.shape[:-1])
    mean = ops.mean(kernel, axis=axes, keepdims=True)
    var = ops.var(kernel, axis=axes, keepdims=True)
    w = (kernel - mean) * ops.rsqrt(var * fan_in + eps)
    if gain is not None:
        w = w * gain
    return w


@keras.saving.register_keras_serializable(package="tan_keras")
class ScaledWSConv2D(keras.layers.Layer):
    """2D convolution with scaled weight standardization (channels-last).

    ``y = conv(x, W_hat) + b``, ``W_hat = gain * (W - mean) / sqrt(var * fan_in + eps)``
    with per-output-channel mean/var over the fan-in axes ``(kh, kw, in)`` and a
    learnable per-output-channel ``gain`` (init ``gain_init``). The
    standardization is written in ``keras.ops`` inside ``call``, so gradients
    (and per-example gradients) flow through it to ``kernel`` and ``gain``.

    Brock et al. 2021, "Characterizing signal propagation to close the
    performance gap in unnormalized ResNets" (arXiv 2101.08692); TAN's
    ``MyScaledStdConv2d`` (which passes ``eps=1e-6``; ``get_standardized_weight``
    defaults to 1e-4, our default).

    .. warning:: This layer deliberately does *not* subclass
       ``keras.layers.Conv2D``: a per-layer fast-clipping rule written for
       plain convs (keyed by ``isinstance``) would compute wrong per-example
       gradients for it, since the kernel passes through the standardization.

    Padding is Keras/TF ``"same"``/``"valid"``; for stride 2 "same" pads
    (0, 1) where torch's ``padding=k//2`` pads (1, 1) (cf. timm's ``*Same`` layers).
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="same",
        use_bias=True,
        eps=1e-4,
        gain_init=1.0,
        kernel_initializer=None,
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not (isinstance(filters, int) and filters > 0):
            raise ValueError(f"`filters` must be a positive int, got {filters!r}.")
        if padding not in ("same", "valid"):
            raise ValueError(f"`padding` must be 'same' or 'valid', got {padding!r}.")
        if not eps >= 0:
            raise ValueError(f"`eps` must be >= 0, got {eps!r}.")
        self.filters = filters
        self.kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
        self.padding = padding
        self.use_bias = use_bias
        self.eps = float(eps)
        self.gain_init = float(gain_init)
        if kernel_initializer is None:
            # timm NF nets: kaiming_normal_(mode='fan_in', nonlinearity='linear').
            kernel_initializer = FanInTruncatedNormal()
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        in_channels = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel",
            shape=(*self.kernel_size, in_channels, self.filters),
            initializer=self.kernel_initializer,
        )
        self.gain = self.add_weight(
            name="gain",
            shape=(self.filters,),
            initializer=keras.initializers.Constant(self.gain_init),
        )
        self.bias = (
            self.add_weight(name="bias", shape=(self.filters,), initializer=self.bias_initializer)
            if self.use_bias
            else None
        )
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: in_channels})

    def standardized_kernel(self):
        """The kernel actually convolved: ``gain * (W - mean) / sqrt(var * fan_in + eps)``."""
        return standardize_kernel(self.kernel, self.gain, self.eps)

    def call(self, inputs):
        kernel = ops.cast(self.standardized_kernel(), inputs.dtype)
        outputs = ops.conv(inputs, kernel, strides=self.strides, padding=self.padding, data_format="channels_last")
        if self.bias is not None:
            outputs = outputs + ops.cast(self.bias, outputs.dtype)
        return outputs

    def compute_output_shape(self, input_shape):
        spatial = []
        for size, k, s in zip(input_shape[1:3], self.kernel_size, self.strides):
            if size is None:
                spatial.append(None)
            elif self.padding == "same":
                spatial.append(-(-size // s))
            else:
                spatial.append((size - k) // s + 1)
        return (input_shape[0], *spatial, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "use_bias": self.use_bias,
                "eps": self.eps,
                "gain_init": self.gain_init,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config


# ScaledWSConv2D's ghost-norm rule (``tan_keras.ghost``)


def _f32(x):
    return ops.cast(x, "float32")


def _ws_standardized(layer):
    """``(u, s)``: the unit-norm centred kernel ``u(W)`` (kernel shape) and the per-channel ``s_o``."""
    kernel = _f32(layer.kernel)
    centred = kernel - ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
    scale = ops.sqrt(ops.sum(ops.square(centred), axis=(0, 1, 2)) + layer.eps)  # s_o, (filters,)
    return centred / scale, scale


def scaled_ws_conv_per_example_grads(layer, inputs, output_grad):
    """Per-example ``∇W, ∇γ, ∇b`` of a ScaledWSConv2D when the explicit form is the cheaper one.

    ``G`` = the plain conv gradient (kernel shape) per example, then
    ``∇γ_o = α_o = ⟨G_o, u_o⟩`` and ``∇W_o = (γ_o/s_o)(G_o - mean(G_o) - α_o u_o)``
    (see ``scaled_ws_conv_sq_norms``).
    """
    g = positions(_f32(output_grad), layer.filters)
    n = math.prod(layer.kernel_size) * layer.kernel.shape[2]
    if g.shape[1] == 1 or use_ghost(g.shape[1], n, layer.filters):
        return None
    u, scale = _ws_standardized(layer)
    # Both operands in the compute dtype (bf16 under mixed precision: products exact, sums float32).
    _, plain = per_example(layer.kernel, _f32(conv_per_example_grads(
        inputs, ops.cast(output_grad, inputs.dtype), layer.kernel_size, layer.strides, layer.padding, (1, 1))))
    pairs = _ws_chain_rule(layer, plain, u, scale)
    if layer.bias is not None and layer.bias.trainable:
        pairs.append((layer.bias, ops.sum(g, axis=1)))
    return pairs


def _ws_chain_rule(layer, plain, u, scale):
    """``[(kernel, ∇W), (gain, ∇γ)]`` (trainable ones) from the plain conv gradient(s) ``plain``
    (``(..., kh, kw, C, filters)``: one example's, or their sum): ``∇γ_o = α_o = ⟨G_o, u_o⟩`` and
    ``∇W_o = (γ_o/s_o)(G_o - mean(G_o) - α_o u_o)``, the standardization's chain rule (linear in ``G``)."""
    fan_in = (-4, -3, -2)
    alpha = ops.sum(plain * u, axis=fan_in)  # (..., filters)
    pairs = []
    if layer.kernel.trainable:
        centred = plain - ops.mean(plain, axis=fan_in, keepdims=True)
        ratio = _f32(layer.gain) / scale
        pairs.append((layer.kernel, ratio * (centred - ops.expand_dims(alpha, fan_in) * u)))
    if layer.gain.trainable:
        pairs.append((layer.gain, alpha))
    return pairs


def scaled_ws_conv_weight_grads(layer, inputs, cotangent):
    """ScaledWSConv2D's ``∇W, ∇γ, ∇b`` summed over the batch at a 16-bit cotangent (book-keeping's share of a
    ghost-form layer, ``GhostNormRule.weight_grads``).

    The plain conv's kernel gradient ``G = Σ_{i,t} patch_itᵀ g_it`` comes
    from ``ghost.conv_weight_grad`` (float32 sums of exact bf16 products: a
    fused kernel on a GPU, else one matmul per kernel offset), then the
    standardization's chain rule, the same linear map for every example, so
    it applies to the sum (``_ws_chain_rule``). Without this rule book-keeping re-runs the layer's
    VJP on float32 copies of its bf16 input and cotangent: the same float32
    sums of the same products, by TF32 convolutions of twice the bytes.
    """
    g = positions(cotangent, layer.filters)
    pairs = []
    if layer.kernel.trainable or layer.gain.trainable:
        u, scale = _ws_standardized(layer)
        plain = ops.reshape(conv_weight_grad(inputs, cotangent, layer.kernel_size, layer.strides, layer.padding,
                                             (1, 1)), layer.kernel.shape)
        pairs = _ws_chain_rule(layer, plain, u, scale)
    if layer.bias is not None and layer.bias.trainable:
        pairs.append((layer.bias, ops.sum(_f32(g), axis=(0, 1))))
    return pairs


@register_ghost_norm(ScaledWSConv2D, per_example_grads=scaled_ws_conv_per_example_grads, views=True,
                     weight_grads=scaled_ws_conv_weight_grads)
def scaled_ws_conv_sq_norms(layer, inputs, output_grad):
    """NF-ResNet scaled weight-standardized conv, ``z = conv(a, γ·u(W)) + b``.

    ``u(W)_o = (W_o - mean(W_o)) / s_o`` per output channel o, over its
    ``n = kh·kw·C`` fan-in entries, with ``s_o = sqrt(n·var(W_o) + eps)``.
    With ``G_o`` the per-example gradient w.r.t. the standardized kernel's
    channel o (the plain conv gradient, ``patches_iᵀ g_i,o``), the chain rule
    through the standardization (a per-channel linear map) gives

        ∇γ_o = ⟨G_o, u_o⟩ =: α_o
        ∇W_o = (γ_o/s_o) (G_o - mean(G_o) - α_o u_o)
        ‖∇W_o‖² = (γ_o/s_o)² (‖G_o‖² - (ΣG_o)²/n - α_o² (2 - ‖u_o‖²))

    ``Σ_o (γ_o/s_o)² ‖G_o‖²`` is the plain conv norm with ``g`` scaled per
    channel (ghost or explicit by cost), ``ΣG_o = Σ_t g_t,o Σ_j patch_t,j``
    and ``α_o = Σ_t g_t,o (patch_t · u_o)``: nothing B×n×filters is formed in
    the ghost form. ``patch_t · u_o`` is the conv of the input with ``u`` (the
    layer's own conv, one call) and ``Σ_j patch_t,j`` the conv of the input's
    channel sums with a kernel of ones, so neither forms the k shifted copies
    of the input; with the patch Gram from the input's own Gram
    (``norms.patch_gram``, where that is cheaper) the ghost form forms none.
    """
    g = positions(_f32(output_grad), layer.filters)
    total = 0.0
    if layer.kernel.trainable or layer.gain.trainable:
        k, channels = math.prod(layer.kernel_size), layer.kernel.shape[2]
        n = k * channels
        u, scale = _ws_standardized(layer)
        x = _f32(inputs)

        def conv(images, kernel):
            return ops.conv(images, kernel, strides=layer.strides, padding=layer.padding, data_format="channels_last")

        patch_u = positions(conv(x, u), layer.filters)  # patch_t · u_o, (B, T, filters)
        alpha = ops.sum(patch_u * g, axis=1)  # (B, filters)
        if layer.kernel.trainable:
            w = ops.square(_f32(layer.gain) / scale)  # (γ_o/s_o)²
            # The patch Gram from the input's own Gram where that is cheaper (norms.patch_gram), else None.
            gram = cheaper_patch_gram(x, layer.kernel_size, layer.strides, layer.padding, (1, 1))
            # The blocks stand for the patches in the Gram; with `gram` and the ghost form nothing reads them.
            blocks = shifted_inputs(x, layer.kernel_size, layer.strides, layer.padding, (1, 1))
            weighted = matmul_grad_sq_norms(blocks, g * ops.sqrt(w), gram_a=gram)
            ones = ops.ones((*layer.kernel_size, 1, 1), "float32")
            patch_sums = positions(conv(ops.sum(x, axis=-1, keepdims=True), ones), 1)[..., 0]  # Σ_j patch_t,j, (B, T)
            col_sums = ops.einsum("bt,bto->bo", patch_sums, g)  # ΣG_o
            u_sq = ops.sum(ops.square(u), axis=(0, 1, 2))  # ‖u_o‖²
            correction = ops.square(col_sums) / n + ops.square(alpha) * (2.0 - u_sq)
            total = total + weighted - ops.sum(w * correction, axis=1)
        if layer.gain.trainable:
            total = total + ops.sum(ops.square(alpha), axis=1)
    if layer.bias is not None and layer.bias.trainable:
        total = total + position_sum_sq(g)
    return total


@keras.saving.register_keras_serializable(package="tan_keras")
class ScaledActivation(keras.layers.Layer):
    """``gamma * activation(x)``: a variance-preserving nonlinearity.

    With ``gamma = RELU_GAMMA`` and ``activation="relu"``, a ``N(0, 1)`` input
    gives an output of unit variance (Brock et al. 2021), so the next weight-
    standardized conv again outputs unit variance. Applying gamma here is
    equivalent to timm's ``ScaledStdConv2d(gamma=...)`` (a linear conv commutes
    with the scalar) and to its ``gamma_in_act=True`` variant.
    """

    def __init__(self, activation="relu", gamma=RELU_GAMMA, **kwargs):
        super().__init__(**kwargs)
        self.activation = keras.activations.get(activation)
        self.gamma = float(gamma)

    def call(self, inputs):
        return self.activation(inputs) * ops.cast(self.gamma, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"activation": keras.activations.serialize(self.activation), "gamma": self.gamma})
        return config


@keras.saving.register_keras_serializable(package="tan_keras")
class SkipInitGain(keras.layers.Layer):
    """``alpha * skip_gain * x``: residual-branch scaling of a normalizer-free block.

    ``alpha`` is the fixed rate of variance growth per block (0.2 in NF-ResNets);
    ``skip_gain`` is a learnable scalar (SkipInit, De & Smith 2020). The TAN code
    initialises it to 1.0 (its ``Expand`` parameter); timm's ``skipinit=True``
    initialises it to 0, which makes every block the identity at init.
    """

    def __init__(self, alpha=0.2, gain_init=1.0, **kwargs):
        super().__init__(**kwargs)
        self.alpha = float(alpha)
        self.gain_init = float(gain_init)

    def build(self, input_shape):
        self.skip_gain = self.add_weight(
            name="skip_gain", shape=(), initializer=keras.initializers.Constant(self.gain_init)
        )

    def call(self, inputs):
        return inputs * ops.cast(self.skip_gain * self.alpha, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"alpha": self.alpha, "gain_init": self.gain_init})
        return config


def skip_init_gain_per_example_grads(layer, inputs, output_grad):
    """NF-ResNet's ``z = α·s·x`` with a learnable scalar s: ``∇s_i = α Σ g_i ⊙ x_i``."""
    if not layer.skip_gain.trainable:
        return []
    dot = ops.sum(ops.reshape(_f32(output_grad) * _f32(inputs), (ops.shape(inputs)[0], -1)), axis=1)
    return [per_example(layer.skip_gain, layer.alpha * example_sums(dot))]


register_ghost_norm(SkipInitGain, per_example_grads=skip_init_gain_per_example_grads, views=True)(
    sq_norms_from(skip_init_gain_per_example_grads))
