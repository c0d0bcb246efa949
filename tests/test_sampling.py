"""Poisson sampling with fixed physical shapes, and logical vs physical batches.

Runs on the backend named by KERAS_BACKEND (run once with ``tensorflow`` and
once with ``jax``).
"""

import functools
import json
import math

import keras
import numpy as np
import pytest

import tan_keras
from tan_keras import accounting, sampling

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def dense_model(inputs=6, outputs=3, physical_batch_size=None, seed=0):
    keras.utils.set_random_seed(seed)
    return tan_keras.PrivateSequential([keras.Input((inputs,)), keras.layers.Dense(outputs)],
                                       physical_batch_size=physical_batch_size)


def data(n, inputs=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, inputs)).astype("float32"), rng.integers(0, 3, size=(n,)).astype("int32")


def weights(model):
    return [np.array(w) for w in model.get_weights()]


def update_of(model, optimizer, x, y, sample_weight=None):
    """−Δw of one private step on the batch (x, y, sample_weight), as one flat vector."""
    model.compile(optimizer=optimizer, loss=LOSS)
    before = weights(model)
    model.train_on_batch(x, y, sample_weight=sample_weight)
    return np.concatenate([(b - a).ravel() for b, a in zip(before, weights(model))])


# --- the sampler ----------------------------------------------------------------------------------


def test_sampler_names_are_the_accountants_sampling_methods():
    assert sampling.SAMPLING_METHODS == accounting.SAMPLING_METHODS


def test_poisson_inclusion_frequencies_match_sampling_rate():
    """Each example is in each step's batch independently with probability q (binomial test).

    Over S steps each example's count is Binomial(S, q): every count must lie
    within 5 std of Sq (P(any of 200 fails) ≈ 1e-4), the total within 4 std of
    NSq, and the batch-size variance within 20% of Nq(1−q) (its relative std is
    √(2/S) ≈ 3%), which a fixed-size sampler (variance 0) fails.
    """
    n, q, steps = 200, 0.1, 2000
    sampler = sampling.PoissonSampler(n, sampling_rate=q, seed=1)
    counts = np.zeros(n)
    sizes = []
    for t in range(steps):
        idx = sampler.indices(t)
        assert np.all(np.diff(idx) > 0), "indices are sorted and distinct"
        counts[idx] += 1
        sizes.append(len(idx))
    std = math.sqrt(steps * q * (1 - q))
    assert np.all(np.abs(counts - steps * q) < 5 * std)
    assert abs(counts.sum() - n * steps * q) < 4 * math.sqrt(n * steps * q * (1 - q))
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.2)
    assert sampler.expected_batch_size == pytest.approx(n * q)


def test_draw_depends_only_on_seed_and_step_and_state_round_trips_through_json():
    a = sampling.PoissonSampler(100, batch_size=10, seed=7)
    b = sampling.PoissonSampler(100, batch_size=10, seed=7)
    assert [list(a.indices(t)) for t in (5, 0, 3)] == [list(b.indices(t)) for t in (5, 0, 3)]
    assert any(list(a.indices(t)) != list(a.indices(t + 1)) for t in range(5))
    fresh = sampling.PoissonSampler(100, batch_size=10)  # seed=None: fresh entropy, kept in the state
    fresh.offset = 12
    restored = sampling.PoissonSampler(100, batch_size=10)
    restored.set_state(json.loads(json.dumps(fresh.get_state())))
    assert restored.offset == 12 and list(restored.indices(12)) == list(fresh.indices(12))
    with pytest.raises(ValueError, match="differs"):
        sampling.PoissonSampler(100, batch_size=20).set_state(fresh.get_state())


def test_batches_have_fixed_padded_shape_and_oversized_draws_are_never_truncated():
    n, p = 400, 8
    x, y = data(n)
    sampler = sampling.PoissonSampler(n, batch_size=40, physical_batch_size=p, seed=0)
    b = sampler.expected_batch_size
    assert sampler.padded_batch_size % p == 0
    assert sampler.padded_batch_size >= b + 4 * math.sqrt(b)
    for t in range(20):
        idx = sampler.indices(t)
        xb, yb, sw = sampler.batch(t, x, y)
        assert xb.shape == (sampler.padded_batch_size, 6) and len(yb) == len(sw) == len(xb)
        np.testing.assert_array_equal(sw, np.r_[np.ones(len(idx)), np.zeros(len(xb) - len(idx))])
        np.testing.assert_array_equal(xb[:len(idx)], x[idx])
    # With no head-room half the draws exceed B: they get the next multiple of p, and keep every example.
    tight = sampling.PoissonSampler(n, batch_size=40, physical_batch_size=p, seed=0, max_batch_stds=0)
    big = [t for t in range(20) if len(tight.indices(t)) > tight.padded_batch_size]
    assert big
    for t in big:
        idx = tight.indices(t)
        xb, _, sw = tight.batch(t, x, y)
        assert len(xb) == math.ceil(len(idx) / p) * p > tight.padded_batch_size
        assert sw.sum() == len(idx)
        np.testing.assert_array_equal(xb[:len(idx)], x[idx])


def test_shuffle_uses_each_example_once_per_epoch_and_without_replacement_draws_exactly_b():
    shuffled = sampling.PoissonSampler(10, batch_size=4, seed=0, sampling="shuffle")
    assert shuffled.batches_per_epoch == 3  # ceil(10/4): the short last batch is padded, not dropped
    for epoch in range(2):
        seen = np.concatenate([shuffled.indices(3 * epoch + j) for j in range(3)])
        assert sorted(seen) == list(range(10))
    exact = sampling.PoissonSampler(50, batch_size=5, seed=0, sampling="sampled_without_replacement")
    assert all(len(set(exact.indices(t))) == 5 for t in range(10))
    with pytest.raises(ValueError, match="sampling"):
        sampling.PoissonSampler(10, batch_size=4, sampling="fixed")


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.data input is tested once, on TF")
def test_tf_data_is_materialised_to_indexable_arrays():
    import tensorflow as tf

    x, y = data(10)
    got_x, got_y = sampling.materialize(tf.data.Dataset.from_tensor_slices((x, y)))
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)


def test_sampler_sets_expected_batch_size_and_rejects_a_different_one():
    sampler = sampling.PoissonSampler(100, sampling_rate=0.05, seed=0)
    model = dense_model()
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0), loss=LOSS)
    sampler.configure(model)
    assert model.optimizer.expected_batch_size == pytest.approx(5.0)
    other = dense_model()
    other.compile(optimizer=tan_keras.DPSGD(1.0, 1.0, expected_batch_size=8), loss=LOSS)
    with pytest.raises(ValueError, match="expected_batch_size=8"):
        sampler.configure(other)


def test_steps_are_numbered_by_optimizer_iterations_in_order_and_a_new_optimizer_never_reuses_a_draw():
    n = 50
    x, y = data(n)
    sampler = sampling.PoissonSampler(n, batch_size=5, seed=0)
    model = dense_model()
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0), loss=LOSS)
    ds = sampler.dataset(x, y, steps_per_epoch=3, model=model)
    ds.on_epoch_begin()
    # The k-th batch requested is step k, whatever index fit asks for (it shuffles a PyDataset's indices).
    for k, index in enumerate((2, 0)):
        idx = sampler.indices(k)
        np.testing.assert_array_equal(ds[index][0][:len(idx)], x[idx])
    model.optimizer.iterations.assign(4)
    ds.on_epoch_begin()
    assert ds[0][2].sum() == len(sampler.indices(4))
    assert sampler.served_until == 5
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0), loss=LOSS)  # iterations restart at 0
    sampler.configure(model)
    assert sampler.next_step() == 5  # past every draw handed out so far


# --- padding, empty draws, physical chunks: through the compiled train step ---------------------


@functools.cache
def padded_batch_updates():
    """One private step (same noise seed) on a Poisson batch three ways.

    Returns the updates on: the zero-weight padded batch (arbitrary padding
    contents) in 5 physical chunks of 4; the same batch in one chunk; the
    unpadded examples alone.
    """
    n = 40
    x, y = data(n)
    sampler = sampling.PoissonSampler(n, batch_size=8, physical_batch_size=4, seed=3)
    t = next(t for t in range(50) if 0 < len(sampler.indices(t)) < sampler.padded_batch_size)
    idx = sampler.indices(t)
    xb, yb, sw = sampler.batch(t, x, y)
    assert len(xb) == 20 and sw.sum() == len(idx)
    xb[len(idx):] = 1e3 * np.random.default_rng(0).normal(size=xb[len(idx):].shape)  # garbage padding
    yb[len(idx):] = 2

    def opt():
        return tan_keras.DPSGD(l2_norm_clip=0.5, noise_multiplier=0.7, expected_batch_size=8, seed=11,
                               learning_rate=1.0)

    chunked = update_of(dense_model(physical_batch_size=4), opt(), xb, yb, sw)
    whole = update_of(dense_model(), opt(), xb, yb, sw)
    unpadded = update_of(dense_model(), opt(), x[idx], y[idx])
    return chunked, whole, unpadded


def test_padded_and_unpadded_batches_give_identical_updates():
    """Zero-weight padding (with arbitrary contents) changes nothing, noise included (same seed)."""
    _, whole, unpadded = padded_batch_updates()
    np.testing.assert_allclose(whole, unpadded, rtol=1e-5, atol=1e-6)


def test_k_physical_chunks_equal_one_logical_batch():
    """physical_batch_size=4 on a padded batch of 20 (5 chunks) gives the one-chunk update, noise included."""
    chunked, whole, _ = padded_batch_updates()
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)


@functools.cache
def noise_setup():
    """A 4160-weight model in physical chunks of 2, and a sampler (B = qN = 1) padding to 6 = 3 chunks."""
    n, q = 20, 0.05
    x = np.random.default_rng(0).normal(size=(n, 64)).astype("float32")
    y = np.zeros((n,), "int32")
    sampler = sampling.PoissonSampler(n, sampling_rate=q, seed=0, physical_batch_size=2)
    assert sampler.padded_batch_size == 6
    model = dense_model(64, 64, physical_batch_size=2)
    lr, sigma, clip = 0.5, 2.0, 3.0
    model.compile(optimizer=tan_keras.DPSGD(clip, sigma, seed=1, learning_rate=lr), loss=LOSS)
    dataset = sampler.dataset(x, y, steps_per_epoch=1, model=model)
    return model, sampler, dataset, (x, y), lr * sigma * clip / (q * n)


def noise_std_ok(update, expected, rel=0.08):
    """Sample std of a 4160-parameter update: relative std error ≈ 1/√(2·4160) ≈ 1.1%."""
    assert abs(update.mean()) < 4 * expected / math.sqrt(update.size)
    assert update.std() == pytest.approx(expected, rel=rel)


def test_empty_draw_is_a_noise_only_step():
    """An empty Poisson draw is fed as an all-padding batch: the update is pure noise of std lr·σC/B."""
    model, sampler, dataset, (x, y), expected_std = noise_setup()
    empty = next(t for t in range(100) if len(sampler.indices(t)) == 0)
    xb, _, sw = sampler.batch(empty, x, y)
    assert len(xb) == sampler.padded_batch_size and not sw.any()
    sampler.offset = empty - int(np.asarray(model.optimizer.iterations))  # the next iteration draws `empty`
    before = weights(model)
    model.fit(dataset, verbose=0)
    noise_std_ok(np.concatenate([(b - a).ravel() for b, a in zip(before, weights(model))]), expected_std)


def test_noise_is_added_once_per_logical_step():
    """Zero gradients over k=3 physical chunks: update std is lr·σC/B, not lr·σC/B·√k (1.7×)."""
    model, sampler, _, (x, y), expected_std = noise_setup()
    before = weights(model)
    model.train_on_batch(x[:6], y[:6], sample_weight=np.zeros((6,), "float32"))
    noise_std_ok(np.concatenate([(b - a).ravel() for b, a in zip(before, weights(model))]), expected_std)


def test_keras_gradient_accumulation_is_refused_by_dp_optimizers():
    for make in (lambda: tan_keras.DPSGD(1.0, 1.0, gradient_accumulation_steps=4),
                 lambda: tan_keras.DPAdam(1.0, 1.0, gradient_accumulation_steps=4)):
        with pytest.raises(ValueError, match="physical_batch_size"):
            make()


def test_private_fit_trains_the_planned_steps_on_sampled_batches():
    n = 32
    x, y = data(n)
    model = dense_model(physical_batch_size=4)
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0, seed=0, learning_rate=0.1), loss=LOSS)
    history = sampling.private_fit(model, x, y, batch_size=4, steps=6, steps_per_epoch=3, seed=0, verbose=0)
    assert len(history.history["loss"]) == 2
    assert int(np.asarray(model.optimizer.iterations)) == 6
    assert model._tan_sampler.next_step() == 6
    assert model.optimizer.expected_batch_size == pytest.approx(4.0)
    with pytest.raises(ValueError, match="divide"):
        sampling.private_fit(model, x, y, batch_size=4, steps=5, steps_per_epoch=3, seed=0, verbose=0)
