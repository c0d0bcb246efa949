"""Tests for tan_keras.accounting: paper ε values, calibration, ledger, validation."""

import json
import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tan_keras import accounting

REPO = Path(__file__).resolve().parents[1]
COARSE = 1e-3  # PLD discretization for speed; still an upper bound.

IMAGENET = dict(batch_size=32_768, num_examples=1_281_167)
CIFAR10 = dict(batch_size=4096, num_examples=50_000)


# --- Paper configurations -------------------------------------------------


def test_imagenet_rdp_epsilon_matches_tan_table4_row_18k():
    eps = accounting.epsilon(2.5, 18_000, 8e-7, **IMAGENET)
    assert eps == pytest.approx(8.00, abs=0.05)


def test_imagenet_rdp_epsilon_matches_tan_table4_row_72k():
    eps = accounting.epsilon(2.5, 72_000, 8e-7, batch_size=16_384, num_examples=1_281_167)
    assert eps == pytest.approx(7.97, abs=0.05)


def test_cifar10_rdp_epsilon_matches_tan_table5_full_dataset():
    eps = accounting.epsilon(3.0, 2500, 1e-5, **CIFAR10)
    assert eps == pytest.approx(7.1, abs=0.05)


@pytest.mark.parametrize("sigma,steps,delta,kw", [
    (2.5, 18_000, 8e-7, IMAGENET),
    (3.0, 2500, 1e-5, CIFAR10),
])
def test_pld_epsilon_is_at_most_rdp_epsilon_on_paper_configs(sigma, steps, delta, kw):
    rdp = accounting.epsilon(sigma, steps, delta, **kw)
    pld = accounting.epsilon(sigma, steps, delta, accountant="pld", pld_discretization=COARSE, **kw)
    assert pld <= rdp
    assert pld > 0.8 * rdp  # tighter, not wildly different


def test_rdp_conversion_is_balle2020_over_default_orders():
    event = accounting.make_dp_event(3.0, 2500, **CIFAR10)
    acc = dp_accounting.rdp.RdpAccountant().compose(event)
    a, r, d = acc.orders, acc.rdp, 1e-5
    balle = np.min(r + np.log((a - 1) / a) - (np.log(d) + np.log(a)) / (a - 1))
    assert accounting.epsilon(3.0, 2500, d, **CIFAR10) == pytest.approx(balle, rel=1e-12)
    # Strictly below TAN Eq. 3's classic conversion.
    assert balle < np.min(r + np.log(1 / d) / (a - 1))


def test_batch_size_and_num_examples_mean_q_equals_b_over_n():
    direct = accounting.epsilon(3.0, 2500, 1e-5, sampling_rate=4096 / 50_000)
    assert accounting.epsilon(3.0, 2500, 1e-5, **CIFAR10) == direct


def test_loader_sampling_rate_is_one_over_ceil_n_over_b_and_gives_lower_epsilon():
    assert accounting.sampling_rate_from_loader(4096, 50_000) == 1 / 13
    assert accounting.sampling_rate_from_loader(32_768, 1_281_167) == 1 / 40
    assert accounting.sampling_rate_from_loader(100, 1000) == 0.1
    q = accounting.sampling_rate_from_loader(4096, 50_000)
    assert accounting.epsilon(3.0, 2500, 1e-5, sampling_rate=q) < accounting.epsilon(
        3.0, 2500, 1e-5, **CIFAR10)


def test_delta_for_epsilon_inverts_epsilon():
    eps = accounting.epsilon(3.0, 2500, 1e-5, **CIFAR10)
    assert accounting.delta_for_epsilon(eps, 3.0, 2500, **CIFAR10) == pytest.approx(1e-5, rel=1e-3)
    eps = accounting.epsilon(3.0, 2500, 1e-5, accountant="pld", pld_discretization=COARSE,
                             **CIFAR10)
    delta = accounting.delta_for_epsilon(eps, 3.0, 2500, accountant="pld",
                                         pld_discretization=COARSE, **CIFAR10)
    assert delta == pytest.approx(1e-5, rel=0.05)


# --- Sampling schemes ------------------------------------------------------


def test_shuffle_charges_ceil_s_over_ceil_n_over_b_unamplified_gaussian_epochs():
    # CIFAR-10 at B = 4,096: an epoch is ceil(50,000/4,096) = 13 steps, the 13th batch holding 848 examples.
    assert accounting.shuffle_epochs(13, **CIFAR10) == 1   # the partial 13th batch ends the first epoch
    assert accounting.shuffle_epochs(14, **CIFAR10) == 2   # a started epoch counts
    epochs = accounting.shuffle_epochs(2500, **CIFAR10)
    assert epochs == 193                                   # ceil(2500/13)
    eps = accounting.epsilon(3.0, 2500, 1e-5, sampling="shuffle", **CIFAR10)
    # E Gaussians of σ compose to one Gaussian of σ/√E.
    expected = accounting.epsilon(3.0 / math.sqrt(epochs), 1, 1e-5, sampling_rate=1.0)
    assert eps == pytest.approx(expected, rel=1e-9)
    assert eps > 3 * accounting.epsilon(3.0, 2500, 1e-5, **CIFAR10)


def test_shuffle_charges_one_epoch_of_n_4000_at_b_256_as_one_gaussian():
    """Issue 15.12: 16 steps of B = 256 over N = 4,000 are one epoch (ε 4.73 at σ = 1), not two (7.08)."""
    def gaussians(count):  # independent reference: dp_accounting's RDP of `count` Gaussians of σ = 1
        return dp_accounting.rdp.RdpAccountant().compose(
            dp_accounting.GaussianDpEvent(1.0), count).get_epsilon(1e-5)

    small = dict(batch_size=256, num_examples=4000)
    assert accounting.shuffle_epochs(16, **small) == 1
    assert accounting.shuffle_epochs(17, **small) == 2
    assert accounting.shuffle_epochs(16, sampling_rate=256 / 4000) == 1
    assert accounting.shuffle_epochs(16, sampling_rate=1 / 16) == 1  # the loader's q = 1/ceil(N/B)
    one_epoch = accounting.epsilon(1.0, 16, 1e-5, sampling="shuffle", **small)
    assert one_epoch == pytest.approx(gaussians(1), rel=1e-12) and round(one_epoch, 2) == 4.73
    two_epochs = accounting.epsilon(1.0, 32, 1e-5, sampling="shuffle", **small)
    assert two_epochs == pytest.approx(gaussians(2), rel=1e-12) and round(two_epochs, 2) == 7.08


def test_sampled_without_replacement_uses_replace_one_and_rdp():
    event = accounting.make_dp_event(3.0, 2500, sampling="sampled_without_replacement", **CIFAR10)
    assert isinstance(event.event, dp_accounting.SampledWithoutReplacementDpEvent)
    assert accounting.neighboring_relation("sampled_without_replacement") is (
        dp_accounting.NeighboringRelation.REPLACE_ONE)
    eps = accounting.epsilon(3.0, 2500, 1e-5, sampling="sampled_without_replacement", **CIFAR10)
    assert math.isfinite(eps)
    # Replace-one is a stronger notion than add/remove: ε is larger.
    assert eps > accounting.epsilon(3.0, 2500, 1e-5, **CIFAR10)


def test_pld_with_sampled_without_replacement_raises_clear_error():
    with pytest.raises(ValueError, match="accountant='pld' cannot account.*sampled_without"):
        accounting.epsilon(3.0, 10, 1e-5, sampling="sampled_without_replacement",
                           accountant="pld", **CIFAR10)


def test_effective_noise_multiplier_halves_sigma_only_for_multi_example_microbatches():
    assert accounting.effective_noise_multiplier(2.0, None, 256) == 2.0
    assert accounting.effective_noise_multiplier(2.0, 256, 256) == 2.0
    assert accounting.effective_noise_multiplier(2.0, 64, 256) == 1.0
    with pytest.raises(ValueError, match="num_microbatches=300 exceeds batch_size=256"):
        accounting.effective_noise_multiplier(2.0, 300, 256)


# --- Calibration -----------------------------------------------------------


def test_calibrated_noise_multiplier_meets_target_and_is_minimal():
    sigma = accounting.calibrate_noise_multiplier(8.0, 2500, 1e-5, **CIFAR10)
    eps = accounting.epsilon(sigma, 2500, 1e-5, **CIFAR10)
    assert eps <= 8.0
    assert eps == pytest.approx(8.0, abs=0.01)
    assert accounting.epsilon(sigma * (1 - 1e-3), 2500, 1e-5, **CIFAR10) > 8.0


def test_calibrated_noise_multiplier_with_pld_meets_target():
    sigma = accounting.calibrate_noise_multiplier(
        5.0, 500, 1e-5, accountant="pld", pld_discretization=1e-2, **CIFAR10)
    eps = accounting.epsilon(sigma, 500, 1e-5, accountant="pld", pld_discretization=1e-2, **CIFAR10)
    assert eps <= 5.0
    assert eps == pytest.approx(5.0, abs=0.02)


def test_calibrate_noise_multiplier_recovers_paper_sigma_for_paper_epsilon():
    eps = accounting.epsilon(3.0, 2500, 1e-5, **CIFAR10)
    sigma = accounting.calibrate_noise_multiplier(eps, 2500, 1e-5, **CIFAR10)
    assert sigma == pytest.approx(3.0, rel=1e-3)


def test_calibrate_steps_returns_largest_steps_within_budget():
    eps = accounting.epsilon(3.0, 2500, 1e-5, **CIFAR10)
    assert accounting.calibrate_steps(eps, 3.0, 1e-5, **CIFAR10) == 2500
    s = accounting.calibrate_steps(5.0, 3.0, 1e-5, **CIFAR10)
    assert accounting.epsilon(3.0, s, 1e-5, **CIFAR10) <= 5.0
    assert accounting.epsilon(3.0, s + 1, 1e-5, **CIFAR10) > 5.0


def test_calibrate_steps_fast_path_equals_direct_epsilon():
    # The shuffle path maps steps to epochs; both must match epsilon() exactly.
    for sampling in ("poisson", "shuffle"):
        s = accounting.calibrate_steps(20.0, 3.0, 1e-5, sampling=sampling, **CIFAR10)
        assert accounting.epsilon(3.0, s, 1e-5, sampling=sampling, **CIFAR10) <= 20.0
        assert accounting.epsilon(3.0, s + 1, 1e-5, sampling=sampling, **CIFAR10) > 20.0


def test_calibrate_batch_size_returns_largest_batch_within_budget():
    n = 1000
    eps = accounting.epsilon(3.0, 300, 1e-5, batch_size=80, num_examples=n)
    assert accounting.calibrate_batch_size(eps, 3.0, 300, 1e-5, n) == 80
    assert accounting.epsilon(3.0, 300, 1e-5, batch_size=81, num_examples=n) > eps


def test_calibrate_batch_size_returns_n_when_full_batch_fits():
    assert accounting.calibrate_batch_size(100.0, 10.0, 10, 1e-5, 1000) == 1000


def test_unreachable_targets_raise_with_explanation():
    with pytest.raises(ValueError, match="unreachable: even steps=1"):
        accounting.calibrate_steps(1e-3, 0.5, 1e-5, sampling_rate=1.0)
    with pytest.raises(ValueError, match="unreachable: even noise_multiplier=1000"):
        accounting.calibrate_noise_multiplier(1e-3, 10**6, 1e-5, sampling_rate=1.0)
    with pytest.raises(ValueError, match="unreachable: even batch_size=1"):
        accounting.calibrate_batch_size(1e-3, 2.0, 1000, 1e-5, 100)
    with pytest.raises(ValueError, match="never reached"):
        accounting.calibrate_steps(10.0, 50.0, 1e-5, sampling_rate=1e-3, max_steps=1000)


# --- Monotonicity (property-based) ----------------------------------------

sigmas = st.floats(1.5, 6.0)
rates = st.floats(1e-3, 0.1)
step_counts = st.integers(1, 20_000)
PROPERTY = settings(max_examples=15, deadline=None)


@PROPERTY
@given(sigma=sigmas, q=rates, s=step_counts, extra=st.integers(1, 20_000))
def test_epsilon_is_nondecreasing_in_steps(sigma, q, s, extra):
    lo = accounting.epsilon(sigma, s, 1e-5, sampling_rate=q)
    hi = accounting.epsilon(sigma, s + extra, 1e-5, sampling_rate=q)
    assert hi >= lo


@PROPERTY
@given(sigma=sigmas, q=rates, factor=st.floats(1.01, 4.0), s=step_counts)
def test_epsilon_is_nondecreasing_in_sampling_rate(sigma, q, factor, s):
    lo = accounting.epsilon(sigma, s, 1e-5, sampling_rate=q)
    hi = accounting.epsilon(sigma, s, 1e-5, sampling_rate=min(1.0, q * factor))
    assert hi >= lo


@PROPERTY
@given(sigma=sigmas, q=rates, factor=st.floats(1.01, 4.0), s=step_counts)
def test_epsilon_is_nonincreasing_in_noise_multiplier(sigma, q, factor, s):
    noisier = accounting.epsilon(sigma * factor, s, 1e-5, sampling_rate=q)
    assert noisier <= accounting.epsilon(sigma, s, 1e-5, sampling_rate=q)


def test_epsilon_is_strictly_monotone_on_a_paper_config():
    base = accounting.epsilon(3.0, 2500, 1e-5, **CIFAR10)
    assert accounting.epsilon(3.0, 2501, 1e-5, **CIFAR10) > base
    assert accounting.epsilon(3.0, 2500, 1e-5, batch_size=4097, num_examples=50_000) > base
    assert accounting.epsilon(3.01, 2500, 1e-5, **CIFAR10) < base


# --- Validation ------------------------------------------------------------

BAD_INPUTS = [
    (dict(sampling_rate=0.0), r"sampling_rate must be in \(0, 1\], got 0\.0"),
    (dict(sampling_rate=1.5), r"sampling_rate must be in \(0, 1\], got 1\.5"),
    (dict(noise_multiplier=0.0),
     r"noise_multiplier must be a finite number > 0, got 0\.0.*not differentially private"),
    (dict(noise_multiplier=-1.0), r"noise_multiplier must be .* got -1\.0"),
    (dict(delta=1.0), r"delta must be in \(0, 1\), got 1\.0"),
    (dict(delta=0.0), r"delta must be in \(0, 1\), got 0\.0"),
    (dict(steps=0), r"steps must be >= 1, got 0.*number of noisy gradient steps"),
    (dict(steps=2.5), r"steps must be an integer, got 2\.5"),
    (dict(sampling_rate=None, batch_size=60_000, num_examples=50_000),
     r"batch_size=60000 is larger than num_examples=50000.*lower batch_size"),
    (dict(batch_size=4096, num_examples=50_000),
     r"sampling_rate=0\.1 conflicts with batch_size/num_examples = 4096/50000"),
    (dict(sampling_rate=None), r"sampling_rate is missing"),
    (dict(sampling_rate=None, batch_size=4096), r"num_examples is missing"),
    (dict(sampling="random"), r"sampling must be one of \('poisson', .*got 'random'"),
    (dict(accountant="gdp"), r"accountant must be one of \('rdp', 'pld'\), got 'gdp'"),
    (dict(sampling="sampled_without_replacement"),
     r"sampled_without_replacement' needs batch_size and num_examples"),
]


@pytest.mark.parametrize("override,message", BAD_INPUTS)
def test_bad_inputs_raise_value_error_naming_argument_value_and_fix(override, message):
    kw = dict(noise_multiplier=1.0, steps=10, delta=1e-5, sampling_rate=0.1)
    kw.update(override)
    with pytest.raises(ValueError, match=message):
        accounting.epsilon(**kw)


def test_bad_epsilon_raises_value_error():
    with pytest.raises(ValueError, match=r"epsilon must be a finite number > 0, got 0"):
        accounting.delta_for_epsilon(0, 1.0, 10, sampling_rate=0.1)
    with pytest.raises(ValueError, match=r"target_epsilon must be a finite number > 0, got -1"):
        accounting.calibrate_noise_multiplier(-1, 10, 1e-5, sampling_rate=0.1)


# --- Ledger ----------------------------------------------------------------


def test_ledger_merges_consecutive_identical_records():
    ledger = accounting.PrivacyLedger()
    for _ in range(100):
        ledger.record(3.0, 0.08192)
    assert len(ledger) == 1 and ledger.steps == 100
    ledger.record(2.0, 0.08192, steps=5)
    ledger.record(3.0, 0.08192, steps=7)
    assert [r.steps for r in ledger.records] == [100, 5, 7]
    assert ledger.steps == 112


def test_ledger_epsilon_equals_direct_epsilon_for_same_config():
    ledger = accounting.PrivacyLedger()
    for _ in range(50):
        ledger.record(3.0, 4096 / 50_000, steps=50, batch_size=4096, num_examples=50_000)
    assert ledger.steps == 2500
    assert ledger.epsilon(1e-5) == accounting.epsilon(3.0, 2500, 1e-5, **CIFAR10)
    assert ledger.epsilon(1e-5, "pld", pld_discretization=COARSE) == accounting.epsilon(
        3.0, 2500, 1e-5, accountant="pld", pld_discretization=COARSE, **CIFAR10)


def test_ledger_shuffle_recorded_per_step_equals_direct_shuffle_epsilon():
    ledger = accounting.PrivacyLedger()
    for _ in range(13):
        ledger.record(3.0, 4096 / 50_000, sampling="shuffle", batch_size=4096, num_examples=50_000)
    assert ledger.epsilon(1e-5) == accounting.epsilon(3.0, 13, 1e-5, sampling="shuffle", **CIFAR10)


def test_ledger_composes_phases_with_different_noise():
    ledger = accounting.PrivacyLedger().record(3.0, 0.05, 1000).record(2.0, 0.05, 100)
    event = dp_accounting.ComposedDpEvent([
        accounting.make_dp_event(3.0, 1000, sampling_rate=0.05),
        accounting.make_dp_event(2.0, 100, sampling_rate=0.05),
    ])
    assert ledger.dp_event() == event
    expected = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    assert ledger.epsilon(1e-5) == expected
    assert ledger.epsilon(1e-5) > accounting.epsilon(3.0, 1000, 1e-5, sampling_rate=0.05)
    assert ledger.delta(ledger.epsilon(1e-5)) == pytest.approx(1e-5, rel=1e-3)


def test_ledger_json_round_trip_is_exact():
    ledger = accounting.PrivacyLedger()
    ledger.record(10 * (0.1 + 0.2), 1 / 30, 17)  # σ = 3.0000000000000004
    ledger.record(2.5, 4096 / 50_000, 3, sampling="shuffle", batch_size=4096, num_examples=50_000)
    ledger.record(4.1, 1 / 7, 1)
    text = ledger.to_json()
    restored = accounting.PrivacyLedger.from_json(text)
    assert restored == ledger
    assert restored.records == ledger.records
    assert restored.to_json() == text
    assert restored.epsilon(1e-5) == ledger.epsilon(1e-5)
    data = json.loads(text)
    assert data["schema"] == "tan_keras.PrivacyLedger" and data["version"] == 1


def test_ledger_equality_depends_on_records():
    a = accounting.PrivacyLedger().record(1.0, 0.1, 5)
    b = accounting.PrivacyLedger().record(1.0, 0.1, 2).record(1.0, 0.1, 3)
    assert a == b
    assert a != accounting.PrivacyLedger().record(1.0, 0.1, 6)
    assert accounting.PrivacyLedger() == accounting.PrivacyLedger()
    assert accounting.PrivacyLedger().epsilon(1e-5) == 0.0


def test_ledger_from_json_rejects_bad_documents():
    with pytest.raises(ValueError, match="not a PrivacyLedger JSON"):
        accounting.PrivacyLedger.from_json('{"records": []}')
    with pytest.raises(ValueError, match="version 99 is not supported"):
        accounting.PrivacyLedger.from_json(
            '{"schema": "tan_keras.PrivacyLedger", "version": 99, "records": []}')
    bad = accounting.PrivacyLedger().record(1.0, 0.1).to_json().replace('"steps": 1', '"steps": 0')
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        accounting.PrivacyLedger.from_json(bad)


def test_ledger_rejects_mixing_neighbouring_relations():
    ledger = accounting.PrivacyLedger().record(1.0, 0.1, 5)
    ledger.record(1.0, 0.1, 5, sampling="sampled_without_replacement", batch_size=10,
                  num_examples=100)
    with pytest.raises(ValueError, match="different neighbouring relations"):
        ledger.epsilon(1e-5)


def test_ledger_record_validates_inputs():
    with pytest.raises(ValueError, match=r"sampling_rate must be in \(0, 1\]"):
        accounting.PrivacyLedger().record(1.0, 0.0)
    with pytest.raises(ValueError, match=r"noise_multiplier must be a finite number > 0"):
        accounting.PrivacyLedger().record(0.0, 0.1)


# --- Purity ----------------------------------------------------------------


def test_accounting_and_tan_do_not_import_keras_tensorflow_or_jax():
    # Load the modules under a bare ``tan_keras`` package so that the
    # package __init__ (which re-exports Keras optimizers) does not run: this
    # checks the modules' own imports.
    code = f"""
import sys, types
pkg = types.ModuleType("tan_keras"); pkg.__path__ = [{str(REPO / "tan_keras")!r}]
sys.modules["tan_keras"] = pkg
from tan_keras import accounting, tan
accounting.epsilon(1.0, 10, 1e-5, sampling_rate=0.1)
bad = sorted(m for m in ("keras", "tensorflow", "jax") if m in sys.modules)
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize("module", ["dp_events", "ledger"])  # accounting: the test above
def test_each_accounting_module_imports_on_its_own_without_keras_tensorflow_or_jax(module):
    # A fresh interpreter per entry point: an import circle would fail from one of them.
    code = f"""
import sys, types
pkg = types.ModuleType("tan_keras"); pkg.__path__ = [{str(REPO / "tan_keras")!r}]
sys.modules["tan_keras"] = pkg
import tan_keras.{module}
bad = sorted(m for m in ("keras", "tensorflow", "jax") if m in sys.modules)
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
