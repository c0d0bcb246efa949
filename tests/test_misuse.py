"""Misuse and bad input in the private train step: each hole is an error or a bounded, logged behaviour.

One test per item of the misuse issue that lives in the step (non-finite
examples, BatchNorm added after ``compile``, TF Privacy's ``reduction="none"``
losses, microbatches with a partial last batch, a ``Flatten``-first model
with ``physical_batch_size``, ``make_private`` of a compiled model). Runs on
the backend named by KERAS_BACKEND.
"""

import keras
import numpy as np
import pytest

import tan_keras

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def small_cnn(clipping, physical_batch_size=None):
    keras.utils.set_random_seed(0)
    return tan_keras.PrivateSequential(
        [keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3), keras.layers.GroupNormalization(2),
         keras.layers.Flatten(), keras.layers.Dense(3)],
        clipping=clipping, physical_batch_size=physical_batch_size)


def images(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, 1)).astype("float32"), rng.integers(0, 3, size=(n,)).astype("int32")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("clipping,physical_batch_size", [("vectorized", None), ("ghost", None), ("ghost", 8),
                                                          ("vectorized", 8)])
def test_one_non_finite_example_is_dropped_counted_and_the_weights_stay_finite(clipping, physical_batch_size, bad):
    """A NaN/inf input contributes exactly zero (sensitivity ≤ C) and shows up in `nonfinite_examples`."""
    x, y = images()
    x_bad = x.copy()
    x_bad[5, 3, 3, 0] = bad
    weights = {}
    for name, data in (("bad", x_bad), ("dropped", np.delete(x, 5, axis=0))):
        model = small_cnn(clipping, physical_batch_size)
        # σ = 0 and B fixed: the update is the clipped sum / 32, so dropping example 5 is visible exactly.
        model.compile(optimizer=tan_keras.DPSGD(1.0, 0.0, expected_batch_size=32, learning_rate=0.5), loss=XENT)
        labels = y if name == "bad" else np.delete(y, 5)
        history = model.fit(data, labels, batch_size=len(data), epochs=1, verbose=0, shuffle=False)
        weights[name] = model.get_weights()
        if name == "bad":
            assert history.history["nonfinite_examples"] == [1.0]
    for got, want in zip(weights["bad"], weights["dropped"]):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nan_weights_stop_the_step_with_a_clear_error():
    x, y = images()
    model = small_cnn("auto")
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0, seed=0), loss=XENT)
    model.build((None, 6, 6, 1))
    model.set_weights([np.full_like(w, np.nan) if i == 0 else w for i, w in enumerate(model.get_weights())])
    with pytest.raises(Exception, match="non-finite weights or noise"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)


def test_batchnorm_added_after_compile_is_refused_when_the_step_is_traced():
    model = tan_keras.PrivateSequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0), loss=XENT)
    model.add(keras.layers.BatchNormalization())
    x = np.zeros((8, 4), "float32")
    with pytest.raises(ValueError, match=r"'batch_normalization.*' \(BatchNormalization\) mixes information"):
        model.fit(x, np.zeros(8, "int32"), batch_size=8, verbose=0)


class LazyBatchNormBlock(keras.layers.Layer):
    """A custom layer that creates its BatchNormalization only in ``build()``."""

    def build(self, input_shape):
        self.dense = keras.layers.Dense(4)
        self.norm = keras.layers.BatchNormalization()

    def call(self, inputs, training=None):
        return self.norm(self.dense(inputs), training=training)


def test_batchnorm_built_lazily_inside_a_custom_layer_is_refused_when_the_step_is_traced():
    model = tan_keras.PrivateSequential([LazyBatchNormBlock(), keras.layers.Dense(3)])
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0), loss=XENT)  # not built yet: nothing to see
    with pytest.raises(ValueError, match="mixes information across the examples"):
        model.fit(np.zeros((8, 4), "float32"), np.zeros(8, "int32"), batch_size=8, verbose=0)


@pytest.mark.parametrize("clipping,num_microbatches", [("vectorized", None), ("ghost", None), ("auto", 8)])
def test_tf_privacy_reduction_none_loss_trains_like_the_default_reduction(clipping, num_microbatches):
    """TF Privacy's losses are per-example vectors (`reduction="none"`): same step as Keras's mean reduction."""
    x, y = images(16)
    results = []
    for reduction in ("none", "sum_over_batch_size"):
        model = small_cnn(clipping)
        model.compile(optimizer=tan_keras.DPSGD(1.0, 0.0, num_microbatches=num_microbatches, learning_rate=0.5),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction))
        history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        results.append((model.get_weights(), history.history["loss"]))
    (w_none, loss_none), (w_mean, loss_mean) = results
    np.testing.assert_allclose(loss_none, loss_mean, rtol=1e-5)
    for a, b in zip(w_none, w_mean):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_microbatches_with_a_partial_last_batch_train():
    """TF Privacy's README setting (B = m): N = 120 at B = 32 leaves a last batch of 24 = 3 × 8 examples."""
    model = tan_keras.PrivateSequential([keras.Input((6,)), keras.layers.Dense(3)])
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0, num_microbatches=8, seed=0), loss=XENT)
    x = np.random.default_rng(0).normal(size=(120, 6)).astype("float32")
    history = model.fit(x, np.zeros(120, "int32"), batch_size=32, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_flatten_first_model_with_physical_batch_size_and_static_batch_shape_trains():
    model = tan_keras.PrivateSequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)],
                                        physical_batch_size=64)
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0, seed=0), loss=XENT)
    history = model.fit(np.zeros((512, 28, 28, 1), "float32"), np.zeros(512, "int32"), batch_size=128, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_make_private_of_a_compiled_model_keeps_its_compile(kind):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, inputs):
            return self.dense(inputs)

    if kind == "sequential":
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    elif kind == "functional":
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    else:
        model = Net()
    optimizer = tan_keras.DPSGD(1.0, 1.0, seed=0)
    model.compile(optimizer=optimizer, loss=XENT, metrics=["accuracy"])
    private = tan_keras.make_private(model)
    assert private.optimizer is optimizer
    history = private.fit(np.zeros((8, 4), "float32"), np.zeros(8, "int32"), batch_size=8, verbose=0)
    assert {"loss", "accuracy", "clip_fraction", "nonfinite_examples"} <= set(history.history)
