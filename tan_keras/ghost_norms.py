"""Ghost norms: per-example gradient norms without per-example gradients.

Fast ("mixed ghost") clipping, Li et al. ICLR'22 (arXiv 2110.05679), after
Goodfellow 2015 and Lee & Kifer 2021. For a layer ``z = a W + b`` applied to
the ``T`` positions of one example (tokens, pixels of a conv's output), the
example's weight gradient is ``∇W_i = a_iᵀ g_i`` with ``a_i`` (T×d) the layer
input and ``g_i = ∂ℓ_i/∂z_i`` (T×p) the output gradient, so

    ‖∇W_i‖²_F = ⟨a_i a_iᵀ, g_i g_iᵀ⟩     (ghost: O(T²(d+p)), memory T²)
              = ‖a_iᵀ g_i‖²_F            (explicit: O(T d p), memory d p)
    ‖∇b_i‖²   = ‖Σ_t g_i,t‖²

and the per-layer choice between the two forms is made by cost ("mixed"
ghost clipping; ``use_ghost``). Convolutions are the same matmul
over their unfolded input patches. A train step then needs one forward and
one backward pass of the ordinary batched model, for the output gradients
``g_i`` (hence the norms and the clip factors ``c_i = min(1, C/‖∇ℓ_i‖)``);
the clipped sum ``Σ_i clip_C(∇ℓ_i)`` is assembled layer by layer from the
recorded ``a`` and ``g`` (book-keeping: ``norms_and_clipped_sum``).

This module is the backend-neutral half (``keras.ops`` only):

* the registry: ``@register_ghost_norm(keras.layers.Dense, ...)`` maps a
  Keras layer class to a function ``(layer, inputs, output_grad) -> (B,)``
  giving the squared per-example norm of the gradient of all the layer's
  trainable weights (Opacus's ``register_grad_sampler`` pattern), and
  optionally to a function giving the per-example gradients themselves where
  they are cheap;
* ``ghost_plan(model)``: which layers to watch, or why the model must use the
  vectorized per-example path instead;
* ``capture(...)``: runs the model with every watched layer's call
  intercepted, recording its input and handing its *pre-activation* output to
  a backend ``tap`` (TF records it for ``tape.gradient``; JAX adds a zero
  "probe" input whose gradient is the output gradient).

The train steps that use them live in ``tan_keras.per_example.ghost_jax`` and
``tan_keras.per_example.ghost_tensorflow``.

.. warning:: Rules are looked up by *exact* layer class (or by registered
   Keras name), never by ``isinstance``: a subclass may change the math (a
   weight-standardized conv is not a conv in its kernel). Register subclasses
   explicitly.

.. warning:: The per-example decomposition assumes examples do not interact
   in the forward pass (no BatchNormalization: ``check_private_layers``) and
   that each watched layer is called once per forward pass (weight sharing
   falls back to the vectorized path). Dropout is allowed, but the masks drawn
   in a batched pass differ from those of the vectorized path. Book-keeping
   also needs a layer's weights to reach the loss only through its own call;
   ``capture(..., foreign_reads=...)`` records any other read when the step is
   traced (a layer reading another layer's variables sends the step to the
   vectorized path).
"""

import contextlib
import dataclasses
import logging
import itertools
import math
import string
from typing import Callable, Optional

import keras
from keras import ops

from tan_keras import clipping

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GhostNormRule:
    """How one layer class gives its per-example squared gradient norms.

    Attributes:
      sq_norms: ``(layer, inputs, output_grad) -> (B,)`` squared L2 norm of
        each example's gradient w.r.t. all trainable weights of the layer.
        ``inputs`` is the first argument of the layer's ``call``;
        ``output_grad`` is ``∂(Σ_i ℓ_i)/∂z`` for the layer's (pre-activation)
        output ``z``, whose example-i slice is ``∂ℓ_i/∂z_i``.
      activation_attr: name of an attribute holding a built-in activation
        (``Dense(..., activation="relu")``). It is switched off while the layer
        runs, so the captured output is the pre-activation ``z``, and applied
        afterwards.
      unsupported: ``layer -> reason or None`` for configurations the rule
        does not cover (LoRA, quantization, grouped convs, ...).
      per_example_grads: optional ``(layer, inputs, output_grad) ->
        [(variable, (B, *variable.shape)), ...] or None``: the per-example
        gradients themselves when they are the cheaper form (``use_ghost``
        says no), else None. When given, they serve both the norms and the
        clipped sum ``Σ_i c_i ∇W_i`` (no weight-gradient pass for the layer).
    """

    sq_norms: Callable
    activation_attr: Optional[str] = None
    unsupported: Optional[Callable] = None
    per_example_grads: Optional[Callable] = None


_RULES = {}


def register_ghost_norm(*layer_types, activation_attr=None, unsupported=None, per_example_grads=None):
    """Decorator registering ``fn(layer, inputs, output_grad) -> (B,)`` for layer classes.

    ``layer_types`` are Keras layer classes, or registered Keras names
    (``"package>ClassName"``, as ``keras.saving.get_registered_name`` gives) for
    layers defined where this module cannot import them. Example::

        @register_ghost_norm(MyScale)
        def my_scale_sq_norms(layer, inputs, output_grad):
            g = ops.sum(output_grad * inputs, axis=range(1, len(inputs.shape) - 1))
            return ops.sum(ops.square(g), axis=-1)
    """

    def decorator(fn):
        rule = GhostNormRule(fn, activation_attr, unsupported, per_example_grads)
        for layer_type in layer_types:
            _RULES[layer_type] = rule
        return fn

    return decorator


def rule_for(layer):
    """The rule registered for ``type(layer)`` (exact class, then registered name), or None.

    A subclassed model made private in place (``make_private``) is looked up
    by its own class, not by the ``Private...`` class swapped in.
    """
    cls = type(layer).__dict__.get("_private_base", type(layer))
    rule = _RULES.get(cls)
    if rule is None:
        rule = _RULES.get(keras.saving.get_registered_name(cls))
    return rule


# --------------------------------------------------------------------------
# Norm mode: "auto" (by cost), or forced "ghost" / "explicit" (tests, benchmarks)
# --------------------------------------------------------------------------

_MODE = ["auto"]


@contextlib.contextmanager
def norm_mode(mode):
    """Forces the ghost (``"ghost"``) or materialized (``"explicit"``) form while tracing.

    ``"auto"`` (the default) picks the cheaper form per layer. The forms are
    mathematically equal; forcing one exists to test and time both.
    """
    if mode not in ("auto", "ghost", "explicit"):
        raise ValueError(f"`mode` must be 'auto', 'ghost' or 'explicit', got {mode!r}.")
    previous = _MODE[0]
    _MODE[0] = mode
    try:
        yield
    finally:
        _MODE[0] = previous


def use_ghost(num_positions, in_dim, out_dim):
    """The ghost form iff it takes fewer multiply-adds: ``T²(d+p) < T·d·p``, i.e. ``T(d+p) < d·p``.

    Per example, the ghost form builds two T×T Grams (``T²(d+p)``), the
    explicit form the d×p gradient (``T·d·p``). When the ghost form wins,
    ``T < dp/(d+p) < min(d, p)``, so its ``T²`` memory is also below the
    explicit form's ``d·p``. Li et al.'s memory rule (ghost iff ``2T² < dp``)
    picks the ghost form for some layers where it is slower: on one H100 at
    B = 1,024, WRN-16-4's 3×3 128→128 convs at 16×16 (T=256, d=1152, p=128)
    take 3.2 ms in the ghost form and 2.1 ms explicitly.
    """
    if _MODE[0] != "auto":
        return _MODE[0] == "ghost"
    if num_positions is None:
        return False
    return num_positions * (in_dim + out_dim) < in_dim * out_dim


# --------------------------------------------------------------------------
# Shared formulas
# --------------------------------------------------------------------------


def _f32(x):
    return ops.cast(x, "float32")


def _per_example_sum_sq(x):
    """``Σ x_i²`` over all but the leading (example) axis: (B,)."""
    return ops.sum(ops.reshape(ops.square(x), (ops.shape(x)[0], -1)), axis=1)


def _positions(x, last):
    """Reshapes ``(B, ..., last)`` to ``(B, T, last)``."""
    return ops.reshape(x, (ops.shape(x)[0], -1, last))


def _as_blocks(a):
    """A list of (B, T, d_j) blocks from one (B, T, d) tensor or a list of them."""
    return list(a) if isinstance(a, (list, tuple)) else [a]


def matmul_grad_sq_norms(a, g):
    """``‖a_iᵀ g_i‖²_F`` for ``a`` (B, T, d) and ``g`` (B, T, p): per-example norms of a matmul's weight grad.

    Ghost form ``Σ_{t,s} (a_i a_iᵀ)_{ts} (g_i g_iᵀ)_{ts}`` or explicit form
    ``Σ (a_iᵀ g_i)²``, whichever ``use_ghost`` picks. ``a`` may also be a list
    of blocks ``(B, T, d_j)`` standing for their concatenation along the last
    axis (a conv's input patches, one block per kernel offset), which is never
    formed.
    """
    blocks = _as_blocks(a)
    num_positions, out_dim = g.shape[1], g.shape[2]
    in_dim = sum(b.shape[2] for b in blocks)
    if num_positions == 1:
        a_sq = sum(ops.sum(ops.square(b), axis=(1, 2)) for b in blocks)
        return a_sq * ops.sum(ops.square(g), axis=(1, 2))
    if use_ghost(num_positions, in_dim, out_dim):
        gram_a = sum(ops.einsum("btd,bsd->bts", b, b) for b in blocks)
        gram_g = ops.einsum("btp,bsp->bts", g, g)
        return ops.sum(gram_a * gram_g, axis=(1, 2))
    return _per_example_sum_sq(matmul_per_example_grads(blocks, g))


def matmul_per_example_grads(a, g):
    """``a_iᵀ g_i``: (B, d, p) per-example weight gradients of a matmul over T positions.

    ``a`` is (B, T, d) or a list of blocks (B, T, d_j) standing for their
    concatenation along the last axis (a conv's patches, one block per kernel
    offset). The blocks are concatenated so that one batched matmul of depth T
    reads ``g`` once (one matmul per block re-reads it for every offset).
    """
    blocks = _as_blocks(a)
    a = blocks[0] if len(blocks) == 1 else ops.concatenate(blocks, axis=-1)
    return ops.einsum("btd,btp->bdp", a, g)


def _sq_norms_from(per_example_grads):
    """A ``sq_norms`` rule from a ``per_example_grads`` rule that always returns its (small) gradients."""

    def sq_norms(layer, inputs, output_grad):
        total = ops.zeros((ops.shape(output_grad)[0],), "float32")
        for _, grads in per_example_grads(layer, inputs, output_grad):
            total = total + _per_example_sum_sq(grads)
        return total

    sq_norms.__doc__ = per_example_grads.__doc__
    return sq_norms


def _per_example(variable, grads):
    """``(variable, grads)`` with ``grads`` reshaped to ``(B, *variable.shape)``."""
    return variable, ops.reshape(grads, (ops.shape(grads)[0],) + tuple(variable.shape))


def _position_sum_sq(g):
    """``‖Σ_t g_i,t‖²`` for ``g`` (B, T, p): per-example norms of a bias grad."""
    return ops.sum(ops.square(ops.sum(g, axis=1)), axis=1)


def _trainable(variable):
    return variable is not None and variable.trainable


def _no_lora_or_quantization(layer):
    if getattr(layer, "lora_enabled", False):
        return "LoRA is enabled"
    if getattr(layer, "quantization_mode", None) is not None:
        return f"it is quantized ({layer.quantization_mode})"
    return None


# --------------------------------------------------------------------------
# Dense, EinsumDense
# --------------------------------------------------------------------------


def _matmul_layer_per_example_grads(kernel, bias, a, g):
    """``[(kernel, (B, *kernel.shape)), (bias, (B, p))]`` for the trainable ones, or None (ghost cheaper, or T=1).

    With one position the ghost norm is a product of two norms and the clipped
    sum one matmul, so per-example gradients would only cost memory.
    """
    blocks = _as_blocks(a)
    num_positions, out_dim = g.shape[1], g.shape[2]
    in_dim = sum(b.shape[2] for b in blocks)
    if num_positions == 1 or (_trainable(kernel) and use_ghost(num_positions, in_dim, out_dim)):
        return None
    pairs = []
    if _trainable(kernel):
        pairs.append(_per_example(kernel, matmul_per_example_grads(blocks, g)))
    if _trainable(bias):
        pairs.append((bias, ops.sum(g, axis=1)))
    return pairs


def dense_per_example_grads(layer, inputs, output_grad):
    """Dense: per-example kernel/bias gradients when the explicit form is the cheaper one."""
    g = _positions(_f32(output_grad), layer.units)
    a = _positions(_f32(inputs), layer.kernel.shape[0])
    return _matmul_layer_per_example_grads(layer.kernel, layer.bias, a, g)


@register_ghost_norm(keras.layers.Dense, activation_attr="activation", unsupported=_no_lora_or_quantization,
                     per_example_grads=dense_per_example_grads)
def dense_sq_norms(layer, inputs, output_grad):
    """Dense on ``(B, ..., d)``: every leading non-batch axis is a position t."""
    g = _positions(_f32(output_grad), layer.units)
    total = 0.0
    if _trainable(layer.kernel):
        a = _positions(_f32(inputs), layer.kernel.shape[0])
        total = total + matmul_grad_sq_norms(a, g)
    if _trainable(layer.bias):
        total = total + _position_sum_sq(g)
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


@register_ghost_norm(keras.layers.EinsumDense, activation_attr="activation", unsupported=_einsum_dense_unsupported)
def einsum_dense_sq_norms(layer, inputs, output_grad):
    """EinsumDense ``out = einsum(eq, a, W) + b`` as a matmul over positions.

    Input letters shared with the output (not the kernel, not the batch) are
    positions T; kernel letters split into contracted (input side) and output
    side. A kernel letter on both sides (elementwise use of the kernel) has no
    matmul form: the explicit per-example gradient ``einsum(a, g)`` is used.
    """
    inp, ker, out = _einsum_subscripts(layer, len(inputs.shape))
    batch = inp[0]
    a, g = _f32(inputs), _f32(output_grad)
    total = 0.0
    if _trainable(layer.kernel):
        k_in = "".join(c for c in ker if c in inp and c not in out)
        k_out = "".join(c for c in ker if c in out and c not in inp)
        if len(k_in) + len(k_out) < len(ker):
            total = total + _per_example_sum_sq(ops.einsum(f"{inp},{out}->{batch}{ker}", a, g))
        else:
            pos = "".join(c for c in inp if c in out and c not in ker and c != batch)
            size = lambda letters: math.prod(layer.kernel.shape[ker.index(c)] for c in letters)  # noqa: E731
            a_mat = _positions(ops.einsum(f"{inp}->{batch}{pos}{k_in}", a), size(k_in))
            g_mat = _positions(ops.einsum(f"{out}->{batch}{pos}{k_out}", g), size(k_out))
            total = total + matmul_grad_sq_norms(a_mat, g_mat)
    if _trainable(layer.bias):
        total = total + _per_example_sum_sq(ops.einsum(f"{out}->{batch}{layer.bias_axes}", g))
    return total


# --------------------------------------------------------------------------
# Convolutions
# --------------------------------------------------------------------------


def shifted_inputs(inputs, kernel_size, strides, padding, dilation_rate):
    """A channels-last conv's input patches as one ``(B, T, C)`` block per kernel offset.

    Block j holds, for every output position t, the input pixel that kernel
    offset j (row-major over ``kernel_size``) multiplies: the conv is
    ``z_t = Σ_j block_j[t] @ W[j]``. Strided slices of the padded input (the
    conv's own TF-style "same"/"valid" padding), so no ``k``-fold patch tensor
    is built.
    """
    x = inputs
    spatial = x.shape[1:-1]
    pads, outs = [[0, 0]], []
    for size, k, s, d in zip(spatial, kernel_size, strides, dilation_rate):
        span = (k - 1) * d + 1
        if padding == "same":
            out = -(-size // s)
            total = max((out - 1) * s + span - size, 0)
            pads.append([total // 2, total - total // 2])
        else:
            out = (size - span) // s + 1
            pads.append([0, 0])
        outs.append(out)
    pads.append([0, 0])
    if any(p != [0, 0] for p in pads):
        x = ops.pad(x, pads)
    blocks = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        index = (slice(None),) + tuple(
            slice(j * d, j * d + s * (out - 1) + 1, s)
            for j, d, s, out in zip(offset, dilation_rate, strides, outs)) + (slice(None),)
        blocks.append(_positions(x[index], x.shape[-1]))
    return blocks


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


def _conv_blocks(layer, inputs):
    """A Conv1D/Conv2D's input patches, one (B, T, C) block per kernel offset (causal padding applied)."""
    x = _channels_last(_f32(inputs), layer.data_format)
    padding = layer.padding
    if padding == "causal":
        left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
        x = ops.pad(x, [[0, 0], [left, 0], [0, 0]])
        padding = "valid"
    return shifted_inputs(x, layer.kernel_size, layer.strides, padding, layer.dilation_rate)


def _conv_output_grad(layer, output_grad):
    return _positions(_channels_last(_f32(output_grad), layer.data_format), layer.filters)


def conv_per_example_grads(layer, inputs, output_grad):
    """Conv1D/Conv2D: per-example kernel/bias gradients when the explicit form is the cheaper one."""
    bias = layer.bias if layer.use_bias else None
    return _matmul_layer_per_example_grads(layer.kernel, bias, _conv_blocks(layer, inputs),
                                           _conv_output_grad(layer, output_grad))


@register_ghost_norm(keras.layers.Conv1D, keras.layers.Conv2D, activation_attr="activation",
                     unsupported=_conv_unsupported, per_example_grads=conv_per_example_grads)
def conv_sq_norms(layer, inputs, output_grad):
    """Conv1D/Conv2D: the matmul ``patches_i (T × k·C) @ W (k·C × filters)``, T = output positions."""
    g = _conv_output_grad(layer, output_grad)
    total = 0.0
    if _trainable(layer.kernel):
        total = total + matmul_grad_sq_norms(_conv_blocks(layer, inputs), g)
    if layer.use_bias and _trainable(layer.bias):
        total = total + _position_sum_sq(g)
    return total


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
    g = _positions(_f32(output_grad), layer.filters)
    blocks = shifted_inputs(_f32(inputs), layer.kernel_size, layer.strides, layer.padding, (1, 1))
    n = sum(b.shape[2] for b in blocks)
    if g.shape[1] == 1 or use_ghost(g.shape[1], n, layer.filters):
        return None
    u, scale = _ws_standardized(layer)
    _, plain = _per_example(layer.kernel, matmul_per_example_grads(blocks, g))
    alpha = ops.sum(plain * u, axis=(1, 2, 3))  # (B, filters)
    pairs = []
    if _trainable(layer.kernel):
        centred = plain - ops.mean(plain, axis=(1, 2, 3), keepdims=True)
        ratio = _f32(layer.gain) / scale
        pairs.append((layer.kernel, ratio[None, None, None, None] * (centred - alpha[:, None, None, None] * u)))
    if _trainable(layer.gain):
        pairs.append(_per_example(layer.gain, alpha))
    if layer.bias is not None and _trainable(layer.bias):
        pairs.append((layer.bias, ops.sum(g, axis=1)))
    return pairs


@register_ghost_norm("tan_keras>ScaledWSConv2D", per_example_grads=scaled_ws_conv_per_example_grads)
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
    the ghost form.
    """
    g = _positions(_f32(output_grad), layer.filters)
    total = 0.0
    if _trainable(layer.kernel) or _trainable(layer.gain):
        k, channels = math.prod(layer.kernel_size), layer.kernel.shape[2]
        n = k * channels
        u, scale = _ws_standardized(layer)
        u = ops.reshape(u, (k, channels, layer.filters))  # offsets row-major, as the blocks
        blocks = shifted_inputs(_f32(inputs), layer.kernel_size, layer.strides, layer.padding, (1, 1))
        patch_u = sum(ops.einsum("btc,co->bto", b, u[j]) for j, b in enumerate(blocks))  # patch_t · u_o
        alpha = ops.sum(patch_u * g, axis=1)  # (B, filters)
        if _trainable(layer.kernel):
            w = ops.square(_f32(layer.gain) / scale)  # (γ_o/s_o)²
            weighted = matmul_grad_sq_norms(blocks, g * ops.sqrt(w))
            patch_sums = sum(ops.sum(b, axis=2) for b in blocks)  # Σ_j patch_t,j, (B, T)
            col_sums = ops.einsum("bt,bto->bo", patch_sums, g)  # ΣG_o
            u_sq = ops.sum(ops.square(u), axis=(0, 1))  # ‖u_o‖²
            correction = ops.square(col_sums) / n + ops.square(alpha) * (2.0 - u_sq)
            total = total + weighted - ops.sum(w * correction, axis=1)
        if _trainable(layer.gain):
            total = total + ops.sum(ops.square(alpha), axis=1)
    if layer.bias is not None and _trainable(layer.bias):
        total = total + _position_sum_sq(g)
    return total


def skip_init_gain_per_example_grads(layer, inputs, output_grad):
    """NF-ResNet's ``z = α·s·x`` with a learnable scalar s: ``∇s_i = α Σ g_i ⊙ x_i``."""
    if not _trainable(layer.skip_gain):
        return []
    dot = ops.sum(ops.reshape(_f32(output_grad) * _f32(inputs), (ops.shape(inputs)[0], -1)), axis=1)
    return [_per_example(layer.skip_gain, layer.alpha * dot)]


register_ghost_norm("tan_keras>SkipInitGain", per_example_grads=skip_init_gain_per_example_grads)(
    _sq_norms_from(skip_init_gain_per_example_grads))


def diagonal_linear_network_per_example_grads(layer, inputs, output_grad):
    """DLN ``z = <β, x>``: ``∇β_i = g_i x_i``, then the chain rule through β's parametrization.

    ``β = w₊² − w₋²`` gives ``∇w₊ = 2w₊ ⊙ ∇β`` and ``∇w₋ = −2w₋ ⊙ ∇β``;
    ``β = u ⊙ v`` gives ``∇u = v ⊙ ∇β`` and ``∇v = u ⊙ ∇β``.
    """
    x = _positions(_f32(inputs), layer.dim)
    g = _positions(_f32(output_grad), 1)
    beta_grad = ops.sum(x * g, axis=1)  # (B, d)
    first, second = _f32(layer._first), _f32(layer._second)
    if layer.parametrization == "w_pm":
        first_scale, second_scale = 2.0 * first, -2.0 * second
    else:
        first_scale, second_scale = second, first
    pairs = []
    if _trainable(layer._first):
        pairs.append((layer._first, beta_grad * first_scale))
    if _trainable(layer._second):
        pairs.append((layer._second, beta_grad * second_scale))
    return pairs


register_ghost_norm("tan_keras>DiagonalLinearNetwork", per_example_grads=diagonal_linear_network_per_example_grads)(
    _sq_norms_from(diagonal_linear_network_per_example_grads))


# --------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------


@register_ghost_norm(keras.layers.Embedding, unsupported=_no_lora_or_quantization)
def embedding_sq_norms(layer, inputs, output_grad):
    """Embedding: ``∇E_i[v] = Σ_{t: id_t = v} g_t``, so ``‖∇E_i‖² = Σ_{t,s} [id_t = id_s] ⟨g_t, g_s⟩``.

    O(T² p) per example, independent of the vocabulary size.
    """
    if not _trainable(layer.embeddings):
        return ops.zeros((ops.shape(output_grad)[0],), "float32")
    ids = ops.reshape(ops.cast(inputs, "int32"), (ops.shape(inputs)[0], -1))
    g = _positions(_f32(output_grad), layer.output_dim)
    if ids.shape[1] == 1:
        return _per_example_sum_sq(g)
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
        pairs.append(_per_example(layer.gamma, ops.sum(g * _normalized(layer, inputs), axis=reduce)))
    if _trainable(layer.beta):
        pairs.append(_per_example(layer.beta, ops.sum(g, axis=reduce)))
    return pairs


def layer_norm_per_example_grads(layer, inputs, output_grad):
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return _affine_per_example_grads(layer, inputs, output_grad, axes)


def group_norm_per_example_grads(layer, inputs, output_grad):
    return _affine_per_example_grads(layer, inputs, output_grad, [layer.axis])


register_ghost_norm(keras.layers.LayerNormalization, per_example_grads=layer_norm_per_example_grads)(
    _sq_norms_from(layer_norm_per_example_grads))
register_ghost_norm(keras.layers.GroupNormalization, per_example_grads=group_norm_per_example_grads)(
    _sq_norms_from(group_norm_per_example_grads))


# --------------------------------------------------------------------------
# Which layers to watch, and the interception itself
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GhostPlan:
    """The layers whose calls a ghost step watches, or why it cannot run.

    Attributes:
      layers: ``(layer, rule)`` for every layer that owns trainable weights.
      reason: None if ghost clipping applies; else why the model needs the
        vectorized per-example path (the first layer that forced it).
    """

    layers: tuple
    reason: Optional[str] = None


def _own_trainable_variables(layer, among=None):
    """The trainable variables a layer owns itself (not its sublayers'), optionally only those with ids in ``among``."""
    return [v for v in layer._trainable_variables if v.trainable and (among is None or id(v) in among)]


def ghost_plan(model):
    """Checks that every trainable weight belongs to a layer with a ghost-norm rule."""
    model_vars = {id(v) for v in model.trainable_variables}
    layers = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        own = _own_trainable_variables(layer, model_vars)
        if getattr(layer, "activity_regularizer", None) is not None:
            return GhostPlan((), f"layer '{layer.name}' has an activity regularizer")
        if any(v.regularizer is not None for v in own):
            return GhostPlan((), f"layer '{layer.name}' has a weight regularizer")
        if not own:
            continue
        rule = rule_for(layer)
        if rule is None:
            return GhostPlan((), f"layer '{layer.name}' ({type(layer).__name__}) has trainable weights "
                                 "and no registered ghost-norm rule")
        reason = rule.unsupported(layer) if rule.unsupported else None
        if reason:
            return GhostPlan((), f"layer '{layer.name}' ({type(layer).__name__}): {reason}")
        layers.append((layer, rule))
    return GhostPlan(tuple(layers))


def check_calls(plan, calls):
    """Reason to fall back after tracing (a watched layer called twice), or None."""
    seen = set()
    for call in calls:
        if id(call.layer) in seen:
            return (f"layer '{call.layer.name}' is called more than once per forward pass "
                    "(shared weights)")
        seen.add(id(call.layer))
    return None


_LOGGED = set()


def log_fallback(model, reason):
    """Logs once per (model, reason) that ``model`` uses vectorized per-example gradients.

    A warning when the user asked for ``clipping="ghost"``; INFO under the
    default ``clipping="auto"``, for which the fallback is expected behaviour.
    """
    key = (id(model), reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        level = logging.INFO if getattr(model, "clipping", "ghost") == "auto" else logging.WARNING
        _log.log(level, "Ghost clipping is not available for model '%s': %s. Using vectorized "
                 "per-example gradients instead.", model.name, reason)


@dataclasses.dataclass
class LayerCall:
    """One intercepted call: the layer, its rule, its input, its (pre-activation) output, its arguments.

    ``args``/``kwargs`` are what ``layer.call`` received, so that
    ``pre_activation_output`` can run the call again (book-keeping).
    """

    layer: object
    rule: GhostNormRule
    inputs: object
    output: object
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def _activation_off(layer, rule):
    """Switches off a layer's built-in activation; yields it (or None)."""
    activation = getattr(layer, rule.activation_attr) if rule.activation_attr else None
    if activation is not None:
        object.__setattr__(layer, rule.activation_attr, None)
    try:
        yield activation
    finally:
        if activation is not None:
            object.__setattr__(layer, rule.activation_attr, activation)


def call_inputs(layer, args, kwargs):
    """The first argument of ``layer.call`` (its inputs), given positionally or by name."""
    return args[0] if args else kwargs[next(iter(layer._call_signature.parameters))]


def _drop_examples(call, keep):
    """``call`` with the rows of its (floating) input zeroed where ``keep`` is False."""
    inputs = call_inputs(call.layer, call.args, call.kwargs)
    if not (call.args and ops.is_tensor(inputs) and "float" in str(inputs.dtype)):
        return call
    return dataclasses.replace(call, args=(clipping.zero_rows(inputs, keep),) + tuple(call.args[1:]))


def pre_activation_output(call):
    """Runs a captured call again: ``z`` as a function of the layer's *current* variable values.

    The backends differentiate it w.r.t. the layer's own weights, with the
    cotangent ``c ⊙ g`` (see ``norms_and_clipped_sum``).
    """
    with _activation_off(call.layer, call.rule):
        # Through ``__call__``: it sets the layer's autocast scope (mixed precision) as the forward pass did.
        return call.layer(*call.args, **call.kwargs)


_ACTIVE_CALLS = []  # the watched layers whose call is running, innermost last
_MISSING = object()


@contextlib.contextmanager
def _foreign_reads(plan, found):
    """Records in ``found`` every read of a watched layer's weight outside that layer's own call.

    Book-keeping needs each weight to reach the loss through its own layer's
    output only. Keras reads a variable through its ``value`` property, so
    the property of the variables' classes is wrapped while the forward pass
    is traced (trace time only; nothing is added to the compiled step).
    """
    owned = [(v, layer) for layer, _ in plan.layers for v in _own_trainable_variables(layer)]
    owner = {id(v): layer for v, layer in owned}
    saved = []
    for cls in {type(v) for v, _ in owned}:
        base = next(k for k in cls.__mro__ if "value" in k.__dict__)
        original = base.__dict__["value"]

        def getter(variable, _original=original):
            layer = owner.get(id(variable))
            if layer is not None and (not _ACTIVE_CALLS or _ACTIVE_CALLS[-1] is not layer):
                where = f"in the call of layer '{_ACTIVE_CALLS[-1].name}'" if _ACTIVE_CALLS else "outside layer calls"
                found.append(f"weight '{variable.path}' of layer '{layer.name}' is read {where}")
            return _original.fget(variable)

        saved.append((cls, cls.__dict__.get("value", _MISSING)))
        cls.value = property(getter)
    try:
        yield found
    finally:
        for cls, previous in saved:
            if previous is _MISSING:
                del cls.value
            else:
                cls.value = previous


@contextlib.contextmanager
def capture(plan, tap, foreign_reads=None):
    """Intercepts the watched layers' calls; yields the list of ``LayerCall`` in call order.

    ``tap(index, z) -> z'`` receives each pre-activation output; what it returns
    (``z`` itself, or ``z + probe``) continues through the activation and the
    rest of the model. Works for any model whose forward pass calls its layers
    through ``Layer.__call__`` (functional, Sequential, subclassed).

    ``foreign_reads``: a list to which every read of a watched layer's weight
    outside that layer's own call is appended (a message each), or None.
    """
    calls = []
    patched = []

    def wrap(layer, rule):
        original = layer.call

        def call(*args, **kwargs):
            inputs = call_inputs(layer, args, kwargs)
            _ACTIVE_CALLS.append(layer)
            try:
                with _activation_off(layer, rule) as activation:
                    z = original(*args, **kwargs)
            finally:
                _ACTIVE_CALLS.pop()
            z = tap(len(calls), z)
            calls.append(LayerCall(layer, rule, inputs, z, args, kwargs))
            return activation(z) if activation is not None else z

        return call

    reads = _foreign_reads(plan, foreign_reads) if foreign_reads is not None else contextlib.nullcontext()
    try:
        for layer, rule in plan.layers:
            patched.append((layer, layer.__dict__.get("call")))
            layer.__dict__["call"] = wrap(layer, rule)
        with reads:
            yield calls
    finally:
        for layer, previous in patched:
            if previous is None:
                layer.__dict__.pop("call", None)
            else:
                layer.__dict__["call"] = previous


def foreign_read_reason(found):
    """The fall-back reason for the reads recorded by ``capture(..., foreign_reads=found)``, or None."""
    if not found:
        return None
    return f"{found[0]} (weights used outside their own layer's call; book-keeping would miss that use)"


def norms_and_clipped_sum(model, calls, output_grads, l2_norm_clip, layer_vjp, like):
    """Per-example norms ``‖∇ℓ_i‖`` and the clipped sum ``Σ_i c_i ∇ℓ_i``, layer by layer.

    Norms: ``‖∇ℓ_i‖² = Σ_layers ‖∇_layer ℓ_i‖²``, each term from the rule's
    ghost norm, or from its per-example gradients where those are the cheaper
    form (``GhostNormRule.per_example_grads``); ``c_i = min(1, C/‖∇ℓ_i‖)``.

    Clipped sum, by book-keeping (Bu et al., "Differentially Private
    Optimization on Large Model at Small Cost", ICML'23): a layer's weights
    ``W`` reach the loss only through its output ``z``, so

        Σ_i c_i ∇_W ℓ_i = (∂z/∂W)ᵀ (c ⊙ g),      g = ∂(Σ_i ℓ_i)/∂z,

    the layer's own weight gradient at its recorded arguments with the output
    gradient of the one backward pass scaled per example (``layer_vjp``), or
    ``Σ_i c_i G_i`` where the per-example gradients ``G_i`` were formed for
    the norm. Nothing is propagated through the network a second time.

    Args:
      model: the model; gradients are aligned with ``model.trainable_variables``.
      calls: the captured ``LayerCall`` (each watched layer at most once).
      output_grads: ``g`` for each call.
      l2_norm_clip: C.
      layer_vjp: backend function ``(call, variables, cotangent) -> grads``:
        the vector-Jacobian product of ``pre_activation_output(call)`` w.r.t.
        ``variables`` (some of the layer's own trainable variables).
      like: a (B,) tensor (the per-example losses) giving the batch size.

    Returns:
      ``(grads, norms)``: gradients aligned with ``model.trainable_variables``
      (zeros for a variable whose layer was not called) and the (B,) norms.
    """
    sq_norms = ops.zeros_like(like, dtype="float32")
    explicit = []
    for call, g in zip(calls, output_grads):
        rule = call.rule
        pairs = rule.per_example_grads(call.layer, call.inputs, g) if rule.per_example_grads else None
        explicit.append(pairs)
        if pairs is None:
            sq_norms = sq_norms + rule.sq_norms(call.layer, call.inputs, g)
        else:
            for _, grads in pairs:
                sq_norms = sq_norms + _per_example_sum_sq(grads)
    # max(., 0): the WS-conv formula subtracts, and can round a zero norm below 0.
    norms = ops.sqrt(ops.maximum(sq_norms, 0.0))
    factors = clipping.clip_factors(norms, l2_norm_clip)  # 0 for a non-finite norm
    keep = factors != 0

    variables = model.trainable_variables
    index = {id(v): i for i, v in enumerate(variables)}
    out = [None] * len(variables)
    for call, g, pairs in zip(calls, output_grads, explicit):
        own = _own_trainable_variables(call.layer, index)
        done = set()
        for v, grads in pairs or ():
            out[index[id(v)]] = ops.cast(clipping.weighted_sum([grads], factors)[0], v.dtype)
            done.add(id(v))
        rest = [v for v in own if id(v) not in done]
        if rest:
            scale = ops.reshape(ops.cast(factors, g.dtype), (-1,) + (1,) * (len(g.shape) - 1))
            # A dropped example (non-finite gradient) must add exactly 0: its rows of the
            # cotangent *and* of the layer's input are zeroed (NaN · 0 = NaN in the weight gradient).
            cotangent = clipping.zero_rows(g * scale, keep)
            for v, grad in zip(rest, layer_vjp(_drop_examples(call, keep), rest, cotangent)):
                out[index[id(v)]] = grad
    grads = [ops.zeros(v.shape, v.dtype) if g is None else g for v, g in zip(variables, out)]
    return grads, norms
