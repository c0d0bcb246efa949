"""The TensorFlow private step under ``tf.distribute.MirroredStrategy``: 4 logical CPU devices.

Each test runs a fresh Python process that splits the CPU into 4 logical
devices (``tf.config.set_logical_device_configuration``, which must run
before TensorFlow initialises its devices), fits the same model on the same
data twice — once built and compiled under ``MirroredStrategy`` over the 4
devices, with no other change to the model code, once on one device — and
compares the updates. The reference is the single-device step, which
tests/test_private_training.py checks against a one-example loop.

TensorFlow only: defined only on that backend (the JAX step's distribution is
tests/test_distributed_jax.py).
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np

import tan_keras

REPLICAS = 4
TIMEOUT_S = 240

#: Fits ``steps`` steps of batch 16 on one device (the first clipping mode, one chunk: the reference) and under
#: MirroredStrategy (every clipping mode and physical_batch_size); prints updates, logs and per-replica state.
WORKER = r"""
import json, sys
import tensorflow as tf
cfg = json.loads(sys.argv[1])
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cfg["replicas"])
import keras, numpy as np
import tan_keras

rng = np.random.default_rng(0)
n = 16 * cfg["steps"]
shape = {"dense": (12,), "wide": (32,)}[cfg["model"]]
x = rng.normal(size=(n,) + shape).astype("float32")
y = rng.integers(0, 3, n).astype("int32")
w = np.ones(n, "float32")
w[16 - cfg["padding"]:16] = 0.0  # Poisson padding rows in the first batch (they land on the last replica)

def build(physical_batch_size, clipping):
    L, init = keras.layers, keras.initializers.GlorotUniform
    body = {
        "dense": [L.Dense(8, kernel_initializer=init(1)), L.GroupNormalization(2), L.Activation("tanh"),
                  L.Dense(3, kernel_initializer=init(2))],
        "wide": [L.Dense(64, kernel_initializer=init(1))],
    }[cfg["model"]]
    if cfg.get("augmult"):  # K fixed views per example (view j scales the example by scales[j])
        from tan_keras import augmult
        scales = np.linspace(1.0, -0.5, cfg["augmult"]).astype("float32")
        views = lambda v, seed: v * keras.ops.reshape(keras.ops.convert_to_tensor(scales), (1, -1, 1))
        return augmult.wrap(keras.Sequential([keras.Input(shape)] + body), cfg["augmult"], augment=views,
                            clipping=clipping, physical_batch_size=physical_batch_size)
    return tan_keras.PrivateSequential([keras.Input(shape)] + body, clipping=clipping,
                                       physical_batch_size=physical_batch_size)

def per_replica(variable):
    return [np.array(v) for v in getattr(variable.value, "_values", [variable.value])]

def fit(distributed, sigma, physical_batch_size, clipping):
    strategy = (tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(cfg["replicas"])]) if distributed
                else tf.distribute.get_strategy())
    with strategy.scope():
        model = build(physical_batch_size, clipping)
        model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=cfg["clip"], noise_multiplier=sigma, seed=0,
                                                learning_rate=1.0, expected_batch_size=cfg["expected_batch_size"]),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert model.distribute_strategy.num_replicas_in_sync == (cfg["replicas"] if distributed else 1)
    before = [np.array(v) for v in model.get_weights()]
    history = model.fit(x, y, sample_weight=w, batch_size=16, epochs=1, shuffle=False, verbose=0).history
    delta = np.concatenate([(b - np.array(a)).ravel() for b, a in zip(before, model.get_weights())])
    copies = [per_replica(v) for v in model.trainable_variables]
    spread = max(float(np.abs(c - cs[0]).max()) for cs in copies for c in cs)
    seeds = [s.tolist() for s in per_replica(model.optimizer._noise_seed_generator.state)]
    return {"delta": delta.tolist(), "logs": {k: v[-1] for k, v in history.items()}, "weight_spread": spread,
            "seed_states": seeds, "copies": len(copies[0])}

out = {}
for sigma in cfg["sigmas"]:
    out[f"single/{sigma}"] = fit(False, sigma, None, cfg["clippings"][0])
    for clipping in cfg["clippings"]:
        for p in cfg["physical_batch_sizes"]:
            out[f"{clipping}/{p}/{sigma}"] = fit(True, sigma, p, clipping)
print("RESULT " + json.dumps(out))
"""


#: Under MirroredStrategy: 4 sampled steps straight, and 2 + checkpoint + (fresh model, restore) + 2; momentum, EMA.
RESUME_WORKER = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * int(sys.argv[2]))
import keras, numpy as np
import tan_keras
from tan_keras import callbacks, sampling

directory = sys.argv[1]
strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(int(sys.argv[2]))])
n = 32
rng = np.random.default_rng(0)
x = rng.normal(size=(n, 12)).astype("float32")
y = rng.integers(0, 3, n).astype("int32")

def run(model_seed, sampler_seed, noise_seed, epochs, save=False, restore=False):
    init = keras.initializers.GlorotUniform
    with strategy.scope():
        model = tan_keras.PrivateSequential([
            keras.Input((12,)), keras.layers.Dense(8, kernel_initializer=init(model_seed)),
            keras.layers.GroupNormalization(2), keras.layers.Activation("tanh"),
            keras.layers.Dense(3, kernel_initializer=init(model_seed + 1))], physical_batch_size=2)
        model.compile(optimizer=tan_keras.DPSGD(0.5, 1.0, seed=noise_seed, learning_rate=0.3, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    sampler = sampling.PoissonSampler(n, batch_size=8, physical_batch_size=4, seed=sampler_seed)
    ema = callbacks.EMA(0.9)
    sampler.configure(model)
    if restore:  # outside the strategy scope, as a user would call it
        callbacks.restore_checkpoint(directory, model, sampler=sampler, ema=ema)
    extra = [callbacks.PrivateCheckpoint(directory, ema=ema)] if save else []
    model.fit(sampler.dataset(x, y, steps_per_epoch=2), epochs=epochs, verbose=0, callbacks=[*extra, ema])
    return {"weights": [np.array(w).tolist() for w in model.get_weights()],
            "ema": [np.array(a).tolist() for a in ema.average],
            "seed_states": [np.array(v).tolist() for v in model.optimizer._noise_seed_generator.state.value._values],
            "iterations": int(model.optimizer.iterations.numpy())}

straight = run(0, 3, 7, epochs=2)
run(0, 3, 7, epochs=1, save=True)  # "killed" after 2 steps
resumed = run(5, 11, 13, epochs=1, restore=True)  # other weights and seeds, all overwritten by the checkpoint
print("RESULT " + json.dumps({"straight": straight, "resumed": resumed}))
"""


def worker_env():
    root = str(pathlib.Path(tan_keras.__file__).resolve().parent.parent)
    return dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3",
                PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))


def result_of(stdout):
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])


def run_worker(**cfg):
    config = dict(replicas=REPLICAS, steps=1, padding=4, expected_batch_size=12.0, clip=0.5, sigmas=[0.0],
                  physical_batch_sizes=[None], model="dense", clippings=["vectorized"])
    config.update(cfg)
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(config)], env=worker_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = result_of(proc.stdout)
    for key, run in out.items():
        assert run["copies"] == (1 if key.startswith("single/") else REPLICAS), "not mirrored"
    return out


if keras.backend.backend() == "tensorflow":

    def test_mirrored_update_equals_single_device_update_for_both_clipping_modes():
        """σ = 0, B = 12 with 4 zero-weight rows, C between the per-example norms, two steps, 4 replicas.

        Both clipping modes, in one chunk per replica and in chunks of 2
        (``physical_batch_size=2``: the ``tf.while_loop``), against one
        single-device run (vectorized, one chunk). The logged loss and
        clip statistics are the global ones, and every replica ends with the
        same weights.
        """
        out = run_worker(clippings=["vectorized", "ghost"], clip=3.0, steps=2, physical_batch_sizes=[None, 2])
        single = out["single/0.0"]
        assert 0.0 < single["logs"]["clip_fraction"] < 1.0  # some examples clipped, some not
        assert np.abs(single["delta"]).max() > 1e-3  # a real update
        for clipping in ("vectorized", "ghost"):
            for p in (None, 2):
                distributed = out[f"{clipping}/{p}/0.0"]
                np.testing.assert_allclose(distributed["delta"], single["delta"], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{clipping}, physical_batch_size={p}")
                for name in ("loss", "clip_fraction", "per_example_norm", "signal_norm"):
                    np.testing.assert_allclose(distributed["logs"][name], single["logs"][name], rtol=1e-5)
                assert distributed["weight_spread"] == 0.0

    def test_mirrored_augmult_ghost_update_equals_single_device_update():
        """AugMult, K = 3 fixed views per example, ghost clipping: each replica groups its own examples' views;
        the update on 4 replicas (one chunk, and chunks of 2) is the single-device one."""
        out = run_worker(clippings=["ghost"], clip=3.0, steps=2, physical_batch_sizes=[None, 2], augmult=3)
        single = out["single/0.0"]
        assert 0.0 < single["logs"]["clip_fraction"] < 1.0 and np.abs(single["delta"]).max() > 1e-3
        for p in (None, 2):
            np.testing.assert_allclose(out[f"ghost/{p}/0.0"]["delta"], single["delta"], rtol=1e-5, atol=1e-6,
                                       err_msg=f"physical_batch_size={p}")

    def test_mirrored_noise_is_added_once_with_std_sigma_c():
        """σ = 2, C = 0.5: the noise on the summed gradient has std σC (not σC·√R or R·σC for R = 4 replicas).

        The noise is isolated as (update(σ) − update(0))·B with the same seed.
        Its std over 2,112 coordinates has relative standard error
        1/√(2·2112) ≈ 1.5%: the band is 5 of those. With the same seed it is
        the single-device draw, and the noise_norm metric is its norm / B.
        Every replica applies that one noised update and advances its copy of
        the noise seed state as one device does.
        """
        sigma, clip, b = 2.0, 0.5, 12.0
        out = run_worker(model="wide", clip=clip, sigmas=[0.0, sigma])
        runs = {"single": "single/{}", "distributed": "vectorized/None/{}"}
        noise = {name: (np.array(out[key.format(sigma)]["delta"]) - np.array(out[key.format(0.0)]["delta"])) * b
                 for name, key in runs.items()}
        assert noise["distributed"].size == 32 * 64 + 64
        band = 5 / np.sqrt(2 * noise["distributed"].size)
        for name in ("single", "distributed"):
            assert abs(noise[name].std() / (sigma * clip) - 1) < band, name
        np.testing.assert_allclose(noise["distributed"], noise["single"], atol=1e-5)
        noised = out[f"vectorized/None/{sigma}"]
        np.testing.assert_allclose(noised["logs"]["noise_norm"], np.linalg.norm(noise["distributed"]) / b, rtol=1e-4)
        # One draw per variable, the same on every replica: the mirrored seed states agree and match one device.
        single_state = out[f"single/{sigma}"]["seed_states"]
        assert single_state != [[0, 0]] and noised["seed_states"] == single_state * REPLICAS
        assert noised["weight_spread"] == 0.0

    def test_resumed_mirrored_run_equals_uninterrupted_run_with_the_same_seed_state_on_every_replica(tmp_path):
        """4 replicas, Poisson sampling, σ = 1, momentum, EMA: 4 steps straight, or 2 steps, a
        PrivateCheckpoint, a fresh model with other seeds (restored outside the strategy scope), and 2 more.

        Weights and EMA match, and every replica's copy of the noise seed state
        is the uninterrupted run's.
        """
        proc = subprocess.run([sys.executable, "-c", RESUME_WORKER, str(tmp_path), str(REPLICAS)], env=worker_env(),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = result_of(proc.stdout)
        straight, resumed = out["straight"], out["resumed"]
        assert straight["iterations"] == resumed["iterations"] == 4
        for name in ("weights", "ema"):
            for a, b in zip(straight[name], resumed[name]):
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
        assert len(resumed["seed_states"]) == REPLICAS
        assert resumed["seed_states"] == straight["seed_states"] == [straight["seed_states"][0]] * REPLICAS
