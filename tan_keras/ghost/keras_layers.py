"""Ghost-norm rules for Keras's own layers: Dense, EinsumDense, Conv1D/Conv2D, Embedding, LayerNormalization,
GroupNormalization.

Each rule gives ``‖∇_layer ℓ_i‖²`` from the layer's input ``a`` and output
gradient ``g`` (``registry.GhostNormRule``); the matmul layers through
``norms.matmul_grad_sq_norms`` (ghost or explicit by cost), the others by
their own formula (in each rule's docstring). Importing ``tan_keras.ghost``
registers them.
"""

import math
import string

import keras
from keras import ops

from tan_keras.ghost.norms import (_f32, _trainable, cheaper_patch_gram, conv_weight_grad, example_sums,
                                   matmul_grad_sq_norms,
                                   conv_per_example_grads as conv_per_example_grads_of, matmul_per_example_grads,
                                   matmul_weight_grad, num_examples, per_example, per_example_sum_sq,
                                   position_sum_sq, positions, shifted_inputs, sq_norms_from)
from tan_keras.ghost.registry import register_ghost_norm, use_ghost


def _no_lora_or_quantization(layer):
    if getattr(layer, "lora_enabled", False):
        return "LoRA is enabled"
    if getattr(layer, "quantization_mode", None) is not None:
        return f"it is quantized ({layer.quantization_mode})"
    return None


# --------------------------------------------------------------------------
# Dense, EinsumDense
# --------------------------------------------------------------------------


def _matmul_layer_per_example_grads(kernel, bias, g, in_dim, kernel_grads):
    """``[(kernel, (B, *kernel.shape)), (bias, (B, p))]`` for the trainable ones, or None (ghost cheaper, or T=1).

    ``g`` is the (B, T, p) output gradient, ``in_dim`` the matmul's input
    width and ``kernel_grads()`` the kernel's (B, in_dim, p) per-example
    gradients and their (B,) square sums (or None), called only when they
    are the cheaper form. With one position the ghost norm is a product of
    two norms and the clipped sum one matmul, so per-example gradients would
    only cost memory.
    """
    num_positions, out_dim = g.shape[1], g.shape[2]
    if num_positions == 1 or (_trainable(kernel) and use_ghost(num_positions, in_dim, out_dim)):
        return None
    pairs = []
    if _trainable(kernel):
        pairs.append(per_example(kernel, *kernel_grads()))
    if _trainable(bias):
        pairs.append((bias, ops.sum(_f32(g), axis=1)))
    return pairs


def dense_per_example_grads(layer, inputs, output_grad):
    """Dense: per-example kernel/bias gradients when the explicit form is the cheaper one."""
    g = positions(output_grad, layer.units)  # compute dtype: norms.matmul_grad_sq_norms multiplies in float32
    a = positions(inputs, layer.kernel.shape[0])
    return _matmul_layer_per_example_grads(layer.kernel, layer.bias, g, a.shape[2],
                                           lambda: (matmul_per_example_grads(a, g), None))


def _matmul_weight_grads(kernel, bias, a, g, kernel_grad=None):
    """``[(kernel, Σ_{i,t} a_itᵀ g_it), (bias, Σ_{i,t} g_it)]`` (trainable ones) in float32 from 16-bit operands.

    ``a`` (B, T, d), ``g`` (B, T, p); products exact, sums float32
    (``norms.matmul_weight_grad``). ``kernel_grad``: optional ``() -> (d, p)``
    giving the kernel's sum another way (a conv's ``norms.conv_weight_grad``),
    used instead of ``a``.
    """
    grads = []
    if _trainable(kernel):
        grad = kernel_grad() if kernel_grad is not None else matmul_weight_grad(a, g)
        grads.append((kernel, ops.reshape(grad, kernel.shape)))
    if _trainable(bias):
        grads.append((bias, ops.sum(_f32(g), axis=(0, 1))))
    return grads


def dense_weight_grads(layer, inputs, cotangent):
    """Dense: its weight gradients at a 16-bit cotangent (``registry.GhostNormRule.weight_grads``)."""
    return _matmul_weight_grads(layer.kernel, layer.bias, positions(inputs, layer.kernel.shape[0]),
                                positions(cotangent, layer.units))


@register_ghost_norm(keras.layers.Dense, activation_attr="activation", unsupported=_no_lora_or_quantization,
                     per_example_grads=dense_per_example_grads, views=True, weight_grads=dense_weight_grads,
                     matmul_share=lambda layer, inputs: True)
def dense_sq_norms(layer, inputs, output_grad):
    """Dense on ``(B, ..., d)``: every leading non-batch axis is a position t."""
    g = positions(output_grad, layer.units)
    total = 0.0
    if _trainable(layer.kernel):
        a = positions(inputs, layer.kernel.shape[0])
        total = total + matmul_grad_sq_norms(a, g)
    if _trainable(layer.bias):
        total = total + position_sum_sq(g)
    return total


def _einsum_subscripts(layer, input_rank):
    """(input, kernel, output) subscripts of an EinsumDense, with ``...`` spelt out."""
    lhs, out = layer.equation.split("->")
    inp, ker = lhs.split(",")
    if "..." in inp:
        unused = [c for c in string.ascii_letters if c not in layer.equation]
        ellipsis = "".join(unused[: input_rank - (len(inp) - 3)])
        inp, out = inp.replace("...", ellipsis), out.replace("...", ellipsis)
    return inp, ker, out


def _einsum_dense_unsupported(layer):
    reason = _no_lora_or_quantization(layer)
    if reason:
        return reason
    lhs, out = layer.equation.split("->")
    inp, ker = lhs.split(",")
    if "..." in ker:
        return f"its kernel subscripts '{ker}' hold an ellipsis"
    if inp.startswith("...") != out.startswith("...") or (not inp.startswith("...") and (
            inp[0] != out[0] or inp[0] in ker)):
        return f"the batch axis of '{layer.equation}' is not the first axis of its input and output"
    if any(c not in inp and c not in out for c in ker):
        return f"a kernel axis of '{layer.equation}' is summed away"
    return None


def _einsum_kernel_letters(layer, inputs):
    """``(inp, ker, out, k_in, k_out)``: an EinsumDense's subscripts and its kernel's contracted and output letters."""
    inp, ker, out = _einsum_subscripts(layer, len(inputs.shape))
    k_in = "".join(c for c in ker if c in inp and c not in out)
    k_out = "".join(c for c in ker if c in out and c not in inp)
    return inp, ker, out, k_in, k_out


def einsum_dense_matmul_share(layer, inputs):
    """Whether an EinsumDense's kernel gradient has the matmul form (no kernel letter on both sides), so that
    its rule's norm passes it to ``norms.matmul_grad_sq_norms`` (``registry.GhostNormRule.matmul_share``)."""
    _, ker, _, k_in, k_out = _einsum_kernel_letters(layer, inputs)
    return len(k_in) + len(k_out) == len(ker)


@register_ghost_norm(keras.layers.EinsumDense, activation_attr="activation", unsupported=_einsum_dense_unsupported,
                     views=True, matmul_share=einsum_dense_matmul_share)
def einsum_dense_sq_norms(layer, inputs, output_grad):
    """EinsumDense ``out = einsum(eq, a, W) + b`` as a matmul over positions.

    Input letters shared with the output (not the kernel, not the batch) are
    positions T; kernel letters split into contracted (input side) and output
    side. A kernel letter on both sides (elementwise use of the kernel) has no
    matmul form: the explicit per-example gradient ``einsum(a, g)`` is used.
    """
    inp, ker, out, k_in, k_out = _einsum_kernel_letters(layer, inputs)
    batch = inp[0]
    a, g = _f32(inputs), _f32(output_grad)
    total = 0.0
    if _trainable(layer.kernel):
        if len(k_in) + len(k_out) < len(ker):
            total = total + per_example_sum_sq(example_sums(ops.einsum(f"{inp},{out}->{batch}{ker}", a, g)))
        else:
            pos = "".join(c for c in inp if c in out and c not in ker and c != batch)
            size = lambda letters: math.prod(layer.kernel.shape[ker.index(c)] for c in letters)  # noqa: E731
            a_mat = positions(ops.einsum(f"{inp}->{batch}{pos}{k_in}", a), size(k_in))
            g_mat = positions(ops.einsum(f"{out}->{batch}{pos}{k_out}", g), size(k_out))
            total = total + matmul_grad_sq_norms(a_mat, g_mat)
    if _trainable(layer.bias):
        total = total + per_example_sum_sq(example_sums(ops.einsum(f"{out}->{batch}{layer.bias_axes}", g)))
    return total


# --------------------------------------------------------------------------
# Convolutions
# --------------------------------------------------------------------------


def _channels_last(x, data_format):
    if data_format == "channels_first":
        return ops.moveaxis(x, 1, -1)
    return x


def _conv_unsupported(layer):
    reason = _no_lora_or_quantization(layer)
    if reason:
        return reason
    if layer.groups != 1:
        return f"grouped convolution (groups={layer.groups})"
    return None


def _conv_input(layer, inputs):
    """``(x, padding)``: a Conv1D/Conv2D's input channels-last, causal padding applied (then ``"valid"``)."""
    x = _channels_last(inputs, layer.data_format)  # compute dtype (see dense_sq_norms)
    padding = layer.padding
    if padding == "causal":
        left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
        x = ops.pad(x, [[0, 0], [left, 0], [0, 0]])
        padding = "valid"
    return x, padding


def _conv_blocks(layer, inputs):
    """A Conv1D/Conv2D's input patches, one (B, T, C) block per kernel offset (causal padding applied)."""
    x, padding = _conv_input(layer, inputs)
    return shifted_inputs(x, layer.kernel_size, layer.strides, padding, layer.dilation_rate)


def _conv_patch_gram(layer, inputs):
    """``() -> patch_gram`` of a Conv1D/Conv2D's input where it is the cheaper Gram, else None (one per offset)."""
    x, padding = _conv_input(layer, inputs)
    return cheaper_patch_gram(x, layer.kernel_size, layer.strides, padding, layer.dilation_rate)


def _conv_output_grad(layer, output_grad):
    return positions(_channels_last(output_grad, layer.data_format), layer.filters)


def conv_per_example_grads(layer, inputs, output_grad):
    """Conv1D/Conv2D: per-example kernel/bias gradients when the explicit form is the cheaper one.

    The kernel's come from ``norms.conv_per_example_grads`` (a fused kernel on
    a GPU, else the patches' matmul).
    """
    g_spatial = _channels_last(output_grad, layer.data_format)

    def kernel_grads():
        x, padding = _conv_input(layer, inputs)
        return conv_per_example_grads_of(x, g_spatial, layer.kernel_size, layer.strides, padding,
                                         layer.dilation_rate, with_sum_sq=True)

    return _matmul_layer_per_example_grads(
        layer.kernel, layer.bias if layer.use_bias else None, positions(g_spatial, layer.filters),
        math.prod(layer.kernel_size) * layer.kernel.shape[-2], kernel_grads)


def conv_weight_grads(layer, inputs, cotangent):
    """Conv1D/Conv2D: its weight gradients at a 16-bit cotangent (``registry.GhostNormRule.weight_grads``), the
    kernel's from ``norms.conv_weight_grad`` (a fused kernel on a GPU, else one matmul per kernel offset over the
    batch's positions)."""
    g_spatial = _channels_last(cotangent, layer.data_format)

    def kernel_grad():
        x, padding = _conv_input(layer, inputs)
        return conv_weight_grad(x, g_spatial, layer.kernel_size, layer.strides, padding, layer.dilation_rate)

    return _matmul_weight_grads(layer.kernel, layer.bias if layer.use_bias else None, None,
                                positions(g_spatial, layer.filters), kernel_grad)


@register_ghost_norm(keras.layers.Conv1D, keras.layers.Conv2D, activation_attr="activation",
                     unsupported=_conv_unsupported, per_example_grads=conv_per_example_grads, views=True,
                     weight_grads=conv_weight_grads, matmul_share=lambda layer, inputs: True)
def conv_sq_norms(layer, inputs, output_grad):
    """Conv1D/Conv2D: the matmul ``patches_i (T × k·C) @ W (k·C × filters)``, T = output positions.

    The ghost form's patch Gram comes from the input's own Gram where that
    takes fewer multiply-adds (``norms.patch_gram``).
    """
    g = _conv_output_grad(layer, output_grad)
    total = 0.0
    if _trainable(layer.kernel):
        total = total + matmul_grad_sq_norms(_conv_blocks(layer, inputs), g, gram_a=_conv_patch_gram(layer, inputs))
    if layer.use_bias and _trainable(layer.bias):
        total = total + position_sum_sq(g)
    return total


# --------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------


@register_ghost_norm(keras.layers.Embedding, unsupported=_no_lora_or_quantization, views=True)
def embedding_sq_norms(layer, inputs, output_grad):
    """Embedding: ``∇E_i[v] = Σ_{t: id_t = v} g_t``, so ``‖∇E_i‖² = Σ_{t,s} [id_t = id_s] ⟨g_t, g_s⟩``.

    O(T² p) per example, independent of the vocabulary size.
    """
    if not _trainable(layer.embeddings):
        return ops.zeros((num_examples(output_grad),), "float32")
    ids = ops.reshape(ops.cast(inputs, "int32"), (num_examples(inputs), -1))
    g = positions(_f32(output_grad), layer.output_dim)
    if ids.shape[1] == 1:
        return per_example_sum_sq(g)
    same = ops.cast(ops.equal(ids[:, :, None], ids[:, None, :]), "float32")
    return ops.sum(same * ops.einsum("btp,bsp->bts", g, g), axis=(1, 2))


# --------------------------------------------------------------------------
# Normalization scale and offset
# --------------------------------------------------------------------------


def _normalized(layer, inputs):
    """The layer's output with ``gamma = 1`` and ``beta = 0``: x̂, with ``out = x̂·γ + β``.

    Re-runs the layer's own ``call`` (so its epsilon, axes and RMS options are
    honoured) with its affine variables replaced in a ``StatelessScope``.
    """
    mapping = [(v, ops.ones(v.shape, v.dtype)) for v in [layer.gamma] if v is not None]
    mapping += [(v, ops.zeros(v.shape, v.dtype)) for v in [layer.beta] if v is not None]
    with keras.StatelessScope(state_mapping=mapping):
        return _f32(type(layer).call(layer, inputs))


def _affine_per_example_grads(layer, inputs, output_grad, param_axes):
    """Scale/offset grads ``Σ g ⊙ x̂`` and ``Σ g`` over all non-batch axes outside ``param_axes``.

    They have the size of the layer's parameters per example (B×C for
    GroupNorm), so they are always formed: the clipped sum is then
    ``Σ_i c_i ∇γ_i`` with no weight-gradient pass over the activations.
    """
    g = _f32(output_grad)
    rank = len(g.shape)
    param_axes = {a % rank for a in param_axes}
    reduce = tuple(a for a in range(1, rank) if a not in param_axes)
    pairs = []
    if _trainable(layer.gamma):
        pairs.append(per_example(layer.gamma, example_sums(ops.sum(g * _normalized(layer, inputs), axis=reduce))))
    if _trainable(layer.beta):
        pairs.append(per_example(layer.beta, example_sums(ops.sum(g, axis=reduce))))
    return pairs


def layer_norm_per_example_grads(layer, inputs, output_grad):
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return _affine_per_example_grads(layer, inputs, output_grad, axes)


def group_norm_per_example_grads(layer, inputs, output_grad):
    return _affine_per_example_grads(layer, inputs, output_grad, [layer.axis])


register_ghost_norm(keras.layers.LayerNormalization, per_example_grads=layer_norm_per_example_grads, views=True)(
    sq_norms_from(layer_norm_per_example_grads))
register_ghost_norm(keras.layers.GroupNormalization, per_example_grads=group_norm_per_example_grads, views=True)(
    sq_norms_from(group_norm_per_example_grads))
