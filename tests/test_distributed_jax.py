"""The JAX private step under ``keras.distribution.DataParallel``: 4 virtual CPU devices, and 2 processes.

Each test runs a fresh Python process with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the flag must be set
before JAX starts), fits one step of the same model on the same data twice —
once under ``DataParallel(devices=jax.devices())``, once on one device with no
distribution — and compares the updates. The reference is the single-device
step, which tests/test_private_training.py checks against a one-example loop.

The last test is a real two-process run on localhost (``jax.distributed``
with gloo CPU collectives, 2 virtual devices per process): both processes
draw the same global Poisson mask, feed disjoint slices of it, and end the
step with the single-device weights.

JAX only: the tests are defined only on that backend (TF's
``tf.distribute`` step is tests/test_distributed_tf.py).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

import tan_keras

DEVICES = 4
TIMEOUT_S = 240

#: For each physical_batch_size, fits one step with and without DataParallel; prints the updates as JSON.
WORKER = r"""
import json, sys
import jax, keras, numpy as np
import tan_keras

cfg = json.loads(sys.argv[1])
assert len(jax.devices()) == cfg["devices"], jax.devices()
rng = np.random.default_rng(0)
n = cfg["batch"]
shape = {"dense": (12,), "conv": (6, 6, 2), "wide": (32,)}[cfg["model"]]
x = rng.normal(size=(n,) + shape).astype("float32")
y = rng.integers(0, 3, n).astype("int32")
w = np.ones(n, "float32")
w[n - cfg["padding"]:] = 0.0  # Poisson padding rows

def build(physical_batch_size):
    L, init = keras.layers, keras.initializers.GlorotUniform  # seeded: set_random_seed would import TF
    body = {
        "dense": [L.Dense(8, kernel_initializer=init(1)), L.GroupNormalization(2), L.Activation("tanh"),
                  L.Dense(3, kernel_initializer=init(2))],
        "conv": [L.Conv2D(4, 3, kernel_initializer=init(1)), L.GroupNormalization(2), L.Activation("tanh"),
                 L.Flatten(), L.Dense(3, kernel_initializer=init(2))],
        "wide": [L.Dense(64, kernel_initializer=init(1))],
    }[cfg["model"]]
    if cfg.get("augmult"):  # K fixed views per example (view j scales the image by SCALES[j])
        from tan_keras import augmult
        scales = keras.ops.convert_to_tensor(np.linspace(1.0, -0.5, cfg["augmult"]).astype("float32"))
        views = lambda v, seed: v * keras.ops.reshape(scales, (1, -1) + (1,) * len(shape))
        return augmult.wrap(keras.Sequential([keras.Input(shape)] + body), cfg["augmult"], augment=views,
                            clipping=cfg["clipping"], physical_batch_size=physical_batch_size)
    return tan_keras.PrivateSequential([keras.Input(shape)] + body, clipping=cfg["clipping"],
                                       physical_batch_size=physical_batch_size)

def update(distributed, sigma, physical_batch_size):
    dist = keras.distribution.DataParallel(devices=jax.devices()) if distributed else None
    keras.distribution.set_distribution(dist)
    model = build(physical_batch_size)
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=cfg["clip"], noise_multiplier=sigma, seed=0,
                                            learning_rate=1.0, expected_batch_size=cfg["expected_batch_size"]),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [np.array(v) for v in model.get_weights()]
    model.train_on_batch(x, y, sample_weight=w)
    kernel = model.trainable_variables[0].value
    spans = len(kernel.sharding.device_set)
    delta = np.concatenate([(b - np.array(a)).ravel() for b, a in zip(before, model.get_weights())])
    return delta.tolist(), spans

out = {}
for p in cfg["physical_batch_sizes"]:
    for name, distributed in (("single", False), ("distributed", True)):
        key = f"{name}/{p}"
        out[key], out[key + "/devices"] = update(distributed, 0.0, p)
        if cfg["sigma"]:
            noised, _ = update(distributed, cfg["sigma"], p)
            out[key + "/noise"] = ((np.array(noised) - np.array(out[key])) * cfg["expected_batch_size"]).tolist()
print("RESULT " + json.dumps(out))
"""


#: One process of a 2-process jax.distributed run: fit one sampled step sharded, and on one device.
TWO_PROCESS_WORKER = r"""
import json, sys
import jax
jax.distributed.initialize(coordinator_address="127.0.0.1:" + sys.argv[2], num_processes=2,
                           process_id=int(sys.argv[1]), initialization_timeout=60)
import keras, numpy as np
import tan_keras
from tan_keras import sampling
assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
n, b = 64, 16
rng = np.random.default_rng(0)
x = rng.normal(size=(n, 12)).astype("float32")
y = rng.integers(0, 3, n).astype("int32")

def compiled():
    init = keras.initializers.GlorotUniform
    model = tan_keras.PrivateSequential([
        keras.Input((12,)), keras.layers.Dense(8, kernel_initializer=init(1)), keras.layers.GroupNormalization(2),
        keras.layers.Activation("tanh"), keras.layers.Dense(3, kernel_initializer=init(2))])
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=0.5, noise_multiplier=1.0, seed=0, learning_rate=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model

def update(model, sampler):
    before = [np.array(v) for v in model.get_weights()]
    sampling.private_fit(model, x, y, steps=1, sampler=sampler, verbose=0)
    return np.concatenate([(w0 - np.array(w)).ravel() for w0, w in zip(before, model.get_weights())]).tolist()

# The sampler's slices are the process-local batches: Keras must not shard them again.
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False))
sharded = sampling.PoissonSampler(n, batch_size=b, physical_batch_size=2, seed=3, num_shards=sampling.JAX_PROCESSES)
model = compiled()
def refusal(sampler):
    try:
        sampler.configure(model)
        return ""
    except ValueError as e:
        return str(e)

out = {"unsharded_refused": refusal(sampling.PoissonSampler(n, batch_size=b, seed=3)),
       "uneven_refused": refusal(sampling.PoissonSampler(n, batch_size=b, physical_batch_size=1, seed=3,
                                                         num_shards=sampling.JAX_PROCESSES)),
       "global_draw": sharded.indices(0).tolist(), "slice": sharded.shard_indices(0).tolist(),
       "shard_batch_size": sharded.shard_batch_size, "padded_batch_size": sharded.padded_batch_size,
       "update": update(model, sharded)}
keras.distribution.set_distribution(None)
with jax.default_device(jax.local_devices()[0]):
    out["single_device_update"] = update(compiled(), sampling.PoissonSampler(n, batch_size=b, seed=3))
print("RESULT " + json.dumps(out))
"""


#: Under DataParallel: 4 sampled steps straight, and 2 + checkpoint + (fresh model, restore) + 2; momentum and EMA.
RESUME_WORKER = r"""
import json, sys
import jax, keras, numpy as np
import tan_keras
from tan_keras import callbacks, sampling

directory = sys.argv[1]
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
n = 32
rng = np.random.default_rng(0)
x = rng.normal(size=(n, 12)).astype("float32")
y = rng.integers(0, 3, n).astype("int32")

def run(model_seed, sampler_seed, noise_seed, epochs, save=False, restore=False):
    init = keras.initializers.GlorotUniform
    model = tan_keras.PrivateSequential([
        keras.Input((12,)), keras.layers.Dense(8, kernel_initializer=init(model_seed)),
        keras.layers.GroupNormalization(2), keras.layers.Activation("tanh"),
        keras.layers.Dense(3, kernel_initializer=init(model_seed + 1))], physical_batch_size=2)
    model.compile(optimizer=tan_keras.DPSGD(0.5, 1.0, seed=noise_seed, learning_rate=0.3, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    sampler = sampling.PoissonSampler(n, batch_size=8, physical_batch_size=4, seed=sampler_seed)
    ema = callbacks.EMA(0.9)
    sampler.configure(model)
    if restore:
        callbacks.restore_checkpoint(directory, model, sampler=sampler, ema=ema)
    extra = [callbacks.PrivateCheckpoint(directory, ema=ema)] if save else []
    model.fit(sampler.dataset(x, y, steps_per_epoch=2), epochs=epochs, verbose=0, callbacks=[*extra, ema])
    state = model.optimizer._noise_seed_generator.state.value
    return {"weights": [np.array(w).tolist() for w in model.get_weights()],
            "ema": [np.array(a).tolist() for a in ema.average],
            "seed_devices": len(state.sharding.device_set),
            "seed_shards": [np.array(s.data).tolist() for s in state.addressable_shards],
            "iterations": int(model.optimizer.iterations.value)}

straight = run(0, 3, 7, epochs=2)
run(0, 3, 7, epochs=1, save=True)  # "killed" after 2 steps
resumed = run(5, 11, 13, epochs=1, restore=True)  # other weights and seeds, all overwritten by the checkpoint
print("RESULT " + json.dumps({"straight": straight, "resumed": resumed}))
"""


def worker_env(devices):
    root = str(pathlib.Path(tan_keras.__file__).resolve().parent.parent)
    return dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""),
                                    f"--xla_force_host_platform_device_count={devices}"]).strip(),
                PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))


def result_of(stdout):
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])


def run_worker(**cfg):
    config = dict(devices=DEVICES, batch=16, padding=4, expected_batch_size=12.0, clip=0.5, sigma=0.0,
                  physical_batch_sizes=[None], model="dense", clipping="vectorized")
    config.update(cfg)
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(config)], env=worker_env(DEVICES),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = result_of(proc.stdout)
    for p in config["physical_batch_sizes"]:
        assert out[f"single/{p}/devices"] == 1 and out[f"distributed/{p}/devices"] == DEVICES, "not on the mesh"
    return out


def test_shard_plan_keeps_the_global_normaliser_and_refuses_a_batch_that_does_not_split():
    """The per-device plan: B/R rows, chunks of physical_batch_size per device, the global B as normaliser."""
    from tan_keras.per_example import plan as plans

    optimizer = tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=12.0)
    global_plan = plans.make_plan(16, optimizer, 2)
    local = plans.shard_plan(global_plan, 4, 2, "batch")
    assert (local.batch_size, local.num_units, local.chunk_size, local.num_chunks) == (4, 4, 2, 2)
    assert local.normalizer == global_plan.normalizer == 12.0 and local.data_axis == "batch"
    unsized = plans.make_plan(16, tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0), None)
    assert plans.shard_plan(unsized, 4, None, "batch").normalizer == 16.0
    with pytest.raises(ValueError, match="does not split evenly over the 4 data-parallel devices"):
        plans.shard_plan(plans.make_plan(10, optimizer, None), 4, None, "batch")
    microbatched = tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0, num_microbatches=2)
    with pytest.raises(ValueError, match="num_microbatches=2 does not split over the 4"):
        plans.shard_plan(plans.make_plan(16, microbatched, None), 4, None, "batch")


if keras.backend.backend() == "jax":  # defined only on JAX: the TF step is tests/test_distributed_tf.py

    @pytest.mark.parametrize("clipping,model,k", [("vectorized", "dense", 0), ("vectorized", "conv", 0),
                                                  ("ghost", "conv", 0), ("ghost", "conv", 3)],
                             ids=["vectorized-dense_groupnorm", "vectorized-conv_groupnorm", "ghost-conv_groupnorm",
                                  "ghost-conv_groupnorm-augmult3"])
    def test_data_parallel_update_equals_single_device_update(clipping, model, k):
        """σ = 0, clipping active, 4 zero-weight padding rows, B = 12: the same update on 4 devices as on 1.

        In one chunk per device, and in two chunks of 2 per device
        (``physical_batch_size=2``: the per-device ``lax.scan``; eight chunks on
        one device). The vectorized Conv case is the one XLA's SPMD partitioner
        got wrong on a sharded batch (docs/repro/jax_vmap_conv_grad_sharded.py).
        With AugMult (K = 3 views per example), each device groups its own
        examples' views (3 rows each) in the ghost norms.
        """
        out = run_worker(clipping=clipping, model=model, physical_batch_sizes=[None, 2], augmult=k)
        for p in (None, 2):
            single, distributed = np.array(out[f"single/{p}"]), np.array(out[f"distributed/{p}"])
            assert np.abs(single).max() > 1e-3  # a real update
            np.testing.assert_allclose(distributed, single, rtol=1e-5, atol=1e-6, err_msg=f"physical_batch_size={p}")


    def test_data_parallel_noise_is_added_once_with_std_sigma_c():
        """σ = 2, C = 0.5: the noise of the summed gradient has std σC (not σC·√R for R = 4 noised replicas).

        The noise is isolated as (update(σ) − update(0))·B with the same seed. Its
        std over 2,112 coordinates has relative standard error 1/√(2·2112) ≈ 1.5%:
        the band is 5 of those. The distributed noise is the single-device draw.
        """
        sigma, clip = 2.0, 0.5
        out = run_worker(model="wide", sigma=sigma, clip=clip)
        noise, single_noise = np.array(out["distributed/None/noise"]), np.array(out["single/None/noise"])
        assert noise.size == 32 * 64 + 64
        band = 5 / np.sqrt(2 * noise.size)
        assert abs(noise.std() / (sigma * clip) - 1) < band
        assert abs(single_noise.std() / (sigma * clip) - 1) < band
        np.testing.assert_allclose(noise, single_noise, atol=1e-5)


    def test_two_processes_draw_one_global_mask_feed_disjoint_slices_and_match_one_device():
        """2 × jax.distributed processes on 127.0.0.1, σ = 1 with a fixed seed, 120 s at most."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_WORKER, str(i), str(port)], env=worker_env(2),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        try:
            streams = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        for p, (_, err) in zip(procs, streams):
            assert p.returncode == 0, err[-4000:]
        first, second = (result_of(out) for out, _ in streams)
        draw = first["global_draw"]
        assert second["global_draw"] == draw and len(draw) > 0
        assert not set(first["slice"]) & set(second["slice"])
        assert sorted(first["slice"] + second["slice"]) == draw
        assert first["shard_batch_size"] * 2 == first["padded_batch_size"] >= len(draw)
        for result in (first, second):
            assert "sensitivity" in result["unsharded_refused"]
            assert "4 data-parallel devices" in result["uneven_refused"]
            np.testing.assert_allclose(result["update"], first["single_device_update"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(first["single_device_update"], second["single_device_update"])


    def test_resumed_data_parallel_run_equals_uninterrupted_run_with_one_seed_state_on_every_device(tmp_path):
        """DataParallel on 4 devices, Poisson sampling, σ = 1, momentum, EMA: 4 steps straight, or 2 steps,
        a PrivateCheckpoint, a fresh model with other seeds restored from it, and 2 more steps.

        The weights and the EMA match, and the noise seed state is one replicated
        value: every device holds the same copy.
        """
        proc = subprocess.run([sys.executable, "-c", RESUME_WORKER, str(tmp_path)], env=worker_env(DEVICES),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = result_of(proc.stdout)
        straight, resumed = out["straight"], out["resumed"]
        assert straight["iterations"] == resumed["iterations"] == 4
        for name in ("weights", "ema"):
            for a, b in zip(straight[name], resumed[name]):
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
        for run in (straight, resumed):
            assert run["seed_devices"] == DEVICES and len(run["seed_shards"]) == DEVICES
            assert all(shard == straight["seed_shards"][0] for shard in run["seed_shards"])
