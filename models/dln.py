"""Diagonal Linear Network (DLN) and its hyperbolic-entropy potential.

The DLN is the toy non-convex network of the implicit-bias paper
(Sander, Sylvestre, Durmus, "Implicit Bias in Noisy-SGD", AISTATS 2024,
https://arxiv.org/abs/2402.08344, §2.2 and §3.3; after Woodworth et al. 2020
and Pesme et al. 2021)::

    f(x) = <β, x>,    β = w₊² − w₋²  (elementwise),   w₊ = w₋ = α at init  ⇒  β₀ = 0.

Gradient flow on (w₊, w₋) is a mirror flow on β (paper §3.3)::

    d ∇φ_α(β_t) = −∇L(β_t) dt,

with the hyperbolic-entropy potential (Eq. 8)::

    φ_α(β) = ¼ Σ_i [ β_i·arcsinh(β_i / (2α_i²)) − √(β_i² + 4α_i⁴) ],
    ∇φ_α(β) = ¼ arcsinh(β / (2α²)),        (∇φ_α)⁻¹(z) = 2α² sinh(4z).

The ¼ is not a free normalisation: writing w₊ = α_t e^{s}, w₋ = α_t e^{−s}
gives β = 2α_t² sinh(2s) and ∇φ_{α_t}(β) = s/2 = ¼ log(w₊/w₋), so for *any*
loss L, gradient flow ẇ± = −∇_{w±}L = ∓2 w±⊙∇_βL gives d∇φ_α(β)/dt = −∇_βL
exactly. The paper's potential therefore pairs with the w± parametrisation and
the loss written as a function of β, whatever its constant in front.

This module holds the Keras model (backend-neutral ``keras.ops``), its
ghost-norm rule (``tan_keras.ghost.register_ghost_norm``) and the pure numpy
potential functions; it imports no backend.
"""

import keras
import numpy as np
from keras import ops

from tan_keras.ghost import positions, register_ghost_norm, sq_norms_from

PARAMETRIZATIONS = ("w_pm", "uv")


def _as_alpha_array(alpha, dim):
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.ndim == 0:
        alpha = np.full((dim,), float(alpha))
    if alpha.shape != (dim,):
        raise ValueError(f"`alpha` must be a scalar or have shape ({dim},), got shape {alpha.shape}.")
    if not np.all(np.isfinite(alpha)) or np.any(alpha <= 0):
        raise ValueError(f"`alpha` (init scale) must be finite and > 0, got {alpha!r}.")
    return alpha


@keras.saving.register_keras_serializable(package="tan_keras")
class DiagonalLinearNetwork(keras.Model):
    """Diagonal linear network ``x ↦ <β, x>`` with a two-layer diagonal parametrisation.

    Parametrisations:

    * ``"w_pm"`` (the paper's): ``β = w₊² − w₋²`` with ``w₊ = w₋ = α`` at init.
      Plain gradient flow from here converges to ``argmin_{Xβ=y} φ_α(β)``
      (Eq. 8, hyperbolic entropy; see :func:`hyperbolic_entropy`).
    * ``"uv"``: ``β = u ⊙ v`` with ``u = 2α``, ``v = 0`` at init. This is the
      same network in the rotated coordinates ``u = w₊ + w₋``, ``v = w₊ − w₋``
      (then ``u⊙v = w₊² − w₋²``), so it has the *same* implicit bias φ_α. The
      rotation is orthogonal up to a factor √2, so GD on ``(u, v)`` with
      learning rate ``2γ`` reproduces GD on ``(w₊, w₋)`` with ``γ`` exactly.
      (The other common choice, ``u = √2·α``, ``v = 0``, is the w± network at
      scale ``α/√2``: its implicit bias is φ_{α/√2}.)

    Args:
      dim: input dimension d.
      alpha: init scale α > 0, a scalar or a length-``dim`` vector.
      parametrization: ``"w_pm"`` (default) or ``"uv"``.

    The output has shape ``(batch, 1)``. :attr:`beta` returns β as a tensor.

    .. warning:: Plain Keras losses are means of per-example losses. The
       paper's DLN loss is ``L(β) = (1/4n) Σ_i (<β, x_i> − y_i)²`` (the
       normalisation that matches its ``∇L(β) = ½ X̄ᵀr``), i.e. ``¼·MSE``:
       compile with ``loss=quarter_squared_error`` (or ``"mse"`` and a
       learning rate divided by 4) to take the paper's step size γ as is.
    """

    def __init__(self, dim, alpha=0.1, parametrization="w_pm", **kwargs):
        super().__init__(**kwargs)
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"`dim` must be a positive int, got {dim!r}.")
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"`parametrization` must be one of {PARAMETRIZATIONS}, got {parametrization!r}.")
        self.dim = int(dim)
        self.alpha = float(alpha) if np.ndim(alpha) == 0 else [float(a) for a in np.ravel(alpha)]
        self.parametrization = parametrization
        alpha_vec = _as_alpha_array(alpha, self.dim)
        if parametrization == "w_pm":
            first, second, init_first, init_second = "w_plus", "w_minus", alpha_vec, alpha_vec
        else:
            first, second, init_first, init_second = "u", "v", 2.0 * alpha_vec, np.zeros_like(alpha_vec)
        self._first = self.add_weight(shape=(self.dim,), initializer=_constant(init_first), name=first)
        self._second = self.add_weight(shape=(self.dim,), initializer=_constant(init_second), name=second)

    @property
    def beta(self):
        """The linear predictor β (shape ``(dim,)``) as a backend tensor."""
        if self.parametrization == "w_pm":
            return ops.square(self._first) - ops.square(self._second)
        return self._first * self._second

    def call(self, inputs):
        return ops.matmul(inputs, ops.expand_dims(ops.cast(self.beta, inputs.dtype), -1))

    def get_config(self):
        config = super().get_config()
        config.update({"dim": self.dim, "alpha": self.alpha, "parametrization": self.parametrization})
        return config


def diagonal_linear_network_per_example_grads(layer, inputs, output_grad):
    """DLN ``z = <β, x>``: ``∇β_i = g_i x_i``, then the chain rule through β's parametrization.

    ``β = w₊² − w₋²`` gives ``∇w₊ = 2w₊ ⊙ ∇β`` and ``∇w₋ = −2w₋ ⊙ ∇β``;
    ``β = u ⊙ v`` gives ``∇u = v ⊙ ∇β`` and ``∇v = u ⊙ ∇β``.
    """
    x = positions(ops.cast(inputs, "float32"), layer.dim)
    g = positions(ops.cast(output_grad, "float32"), 1)
    beta_grad = ops.sum(x * g, axis=1)  # (B, d)
    first, second = ops.cast(layer._first, "float32"), ops.cast(layer._second, "float32")
    if layer.parametrization == "w_pm":
        first_scale, second_scale = 2.0 * first, -2.0 * second
    else:
        first_scale, second_scale = second, first
    pairs = []
    if layer._first.trainable:
        pairs.append((layer._first, beta_grad * first_scale))
    if layer._second.trainable:
        pairs.append((layer._second, beta_grad * second_scale))
    return pairs


register_ghost_norm(DiagonalLinearNetwork, per_example_grads=diagonal_linear_network_per_example_grads,
                    views=True)(
    sq_norms_from(diagonal_linear_network_per_example_grads))


class _constant(keras.initializers.Initializer):
    """Initializer broadcasting a fixed (possibly per-coordinate) vector."""

    def __init__(self, value):
        self.value = [float(v) for v in np.ravel(value)]

    def __call__(self, shape, dtype=None):
        return ops.reshape(ops.convert_to_tensor(self.value, dtype=dtype), shape)

    def get_config(self):
        return {"value": self.value}


@keras.saving.register_keras_serializable(package="tan_keras")
def quarter_squared_error(y_true, y_pred):
    """Per-example ``¼ (y_pred − y)²``: Keras's mean of it is the paper's DLN loss (1/4n) Σ r_i²."""
    y_true = ops.cast(y_true, y_pred.dtype)
    return 0.25 * ops.mean(ops.square(y_pred - y_true), axis=-1)


# --------------------------------------------------------------------------------------
# Potential functions (pure numpy, float64).
# --------------------------------------------------------------------------------------


def hyperbolic_entropy(beta, alpha):
    """φ_α(β) = ¼ Σ_i [β_i·arcsinh(β_i/(2α_i²)) − √(β_i² + 4α_i⁴)]  (paper Eq. 8).

    Pesme et al. (2021) add the constant ``+2α_i²`` per coordinate so that
    φ_α(0) = 0; the paper (and this function) drop it: it does not change the
    argmin or the gradient. ``alpha`` is a scalar or broadcasts against ``beta``.
    """
    beta = np.asarray(beta, dtype=np.float64)
    a2 = np.square(np.asarray(alpha, dtype=np.float64))
    return 0.25 * np.sum(beta * np.arcsinh(beta / (2.0 * a2)) - np.sqrt(np.square(beta) + 4.0 * np.square(a2)), axis=-1)


def mirror_map(beta, alpha):
    """∇φ_α(β) = ¼ arcsinh(β / (2α²)), elementwise (the derivative of Eq. 8)."""
    beta = np.asarray(beta, dtype=np.float64)
    return 0.25 * np.arcsinh(beta / (2.0 * np.square(np.asarray(alpha, dtype=np.float64))))


def inverse_mirror_map(z, alpha):
    """(∇φ_α)⁻¹(z) = 2α² sinh(4z), elementwise; also ∇φ_α* (the convex conjugate's gradient)."""
    z = np.asarray(z, dtype=np.float64)
    return 2.0 * np.square(np.asarray(alpha, dtype=np.float64)) * np.sinh(4.0 * z)
