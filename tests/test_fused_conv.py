"""The fused per-example conv-gradient kernel (JAX, Pallas) equals a one-example loop of JAX's own conv VJP.

On a GPU the ghost step forms a conv's per-example kernel gradients with one
Pallas kernel that gathers each kernel offset's input pixels itself instead
of forming the patches (``tan_keras/per_example/jax/conv_grads.py``). Here it
runs in Pallas's interpreter (``TAN_KERAS_FUSED_CONV=interpret``), so its
indexing (padding, strides, dilation, AugMult's views, the tiling's ragged
last tile) is checked on a CPU against a reference written here: each
example alone through ``lax.conv_general_dilated`` and ``jax.vjp``, or
float64 numpy for bf16 operands.
"""

import os

import keras
import numpy as np
import pytest

import tan_keras

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax", reason="a JAX (Pallas) kernel")

# "interpret" (CI, any device). On a GPU, ``TAN_KERAS_TEST_FUSED_CONV=auto`` runs the same checks on the compiled
# kernel, whose loads differ from the interpreter's where a slice starts before the flat input (conv_grads._fused);
# with ``JAX_DEFAULT_MATMUL_PRECISION=highest``, so that float32 products are not TF32's.
KERNEL_MODE = os.environ.get("TAN_KERAS_TEST_FUSED_CONV", "interpret")


def _on_gpu():
    import jax

    return jax.default_backend() == "gpu"


def _conv(x, kernel, padding, dilation, strides=None):
    import jax

    spec = ("NWC", "WIO", "NWC") if x.ndim == 3 else ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, kernel, strides or (1,) * (x.ndim - 2), padding.upper(),
                                        rhs_dilation=dilation, dimension_numbers=spec)


def _loop_kernel_grads(x, g, kernel_size, strides, padding, dilation, views):
    """Each row alone through JAX's conv VJP, summed over each example's ``views`` rows: (n, k·C, P), numpy."""
    import jax
    import jax.numpy as jnp

    zeros = jnp.zeros(tuple(kernel_size) + (x.shape[-1], g.shape[-1]), x.dtype)
    def one(i):
        pullback = jax.vjp(lambda k: _conv(x[i:i + 1], k, padding, dilation, strides), zeros)[1]
        return np.asarray(pullback(g[i:i + 1])[0], np.float64)

    rows = [one(i) for i in range(x.shape[0])]
    return np.stack(rows).reshape(x.shape[0] // views, views, -1, g.shape[-1]).sum(axis=1)


def _count_packed_calls(monkeypatch):
    """A list that gets an entry each time the kernel takes its packed rows (``conv_grads._packed_call``)."""
    from tan_keras.per_example.jax import conv_grads

    calls = []
    original = conv_grads._packed_call
    monkeypatch.setattr(conv_grads, "_packed_call", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def _random_case(seed, dtype, rows, spatial, channels, filters, kernel_size, strides, padding, dilation):
    """``(x, g)``: a random input of ``dtype`` and an output gradient of the conv's output shape."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(rows, *spatial, channels)), dtype)
    out_shape = _conv(x.astype(jnp.float32), jnp.zeros(tuple(kernel_size) + (channels, filters)), padding, dilation,
                      strides).shape
    return x, jnp.asarray(rng.normal(size=out_shape), dtype)


GEOMETRIES = [  # (rows n·K, spatial, C, P, kernel, strides, padding, dilation, K)
    ((3, (5, 6), 16, 32, (3, 3), (1, 1), "same", (1, 1), 1)),
    ((2, (7, 5), 32, 16, (3, 3), (1, 1), "valid", (1, 1), 1)),
    ((6, (4, 4), 16, 16, (3, 3), (1, 1), "same", (1, 1), 3)),
    ((2, (6, 6), 16, 16, (3, 3), (1, 1), "same", (2, 2), 1)),
    ((2, (6, 7), 16, 16, (5, 3), (1, 1), "same", (1, 2), 1)),
    ((4, (9,), 16, 32, (3,), (1,), "same", (2,), 2)),
    ((2, (8, 7), 16, 16, (3, 3), (2, 2), "same", (1, 1), 1)),  # "same" with a stride: the extra pixel after
    ((4, (7, 9), 16, 32, (3, 3), (2, 1), "valid", (1, 1), 2)),
    ((2, (11,), 16, 16, (4,), (3,), "same", (1,), 1)),
    ((1, (17, 17), 16, 16, (3, 3), (1, 1), "same", (1, 1), 1)),  # 289 positions: steps of 32, the last ragged
    ((2, (6, 6), 3, 16, (3, 3), (1, 1), "same", (1, 1), 1)),  # an RGB stem: channels zero-padded to 16
    ((2, (7, 6), 3, 10, (3, 3), (2, 2), "same", (1, 1), 2)),  # and filters padded too, strided
    ((1, (6, 6), 64, 64, (7, 7), (1, 1), "same", (1, 1), 1)),  # a 7×7 window of 64 channels, one program per row
]
# Fewer than 16 channels: 16-bit inputs pack each window row's (k_w, C) into one inner side
# (conv_grads._packed_rows); float32 ones take the geometries above, their channels zero-padded.
NARROW = [
    ((2, (6, 6), 3, 16, (3, 3), (1, 1), "same", (1, 1), 1)),  # WRN's RGB stem: 9 → 16
    ((2, (7, 6), 3, 10, (3, 3), (2, 2), "same", (1, 1), 2)),  # filters padded too, strided, AugMult
    ((2, (11, 10), 3, 16, (7, 7), (2, 2), "same", (1, 1), 1)),  # NF-ResNet's RGB stem (7×7, stride 2): 21 → 32
    ((4, (11, 8), 8, 32, (5, 3), (1, 2), "valid", (2, 1), 2)),  # dilated rows, a stride, AugMult: 24 → 32
    ((2, (13,), 4, 16, (5,), (1,), "same", (2,), 1)),  # Conv1D, dilated: 20 → 32
    ((1, (17, 17), 3, 16, (3, 3), (1, 1), "same", (1, 1), 1)),  # 289 positions: the last step ragged
]


@pytest.mark.parametrize("rows,spatial,channels,filters,kernel_size,strides,padding,dilation,views", GEOMETRIES)
def test_fused_kernel_equals_a_one_example_loop_of_the_conv_vjp(rows, spatial, channels, filters, kernel_size,
                                                                 strides, padding, dilation, views, monkeypatch):
    import jax.numpy as jnp

    from tan_keras.per_example.jax.conv_grads import fused_conv_per_example_grads

    monkeypatch.setenv("TAN_KERAS_FUSED_CONV", KERNEL_MODE)
    packed_calls = _count_packed_calls(monkeypatch)
    x, g = _random_case(0, jnp.float32, rows, spatial, channels, filters, kernel_size, strides, padding, dilation)
    got, got_sq = fused_conv_per_example_grads(x, g, kernel_size, strides, padding, dilation, views=views)
    assert got.dtype == jnp.float32 and got_sq.dtype == jnp.float32
    assert not packed_calls  # float32: channels zero-padded, never packed
    want = _loop_kernel_grads(x, g, kernel_size, strides, padding, dilation, views)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # The square sums the kernel adds up from its own tiles are those of the loop's gradients.
    np.testing.assert_allclose(np.asarray(got_sq, np.float64), np.sum(np.square(want), axis=(1, 2)), rtol=1e-5)


@pytest.mark.parametrize("rows,spatial,channels,filters,kernel_size,strides,padding,dilation,views", NARROW)
def test_packed_rows_of_a_narrow_bf16_input_equal_a_one_example_loop(rows, spatial, channels, filters, kernel_size,
                                                                     strides, padding, dilation, views, monkeypatch):
    """A bf16 input of fewer than 16 channels goes through the packed rows; each stored gradient is the loop's
    (float32 convs of the same bf16 values) within one bf16 rounding, and its square sum that of the stored values."""
    import jax.numpy as jnp

    from tan_keras.per_example.jax import conv_grads

    monkeypatch.setenv("TAN_KERAS_FUSED_CONV", KERNEL_MODE)
    packed_calls = _count_packed_calls(monkeypatch)
    x, g = _random_case(2, jnp.bfloat16, rows, spatial, channels, filters, kernel_size, strides, padding, dilation)
    got, got_sq = conv_grads.fused_conv_per_example_grads(x, g, kernel_size, strides, padding, dilation, views=views)
    assert packed_calls and got.dtype == jnp.bfloat16 and got_sq.dtype == jnp.float32
    want = _loop_kernel_grads(x.astype(jnp.float32), g.astype(jnp.float32), kernel_size, strides, padding, dilation,
                              views)
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, want, rtol=2.0**-8, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got_sq, np.float64), np.sum(np.square(got), axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize("channels", [16, 3])  # 3: the packed rows of an RGB stem
def test_fused_kernel_sums_bf16_products_in_float32_and_stores_them_rounded_once(channels, monkeypatch):
    """bf16 inputs: each stored gradient is the float64 sum of the same bf16 values rounded to bf16 (within one
    ulp where the float32 sum sits at a rounding boundary; a bf16-accumulated sum is many ulps off), and the
    square sum that comes with them is that of the stored values (what the clipped sum adds)."""
    import jax.numpy as jnp
    import ml_dtypes

    from tan_keras.per_example.jax.conv_grads import fused_conv_per_example_grads

    monkeypatch.setenv("TAN_KERAS_FUSED_CONV", KERNEL_MODE)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, channels)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(2, 8, 8, 16)), jnp.bfloat16)
    grads, sum_sq = fused_conv_per_example_grads(x, g, (3, 3), (1, 1), "same", (1, 1))
    assert grads.dtype == jnp.bfloat16 and sum_sq.dtype == jnp.float32
    got = np.asarray(grads, np.float64)
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    padded = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.stack([np.einsum("bhwc,bhwp->bcp", padded[:, a:a + 8, b:b + 8], g64)
                     for a in range(3) for b in range(3)], axis=1).reshape(2, -1, 16)
    rounded = want.astype(ml_dtypes.bfloat16).astype(np.float64)
    ulp = np.abs(rounded) * 2.0**-7
    assert np.all(np.abs(got - rounded) <= ulp + 1e-30)
    assert np.mean(got == rounded) > 0.99
    np.testing.assert_allclose(np.asarray(sum_sq, np.float64), np.sum(np.square(got), axis=(1, 2)), rtol=1e-6)


SUMMED = [  # (geometry, partials): GEOMETRIES' "shift" and "gather" layouts, Conv1D, and NARROW's packed rows
    (GEOMETRIES[0], None), (GEOMETRIES[0], 1), (GEOMETRIES[1], 2), (GEOMETRIES[5], 4), (GEOMETRIES[6], None),
    (GEOMETRIES[9], None), (NARROW[2], 2), (NARROW[3], None),
]


@pytest.mark.parametrize("geometry,partials", SUMMED)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fused_weight_grad_is_the_batch_sum_of_a_one_example_loop(geometry, partials, dtype, monkeypatch):
    """Book-keeping's share of a ghost-form conv (``fused_conv_weight_grad``): the kernel gradient summed over all
    rows, float32, whatever the operands' dtype and the number of row groups the kernel sums separately; against
    a one-example loop of JAX's conv VJP on float32 copies of the same values, summed in float64 (bf16 products
    are exact in float32: a sum rounded to bf16 would be ~2⁻⁹ off)."""
    import jax.numpy as jnp

    from tan_keras.per_example.jax.conv_grads import fused_conv_weight_grad

    rows, spatial, channels, filters, kernel_size, strides, padding, dilation, _ = geometry
    monkeypatch.setenv("TAN_KERAS_FUSED_CONV", KERNEL_MODE)
    x, g = _random_case(3, dtype, rows, spatial, channels, filters, kernel_size, strides, padding, dilation)
    # float32 operands only when asked for (benchmarks): the step's book-keeping sends 16-bit ones
    assert (fused_conv_weight_grad(x, g, kernel_size, strides, padding, dilation) is None) == (dtype == "float32")
    got = fused_conv_weight_grad(x, g, kernel_size, strides, padding, dilation, partials=partials,
                                 fp32_any_width=True)
    assert got.dtype == jnp.float32 and got.shape == (np.prod(kernel_size) * channels, filters)
    want = _loop_kernel_grads(x.astype(jnp.float32), g.astype(jnp.float32), kernel_size, strides, padding, dilation,
                              1).sum(axis=0)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_fused_weight_grad_groups_rows_for_enough_programs():
    """The row groups the summed kernel takes: a divisor of the rows, near 528 programs (4 per SM of an H200)."""
    from tan_keras.per_example.jax.conv_grads import _partials

    assert _partials(1024, (3, 3), 256, 256, 64) == 8  # 3 window rows × 4 × 4 tiles per group: 11 wanted
    assert _partials(1024, (3, 3), 16, 16, 64) == 128  # one tile per window row: 176 wanted, 128 the nearest
    assert _partials(3, (3, 3), 32, 32, 64) == 3  # never more groups than rows
    assert _partials(7, (1, 1), 4096, 4096, 64) == 1  # a prime number of rows: the nearest divisor
    assert _partials(12, (5,), 16, 16, 64) == 12  # Conv1D: one window row


def test_fused_weight_grad_declines_layers_wider_than_256(monkeypatch):
    """Wider layers keep one matmul per offset (faster there on an H200), and so does any layer off a GPU."""
    import jax.numpy as jnp

    from tan_keras.per_example.jax.conv_grads import fused_conv_weight_grad

    x, g = jnp.zeros((2, 4, 4, 256), jnp.bfloat16), jnp.zeros((2, 4, 4, 256), jnp.bfloat16)
    auto = fused_conv_weight_grad(x, g, (3, 3), (1, 1), "same", (1, 1))
    assert (auto is not None) == _on_gpu()  # auto: the kernel on a GPU only
    monkeypatch.setenv("TAN_KERAS_FUSED_CONV", KERNEL_MODE)
    assert fused_conv_weight_grad(x, g, (3, 3), (1, 1), "same", (1, 1)).shape == (9 * 256, 256)
    wide = jnp.zeros((2, 4, 4, 272), jnp.bfloat16)
    assert fused_conv_weight_grad(wide, g, (3, 3), (1, 1), "same", (1, 1)) is None
    assert fused_conv_weight_grad(x, wide, (3, 3), (1, 1), "same", (1, 1)) is None


def test_fused_kernel_declines_what_it_does_not_cover(monkeypatch):
    """None (the caller forms the patches) off a GPU, for mismatched shapes, wide fp32 layers, huge tensors."""
    import jax
    import jax.numpy as jnp

    from tan_keras.per_example.jax.conv_grads import fused_conv_per_example_grads

    x, g = jnp.zeros((2, 8, 8, 16)), jnp.zeros((2, 8, 8, 16))
    auto = fused_conv_per_example_grads(x, g, (3, 3), (1, 1), "same", (1, 1))
    assert (auto is not None) == _on_gpu()  # auto: the kernel on a GPU only
    monkeypatch.setenv("TAN_KERAS_FUSED_CONV", KERNEL_MODE)
    assert fused_conv_per_example_grads(x, g[:, ::2], (3, 3), (1, 1), "same", (1, 1)) is None  # g of another shape
    assert fused_conv_per_example_grads(x, g.astype("bfloat16"), (3, 3), (1, 1), "same", (1, 1)) is None
    assert fused_conv_per_example_grads(jnp.zeros((2, 8, 8, 56)), g, (3, 3), (1, 1), "same", (1, 1)) is not None
    assert fused_conv_per_example_grads(jnp.zeros((2, 8, 8, 72)), g, (3, 3), (1, 1), "same", (1, 1)) is None  # → 80
    wide = jnp.zeros((2, 8, 8, 128))
    assert fused_conv_per_example_grads(wide, wide, (3, 3), (1, 1), "same", (1, 1)) is None
    assert fused_conv_per_example_grads(wide.astype("bfloat16"), wide.astype("bfloat16"), (3, 3), (1, 1), "same",
                                        (1, 1)) is not None
    huge = jax.ShapeDtypeStruct((4096, 128, 128, 64), jnp.bfloat16)  # 2³² elements: int32 offsets
    assert jax.eval_shape(lambda x, g: fused_conv_per_example_grads(x, g, (3, 3), (1, 1), "same", (1, 1)),
                          huge, huge) is None
    monkeypatch.setenv("TAN_KERAS_FUSED_CONV", "on")
    with pytest.raises(ValueError, match="TAN_KERAS_FUSED_CONV is 'on'; use one of auto, off, interpret"):
        fused_conv_per_example_grads(x, g, (3, 3), (1, 1), "same", (1, 1))


def test_ghost_step_with_the_fused_kernel_clips_like_a_one_example_loop(monkeypatch):
    """A Conv2D + WS-conv model under AugMult (K = 2): the step's norms and clipped sum, with the kernel used."""
    import jax

    from models import layers as model_layers
    from tan_keras.per_example.jax import conv_grads

    monkeypatch.setenv("TAN_KERAS_FUSED_CONV", KERNEL_MODE)
    calls = []
    original = conv_grads.fused_conv_per_example_grads

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(tan_keras.per_example._backend_module(), "fused_conv_per_example_grads", spy)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 16))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    h = model_layers.ScaledWSConv2D(16, 3, padding="same")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    inner = keras.Model(inputs, keras.layers.Dense(3)(h))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6, 6, 16)).astype("float32")
    x[1] *= 30.0
    y = rng.integers(0, 3, size=(4,))
    views = np.stack([x, -0.5 * x + 0.3], axis=1)  # (n, K, ...): the views a user's augment gave

    model = tan_keras.augmult.wrap(inner, 2, augment=lambda v, seed: v, clipping="ghost")
    model(views[:1])
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0), loss=loss)

    trainable = [v.value for v in inner.trainable_variables]

    def example_loss(trainable, vi, yi):  # (1/K) Σ_j ℓ(f(view_j), y_i): one example alone
        out, _ = inner.stateless_call(trainable, [v.value for v in inner.non_trainable_variables], vi)
        return keras.ops.mean(loss(np.repeat(yi, 2), out))

    want = [[np.asarray(g, np.float64) for g in jax.grad(example_loss)(trainable, views[i], y[i:i + 1])]
            for i in range(len(x))]
    norms = np.array([np.sqrt(sum(np.sum(np.square(g)) for g in grads)) for grads in want])
    l2_norm_clip = float(np.median(norms))
    factors = np.minimum(1.0, l2_norm_clip / norms)
    got_sum, got_norms = tan_keras.per_example.clipped_sum_and_norms(model, views, y, l2_norm_clip)
    assert calls and all(calls)  # both 3×3 convs took the kernel
    np.testing.assert_allclose(np.asarray(got_norms), norms, rtol=1e-4)
    for j, variable in enumerate(model.trainable_variables):
        expected = sum(f * grads[j] for f, grads in zip(factors, want))
        np.testing.assert_allclose(np.asarray(got_sum[j]), expected, rtol=1e-4,
                                   atol=1e-5 * max(np.abs(expected).max(), 1e-3), err_msg=variable.path)
