"""Augmentation multiplicity: mean of K view gradients, then clip (TAN Eq. 5).

Runs on the backend named by KERAS_BACKEND.
"""

import itertools

import keras
import numpy as np
import pytest
from keras import ops

import tan_keras
from tan_keras import augmult

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SCALES = np.array([1.0, -0.5, 2.0], "float32")
SHIFTS = np.array([0.0, 1.0, -1.0], "float32")


def fixed_views(views, seed):
    """A deterministic 'augmentation': view j of x is SCALES[j]·x + SHIFTS[j]."""
    return views * ops.convert_to_tensor(SCALES)[None, :, None] + ops.convert_to_tensor(SHIFTS)[None, :, None]


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def view_grad(kernel, bias, v, label):
    """∇ of softmax cross-entropy of the linear model v @ kernel + bias: (dkernel, dbias)."""
    r = softmax(v @ kernel + bias)
    r[label] -= 1.0
    return np.outer(v, r), r


def test_augmult_gradient_is_mean_over_views_then_clipped():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model = augmult.wrap(inner, len(SCALES), augment=fixed_views)
    clip, lr, n = 0.4, 1.0, 6
    model.compile(optimizer=tan_keras.DPSGD(clip, 0.0, learning_rate=lr, expected_batch_size=n), loss=LOSS)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = rng.integers(0, 3, size=(n,)).astype("int32")
    kernel, bias = (np.array(w, np.float64) for w in inner.get_weights())

    mean_then_clip = np.zeros(kernel.size + bias.size)
    clip_then_mean = np.zeros_like(mean_then_clip)
    for i in range(n):
        grads = [np.concatenate([g.ravel() for g in view_grad(kernel, bias, SCALES[j] * x[i] + SHIFTS[j], y[i])])
                 for j in range(len(SCALES))]
        mean = np.mean(grads, axis=0)
        mean_then_clip += mean * min(1.0, clip / np.linalg.norm(mean))
        clip_then_mean += np.mean([g * min(1.0, clip / np.linalg.norm(g)) for g in grads], axis=0)
    expected = -lr * mean_then_clip / n
    assert np.abs(expected + lr * clip_then_mean / n).max() > 1e-3, "the test must tell the two orders apart"

    model.train_on_batch(x, y)
    got = np.concatenate([(np.array(w) - w0).ravel() for w, w0 in zip(inner.get_weights(), (kernel, bias))])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_crop_flip_gives_crops_of_the_reflect_padded_image_or_their_mirror():
    images = np.random.default_rng(0).normal(size=(12, 5, 5, 2)).astype("float32")
    out = np.array(augmult.random_crop_flip(images, keras.random.SeedGenerator(3), padding=2))
    padded = np.pad(images, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="reflect")
    found = set()
    for i in range(len(images)):
        matches = [(a, b, f) for a, b, f in itertools.product(range(5), range(5), (False, True))
                   if np.array_equal((padded[i, a:a + 5, b:b + 5][:, ::-1] if f else padded[i, a:a + 5, b:b + 5]),
                                     out[i])]
        assert matches, f"image {i} is not a crop (or mirrored crop) of its padded image"
        found.add(matches[0])
    assert len(found) > 3, "each image gets its own offsets and flip"


def test_augmult_trains_on_views_and_evaluates_on_plain_images():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    model = augmult.wrap(inner, 2, seed=0)
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0, seed=0, learning_rate=0.1), loss=LOSS, metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, size=(8,)).astype("int32")
    seed_before = np.array(model.augment_seed.state.value)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and "accuracy" in history.history
    assert not np.array_equal(seed_before, np.array(model.augment_seed.state.value)), "views drawn each step"
    assert model.predict(x, verbose=0).shape == (8, 3)
    with pytest.raises(ValueError, match="positive int"):
        augmult.wrap(inner, 0)


@pytest.mark.parametrize("clipping", ["ghost", "vectorized"])
def test_augmult_example_with_a_non_finite_view_is_dropped_exactly(clipping):
    """One NaN pixel in one example: its K views (and only they) add exactly 0, on both strategies."""
    x = np.random.default_rng(0).normal(size=(16, 6, 6, 1)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, size=(16,)).astype("int32")
    x_bad = x.copy()
    x_bad[5, 2, 2, 0] = np.nan
    weights = {}
    for name, data, labels in (("bad", x_bad, y), ("dropped", np.delete(x, 5, axis=0), np.delete(y, 5))):
        keras.utils.set_random_seed(0)
        inner = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3), keras.layers.GroupNormalization(2),
                                  keras.layers.Flatten(), keras.layers.Dense(3)])
        model = augmult.wrap(inner, 2, augment=lambda views, seed: views * ops.convert_to_tensor([1.0, -1.0])[
            None, :, None, None, None], clipping=clipping)
        model.compile(optimizer=tan_keras.DPSGD(1.0, 0.0, expected_batch_size=16, learning_rate=0.5), loss=LOSS)
        history = model.fit(data, labels, batch_size=len(data), epochs=1, verbose=0, shuffle=False)
        weights[name] = inner.get_weights()
        if name == "bad":
            assert history.history["nonfinite_examples"] == [1.0]
    for got, want in zip(weights["bad"], weights["dropped"]):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_check_per_example_runs_the_augmult_ghost_step_on_views_against_a_loop():
    """``check_per_example`` takes the K views (``augment_batch``) and checks the ghost step's example norms."""
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3), keras.layers.GroupNormalization(2),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    model = augmult.wrap(inner, 4, seed=0)
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0, seed=0), loss=LOSS)
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 1)).astype("float32")
    report = tan_keras.check_per_example(model, np.asarray(model.augment_batch(x)), np.arange(8) % 3)
    assert report.strategy == "ghost" and len(report.norms) == 8
    assert report.max_norm_error < 1e-4 and report.max_sum_error < 1e-4
