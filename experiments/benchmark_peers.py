"""tan_keras against Opacus and jax_privacy on WRN-16-4, same GPU, same run.

    KERAS_BACKEND=jax python -m experiments.benchmark_peers --batch_size=1024 --steps=30

Each measurement runs in a fresh subprocess (so peak memory is its own), one
after the other on the same device, at the same batch size, on one repeated
batch of random 32x32x3 images and 10-class labels:

* ``tan_keras``: ``experiments.benchmark``'s modes on ``models/wrn.py``
  (``nonprivate``: Keras SGD; ``vectorized`` and ``ghost`` DP-SGD), JAX
  backend, timed in a ``fit`` loop.
* ``jax_privacy``: ``jax_privacy.keras_api.make_private`` (2.x, per-example
  gradients by ``vmap``) on the same Keras WRN-16-4, timed in the same
  ``fit`` loop. Its framework's non-private step is the plain Keras step, so
  its baseline is tan_keras's ``nonprivate`` row (the same code).
* ``opacus``: ``PrivacyEngine.make_private`` on ``experiments/torch_wrn.py``
  (the same WRN-16-4 in PyTorch, GroupNorm(16), 2,751,562 parameters) with
  ``grad_sample_mode`` ``hooks``, ``functorch``, ``ew`` (ExpandedWeights)
  and ``ghost`` (fast gradient clipping); baseline: the plain PyTorch step
  (``torch/nonprivate``). PyTorch runs eagerly with cuDNN autotuning on and
  TF32 allowed for convolutions and matmuls (XLA's default for fp32 on this
  hardware), timed between ``torch.cuda.synchronize()`` calls.

All DP modes clip to C = 1 and add noise with sigma = 1, batches are fixed
(no Poisson sampling: this measures the step, not the sampler). The ratio
column is each row's throughput over its own framework's non-private
throughput measured in this run. Results go to
``docs/benchmarks/peers_<date>.json`` (or ``--output_json``) and a Markdown
table printed at the end. A peer whose package is missing stops the run
before anything is timed, naming the package and how to install it (or
drop it with ``--peers``).
"""

import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
PEERS = ("tan_keras", "jax_privacy", "opacus")
flags.DEFINE_integer("batch_size", 1024, "Examples per step, for every framework.")
flags.DEFINE_integer("steps", 30, "Timed steps per measurement.")
flags.DEFINE_integer("warmup", 3, "Untimed steps (compilation, autotuning) per measurement.")
flags.DEFINE_list("peers", list(PEERS), f"Frameworks to run, of {PEERS}.")
flags.DEFINE_list("tan_keras_modes", ["nonprivate", "vectorized", "ghost"], "experiments.benchmark modes.")
flags.DEFINE_list("opacus_modes", ["hooks", "functorch", "ew", "ghost"], "Opacus grad_sample_mode values.")
flags.DEFINE_string("output_json", None, "Results path; default docs/benchmarks/peers_<UTC date>.json.")
flags.DEFINE_string("run", None, "Internal: one measurement in this process ('torch:<mode>' or "
                    "'jax_privacy:dp'); prints a RESULT line.")

#: Packages each peer needs: (import name, pip requirement).
REQUIREMENTS = {
    "tan_keras": [("keras", "keras==3.15.1"), ("jax", "jax[cuda]")],
    "jax_privacy": [("keras", "keras==3.15.1"), ("jax", "jax[cuda]"), ("jax_privacy", "jax-privacy==2.0.0")],
    "opacus": [("torch", "torch"), ("opacus", "opacus==1.6.0")],
}

CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
NUM_CLASSES = 10


def missing_packages(peers):
    """``[(peer, pip requirement)]`` for every package a requested peer needs and cannot import."""
    missing = []
    for peer in peers:
        for module, requirement in REQUIREMENTS[peer]:
            if importlib.util.find_spec(module) is None:
                missing.append((peer, requirement))
    return missing


def _result(framework, mode, batch_size, steps, elapsed, peak_bytes, peak_kind, device, **extra):
    return {
        "framework": framework,
        "mode": mode,
        "examples_per_s": batch_size * steps / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "peak_memory_mb": peak_bytes / 2**20,
        "peak_memory_kind": peak_kind,
        "device": device,
        **extra,
    }


def run_torch(mode, batch_size, steps, warmup):
    """Times one PyTorch step: ``nonprivate`` or an Opacus ``grad_sample_mode``."""
    import torch
    from torch import nn

    from experiments import torch_wrn

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    model = torch_wrn.wrn_16_4(num_classes=NUM_CLASSES).to(device)
    params = torch_wrn.count_params(model)
    if params != torch_wrn.WRN_16_4_PARAMS:
        raise AssertionError(f"torch WRN-16-4 has {params} parameters, the Keras model {torch_wrn.WRN_16_4_PARAMS}.")
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = nn.CrossEntropyLoss()
    versions = {"torch": torch.__version__}
    if mode != "nonprivate":
        import opacus
        from torch.utils.data import DataLoader, TensorDataset

        versions["opacus"] = opacus.__version__
        engine = opacus.PrivacyEngine(accountant="rdp")
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
        out = engine.make_private(module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                                  noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=CLIP_NORM,
                                  grad_sample_mode=mode, poisson_sampling=False)
        if mode == "ghost":
            model, optimizer, criterion, _ = out
        else:
            model, optimizer, _ = out

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    float(loss.detach())
    if cuda:
        peak, kind, name = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated", \
            torch.cuda.get_device_name()
    else:
        import resource

        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"
        name = f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    framework = "torch" if mode == "nonprivate" else "opacus"
    return _result(framework, mode, batch_size, steps, elapsed, peak, kind, name, params=params,
                   versions=versions, tf32=True, cudnn_benchmark=True)


def run_jax_privacy(batch_size, steps, warmup):
    """Times ``jax_privacy.keras_api`` DP-SGD (vmap per-example gradients) on the Keras WRN-16-4."""
    import jax
    import jax_privacy
    import keras
    import numpy as np
    from jax_privacy import keras_api

    from experiments import benchmark_lib

    if keras.backend.backend() != "jax":
        raise ValueError(f"jax_privacy.keras_api needs KERAS_BACKEND=jax, not {keras.backend.backend()!r}.")
    keras.utils.set_random_seed(0)
    model, shape = benchmark_lib.build_model("wrn16_4")
    num_classes = model.output_shape[-1]
    total = warmup + steps
    config = keras_api.DPKerasConfig(
        epsilon=1e6,  # sigma is given; epsilon only bounds it and must not refuse a short benchmark run
        delta=1e-5,
        clipping_norm=CLIP_NORM,
        batch_size=batch_size,
        gradient_accumulation_steps=1,
        train_steps=total,
        train_size=batch_size * total,
        noise_multiplier=NOISE_MULTIPLIER,
        seed=0,
    )
    model = keras_api.make_private(model, config)
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size, *shape)).astype("float32")
    y = rng.integers(0, num_classes, size=(batch_size,)).astype("int32")
    model.fit(benchmark_lib.SameBatch(x, y, warmup), epochs=1, steps_per_epoch=warmup, verbose=0)
    timed = benchmark_lib.SameBatch(x, y, steps)
    start = time.perf_counter()
    model.fit(timed, epochs=1, steps_per_epoch=steps, verbose=0)  # returns once the logs are read back
    elapsed = time.perf_counter() - start
    peak, kind = benchmark_lib.peak_memory_bytes()
    versions = {"jax_privacy": getattr(jax_privacy, "__version__", "?"), "keras": keras.__version__,
                "jax": jax.__version__}
    return _result("jax_privacy", "keras_api vmap", batch_size, steps, elapsed, peak, kind,
                   benchmark_lib.device_name(), params=sum(int(np.prod(v.shape)) for v in model.trainable_variables), versions=versions)


def _subprocess_result(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return None, (proc.stderr or proc.stdout)[-3000:]
    return json.loads(lines[-1][len("RESULT "):]), None


def _plan(peers):
    """``[(label, framework, mode, command, KERAS_BACKEND or None)]`` in run order."""
    common = [f"--batch_size={FLAGS.batch_size}", f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}"]
    runs = []
    tan_modes = list(FLAGS.tan_keras_modes) if "tan_keras" in peers else []
    if "jax_privacy" in peers and "nonprivate" not in tan_modes:
        tan_modes.insert(0, "nonprivate")  # jax_privacy's baseline: the plain Keras step
    for mode in tan_modes:
        framework = "keras" if mode == "nonprivate" else "tan_keras"
        runs.append((f"{framework}/{mode}", framework, mode,
                     [sys.executable, "-m", "experiments.benchmark", f"--mode={mode}", "--model=wrn16_4", *common],
                     "jax"))
    if "jax_privacy" in peers:
        runs.append(("jax_privacy/keras_api vmap", "jax_privacy", "keras_api vmap",
                     [sys.executable, "-m", "experiments.benchmark_peers", "--run=jax_privacy:dp", *common], "jax"))
    if "opacus" in peers:
        for mode in ["nonprivate", *FLAGS.opacus_modes]:
            framework = "torch" if mode == "nonprivate" else "opacus"
            runs.append((f"{framework}/{mode}", framework, mode,
                         [sys.executable, "-m", "experiments.benchmark_peers", f"--run=torch:{mode}", *common], None))
    return runs


#: Which non-private row each framework's ratio is taken against.
BASELINE = {"keras": "keras", "tan_keras": "keras", "jax_privacy": "keras", "torch": "torch", "opacus": "torch"}


def add_ratios(results):
    """Sets ``ratio_to_nonprivate``: throughput over the framework's own non-private throughput (same run)."""
    base = {r["framework"]: r["examples_per_s"] for r in results if r.get("mode") == "nonprivate" and "error" not in r}
    for r in results:
        if "error" in r:
            continue
        reference = base.get(BASELINE[r["framework"]])
        r["baseline"] = f"{BASELINE[r['framework']]}/nonprivate"
        r["ratio_to_nonprivate"] = r["examples_per_s"] / reference if reference else None
    return results


def markdown_table(results):
    lines = ["| framework | mode | ex/s | step ms | peak MB | ratio to own non-private |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['framework']} | {r['mode']} | failed: {r['error'].splitlines()[-1][:80]} | | | |")
            continue
        ratio = r.get("ratio_to_nonprivate")
        lines.append(f"| {r['framework']} | {r['mode']} | {r['examples_per_s']:,.0f} | {r['step_ms']:.1f} | "
                     f"{r['peak_memory_mb']:,.0f} | {'' if ratio is None else f'{ratio:.3f}'} |")
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.run:
        kind, _, mode = FLAGS.run.partition(":")
        if kind == "torch":
            result = run_torch(mode, FLAGS.batch_size, FLAGS.steps, FLAGS.warmup)
        elif kind == "jax_privacy":
            result = run_jax_privacy(FLAGS.batch_size, FLAGS.steps, FLAGS.warmup)
        else:
            raise app.UsageError(f"--run must be 'torch:<mode>' or 'jax_privacy:dp', got {FLAGS.run!r}.")
        print("RESULT " + json.dumps(result))
        return
    unknown = [p for p in FLAGS.peers if p not in PEERS]
    if unknown:
        sys.exit(f"benchmark_peers: unknown --peers {unknown}; choose from {list(PEERS)}.")
    missing = missing_packages(FLAGS.peers)
    if missing:
        lines = [f"  {peer}: needs `{req}` (pip install {req})" for peer, req in missing]
        sys.exit("benchmark_peers: missing packages, nothing was run:\n" + "\n".join(lines) +
                 "\nInstall them, or leave those frameworks out with --peers.")
    results = []
    for label, framework, mode, cmd, backend in _plan(FLAGS.peers):
        env = os.environ.copy()
        if backend:
            env["KERAS_BACKEND"] = backend
        print(f"running {label} ...", flush=True)
        result, error = _subprocess_result(cmd, env)
        if result is None:
            print(f"  {label} failed:\n{error}", flush=True)
            results.append({"framework": framework, "mode": mode, "error": error})
            continue
        result["framework"], result["mode"] = framework, mode
        print(f"  {result['examples_per_s']:,.0f} ex/s, {result['step_ms']:.1f} ms/step, "
              f"peak {result['peak_memory_mb']:,.0f} MB", flush=True)
        results.append(result)
    add_ratios(results)
    device = next((r["device"] for r in results if "device" in r), "?")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    record = {"date": date, "device": device, "model": "WRN-16-4 (GroupNorm 16)", "batch_size": FLAGS.batch_size,
              "steps": FLAGS.steps, "warmup": FLAGS.warmup, "clip_norm": CLIP_NORM,
              "noise_multiplier": NOISE_MULTIPLIER, "results": results}
    path = FLAGS.output_json or os.path.join("docs", "benchmarks", f"peers_{date}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nWRN-16-4, B = {FLAGS.batch_size}, {FLAGS.steps} timed steps, on {device} ({date}); written to {path}\n")
    print(markdown_table(results))
    if any("error" in r for r in results):
        sys.exit("benchmark_peers: some measurements failed (see above).")


if __name__ == "__main__":
    app.run(main)
