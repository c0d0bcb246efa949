"""Per-example weight gradients of a convolution in one fused GPU kernel (Pallas, Triton).

For a channels-last conv with kernel offsets ``o_j`` (row-major over the
kernel window), example ``i``'s weight gradient is

    ∇W_i[j] = Σ_t x_i[s·t + o_j]ᵀ g_i[t]        (C × P per offset j)

over its output positions ``t``, ``x`` the (padded) input, ``s`` the stride
and ``g = ∂ℓ/∂z``. XLA forms the ``k``-fold patch tensor (one copy of the
input per offset, concatenated) before one batched matmul: on an H200 that
concatenate was the largest single cost of a ghost step on a WRN (5.3 of its
10 extra ms at bf16, README "Where the DP step's time goes").

This kernel never forms the patches. ``x`` and ``g`` keep their own layouts
(flattened over their rows, a free reshape). A step takes a tile of
consecutive output positions; each offset's input pixels are then

* "shift" (stride 1, output as wide as the input: "same"): one contiguous
  slice of the flat input, at the constant shift ``(a·d_h − pad_top)·W +
  b·d_w − pad_left`` of offset ``(a, b)``, read in place: the rows outside
  the image (before its first pixel or after its last) and the columns
  outside it are masked in the load, which Triton still copies to shared
  memory asynchronously. (The flat input was once zero-padded for the rows
  outside: on an H200 those copies took 0.55 ms of WRN-16-4's 13.2 ms bf16
  ghost step at B = 1,024, and reading in place took the step from 76.4k to
  79.7k ex/s, docs/benchmarks/h200_2026-12-02d.)
* "gather" (strides, "valid"): each pixel's index computed from its
  position, clamped where it is padding and its value masked.

The last tile's positions past the end are masked in ``g``. One program
computes one ``(C-block × P-block)`` tile of the offsets of one row of the
window (they share each loaded ``g`` tile) for one example, summed over its K
views under AugMult, accumulating in float32: bf16 operands are multiplied
exactly (Triton's bf16 MMA), fp32 ones at the precision XLA's own matmuls
use (``jax_default_matmul_precision``). Each program also writes its tile's
square sum, so the example's ``‖∇W_i‖²`` comes with the gradients (the norm
would otherwise read them back once more). 16-bit layers get their
per-example gradients stored in their own dtype, each entry rounded once
from its float32 sum, and the square sums are those of the stored values:
the norm is that of what the clipped sum adds (``clipping.weighted_sum``
sums them in float32), and the gradients take half the memory and traffic
(WRN-16-4 at B = 1,024 under ``mixed_bfloat16``: 1.3 GB instead of 2.6 GB
per step, written once and read once; on an H200 the step went from 59.5k
to 66.8k ex/s and its peak memory from 4.66 to 2.49 GB, README). Channels
that are not a multiple of 16 (an RGB stem's 3) are zero-padded to one
first: the padded rows of ``∇W_i`` are 0. Narrower 16-bit inputs (fewer
than 16 channels, as an RGB stem's 3) are instead *packed*: the ``k_w·C`` pixels
and channels of one window row form the matmul's inner side, padded once to
a power of two (a 7×7 stem on RGB: 21 → 32 instead of 7 offsets of
3 → 16 each, 3.5× fewer multiply-adds and gathered values;
``_packed_rows``).

``fused_conv_per_example_grads`` returns None where the kernel does not apply
(not a GPU, fp32 layers wider than 64 channels, where cuBLAS is faster,
tensors of 2³¹ elements or more, Pallas missing) and the caller takes the
XLA path (``tan_keras.ghost.norms``).
``TAN_KERAS_FUSED_CONV``: ``auto`` (default: on GPUs), ``off``, or
``interpret`` (Pallas's interpreter on any device: the tests' way to check
the kernel's indexing against a one-example loop on a CPU).
"""

import functools
import math
import os

import jax
import jax.numpy as jnp

from tan_keras.ghost.norms import conv_padding

_MODES = ("auto", "off", "interpret")

# Measured on an H200 (JAX 0.11, B = 1,024, 3×3 "same", per-example gradients of one conv, ms; XLA's
# concatenate + batched matmul, then this kernel, in one process; README, docs/benchmarks/h200_2026-12-01_gather):
#   bf16   64→64 @32²: 1.53 → 0.406    128→128 @16²: 0.94 → 0.420    64→128 @32² stride 2: 0.52 → 0.39
#   fp32   64→64 @32²: 2.30 → 1.368    128→128 @16²: 1.01 → 1.458    (XLA's default TF32 precision)
# fp32 tiles of wider layers are slower than cuBLAS, so they keep the XLA path.
_FP32_MAX_CHANNELS = 64
# The batch-summed gradient (fused_conv_weight_grad), one H200, JAX 0.11, bf16, 3×3 "same", ms, the kernel at its
# own row groups against one matmul per offset over shifted copies (docs/benchmarks/h200_2026-12-02c):
#   8²  256→256, B = 1,024: 0.293 / 0.440    14² 256→256, B = 128: 0.105 / 0.152    28² 128→128, B = 128: 0.139 / 0.271
#   16² 128→256 stride 2, B = 1,024: 0.348 / 0.344    7² 512→512, B = 128: 0.160 / 0.120 (so wider layers keep
#   the matmuls); fp32 (TF32): 8² 256→256 1.57 against cuDNN's 0.62 on float32 operands (so it takes 16-bit ones).
_SUMMED_MAX_CHANNELS = 256


def _time_block(positions, layout):
    """Output positions per step: 64 where a "shift" program's loop is short, else 32.

    On an H200 (B = 1,024, bf16, 3×3, ms): 128→128 @16² (256 positions,
    "shift") 0.420 at 64, 0.522 at 32; 64→64 @32² 0.406 at 32, 0.468 at 64.
    A "gather" layout (strides) takes 32 whatever the length: 64→128 @32²
    stride 2 (256 positions) 0.333 at 32 against 0.474 at 64 alone (the
    2026-12-02 sweep, docs/benchmarks/h200_2026-12-02). In a whole step it
    did not show: WRN-16-4's bf16 ghost step (two such layers) ran at 71.7k
    ex/s with it and 73.6k without, within the calls' spread.
    """
    return 64 if positions <= 256 and layout == "shift" else 32


def _mode():
    mode = os.environ.get("TAN_KERAS_FUSED_CONV", "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"TAN_KERAS_FUSED_CONV is '{mode}'; use one of {', '.join(_MODES)}.")
    return mode


def _block(size, largest):
    """The largest power of two ≤ ``largest`` (and ≥ 16, Triton's smallest MMA side) dividing ``size``, or None."""
    block = largest
    while block >= 16:
        if size % block == 0:
            return block
        block //= 2
    return None


def fused_conv_per_example_grads(x, g, kernel_size, strides, padding, dilation_rate, views=1,
                                 time_block=None, block=64, row_programs=True, num_warps=4, num_stages=3):
    """``(grads, sum_sq)``: a 1-D/2-D conv's per-example kernel gradients and their square sums, or None.

    ``grads`` is ``(n, k_h·k_w·C, P)``, float32 for float32 operands and in
    the operands' dtype for 16-bit ones (float32 sums rounded once), and
    ``sum_sq`` the (n,) float32 ``‖grads_i‖²_F`` of those values (``None``: the
    kernel does not apply).

    Args:
      x: ``(n·K, [H,] W, C)`` channels-last layer input (its compute dtype).
      g: ``(n·K, [H_out,] W_out, P)`` output gradient ``∂ℓ/∂z``.
      kernel_size, strides, dilation_rate: the layer's (1 or 2 entries).
      padding: ``"same"`` or ``"valid"`` (causal: pad first, then ``"valid"``).
      views: K, rows per example (AugMult): each example's gradient sums its rows'.
      time_block, block, row_programs, num_warps, num_stages: the tiling (output
        positions per step, largest channel block, both powers of two; one
        window row or one offset per program) and Triton's launch parameters.
        ``time_block=None``: 64 for short loops of the "shift" layout (≤ 256
        positions per example and channel block), else 32 (``_time_block``).

    The rows of ``grads`` follow ``kernel.reshape(k_h·k_w·C, P)``, so
    ``reshape(grads, (n,) + kernel.shape)`` is the per-example kernel gradient.
    """
    return _fused(x, g, kernel_size, strides, padding, dilation_rate, views, out_dtype=None,
                  fp32_max_channels=_FP32_MAX_CHANNELS, time_block=time_block, block=block,
                  row_programs=row_programs, num_warps=num_warps, num_stages=num_stages)


def fused_conv_weight_grad(x, g, kernel_size, strides, padding, dilation_rate, partials=None,
                           time_block=None, block=64, num_warps=4, num_stages=3, fp32_any_width=False):
    """``Σ_rows ∇W_row``: a 1-D/2-D conv's kernel gradient summed over all rows of ``x``, ``(k_h·k_w·C, P)``
    float32, or None where the kernel does not apply.

    Book-keeping's share of a ghost-form conv at a 16-bit cotangent
    (``GhostNormRule.weight_grads``): ``Σ_i Σ_t patch_itᵀ ĝ_it`` with ``ĝ =
    round(c ⊙ g)``. The per-example kernel does it with the batch split
    into ``partials`` groups of consecutive rows, each summed in the
    kernel's float32 accumulators as AugMult's views are (the products of
    16-bit operands are exact), then the groups' float32 tiles are added:
    the float32 sum of the same exact products as one matmul per kernel
    offset over the batch (``ghost.matmul_weight_grad``), without the
    offsets' sliced copies of the input. ``partials=None`` picks enough
    groups for about 4 programs per SM of an H200 (``_partials``). It
    declines float32 operands and layers of more than 256 channels or
    filters, where cuDNN's or cuBLAS's are faster (``_SUMMED_MAX_CHANNELS``;
    ``fp32_any_width=True``, for benchmarks, lifts both: float32 operands are
    then multiplied at XLA's matmul precision, as in the per-example kernel).
    """
    if not fp32_any_width and (x.dtype == jnp.float32
                               or max(x.shape[-1], g.shape[-1]) > _SUMMED_MAX_CHANNELS):
        return None
    rows = x.shape[0]
    if partials is None:
        partials = _partials(rows, kernel_size, x.shape[-1], g.shape[-1], block)
    if rows % partials:
        return None
    out = _fused(x, g, kernel_size, strides, padding, dilation_rate, rows // partials, out_dtype=jnp.float32,
                 fp32_max_channels=None, time_block=time_block, block=block, row_programs=True,
                 num_warps=num_warps, num_stages=num_stages)
    return None if out is None else jnp.sum(out[0], axis=0)


def _partials(rows, kernel_size, channels, filters, block, programs=528):
    """Groups of rows for ``fused_conv_weight_grad``: the divisor of ``rows`` nearest ``programs`` (4 per SM of
    an H200's 132) over one group's programs (window rows × channel blocks × filter blocks), at least 1."""
    window_rows = kernel_size[0] if len(kernel_size) == 2 else 1
    per_group = window_rows * max(1, -(-channels // block)) * max(1, -(-filters // block))
    target = max(1, min(rows, -(-programs // per_group)))
    return min((d for d in range(1, rows + 1) if rows % d == 0), key=lambda d: (abs(d - target), d))


def _fused(x, g, kernel_size, strides, padding, dilation_rate, views, *, out_dtype, fp32_max_channels, time_block,
           block, row_programs, num_warps, num_stages):
    """The kernels' common path: ``(out, sum_sq)`` with ``out`` (n, k·C, P) in ``out_dtype`` (None: the operands'
    dtype), or None where the kernel does not apply."""
    mode = _mode()
    if mode == "off" or (mode == "auto" and jax.default_backend() != "gpu"):
        return None
    if len(kernel_size) not in (1, 2) or padding not in ("same", "valid"):
        return None
    channels, filters = x.shape[-1], g.shape[-1]
    if x.dtype != g.dtype or x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return None
    # Channels padded to a multiple of 16 (Triton's smallest MMA side): zeros, so their gradient rows are 0.
    wide_c, wide_p = -(-channels // 16) * 16, -(-filters // 16) * 16
    if x.dtype == jnp.float32 and fp32_max_channels is not None and max(wide_c, wide_p) > fp32_max_channels:
        return None
    bc, bp = _block(wide_c, block), _block(wide_p, block)
    try:
        from jax.experimental import pallas as pl
    except ImportError:  # a JAX without Pallas: the XLA path
        return None
    if len(kernel_size) == 1:  # Conv1D as a conv over one row
        x, g = x[:, None], g[:, None]
        kernel_size, strides, dilation_rate = ((1,) + tuple(kernel_size), (1,) + tuple(strides),
                                               (1,) + tuple(dilation_rate))
    pads, outs = conv_padding(x.shape[1:3], kernel_size, strides, padding, dilation_rate)
    rows, height, width = x.shape[:3]
    out_h, out_w = g.shape[1], g.shape[2]
    if [out_h, out_w] != list(outs) or rows % views:
        return None
    if max(rows * height * width * wide_c, rows * out_h * out_w * wide_p,
           (rows // views) * math.prod(kernel_size) * wide_c * wide_p) >= 2**31:
        return None  # the kernel's element offsets are int32
    if wide_p != filters:
        g = jnp.pad(g, ((0, 0),) * 3 + ((0, wide_p - filters),))
    packed = _packed_rows(channels, kernel_size[1]) if x.dtype != jnp.float32 else None
    if packed is not None:
        return _packed_call(pl, mode, x, g, kernel_size, strides, dilation_rate, pads, views, packed,
                            _block(wide_p, block), num_warps, num_stages, filters, out_dtype or x.dtype)
    if wide_c != channels:
        x = jnp.pad(x, ((0, 0),) * 3 + ((0, wide_c - channels),))
    n = rows // views
    kh, kw = kernel_size
    (sh, sw), (dh, dw) = strides, dilation_rate
    positions = out_h * out_w
    # Stride 1 with the input's row width ("same"): offset (a, b) is the constant shift of the flat position
    # (a·d_h − pad_top)·W + b·d_w − pad_left, so its pixels are one contiguous slice of the flat input,
    # zero-padded before and after (rows outside the image read zeros; columns outside it are masked).
    # Otherwise each pixel's index is computed and gathered.
    layout = "shift" if (sh, sw) == (1, 1) and out_w == width else "gather"
    per_program = kw if row_programs else 1
    time_block = time_block or _time_block(views * positions, layout)
    num_t = -(-positions // time_block)
    gf = g.reshape(rows, positions, wide_p)  # natural layout (a free reshape); the last tile is masked
    xf = x.reshape(rows, height * width, wide_c)
    base = 0  # where the flat image starts in xf
    if layout == "shift" and mode == "interpret":
        # A GPU reads the flat input in place: an offset's slice may start before the image or end after it
        # (the first and last steps), and those rows are masked in the load (Triton reads no masked address).
        # Pallas's interpreter moves such a slice's start into the array (lax.dynamic_slice), so there the
        # flat input gets zero rows before and after, and the same slices are read ``base`` rows on: the
        # masks are the same, so the interpreter checks the kernel's indexing.
        base = pads[0][0] * width + pads[1][0]
        last_shift = ((kh - 1) * dh - pads[0][0]) * width + (kw - 1) * dw - pads[1][0]
        xf = jnp.pad(xf, ((0, 0), (base, num_t * time_block - positions + max(last_shift, 0)), (0, 0)))
    kernel = functools.partial(
        _kernel, views=views, num_t=num_t, time_block=time_block, bc=bc, bp=bp, kw=kw, per_program=per_program,
        layout=layout, base=base,
        geometry=(height, width, out_w, positions, strides, dilation_rate, pads[0][0], pads[1][0]),
        precision=_precision(x.dtype))
    out, tile_sq = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((n, kh * kw, wide_c, wide_p), out_dtype or x.dtype),
                   jax.ShapeDtypeStruct((n, wide_p // bp, kh * kw, wide_c), jnp.float32)],
        grid=(n, kh * kw // per_program, wide_c // bc, wide_p // bp),
        in_specs=[pl.no_block_spec, pl.no_block_spec],
        out_specs=[pl.BlockSpec((None, per_program, bc, bp), lambda i, j, c, p: (i, j, c, p)),
                   pl.BlockSpec((None, None, per_program, bc), lambda i, j, c, p: (i, p, j, c))],
        name="tan_keras_conv_per_example_grads",
        **_launch(mode, num_warps, num_stages),
    )(xf, gf)
    if (wide_c, wide_p) != (channels, filters):
        out = out[:, :, :channels, :filters]
    return out.reshape(n, kh * kw * channels, filters), jnp.sum(tile_sq, axis=(1, 2, 3))


def _packed_rows(channels, kw):
    """The inner side of a packed window row: ``k_w·C`` rounded up to a power of two (Triton's tile sides), ≥ 16,
    where that is smaller than ``k_w`` offsets of 16 padded channels (else None).

    Only inputs of fewer than 16 channels are packed (the RGB stems: NF-ResNet's
    7×7 stride-2 conv on 3 channels, WRN's 3×3 one): there each offset's
    zero-padded channels cost ``16/C`` times the useful multiply-adds. The
    caller packs only 16-bit ones. On an H200 (docs/benchmarks/h200_2026-12-02b), NF-ResNet-50's
    stem (224², 3 → 64, B = 128) took 0.81 / 0.76 ms packed against 1.50 / 1.42
    with padded channels in bf16 (two calls), and WRN-16-4's (32², 3 → 16,
    B = 1,024) 0.17 against 0.22. In float32 (TF32) the NF stem took 4.1 ms
    packed at the default 64-filter tiles, 1.96 at 32, against 2.68 padded; the
    whole fp32 step with the 64-filter tiles was 7–10% slower in two A/B calls,
    more than the kernel alone explains, so float32 keeps the padded channels
    until a step measures the 32-filter tiles.
    """
    if channels >= 16:
        return None
    packed = max(16, 1 << (kw * channels - 1).bit_length())
    return packed if packed < kw * 16 else None


def _packed_call(pl, mode, x, g, kernel_size, strides, dilation_rate, pads, views, packed, bp, num_warps,
                 num_stages, filters, out_dtype):
    """``fused_conv_per_example_grads`` with each window row's ``(k_w, C)`` pixels and channels as one inner side.

    One program computes the ``(packed × bp)`` tile of one window row ``a`` of
    one example: ``Σ_t X_a[t]ᵀ g[t]`` where row ``m = b·C + c`` of ``X_a[t]``
    is channel ``c`` of input pixel ``(h·s_h + a·d_h − pad_top,
    w·s_w + b·d_w − pad_left)`` (0 where that is padding or ``m ≥ k_w·C``),
    gathered by computed index. Its rows are those of the kernel's
    ``(k_h, k_w, C, P)`` layout, so the output needs no reordering.
    """
    rows, height, width, channels = x.shape
    out_h, out_w, wide_p = g.shape[1], g.shape[2], g.shape[3]
    kh, kw = kernel_size
    n, positions = rows // views, out_h * out_w
    time_block = 32
    num_t = -(-positions // time_block)
    kernel = functools.partial(
        _packed_kernel, views=views, num_t=num_t, time_block=time_block, bp=bp, packed=packed,
        geometry=(height, width, channels, kw, out_w, positions, strides, dilation_rate, pads[0][0], pads[1][0]),
        precision=_precision(x.dtype))
    out, tile_sq = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((n, kh, packed, wide_p), out_dtype),
                   jax.ShapeDtypeStruct((n, wide_p // bp, kh, packed), jnp.float32)],
        grid=(n, kh, wide_p // bp),
        in_specs=[pl.no_block_spec, pl.no_block_spec],
        out_specs=[pl.BlockSpec((None, None, packed, bp), lambda i, a, p: (i, a, 0, p)),
                   pl.BlockSpec((None, None, None, packed), lambda i, a, p: (i, p, a, 0))],
        name="tan_keras_conv_per_example_grads_packed",
        **_launch(mode, num_warps, num_stages),
    )(x.reshape(rows, height * width, channels), g.reshape(rows, positions, wide_p))
    out = out[:, :, :kw * channels, :filters]
    return out.reshape(n, kh * kw * channels, filters), jnp.sum(tile_sq, axis=(1, 2, 3))


def _packed_kernel(x_ref, g_ref, out_ref, sq_ref, *, views, num_t, time_block, bp, packed, geometry, precision):
    """One ``(packed × bp)`` tile of window row ``a`` of one example (``_packed_call``), and its rows' square sums."""
    from jax.experimental import pallas as pl

    height, width, channels, kw, out_w, positions, (sh, sw), (dh, dw), pad_top, pad_left = geometry
    i, a, p = (pl.program_id(axis) for axis in range(3))
    int32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731  (lax.div/rem: see _kernel)
    m = jnp.arange(packed, dtype=jnp.int32)
    b, c = jax.lax.div(m, int32(channels)), jax.lax.rem(m, int32(channels))  # (packed,): offset in the row, channel
    used = m < kw * channels

    def body(step, acc):
        row, _, t, b_tile = _output_grad_tile(g_ref, step, i, p, views=views, num_t=num_t, time_block=time_block,
                                              bp=bp, positions=positions)
        t = jnp.minimum(t, positions - 1)
        h, w = jax.lax.div(t, int32(out_w)), jax.lax.rem(t, int32(out_w))
        hi = h * sh + a * dh - pad_top  # (time_block,)
        wi = (w * sw - pad_left)[:, None] + (b * dw)[None, :]  # (time_block, packed)
        inside = ((hi >= 0) & (hi < height))[:, None] & (wi >= 0) & (wi < width) & used[None, :]
        pixel = jnp.where(inside, hi[:, None] * width + wi, 0)
        a_tile = x_ref[row, pixel, jnp.broadcast_to(c[None, :], pixel.shape)]
        a_tile = jnp.where(inside, a_tile, jnp.zeros_like(a_tile))
        return acc + jax.lax.dot_general(a_tile, b_tile, (((0,), (0,)), ((), ())), precision=precision,
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, views * num_t, body, jnp.zeros((packed, bp), jnp.float32))
    stored = acc.astype(out_ref.dtype)
    out_ref[...] = stored
    stored = stored.astype(jnp.float32)
    sq_ref[...] = jnp.sum(stored * stored, axis=1)


def _output_grad_tile(g_ref, step, i, p, *, views, num_t, time_block, bp, positions):
    """``(row, t0, t, tile)`` of a kernel's loop step: the row (view) of example ``i`` it reads, its first output
    position and its ``time_block`` positions, and the ``(time_block × bp)`` tile of ``g`` (filter block ``p``)
    there, the positions past the last read as 0."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    num_t = jnp.asarray(num_t, jnp.int32)  # lax.div/rem of int32s: see _kernel
    row = i * views + jax.lax.div(step, num_t)
    t0 = jax.lax.rem(step, num_t) * time_block
    t = t0 + jnp.arange(time_block, dtype=jnp.int32)
    g_tile = g_ref.at[row, pl.ds(t0, time_block), pl.ds(p * bp, bp)]
    if positions % time_block:  # a ragged last step
        return row, t0, t, plgpu.load(g_tile, mask=(t < positions)[:, None], other=0)
    return row, t0, t, g_tile[...]


def _launch(mode, num_warps, num_stages):
    """``pallas_call``'s keyword arguments: Pallas's interpreter, or Triton's launch parameters."""
    if mode == "interpret":
        return {"interpret": True}
    from jax.experimental.pallas import triton as plgpu
    return {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def _precision(dtype):
    """fp32 operands: the precision of the user's other matmuls (``jax_default_matmul_precision``)."""
    if dtype != jnp.float32:
        return None
    return jax.config.jax_default_matmul_precision


def _kernel(x_ref, g_ref, out_ref, sq_ref, *, views, num_t, time_block, bc, bp, kw, per_program, layout, base,
            geometry, precision):
    """One (C-block, P-block) tile of ``per_program`` kernel offsets of one example: ``Σ_views Σ_t x[t + o]ᵀ g[t]``,
    into ``out_ref`` (rounded to its dtype), and the square sums of each row of the stored values into ``sq_ref``.

    A step takes ``time_block`` consecutive output positions ``t = (h, w)``;
    offset ``(a, b)`` reads input pixel ``(h·s_h + a·d_h − pad_top,
    w·s_w + b·d_w − pad_left)`` of each, or 0 where that pixel is padding.
    ``layout`` "shift": one slice of the flat input, from flat pixel
    ``t0 + (a·d_h − pad_top)·W + b·d_w − pad_left`` (``base`` rows on in
    ``x_ref``), its rows outside the image (flat index below 0 or past the
    last pixel) and its columns outside it masked; "gather": each pixel's
    index computed, clamped to a valid one where it is padding, and its
    value masked. Positions past the last are masked in ``g``.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    height, width, out_w, positions, (sh, sw), (dh, dw), pad_top, pad_left = geometry
    i, j, c, p = (pl.program_id(axis) for axis in range(4))
    # lax.div / lax.rem of non-negative int32s: the Pallas Triton lowering rejects the sign-corrected forms
    # that Python's ``//`` and ``%`` become (an i1/i32 type mismatch in its ``rem`` rule).
    int32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    offsets = []  # (a, b) of the program's offsets, row-major over the window
    for m in range(per_program):
        offset = j * per_program + m
        offsets.append((jax.lax.div(offset, int32(kw)), jax.lax.rem(offset, int32(kw))))
    lanes_c = c * bc + jnp.arange(bc, dtype=jnp.int32)

    def body(step, accs):
        row, t0, t, b_tile = _output_grad_tile(g_ref, step, i, p, views=views, num_t=num_t, time_block=time_block,
                                               bp=bp, positions=positions)
        if layout == "gather":
            t = jnp.minimum(t, positions - 1)
        h, w = jax.lax.div(t, int32(out_w)), jax.lax.rem(t, int32(out_w))
        out = []
        for (a, b), acc in zip(offsets, accs):
            wi = w * sw + b * dw - pad_left
            if layout == "shift":  # a masked load: Triton still copies the tile to shared memory asynchronously
                start = t0 + (a * dh - pad_top) * width + b * dw - pad_left  # flat pixel of the slice's first row
                flat = start + jnp.arange(time_block, dtype=jnp.int32)
                inside = (wi >= 0) & (wi < width) & (flat >= 0) & (flat < height * width)
                a_tile = plgpu.load(x_ref.at[row, pl.ds(base + start, time_block), pl.ds(c * bc, bc)],
                                    mask=inside[:, None], other=0)
            else:
                hi = h * sh + a * dh - pad_top
                inside = (hi >= 0) & (hi < height) & (wi >= 0) & (wi < width)
                a_tile = x_ref[row, jnp.where(inside, hi * width + wi, 0)[:, None], lanes_c[None, :]]
                a_tile = jnp.where(inside[:, None], a_tile, jnp.zeros_like(a_tile))
            out.append(acc + jax.lax.dot_general(a_tile, b_tile, (((0,), (0,)), ((), ())), precision=precision,
                                                 preferred_element_type=jnp.float32))
        return tuple(out)

    zeros = tuple(jnp.zeros((bc, bp), jnp.float32) for _ in range(per_program))
    accs = jax.lax.fori_loop(0, views * num_t, body, zeros)
    for m, acc in enumerate(accs):
        stored = acc.astype(out_ref.dtype)
        out_ref[m] = stored
        stored = stored.astype(jnp.float32)
        sq_ref[m] = jnp.sum(stored * stored, axis=1)
