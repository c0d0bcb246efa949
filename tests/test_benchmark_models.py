"""The benchmark's large models (NF-ResNet-50, the ViT) build and train; the peer benchmark's harness checks.

Speed is never tested here: these pin what the GPU benchmarks rely on (the
models' sizes, that the ViT's examples do not interact and that its ghost DP
step is the SGD step when clipping and noise are off, that a missing peer
package stops ``benchmark_peers`` with a message, and, where PyTorch is
installed, that the PyTorch WRN-16-4 has the Keras model's parameters).
"""

import importlib.util
import subprocess
import sys

import keras
import numpy as np
import pytest

import tan_keras
from experiments import benchmark_lib, vit
from tan_keras import ghost_norms


def _tiny_vit(num_classes=3):
    return vit.VisionTransformer(input_shape=(8, 8, 3), patch_size=4, depth=1, width=16, num_heads=2, mlp_ratio=2,
                                 num_classes=num_classes)


def _vit_params(depth, width, mlp_ratio, tokens, patch, channels, classes):
    """ViT parameter count from the architecture (Dosovitskiy et al. 2021), independent of Keras."""
    attention = 4 * (width * width + width)  # q, k, v and output projections with biases
    mlp = (width * mlp_ratio * width + mlp_ratio * width) + (mlp_ratio * width * width + width)
    block = attention + mlp + 2 * (2 * width)  # two LayerNorms
    embed = patch * patch * channels * width + width + tokens * width
    return embed + depth * block + 2 * width + width * classes + classes


def test_benchmark_vit_is_6_blocks_of_384_wide_multi_head_attention():
    model, shape = benchmark_lib.build_model("vit")
    attention = [layer for layer in model.layers if isinstance(layer, keras.layers.MultiHeadAttention)]
    assert shape == (32, 32, 3)
    assert len(attention) == 6
    assert all(layer.num_heads * layer.key_dim == 384 for layer in attention)
    assert model.count_params() == _vit_params(depth=6, width=384, mlp_ratio=4, tokens=64, patch=4, channels=3,
                                               classes=10)
    assert ghost_norms.ghost_plan(model).reason is None


def test_vit_examples_do_not_interact():
    model = _tiny_vit()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8, 8, 3)).astype("float32")
    changed = x.copy()
    changed[2] = rng.normal(size=(8, 8, 3))
    both = np.asarray(model.predict_on_batch(np.concatenate([x, changed])))  # one compiled call
    out, out_changed = both[:3], both[3:]
    np.testing.assert_allclose(out_changed[:2], out[:2], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out_changed[2], out[2])


def test_vit_ghost_dp_step_without_clipping_or_noise_is_the_sgd_step():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    y = np.array([0, 1, 2, 0], "int32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    reference = _tiny_vit()
    initial = [np.asarray(v) for v in reference.trainable_variables]
    reference.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    reference.train_on_batch(x, y)

    model = _tiny_vit()
    for v, value in zip(model.trainable_variables, initial):
        v.assign(value)
    private = tan_keras.make_private(model, clipping="ghost")
    private.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=1e6, noise_multiplier=0.0, learning_rate=0.5, seed=0),
                    loss=loss)
    private.train_on_batch(x, y)
    moved = False
    for got, want, start, v in zip(private.trainable_variables, reference.trainable_variables, initial,
                                   reference.trainable_variables):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=v.path)
        moved |= not np.allclose(np.asarray(want), start)
    assert moved


def test_nf_resnet50_at_128_has_the_224_models_weights_and_ghost_rules():
    model, shape = benchmark_lib.build_model("nf_resnet50", image_size=128)
    default, default_shape = benchmark_lib.build_model("nf_resnet50")
    assert shape == (128, 128, 3) and default_shape == (224, 224, 3)
    assert model.output_shape == (None, 1000)
    assert model.count_params() == default.count_params()
    assert ghost_norms.ghost_plan(model).reason is None


@pytest.mark.parametrize("name, size", [("nf_resnet50", 96), ("vit", 128)])
def test_benchmark_rejects_an_image_size_the_model_does_not_have(name, size):
    with pytest.raises(ValueError, match="image_size"):
        benchmark_lib.build_model(name, image_size=size)


def test_benchmark_peers_stops_with_a_message_when_a_peer_package_is_missing():
    # Runs the binary with `opacus` hidden from the import system, whatever is installed here.
    script = ("import importlib.util as u, runpy, sys\n"
              "real = u.find_spec\n"
              "u.find_spec = lambda name, *a, **k: None if name == 'opacus' else real(name, *a, **k)\n"
              "sys.argv = ['benchmark_peers', '--peers=opacus']\n"
              "runpy.run_module('experiments.benchmark_peers', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "opacus==1.6.0" in proc.stderr and "nothing was run" in proc.stderr
    assert "Traceback" not in proc.stderr


if importlib.util.find_spec("torch") is not None:  # PyTorch is not in requirements.lock: collected only where installed

    def test_torch_wrn_16_4_has_the_keras_wrn_16_4s_parameters():
        import torch

        from experiments import torch_wrn
        from models import wrn

        keras_model, torch_model = wrn.wrn_16_4(num_classes=10), torch_wrn.wrn_16_4(num_classes=10)
        assert torch_wrn.count_params(torch_model) == keras_model.count_params() == torch_wrn.WRN_16_4_PARAMS
        keras_sizes = sorted(int(np.prod(v.shape)) for v in keras_model.trainable_variables)
        assert sorted(p.numel() for p in torch_model.parameters()) == keras_sizes
        assert torch_model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the breakdown times JAX-compiled pieces")
def test_ghost_breakdown_times_every_watched_layer_once_grouped_by_family():
    from experiments import ghost_breakdown

    result = ghost_breakdown.breakdown("cnn", batch_size=4, repeats=1)
    names = [row["layer"] for row in result["layers"]]
    assert len(names) == len(set(names)) == 6  # 2 Conv2D, 2 GroupNormalization, 2 Dense
    assert {f: v["calls"] for f, v in result["families"].items()} == {
        "Conv2D": 2, "GroupNormalization": 2, "Dense": 2}
    assert all(row["norm_ms"] >= 0 and row["sum_ms"] >= 0 for row in result["layers"])


def test_profile_kernels_sorts_kernel_names_into_kinds():
    from experiments import profile_kernels

    kinds = {name: profile_kernels.kind(name) for name in (
        "loop_concatenate_fusion_4", "sm90_xmma_wgrad_indexed_implicit_gemm_bf16", "nvjet_sm90_tss_64x96",
        "input_reduce_fusion_157", "loop_convert_fusion_2", "sm90_xmma_fprop_implicit_gemm_f32",
        "tan_keras_conv_per_example_grads__2")}
    assert kinds == {
        "tan_keras_conv_per_example_grads__2": "fused per-example conv grads (Pallas)",
        "loop_concatenate_fusion_4": "concatenate (conv patches)",
        "sm90_xmma_wgrad_indexed_implicit_gemm_bf16": "cuDNN conv weight grad",
        "nvjet_sm90_tss_64x96": "matmul (cuBLAS / Triton)", "input_reduce_fusion_157": "reductions",
        "loop_convert_fusion_2": "dtype converts", "sm90_xmma_fprop_implicit_gemm_f32": "cuDNN conv forward"}


def test_profile_kernels_puts_each_kernel_in_the_phase_of_its_op_from_the_trace_or_the_hlo(tmp_path):
    """A kernel launched alone is named by its trace's ``name`` stat; one replayed in a CUDA graph by the HLO op
    of its name (``_12`` is HLO's ``.12``); the fused kernel by its own name; what neither names is unattributed."""
    import gzip

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from experiments import profile_kernels

    space = xplane_pb2.XSpace()
    gpu = space.planes.add(name="/device:GPU:0")
    gpu.stat_metadata[1].id, gpu.stat_metadata[1].name = 1, "name"
    gpu.stat_metadata[2].id, gpu.stat_metadata[2].name = 2, "jit(train_step)/jvp(conv)/conv_general_dilated"
    kernels = [  # (kernel, µs, op named in the trace)
        ("sm90_xmma_fprop_implicit_gemm_bf16", 3.0, True),
        ("input_reduce_fusion_12", 2.0, False),  # in the HLO: the backward
        ("loop_slice_fusion", 1.0, False),  # in the HLO: book-keeping
        ("gemm_fusion_dot_7", 4.0, False),  # in the HLO: the norms
        ("tan_keras_conv_per_example_grads__2", 5.0, False),
        ("sm90_xmma_gemm_f32f32_tf32f32", 0.5, False),  # in no HLO line
    ]
    line = gpu.lines.add(name="Stream #14")
    for i, (name, us, named) in enumerate(kernels):
        gpu.event_metadata[10 + i].id, gpu.event_metadata[10 + i].name = 10 + i, name
        event = line.events.add(metadata_id=10 + i, duration_ps=int(us * 1e6))
        if named:
            event.stats.add(metadata_id=1, ref_value=2)
    trace = tmp_path / "step.xplane.pb"
    trace.write_bytes(space.SerializeToString())
    hlo = tmp_path / "step.txt.gz"
    with gzip.open(hlo, "wt") as f:
        f.write('  %input_reduce_fusion.12 = f32[4]{0} fusion(%p), kind=kInput, '
                'metadata={op_name="jit(train_step)/transpose(jvp(gn))/reduce_sum" stack_frame_id=3}\n'
                '  %loop_slice_fusion = bf16[4]{0} fusion(%q), kind=kLoop, '
                'metadata={op_name="jit(train_step)/cond/branch_1_fun/slice"}\n'
                '  ROOT %gemm_fusion_dot.7 = f32[4,4]{1,0} fusion(%a, %b), kind=kCustom, '
                'metadata={op_name="jit(train_step)/btd,bsd->bts/dot_general"}\n')
    result = profile_kernels.summarize(str(trace), steps=1, hlo=profile_kernels.hlo_op_names(str(hlo)))
    totals = {p: round(sum(k.values()) * 1e3, 6) for p, k in result["phase_ms_per_step"].items()}
    assert totals == {"forward": 3.0, "backward": 2.0, "per-example kernel": 5.0, "book-keeping": 1.0,
                      "DP step: norms, clip, noise, update": 4.0, "unattributed": 0.5}
    assert list(result["phase_ms_per_step"]) == list(profile_kernels.PHASES)
    assert result["phase_ms_per_step"]["backward"] == {"reductions": pytest.approx(2e-3)}
    assert result["busy_ms_per_step"] == pytest.approx(15.5e-3)
    without_hlo = profile_kernels.summarize(str(trace), steps=1)["phase_ms_per_step"]
    assert sum(without_hlo["unattributed"].values()) == pytest.approx(7.5e-3)
    assert "top_kernels" not in result
    # ``top``: each phase's longest kernels, longest first, with the HLO op that named them.
    line.events.add(metadata_id=12, duration_ps=int(6e6))  # loop_slice_fusion again: 1 + 6 µs
    trace.write_bytes(space.SerializeToString())
    top = profile_kernels.summarize(str(trace), steps=1, hlo=profile_kernels.hlo_op_names(str(hlo)), top=1)
    assert top["top_kernels"]["book-keeping"] == [
        ["loop_slice_fusion", pytest.approx(7e-3), "jit(train_step)/cond/branch_1_fun/slice"]]
    assert top["top_kernels"]["unattributed"] == [["sm90_xmma_gemm_f32f32_tf32f32", pytest.approx(5e-4), None]]
    assert all(len(rows) == 1 for rows in top["top_kernels"].values())


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="a JAX (Pallas) kernel")
def test_conv_kernel_benchmark_reports_every_method_with_float32_accurate_results(monkeypatch):
    """On a CPU the kernel runs interpreted: every method is timed, and each per-example result is within fp32
    rounding of float64 numpy (the times mean nothing here)."""
    from experiments import benchmark_conv_kernel

    monkeypatch.setenv("TAN_KERAS_FUSED_CONV", "interpret")
    rows = benchmark_conv_kernel.run(2, ["6x16x16", "7x16x16s2", "9x3x16s2k7"], ["float32"],
                                     ["16:16:1:4:3", "16:16:0:4:3"], repeats=1)
    methods = ["xla patches", "cudnn summed wgrad", "fused 16:16:1:4:3", "fused 16:16:0:4:3"]
    assert [r["method"] for r in rows] == 3 * methods
    assert all(r["ms"] is not None for r in rows)
    assert all(r["err_vs_f64"] < 1e-5 for r in rows if r["method"] != "cudnn summed wgrad")
    # A bf16 RGB stem (7×7, stride 2): the packed rows, and the zero-padded channels they replace, each within
    # bf16 storage rounding of float64.
    rows = benchmark_conv_kernel.run(2, ["9x3x16s2k7"], ["bfloat16"], ["16:16:1:4:3"], repeats=1)
    assert [r["method"] for r in rows] == methods[:3] + ["fused padded-C"]
    assert all(r["err_vs_f64"] < 2.0**-7 for r in rows if r["method"] != "cudnn summed wgrad")
    # --summed: book-keeping's batch sum; every float32 form within fp32 rounding of the "highest" VJP, the
    # non-private cuDNN sum (rounded to bf16) within bf16 rounding only.
    rows = benchmark_conv_kernel.run_summed(4, ["6x16x16", "7x16x32s2", "9x3x16s2k7"], ["bfloat16"],
                                            ["0:16:4:3", "2:32:4:3"], repeats=1)
    summed = ["blocks", "cudnn f32", "cudnn summed wgrad", "fused summed 0:16:4:3", "fused summed 2:32:4:3"]
    assert [r["method"] for r in rows] == 3 * summed
    assert all(r["ms"] is not None for r in rows)
    assert all(r["err_vs_f32"] < 1e-5 for r in rows if r["method"] != "cudnn summed wgrad")
    assert all(r["err_vs_f32"] < 2.0**-7 for r in rows if r["method"] == "cudnn summed wgrad")


def test_benchmark_rounds_report_each_modes_median_round_and_keep_every_round():
    """``--rounds``: a mode's result is its median-throughput round (the lower middle of an even count), as
    measured, with all rounds' throughputs beside it; one round stays as it was; a skipped mode passes through."""
    from experiments.benchmark import median_round

    rounds = [dict(mode="ghost", examples_per_s=v, step_ms=1000 / v) for v in (30.0, 10.0, 20.0)]
    got = median_round(rounds)
    assert got["examples_per_s"] == 20.0 and got["step_ms"] == 50.0
    assert got["rounds_examples_per_s"] == [30.0, 10.0, 20.0]
    assert median_round(rounds[:2])["examples_per_s"] == 10.0
    assert median_round(rounds[:1]) == rounds[0]
    assert median_round([dict(mode="ghost", skipped="no rule")]) == dict(mode="ghost", skipped="no rule")
