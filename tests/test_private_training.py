"""Core DP-SGD / Noisy-SGD behaviour, run through the compiled ``fit`` path.

Every test runs on the backend named by KERAS_BACKEND (``make test`` runs the
suite once with ``tensorflow`` and once with ``jax``).
"""

import math

import keras
import numpy as np
import pytest
from scipy import stats

import tan_keras
from tan_keras import clipping
from helpers import brute_force_grads, weights_of

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp(seed=0, private=True, physical_batch_size=None, extra_layers=()):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), *extra_layers, keras.layers.Dense(3)]
    if private:
        return tan_keras.PrivateSequential(layers, physical_batch_size=physical_batch_size)
    return keras.Sequential(layers)


def small_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.GroupNormalization(groups=2)(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(3)(h)
    return keras.Model(inputs, outputs)


def data(n=16, seed=0, scale=1.0, shape=(6,)):
    rng = np.random.default_rng(seed)
    x = (scale * rng.normal(size=(n, *shape))).astype("float32")
    y = rng.integers(0, 3, size=(n,)).astype("int32")
    return x, y


def fit_steps(model, optimizer, x, y, batch_size, epochs=1, **kw):
    model.compile(optimizer=optimizer, loss=LOSS, metrics=["accuracy"], **kw)
    return model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)


@pytest.mark.parametrize("model_fn", [lambda: mlp(private=False), small_cnn], ids=["mlp", "cnn_groupnorm"])
def test_vectorized_per_example_grads_equal_brute_force_loop(model_fn):
    shape = (6,) if model_fn().input_shape[1:] == (6,) else (6, 6, 2)
    x, y = data(5, shape=shape)
    model = tan_keras.make_private(model_fn())
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0), loss=LOSS)
    vectorized = [np.array(g) for g in tan_keras.per_example_gradients(model, x, y)]
    expected = brute_force_grads(model_fn, x, y, LOSS)
    for got, want in zip(vectorized, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_every_clipped_per_example_norm_is_at_most_clip_even_for_huge_gradients():
    x, y = data(12, scale=1e4)
    model = mlp()
    model.compile(optimizer=tan_keras.DPSGD(0.01, 1.0), loss=LOSS)
    grads = tan_keras.per_example_gradients(model, x, y)
    norms = clipping.global_norms(grads)
    assert float(keras.ops.min(norms)) > 20 * 0.01  # every gradient really is ≫ C
    clipped = [g * keras.ops.reshape(clipping.clip_factors(norms, 0.01), (-1,) + (1,) * (len(g.shape) - 1))
               for g in grads]
    assert float(keras.ops.max(clipping.global_norms(clipped))) <= 0.01 * (1 + 1e-6)


def test_one_example_step_moves_weights_by_at_most_lr_times_clip():
    x, y = data(1, scale=1e3)
    model = mlp()
    before = weights_of(model)
    fit_steps(model, tan_keras.DPSGD(0.5, 0.0, learning_rate=2.0), x, y, batch_size=1)
    delta = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(before, weights_of(model))))
    assert delta == pytest.approx(2.0 * 0.5, rel=1e-4)  # clipped to exactly C, then × lr


@pytest.mark.parametrize("dp_opt, plain_opt", [
    (lambda: tan_keras.DPSGD(math.inf, 0.0, learning_rate=0.1, momentum=0.9, nesterov=True),
     lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)),
    (lambda: tan_keras.DPAdam(math.inf, 0.0, learning_rate=0.01, beta_1=0.8),
     lambda: keras.optimizers.Adam(0.01, beta_1=0.8)),
    (lambda: tan_keras.NoisySGD(0.0, learning_rate=0.1), lambda: keras.optimizers.SGD(0.1)),
], ids=["dpsgd_momentum", "dpadam", "noisysgd"])
def test_zero_noise_and_infinite_clip_give_exactly_the_plain_keras_step(dp_opt, plain_opt):
    x, y = data(32)
    private, plain = mlp(), mlp(private=False)
    fit_steps(private, dp_opt(), x, y, batch_size=8, epochs=2)
    fit_steps(plain, plain_opt(), x, y, batch_size=8, epochs=2)
    for a, b in zip(weights_of(private), weights_of(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_private_model_with_non_private_optimizer_trains_exactly_as_keras():
    x, y = data(32)
    private, plain = mlp(), mlp(private=False)
    fit_steps(private, keras.optimizers.SGD(0.1), x, y, batch_size=8)
    fit_steps(plain, keras.optimizers.SGD(0.1), x, y, batch_size=8)
    for a, b in zip(weights_of(private), weights_of(plain)):
        np.testing.assert_array_equal(a, b)


def _zero_gradient_update(optimizer, batch_size, width=20000):
    """Weight change of one step on a model whose loss gradient is exactly 0.

    x = 0 makes the Dense output 0 whatever the kernel, so the only change is
    −lr · noise / B.
    """
    keras.utils.set_random_seed(0)
    model = tan_keras.PrivateSequential([keras.Input((1,)), keras.layers.Dense(width, use_bias=False)])
    model.compile(optimizer=optimizer, loss="mse")
    before = weights_of(model)[0]
    x = np.zeros((batch_size, 1), "float32")
    model.fit(x, np.zeros((batch_size, width), "float32"), batch_size=batch_size, verbose=0)
    return (weights_of(model)[0] - before).ravel()


# With d = 20,000 i.i.d. coordinates the sample std has relative standard error
# 1/sqrt(2d) = 0.5%; a 3% tolerance is a 6-sigma band, so the test fails only
# if the scale is wrong, not by chance. The KS test checks the shape.
@pytest.mark.parametrize("make_opt, expected_std", [
    (lambda: tan_keras.DPSGD(l2_norm_clip=1.5, noise_multiplier=2.0, learning_rate=0.5, seed=1), 0.5 * 2.0 * 1.5 / 8),
    (lambda: tan_keras.NoisySGD(noise_multiplier=2.0, learning_rate=0.5, seed=1), 0.5 * 2.0 / 8),
    (lambda: tan_keras.DPSGD(1.0, 3.0, learning_rate=1.0, expected_batch_size=32, seed=1), 1.0 * 3.0 / 32),
], ids=["dpsgd", "noisysgd", "dpsgd_expected_batch_size"])
def test_noise_std_is_lr_sigma_clip_over_batch(make_opt, expected_std):
    update = _zero_gradient_update(make_opt(), batch_size=8)
    assert np.std(update) == pytest.approx(expected_std, rel=0.03)
    assert abs(np.mean(update)) < 5 * expected_std / math.sqrt(update.size)
    assert stats.kstest(update / expected_std, "norm").pvalue > 1e-4


def test_noise_is_reproducible_with_a_seed_and_fresh_without():
    a = _zero_gradient_update(tan_keras.DPSGD(1.0, 1.0, seed=7), 4, width=64)
    b = _zero_gradient_update(tan_keras.DPSGD(1.0, 1.0, seed=7), 4, width=64)
    # Unseeded optimizers draw their seed from Python's global RNG (which
    # keras.utils.set_random_seed controls), so two of them differ.
    unseeded = [tan_keras.DPSGD(1.0, 1.0), tan_keras.DPSGD(1.0, 1.0)]
    c, d = (_zero_gradient_update(opt, 4, width=64) for opt in unseeded)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(c, d)


def test_microbatches_clip_the_mean_gradient_of_each_group_and_divide_by_their_number():
    x, y = data(8)
    model = mlp()
    model.compile(optimizer=tan_keras.DPSGD(0.3, 1.0), loss=LOSS)
    per_example = [np.array(g) for g in tan_keras.per_example_gradients(model, x, y)]
    groups = [g.reshape((4, 2) + g.shape[1:]).mean(axis=1) for g in per_example]
    norms = np.sqrt(sum(np.sum(g.reshape(4, -1) ** 2, axis=1) for g in groups))
    factors = np.minimum(1.0, 0.3 / norms)
    expected_step = [np.tensordot(factors, g, axes=1) / 4 for g in groups]
    before = weights_of(model)
    fit_steps(model, tan_keras.DPSGD(0.3, 0.0, num_microbatches=4, learning_rate=1.0), x, y, batch_size=8)
    for b, a, e in zip(before, weights_of(model), expected_step):
        np.testing.assert_allclose(b - a, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("physical_batch_size", [8, 24], ids=["divides", "padded_last_chunk"])
def test_physical_chunking_equals_one_big_chunk(physical_batch_size):
    x, y = data(64)
    one, chunked = mlp(), mlp(physical_batch_size=physical_batch_size)
    hist_one = fit_steps(one, tan_keras.DPSGD(0.5, 1.0, learning_rate=0.5, seed=3), x, y, batch_size=32, epochs=2)
    hist_chunked = fit_steps(chunked, tan_keras.DPSGD(0.5, 1.0, learning_rate=0.5, seed=3), x, y, batch_size=32,
                             epochs=2)
    for a, b in zip(weights_of(one), weights_of(chunked)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key in ("loss", "accuracy", "clip_fraction", "per_example_norm"):
        np.testing.assert_allclose(hist_one.history[key], hist_chunked.history[key], rtol=1e-5)


def test_zero_sample_weight_examples_contribute_nothing():
    x, y = data(8)
    x_other = x.copy()
    x_other[5:] = 100.0  # changed, but weighted 0
    sw = np.array([1, 1, 1, 1, 1, 0, 0, 0], "float32")
    results = []
    for xs in (x, x_other):
        model = mlp()
        model.compile(optimizer=tan_keras.DPSGD(1.0, 0.5, learning_rate=0.5, expected_batch_size=5, seed=0), loss=LOSS)
        model.fit(xs, y, sample_weight=sw, batch_size=8, verbose=0)
        results.append(weights_of(model))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_dp_statistics_are_logged_by_fit_and_not_by_evaluate():
    x, y = data(32, scale=10.0)
    model = mlp()
    model.compile(optimizer=tan_keras.DPSGD(0.01, 1.0, seed=0), loss=LOSS, metrics=["accuracy"])
    history = model.fit(x, y, batch_size=16, validation_data=(x, y), verbose=0)
    assert set(model.evaluate(x, y, verbose=0, return_dict=True)) == {"loss", "accuracy"}
    assert not any(k.startswith("val_") and k[4:] in model._dp_metric_names for k in history.history)
    logs = {k: v[-1] for k, v in history.history.items()}
    assert logs["clip_fraction"] == pytest.approx(1.0)
    assert logs["per_example_norm"] > 0.01
    assert logs["signal_norm"] <= 0.01 + 1e-6  # mean of vectors of norm ≤ C
    # E‖N(0, σ²C² I_d)‖/B ≈ σC√d/B, d = 6·8+8+8·3+3 = 83 parameters.
    assert logs["noise_norm"] == pytest.approx(0.01 * math.sqrt(83) / 16, rel=0.25)


def test_batchnorm_is_rejected_with_a_fix():
    bn_model = mlp(private=False, extra_layers=(keras.layers.BatchNormalization(),))
    with pytest.raises(ValueError, match="GroupNormalization"):
        tan_keras.make_private(bn_model)
    model = mlp(extra_layers=(keras.layers.BatchNormalization(name="bn"),))
    with pytest.raises(ValueError, match="'bn'.*mixes information"):
        model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0), loss=LOSS)


def test_dp_optimizer_on_a_plain_keras_model_is_an_error():
    x, y = data(8)
    model = mlp(private=False)
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0), loss=LOSS)
    with pytest.raises(ValueError, match="make_private"):
        model.fit(x, y, batch_size=8, verbose=0)


def test_noisy_sgd_works_on_a_plain_keras_model_given_the_batch_size():
    update = []
    for expected_batch_size in (4, 4):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(5000, use_bias=False)])
        model.compile(optimizer=tan_keras.NoisySGD(2.0, expected_batch_size=expected_batch_size, seed=0,
                                                   learning_rate=1.0), loss="mse")
        before = weights_of(model)[0]
        model.fit(np.zeros((4, 1), "float32"), np.zeros((4, 5000), "float32"), batch_size=4, verbose=0)
        update.append(weights_of(model)[0] - before)
    assert np.std(update[0]) == pytest.approx(2.0 / 4, rel=0.06)


@pytest.mark.parametrize("kwargs, match", [
    (dict(l2_norm_clip=1.0, noise_multiplier=-1.0), "noise_multiplier"),
    (dict(l2_norm_clip=0.0, noise_multiplier=1.0), "l2_norm_clip"),
    (dict(l2_norm_clip=-2.0, noise_multiplier=1.0), "l2_norm_clip"),
    (dict(l2_norm_clip=1.0, noise_multiplier=1.0, num_microbatches=0), "num_microbatches"),
    (dict(l2_norm_clip=1.0, noise_multiplier=1.0, gradient_accumulation_steps=4), "physical_batch_size"),
])
def test_invalid_privacy_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tan_keras.DPSGD(**kwargs)


def test_microbatches_that_do_not_divide_the_batch_are_an_error():
    x, y = data(12)
    model = mlp()
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0, num_microbatches=5), loss=LOSS)
    with pytest.raises(Exception, match="num_microbatches"):
        model.fit(x, y, batch_size=12, verbose=0)


def test_make_private_keeps_weights_for_functional_and_subclassed_models():
    functional = small_cnn()
    private = tan_keras.make_private(functional)
    assert isinstance(private, tan_keras.PrivateModel)
    for a, b in zip(weights_of(functional), weights_of(private)):
        np.testing.assert_array_equal(a, b)

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    net = tan_keras.make_private(Net())
    x, y = data(8)
    history = fit_steps(net, tan_keras.DPSGD(1.0, 0.5, seed=0), x, y, batch_size=4)
    assert "clip_fraction" in history.history


def test_save_and_load_round_trip_keeps_optimizer_config_and_weights(tmp_path):
    x, y = data(16)
    model = mlp()
    fit_steps(model, tan_keras.DPSGD(0.7, 1.3, num_microbatches=2, learning_rate=0.2, momentum=0.5, seed=4),
              x, y, batch_size=8)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, tan_keras.PrivateSequential)
    assert isinstance(loaded.optimizer, tan_keras.DPSGD)
    config = loaded.optimizer.get_config()
    assert (config["l2_norm_clip"], config["noise_multiplier"], config["num_microbatches"], config["momentum"]) == (
        0.7, 1.3, 2, 0.5)
    for a, b in zip(weights_of(model), weights_of(loaded)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0), rtol=1e-6)
    loaded.fit(x, y, batch_size=8, verbose=0)  # training resumes
    for cls in (tan_keras.DPSGD, tan_keras.DPAdam, tan_keras.NoisySGD):
        opt = cls(noise_multiplier=1.0, **({} if cls is tan_keras.NoisySGD else {"l2_norm_clip": 2.0}))
        assert cls.from_config(opt.get_config()).get_config() == opt.get_config()


def test_private_fit_on_real_digits_learns_at_a_stated_epsilon():
    """sklearn digits (1,400 train / 397 test), Poisson sampling at q = 0.1, σ = 1.5, C = 1, 200 steps.

    ε = 5.55 at δ = 1e-5 (RDP); measured test accuracy ≈ 0.96. Threshold 0.90.
    """
    from sklearn.datasets import load_digits

    from tan_keras import accounting, callbacks, sampling

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.data))
    x = (digits.data[order] / 16.0).astype("float32")
    y = digits.target[order].astype("int32")
    keras.utils.set_random_seed(0)
    model = tan_keras.PrivateSequential(
        [keras.Input((64,)), keras.layers.Dense(64, activation="tanh"), keras.layers.Dense(10)])
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.5, learning_rate=1.0, seed=0),
                  loss=LOSS, metrics=["accuracy"])
    budget = callbacks.PrivacyBudget(target_epsilon=6.0, delta=1e-5, noise_multiplier=1.5)
    sampling.private_fit(model, x[:1400], y[:1400], steps=200, batch_size=140, steps_per_epoch=40,
                         physical_batch_size=64, seed=0, callbacks=[budget], verbose=0)
    epsilon = budget.ledger.epsilon(1e-5)
    assert epsilon == pytest.approx(accounting.epsilon(1.5, 200, 1e-5, batch_size=140, num_examples=1400))
    assert epsilon < 6.0
    assert model.evaluate(x[1400:], y[1400:], verbose=0, return_dict=True)["accuracy"] > 0.90
