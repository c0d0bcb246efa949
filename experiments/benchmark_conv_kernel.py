"""Per-example weight gradients of one conv: XLA's patches path, the fused Pallas kernel, cuDNN's summed wgrad.

    KERAS_BACKEND=jax python -m experiments.benchmark_conv_kernel --batch_size=1024 \
        --shapes=32x64x64,16x128x128,32x16x64,32x64x128s2,224x3x64s2k7 --output_json=conv_kernel.json

For each ``HxCxP[sS][kK]`` (input side, input channels, filters, stride S,
default 1, a K×K window, default 3; "same" padding) and dtype, times
(jitted, median of 20, less an empty jitted call):

* ``xla patches``: what the ghost step does without the kernel
  (``shifted_inputs`` blocks concatenated, one batched matmul);
* ``cudnn summed wgrad``: the non-private weight gradient (one ``(k·C, P)``
  sum over the batch, not per example): the floor the per-example path is
  measured against;
* ``fused ...``: ``fused_conv_per_example_grads`` with each ``--configs``
  tiling ``time_block:block:rows:num_warps:num_stages`` (16-bit inputs of
  fewer than 16 channels take the kernel's packed rows, ``conv_grads._packed_rows``,
  where the tiling's ``time_block`` and ``rows`` do not apply; ``fused
  padded-C`` is the same input through the unpacked kernel, its channels
  zero-padded to 16, the path such inputs took before; float32 inputs are
  never packed).

``sum_sq_err``: the kernel's own square sum of example 0 against that of
the gradients it returned (relative). ``err_vs_f64`` is each per-example result's largest error on example 0
against float64 numpy on the same (rounded) values, relative to its largest
entry: XLA's default fp32 matmuls are TF32 on an H200 (about 3e-4), bf16
operands give float32-accurate sums (about 1e-6). ``--interpret`` runs the
kernel in Pallas's interpreter (any device; its times mean nothing);
``--fp32_any_width`` times fp32 layers the kernel declines by default
(``conv_grads._FP32_MAX_CHANNELS``; with ``--summed``, fp32 and wide layers).

``--summed`` times book-keeping's share of a ghost-form conv instead, the
kernel gradient summed over the batch in float32 (``run_summed``):
``blocks`` (one matmul per kernel offset over shifted copies of the input:
``ghost.matmul_weight_grad``), ``cudnn f32`` (the VJP on float32 copies, the
path before the 16-bit rules), ``cudnn summed wgrad`` (the non-private
step's, its sum rounded to the operands' dtype: the floor, not a private
option) and ``fused summed G:T:W:S`` (``fused_conv_weight_grad`` in G row
groups, 0 for its own choice, T positions per step, Triton's warps and
stages, each of ``--summed_configs``). ``err_vs_f32`` against XLA's conv VJP
of float32 copies at ``precision="highest"``, relative to its largest entry.
"""

import functools
import json
import os

from absl import app, flags

from experiments.benchmark_lib import device_name, median_ms

FLAGS = flags.FLAGS
DEFAULT_CONFIGS = ["32:64:1:4:3", "64:64:1:8:3", "64:64:0:4:3"]


def _define_flags():
    """Flags, defined only when run as a binary (a test imports ``run``)."""
    flags.DEFINE_integer("batch_size", 1024, "Examples.")
    flags.DEFINE_list("shapes", ["32x64x64", "16x128x128", "32x16x64", "32x64x128s2"],
                      "HxCxP[sS][kK]: input side, channels, filters, stride, window side.")
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Operand dtypes.")
    flags.DEFINE_list("configs", DEFAULT_CONFIGS, "Kernel tilings time_block:block:rows:num_warps:num_stages.")
    flags.DEFINE_bool("interpret", False, "Run the kernel in Pallas's interpreter.")
    flags.DEFINE_bool("fp32_any_width", False, "Lift the kernel's fp32 width limit (to time it).")
    flags.DEFINE_string("output_json", None, "Optional path for the results as JSON.")
    flags.DEFINE_bool("summed", False, "Time the batch-summed kernel gradient (book-keeping) instead.")
    flags.DEFINE_list("summed_configs", ["0:32:4:3", "0:64:4:3", "0:32:8:3"],
                      "--summed: fused tilings partials:time_block:num_warps:num_stages (partials 0: its own choice).")


def _example0_f64(x, g, stride, k):
    """float64 numpy ``(k²·C, P)`` kernel gradient of example 0 (k×k, "same", ``stride``)."""
    import numpy as np

    from tan_keras.ghost.norms import conv_padding

    x0, g0 = np.asarray(x[0], np.float64), np.asarray(g[0], np.float64)
    pads, (out, _) = conv_padding(x0.shape[:2], (k, k), (stride, stride), "same", (1, 1))
    padded = np.pad(x0, pads + [[0, 0]])
    span = stride * (out - 1) + 1
    return np.concatenate([np.einsum("hwc,hwp->cp", padded[a:a + span:stride, b:b + span:stride], g0)
                           for a in range(k) for b in range(k)])


def _parse(shape):
    """``(k, strides, channels, filters)`` of an ``HxCxP[sS][kK]`` shape."""
    shape_only, _, window = shape.partition("k")
    shape_only, _, stride = shape_only.partition("s")
    _, channels, filters = (int(v) for v in shape_only.split("x"))
    return int(window or 3), (int(stride or 1),) * 2, channels, filters


def _operands(batch_size, shape, dtype):
    """``(x, g)``: seeded normal input and output gradient of a "same" conv of ``shape``, in ``dtype``."""
    import jax.numpy as jnp
    import numpy as np

    _, strides, channels, filters = _parse(shape)
    side = int(shape.split("x")[0])
    out_side = -(-side // strides[0])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch_size, side, side, channels)), dtype)
    return x, jnp.asarray(rng.normal(size=(batch_size, out_side, out_side, filters)), dtype)


def _summed_vjp(x, g, precision=None, *, k, strides):
    """The non-private (cuDNN) kernel gradient of a k×k "same" conv, summed over the batch: JAX's conv VJP."""
    import jax
    import jax.numpy as jnp

    def conv(kernel):
        return jax.lax.conv_general_dilated(x, kernel, strides, "SAME", precision=precision,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.vjp(conv, jnp.zeros((k, k, x.shape[-1], g.shape[-1]), x.dtype))[1](g)[0]


def run(batch_size, shapes, dtypes, configs, repeats=20):
    """A list of ``{shape, dtype, method, ms, err_vs_f64}`` rows (see the module docstring).

    The kernel runs as ``TAN_KERAS_FUSED_CONV`` says (``--interpret`` sets it to ``interpret``).
    """
    import jax
    import numpy as np

    from tan_keras.ghost.norms import matmul_per_example_grads, shifted_inputs
    from tan_keras.per_example.jax import conv_grads
    from tan_keras.per_example.jax.conv_grads import fused_conv_per_example_grads

    empty = jax.jit(lambda x, g: x[0, 0, 0, 0] + g[0, 0, 0, 0])
    rows = []
    for shape in shapes:
        k, strides, channels, _ = _parse(shape)
        for dtype in dtypes:
            x, g = _operands(batch_size, shape, dtype)
            launch = median_ms(empty, x, g, repeats=repeats)
            want = _example0_f64(x, g, strides[0], k)

            def patches(x, g):
                blocks = shifted_inputs(x, (k, k), strides, "same", (1, 1))
                return matmul_per_example_grads(blocks, g.reshape(g.shape[0], -1, g.shape[-1]))

            methods = [("xla patches", patches),
                       ("cudnn summed wgrad", functools.partial(_summed_vjp, k=k, strides=strides))]
            for config in configs:
                time_block, block, rows_flag, warps, stages = (int(v) for v in config.split(":"))
                methods.append((f"fused {config}", functools.partial(
                    fused_conv_per_example_grads, kernel_size=(k, k), strides=strides, padding="same",
                    dilation_rate=(1, 1), time_block=time_block, block=block, row_programs=bool(rows_flag),
                    num_warps=warps, num_stages=stages)))
            if dtype != "float32" and conv_grads._packed_rows(channels, k) is not None:
                methods.append(("fused padded-C", _unpacked(functools.partial(
                    fused_conv_per_example_grads, kernel_size=(k, k), strides=strides, padding="same",
                    dilation_rate=(1, 1)))))
            for name, fn in methods:
                fn = jax.jit(fn)
                out = fn(x, g)
                if out is None:  # the kernel declined this layer (see conv_grads)
                    rows.append(dict(shape=shape, dtype=dtype, method=name, ms=None, err_vs_f64=None, sum_sq_err=None))
                    continue
                err = sq_err = None
                if name != "cudnn summed wgrad":
                    grads, sum_sq = out if isinstance(out, tuple) else (out, None)
                    got = np.asarray(grads[0], np.float64).reshape(want.shape)
                    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
                    if sum_sq is not None:  # the kernel's own square sum, against that of its gradients
                        sq_err = float(abs(float(sum_sq[0]) / np.sum(np.square(got)) - 1.0))
                ms = median_ms(fn, x, g, repeats=repeats) - launch
                rows.append(dict(shape=shape, dtype=dtype, method=name, ms=round(ms, 3), err_vs_f64=err,
                                 sum_sq_err=sq_err))
    return rows


def run_summed(batch_size, shapes, dtypes, configs, repeats=20, fp32_any_width=False):
    """``{shape, dtype, method, ms, err_vs_f32}`` rows for the batch-summed kernel gradient (``--summed``); the
    kernel's rows are None where it declines (``fp32_any_width``: it takes float32 and wide layers too)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tan_keras.ghost.norms import matmul_weight_grad, shifted_inputs
    from tan_keras.per_example.jax.conv_grads import fused_conv_weight_grad

    empty = jax.jit(lambda x, g: x[0, 0, 0, 0] + g[0, 0, 0, 0])
    rows = []
    for shape in shapes:
        k, strides, _, filters = _parse(shape)
        for dtype in dtypes:
            x, g = _operands(batch_size, shape, dtype)
            launch = median_ms(empty, x, g, repeats=repeats)
            vjp = functools.partial(_summed_vjp, k=k, strides=strides)
            want = np.asarray(jax.jit(lambda x, g: vjp(x.astype(jnp.float32), g.astype(jnp.float32),
                                                       "highest"))(x, g), np.float64).reshape(-1, filters)
            methods = [
                ("blocks", lambda x, g: matmul_weight_grad(shifted_inputs(x, (k, k), strides, "same", (1, 1)),
                                                           g.reshape(g.shape[0], -1, g.shape[-1]))),
                ("cudnn f32", lambda x, g: vjp(x.astype(jnp.float32), g.astype(jnp.float32))),
                ("cudnn summed wgrad", vjp)]
            for config in configs:
                partials, time_block, warps, stages = (int(v) for v in config.split(":"))
                methods.append((f"fused summed {config}", functools.partial(
                    fused_conv_weight_grad, kernel_size=(k, k), strides=strides, padding="same",
                    dilation_rate=(1, 1), partials=partials or None, time_block=time_block, num_warps=warps,
                    num_stages=stages, fp32_any_width=fp32_any_width)))
            for name, fn in methods:
                fn = jax.jit(fn)
                out = fn(x, g)
                if out is None:
                    rows.append(dict(shape=shape, dtype=dtype, method=name, ms=None, err_vs_f32=None))
                    continue
                got = np.asarray(out.astype(jnp.float32), np.float64).reshape(want.shape)
                err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
                ms = median_ms(fn, x, g, repeats=repeats) - launch
                rows.append(dict(shape=shape, dtype=dtype, method=name, ms=round(ms, 3), err_vs_f32=err))
    return rows


def _unpacked(fn):
    """``fn`` traced with the kernel's row packing switched off (its channels zero-padded to 16 instead)."""
    from tan_keras.per_example.jax import conv_grads

    def call(x, g):
        packed_rows = conv_grads._packed_rows
        conv_grads._packed_rows = lambda channels, kw: None
        try:
            return fn(x, g)
        finally:
            conv_grads._packed_rows = packed_rows

    return call


def main(argv):
    del argv
    if FLAGS.interpret:
        os.environ["TAN_KERAS_FUSED_CONV"] = "interpret"
    if FLAGS.fp32_any_width:
        from tan_keras.per_example.jax import conv_grads

        conv_grads._FP32_MAX_CHANNELS = float("inf")
    if FLAGS.summed:
        rows = run_summed(FLAGS.batch_size, FLAGS.shapes, FLAGS.dtypes, FLAGS.summed_configs,
                          fp32_any_width=FLAGS.fp32_any_width)
    else:
        rows = run(FLAGS.batch_size, FLAGS.shapes, FLAGS.dtypes, FLAGS.configs)
    print(f"device={device_name()!r} batch={FLAGS.batch_size}")
    for r in rows:
        ms = "declined" if r["ms"] is None else f"{r['ms']:8.3f} ms"
        err = r.get("err_vs_f64", r.get("err_vs_f32"))
        err = "" if err is None else f"err {err:.1e}"
        if r.get("sum_sq_err") is not None:
            err += f"  sum_sq err {r['sum_sq_err']:.1e}"
        print(f"{r['shape']:>11s} {r['dtype']:9s} {r['method']:22s} {ms:>11s}  {err}")
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
