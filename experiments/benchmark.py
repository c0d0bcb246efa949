"""Throughput and peak memory of non-private vs DP-SGD training steps.

    KERAS_BACKEND=jax python -m experiments.benchmark --model=cnn --batch_size=256
    KERAS_BACKEND=jax python -m experiments.benchmark --model=nf_resnet50 --batch_size=128 \
        --physical_batch_size=64 --mixed_precision --modes=nonprivate,ghost

Models: ``cnn`` and ``mlp`` (MNIST-sized), ``wrn16_4`` (``models/wrn.py``,
32x32), ``nf_resnet50`` (``models/nf_resnet.py``, ImageNet-sized: 1000
classes, ``--image_size`` 224 by default or 128) and ``vit`` (6 blocks x 384,
``experiments/vit.py``, 32x32). ``--mixed_precision`` sets Keras's
``mixed_bfloat16`` policy before the model is built (the non-private mode
too, so ratios compare like with like).

For each mode (``nonprivate``: Keras SGD; ``vectorized``: DP-SGD with
vectorized per-example gradients; ``ghost``: DP-SGD with ghost-norm clipping,
where available) a fresh subprocess builds the model, compiles the train
step, runs ``--warmup`` steps, then times ``--steps`` steps of ``fit`` on one
repeated host batch (or of a ``train_on_batch`` loop). Each subprocess
reports examples/s and its peak memory (device peak on GPU via JAX's
``memory_stats``, else the process's max RSS), so modes don't share a peak.
The table ends with the DP/non-private ratios measured in this one run.
``--rounds=R`` runs the modes R times, interleaved, and reports each mode's
median round (``median_round``), every round's throughput in the JSON.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from experiments.benchmark_lib import MODELS, SameBatch, build_model, device_name, peak_memory_bytes

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "cnn", list(MODELS), "Model to benchmark.")
flags.DEFINE_integer("image_size", None, "nf_resnet50 only: input side, 224 (default) or 128.")
flags.DEFINE_bool("mixed_precision", False, "Use Keras's `mixed_bfloat16` policy in every mode.")
flags.DEFINE_integer("batch_size", 256, "Batch size (examples per step).")
flags.DEFINE_integer("physical_batch_size", None, "Chunk size inside the DP step (memory bound).")
flags.DEFINE_integer("augmult", 0, "K > 0: DP modes average K on-device augmentations per example "
                     "before clipping (TAN Eq. 5); the non-private mode then trains on the K·B views.")
flags.DEFINE_integer("steps", 10, "Timed steps per mode.")
flags.DEFINE_integer("warmup", 2, "Untimed steps (compilation) per mode.")
flags.DEFINE_list("modes", ["nonprivate", "vectorized", "ghost"], "Modes to run.")
flags.DEFINE_integer("rounds", 1, "Runs of the modes, interleaved (nonprivate, ghost, nonprivate, ghost, ...); "
                     "each mode reports its median round. On a GPU whose speed drifts within a session (an H200 "
                     "ran the same step 5.8% faster in a later run), the ratio of medians is the steadier one.")
flags.DEFINE_string("mode", None, "Internal: run one mode in this process and print JSON.")
flags.DEFINE_enum("norm_mode", "auto", ["auto", "ghost", "explicit"],
                  "Ghost mode only: per-layer choice of ghost norm vs explicit per-example gradient "
                  "(auto = Li et al.'s cost rule).")
flags.DEFINE_string("jit_compile", "auto", "compile(jit_compile=...): auto, true or false.")
flags.DEFINE_string("output_json", None, "Optional path for the results as JSON.")
flags.DEFINE_enum("loop", "fit", ["fit", "train_on_batch"],
                  "How steps are run: `fit` (asynchronous dispatch, as in training) or a "
                  "`train_on_batch` loop (waits for every step on the host).")


def run_mode(mode):
    import keras
    import numpy as np

    import tan_keras

    keras.utils.set_random_seed(0)
    if FLAGS.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model, shape = build_model(FLAGS.model, image_size=FLAGS.image_size)
    num_classes = model.output_shape[-1]
    jit = {"auto": "auto", "true": True, "false": False}[FLAGS.jit_compile.lower()]
    if mode == "nonprivate":
        optimizer = keras.optimizers.SGD(0.01)
        batch = FLAGS.batch_size * max(FLAGS.augmult, 1)  # the same number of forward/backward passes
    else:
        batch = FLAGS.batch_size
        optimizer = tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.01, seed=0)
        if FLAGS.augmult:
            from tan_keras import augmult

            model = augmult.wrap(model, FLAGS.augmult, physical_batch_size=FLAGS.physical_batch_size,
                                 clipping="ghost" if mode == "ghost" else "vectorized")
        else:
            model = tan_keras.make_private(model, physical_batch_size=FLAGS.physical_batch_size,
                                           clipping="ghost" if mode == "ghost" else "vectorized")
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *shape)).astype("float32")
    y = rng.integers(0, num_classes, size=(batch,)).astype("int32")
    from tan_keras.ghost import norm_mode

    with norm_mode(FLAGS.norm_mode):
        if FLAGS.loop == "fit":
            model.fit(SameBatch(x, y, FLAGS.warmup), epochs=1, verbose=0)
            timed = SameBatch(x, y, FLAGS.steps)
            start = time.perf_counter()
            # fit returns after the epoch's logs are read back: the last step is done.
            model.fit(timed, epochs=1, verbose=0)
            elapsed = time.perf_counter() - start
        else:
            for _ in range(FLAGS.warmup):
                model.train_on_batch(x, y)
            start = time.perf_counter()
            for _ in range(FLAGS.steps):
                loss = model.train_on_batch(x, y)
            float(np.asarray(loss).ravel()[0])  # block until the last step is done
            elapsed = time.perf_counter() - start
    peak, peak_kind = peak_memory_bytes()
    return {
        "mode": mode,
        # Examples = images; with augmult, K views of each (the non-private
        # baseline processes the same K·B views as plain examples).
        "examples_per_s": FLAGS.batch_size * FLAGS.steps / elapsed,
        "step_ms": 1000 * elapsed / FLAGS.steps,
        "peak_memory_mb": peak / 2**20,
        "peak_memory_kind": peak_kind,
        "backend": keras.backend.backend(),
        "device": device_name(),
        "params": model.count_params(),
        "dtype_policy": keras.mixed_precision.dtype_policy().name,
        "model": FLAGS.model,
        "image_size": FLAGS.image_size,
        "batch_size": FLAGS.batch_size,
        "physical_batch_size": FLAGS.physical_batch_size,
        "augmult": FLAGS.augmult,
        "steps": FLAGS.steps,
        "loop": FLAGS.loop,
    }


def median_round(rounds):
    """One mode's result from its rounds: the round of median throughput (the lower one of an even count),
    with every round's ``examples_per_s`` beside it; a skipped mode as it came."""
    timed = [r for r in rounds if "examples_per_s" in r]
    if not timed:
        return rounds[0]
    ordered = sorted(timed, key=lambda r: r["examples_per_s"])
    result = dict(ordered[(len(ordered) - 1) // 2])
    if len(rounds) > 1:
        result["rounds_examples_per_s"] = [r["examples_per_s"] for r in timed]
    return result


def main(argv):
    del argv
    if FLAGS.mode:
        print("RESULT " + json.dumps(run_mode(FLAGS.mode)))
        return
    results = []
    # absl consumes sys.argv, so forward this run's settings explicitly.
    passthrough = [f"--{name}={FLAGS[name].value}" for name in
                   ("model", "batch_size", "steps", "warmup", "augmult", "jit_compile", "norm_mode", "loop")]
    if FLAGS.physical_batch_size:
        passthrough.append(f"--physical_batch_size={FLAGS.physical_batch_size}")
    if FLAGS.image_size:
        passthrough.append(f"--image_size={FLAGS.image_size}")
    if FLAGS.mixed_precision:
        passthrough.append("--mixed_precision")
    if FLAGS.rounds < 1:
        raise app.UsageError(f"--rounds={FLAGS.rounds}: give 1 or more.")
    runs = {mode: [] for mode in FLAGS.modes}
    for _ in range(FLAGS.rounds):
        for mode in FLAGS.modes:
            proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", f"--mode={mode}", *passthrough],
                                  capture_output=True, text=True, env=os.environ.copy())
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise RuntimeError(f"mode {mode} failed:\n{proc.stderr[-4000:]}")
            runs[mode].append(json.loads(lines[-1][len("RESULT "):]))
    results = [median_round(runs[mode]) for mode in FLAGS.modes]
    base = next((r for r in results if r["mode"] == "nonprivate" and "examples_per_s" in r), None)
    backend = next((r["backend"] for r in results if "backend" in r), "?")
    device = next((r["device"] for r in results if "device" in r), "?")
    print(f"model={FLAGS.model} image_size={FLAGS.image_size} mixed_precision={FLAGS.mixed_precision} "
          f"batch={FLAGS.batch_size} augmult={FLAGS.augmult} norm_mode={FLAGS.norm_mode} "
          f"backend={backend} device={device!r} "
          f"steps={FLAGS.steps} loop={FLAGS.loop} physical_batch_size={FLAGS.physical_batch_size}")
    print(f"{'mode':<12}{'examples/s':>12}{'step ms':>10}{'peak MB':>10}{'DP cost ×':>11}")
    for r in results:
        if "skipped" in r:
            print(f"{r['mode']:<12}  skipped: {r['skipped']}")
            continue
        ratio = base["examples_per_s"] / r["examples_per_s"] if base else float("nan")
        r["slowdown_vs_nonprivate"] = ratio
        print(f"{r['mode']:<12}{r['examples_per_s']:>12.1f}{r['step_ms']:>10.1f}{r['peak_memory_mb']:>10.0f}"
              f"{ratio:>11.2f}")
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
