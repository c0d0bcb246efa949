"""Tests for models/dln.py: the DLN Keras model and the hyperbolic-entropy potential.

Run under both backends: ``KERAS_BACKEND=tensorflow pytest`` and ``KERAS_BACKEND=jax pytest``.
"""

import keras
import numpy as np
import pytest

from models.dln import (
    DiagonalLinearNetwork,
    hyperbolic_entropy,
    inverse_mirror_map,
    mirror_map,
    quarter_squared_error,
)


def _np(t):
    return keras.ops.convert_to_numpy(t)


def _sparse_regression(n=24, d=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype("float32")
    beta_star = np.zeros(d, "float32")
    beta_star[:3] = [1.0, -0.7, 0.5]
    return x, (x @ beta_star)[:, None]


@pytest.mark.parametrize("parametrization", ["w_pm", "uv"])
def test_beta_is_zero_at_init(parametrization):
    model = DiagonalLinearNetwork(7, alpha=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], parametrization=parametrization)
    np.testing.assert_array_equal(_np(model.beta), np.zeros(7))


def test_w_pm_init_is_alpha_and_uv_init_is_two_alpha_and_zero():
    w = DiagonalLinearNetwork(3, alpha=0.25)
    np.testing.assert_allclose([_np(v) for v in w.weights], [[0.25] * 3, [0.25] * 3])
    uv = DiagonalLinearNetwork(3, alpha=0.25, parametrization="uv")
    np.testing.assert_allclose([_np(v) for v in uv.weights], [[0.5] * 3, [0.0] * 3])


@pytest.mark.parametrize("parametrization", ["w_pm", "uv"])
def test_forward_equals_inner_product_with_beta(parametrization):
    rng = np.random.default_rng(1)
    model = DiagonalLinearNetwork(6, alpha=0.3, parametrization=parametrization)
    for v in model.weights:
        v.assign(rng.standard_normal(6).astype("float32"))
    x = rng.standard_normal((5, 6)).astype("float32")
    out = _np(model(x))
    assert out.shape == (5, 1)
    np.testing.assert_allclose(out[:, 0], x @ _np(model.beta), rtol=1e-5, atol=1e-6)
    first, second = (_np(v) for v in model.weights)
    expected = first**2 - second**2 if parametrization == "w_pm" else first * second
    np.testing.assert_allclose(_np(model.beta), expected, rtol=1e-6)


def test_mirror_map_is_the_gradient_of_hyperbolic_entropy():
    rng = np.random.default_rng(2)
    alpha = rng.uniform(0.05, 1.0, size=8)
    beta = rng.standard_normal(8) * 2.0
    eps = 1e-6
    numeric = np.array([
        (hyperbolic_entropy(beta + eps * e, alpha) - hyperbolic_entropy(beta - eps * e, alpha)) / (2 * eps)
        for e in np.eye(8)
    ])
    np.testing.assert_allclose(mirror_map(beta, alpha), numeric, rtol=1e-6, atol=1e-8)


def test_hyperbolic_entropy_matches_eq8_by_hand():
    # φ_α(β) = ¼ Σ [β arcsinh(β/(2α²)) − √(β² + 4α⁴)] at β = (1, 0), α = (0.5, 2):
    expected = 0.25 * ((np.arcsinh(1 / 0.5) - np.sqrt(1 + 4 * 0.5**4)) + (0.0 - np.sqrt(4 * 2.0**4)))
    assert hyperbolic_entropy([1.0, 0.0], [0.5, 2.0]) == pytest.approx(expected, rel=1e-12)


def test_hyperbolic_entropy_is_convex_and_minimal_at_zero():
    beta = np.linspace(-3, 3, 61)[:, None]
    phi = np.array([hyperbolic_entropy(b, 0.1) for b in beta])
    assert np.argmin(phi) == 30
    assert np.all(np.diff(phi, 2) > 0)


def test_inverse_mirror_map_round_trips():
    rng = np.random.default_rng(3)
    alpha = rng.uniform(0.01, 1.0, size=20)
    beta = rng.standard_normal(20) * 3
    np.testing.assert_allclose(inverse_mirror_map(mirror_map(beta, alpha), alpha), beta, rtol=1e-10, atol=1e-12)
    z = rng.standard_normal(20)
    np.testing.assert_allclose(mirror_map(inverse_mirror_map(z, alpha), alpha), z, rtol=1e-10, atol=1e-12)


def test_mirror_map_equals_quarter_log_ratio_of_the_two_layers():
    # With w₊ = α_t e^s, w₋ = α_t e^{-s}: β = 2α_t² sinh(2s), ∇φ_{α_t}(β) = ¼ log(w₊/w₋).
    rng = np.random.default_rng(4)
    wp, wm = rng.uniform(0.01, 2, 10), rng.uniform(0.01, 2, 10)
    np.testing.assert_allclose(mirror_map(wp**2 - wm**2, np.sqrt(wp * wm)), 0.25 * np.log(wp / wm), rtol=1e-10)


@pytest.mark.parametrize("parametrization", ["w_pm", "uv"])
def test_plain_sgd_fit_reduces_the_loss(parametrization):
    x, y = _sparse_regression()
    model = DiagonalLinearNetwork(x.shape[1], alpha=0.5, parametrization=parametrization)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss=quarter_squared_error)
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=4, epochs=5, shuffle=False, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    assert after < 0.5 * before


def test_uv_with_double_learning_rate_reproduces_w_pm_gd_exactly():
    x, y = _sparse_regression()
    betas = []
    for parametrization, lr in [("w_pm", 0.05), ("uv", 0.1)]:
        model = DiagonalLinearNetwork(x.shape[1], alpha=0.3, parametrization=parametrization)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr), loss=quarter_squared_error)
        model.fit(x, y, batch_size=len(x), epochs=20, shuffle=False, verbose=0)
        betas.append(_np(model.beta))
    np.testing.assert_allclose(betas[0], betas[1], rtol=1e-4, atol=1e-6)


def test_quarter_squared_error_is_a_quarter_of_mse():
    y, p = np.array([[1.0], [2.0]], "float32"), np.array([[0.0], [4.0]], "float32")
    np.testing.assert_allclose(_np(quarter_squared_error(y, p)), [0.25, 1.0])


@pytest.mark.parametrize("parametrization", ["w_pm", "uv"])
def test_save_and_load_round_trip(tmp_path, parametrization):
    x, y = _sparse_regression()
    model = DiagonalLinearNetwork(x.shape[1], alpha=[0.1 * (i + 1) for i in range(x.shape[1])],
                                  parametrization=parametrization)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss=quarter_squared_error)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "dln.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, DiagonalLinearNetwork)
    assert loaded.get_config()["parametrization"] == parametrization
    assert loaded.get_config()["alpha"] == model.get_config()["alpha"]
    np.testing.assert_allclose(_np(loaded.beta), _np(model.beta), rtol=1e-6)
    np.testing.assert_allclose(_np(loaded(x)), _np(model(x)), rtol=1e-5, atol=1e-6)


def test_from_config_round_trip():
    model = DiagonalLinearNetwork(4, alpha=0.2, parametrization="uv", name="dln")
    clone = DiagonalLinearNetwork.from_config(model.get_config())
    assert clone.get_config() == model.get_config()


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=0), "dim"),
    (dict(dim=3, alpha=0.0), "alpha"),
    (dict(dim=3, alpha=[0.1, 0.2]), "alpha"),
    (dict(dim=3, parametrization="relu"), "parametrization"),
])
def test_bad_arguments_fail_early_and_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiagonalLinearNetwork(**kwargs)
