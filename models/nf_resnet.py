"""Normalizer-free ResNets (NF-ResNet), the ImageNet model of De et al. 2022 and TAN.

Brock, De & Smith 2021, "Characterizing signal propagation to close the
performance gap in unnormalized ResNets" (arXiv 2101.08692); timm's
``nf_resnet50`` (``NormFreeNet`` / ``NormFreeBlock``) as patched by
facebookresearch/tan (``src/models/NFnet.py``: ``MyNormFreeBlock``,
``MyScaledStdConv2d``, ``Expand``).

Block (bottleneck, pre-activation, no normalization)::

    h   = act(x / beta)                       # act(z) = gamma * relu(z)
    out = shortcut + alpha * skip_gain * f(h)
    f   = WSconv1x1(mid) -> act -> WSconv3x3(mid, stride) -> act -> WSconv1x1(out)
    shortcut = x                               (same shape)
             = WSconv1x1(out)(avgpool2x2(h))   (transition: timm ``DownsampleAvg``)

``beta`` is the expected std of the block input, tracked analytically: the
stem outputs unit variance, each transition (block 0 of a stage, whose WS-conv
shortcut re-normalizes the stream) outputs ``1 + alpha**2``, and every
further block adds ``alpha**2``. So block i >= 1 of a stage sees
``beta_i**2 = 1 + i * alpha**2``, and a transition sees the variance at the
end of the previous stage (1 after the stem). As timm::

    if block_idx == 0: expected_var = 1.
    expected_var += alpha ** 2

Choices (and deviations from TAN / timm):

* gamma lives in the activations (``ScaledActivation``, timm's
  ``gamma_in_act=True`` form; equivalent to timm's conv ``gamma`` except that
  the stem conv, which sees raw pixels, is not scaled by gamma).
  ``activation_gamma=RELU_GAMMA`` (1.7139) keeps unit variance. The TAN code
  computes ``scale = gamma/sqrt(fan_in)`` but never uses it, i.e. it runs with
  gamma = 1: pass ``activation_gamma=1.0`` to reproduce that.
* Transition shortcut: avg-pool 2x2 (stride 2 stages only) then WS 1x1 conv,
  timm's ``DownsampleAvg`` used by TAN (``avg_down=True``, default);
  ``avg_down=False`` gives a strided WS 1x1 conv (Brock et al.'s ResNet-V2
  projection). With spatially white inputs (e.g. N(0, 1) noise) the 2x2
  average divides the shortcut variance by up to 4, so ``beta`` tracking
  holds across stages only with ``avg_down=False`` (or spatially smooth images).
* ``skip_gain`` init 1.0 as TAN's ``Expand`` (timm skipinit: 0).
* WS eps 1e-6 as TAN's ``MyScaledStdConv2d``; population variance (TAN:
  unbiased ``torch.var``).
* Keras "same" padding (TF convention, timm's ``*Same`` layers) instead of
  torch's symmetric ``padding=k//2``; the 7x7/2 stem conv and the 3x3/2
  max-pool / convs are therefore shifted by one pixel.
* ``small_inputs=True`` (32x32): 3x3 stride-1 WS stem, no max-pool, and the
  first stage keeps stride 1.
* Head: ``act -> global average pool -> (dropout) -> Dense``, Dense init
  N(0, 0.01), zero bias (timm); convs kaiming-normal fan_in "linear", zero bias.
"""

import math
import re

import keras

from models.layers import RELU_GAMMA, FanInTruncatedNormal, ScaledActivation, ScaledWSConv2D, SkipInitGain

#: Blocks per stage of timm's NF-ResNets (bottleneck, expansion 4).
STAGE_DEPTHS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

#: Output channels per stage at ``width_multiplier=1``; bottleneck width = 1/4 of these.
STAGE_CHANNELS = (256, 512, 1024, 2048)

_BLOCK_OUTPUT = re.compile(r"^stage(\d+)_block(\d+)_out$")


def make_divisible(v, divisor=8, min_value=None):
    """timm's ``make_divisible``: round ``v`` to a multiple of ``divisor`` (never below 90% of v)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def expected_block_variances(stage_depths, alpha=0.2):
    """Designed variance of each block's output, ``[[Var(stage s, block i)]]``.

    Transition blocks (block 0 of each stage) output ``1 + alpha**2`` and each
    further block adds ``alpha**2``: ``1 + (i + 1) * alpha**2`` for block i.
    """
    return [[1.0 + (i + 1) * alpha**2 for i in range(d)] for d in stage_depths]


def _ws_conv(filters, kernel_size, strides, name, eps):
    return ScaledWSConv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=True,
        eps=eps,
        kernel_initializer=FanInTruncatedNormal(),  # kaiming-normal fan_in "linear" (timm)
        name=name,
    )


def _nf_block(x, out_channels, mid_channels, strides, beta, alpha, gamma, skip_gain_init, eps, avg_down, name):
    in_channels = x.shape[-1]
    h = keras.layers.Rescaling(1.0 / beta, name=f"{name}_beta")(x)
    h = ScaledActivation("relu", gamma, name=f"{name}_act1")(h)

    if in_channels != out_channels or strides != 1:
        shortcut = h
        if avg_down:
            if strides != 1:
                shortcut = keras.layers.AveragePooling2D(
                    pool_size=2, strides=strides, padding="same", name=f"{name}_shortcut_pool"
                )(shortcut)
            shortcut = _ws_conv(out_channels, 1, 1, f"{name}_shortcut_conv", eps)(shortcut)
        else:
            shortcut = _ws_conv(out_channels, 1, strides, f"{name}_shortcut_conv", eps)(shortcut)
    else:
        shortcut = x

    out = _ws_conv(mid_channels, 1, 1, f"{name}_conv1", eps)(h)
    out = ScaledActivation("relu", gamma, name=f"{name}_act2")(out)
    out = _ws_conv(mid_channels, 3, strides, f"{name}_conv2", eps)(out)
    out = ScaledActivation("relu", gamma, name=f"{name}_act3")(out)
    out = _ws_conv(out_channels, 1, 1, f"{name}_conv3", eps)(out)
    out = SkipInitGain(alpha, skip_gain_init, name=f"{name}_skip_gain")(out)
    return keras.layers.Add(name=f"{name}_out")([shortcut, out])


def NFResNet(
    stage_depths,
    num_classes=1000,
    input_shape=(224, 224, 3),
    width_multiplier=1.0,
    small_inputs=False,
    alpha=0.2,
    activation_gamma=RELU_GAMMA,
    skip_gain_init=1.0,
    ws_eps=1e-6,
    avg_down=True,
    dropout_rate=0.0,
    name="nf_resnet",
):
    """Builds a bottleneck NF-ResNet with the given blocks per stage.

    Args:
        stage_depths: blocks per stage, e.g. ``(3, 4, 6, 3)`` for NF-ResNet-50.
        num_classes: size of the Dense head (logits).
        input_shape: channels-last ``(H, W, C)``.
        width_multiplier: scales every width (``make_divisible(., 8)`` as timm).
        small_inputs: 32x32 variant: 3x3/1 stem, no max-pool.
        alpha: variance added per block (0.2).
        activation_gamma: ``act = gamma * relu``; ``RELU_GAMMA`` preserves unit
            variance, 1.0 reproduces the TAN code.
        skip_gain_init: init of each block's learnable scalar ``skip_gain``
            (TAN 1.0, timm skipinit 0.0).
        ws_eps: eps of the weight-standardized convs (TAN 1e-6).
        avg_down: transition shortcut = avg-pool + WS 1x1 (timm/TAN) or strided WS 1x1.
        dropout_rate: dropout before the head (0: no layer, as TAN).
        name: model name.

    Returns:
        A ``keras.Model`` mapping images to logits. Block outputs are the
        layers named ``stage{s}_block{b}_out`` (1-based); see
        ``nf_block_output_model``.
    """
    stage_depths = tuple(int(d) for d in stage_depths)
    if not stage_depths or min(stage_depths) < 1 or len(stage_depths) > len(STAGE_CHANNELS):
        raise ValueError(f"`stage_depths` must hold 1 to 4 positive ints, got {stage_depths!r}.")
    if not width_multiplier > 0:
        raise ValueError(f"`width_multiplier` must be > 0, got {width_multiplier!r}.")
    if not alpha > 0:
        raise ValueError(f"`alpha` must be > 0, got {alpha!r}.")

    stem_channels = make_divisible(64 * width_multiplier)
    inputs = keras.Input(shape=input_shape, name="images")
    if small_inputs:
        x = _ws_conv(stem_channels, 3, 1, "stem_conv", ws_eps)(inputs)
    else:
        x = _ws_conv(stem_channels, 7, 2, "stem_conv", ws_eps)(inputs)
        x = keras.layers.MaxPooling2D(pool_size=3, strides=2, padding="same", name="stem_pool")(x)

    expected_var = 1.0
    for s, depth in enumerate(stage_depths):
        out_channels = make_divisible(STAGE_CHANNELS[s] * width_multiplier)
        mid_channels = make_divisible(out_channels * 0.25)
        for b in range(depth):
            x = _nf_block(
                x,
                out_channels,
                mid_channels,
                strides=(1 if s == 0 else 2) if b == 0 else 1,
                beta=math.sqrt(expected_var),
                alpha=alpha,
                gamma=activation_gamma,
                skip_gain_init=skip_gain_init,
                eps=ws_eps,
                avg_down=avg_down,
                name=f"stage{s + 1}_block{b + 1}",
            )
            if b == 0:
                expected_var = 1.0  # the transition's WS-conv shortcut has unit variance
            expected_var += alpha**2

    x = ScaledActivation("relu", activation_gamma, name="final_act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout_rate:
        x = keras.layers.Dropout(dropout_rate, name="dropout")(x)
    outputs = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        bias_initializer="zeros",
        name="logits",
    )(x)
    return keras.Model(inputs, outputs, name=name)


def nf_resnet(
    depth=50, num_classes=1000, input_shape=(224, 224, 3), width_multiplier=1.0, small_inputs=False, **kwargs
):
    """NF-ResNet-``depth`` (26, 50 or 101); ``kwargs`` go to ``NFResNet``."""
    if depth not in STAGE_DEPTHS:
        raise ValueError(f"`depth` must be one of {sorted(STAGE_DEPTHS)}, got {depth!r}.")
    return NFResNet(
        STAGE_DEPTHS[depth],
        num_classes=num_classes,
        input_shape=input_shape,
        width_multiplier=width_multiplier,
        small_inputs=small_inputs,
        name=kwargs.pop("name", f"nf_resnet{depth}"),
        **kwargs,
    )


def nf_resnet50(**kwargs):
    """NF-ResNet-50, TAN's ImageNet model (~25.6M parameters at 1000 classes)."""
    return nf_resnet(50, **kwargs)


def nf_resnet26(**kwargs):
    """NF-ResNet-26, stages (2, 2, 2, 2): a small model for tests."""
    return nf_resnet(26, **kwargs)


def nf_block_output_names(model):
    """Names of the block-output layers of an NF-ResNet, in (stage, block) order."""
    found = []
    for layer in model.layers:
        m = _BLOCK_OUTPUT.match(layer.name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2))), layer.name))
    if not found:
        raise ValueError(f"Model '{model.name}' has no layer named 'stage<s>_block<b>_out'.")
    return [n for _, n in sorted(found)]


def nf_block_output_model(model):
    """A ``keras.Model`` sharing ``model``'s weights that returns every block's output.

    Outputs are ordered by (stage, block), as ``nf_block_output_names(model)``.
    For signal-propagation plots (Brock et al. 2021, Fig. 1).
    """
    names = nf_block_output_names(model)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, [model.get_layer(n).output for n in names], name=f"{model.name}_blocks")
