"""GPU kernel time per step of a JAX profiler trace (``experiments.profile_step``), by kind of kernel.

    python -m experiments.profile_kernels --steps=5 TRACE.xplane.pb [...]

Reads every stream of the trace's GPU plane and sums the kernels' durations
by kind: cuDNN convolutions (forward, input gradient, weight gradient),
matmuls (cuBLAS, XLA's Triton gemm fusions), tan_keras's fused per-example
conv-gradient kernel, XLA's concatenate fusions (in a ghost step: the input
patches of convolutions' per-example gradients), reductions, dtype converts,
data movement, other elementwise fusions. All streams: a ``cond`` that XLA
runs as a CUDA-graph conditional puts its branch on a stream of its own (a
ghost step's book-keeping is that branch: 2.1 of WRN-16-4's 14.2 bf16 ms and
3.7 of the ViT's 13.0 fp32 ms on an H200). Divided by ``--steps`` (the traced steps). The XPlane
protobuf is TensorFlow's (``tensorflow.tsl.profiler.protobuf``).
"""

import collections
import json

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags():
    """Flags, defined only when run as a binary: ``kind`` and ``summarize`` are imported by other code and tests."""
    flags.DEFINE_integer("steps", 5, "Steps in each trace.")
    flags.DEFINE_string("output_json", None, "Optional path for the per-trace summaries as JSON.")


def kind(kernel):
    """The kind of a GPU kernel, from its name."""
    if "conv_per_example_grads" in kernel:
        return "fused per-example conv grads (Pallas)"
    if "concatenate" in kernel:
        return "concatenate (conv patches)"
    for key, name in (("fprop", "cuDNN conv forward"), ("dgrad", "cuDNN conv input grad"),
                      ("wgrad", "cuDNN conv weight grad")):
        if key in kernel:
            return name
    if kernel.startswith("nvjet") or "gemm" in kernel or "cutlass" in kernel:
        return "matmul (cuBLAS / Triton)"
    if "reduce" in kernel:
        return "reductions"
    if "convert" in kernel:
        return "dtype converts"
    if any(key in kernel for key in ("slice", "pad", "transpose", "copy")):
        return "slice / pad / transpose / copy"
    if "memcpy" in kernel.lower() or "memset" in kernel.lower():
        return "memcpy / memset"
    return "other elementwise"


def summarize(path, steps):
    """``{kind: ms per step}`` and their total (all streams' kernels, overlaps counted twice), for one trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    gpu = next((p for p in space.planes if p.name.startswith("/device:GPU")), None)
    if gpu is None:
        raise SystemExit(f"{path}: no GPU plane in this trace.")
    totals = collections.Counter()
    for line in gpu.lines:
        for event in line.events:
            totals[kind(gpu.event_metadata[event.metadata_id].name)] += event.duration_ps
    per_step = {k: v / 1e9 / steps for k, v in totals.most_common()}
    return {"trace": path, "busy_ms_per_step": sum(per_step.values()), "ms_per_step": per_step}


def main(argv):
    results = [summarize(path, FLAGS.steps) for path in argv[1:]]
    for r in results:
        print(f"{r['trace']}: GPU busy {r['busy_ms_per_step']:.2f} ms/step")
        for name, ms in r["ms_per_step"].items():
            print(f"   {name:<32}{ms:8.2f} ms")
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
