"""Tests for experiments/privacy.py: the in-process run() and the absl binary."""

import subprocess
import sys
from pathlib import Path

import pytest

from experiments import privacy
from tan_keras import tan

REPO = Path(__file__).resolve().parents[1]
CIFAR = dict(num_examples=50_000, batch_size=4096, steps=2500, delta=1e-5)


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
