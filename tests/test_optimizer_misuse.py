"""Misuse of the DP optimizers' arguments and noise seed (issue 15, items 4, 6 and 14; issue 18, item 5).

Each test pins what a user sees: the error type and the field its message
names, or the noise the trained weights carry. Runs on the backend named by
KERAS_BACKEND.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import tan_keras
from tan_keras import callbacks, sampling

DP_OPTIMIZERS = [tan_keras.DPSGD, tan_keras.DPAdam]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def zero_gradient_model(optimizer, width=4):
    """A Dense model fed zeros with an MSE target of zero: its gradient is 0, so its update is the noise."""
    model = tan_keras.PrivateSequential([
        keras.Input((width,)), keras.layers.Dense(2, kernel_initializer="zeros", bias_initializer="zeros")])
    model.compile(optimizer=optimizer, loss="mse")
    return model


def flat_weights(model):
    return np.concatenate([np.ravel(w) for w in model.get_weights()])


# -- issue 15.4: C = inf only with σ = 0 --------------------------------------------------------


@pytest.mark.parametrize("cls", DP_OPTIMIZERS)
def test_infinite_clip_with_noise_is_refused_naming_both_fields_and_the_fix(cls):
    with pytest.raises(ValueError) as err:
        cls(l2_norm_clip=float("inf"), noise_multiplier=1.0)
    message = str(err.value)
    assert "l2_norm_clip" in message and "noise_multiplier" in message
    assert "finite `l2_norm_clip`" in message and "NoisySGD" in message
    with pytest.raises(ValueError, match="l2_norm_clip"):
        cls(l2_norm_clip=np.float32("inf"), noise_multiplier=np.float32(0.5))


@pytest.mark.parametrize("cls", DP_OPTIMIZERS)
def test_infinite_clip_without_noise_is_accepted_and_trains_to_finite_weights(cls):
    optimizer = cls(l2_norm_clip=float("inf"), noise_multiplier=0.0, learning_rate=0.1)
    assert optimizer.noise_stddev == 0.0
    rng = np.random.default_rng(0)
    model = zero_gradient_model(optimizer)
    model.fit(rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=(8, 2)).astype("float32"),
              batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(flat_weights(model)))


# -- issue 15.14: numpy scalars --------------------------------------------------------------------


@pytest.mark.parametrize("cls", DP_OPTIMIZERS)
def test_numpy_scalars_are_accepted_for_every_privacy_argument(cls):
    optimizer = cls(l2_norm_clip=np.float32(1.0), noise_multiplier=np.float64(1.5),
                    num_microbatches=np.int64(4), expected_batch_size=np.int32(8), seed=np.int64(3))
    assert (optimizer.l2_norm_clip, optimizer.noise_multiplier) == (1.0, 1.5)
    assert (optimizer.num_microbatches, optimizer.expected_batch_size, optimizer.seed) == (4, 8, 3)
    # Stored as Python numbers, so the config stays JSON-serializable.
    config = optimizer.get_config()
    json.dumps({k: config[k] for k in ("l2_norm_clip", "noise_multiplier", "num_microbatches",
                                       "expected_batch_size", "seed")})
    assert type(optimizer.num_microbatches) is int and type(optimizer.l2_norm_clip) is float
    noisy = tan_keras.NoisySGD(np.float32(0.5), expected_batch_size=np.float32(16.0))
    assert (noisy.noise_multiplier, noisy.expected_batch_size) == (0.5, 16.0)


@pytest.mark.parametrize("field, value", [
    ("l2_norm_clip", np.bool_(True)), ("l2_norm_clip", True), ("l2_norm_clip", np.float32("nan")),
    ("l2_norm_clip", np.float32(-1.0)), ("l2_norm_clip", np.int64(0)),
    ("noise_multiplier", np.bool_(True)), ("noise_multiplier", np.float64("nan")),
    ("noise_multiplier", np.float32(-0.5)), ("noise_multiplier", np.float32("inf")),
    ("num_microbatches", np.bool_(True)), ("num_microbatches", np.float32(4.0)), ("num_microbatches", 2.5),
    ("num_microbatches", np.int64(0)), ("num_microbatches", np.int64(-2)),
    ("expected_batch_size", np.bool_(True)), ("expected_batch_size", np.float32("nan")),
    ("expected_batch_size", np.int64(-8)), ("expected_batch_size", np.float64("inf")),
])
@pytest.mark.parametrize("cls", DP_OPTIMIZERS)
def test_numpy_scalars_still_reject_bools_nan_negative_and_fractional_values(cls, field, value):
    kwargs = dict(l2_norm_clip=1.0, noise_multiplier=1.0)
    kwargs[field] = value
    with pytest.raises(ValueError, match=f"`{field}`"):
        cls(**kwargs)


# -- issue 15.6: seed=None is independent of Keras's global seed ----------------------------------

_NOISE_SCRIPT = """
import json, sys
import keras, numpy as np
sys.path.insert(0, ROOT)
import tan_keras
keras.utils.set_random_seed(0)
out = {}
for seed in (None, 7):
    model = tan_keras.PrivateSequential([
        keras.Input((4,)), keras.layers.Dense(2, kernel_initializer="zeros", bias_initializer="zeros")])
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0, seed=seed, learning_rate=1.0), loss="mse")
    model.train_on_batch(np.zeros((2, 4), "float32"), np.zeros((2, 2), "float32"))
    out[str(seed)] = np.concatenate([np.ravel(w) for w in model.get_weights()]).tolist()
if __name__ == "__main__":
    print("NOISE" + json.dumps(out))
"""


def test_unseeded_noise_differs_across_processes_that_set_the_same_global_seed():
    # The same script in a fresh process and in this one, both after keras.utils.set_random_seed(0).
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", f"ROOT = {ROOT!r}" + _NOISE_SCRIPT], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    namespace = {"__name__": "here", "ROOT": ROOT}
    exec(_NOISE_SCRIPT, namespace)
    stdout, _ = child.communicate(timeout=300)
    assert child.returncode == 0
    line = [ln for ln in stdout.splitlines() if ln.startswith("NOISE")][-1]
    there = {k: np.array(v) for k, v in json.loads(line[len("NOISE"):]).items()}
    here = {k: np.array(v) for k, v in namespace["out"].items()}
    # The weights moved by the noise alone (zero gradient): std σC/B = 0.5 per entry.
    assert np.all(here["None"] != 0) and np.all(here["7"] != 0)
    assert not np.allclose(here["None"], there["None"])  # seed=None: fresh OS entropy per process
    np.testing.assert_array_equal(here["7"], there["7"])  # a user seed stays reproducible
    assert not np.allclose(here["None"], here["7"])


# -- issue 18.5: secure noise ----------------------------------------------------------------------


@pytest.mark.parametrize("cls", DP_OPTIMIZERS + [tan_keras.NoisySGD])
def test_secure_noise_refuses_a_user_given_seed(cls):
    args = (1.0,) if cls is tan_keras.NoisySGD else (1.0, 1.0)
    with pytest.raises(ValueError, match="secure_noise=True` refuses a user-given `seed`"):
        cls(*args, seed=0, secure_noise=True)
    with pytest.raises(ValueError, match="`secure_noise`"):
        cls(*args, secure_noise="yes")


def test_secure_noise_has_the_claimed_std_and_changes_every_step():
    sigma, clip, batch, width = 2.0, 0.5, 4, 2000
    model = zero_gradient_model(tan_keras.DPSGD(clip, sigma, learning_rate=1.0, secure_noise=True), width)
    x, y = np.zeros((batch, width), "float32"), np.zeros((batch, 2), "float32")
    steps = []
    for _ in range(2):
        before = flat_weights(model)
        model.train_on_batch(x, y)
        steps.append(before - flat_weights(model))  # = noise / B
    noise = np.stack(steps) * batch
    # std σC = 1 over 2 × 4,002 draws: standard error of the sample std ≈ 1/√(2·8004) = 0.008.
    assert abs(noise.std() / (sigma * clip) - 1.0) < 0.04
    assert abs(np.corrcoef(noise[0], noise[1])[0, 1]) < 0.05  # a new draw each step


def _secure_run(directory, restore, epochs):
    x = np.zeros((12, 4), "float32")
    y = np.zeros((12, 2), "float32")
    keras.utils.set_random_seed(0)
    optimizer = tan_keras.DPSGD(1.0, 1.0, learning_rate=1.0, secure_noise=True)
    model = zero_gradient_model(optimizer)
    sampler = sampling.PoissonSampler(12, batch_size=4, seed=1)
    sampler.configure(model)
    extra = [] if restore else [callbacks.PrivateCheckpoint(directory)]
    if restore:
        callbacks.restore_checkpoint(directory, model, sampler=sampler)
    model.fit(sampler.dataset(x, y, steps_per_epoch=2), epochs=epochs, verbose=0, callbacks=extra)
    return flat_weights(model)


def test_secure_noise_checkpoint_does_not_determine_the_noise_so_a_resumed_run_draws_fresh_noise(tmp_path):
    # (With an ordinary seed, resuming reproduces the uninterrupted run exactly:
    # tests/test_callbacks.py::test_kill_and_resume_equals_uninterrupted_run.)
    # Secure noise: two resumptions from the same checkpoint draw different noise after it.
    directory = str(tmp_path)
    at_checkpoint = _secure_run(directory, restore=False, epochs=1)
    first = _secure_run(directory, restore=True, epochs=1)
    second = _secure_run(directory, restore=True, epochs=1)
    assert np.all(first != at_checkpoint)  # the resumed steps did add noise
    assert not np.allclose(first - at_checkpoint, second - at_checkpoint, atol=1e-3)


def test_secure_noise_survives_keras_save_and_load_with_a_new_key(tmp_path):
    model = zero_gradient_model(tan_keras.DPSGD(1.0, 1.0, learning_rate=1.0, secure_noise=True))
    x, y = np.zeros((2, 4), "float32"), np.zeros((2, 2), "float32")
    model.train_on_batch(x, y)
    path = str(tmp_path / "m.keras")
    model.save(path)
    reloaded = [keras.models.load_model(path) for _ in range(2)]
    assert all(r.optimizer.secure_noise and r.optimizer.seed is None for r in reloaded)
    start = flat_weights(reloaded[0])
    for r in reloaded:
        r.train_on_batch(x, y)
    assert not np.allclose(flat_weights(reloaded[0]) - start, flat_weights(reloaded[1]) - start, atol=1e-3)
