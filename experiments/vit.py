"""A small Vision Transformer for the benchmarks, built from ``keras.layers.MultiHeadAttention``.

Dosovitskiy et al. 2021 ("An image is worth 16x16 words", arXiv 2010.11929),
pre-LayerNorm blocks::

    tokens = PatchConv(x) + PositionEmbedding          # (B, T, width), T = (H/p)(W/p)
    block:  t = t + MHA(LN(t), LN(t))
            t = t + Dense(width)(GELU(Dense(mlp_ratio * width)(LN(t))))
    head:   Dense(num_classes)(mean_T(LN(t)))

Choices: the patch embedding is a ``Conv2D`` with kernel = stride = patch
size; positions are a learned ``Embedding`` looked up with per-example
position ids (every example reads the whole table, so the per-example
gradient of the table is that example's output gradient); the head averages
the tokens instead of reading a class token; no dropout. Every trainable
weight sits in a ``Conv2D``, ``EinsumDense`` (inside ``MultiHeadAttention``),
``Dense``, ``LayerNormalization`` or ``Embedding``, the layers ghost clipping
has rules for.

The benchmark's ViT (``vit_small``) is 6 blocks of width 384 with 6 heads of
64 and a 4x MLP, on 32x32 inputs with 4x4 patches (64 tokens): about 10.7M
parameters at 10 classes.
"""

import keras
from keras import ops


class PositionIds(keras.layers.Layer):
    """``(B, T, ...) -> (B, T)`` int32 ids ``0..T-1`` for each example (no weights)."""

    def call(self, tokens):
        shape = ops.shape(tokens)
        return ops.broadcast_to(ops.arange(shape[1], dtype="int32")[None, :], (shape[0], shape[1]))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:2])


def _block(x, width, num_heads, mlp_ratio, name):
    h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln1")(x)
    h = keras.layers.MultiHeadAttention(num_heads, width // num_heads, name=f"{name}_mha")(h, h)
    x = keras.layers.Add(name=f"{name}_add1")([x, h])
    h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln2")(x)
    h = keras.layers.Dense(mlp_ratio * width, activation="gelu", name=f"{name}_mlp1")(h)
    h = keras.layers.Dense(width, name=f"{name}_mlp2")(h)
    return keras.layers.Add(name=f"{name}_add2")([x, h])


def VisionTransformer(
    input_shape=(32, 32, 3),
    patch_size=4,
    depth=6,
    width=384,
    num_heads=6,
    mlp_ratio=4,
    num_classes=10,
    name="vit",
):
    """Builds a pre-LN ViT as a functional ``keras.Model`` mapping images to logits.

    Args:
        input_shape: channels-last ``(H, W, C)``; ``H`` and ``W`` multiples of ``patch_size``.
        patch_size: side of the square patches (the patch conv's kernel and stride).
        depth: number of transformer blocks.
        width: token width; a multiple of ``num_heads``.
        num_heads: attention heads per block (head size ``width / num_heads``).
        mlp_ratio: hidden width of each block's MLP, in units of ``width``.
        num_classes: size of the Dense head.
        name: model name.
    """
    height, wide = input_shape[0], input_shape[1]
    if height % patch_size or wide % patch_size:
        raise ValueError(f"`input_shape` {input_shape} must be a multiple of `patch_size`={patch_size} "
                         "in height and width.")
    if width % num_heads:
        raise ValueError(f"`width`={width} must be a multiple of `num_heads`={num_heads}.")
    if depth < 1:
        raise ValueError(f"`depth` must be >= 1, got {depth!r}.")
    num_tokens = (height // patch_size) * (wide // patch_size)

    inputs = keras.Input(shape=input_shape, name="images")
    x = keras.layers.Conv2D(width, patch_size, strides=patch_size, name="patch_embed")(inputs)
    x = keras.layers.Reshape((num_tokens, width), name="tokens")(x)
    positions = keras.layers.Embedding(num_tokens, width, name="position_embed")(PositionIds(name="position_ids")(x))
    x = keras.layers.Add(name="add_positions")([x, positions])
    for b in range(depth):
        x = _block(x, width, num_heads, mlp_ratio, f"block{b + 1}")
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    x = keras.layers.GlobalAveragePooling1D(name="token_mean")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def vit_small(num_classes=10, input_shape=(32, 32, 3)):
    """The benchmark's ViT: 6 blocks x 384 wide, 6 heads, 4x4 patches on 32x32 inputs."""
    return VisionTransformer(input_shape=input_shape, patch_size=4, depth=6, width=384, num_heads=6,
                             mlp_ratio=4, num_classes=num_classes, name="vit_small")
