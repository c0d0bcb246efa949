"""PrivacyBudget accounts what fit actually feeds (issue 15, items 5, 11 and 12).

Runs on the backend named by KERAS_BACKEND. References are dp_accounting's
own RDP of a composition of Gaussians, independent of tan_keras.
"""

import dp_accounting
import keras
import numpy as np
import pytest

import tan_keras
from tan_keras import callbacks

N, B, DELTA = 4000, 256, 1e-5  # an epoch is ceil(4000/256) = 16 steps, the last batch holding 160 examples
LOSS = keras.losses.MeanSquaredError()


def gaussians_epsilon(sigma, count, delta=DELTA):
    """ε of ``count`` un-amplified Gaussian mechanisms of noise multiplier σ (dp_accounting, RDP)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    return accountant.compose(dp_accounting.GaussianDpEvent(sigma), count).get_epsilon(delta)


def data(n=N):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 2)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


def model(**optimizer_kwargs):
    keras.utils.set_random_seed(0)
    m = tan_keras.PrivateSequential([keras.Input((2,)), keras.layers.Dense(1)])
    m.compile(optimizer=tan_keras.DPSGD(1.0, 1.0, seed=0, learning_rate=0.01, **optimizer_kwargs), loss=LOSS)
    return m


def iterations(m):
    return int(np.asarray(m.optimizer.iterations))


def test_budget_refuses_a_sampling_rate_that_is_not_the_b_over_n_fit_batches():
    """15.5: sampling_rate=0.001 on fit(batch_size=256) over 4,000 examples (q = 0.064) is refused."""
    x, y = data()
    m = model()
    budget = callbacks.PrivacyBudget(50.0, DELTA, 1.0, sampling_rate=0.001, sampling="shuffle")
    with pytest.raises(ValueError, match=r"sampling_rate=0\.001, but fit walks through batches of B=256 "
                                         r"from N=4000 examples: q = B/N = 0\.064"):
        m.fit(x, y, batch_size=B, epochs=2, verbose=0, callbacks=[budget])
    assert iterations(m) == 0 and budget.ledger.steps == 0


def test_budget_reads_b_and_n_from_fit_and_charges_one_gaussian_per_epoch():
    """15.5 + 15.12: two epochs of 16 steps log ε = 4.73, then 7.08 (one and two Gaussians of σ = 1)."""
    x, y = data()
    m = model()
    budget = callbacks.PrivacyBudget(50.0, DELTA, 1.0, sampling="shuffle")
    history = m.fit(x, y, batch_size=B, epochs=2, verbose=0, callbacks=[budget])
    (record,) = budget.ledger.records
    assert (record.batch_size, record.num_examples, record.steps) == (B, N, 32) == (B, N, iterations(m))
    assert record.sampling_rate == B / N
    logged = history.history["epsilon"]
    assert logged == pytest.approx([gaussians_epsilon(1.0, 1), gaussians_epsilon(1.0, 2)], rel=1e-9)
    assert [round(e, 2) for e in logged] == [4.73, 7.08]


def test_budget_reads_keras_default_batch_and_the_training_part_of_validation_split():
    """fit(x, y) batches 32 at a time; validation_split=0.5 trains on the first half (here 32 rows)."""
    x, y = data(64)
    m = model()
    budget = callbacks.PrivacyBudget(50.0, DELTA, 1.0, sampling="shuffle")
    m.fit(x, y, validation_split=0.5, verbose=0, callbacks=[budget])
    (record,) = budget.ledger.records
    assert (record.batch_size, record.num_examples, record.steps) == (32, 32, 1)
    assert budget.epsilon() == pytest.approx(gaussians_epsilon(1.0, 1), rel=1e-9)


def test_budget_refuses_a_shuffle_fit_whose_batches_it_cannot_see():
    x, y = data(64)
    m = model()

    def batches():
        while True:
            yield x[:16], y[:16]

    budget = callbacks.PrivacyBudget(50.0, DELTA, 1.0, sampling_rate=0.25, sampling="shuffle")
    with pytest.raises(ValueError, match="cannot see the batch size B and the number of examples N"):
        m.fit(batches(), steps_per_epoch=2, shuffle=False, verbose=0, callbacks=[budget])
    assert iterations(m) == 0


def test_budget_refuses_a_new_fit_that_would_restart_an_epoch_the_ledger_counts_as_running():
    x, y = data(64)  # B = 16: epochs of 4 steps
    m = model()
    budget = callbacks.PrivacyBudget(50.0, DELTA, 1.0, sampling="shuffle")
    m.fit(x, y, batch_size=16, steps_per_epoch=3, verbose=0, callbacks=[budget])
    assert budget.ledger.steps == 3
    with pytest.raises(ValueError, match="The ledger ends 3 steps into an epoch of 4 steps"):
        m.fit(x, y, batch_size=16, verbose=0, callbacks=[budget])
    assert iterations(m) == 3


@pytest.mark.parametrize("num_microbatches, recorded_sigma", [(16, 1.0), (8, 0.5)])
def test_budget_records_sigma_for_one_example_microbatches_and_sigma_over_two_for_larger(
        num_microbatches, recorded_sigma):
    """15.11: m = B (TF Privacy's tutorial) has sensitivity C: σ; m < B has sensitivity 2C: σ/2."""
    x, y = data(64)
    m = model(num_microbatches=num_microbatches)
    budget = callbacks.PrivacyBudget(50.0, DELTA, 1.0, sampling="shuffle")
    m.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[budget])
    (record,) = budget.ledger.records
    assert record.noise_multiplier == recorded_sigma and record.steps == 4
    assert budget.epsilon() == pytest.approx(gaussians_epsilon(recorded_sigma, 1), rel=1e-9)


def test_budget_refuses_arrays_fed_to_a_model_configured_with_a_sampler_before_any_step():
    x, y = data(64)
    m = model()
    sampler = tan_keras.PoissonSampler(64, batch_size=16, seed=0)
    sampler.configure(m)
    budget = callbacks.PrivacyBudget(50.0, DELTA, 1.0)
    with pytest.raises(RuntimeError, match="did not come from the sampler the budget accounts .fit was given arrays"):
        m.fit(x, y, batch_size=16, verbose=0, callbacks=[budget])
    assert iterations(m) == 0 and budget.ledger.steps == 0
