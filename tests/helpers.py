"""Shared test utilities: a backend-neutral brute-force per-example gradient."""

import keras
import numpy as np


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def brute_force_grads(model_fn, x, y, loss):
    """∇ℓ_i one example at a time: −Δw of one plain SGD(lr=1) step on example i alone.

    One model is compiled once; its weights are reset before each example
    (SGD without momentum keeps no state between steps).
    """
    model = model_fn()
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=loss)
    initial = weights_of(model)
    grads = []
    for i in range(len(x)):
        model.set_weights(initial)
        model.train_on_batch(x[i:i + 1], y[i:i + 1])
        grads.append([b - a for b, a in zip(initial, weights_of(model))])
    return [np.stack(g) for g in zip(*grads)]


def assert_per_example_grads_match_brute_force(model_fn, x, y, loss, rtol=1e-4, atol=1e-5):
    import tan_keras

    model = tan_keras.make_private(model_fn())
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0), loss=loss)
    vectorized = [np.array(g) for g in tan_keras.per_example_gradients(model, x, y)]
    expected = brute_force_grads(model_fn, x, y, loss)
    assert len(vectorized) == len(expected)
    for got, want in zip(vectorized, expected):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
