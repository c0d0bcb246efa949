"""GPU kernel time per step of a JAX profiler trace (``experiments.profile_step``), by kind of kernel and phase.

    python -m experiments.profile_kernels --steps=5 TRACE.xplane.pb [...] \
        [--hlo=STEP.after_optimizations.txt[.gz],...]

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

Each kernel also gets a phase of the step, from the JAX name stack of the
HLO op it runs (``phase``): the forward pass (``jvp(layer)``), the backward
pass (``transpose(jvp(layer))``), book-keeping (the ``cond``'s branch), the
fused per-example kernel, and the rest of the DP step (norms, clip factors,
noise, update). A kernel launched on its own carries its op's name in the
trace; one replayed in a CUDA graph carries only the graph's, so its name
(``input_reduce_fusion_12``) is looked up in the step's optimized HLO
(``--hlo``: one file per trace, in order: the
``*jit_train_step*after_optimizations.txt`` that ``experiments.profile_step
--hlo_dir=DIR`` names, or ``XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text``).
Kernels found in neither are "unattributed" (cuBLAS calls inside a graph).
A fusion is one kernel with one op name, its root's: XLA fuses a ghost
step's per-example sums (the DP step's) with the backward's elementwise work
that feeds them, and such a kernel counts whole in the DP step.
"""

import collections
import gzip
import json
import re

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags():
    """Flags, defined only when run as a binary: ``kind`` and ``summarize`` are imported by other code and tests."""
    flags.DEFINE_integer("steps", 5, "Steps in each trace.")
    flags.DEFINE_string("output_json", None, "Optional path for the per-trace summaries as JSON.")
    flags.DEFINE_list("hlo", [], "Optional optimized-HLO text of each trace's step (plain or .gz), in order.")
    flags.DEFINE_integer("top", 0, "Also list each phase's N longest kernels (name, ms per step, HLO op).")


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


PHASES = ("forward", "backward", "per-example kernel", "book-keeping", "DP step: norms, clip, noise, update",
          "unattributed")


def phase(op_name):
    """The phase of the step an HLO op belongs to, from its JAX name stack (``op_name`` metadata), or None."""
    if op_name is None:
        return "unattributed"
    if "tan_keras_conv_per_example_grads" in op_name:
        return "per-example kernel"
    if "/cond/branch" in op_name:  # book-keeping: the step's one cond (all finite, or drop examples)
        return "book-keeping"
    if "transpose(jvp(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "DP step: norms, clip, noise, update"


_HLO_OP = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"')


def hlo_op_names(path):
    """``{instruction name: op_name}`` of an HLO text dump (plain or gzip)."""
    opener = gzip.open if path.endswith(".gz") else open
    names = {}
    with opener(path, "rt") as f:
        for line in f:
            match = _HLO_OP.match(line)
            if match:
                names[match.group(1)] = match.group(2)
    return names


def summarize(path, steps, hlo=None, top=0):
    """``{kind: ms per step}``, ``{phase: {kind: ms}}`` and their total (all streams' kernels, overlaps counted
    twice), for one trace; ``hlo``: the step's ``hlo_op_names`` (kernels in CUDA graphs are named only there);
    ``top``: also ``{phase: [[kernel, ms, op_name], ...]}``, its ``top`` longest kernels."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    gpu = next((p for p in space.planes if p.name.startswith("/device:GPU")), None)
    if gpu is None:
        raise SystemExit(f"{path}: no GPU plane in this trace.")
    hlo = hlo or {}
    stat_names = {k: v.name for k, v in gpu.stat_metadata.items()}
    kernels = collections.defaultdict(collections.Counter)  # {phase: {(kernel, op_name): ps}}
    for line in gpu.lines:
        for event in line.events:
            name = gpu.event_metadata[event.metadata_id].name
            op_name = None
            for stat in event.stats:  # "name": the op of a kernel launched on its own
                if stat_names.get(stat.metadata_id) == "name":
                    op_name = stat_names.get(stat.ref_value) if stat.ref_value else stat.str_value
            if op_name is None:  # "input_reduce_fusion_12" is HLO's "input_reduce_fusion.12"
                op_name = hlo.get(re.sub(r"_(\d+)$", r".\1", name), hlo.get(name))
            if "tan_keras_conv_per_example_grads" in name:
                op_name = name
            kernels[phase(op_name)][(name, op_name)] += event.duration_ps
    totals = collections.Counter()
    phases = collections.defaultdict(collections.Counter)
    for p, rows in kernels.items():
        for (name, _), ps in rows.items():
            totals[kind(name)] += ps
            phases[p][kind(name)] += ps
    per_step = {k: v / 1e9 / steps for k, v in totals.most_common()}
    by_phase = {p: {k: v / 1e9 / steps for k, v in phases[p].most_common()} for p in PHASES if p in phases}
    result = {"trace": path, "busy_ms_per_step": sum(per_step.values()), "ms_per_step": per_step,
              "phase_ms_per_step": by_phase}
    if top:
        result["top_kernels"] = {p: [[name, ps / 1e9 / steps, op] for (name, op), ps in kernels[p].most_common(top)]
                                 for p in PHASES if p in kernels}
    return result


def main(argv):
    traces = argv[1:]
    if FLAGS.hlo and len(FLAGS.hlo) != len(traces):
        raise SystemExit(f"--hlo names {len(FLAGS.hlo)} files for {len(traces)} traces: give one per trace.")
    hlos = [hlo_op_names(p) for p in FLAGS.hlo] or [None] * len(traces)
    results = [summarize(path, FLAGS.steps, hlo, FLAGS.top) for path, hlo in zip(traces, hlos)]
    for r in results:
        print(f"{r['trace']}: GPU busy {r['busy_ms_per_step']:.2f} ms/step")
        for name, ms in r["ms_per_step"].items():
            print(f"   {name:<32}{ms:8.2f} ms")
        print("  by phase:")
        for name, kinds in r["phase_ms_per_step"].items():
            print(f"   {name:<38}{sum(kinds.values()):8.2f} ms   "
                  + ", ".join(f"{k} {ms:.2f}" for k, ms in kinds.items() if ms >= 0.05))
        for name, rows in r.get("top_kernels", {}).items():
            print(f"  longest kernels, {name}:")
            for kernel, ms, op in rows:
                print(f"   {ms:7.3f} ms  {kernel[:60]:<60} {(op or '')[-110:]}")
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
