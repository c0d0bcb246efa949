"""Wide ResNet with GroupNorm, as in facebookresearch/tan (``src/models/wideresnet.py``).

WRN-16-4 is the CIFAR-10 model of TAN (Table 5, Figs. 4-5) and of De et al.
2022. It is the pre-activation WRN of Zagoruyko & Komodakis (2016) with
BatchNorm replaced by ``GroupNormalization(16)`` (DP forbids layers that mix
examples), 3x3 convs with bias, and the TAN init (``init=0``): truncated
normal with ``std = 1/sqrt(fan_in)`` for conv and dense kernels, zero biases.

Layout (``n = (depth - 4) / 6`` basic blocks per group, ``k = width``)::

    conv3x3(16) -> group1: n x block(16k, stride 1)
                -> group2: n x block(32k, stride 2)
                -> group3: n x block(64k, stride 2)
                -> norm-act -> avg-pool 8 -> flatten -> Dense(num_classes)

Two normalization orders (TAN's ``order1 = order2``):

* ``order="relu_gn"`` (TAN ``order=0``, the default, "post-activation",
  best in TAN Fig. 5): block ``x + conv(GN(ReLU(conv(GN(ReLU(x))))))``;
  final ``GN(ReLU(x))``.
* ``order="gn_relu"`` (TAN ``order=1``, classic pre-activation):
  block ``x + conv(ReLU(GN(conv(ReLU(GN(x))))))``; final ``ReLU(GN(x))``.

When a block changes shape, its shortcut is ``conv1x1(GN(ReLU(x)))``
(resp. ``conv1x1(ReLU(GN(x)))``) with its own GroupNorm, as in TAN.

Deviation: convs use Keras "same" padding, so a stride-2 3x3 conv pads
(0, 1) where torch's ``padding=1`` pads (1, 1).
"""

import keras

from models.layers import FanInTruncatedNormal, ScaledWSConv2D

ORDERS = ("relu_gn", "gn_relu")


def _conv(filters, kernel_size, strides, name, weight_standardization, ws_eps):
    # A fresh initializer per layer: an unseeded Keras initializer instance
    # returns the same values on every call.
    kwargs = dict(
        strides=strides,
        padding="same",
        use_bias=True,
        kernel_initializer=FanInTruncatedNormal(),
        bias_initializer="zeros",
        name=name,
    )
    if weight_standardization:
        return ScaledWSConv2D(filters, kernel_size, eps=ws_eps, **kwargs)
    return keras.layers.Conv2D(filters, kernel_size, **kwargs)


def _norm_act(x, order, groups, name):
    """``GN(ReLU(x))`` for ``relu_gn``, ``ReLU(GN(x))`` for ``gn_relu``."""
    norm = keras.layers.GroupNormalization(groups=groups, epsilon=1e-5, name=f"{name}_gn")
    act = keras.layers.ReLU(name=f"{name}_relu")
    return norm(act(x)) if order == "relu_gn" else act(norm(x))


def _basic_block(x, filters, strides, order, groups, name, weight_standardization, ws_eps):
    in_filters = x.shape[-1]
    out = _norm_act(x, order, groups, f"{name}_pre1")
    out = _conv(filters, 3, strides, f"{name}_conv1", weight_standardization, ws_eps)(out)
    out = _norm_act(out, order, groups, f"{name}_pre2")
    out = _conv(filters, 3, 1, f"{name}_conv2", weight_standardization, ws_eps)(out)
    if in_filters == filters:
        # TAN's ``equalInOut``: identity shortcut (TAN never has a stride-2
        # block with equal widths; we check rather than silently mis-shape).
        if strides != 1:
            raise ValueError(f"{name}: a stride-{strides} block needs a width change for its conv shortcut.")
        shortcut = x
    else:
        shortcut = _norm_act(x, order, groups, f"{name}_shortcut")
        shortcut = _conv(filters, 1, strides, f"{name}_shortcut_conv", weight_standardization, ws_eps)(shortcut)
    return keras.layers.Add(name=f"{name}_out")([shortcut, out])


def WideResNet(
    depth=16,
    width=4,
    num_classes=10,
    input_shape=(32, 32, 3),
    groups=16,
    order="relu_gn",
    weight_standardization=False,
    ws_eps=1e-4,
    name=None,
):
    """Builds a GroupNorm Wide ResNet ``WRN-depth-width`` as a functional ``keras.Model``.

    Args:
        depth: total depth; ``(depth - 4) % 6 == 0`` (16 -> 2 blocks per group).
        width: widening factor k; channels ``[16, 16k, 32k, 64k]``.
        num_classes: size of the Dense head (logits, no softmax).
        input_shape: channels-last ``(H, W, C)``. The head average-pools 8x8
            windows, as TAN's ``F.avg_pool2d(out, 8)``, so 32x32 inputs give a
            ``64k``-dim feature; other sizes give ``(H/32)*(W/32)*64k``.
        groups: groups of every ``GroupNormalization`` (TAN ``nb_groups=16``).
        order: ``"relu_gn"`` (conv(GN(ReLU(x))), TAN's best) or ``"gn_relu"``
            (conv(ReLU(GN(x)))); applies inside blocks and before the head.
        weight_standardization: use ``ScaledWSConv2D`` for every conv (adds a
            per-output-channel ``gain``); TAN's WRN uses plain convs.
        ws_eps: ``eps`` of the standardized convs.
        name: model name; defaults to ``f"wrn_{depth}_{width}"``.

    Returns:
        A ``keras.Model`` mapping images to logits.
    """
    if not (isinstance(depth, int) and depth >= 10 and (depth - 4) % 6 == 0):
        raise ValueError(f"`depth` must be an int >= 10 with (depth - 4) % 6 == 0, got {depth!r}.")
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"`width` must be a positive int, got {width!r}.")
    if order not in ORDERS:
        raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}.")
    channels = [16, 16 * width, 32 * width, 64 * width]
    if any(c % groups for c in channels):
        raise ValueError(f"`groups`={groups} must divide every channel count {channels}.")
    blocks_per_group = (depth - 4) // 6

    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv(channels[0], 3, 1, "stem_conv", weight_standardization, ws_eps)(inputs)
    for g, (filters, strides) in enumerate(zip(channels[1:], (1, 2, 2)), start=1):
        for b in range(1, blocks_per_group + 1):
            x = _basic_block(
                x,
                filters,
                strides if b == 1 else 1,
                order,
                groups,
                f"group{g}_block{b}",
                weight_standardization,
                ws_eps,
            )
    x = _norm_act(x, order, groups, "final")
    x = keras.layers.AveragePooling2D(pool_size=8, name="avg_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(
        num_classes, kernel_initializer=FanInTruncatedNormal(), bias_initializer="zeros", name="logits"
    )(x)
    return keras.Model(inputs, outputs, name=name or f"wrn_{depth}_{width}")


def wrn_16_4(**kwargs):
    """WRN-16-4 (TAN's CIFAR-10 model, ~2.75M parameters at 10 classes)."""
    return WideResNet(depth=16, width=4, **kwargs)
