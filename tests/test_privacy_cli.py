"""Tests for experiments/privacy.py: the in-process run() and the absl binary."""

import logging
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest

from experiments import privacy
from tan_keras import accounting, tan

REPO = Path(__file__).resolve().parents[1]
CIFAR = dict(num_examples=50_000, batch_size=4096, steps=2500, delta=1e-5)
CIFAR10_BN = dict(batch_size=4096, num_examples=50_000)


def test_run_reports_paper_cifar10_epsilon_eta_and_simulations():
    r = privacy.run(noise_multiplier=3.0, simulate_batch_sizes=(256, 512),
                    pld_discretization=1e-3, **CIFAR)
    assert r["epsilon_rdp"] == pytest.approx(7.1, abs=0.05)
    assert r["epsilon_pld"] < r["epsilon_rdp"]
    assert r["eps_tan"] == pytest.approx(tan.eps_tan(r["eta"], 1e-5))
    assert r["regime"].level == "ok"
    assert [row["batch_size"] for row in r["simulated"]] == [256, 512]
    for row in r["simulated"]:
        assert row["noise_multiplier"] == pytest.approx(3.0 * row["batch_size"] / 4096)
        assert row["eta"] == pytest.approx(r["eta"])
        assert row["steps"] == 2500
        assert not row["is_private"]
        assert row["epsilon_rdp"] > r["epsilon_rdp"]
    text = privacy.format_report(r)
    assert "ε (RDP)  = 7.09" in text and "ε_TAN" in text and "NOT private" in text


def test_run_calibrates_sigma_for_target_epsilon():
    r = privacy.run(target_epsilon=8.0, simulate_batch_sizes=(), pld_discretization=1e-2, **CIFAR)
    assert r["calibrated"]
    assert r["epsilon_rdp"] <= 8.0
    assert r["epsilon_rdp"] == pytest.approx(8.0, abs=0.01)


def test_run_requires_exactly_one_of_sigma_and_target_epsilon():
    with pytest.raises(ValueError, match="exactly one of noise_multiplier and target_epsilon"):
        privacy.run(noise_multiplier=3.0, target_epsilon=8.0, **CIFAR)
    with pytest.raises(ValueError, match="exactly one of noise_multiplier and target_epsilon"):
        privacy.run(**CIFAR)


def test_run_reports_why_pld_is_missing_for_sampling_without_replacement():
    r = privacy.run(noise_multiplier=3.0, sampling="sampled_without_replacement",
                    simulate_batch_sizes=(), **CIFAR)
    assert r["epsilon_pld"] is None
    assert "cannot account" in r["epsilon_pld_note"]


def test_fig2_curves_approach_eps_tan_for_large_sigma_and_hit_the_wall_below_half():
    eta, delta = 0.9654, 1e-5
    curves = privacy.fig2_curves(eta, delta, steps_list=(10_000,), num_points=3,
                                 sigma_range=(0.2, 10.0))
    sigmas, eps = curves[10_000]
    bound = tan.eps_tan(eta, delta)
    assert eps[-1] == pytest.approx(bound, rel=0.1)   # σ = 10: ε ≈ ε_TAN
    assert eps[0] > 10 * bound                         # σ = 0.2: privacy wall


def test_run_writes_fig2_plot(tmp_path):
    path = tmp_path / "fig2.png"
    r = privacy.run(noise_multiplier=3.0, simulate_batch_sizes=(), plot=str(path),
                    plot_points=2, pld_discretization=1e-2, **CIFAR)
    assert r["plot"] == str(path)
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_cli_subprocess_prints_epsilon_and_simulation_table():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.privacy", "--num_examples=50000",
         "--batch_size=4096", "--noise_multiplier=3", "--steps=2500",
         "--simulate_batch_sizes=256,512"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "ε (RDP)  = 7.09" in out
    assert "ε (PLD)" in out and "ε_TAN" in out and "regime   = ok" in out
    rows = [line.split() for line in out.splitlines()]
    assert any(row[:3] == ["256", "0.1875", "2500"] and "False" in row for row in rows)


def _cli(*flags):
    return subprocess.run([sys.executable, "-m", "experiments.privacy", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_simulated_configurations_are_accounted_with_the_chosen_sampling():
    """15.13: --sampling=shuffle charges the B = 512 simulation ceil(2500 / ceil(50000/512)) = 26 Gaussians."""
    r = privacy.run(noise_multiplier=3.0, sampling="shuffle", simulate_batch_sizes=(512,), **CIFAR)
    (row,) = r["simulated"]
    assert row["noise_multiplier"] == pytest.approx(0.375)
    reference = dp_accounting.rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(0.375), 26)
    assert row["epsilon_rdp"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert round(row["epsilon_rdp"], 1) == 156.1  # the Poisson simulation's ε is 63.0
    assert "156.1" in privacy.format_report(r)


@pytest.mark.parametrize("flag, message", [
    ("--delta=2", "delta must be in (0, 1), got 2.0."),
    ("--simulate_batch_sizes=a,3", "--simulate_batch_sizes must be a comma-separated list of integers, got 'a'."),
])
def test_cli_reports_a_bad_value_in_one_line_and_exits_non_zero(flag, message):
    proc = _cli(flag)
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"experiments.privacy: error: {message}")


def test_cli_calibration_prints_no_rdp_convergence_warnings():
    """15.13: ε = 50 on CIFAR-10 probes σ ≈ 0.65, where dp_accounting warned 60 times for fractional orders."""
    proc = _cli("--target_epsilon=50", "--simulate_batch_sizes=")
    assert proc.returncode == 0 and proc.stderr == ""
    assert "σ = 0.9032 (calibrated for ε = 50)" in proc.stdout


def test_quiet_rdp_convergence_warnings_drops_only_that_warning_and_only_inside(caplog):
    """The calibrations run under it (the CLI test above); at σ = 0.9, q = 0.08 orders 1.1-1.5 do not converge."""
    warned = lambda: [r for r in caplog.records if "_compute_log_a_frac failed to converge" in r.getMessage()]  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="absl"):
        with accounting.quiet_rdp_convergence_warnings():
            inside = accounting.epsilon(0.9, 1, 1e-5, **CIFAR10_BN)
            logging.getLogger("absl").warning("another warning")
        assert not warned() and [r.getMessage() for r in caplog.records] == ["another warning"]
        assert not logging.getLogger("absl").filters
        outside = accounting.epsilon(0.9, 1, 1e-5, **CIFAR10_BN)
        assert len(warned()) == 5 and outside == inside  # the same ε: the warning only reports the dropped orders
