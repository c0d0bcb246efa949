"""Tests for tan_keras.tan: η, ε_TAN, simulation and scaling rules, regimes, fits."""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tan_keras import accounting
from tan_keras import tan

IMAGENET_REF = tan.TanConfig(16_384, 2.5, 72_000, 1_281_167, learning_rate=8.0)
CIFAR_REF = tan.TanConfig(4096, 3.0, 2500, 50_000, learning_rate=4.0)


# --- η and ε_TAN -----------------------------------------------------------


def test_eps_tan_is_eta_squared_plus_two_eta_sqrt_log_inverse_delta():
    assert tan.eps_tan(1.0, math.exp(-4.0)) == pytest.approx(1.0 + 2.0 * 2.0)
    assert tan.eps_tan(0.5, 1e-5) == pytest.approx(0.25 + math.sqrt(math.log(1e5)))
    assert tan.eps_tan(0.0, 1e-5) == 0.0


def test_eta_is_sqrt_q2_s_over_2_sigma2_and_steps_times_eta_step_squared():
    assert tan.eta(0.1, 1.0, 200) == pytest.approx(1.0)
    assert tan.eta_step(0.1, 1.0) == pytest.approx(0.1 / math.sqrt(2))
    q, sigma, s = 4096 / 50_000, 3.0, 2500
    assert tan.eta(q, sigma, s) ** 2 == pytest.approx(s * tan.eta_step(q, sigma) ** 2)


def test_tan_config_properties():
    assert CIFAR_REF.sampling_rate == 4096 / 50_000
    assert CIFAR_REF.epochs == pytest.approx(204.8)
    assert CIFAR_REF.examples_processed == 4096 * 2500
    assert CIFAR_REF.eta == pytest.approx(tan.eta(4096 / 50_000, 3.0, 2500))


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), r"batch_size must be >= 1, got 0"),
    (dict(batch_size=60_000), r"batch_size=60000 is larger than num_examples=50000"),
    (dict(noise_multiplier=0.0), r"noise_multiplier must be a finite number > 0, got 0\.0"),
    (dict(steps=0), r"steps must be >= 1, got 0"),
    (dict(learning_rate=-1.0), r"learning_rate must be > 0 or None, got -1\.0"),
])
def test_tan_config_rejects_bad_fields_with_named_message(kwargs, message):
    fields = dict(batch_size=4096, noise_multiplier=3.0, steps=2500, num_examples=50_000)
    fields.update(kwargs)
    with pytest.raises(ValueError, match=message):
        tan.TanConfig(**fields)


def test_paper_rdp_epsilon_is_just_below_eps_tan_for_sigma_at_least_2():
    # TAN §3.2 / Table 6: ε (Balle et al. conversion) ≈ ε_TAN, slightly below.
    for ref, delta in ((IMAGENET_REF, 8e-7), (CIFAR_REF, 1e-5)):
        eps = ref.epsilon(delta)
        bound = tan.eps_tan(ref.eta, delta)
        assert 0.9 * bound < eps < bound


# --- Simulation ------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [128, 256, 512, 1024])
def test_simulate_scales_sigma_with_batch_and_keeps_steps_lr_and_eta(batch_size):
    sim = tan.simulate(IMAGENET_REF, batch_size)
    assert sim.noise_multiplier == pytest.approx(2.5 * batch_size / 16_384)
    assert sim.steps == IMAGENET_REF.steps
    assert sim.learning_rate == IMAGENET_REF.learning_rate
    assert sim.eta == pytest.approx(IMAGENET_REF.eta, rel=1e-12)
    assert sim.compute_ratio == 16_384 / batch_size
    assert not sim.is_private
    assert "NOT PRIVATE" in sim.note


def test_simulate_matches_paper_cifar_simulation_at_512():
    # TAN Fig. 5: the (B, σ) = (512, 3/8) simulation of (4096, 3).
    assert tan.simulate(CIFAR_REF, 512).noise_multiplier == 3 / 8


def test_simulated_run_is_far_less_private_than_reference():
    sim = tan.simulate(CIFAR_REF, 512)
    assert sim.config.epsilon(1e-5) > 5 * CIFAR_REF.epsilon(1e-5)


def test_simulate_at_or_above_reference_batch_is_private():
    same = tan.simulate(CIFAR_REF, 4096)
    assert same.is_private and same.config == CIFAR_REF and same.compute_ratio == 1
    bigger = tan.simulate(CIFAR_REF, 8192)
    assert bigger.is_private and bigger.noise_multiplier == 6.0
    assert bigger.compute_ratio == 0.5
    assert bigger.config.epsilon(1e-5) <= CIFAR_REF.epsilon(1e-5)


def test_simulate_rejects_batch_larger_than_dataset():
    with pytest.raises(ValueError, match="batch_size=60000 is larger than reference.num_examples"):
        tan.simulate(CIFAR_REF, 60_000)


# --- Steps-for-batch trade -------------------------------------------------


@pytest.mark.parametrize("steps,batch,lr", [
    (18_000, 512, 32.0),
    (72_000, 256, 8.0),
    (288_000, 128, 2.0),
    (9_000, 724, 64.0),  # the paper prints 756 (sic); 256·√8 = 724.08
])
def test_trade_steps_for_batch_reproduces_tan_table3(steps, batch, lr):
    ref = tan.TanConfig(256, 2.5 / 64, 72_000, 1_281_167, learning_rate=8.0)
    new = tan.trade_steps_for_batch(ref, steps)
    assert (new.batch_size, new.steps, new.learning_rate) == (batch, steps, lr)
    assert new.noise_multiplier == ref.noise_multiplier


@settings(max_examples=15, deadline=None)
@given(steps=st.integers(1_000, 1_000_000))
def test_trade_steps_for_batch_keeps_eta_up_to_rounding(steps):
    new = tan.trade_steps_for_batch(IMAGENET_REF, steps)
    assert new.eta == pytest.approx(IMAGENET_REF.eta, rel=0.5 / new.batch_size + 1e-12)
    assert new.learning_rate == pytest.approx(8.0 * 72_000 / steps)


def test_trade_steps_for_batch_rejects_batch_outside_dataset():
    with pytest.raises(ValueError, match="steps=1 needs batch_size=.* outside"):
        tan.trade_steps_for_batch(IMAGENET_REF, 1)


# --- Regimes ---------------------------------------------------------------


@pytest.mark.parametrize("sigma,level", [
    (0.1, "error"), (0.49, "error"), (0.5, "warning"), (1.99, "warning"),
    (2.0, "ok"), (2.5, "ok"), (8.0, "ok"),
])
def test_check_regime_levels(sigma, level):
    regime = tan.check_regime(sigma)
    assert regime.level == level
    assert regime.noise_multiplier == sigma
    assert f"noise_multiplier={sigma:.4g}" in regime.message


def test_warn_regime_emits_tan_regime_error_below_the_wall():
    with pytest.warns(tan.TanRegimeError, match="privacy wall"):
        tan.warn_regime(0.3)
    assert issubclass(tan.TanRegimeError, UserWarning)


def test_warn_regime_emits_warning_between_half_and_two():
    with pytest.warns(tan.TanRegimeWarning, match="no longer ≈ ε_TAN") as record:
        tan.warn_regime(1.0)
    assert not any(issubclass(r.category, tan.TanRegimeError) for r in record)


def test_warn_regime_is_silent_in_tan_regime():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tan.warn_regime(3.0).level == "ok"


# --- Report ----------------------------------------------------------------


def test_report_puts_epsilon_and_eps_tan_side_by_side():
    r = tan.report(CIFAR_REF, 1e-5, pld_discretization=1e-3)
    assert r["epsilon"] == r["epsilon_rdp"] == pytest.approx(7.1, abs=0.05)
    assert r["epsilon_pld"] < r["epsilon_rdp"]
    assert r["eta"] == CIFAR_REF.eta
    assert r["eps_tan"] == tan.eps_tan(CIFAR_REF.eta, 1e-5)
    assert r["regime"].level == "ok"
    pld = tan.report(CIFAR_REF, 1e-5, "pld", pld_discretization=1e-3)
    assert pld["epsilon"] == r["epsilon_pld"]


# --- Scaling law -----------------------------------------------------------


def test_fit_scaling_law_recovers_known_line():
    b = np.array([128, 256, 512, 1024, 2048])
    law = tan.fit_scaling_law(b, 0.7 - 0.02 * np.log(b))
    assert law.slope == pytest.approx(-0.02)
    assert law.intercept == pytest.approx(0.7)
    assert law.r_squared == pytest.approx(1.0)
    assert law.predict(16_384) == pytest.approx(0.7 - 0.02 * math.log(16_384))
    assert law.slope_per_doubling == pytest.approx(-0.02 * math.log(2))


def test_fit_scaling_law_on_tan_fig4_imagenet_predicts_large_batch_drop():
    # TAN Fig. 4-right (S = 72k), accuracy read off the plot.
    b = [128, 256, 512, 1024, 2048, 4096]
    acc = [43.3, 41.6, 39.4, 37.2, 35.1, 32.8]
    law = tan.fit_scaling_law(b, acc)
    assert law.r_squared > 0.99
    assert law.slope_per_doubling == pytest.approx(-2.1, abs=0.2)
    assert law.predict(16_384) < acc[-1]


def test_fit_scaling_law_validates_inputs():
    with pytest.raises(ValueError, match="same length"):
        tan.fit_scaling_law([1, 2], [0.1])
    with pytest.raises(ValueError, match="at least 2 points"):
        tan.fit_scaling_law([128], [0.1])
    with pytest.raises(ValueError, match="two distinct values"):
        tan.fit_scaling_law([128, 128], [0.1, 0.2])
    with pytest.raises(ValueError, match="batch_sizes must be finite and > 0"):
        tan.fit_scaling_law([0, 128], [0.1, 0.2])


def test_tan_uses_accounting_validation_for_bad_sampling_rate():
    with pytest.raises(ValueError, match=r"sampling_rate must be in \(0, 1\]"):
        tan.eta(0.0, 1.0, 10)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        tan.eps_tan(1.0, 2.0)
    assert accounting.SAMPLING_METHODS[0] == "poisson"
