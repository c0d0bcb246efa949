"""Tests for the implicit-bias experiments (experiments/dln_implicit_bias.py, linear_least_squares.py).

The simulations share their shapes with the binaries' ``--quick`` configs so the
whole module needs a handful of JIT compilations (CI budget: < ~90 s on 2 cores).
"""

import json
import os

import numpy as np
import pytest
import scipy.stats

from experiments import _implicit_bias_core as core
from experiments import dln_implicit_bias, linear_least_squares
from models.dln import mirror_map

DATA_SEED = dln_implicit_bias.DLNExperimentConfig.__dataclass_fields__["data_seed"].default
QUICK_STEPS = 10_000
RUNS = 4


@pytest.fixture(scope="module")
def problem():
    return core.make_sparse_regression(seed=DATA_SEED)


@pytest.fixture(scope="module")
def dln_runs(problem):
    """GD, and 2 seeds × (4 SGD + 4 Noisy-SGD σ=0.5) runs of 10⁴ steps at α = 0.1 (the quick shapes)."""
    gd = core.simulate_dln(problem, alpha=0.1, full_batch=True, iterations=QUICK_STEPS, chains=[0])
    sgd, noisy, raw = [], [], []
    for seed in (0, 1):
        out = core.simulate_dln(problem, alpha=0.1, sigma=np.repeat([0.0, 0.5], RUNS),
                                chains=np.tile(np.arange(RUNS), 2), iterations=QUICK_STEPS, seed=seed)
        sgd.append(out["dist2"][:RUNS, -1])
        noisy.append(out["dist2"][RUNS:, -1])
        raw.append(out)
    return gd, np.concatenate(sgd), np.concatenate(noisy), raw


# --------------------------------------------------------------------------------------
# DLN
# --------------------------------------------------------------------------------------


def test_final_distance_to_sparse_truth_orders_gd_above_sgd_above_noisy_sgd(dln_runs):
    gd, sgd, noisy, _ = dln_runs
    assert np.all(np.isfinite(sgd)), "plain SGD diverged at the paper's step size"
    # Noisy-SGD at the paper's γ diverges in a minority of runs (see docs/implicit_bias.md).
    assert np.mean(np.isfinite(noisy)) >= 0.5
    gd_final = gd["dist2"][0, -1]
    assert gd_final > 2 * np.mean(sgd)
    assert np.mean(sgd) > 2 * np.nanmean(noisy)
    assert np.median(sgd) > np.nanmedian(noisy)


def test_gd_and_sgd_reach_an_interpolator(dln_runs):
    gd, _, _, raw = dln_runs
    assert gd["loss"][0, -1] < 1e-10
    # SGD is slower; from L(β₀) = ‖β*‖²/4 ≈ 1.4 it is down by > 10⁴ after 10⁴ steps.
    assert np.all(raw[0]["loss"][:RUNS, -1] < 1e-4)


def test_jax_simulation_matches_the_numpy_oracle_step_by_step(problem, dln_runs):
    _, _, _, raw = dln_runs
    out = raw[1]  # seed 1; chain c uses PRNG chain index c % RUNS
    steps = out["steps"]
    upto = np.searchsorted(steps, 300)
    for c, sigma in ((1, 0.0), (RUNS + 2, 0.5)):
        betas = core.dln_reference_run(problem, alpha=0.1, iterations=300, sigma=sigma, seed=1, chain=c % RUNS)
        ref = np.array([np.sum((betas[s] - problem.beta_star) ** 2) for s in steps[: upto + 1]])
        np.testing.assert_allclose(out["dist2"][c, : upto + 1], ref, rtol=1e-9, atol=1e-12)


def test_additive_noise_oracle_and_no_convergence(problem):
    out = core.simulate_dln(problem, alpha=0.1, additive_sigma=0.05, chains=np.arange(RUNS), iterations=QUICK_STEPS)
    betas = core.dln_reference_run(problem, alpha=0.1, iterations=200, additive_sigma=0.05, chain=2)
    np.testing.assert_allclose(out["dist2"][2, :100], [np.sum((b - problem.beta_star) ** 2) for b in betas[:100]],
                               rtol=1e-9)
    # Additive noise does not vanish at interpolators: the loss stays far above SGD's.
    assert np.all(out["loss"][:, -1] > 1e-4)


def test_drawn_noise_is_standard_normal_and_indices_uniform():
    import jax

    with jax.enable_x64(True):
        idx, z, zp, zm = core._block_randomness(jax.random.PRNGKey(3), 5, 40, 100, 1)
        draws = np.concatenate([np.asarray(core._block_randomness(jax.random.PRNGKey(3), b, 40, 100, 1)[1]).ravel()
                                for b in range(20)])
    assert scipy.stats.kstest(draws, "norm").pvalue > 1e-3
    assert scipy.stats.ks_2samp(np.asarray(zp).ravel(), np.asarray(zm).ravel()).pvalue > 1e-3
    assert not np.allclose(np.asarray(zp), np.asarray(zm))
    assert set(np.unique(np.asarray(idx))) <= set(range(40))


def test_min_potential_interpolator_satisfies_kkt():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 30))
    y = x @ np.concatenate([[1.5, -1.0, 0.5], np.zeros(27)])
    alpha = rng.uniform(0.001, 0.5, size=30)
    beta = core.min_potential_interpolator(x, y, alpha)
    np.testing.assert_allclose(x @ beta, y, atol=1e-9)
    # ∇φ_α(β) must lie in the row space of X (Lagrange condition).
    grad = mirror_map(beta, alpha)
    coef, *_ = np.linalg.lstsq(x.T, grad, rcond=None)
    np.testing.assert_allclose(x.T @ coef, grad, atol=1e-8)


def test_gd_limit_converges_to_the_min_potential_interpolator_as_the_step_shrinks():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 15))
    beta_star = np.concatenate([[1.0, -0.5], np.zeros(13)])
    y = x @ beta_star
    expected = core.min_potential_interpolator(x, y, 0.3)
    errors = []
    for fraction in (0.2, 0.1):  # of the paper's γ; same horizon γ·T
        gamma = fraction * core.dln_step_size(x)
        wp = np.full(15, 0.3)
        wm = wp.copy()
        for _ in range(int(3000 / fraction)):
            g = x.T @ (x @ (wp**2 - wm**2) - y) / (2 * len(y))
            wp, wm = wp * (1 - 2 * gamma * g), wm * (1 + 2 * gamma * g)
        errors.append(np.max(np.abs(wp**2 - wm**2 - expected)))
    # Discrete GD shrinks α by O(γ²) per step, so the gap to the mirror-flow limit is O(γ).
    assert errors[1] < 2e-3
    assert errors[1] < 0.6 * errors[0]


def test_eq21_effective_alpha_formula():
    x = np.array([[1.0, 2.0], [3.0, 0.0]])
    alpha = core.effective_alpha_eq21(0.1, x, gamma=0.5, sigma=0.2, loss_sum=np.array([4.0]))
    integral = 0.5 * 4.0  # ∫L = γ Σ L
    expected = 0.1 * np.exp(-2 * 0.5 * 0.2**2 * integral) * np.exp(-2 * 0.5 * np.array([5.0, 2.0]) * integral)
    np.testing.assert_allclose(alpha[0], expected)


def test_eq21_alpha_of_one_chain_is_a_per_coordinate_vector():
    x = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    alpha = core.effective_alpha_eq21(0.1, x, gamma=0.5, sigma=0.0, loss_sum=2.0)
    assert alpha.shape == (3,)
    assert len(set(np.round(alpha, 12))) == 3


def test_effective_alpha_exact_makes_the_mirror_identity_hold(dln_runs):
    _, _, _, raw = dln_runs
    out = raw[0]
    for c in range(2 * RUNS):
        if np.all(np.isfinite(out["beta"][c])):
            a = core.effective_alpha_exact(out["w_plus"][c], out["w_minus"][c])
            z = 0.25 * np.log(np.abs(out["w_plus"][c] / out["w_minus"][c]))
            np.testing.assert_allclose(mirror_map(out["beta"][c], a), z, rtol=1e-6, atol=1e-9)


def test_iterations_must_be_a_multiple_of_the_block(problem):
    with pytest.raises(ValueError, match="iterations"):
        core.simulate_dln(problem, alpha=0.1, iterations=150)


def test_dln_config_validates_fields(tmp_path):
    with pytest.raises(ValueError, match="figures"):
        dln_implicit_bias.DLNExperimentConfig(output_dir=str(tmp_path), figures=("9",))
    with pytest.raises(ValueError, match="alpha"):
        dln_implicit_bias.DLNExperimentConfig(output_dir=str(tmp_path), alpha=0.0)


def test_dln_binary_runs_end_to_end_and_keras_agrees_with_numpy(tmp_path):
    config = dln_implicit_bias.DLNExperimentConfig.quick(str(tmp_path), data_seed=DATA_SEED)
    summary = dln_implicit_bias.run(config)
    for name in ("fig3_dln_gd_sgd_noisy", "fig4_alpha0.1_potential_minimiser", "fig5_alpha0.1_sigma_sweep",
                 "fig6_alpha0.01_sigma_sweep", "fig7_alpha0.01_potential_minimiser"):
        assert os.path.getsize(tmp_path / f"{name}.png") > 1000
        assert os.path.getsize(tmp_path / f"{name}.csv") > 50
    assert (tmp_path / "dln_data_seeds.csv").exists()
    assert json.loads((tmp_path / "dln_summary.json").read_text())["fig3"]["gd"]["runs"] == 1
    fig3 = summary["fig3"]
    assert fig3["gd"]["final_mean"] > fig3["sgd"]["final_mean"] > fig3["noisy_sgd"]["final_mean"]
    # Keras DLN + keras.optimizers.SGD (float32) follows the float64 oracle on the same indices.
    assert summary["speed"]["keras_vs_numpy_max_abs_beta_diff"] < 1e-4
    assert summary["speed"]["speedup"][1] > 1.0
    for key in ("sigma=0", "sigma=0.5"):
        assert np.isfinite(summary["fig4"][key]["eq21_mean"])


# --------------------------------------------------------------------------------------
# Linear least squares
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lls_summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("lls")
    config = linear_least_squares.LLSExperimentConfig.quick(str(out), designs=("antithetic",))
    return linear_least_squares.run(config), out


def test_lls_binary_writes_csv_and_png(lls_summary):
    _, out = lls_summary
    for name in ("lls_stationary_covariance", "lls_theorem1_bound"):
        assert os.path.getsize(out / f"{name}.png") > 1000
        assert os.path.getsize(out / f"{name}.csv") > 50


def test_stationary_covariance_matches_the_exact_discrete_chain_within_monte_carlo_error(lls_summary):
    cov = lls_summary[0]["covariance"]["antithetic"]
    # ‖Σ̂ − Σ‖_F concentrates around its rms, which is monte_carlo_rel_se·‖Σ‖_F.
    assert cov["rel_err_vs_exact_discrete"] < 2.0 * cov["monte_carlo_rel_se"]


def test_stationary_covariance_matches_eq15_with_the_ou_factor(lls_summary):
    cov = lls_summary[0]["covariance"]["antithetic"]
    # Triangle inequality: ‖Σ̂ − Σ_15‖ ≤ ‖Σ̂ − Σ_exact‖ + ‖Σ_exact − Σ_15‖, the second being the SDE's
    # O(γ Tr H) discretisation gap (the antithetic design makes the SGD noise exactly ϵ²X̄ᵀX̄).
    tolerance = cov["rel_gap_eq15_half_vs_exact_discrete"] + 2.0 * cov["monte_carlo_rel_se"]
    assert cov["rel_err_vs_eq15_sigma2_over_2"] < tolerance
    assert tolerance < 0.15


def test_printed_sigma_sq_over_4_corresponds_to_half_the_euler_noise_variance(lls_summary):
    cov = lls_summary[0]["covariance"]["antithetic"]
    assert cov["rel_err_vs_eq15_printed_sigma2_over_4"] > 0.3 > cov["rel_err_vs_eq15_sigma2_over_2"]


def test_theorem1_bound_holds_and_the_null_space_part_saturates_it(lls_summary):
    th = lls_summary[0]["theorem1"]
    assert th["gamma_times_max_sq_norm"] <= 2.0
    # E η_t ≤ γdσ²∫L at every recorded t, up to Monte-Carlo error (4 standard errors).
    assert th["max_excess_in_se"] < 4.0
    assert th["final_mean_eta"] <= th["final_bound"]
    # At t → ∞ both iterates interpolate, so θ∞ − β∞ lies in null(X): E η∞ = ((d−n)/d)·bound exactly.
    assert th["final_mean_eta"] == pytest.approx(th["final_lower"], abs=4 * th["final_se_eta"])


def test_lls_config_validates_fields(tmp_path):
    with pytest.raises(ValueError, match="n_under"):
        linear_least_squares.LLSExperimentConfig(output_dir=str(tmp_path), n_under=5, d_under=10)
    with pytest.raises(ValueError, match="parts"):
        linear_least_squares.LLSExperimentConfig(output_dir=str(tmp_path), parts=("nope",))
