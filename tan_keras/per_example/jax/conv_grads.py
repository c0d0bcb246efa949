"""Per-example weight gradients of a stride-1 convolution in one fused GPU kernel (Pallas, Triton).

For a channels-last conv with kernel offsets ``o_j`` (row-major over the
kernel window), example ``i``'s weight gradient is

    ∇W_i[j] = Σ_t x_i[t + o_j]ᵀ g_i[t]        (C × P per offset j)

over its output positions ``t``, ``x`` the (padded) input and ``g = ∂ℓ/∂z``.
XLA forms the ``k``-fold patch tensor (one copy of the input per offset,
concatenated) before one batched matmul: on an H200 that concatenate is the
largest single cost of a ghost step on a WRN (5.3 of its 10 extra ms at
bf16, README "Where the DP step's time goes").

This kernel never forms the patches. Both tensors are flattened over a
padded row width ``W_p``: in that layout offset ``(a, b)`` of the window is
the constant shift ``a·d_h·W_p + b·d_w`` of the flat index, so every offset's
operand is a contiguous slice of the same flat input, loaded tile by tile
from the GPU's cache. ``g`` is zero in the ``W_p − W_out`` padding columns,
which cancels the slices' wrap-around rows. One program computes one
``(C-block × P-block)`` tile of the offsets of one row of the window (they
share each loaded ``g`` tile) for one example, summed over its K views under
AugMult, accumulating in float32: bf16 operands are multiplied
exactly (Triton's bf16 MMA), fp32 ones at the precision XLA's own matmuls
use (``jax_default_matmul_precision``).

``fused_conv_per_example_grads`` returns None where the kernel does not apply
(not a GPU, a stride, channels that are not multiples of 16, fp32 layers
wider than 64 channels, where cuBLAS is faster, tensors of 2³¹ elements or
more, Pallas missing) and the caller takes the XLA path (``tan_keras.ghost.norms``).
``TAN_KERAS_FUSED_CONV``: ``auto`` (default: on GPUs), ``off``, or
``interpret`` (Pallas's interpreter on any device: the tests' way to check
the kernel's indexing against a one-example loop on a CPU).
"""

import functools
import os

import jax
import jax.numpy as jnp

from tan_keras.ghost.norms import conv_padding

_MODES = ("auto", "off", "interpret")

# Measured on an H200 (JAX 0.11, B = 1,024, 3×3 "same", per-example gradients of one conv, ms; XLA's
# concatenate + batched matmul → this kernel with its default tiling):
#   bf16   16→64 @32²: 0.945 → 0.355   64→64 @32²: 1.457 → 0.558   128→128 @16²: 0.846 → 0.647
#   fp32   16→64 @32²: 1.140 → 0.774   64→64 @32²: 1.850 → 1.723   128→128 @16²: 1.069 → 1.680
# (fp32 at XLA's default TF32 precision; B = 128, 64→64 @56²: bf16 0.744 → 0.211, fp32 0.905 → 0.729).
# fp32 tiles of wider layers are slower than cuBLAS, so they keep the XLA path.
_FP32_MAX_CHANNELS = 64


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
                                 time_block=32, block=64, row_programs=True, num_warps=4, num_stages=3):
    """``(n, k_h·k_w·C, P)`` float32 per-example kernel gradients of a 1-D/2-D conv, or None (not applicable).

    Args:
      x: ``(n·K, [H,] W, C)`` channels-last layer input (its compute dtype).
      g: ``(n·K, [H_out,] W_out, P)`` output gradient ``∂ℓ/∂z``.
      kernel_size, strides, dilation_rate: the layer's (1 or 2 entries).
      padding: ``"same"`` or ``"valid"`` (causal: pad first, then ``"valid"``).
      views: K, rows per example (AugMult): each example's gradient sums its rows'.
      time_block, block, row_programs, num_warps, num_stages: the tiling (flat
        positions per step, largest channel block, both powers of two; one
        window row or one offset per program) and Triton's launch parameters.

    The rows of the result follow ``kernel.reshape(k_h·k_w·C, P)``, so
    ``reshape(result, (n,) + kernel.shape)`` is the per-example kernel gradient.
    """
    mode = _mode()
    if mode == "off" or (mode == "auto" and jax.default_backend() != "gpu"):
        return None
    if any(s != 1 for s in strides) or len(kernel_size) not in (1, 2) or padding not in ("same", "valid"):
        return None
    channels, filters = x.shape[-1], g.shape[-1]
    bc, bp = _block(channels, block), _block(filters, block)
    if bc is None or bp is None or x.dtype != g.dtype or x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return None
    if x.dtype == jnp.float32 and max(channels, filters) > _FP32_MAX_CHANNELS:
        return None
    try:
        from jax.experimental import pallas as pl
    except ImportError:  # a JAX without Pallas: the XLA path
        return None
    if len(kernel_size) == 1:  # Conv1D as a conv over one row
        x, g = x[:, None], g[:, None]
        kernel_size, dilation_rate = (1,) + tuple(kernel_size), (1,) + tuple(dilation_rate)
    kh, kw = kernel_size
    dh, dw = dilation_rate
    pads, _ = conv_padding(x.shape[1:3], kernel_size, (1, 1), padding, dilation_rate)
    rows, height, width = x.shape[0], x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1])
    out_h, out_w = g.shape[1], g.shape[2]
    if out_h != height - (kh - 1) * dh or out_w != width - (kw - 1) * dw or rows % views:
        return None
    n = rows // views

    # Flat layouts over the padded width: g zero in its padding columns and tail, x long enough for every slice.
    num_t = -(-(out_h * width) // time_block)
    flat_g = num_t * time_block
    flat_x = flat_g + (kh - 1) * dh * width + (kw - 1) * dw
    if max(rows * flat_x * max(channels, filters), n * kh * kw * channels * filters) >= 2**31:
        return None  # the kernel's element offsets are int32
    gf = jnp.pad(g, ((0, 0), (0, 0), (0, width - out_w), (0, 0))).reshape(rows, out_h * width, filters)
    gf = jnp.pad(gf, ((0, 0), (0, flat_g - out_h * width), (0, 0)))
    xf = jnp.pad(x, [[0, 0]] + pads + [[0, 0]]).reshape(rows, height * width, channels)
    xf = jnp.pad(xf, ((0, 0), (0, flat_x - height * width), (0, 0)))

    # One program: one example, one row of the window (its k_w offsets share each loaded g tile) or one offset.
    per_program = kw if row_programs else 1
    kernel = functools.partial(_kernel, views=views, num_t=num_t, time_block=time_block, bc=bc, bp=bp,
                               kw=kw, per_program=per_program, row_shift=dh * width, col_shift=dw,
                               precision=_precision(x.dtype))
    call_kwargs = {}
    if mode == "interpret":
        call_kwargs["interpret"] = True
    else:
        from jax.experimental.pallas import triton as plgpu
        call_kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, kh * kw, channels, filters), jnp.float32),
        grid=(n, kh * kw // per_program, channels // bc, filters // bp),
        in_specs=[pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.BlockSpec((None, per_program, bc, bp), lambda i, j, c, p: (i, j, c, p)),
        name="tan_keras_conv_per_example_grads",
        **call_kwargs,
    )(xf, gf)
    return out.reshape(n, kh * kw * channels, filters)


def _precision(dtype):
    """fp32 operands: the precision of the user's other matmuls (``jax_default_matmul_precision``)."""
    if dtype != jnp.float32:
        return None
    return jax.config.jax_default_matmul_precision


def _kernel(x_ref, g_ref, out_ref, *, views, num_t, time_block, bc, bp, kw, per_program, row_shift, col_shift,
            precision):
    """One (C-block, P-block) tile of ``per_program`` kernel offsets of one example: ``Σ_views Σ_t x[t + o]ᵀ g[t]``."""
    from jax.experimental import pallas as pl

    i, j, c, p = (pl.program_id(axis) for axis in range(4))
    first = j * per_program  # the program's first offset, row-major over the window
    # lax.div / lax.rem of non-negative int32s: the Pallas Triton lowering rejects the sign-corrected forms
    # that Python's ``//`` and ``%`` become (an i1/i32 type mismatch in its ``rem`` rule).
    int32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    shifts = [jax.lax.div(first + m, int32(kw)) * row_shift + jax.lax.rem(first + m, int32(kw)) * col_shift
              for m in range(per_program)]

    def body(step, accs):
        row = i * views + jax.lax.div(step, int32(num_t))
        t0 = jax.lax.rem(step, int32(num_t)) * time_block
        b = g_ref[row, pl.ds(t0, time_block), pl.ds(p * bp, bp)]
        out = []
        for shift, acc in zip(shifts, accs):
            a = x_ref[row, pl.ds(shift + t0, time_block), pl.ds(c * bc, bc)]
            out.append(acc + jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                                                 preferred_element_type=jnp.float32))
        return tuple(out)

    zeros = tuple(jnp.zeros((bc, bp), jnp.float32) for _ in range(per_program))
    accs = jax.lax.fori_loop(0, views * num_t, body, zeros)
    for m, acc in enumerate(accs):
        out_ref[m] = acc
