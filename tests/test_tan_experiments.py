"""End-to-end tests of the TAN experiment binaries (tiny data, a few steps)."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import batch_size_study, datasets, tan_search, train_image_classifier
from tan_keras import accounting

DIGITS = None


def _digits():
    global DIGITS
    if DIGITS is None:
        DIGITS = datasets.load("digits")
    return DIGITS


def test_digits_loader_is_nhwc_float_in_unit_range():
    x, y, xt, yt, k = _digits()
    assert x.shape[1:] == (8, 8, 1) and x.dtype.name == "float32"
    assert 0.0 <= x.min() and x.max() <= 1.0 and k == 10 and len(xt) == 360


def test_pairwise_agreement_counts_concordant_pairs_and_skips_ties():
    assert tan_search.pairwise_agreement([1, 2, 3], [1, 2, 3])[0] == 1.0
    assert tan_search.pairwise_agreement([1, 2, 3], [3, 2, 1])[0] == 0.0
    frac, conc, comp = tan_search.pairwise_agreement([1, 2, 2], [1, 2, 3])
    assert (conc, comp) == (2, 2) and frac == 1.0


def test_simulated_run_follows_tan_rule_and_is_flagged_not_private(tmp_path, capsys):
    with pytest.warns(UserWarning, match="NOT PRIVATE"):
        r = train_image_classifier.run(dataset="digits", data=_digits(), batch_size=16, ref_batch_size=64,
                                       ref_noise=2.0, ref_steps=3, lr=0.5, ema_decay=0.9,
                                       output_dir=str(tmp_path))
    assert "SIMULATED — NOT PRIVATE" in capsys.readouterr().out
    assert r["noise_multiplier"] == pytest.approx(2.0 * 16 / 64)  # σ = σ_ref·B/B_ref
    assert r["steps"] == 3 and not r["is_private"] and r["simulated"]
    assert r["examples_processed"] == 16 * 3
    with open(tmp_path / "log.csv") as f:
        log = list(csv.DictReader(f))
    assert {"epsilon", "signal_norm", "noise_norm", "val_accuracy", "ema_val_accuracy"} <= set(log[0])


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_tfds_datasets_train_end_to_end_on_mock_data(name, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=16):
        data = datasets.load(name, image_size=8)
    assert data[0].shape[1:] == (8, 8, 3) and data[0].max() <= 1.0
    r = train_image_classifier.run(dataset=name, data=data, model="cnn", batch_size=8, ref_noise=1.0,
                                   ref_steps=2, target_epsilon=50.0, delta=1e-3, lr=0.1)
    assert r["is_private"] and r["steps"] == 2 and r["epsilon"] <= 50.0


def test_absent_tfds_data_ends_the_binary_with_one_line_naming_data_dir_and_tfds_build(tmp_path):
    """15.10: no traceback through tfds (it died on `importlib_resources` while trying to download)."""
    pytest.importorskip("tensorflow_datasets")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train_image_classifier", "--dataset=cifar10", f"--data_dir={tmp_path}"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"experiments.train_image_classifier: error: the cifar10 data is absent: tfds found no prepared cifar10 "
        f"in --data_dir={tmp_path}. Pass --data_dir=DIR holding a prepared cifar10, or prepare it with "
        "`tfds build cifar10 --data_dir=DIR` (it downloads the data: on a machine without network, build it "
        "elsewhere and copy DIR).")
    with pytest.raises(datasets.DatasetNotPrepared, match=r"--manual_dir=DIR_WITH_THE_IMAGENET_ARCHIVES"):
        datasets.load("imagenet2012", data_dir=str(tmp_path))


def test_reference_batch_is_raised_until_sigma_reaches_the_tan_regime():
    b_ref, sigma_ref = tan_search.choose_reference(8.0, 1e-5, 4000, 250, 100, min_ref_noise=2.0)
    assert sigma_ref >= 2.0 and 250 < b_ref <= 4000
    smaller = accounting.calibrate_noise_multiplier(8.0, 100, 1e-5, batch_size=b_ref - 25, num_examples=4000)
    assert smaller < 2.0  # the smallest such batch, up to the bisection's 1% resolution
    assert tan_search.choose_reference(8.0, 1e-5, 4000, 250, 100, min_ref_noise=0.0)[0] == 250


def test_tan_search_transfers_best_point_to_a_private_run_within_budget(tmp_path):
    out = tmp_path / "search"
    s = tan_search.run(dataset="digits", data=_digits(), target_epsilon=4.0, delta=1e-4, ref_batch_size=128,
                       ref_steps=4, sim_batch_size=32, lrs=(1.0,), ema_decays=(0.0, 0.9),
                       check_ranking=True, min_ref_noise=0.0, output_dir=str(out))
    n = len(_digits()[0])
    sigma_ref = accounting.calibrate_noise_multiplier(4.0, 4, 1e-4, batch_size=128, num_examples=n)
    assert s["sigma_ref"] == pytest.approx(sigma_ref)
    assert s["sim_noise_multiplier"] == pytest.approx(sigma_ref * 32 / 128)
    assert s["private_steps"] == 4 and s["private_epsilon"] <= 4.0
    # one training run per (lr, µ, K): the EMA decays share it
    assert s["compute_ratio"] == pytest.approx(128 * 4 / (32 * 4))
    assert s["ranking"]["pairs"] == 1
    assert 0.0 <= s["ranking"]["fraction"] <= 1.0 or math.isnan(s["ranking"]["fraction"])
    for f in ("grid.csv", "report.md", "search.png", "summary.json"):
        assert (out / f).stat().st_size > 0
    with open(out / "grid.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_batch_size_study_writes_csv_and_plot_at_constant_sigma_over_b(tmp_path):
    out = batch_size_study.run(dataset="digits", data=_digits(), batch_sizes=(16, 32), noise_per_example=0.01,
                               steps=2, optimizers=("dpsgd",), output_dir=str(tmp_path))
    assert [r["sigma_over_b"] for r in out["rows"]] == pytest.approx([0.01, 0.01])
    assert [r["noise_multiplier"] for r in out["rows"]] == pytest.approx([0.16, 0.32])
    assert os.path.getsize(out["csv"]) > 0 and os.path.getsize(out["png"]) > 0
