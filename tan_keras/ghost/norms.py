"""The matmul norm math of ghost clipping, backend-neutral (``keras.ops`` only).

Fast ("mixed ghost") clipping, Li et al. ICLR'22 (arXiv 2110.05679), after
Goodfellow 2015 and Lee & Kifer 2021. For a layer ``z = a W + b`` applied to
the ``T`` positions of one example (tokens, pixels of a conv's output), the
example's weight gradient is ``∇W_i = a_iᵀ g_i`` with ``a_i`` (T×d) the layer
input and ``g_i = ∂ℓ_i/∂z_i`` (T×p) the output gradient, so

    ‖∇W_i‖²_F = ⟨a_i a_iᵀ, g_i g_iᵀ⟩     (ghost: O(T²(d+p)), memory T²)
              = ‖a_iᵀ g_i‖²_F            (explicit: O(T d p), memory d p)
    ‖∇b_i‖²   = ‖Σ_t g_i,t‖²

and the per-layer choice between the two forms is made by cost
(``registry.use_ghost``). Convolutions are the same matmul over their
unfolded input patches (``shifted_inputs``: one block per kernel offset,
never concatenated for the ghost form).

The helpers here are the building blocks of a rule (``register_ghost_norm``):
``positions`` reshapes to ``(B, T, d)``, ``example_sums`` sums a per-row
quantity over the rows of each example, ``per_example`` pairs a variable with
its per-example gradients, ``sq_norms_from`` turns a ``per_example_grads``
rule into a ``sq_norms`` rule.

**Examples of several rows (AugMult).** Under augmentation multiplicity (TAN
App. C, Eq. 5) the network runs on the K views of each example, K consecutive
rows of its batch, and the unit of privacy is the example:
``∇ℓ_i = Σ_j ∇ℓ_ij`` over its views (the loss holds the 1/K). For a matmul
layer ``∇W_i = Σ_j a_ijᵀ g_ij``: the views' positions together are the
example's positions (``T → K·T``), so ``positions`` of a row-major batch of
``n·K`` rows reshaped to ``(n, K·T, d)`` gives the example's matrices, and
every norm form above is unchanged. Quantities computed per row (a bias or
scale gradient) are summed over the views by ``example_sums`` before they are
squared. ``example_rows(K)`` sets K while a ghost step computes its norms
(``bookkeeping.norms_and_clipped_sum``); a rule written with these helpers
declares it with ``register_ghost_norm(..., views=True)``.
"""

import contextlib
import itertools
import math

from keras import ops

from tan_keras.ghost.registry import use_ghost
from tan_keras.per_example import einsum_f32, fused_conv_per_example_grads, fused_conv_weight_grad

_ROWS = [1]  # rows of a layer's batch per example: K under AugMult (``example_rows``)
_OPERAND_NORMS = [None]  # while ``operand_norms`` is active: its list of ‖a_i‖_F ‖g_i‖_F, one per matmul


@contextlib.contextmanager
def example_rows(rows):
    """While it is active, every ``rows`` consecutive rows of a layer's batch form one example (AugMult's K)."""
    previous = _ROWS[0]
    _ROWS[0] = int(rows)
    try:
        yield
    finally:
        _ROWS[0] = previous


@contextlib.contextmanager
def operand_norms():
    """While active, each ``matmul_grad_sq_norms`` appends ``‖a_i‖_F ‖g_i‖_F`` (B,) of its two operands to the
    yielded list: read off the Grams' traces in the ghost form (``‖a_i‖²_F = tr(a_i a_iᵀ)``), so at no extra
    pass over the operands. Book-keeping bounds a GPU's TF32 rounding with them (``bookkeeping.rounding_slack``)."""
    previous = _OPERAND_NORMS[0]
    _OPERAND_NORMS[0] = found = []
    try:
        yield found
    finally:
        _OPERAND_NORMS[0] = previous


def _record_operand_norms(a_sq, g_sq):
    if _OPERAND_NORMS[0] is not None:
        _OPERAND_NORMS[0].append(ops.sqrt(ops.maximum(a_sq, 0.0) * ops.maximum(g_sq, 0.0)))


def _trace(gram):
    """``tr(G_i)`` (B,) of a batch of (B, T, T) Grams, as ``Σ_{t,s} G_ts [t = s]``: a masked reduction of the
    whole Gram, which XLA can fuse with the ghost norm's own reduction of it. (A diagonal is a gather: on an
    H200 the ViT's traces took 0.23 ms of a 13.3 ms fp32 step that way.)"""
    return ops.sum(gram * ops.eye(gram.shape[1], dtype=gram.dtype), axis=(1, 2))


def num_examples(x):
    """Examples in the batch of rows ``x``: ``rows / K``."""
    return ops.shape(x)[0] // _ROWS[0]


def example_sums(x):
    """``(n·K, ...) → (n, ...)``: a per-row quantity (a bias gradient) summed over the K rows of each example."""
    if _ROWS[0] == 1:
        return x
    return ops.sum(ops.reshape(x, (-1, _ROWS[0]) + tuple(x.shape[1:])), axis=1)


def _f32(x):
    return ops.cast(x, "float32")


def per_example_sum_sq(x):
    """``Σ x_i²`` over all but the leading (example) axis: (B,). ``x`` is per example (see ``example_sums``)."""
    return ops.sum(ops.reshape(ops.square(x), (ops.shape(x)[0], -1)), axis=1)


def positions(x, last):
    """Reshapes a batch of rows ``(n·K, ..., last)`` to ``(n, T, last)``: the positions of each example.

    K is 1 but under AugMult (``example_rows``): the positions of an
    example are those of its K views, row-major (``T = K·T_row``).
    """
    return ops.reshape(x, (num_examples(x), -1, last))


def _as_blocks(a):
    """A list of (B, T, d_j) blocks from one (B, T, d) tensor or a list of them."""
    return list(a) if isinstance(a, (list, tuple)) else [a]


def matmul_grad_sq_norms(a, g, gram_a=None):
    """``‖a_iᵀ g_i‖²_F`` for ``a`` (B, T, d) and ``g`` (B, T, p): per-example norms of a matmul's weight grad.

    Ghost form ``Σ_{t,s} (a_i a_iᵀ)_{ts} (g_i g_iᵀ)_{ts}`` or explicit form
    ``Σ (a_iᵀ g_i)²``, whichever ``use_ghost`` picks. ``a`` may also be a list
    of blocks ``(B, T, d_j)`` standing for their concatenation along the last
    axis (a conv's input patches, one block per kernel offset), which is never
    formed. ``gram_a``: optional ``() -> (B, T, T)`` giving ``a_i a_iᵀ`` another
    way (a conv's ``patch_gram``), used by the ghost form.

    Precision: the operands keep their dtype (bf16 activations and output
    gradients under ``mixed_bfloat16``); products and sums are float32
    (``einsum_f32``), so the norms are those of the float32 product of the
    same values, as when the operands are cast first, at half the bytes.
    """
    blocks = _as_blocks(a)
    num_positions, out_dim = g.shape[1], g.shape[2]
    in_dim = sum(b.shape[2] for b in blocks)
    if num_positions == 1 or not use_ghost(num_positions, in_dim, out_dim):
        if num_positions == 1 or _OPERAND_NORMS[0] is not None:
            a_sq = sum(ops.sum(ops.square(_f32(b)), axis=(1, 2)) for b in blocks)
            g_sq = ops.sum(ops.square(_f32(g)), axis=(1, 2))
            _record_operand_norms(a_sq, g_sq)
        if num_positions == 1:
            return a_sq * g_sq
        return per_example_sum_sq(matmul_per_example_grads(blocks, g))
    gram_a = gram_a() if gram_a is not None else sum(einsum_f32("btd,bsd->bts", b, b) for b in blocks)
    gram_g = einsum_f32("btp,bsp->bts", g, g)
    _record_operand_norms(_trace(gram_a), _trace(gram_g))
    return ops.sum(gram_a * gram_g, axis=(1, 2))


def matmul_per_example_grads(a, g):
    """``a_iᵀ g_i``: (B, d, p) per-example weight gradients of a matmul over T positions.

    ``a`` is (B, T, d) or a list of blocks (B, T, d_j) standing for their
    concatenation along the last axis (a conv's patches, one block per kernel
    offset). The blocks are concatenated so that one batched matmul of depth T
    reads ``g`` once (one matmul per block re-reads it for every offset).
    The result is float32 (``einsum_f32``), whatever the operands' dtype: the
    norm and the clipped sum then use the same per-example gradient.
    """
    blocks = _as_blocks(a)
    a = blocks[0] if len(blocks) == 1 else ops.concatenate(blocks, axis=-1)
    return einsum_f32("btd,btp->bdp", a, g)


def matmul_weight_grad(a, g):
    """``Σ_{i,t} a_itᵀ g_it``: (d, p) a matmul's weight gradient summed over the batch, float32.

    ``a`` (B, T, d) or a list of blocks (B, T, d_j) standing for their
    concatenation (a conv's patches, one block per kernel offset: one matmul
    each, rows in block order), ``g`` (B, T, p). 16-bit operands are
    multiplied exactly and summed in float32 (``einsum_f32``): book-keeping's
    share of a ghost-form layer at a 16-bit cotangent (``GhostNormRule.weight_grads``).
    """
    return ops.concatenate([einsum_f32("btd,btp->dp", b, g) for b in _as_blocks(a)], axis=0)


def conv_weight_grad(x, g, kernel_size, strides, padding, dilation_rate):
    """``(k·C, P)`` a channels-last conv's kernel gradient summed over the batch, float32 (rows as ``kernel.reshape``).

    ``x`` (B, *spatial, C) the layer input (causal padding applied, then
    ``"valid"``), ``g`` (B, *spatial_out, P). Where the backend has a fused
    kernel (JAX on a GPU, a window of more than one offset:
    ``per_example.fused_conv_weight_grad``) the offsets' shifted inputs are
    never formed; elsewhere ``matmul_weight_grad`` of the ``shifted_inputs``
    blocks. Both are float32 sums of the same products, exact for 16-bit
    operands.
    """
    if math.prod(kernel_size) > 1:
        fused = fused_conv_weight_grad(x, g, tuple(kernel_size), tuple(strides), padding, tuple(dilation_rate))
        if fused is not None:
            return fused
    return matmul_weight_grad(shifted_inputs(x, kernel_size, strides, padding, dilation_rate),
                              positions(g, g.shape[-1]))


def conv_per_example_grads(x, g, kernel_size, strides, padding, dilation_rate, with_sum_sq=False):
    """``(n, k·C, P)`` per-example kernel gradients of a channels-last conv (rows as ``kernel.reshape``).

    ``x`` is the layer input ``(n·K, *spatial, C)`` (causal padding already
    applied, then ``"valid"``) and ``g`` the output gradient
    ``(n·K, *spatial_out, P)``. Where the backend has a fused kernel for the
    conv (JAX on a GPU, a window of more than one offset:
    ``per_example.fused_conv_per_example_grads``) the input patches are never
    formed; elsewhere ``matmul_per_example_grads`` of the ``shifted_inputs``
    blocks. Both are the float32 sums ``Σ_t patch_tᵀ g_t`` of the same values;
    the kernel stores those of 16-bit operands rounded to their dtype.

    ``with_sum_sq``: return ``(grads, ‖grads_i‖²)`` instead; the fused kernel
    sums the squares of its own tiles, so the gradients are not read again
    for the norm (else ``per_example_sum_sq``).
    """
    if math.prod(kernel_size) > 1:
        fused = fused_conv_per_example_grads(x, g, tuple(kernel_size), tuple(strides), padding,
                                             tuple(dilation_rate), views=_ROWS[0])
        if fused is not None:
            return fused if with_sum_sq else fused[0]
    grads = matmul_per_example_grads(shifted_inputs(x, kernel_size, strides, padding, dilation_rate),
                                     positions(g, g.shape[-1]))
    return (grads, per_example_sum_sq(grads)) if with_sum_sq else grads


def sq_norms_from(per_example_grads):
    """A ``sq_norms`` rule from a ``per_example_grads`` rule that always returns its (small) gradients."""

    def sq_norms(layer, inputs, output_grad):
        total = ops.zeros((num_examples(output_grad),), "float32")
        for entry in per_example_grads(layer, inputs, output_grad):
            total = total + entry_sum_sq(entry)
        return total

    sq_norms.__doc__ = per_example_grads.__doc__
    return sq_norms


def per_example(variable, grads, sum_sq=None):
    """``(variable, grads)`` with ``grads`` reshaped to ``(B, *variable.shape)``; ``(variable, grads, sum_sq)``
    where the (B,) square sums ``‖grads_i‖²`` are already known (``entry_sum_sq``)."""
    grads = ops.reshape(grads, (ops.shape(grads)[0],) + tuple(variable.shape))
    return (variable, grads) if sum_sq is None else (variable, grads, sum_sq)


def entry_sum_sq(entry):
    """``‖G_i‖²`` (B,) of a ``per_example_grads`` entry ``(variable, G)`` or ``(variable, G, known square sums)``."""
    return entry[2] if len(entry) > 2 else per_example_sum_sq(entry[1])


def position_sum_sq(g):
    """``‖Σ_t g_i,t‖²`` for ``g`` (B, T, p): per-example norms of a bias grad (summed in float32)."""
    return ops.sum(ops.square(ops.sum(_f32(g), axis=1)), axis=1)


def _trainable(variable):
    return variable is not None and variable.trainable


def conv_padding(spatial, kernel_size, strides, padding, dilation_rate):
    """``(pads, outs)``: TF/Keras "same"/"valid" padding ``[before, after]`` and output size per spatial axis.

    "same": ``out = ⌈size/s⌉`` and ``max((out−1)·s + span − size, 0)`` pixels,
    the extra one after; "valid": ``out = ⌊(size − span)/s⌋ + 1``, no padding
    (``span = (k−1)·d + 1``).
    """
    pads, outs = [], []
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
    return pads, outs


def shifted_inputs(inputs, kernel_size, strides, padding, dilation_rate):
    """A channels-last conv's input patches as one ``(B, T, C)`` block per kernel offset.

    Block j holds, for every output position t, the input pixel that kernel
    offset j (row-major over ``kernel_size``) multiplies: the conv is
    ``z_t = Σ_j block_j[t] @ W[j]``. Strided slices of the padded input (the
    conv's own TF-style "same"/"valid" padding, ``conv_padding``), so no
    ``k``-fold patch tensor is built.
    """
    x, windows, _ = _padded_windows(inputs, kernel_size, strides, padding, dilation_rate)
    return [positions(x[(slice(None),) + window + (slice(None),)], x.shape[-1]) for window in windows]


def _padded_windows(inputs, kernel_size, strides, padding, dilation_rate):
    """``(x, windows, outs)``: the input with the conv's padding (``conv_padding``), one tuple of spatial slices per
    kernel offset (row-major) picking the pixels that offset multiplies, and the output's spatial size."""
    x = inputs
    spatial_pads, outs = conv_padding(x.shape[1:-1], kernel_size, strides, padding, dilation_rate)
    if any(p != [0, 0] for p in spatial_pads):
        x = ops.pad(x, [[0, 0]] + spatial_pads + [[0, 0]])
    return x, _windows(kernel_size, strides, dilation_rate, outs), outs


def _windows(kernel_size, strides, dilation_rate, outs):
    """One tuple of spatial slices of the padded input per kernel offset (row-major): the pixels it multiplies."""
    return [tuple(slice(j * d, j * d + s * (out - 1) + 1, s)
                  for j, d, s, out in zip(offset, dilation_rate, strides, outs))
            for offset in itertools.product(*(range(k) for k in kernel_size))]


def patch_gram(inputs, kernel_size, strides, padding, dilation_rate):
    """``(n, T, T)``: the Gram ``⟨patch_t, patch_s⟩`` of a channels-last conv's input patches, per example.

    A patch is the concatenation over kernel offsets j of the (padded) input
    pixel ``p_j(t)`` that offset j multiplies at output position t, so

        ⟨patch_t, patch_s⟩ = Σ_j G[p_j(t), p_j(s)],      G = x xᵀ over the padded input's pixels:

    one matmul of the input with itself and a sum of k strided windows of
    ``G``, instead of one Gram per offset over k copies of the input
    (``shifted_inputs``). A padding pixel is 0, so ``G`` is the Gram of the
    unpadded input with zero rows and columns added: the matmul runs on the
    input's own pixels (WRN's 8×8 layers: 64 instead of 100 per side) and
    no padded copy of the input is made. Under AugMult the example's
    positions are its K views' (``positions``): ``G`` then spans the K
    views' pixels.
    """
    spatial = tuple(inputs.shape[1:-1])
    spatial_pads, outs = conv_padding(spatial, kernel_size, strides, padding, dilation_rate)
    flat = positions(inputs, inputs.shape[-1])  # (n, K·P, C)
    views = flat.shape[1] // math.prod(spatial)
    gram = ops.reshape(einsum_f32("bpc,bqc->bpq", flat, flat), (-1, views) + spatial + (views,) + spatial)
    if any(p != [0, 0] for p in spatial_pads):
        gram = ops.pad(gram, [[0, 0], [0, 0]] + spatial_pads + [[0, 0]] + spatial_pads)
    total = 0.0
    for window in _windows(kernel_size, strides, dilation_rate, outs):
        total = total + gram[(slice(None), slice(None)) + window + (slice(None),) + window]
    size = views * math.prod(outs)
    return ops.reshape(total, (-1, size, size))


def cheaper_patch_gram(inputs, kernel_size, strides, padding, dilation_rate):
    """``() -> patch_gram(inputs, ...)`` where it is the cheaper Gram (``patch_gram_is_cheaper``; never for one
    kernel offset), else None: a conv rule's ``gram_a`` for ``matmul_grad_sq_norms``."""
    if not patch_gram_is_cheaper(inputs.shape[1:-1], kernel_size, strides, padding, dilation_rate):
        return None
    return lambda: patch_gram(inputs, kernel_size, strides, padding, dilation_rate)


def patch_gram_is_cheaper(spatial, kernel_size, strides, padding, dilation_rate):
    """Whether ``patch_gram`` takes fewer multiply-adds than one Gram per kernel offset: ``P² < k·T²``
    (P padded input pixels, T output positions, k offsets)."""
    spatial_pads, outs = conv_padding(spatial, kernel_size, strides, padding, dilation_rate)
    padded = math.prod(size + sum(p) for size, p in zip(spatial, spatial_pads))
    return padded**2 < math.prod(kernel_size) * math.prod(outs) ** 2
