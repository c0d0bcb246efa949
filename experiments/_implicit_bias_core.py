"""Vectorised simulations for the implicit-bias paper (Sander, Sylvestre, Durmus, AISTATS 2024).

Shared by ``experiments/dln_implicit_bias.py`` (§3.3–3.4, Figs. 3–7) and
``experiments/linear_least_squares.py`` (§3.2, Eq. 15 and Theorem 1).

Long runs (10⁵–10⁶ iterations over tens of chains) are a ``jax.lax`` loop under
``jax.jit``, ``jax.vmap``-ed over chains, in float64 (``jax.enable_x64`` is
switched on only inside these functions). Randomness is drawn per block of
``BLOCK`` = 100 steps from ``fold_in(fold_in(fold_in(PRNGKey(seed), chain), block),
stream)``, so chain ``c`` of a run is the same whichever other chains (and noise
streams) are simulated beside it.

Conventions (see ``docs/implicit_bias.md`` for the derivations):

* DLN loss ``L(β) = (1/4n) Σ_i (<β, x_i> − y_i)²`` so that ``∇_βL = ½ X̄ᵀr``
  (paper §3.3, ``X̄ = X/√n``, ``r = X̄(β − β*)``) and ``∇_{w±}L = ±(X̄ᵀr)⊙w±``
  (drift of Eq. 19). Per-example ``L_i = ¼ r_i²``.
* Paper's Noisy-SGD (Eq. 18): the noise enters the *β-gradient* as
  ``σ√L(β_t)·Z_t`` with one ``Z_t ~ N(0, I_d)``; by the chain rule it is
  ``±γσ_t Z_t ⊙ w±`` on ``w±`` with ``σ_t = 2σ√L``. The shared Z (opposite signs
  on w₊ and w₋) is what keeps ``w₊⊙w₋ = α_t²`` deterministic in the SDE limit,
  i.e. what makes Prop. 1's single potential φ_{α_t} and Eq. 21 hold.
* Keras-optimizer Noisy-SGD (Eq. 11, tan_keras.NoisySGD): independent additive
  ``N(0, σ²/B² I)`` on the mean minibatch gradient of *each* parameter (w₊, w₋).
* SDE time: one step of size γ is ``dt = γ``, so ``∫₀ᵗ L ds ≈ γ Σ_k L(β_k)``.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SparseRegression:
    """Noiseless sparse regression ``y = X β*`` (paper §3.4, after Pesme et al. 2021)."""

    x: np.ndarray
    y: np.ndarray
    beta_star: np.ndarray

    def __post_init__(self):
        n, d = self.x.shape
        if self.y.shape != (n,) or self.beta_star.shape != (d,):
            raise ValueError(f"shapes: x {self.x.shape}, y {self.y.shape}, beta_star {self.beta_star.shape}")

    @property
    def n(self):
        return self.x.shape[0]

    @property
    def d(self):
        return self.x.shape[1]

    @property
    def step_size(self):
        """γ = 1 / (1.3 ‖X̄X̄ᵀ‖₂), the paper's step size for all DLN methods (§3.4)."""
        return dln_step_size(self.x)


def make_sparse_regression(n=40, d=100, sparsity=5, beta_star_sq_norm=5.5, seed=0, values="gaussian"):
    """x_i ~ N(0, I_d), y = Xβ*, with β* supported on ``sparsity`` random coordinates, ‖β*‖² = beta_star_sq_norm.

    The paper does not give β*'s non-zero values. ``values="gaussian"`` draws
    them N(0, 1) and rescales them so that ‖β*‖² = 5.5, which reproduces Fig. 3's
    starting point ‖β₀ − β*‖² = ‖β*‖² ≈ 5.5; ``values="sign"`` uses equal
    magnitudes ±√(5.5/s) (the largest ‖β*‖₁ for that ‖β*‖₂, hence the largest
    curvature at the solution: SGD at the paper's γ diverges more often).
    """
    if values not in ("gaussian", "sign"):
        raise ValueError(f"`values` must be 'gaussian' or 'sign', got {values!r}.")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    support = rng.choice(d, size=sparsity, replace=False)
    if values == "gaussian":
        v = rng.standard_normal(sparsity)
    else:
        v = rng.choice([-1.0, 1.0], size=sparsity)
    beta_star = np.zeros(d)
    beta_star[support] = v * np.sqrt(beta_star_sq_norm / np.sum(v**2))
    return SparseRegression(x=x, y=x @ beta_star, beta_star=beta_star)


def dln_step_size(x):
    n = x.shape[0]
    return 1.0 / (1.3 * np.linalg.norm(x @ x.T / n, 2))


def dln_loss(beta, x, y):
    """L(β) = (1/4n) ‖Xβ − y‖² (batched over leading axes of ``beta``)."""
    r = np.asarray(beta) @ x.T - y
    return 0.25 * np.mean(np.square(r), axis=-1)


def log_record_steps(iterations, num=200, available=None):
    """About ``num`` log-spaced record points in [0, iterations] (always 0 and T).

    With ``available`` (sorted steps that were recorded), each target is snapped
    to the nearest available step.
    """
    targets = np.concatenate([[0], np.geomspace(1, iterations, num)])
    if available is None:
        steps = np.round(targets).astype(np.int64)
    else:
        available = np.asarray(available)
        pos = np.clip(np.searchsorted(available, targets), 1, len(available) - 1)
        left, right = available[pos - 1], available[pos]
        steps = np.where(targets - left <= right - targets, left, right)
    return np.unique(np.concatenate([steps, [iterations]])).astype(np.int64)


# ---------------------------------------------------------------------------------------
# DLN: GD / SGD / Noisy-SGD (paper Eq. 18) / additive Noisy-SGD (Eq. 11)
# ---------------------------------------------------------------------------------------

#: Steps whose randomness is drawn in one call: one threefry ``bits`` call per block is ~4x cheaper
#: to run, and much cheaper to compile, than per-step ``split``/``randint``/``normal``.
BLOCK = 100


def _flat_bits(key, shape):
    # Drawn 1-D then reshaped: multi-dimensional threefry draws take XLA:CPU 10-20x longer to compile.
    return jax.random.bits(key, (int(np.prod(shape)),), jnp.uint32).reshape(shape)


def _uniform_to_normal(bits):
    """uint32 bits → N(0, 1) float32 by inversion: z = √2·erfinv(u), u = (k + ½)/2²² − 1, k = bits >> 9.

    Every step is exact in float32 (k + ½ < 2²³), so u ∈ [−1 + 2⁻²³, 1 − 2⁻²³]: never ±1, z never ±inf.
    """
    u = ((bits >> 9).astype(jnp.float32) + 0.5) * jnp.float32(2.0**-22) - 1.0
    return jnp.sqrt(jnp.float32(2.0)) * jax.lax.erf_inv(u)


def _block_randomness(key, block, n, d, batch_size, *, use_idx=True, use_mult=True, use_add=True):
    """Randomness of steps [block·BLOCK, (block+1)·BLOCK): indices (BLOCK, B), Z, Z₊, Z₋ (BLOCK, d).

    Each stream has its own key (``fold_in(fold_in(key, block), stream)``), so a
    stream's values do not depend on which other streams a run uses. Indices are
    uniform with replacement (``bits mod n``; the modulo bias is below n/2³² ≈ 10⁻⁸).
    Unused streams are zeros (and not generated).
    """
    block_key = jax.random.fold_in(key, block)

    def stream(k, width):
        return _flat_bits(jax.random.fold_in(block_key, k), (BLOCK, width))

    zeros = jnp.zeros((BLOCK, d), jnp.float32)
    idx = ((stream(0, batch_size) % jnp.uint32(n)).astype(jnp.int32) if use_idx
           else jnp.zeros((BLOCK, batch_size), jnp.int32))
    z = _uniform_to_normal(stream(1, d)) if use_mult else zeros
    zp = _uniform_to_normal(stream(2, d)) if use_add else zeros
    zm = _uniform_to_normal(stream(3, d)) if use_add else zeros
    return idx, z, zp, zm


def chain_key(seed, chain):
    return jax.random.fold_in(jax.random.PRNGKey(seed), chain)


@functools.partial(
    jax.jit, static_argnames=("num_blocks", "full_batch", "batch_size", "use_mult", "use_add", "independent_z"))
def _dln_chains(x, y, beta_star, alpha, gamma, keys, sigma, add_sigma, *, num_blocks, full_batch, batch_size,
                use_mult, use_add, independent_z=False):
    n, d = x.shape
    b_eff = n if full_batch else batch_size

    def one_chain(key, sig, add_sig):
        def observe(wp, wm):
            beta = wp * wp - wm * wm
            r = x @ beta - y
            return jnp.stack([jnp.sum(jnp.square(beta - beta_star)), 0.25 * jnp.mean(r * r)])

        def step(carry, inputs):
            (wp, wm, acc), first, block = carry
            t, idx, z, zp, zm = inputs
            beta = wp * wp - wm * wm
            r = x @ beta - y
            loss = 0.25 * jnp.mean(r * r)
            # Every step of block 0 is recorded (for log-scale plots), later blocks only at their start.
            obs = jnp.stack([jnp.sum(jnp.square(beta - beta_star)), loss])
            first = first.at[t].set(jnp.where(block == 0, obs, first[t]))
            if full_batch:
                g = x.T @ r / (2.0 * n)
            else:
                g = x[idx].T @ r[idx] / (2.0 * batch_size)
            g_plus = g_minus = g
            if use_mult:
                g_plus = g + sig * jnp.sqrt(loss) * z
                # Ablation only: an independent draw for w₋ breaks w₊⊙w₋ = α_t² (Prop. 1).
                g_minus = g + sig * jnp.sqrt(loss) * zp if independent_z else g_plus
            wp_new = wp - 2.0 * gamma * wp * g_plus
            wm_new = wm + 2.0 * gamma * wm * g_minus
            if use_add:
                wp_new = wp_new - gamma * (add_sig / b_eff) * zp
                wm_new = wm_new - gamma * (add_sig / b_eff) * zm
            return ((wp_new, wm_new, acc + loss), first, block), None

        def block_body(carry, block):
            state, first = carry
            obs = observe(state[0], state[1])
            noise = _block_randomness(key, block, n, d, batch_size, use_idx=not full_batch, use_mult=use_mult,
                                      use_add=use_add or independent_z)
            (state, first, _), _ = jax.lax.scan(step, (state, first, block), (jnp.arange(BLOCK),) + noise)
            return (state, first), obs

        w0 = jnp.broadcast_to(alpha, (d,)).astype(x.dtype)
        carry = ((w0, w0, jnp.zeros((), x.dtype)), jnp.zeros((BLOCK, 2), x.dtype))
        (state, first), starts = jax.lax.scan(block_body, carry, jnp.arange(num_blocks))
        records = jnp.concatenate([first, starts[1:], observe(state[0], state[1])[None]])
        return records[:, 0], records[:, 1], state[0], state[1], state[2]

    return jax.vmap(one_chain)(keys, sigma, add_sigma)


def dln_recorded_steps(iterations):
    """Steps :func:`simulate_dln` observes: 0, 1, …, BLOCK−1, then every BLOCK-th step, and T."""
    return np.concatenate([np.arange(BLOCK), np.arange(BLOCK, iterations + 1, BLOCK)]).astype(np.int64)


def simulate_dln(problem, *, alpha, sigma=0.0, additive_sigma=0.0, full_batch=False, batch_size=1, iterations,
                 chains=None, seed=0, step_size=None, independent_z=False):
    """Runs DLN chains in parallel and returns their trajectories.

    Each chain c starts at ``w₊ = w₋ = α`` and takes ``iterations`` steps of::

        g_β = ∇_βL_B(β)  [+ σ_c √L(β_t) Z_t]                         (Eq. 18: "mult")
        w₊ ← w₊ − 2γ w₊⊙g_β  [− γ(σ_add,c/B) Z₊]                    (Eq. 11: "additive")
        w₋ ← w₋ + 2γ w₋⊙g_β  [− γ(σ_add,c/B) Z₋]

    where ``L_B`` is the mean of ``L_i = ¼r_i²`` over a batch of ``batch_size``
    indices drawn uniformly with replacement (``full_batch=True``: all n, i.e. GD).

    Args:
      problem: a :class:`SparseRegression`.
      alpha: init scale, scalar or (d,).
      sigma, additive_sigma: per-chain noise levels, scalars or shape (chains,).
      iterations: a multiple of ``BLOCK`` (= 100).
      chains: chain indices (ints) used to derive each chain's PRNG key; default
        ``range(len(sigma))``. Equal indices share minibatch indices and Z draws.
      step_size: γ; default the paper's ``1/(1.3‖X̄X̄ᵀ‖₂)``.
      independent_z: ablation: draw w₋'s Eq. 18 noise independently of w₊'s
        (the paper's notation Z_{t,±} is ambiguous; Prop. 1 needs one shared Z).

    Returns:
      dict with ``steps`` (J,) (see :func:`dln_recorded_steps`), ``dist2`` =
      ‖β_t − β*‖² and ``loss`` = L(β_t) (C, J), final ``w_plus``, ``w_minus``,
      ``beta`` (C, d), and ``loss_sum`` = Σ_{k<T} L(β_k) (C,), the discrete ∫L / γ.
      Diverged chains hold inf/NaN.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < BLOCK or (
            iterations % BLOCK):
        raise ValueError(f"`iterations` must be a positive multiple of {BLOCK}, got {iterations!r}.")
    sigma = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
    additive_sigma = np.atleast_1d(np.asarray(additive_sigma, dtype=np.float64))
    num = max(sigma.size, additive_sigma.size, 1 if chains is None else len(chains))
    sigma = np.broadcast_to(sigma, (num,))
    additive_sigma = np.broadcast_to(additive_sigma, (num,))
    chains = np.arange(num) if chains is None else np.asarray(chains)
    gamma = problem.step_size if step_size is None else float(step_size)
    with jax.enable_x64(True):
        keys = jax.vmap(lambda c: chain_key(seed, c))(jnp.asarray(chains))
        with np.errstate(all="ignore"):
            dist2, loss, wp, wm, total = _dln_chains(
                jnp.asarray(problem.x), jnp.asarray(problem.y), jnp.asarray(problem.beta_star),
                jnp.asarray(alpha, jnp.float64), jnp.asarray(gamma, jnp.float64), keys,
                jnp.asarray(sigma), jnp.asarray(additive_sigma), num_blocks=int(iterations) // BLOCK,
                full_batch=bool(full_batch), batch_size=int(batch_size), use_mult=bool(np.any(sigma != 0)),
                use_add=bool(np.any(additive_sigma != 0)), independent_z=bool(independent_z),
            )
        out = {k: np.asarray(v) for k, v in dict(dist2=dist2, loss=loss, w_plus=wp, w_minus=wm, loss_sum=total).items()}
    out["steps"] = dln_recorded_steps(int(iterations))
    with np.errstate(all="ignore"):
        out["beta"] = out["w_plus"] ** 2 - out["w_minus"] ** 2
    out["gamma"] = gamma
    return out


def dln_reference_run(problem, *, alpha, iterations, sigma=0.0, additive_sigma=0.0, full_batch=False, batch_size=1,
                      seed=0, chain=0, step_size=None, indices=None):
    """Plain-numpy loop of the same update as :func:`simulate_dln` for one chain (a test oracle).

    Draws the same randomness as chain ``chain`` of ``simulate_dln(seed=seed)``;
    ``indices`` (iterations, batch_size) overrides the minibatch indices.
    Returns the list of β_t for t = 0..iterations.
    """
    gamma = problem.step_size if step_size is None else float(step_size)
    x, y, n, d = problem.x, problem.y, problem.n, problem.d
    wp = np.broadcast_to(np.asarray(alpha, np.float64), (d,)).copy()
    wm = wp.copy()
    b_eff = n if full_batch else batch_size
    betas = [wp**2 - wm**2]
    with jax.enable_x64(True):
        key = chain_key(seed, chain)
        draw = jax.jit(functools.partial(_block_randomness, n=n, d=d, batch_size=batch_size))
        noise = None
        for t in range(iterations):
            if t % BLOCK == 0:
                noise = [np.asarray(a, np.float64) for a in draw(key, t // BLOCK)]
            idx, z, zp, zm = (a[t % BLOCK] for a in noise)
            idx = idx.astype(np.int64) if indices is None else np.asarray(indices[t])
            beta = wp**2 - wm**2
            r = x @ beta - y
            loss = 0.25 * np.mean(r**2)
            g = x.T @ r / (2.0 * n) if full_batch else x[idx].T @ r[idx] / (2.0 * batch_size)
            g = g + sigma * np.sqrt(loss) * z
            wp, wm = wp - 2 * gamma * wp * g, wm + 2 * gamma * wm * g
            wp, wm = wp - gamma * additive_sigma / b_eff * zp, wm - gamma * additive_sigma / b_eff * zm
            betas.append(wp**2 - wm**2)
    return betas


# ---------------------------------------------------------------------------------------
# Effective initialisation and the potential's minimiser over interpolators
# ---------------------------------------------------------------------------------------


def effective_alpha_eq21(alpha, x, *, gamma, sigma, loss_sum, batch_size=1):
    """α∞ by Eq. 21: α·exp(−2γσ²∫L)·exp(−2γ diag(X̄ᵀX̄)∫L), with ∫L = γ·Σ_k L(β_k).

    For a batch of B indices the SGD-noise term is divided by B (its covariance
    is 1/B of B = 1's); the paper uses B = 1. ``loss_sum`` may be (C,); returns (C, d).
    """
    n = x.shape[0]
    integral = gamma * np.asarray(loss_sum, dtype=np.float64)[..., None]
    diag = np.sum(np.square(x), axis=0) / n
    return np.asarray(alpha) * np.exp(-2.0 * gamma * (sigma**2 + diag / batch_size) * integral)


def effective_alpha_exact(w_plus, w_minus):
    """α_t = √|w₊⊙w₋|: the scale for which β_t = (∇φ_{α_t})⁻¹(¼ log|w₊/w₋|) holds exactly.

    (A large step can flip a weight's sign, 1 − 2γg < 0; β = w₊² − w₋² only sees |w±|.)
    """
    return np.sqrt(np.abs(np.asarray(w_plus) * np.asarray(w_minus)))


def min_potential_interpolator(x, y, alpha, *, tol=1e-11, max_iter=500):
    """β*_α = argmin_{Xβ=y} φ_α(β) (paper Eq. 9), by Newton's method on the dual.

    KKT: ∇φ_α(β) = Xᵀλ, so β(λ) = 2α² sinh(4Xᵀλ), and λ minimises the smooth,
    strictly convex dual  D(λ) = Σ_j (α_j²/2) cosh(4(Xᵀλ)_j) − <λ, y>  (φ_α* is
    Σ α²cosh(4z)/2), whose gradient is Xβ(λ) − y. Newton with a trust region in
    z = Xᵀλ and backtracking, from λ = 0, until ‖Xβ − y‖ ≤ tol·(1+‖y‖). Float64.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    a2 = np.broadcast_to(np.square(np.asarray(alpha, np.float64)), (x.shape[1],))
    lam = np.zeros(x.shape[0])

    def dual(lam):
        with np.errstate(over="ignore"):
            return np.sum(0.5 * a2 * np.cosh(4.0 * (x.T @ lam))) - lam @ y

    def residual(lam):
        with np.errstate(over="ignore", invalid="ignore"):
            return x @ (2.0 * a2 * np.sinh(4.0 * (x.T @ lam))) - y

    value = dual(lam)
    for _ in range(max_iter):
        z = x.T @ lam
        beta = 2.0 * a2 * np.sinh(4.0 * z)
        grad = x @ beta - y
        if np.linalg.norm(grad) <= tol * (1.0 + np.linalg.norm(y)):
            return beta
        hess = (x * (8.0 * a2 * np.cosh(4.0 * z))) @ x.T
        direction = -scipy.linalg.solve(hess, grad, assume_a="pos")
        # Trust region in z = Xᵀλ: cosh grows like e^{4|z|}, so cap each move at |4Δz| ≤ 2.
        largest = np.max(np.abs(4.0 * (x.T @ direction)))
        if largest > 2.0:
            direction *= 2.0 / largest
        step, decrement = 1.0, grad @ direction
        while True:
            new_value = dual(lam + step * direction)
            # Armijo on D, or (near the optimum, where D's decrease is below rounding) a smaller ‖∇D‖.
            if np.isfinite(new_value) and (
                new_value <= value + 1e-4 * step * decrement
                or np.linalg.norm(residual(lam + step * direction)) < np.linalg.norm(grad)
            ):
                break
            step *= 0.5
            if step < 1e-10:
                raise RuntimeError("min_potential_interpolator: line search failed.")
        lam, value = lam + step * direction, new_value
    raise RuntimeError(f"min_potential_interpolator did not converge: ‖Xβ−y‖ = {np.linalg.norm(grad):.3e}")


# ---------------------------------------------------------------------------------------
# Linear least squares (§3.2)
# ---------------------------------------------------------------------------------------


def lls_sgd_noise_covariance(x, y):
    """Exact SGD-noise covariance at θ_LS for L = (1/2n)‖Xθ−y‖², batch 1: (1/n) Σ r_i² x_i x_iᵀ."""
    theta_ls = np.linalg.lstsq(x, y, rcond=None)[0]
    r = x @ theta_ls - y
    return (x * (r**2)[:, None]).T @ x / x.shape[0]


def lls_epsilon_sq(x, y):
    """ϵ² of Eq. 12: the homoscedastic fit  (1/n)Σ r_i² x_ix_iᵀ ≈ ϵ² X̄ᵀX̄, i.e. ϵ² = (1/n)‖Xθ_LS − y‖²."""
    theta_ls = np.linalg.lstsq(x, y, rcond=None)[0]
    return float(np.mean(np.square(x @ theta_ls - y)))


def lls_eq15_covariance(x, y, *, gamma, sigma, sigma_factor=0.5):
    """(γϵ²/2) I + c·σ² (X̄ᵀX̄)⁻¹; the paper prints c = 1/4, the OU Lyapunov equation of Eq. 14 gives c = 1/2."""
    n, d = x.shape
    h = x.T @ x / n
    return gamma * lls_epsilon_sq(x, y) / 2.0 * np.eye(d) + sigma_factor * sigma**2 * np.linalg.inv(h)


def lls_discrete_stationary_covariance(x, y, *, gamma, noise_std):
    """Exact stationary covariance of batch-1 SGD + N(0, s²I) gradient noise (no SDE approximation).

    e_{k+1} = (I − γ x_i x_iᵀ) e_k − γ r_i x_i − γ s Z_k with e = θ − θ_LS; since
    E e = 0 at stationarity the cross terms vanish and Σ solves the linear system
    Σ = E_i[(I − γx_ix_iᵀ) Σ (I − γx_ix_iᵀ)] + γ²((1/n)Σ r_i² x_ix_iᵀ + s² I).
    """
    n, d = x.shape
    op = np.zeros((d * d, d * d))
    for xi in x:
        a = np.eye(d) - gamma * np.outer(xi, xi)
        op += np.kron(a, a) / n
    rhs = gamma**2 * (lls_sgd_noise_covariance(x, y) + noise_std**2 * np.eye(d))
    return np.linalg.solve(np.eye(d * d) - op, rhs.reshape(-1)).reshape(d, d)


def _lls_block_noise(key, block, num_chains, n, d):
    bits = _flat_bits(jax.random.fold_in(key, block), (BLOCK, num_chains, d + 1))
    return (bits[..., 0] % jnp.uint32(n)).astype(jnp.int32), _uniform_to_normal(bits[..., 1:])


@functools.partial(jax.jit, static_argnames=("num_chains", "burn_in_blocks", "num_blocks"))
def _lls_stationary(x, y, theta_ls, gamma, noise_std, key, *, num_chains, burn_in_blocks, num_blocks):
    n, d = x.shape

    def step(theta, noise):
        idx, z = noise
        xi = x[idx]
        r = jnp.sum(xi * theta, axis=1) - y[idx]
        return theta - gamma * (r[:, None] * xi + noise_std * z), None

    def block(b, carry):
        theta, second = carry
        theta = jax.lax.scan(step, theta, _lls_block_noise(key, b, num_chains, n, d))[0]
        e = theta - theta_ls
        return theta, second + jnp.where(b >= burn_in_blocks, 1.0, 0.0) * (e[:, :, None] * e[:, None, :])

    carry = (jnp.broadcast_to(theta_ls, (num_chains, d)), jnp.zeros((num_chains, d, d)))
    _, second = jax.lax.fori_loop(0, burn_in_blocks + num_blocks, block, carry)
    return second / num_blocks


def simulate_lls_stationary(x, y, *, gamma, noise_std, num_chains, burn_in, num_steps, seed=0):
    """Empirical stationary covariance of batch-1 Noisy-SGD on L = (1/2n)‖Xθ−y‖² (n > d).

    Chains start at θ_LS; after ``burn_in`` steps, every BLOCK-th iterate of the
    next ``num_steps`` is accumulated (θ_k decorrelates over ~1/(γλ_min) steps,
    so this thinning costs little accuracy). Both counts are rounded up to BLOCK.
    Returns (pooled covariance (d, d), per-chain covariances (C, d, d)); the
    per-chain spread gives a Monte-Carlo standard error.
    """
    theta_ls = np.linalg.lstsq(x, y, rcond=None)[0]
    with jax.enable_x64(True):
        per_chain = np.asarray(_lls_stationary(
            jnp.asarray(x), jnp.asarray(y), jnp.asarray(theta_ls), jnp.asarray(gamma, jnp.float64),
            jnp.asarray(noise_std, jnp.float64), jax.random.PRNGKey(seed), num_chains=int(num_chains),
            burn_in_blocks=-(-int(burn_in) // BLOCK), num_blocks=-(-int(num_steps) // BLOCK)))
    return per_chain.mean(axis=0), per_chain


@functools.partial(jax.jit, static_argnames=("num_chains", "num_blocks"))
def _lls_coupled(x, y, gamma, sigma, key, *, num_chains, num_blocks):
    n, d = x.shape

    def loss(theta):
        r = theta @ x.T - y
        return 0.5 * jnp.mean(r * r, axis=1)

    def observe(theta, beta, acc):
        return jnp.stack([jnp.sum(jnp.square(theta - beta), axis=1), acc, loss(beta)])

    def step(carry, inputs):
        (theta, beta, acc), first, block = carry
        t, idx, z = inputs
        first = first.at[t].set(jnp.where(block == 0, observe(theta, beta, acc), first[t]))
        xi = x[idx]
        loss_beta = loss(beta)
        r_theta = jnp.sum(xi * theta, axis=1) - y[idx]
        r_beta = jnp.sum(xi * beta, axis=1) - y[idx]
        state = (theta - gamma * r_theta[:, None] * xi,
                 beta - gamma * (r_beta[:, None] * xi + sigma * jnp.sqrt(loss_beta)[:, None] * z),
                 acc + loss_beta)
        return (state, first, block), None

    def block_body(carry, block):
        state, first = carry
        obs = observe(*state)
        (state, first, _), _ = jax.lax.scan(
            step, (state, first, block), (jnp.arange(BLOCK),) + _lls_block_noise(key, block, num_chains, n, d))
        return (state, first), obs

    zero = jnp.zeros((num_chains, d))
    carry = ((zero, zero, jnp.zeros(num_chains)), jnp.zeros((BLOCK, 3, num_chains)))
    (state, first), starts = jax.lax.scan(block_body, carry, jnp.arange(num_blocks))
    records = jnp.concatenate([first, starts[1:], observe(*state)[None]])
    return records[:, 0], records[:, 1], records[:, 2]


def simulate_lls_coupled(x, y, *, gamma, sigma, num_chains, iterations, seed=0):
    """SGD θ_k and Noisy-SGD β_k from 0 with the same indices i_k (over-parametrised, d > n).

    θ_{k+1} = θ_k − γ x_i(<x_i,θ_k> − y_i),
    β_{k+1} = β_k − γ [x_i(<x_i,β_k> − y_i) + σ√L(β_k) Z_k],   L = (1/2n)‖X·−y‖².

    The added noise γσ√L Z is the Euler step of Eq. 20's √(γL)σ dB̃ over dt = γ.
    ``iterations`` is a multiple of BLOCK. Returns ``steps`` (J,) (as
    :func:`dln_recorded_steps`) and (J, C) arrays: η_k = ‖θ_k − β_k‖²,
    Σ_{j<k} L(β_j), and L(β_k).
    """
    if iterations < BLOCK or iterations % BLOCK:
        raise ValueError(f"`iterations` must be a positive multiple of {BLOCK}, got {iterations!r}.")
    with jax.enable_x64(True):
        out = _lls_coupled(jnp.asarray(x), jnp.asarray(y), jnp.asarray(gamma, jnp.float64),
                           jnp.asarray(sigma, jnp.float64), jax.random.PRNGKey(seed), num_chains=int(num_chains),
                           num_blocks=int(iterations) // BLOCK)
        return (dln_recorded_steps(int(iterations)),) + tuple(np.asarray(a) for a in out)


def merge_summary(path, summary):
    """Writes ``summary`` to the JSON at ``path``, merged into what earlier invocations wrote there.

    Figures run by separate invocations share one file; their ``seconds`` timings are merged too.
    """
    import json
    import os

    merged = {}
    if os.path.exists(path):
        with open(path) as f:
            merged = json.load(f)
    seconds = {**merged.get("seconds", {}), **summary.get("seconds", {})}
    merged.update(summary)
    merged["seconds"] = seconds
    with open(path, "w") as f:
        json.dump(merged, f, indent=1, default=float)
