"""Ghost clipping is exact: its norms and clipped sums equal the vectorized path's.

The reference is ``tan_keras.per_example_gradients`` (vectorized per-example
gradients of the compiled loss), clipped with ``tan_keras.clipping``. Each
model is checked with the ghost form and with the explicit form of every
layer's norm forced (``ghost_norms.norm_mode``), with a clip C at the median
norm (so some examples are clipped and some are not) and a zero sample weight.
Runs on the backend named by KERAS_BACKEND.
"""

import logging

import keras
import numpy as np
import pytest

import tan_keras
from models import layers as model_layers
from tan_keras import clipping, ghost_norms

BACKEND = keras.backend.backend()
if BACKEND == "jax":
    import jax

    from tan_keras.per_example.jax import ghost

    def reference_grads(model, x, y, sample_weight):
        return jax.jit(lambda x, y, w: tan_keras.per_example_gradients(model, x, y, w))(x, y, sample_weight)
else:
    import tensorflow as tf

    from tan_keras.per_example.tensorflow import ghost

    def reference_grads(model, x, y, sample_weight):
        return tf.function(lambda x, y, w: tan_keras.per_example_gradients(model, x, y, w))(x, y, sample_weight)

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
N = 6


def cnn():
    """The small CNN: Conv2D (strided, 'same') + GroupNormalization + Dense."""
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(inputs)
    h = keras.layers.GroupNormalization(groups=2)(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h)), (6, 6, 2)


def sequence_model():
    """Embedding, causal dilated Conv1D, LayerNorm, EinsumDense (matmul and elementwise forms), Dense on positions."""
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(7, 4)(inputs)
    h = keras.layers.Conv1D(4, 2, padding="causal", dilation_rate=2, activation="relu")(h)
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.EinsumDense("abc,cd->abd", output_shape=(5, 3), bias_axes="d", activation="tanh")(h)
    h = keras.layers.Dense(3, activation="relu")(h)
    h = keras.layers.EinsumDense("abc,bc->ab", output_shape=(5,))(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h)), "ids"


def ws_conv_model(side=5, kernel_size=3, strides=2, padding="valid"):
    """NF-ResNet's ScaledWSConv2D (kernel, gain and bias) + LayerNorm over (H, W, C) + Dense."""
    inputs = keras.Input((side, side, 2))
    h = model_layers.ScaledWSConv2D(3, kernel_size, strides=strides, padding=padding, gain_init=0.7)(inputs)
    h = keras.layers.LayerNormalization(axis=(1, 2, 3))(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h)), (side, side, 2)


# ScaledWSConv2D geometries whose ghost form takes the patch Gram from the input's Gram ("same" 3×3: P² < k·T²),
# with a stride's extra pixel, and a 1×1 conv; ws_conv_model's own ("valid", stride 2) takes one Gram per offset.
WS_CONV_GEOMETRIES = {"same": (6, 3, 1, "same"), "same_strided": (7, 3, 2, "same"), "one_by_one": (4, 1, 1, "same")}


def data(shape, seed=0):
    rng = np.random.default_rng(seed)
    if shape == "ids":
        x = rng.integers(0, 7, size=(N, 5)).astype("int32")
        x[0] = [1, 2, 1, 1, 3]  # repeated ids: rows of the embedding gradient add up
    else:
        x = rng.normal(size=(N, *shape)).astype("float32")
    y = rng.integers(0, 3, size=(N,)).astype("int32")
    w = rng.uniform(0.5, 2.0, size=(N,)).astype("float32")
    w[-1] = 0.0
    return x, y, w


def build(model_fn, seed=0):
    keras.utils.set_random_seed(seed)
    model, shape = model_fn()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    return model, data(shape, seed)


def reference(model, x, y, w):
    grads = reference_grads(model, x, y, w)
    norms = clipping.global_norms(grads)
    l2_norm_clip = float(np.median(np.asarray(norms)))
    clipped = clipping.weighted_sum(grads, clipping.clip_factors(norms, l2_norm_clip))
    return np.asarray(norms), [np.asarray(g) for g in clipped], l2_norm_clip


def assert_ghost_matches_vectorized(model, x, y, w, mode="auto"):
    norms, clipped, l2_norm_clip = reference(model, x, y, w)
    with ghost_norms.norm_mode(mode):
        ghost_sum, ghost_norms_ = ghost.clipped_grad_sum_of(model, x, y, l2_norm_clip, sample_weight=w)
    np.testing.assert_allclose(np.asarray(ghost_norms_), norms, rtol=2e-4, atol=1e-5)
    for got, want, v in zip(ghost_sum, clipped, model.trainable_variables):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=1e-5, err_msg=v.path)


@pytest.mark.parametrize("mode", ["ghost", "explicit"])
@pytest.mark.parametrize("model_fn", [cnn, sequence_model, ws_conv_model])
def test_ghost_norms_and_clipped_sum_equal_vectorized(model_fn, mode):
    model, (x, y, w) = build(model_fn)
    assert ghost_norms.ghost_plan(model).reason is None
    assert_ghost_matches_vectorized(model, x, y, w, mode)


@pytest.mark.parametrize("geometry", list(WS_CONV_GEOMETRIES))
def test_ws_conv_ghost_form_norms_and_clipped_sum_equal_vectorized(geometry):
    """The ghost form of a ScaledWSConv2D (its α and patch sums from convs of the input, its Gram from the input's
    own Gram where cheaper) gives the vectorized path's norms and clipped sum."""
    model, (x, y, w) = build(lambda: ws_conv_model(*WS_CONV_GEOMETRIES[geometry]))
    assert_ghost_matches_vectorized(model, x, y, w, "ghost")


def test_weighted_sum_of_bf16_per_example_grads_uses_float32_weights_and_sum():
    """16-bit per-example gradients (the fused kernel's under mixed_bfloat16): the clip factors are not rounded to
    bf16 and the sum is float32: against float64 on the same bf16 values (bf16 factors would be ~1e-3 off)."""
    rng = np.random.default_rng(0)
    grads = keras.ops.cast(rng.normal(size=(64, 5, 7)), "bfloat16")
    factors = rng.uniform(0.1, 1.0, size=(64,)).astype("float32")
    got = np.asarray(clipping.weighted_sum([grads], keras.ops.convert_to_tensor(factors))[0], np.float64)
    want = np.einsum("b,bij->ij", factors.astype(np.float64), np.asarray(keras.ops.cast(grads, "float32"), np.float64))
    assert keras.backend.standardize_dtype(clipping.weighted_sum([grads], factors)[0].dtype) == "float32"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_weighted_sum_of_float32_per_example_grads_keeps_each_product_exact_on_this_device():
    """float32 per-example gradients: each unit adds ``w_i·g_i`` at float32 precision, on a GPU too, where a matmul
    of the same operands (TF32) would round both to 11 bits (~1e-3 off): against float64 numpy, one unit, and a
    batch of 64."""
    rng = np.random.default_rng(1)
    for units in (1, 64):
        grads = rng.normal(size=(units, 5, 7)).astype("float32")
        factors = rng.uniform(0.1, 1.0, size=(units,)).astype("float32")
        got = np.asarray(clipping.weighted_sum([keras.ops.convert_to_tensor(grads)],
                                               keras.ops.convert_to_tensor(factors))[0], np.float64)
        want = np.einsum("b,bij->ij", factors.astype(np.float64), grads.astype(np.float64))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def benchmark_cnn():
    """``experiments/benchmark.py``'s CNN: strided Conv2D + GroupNorm, twice, then two Dense."""
    from experiments import benchmark

    return benchmark.build_model("cnn", num_classes=3)


# WRN (gn_relu, WS convs) and NF-ResNet are checked against a one-example loop in test_per_example_exact.py.
@pytest.mark.parametrize("model_fn", [benchmark_cnn])
def test_whole_image_models_ghost_clipped_sum_equals_vectorized(model_fn):
    model, (x, y, w) = build(model_fn)
    assert ghost_norms.ghost_plan(model).reason is None
    assert_ghost_matches_vectorized(model, x, y, w)


@pytest.mark.parametrize("parametrization", ["w_pm", "uv"])
def test_dln_ghost_clipped_sum_equals_vectorized(parametrization):
    from models import dln

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = dln.DiagonalLinearNetwork(7, alpha=rng.uniform(0.1, 1.0, size=7), parametrization=parametrization)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=dln.quarter_squared_error)
    model.build((None, 7))
    model.set_weights([w + rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    x = rng.normal(size=(N, 7)).astype("float32")
    y = rng.normal(size=(N, 1)).astype("float32")
    w = np.ones((N,), "float32")
    w[-1] = 0.0
    assert ghost_norms.ghost_plan(model).reason is None
    assert_ghost_matches_vectorized(model, x, y, w)


def test_zero_weight_example_has_zero_norm():
    model, (x, y, w) = build(cnn)
    _, norms = ghost.clipped_grad_sum_of(model, x, y, 1.0, sample_weight=w)
    assert np.asarray(norms)[-1] == 0.0 and np.all(np.asarray(norms)[:-1] > 0)


class Scale(keras.layers.Layer):
    """``x · s`` with a learnable per-feature scale: a layer no rule knows about."""

    def build(self, input_shape):
        self.s = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.s


def scale_mlp():
    inputs = keras.Input((4,))
    h = Scale()(keras.layers.Dense(5, activation="tanh")(inputs))
    return keras.Model(inputs, keras.layers.Dense(3)(h)), (4,)


def test_unknown_trainable_layer_falls_back_to_vectorized_then_registering_a_rule_enables_ghost(caplog):
    model, (x, y, w) = build(scale_mlp)
    assert "Scale" in ghost_norms.ghost_plan(model).reason
    with caplog.at_level(logging.WARNING, logger=ghost_norms.__name__):
        assert_ghost_matches_vectorized(model, x, y, w)
    assert "using vectorized" in caplog.text.lower()

    @ghost_norms.register_ghost_norm(Scale)
    def scale_sq_norms(layer, inputs, output_grad):
        return ghost_norms.keras.ops.sum(ghost_norms.keras.ops.square(inputs * output_grad), axis=-1)

    try:
        assert ghost_norms.ghost_plan(model).reason is None
        assert_ghost_matches_vectorized(model, x, y, w)
    finally:
        ghost_norms._RULES.pop(Scale)


def test_shared_layer_falls_back_to_vectorized():
    def shared():
        inputs = keras.Input((4,))
        dense = keras.layers.Dense(4, activation="tanh")
        return keras.Model(inputs, keras.layers.Dense(3)(dense(dense(inputs)))), (4,)

    model, (x, y, w) = build(shared)
    assert_ghost_matches_vectorized(model, x, y, w)


def test_private_fit_with_ghost_clipping_equals_vectorized_fit():
    """One DP-SGD step (σ=0) through ``fit``, ghost in one chunk and in two: the vectorized step's weights."""
    def trained(use_ghost, physical_batch_size):
        keras.utils.set_random_seed(0)
        model = tan_keras.PrivateSequential(
            [keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)],
            physical_batch_size=physical_batch_size, clipping="ghost" if use_ghost else "vectorized")
        model.compile(optimizer=tan_keras.DPSGD(learning_rate=0.5, noise_multiplier=0.0, l2_norm_clip=0.3),
                      loss=LOSS)
        x, y, _ = data((4,))
        history = model.fit(np.concatenate([x, x[:2]]), np.concatenate([y, y[:2]]), batch_size=8,
                            epochs=1, verbose=0, shuffle=False)
        return [np.asarray(v) for v in model.get_weights()], history.history

    want_weights, want_logs = trained(False, 4)
    for physical_batch_size in (None, 4):
        got_weights, got_logs = trained(True, physical_batch_size)
        for got, want in zip(got_weights, want_weights):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for name in ("loss", "clip_fraction", "per_example_norm"):
            np.testing.assert_allclose(got_logs[name], want_logs[name], rtol=1e-4)


class TiedReadout(keras.layers.Layer):
    """``h @ Wᵀ`` with ``W`` the kernel of another Dense: weights used outside their own layer's call."""

    def __init__(self, tied, **kwargs):
        super().__init__(**kwargs)
        self.tied = tied

    def call(self, inputs):
        return ghost_norms.keras.ops.matmul(inputs, ghost_norms.keras.ops.transpose(self.tied.kernel))


@pytest.mark.parametrize("readout_last", [True, False])
def test_weights_read_by_another_layer_fall_back_to_vectorized(caplog, readout_last):
    """A tied read anywhere (last op, or feeding a later watched layer) is seen and the step stays exact."""
    def tied():
        inputs = keras.Input((4,))
        dense = keras.layers.Dense(5, activation="tanh")
        h = keras.layers.Dense(5, activation="tanh")(dense(inputs))
        h = TiedReadout(dense)(h)
        return keras.Model(inputs, h if readout_last else keras.layers.Dense(3)(h)), (4,)

    model, (x, y, w) = build(tied)
    assert ghost_norms.ghost_plan(model).reason is None  # only the traced step can see the tied read
    with caplog.at_level(logging.WARNING, logger=ghost_norms.__name__):
        assert_ghost_matches_vectorized(model, x, y, w)
    assert "outside their own layer's call" in caplog.text


@pytest.mark.parametrize("form", ["ghost", "explicit"])
def test_bf16_operands_give_the_float32_norm_of_the_same_bf16_values(form):
    """Under mixed_bfloat16 the norm matmuls take the bf16 activations as they are and accumulate in float32:
    the norms equal float64 numpy on the same bf16 values to float32 accuracy (bf16 products or sums would
    be ~1e-3 off), and per-example gradients come back float32."""
    from keras import ops

    from tan_keras.ghost import norms

    rng = np.random.default_rng(0)
    a16 = ops.cast(rng.normal(size=(4, 40, 24)).astype("float32"), "bfloat16")
    g16 = ops.cast(rng.normal(size=(4, 40, 8)).astype("float32"), "bfloat16")
    a64 = np.asarray(ops.cast(a16, "float32"), np.float64)
    g64 = np.asarray(ops.cast(g16, "float32"), np.float64)
    want = np.sum(np.square(np.einsum("btd,btp->bdp", a64, g64)), axis=(1, 2))
    with ghost_norms.norm_mode(form):
        got = np.asarray(norms.matmul_grad_sq_norms(a16, g16), np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    grads = norms.matmul_per_example_grads([a16[..., :12], a16[..., 12:]], g16)
    assert keras.backend.standardize_dtype(grads.dtype) == "float32"
    np.testing.assert_allclose(np.asarray(grads, np.float64), np.einsum("btd,btp->bdp", a64, g64), rtol=2e-5,
                               atol=2e-5)


PATCH_GEOMETRIES = [  # (rows, spatial, C, kernel, strides, padding, dilation, K)
    (2, (6, 5), 3, (3, 3), (1, 1), "same", (1, 1), 1),
    (2, (7, 6), 2, (3, 3), (2, 2), "same", (1, 1), 1),  # "same" with a stride: the extra pixel after
    (2, (7, 7), 2, (3, 2), (1, 1), "valid", (2, 1), 1),  # dilated (TF's conv takes no stride with a dilation)
    (2, (7, 8), 2, (3, 2), (2, 3), "valid", (1, 1), 1),
    (4, (9,), 3, (3,), (1,), "same", (2,), 2),  # Conv1D, dilated, AugMult's K = 2 rows per example
    (4, (5, 5), 2, (3, 3), (1, 1), "same", (1, 1), 2),
]


@pytest.mark.parametrize("rows,spatial,channels,kernel_size,strides,padding,dilation,views", PATCH_GEOMETRIES)
def test_patch_gram_from_the_inputs_own_gram_equals_the_gram_of_keras_conv_patches(
        rows, spatial, channels, kernel_size, strides, padding, dilation, views):
    """``patch_gram`` (the padded input's Gram, summed over the kernel offsets' windows) against float64 numpy on
    the patches that Keras's own conv extracts (a one-hot kernel copies offset j, channel c to output j·C + c)."""
    from keras import ops

    from tan_keras.ghost import norms

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, *spatial, channels)).astype("float32")
    k = int(np.prod(kernel_size))
    one_hot = np.zeros((k * channels, k * channels), "float32")
    one_hot[np.arange(k * channels), np.arange(k * channels)] = 1.0
    kernel = one_hot.reshape(tuple(kernel_size) + (channels, k * channels))
    patches = np.asarray(ops.conv(x, kernel, strides=strides, padding=padding, dilation_rate=dilation), np.float64)
    patches = patches.reshape(rows // views, -1, k * channels)  # an example's positions: its K views'
    want = np.einsum("btd,bsd->bts", patches, patches)
    with norms.example_rows(views):
        got = norms.patch_gram(ops.convert_to_tensor(x), kernel_size, strides, padding, dilation)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_patch_gram_is_used_where_it_takes_fewer_multiply_adds():
    """P² < k·T²: an 8×8 "same" 3×3 conv (100² < 9·64²) yes; the same with stride 2 (81² > 9·16²) no."""
    from tan_keras.ghost import norms

    assert norms.patch_gram_is_cheaper((8, 8), (3, 3), (1, 1), "same", (1, 1))
    assert not norms.patch_gram_is_cheaper((8, 8), (3, 3), (2, 2), "same", (1, 1))


def test_einsum_f32_keeps_float32_and_float64_operands_at_their_precision():
    """Accumulation is at least float32: float32 stays float32, float64 (where the backend has it) stays float64."""
    from keras import ops

    for dtype in ("float32", "float64"):
        a = ops.convert_to_tensor(np.ones((2, 3)), dtype=dtype)
        out = tan_keras.per_example.einsum_f32("ij,jk->ik", a, ops.transpose(a))
        assert keras.backend.standardize_dtype(out.dtype) == keras.backend.standardize_dtype(a.dtype)


class _Readout(keras.layers.Layer):
    """``Σ_t Σ_j u_tj z_tj``: a fixed readout, so that ``∂ℓ/∂z = u`` exactly."""

    def __init__(self, u, **kwargs):
        super().__init__(**kwargs)
        self.u = u

    def call(self, z):
        from keras import ops

        return ops.sum(z * ops.cast(self.u, z.dtype), axis=(1, 2))[:, None]


def test_bf16_book_keeping_keeps_an_examples_clipped_contribution_within_the_clip_norm():
    """Under mixed_bfloat16 a ghost-form layer's share of the clipped sum is its weight gradient at the rounded
    cotangent round(c·g). Where ``a_iᵀ g_i`` cancels over positions the roundings need not: this example (a
    Dense on 64 positions, input e₁ everywhere, output gradients alternating 1 and −(1 − 2⁻⁷), so ‖∇W‖ = 0.25)
    would add 1.3·C with the plain factor. The step measures the rounded contributions and halves the
    factor, so the clipped sum of the one example stays within C."""
    import ml_dtypes
    from keras import ops

    from tan_keras.ghost import bookkeeping, registry

    positions, width = 64, 256
    assert registry.use_ghost(positions, width, width)
    v = np.where(np.arange(positions) % 2 == 0, 1.0, -(1.0 - 2.0**-7)).astype("float32")
    u = np.zeros((positions, width), "float32")
    u[:, 0] = v
    inputs = keras.Input((positions, width))
    z = keras.layers.Dense(width, use_bias=False, dtype="mixed_bfloat16", name="watched")(inputs)
    model = tan_keras.make_private(keras.Model(inputs, _Readout(u, dtype="mixed_bfloat16")(z)), clipping="ghost")
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0),
                  loss=lambda y_true, y_pred: y_pred[:, 0])
    x = np.zeros((1, positions, width), "float32")
    x[0, :, 0] = 1.0
    l2_norm_clip = 0.0943

    # What the unguarded step adds: Σ_t round(round(c)·v_t), with c the (margin-reduced) plain clip factor.
    bf16 = ml_dtypes.bfloat16
    c = np.float32(l2_norm_clip / (1.0 + bookkeeping.ROUNDING_MARGIN) / 0.25)
    plain = np.sum((np.float32(c.astype(bf16)) * v.astype(bf16).astype("float32")).astype(bf16).astype(np.float64))
    assert plain > 1.3 * l2_norm_clip

    got_sum, got_norms = tan_keras.per_example.clipped_sum_and_norms(model, x, np.zeros((1, 1)), l2_norm_clip)
    np.testing.assert_allclose(np.asarray(got_norms), [0.25], rtol=1e-6)
    got = np.sqrt(sum(float(np.sum(np.square(np.asarray(ops.cast(g, "float32"), np.float64)))) for g in got_sum))
    assert 0.4 * l2_norm_clip < got <= l2_norm_clip


def _two_dense_token_case(hidden_dtype):
    """``(private model, x, y)``: two hidden Dense layers (tanh, then linear) on 16 positions of width 48, both
    in the ghost form, in ``hidden_dtype`` (None: the default float32), then token mean and a float32 Dense head;
    six examples of seeded normal data and 3 classes."""
    from tan_keras.ghost import registry

    assert registry.use_ghost(16, 48, 48)  # both hidden Dense layers take the ghost form
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 48))
    h = keras.layers.Dense(48, activation="tanh", dtype=hidden_dtype)(inputs)
    h = keras.layers.Dense(48, dtype=hidden_dtype)(h)
    out = keras.layers.Dense(3, dtype="float32")(keras.layers.GlobalAveragePooling1D(dtype="float32")(h))
    model = tan_keras.make_private(keras.Model(inputs, out), clipping="ghost")
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 16, 48)).astype("float32")
    return model, x, rng.integers(0, 3, size=(6,))


def test_bf16_book_keeping_clips_ordinary_examples_to_the_margin_reduced_norm_without_halving():
    """With ordinary data the rounding of ``c ⊙ g`` is ~1e-3 of the norm, inside the 2⁻⁷ margin: every example
    is clipped to C/(1 + 2⁻⁷) exactly as plain clipping would (none halved), against a one-example loop."""
    from keras import ops

    from tan_keras.ghost import bookkeeping

    model, x, y = _two_dense_token_case("mixed_bfloat16")
    per_example = [[np.asarray(g, np.float64) for g in grads]
                   for grads in tan_keras.per_example.loop_per_example_gradients(model, x, y)]
    norms = np.array([np.sqrt(sum(np.sum(np.square(g)) for g in grads)) for grads in per_example])
    l2_norm_clip = float(np.median(norms))
    factors = np.minimum(1.0, l2_norm_clip / (1.0 + bookkeeping.ROUNDING_MARGIN) / norms)
    got_sum, _ = tan_keras.per_example.clipped_sum_and_norms(model, x, y, l2_norm_clip)
    got = np.concatenate([np.ravel(np.asarray(ops.cast(g, "float32"), np.float64)) for g in got_sum])
    want = sum(f * np.concatenate([np.ravel(g) for g in grads]) for f, grads in zip(factors, per_example))
    # bf16 sums: 2.4% apart (the bias gradients' rounding); any one example halved: 17-21% apart here.
    assert np.linalg.norm(got - want) < 0.08 * np.linalg.norm(want)


def _tf32(x):
    """float32 rounded to nearest (ties to even) at 11 significant bits, TF32's, by numpy's frexp/rint/ldexp."""
    m, e = np.frexp(np.asarray(x, np.float64))  # m in [0.5, 1): 11 bits are m·2¹¹ rounded to an integer
    return np.ldexp(np.rint(m * 2.0**11) / 2.0**11, e).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 11])
def test_round_significand_rounds_float32_to_nearest_even_at_the_given_bits(bits):
    """Against ml_dtypes' bfloat16 cast (8 bits) and numpy's frexp/rint (11, TF32): random values of either
    sign, exact ties (to even), a carry into the exponent, zero; non-finite values pass unchanged."""
    import ml_dtypes
    from keras import ops

    rng = np.random.default_rng(0)
    half = 2.0 ** -bits  # half a unit in the last kept place of a value in [1, 2)
    special = [1 + half, 1 + 3 * half, 2 - half / 2, -(1 + half), 0.0, 3.0e38, 1e-30, -7.5]
    x = np.concatenate([rng.normal(size=4000) * 10.0 ** rng.integers(-20, 20, size=4000), special])
    x = x.astype(np.float32)
    want = x.astype(ml_dtypes.bfloat16).astype(np.float32) if bits == 8 else _tf32(x)
    got = np.asarray(tan_keras.per_example.round_significand(ops.convert_to_tensor(x), bits))
    np.testing.assert_array_equal(got, want)
    assert got[-8] == 1.0 and got[-7] == 1 + 4 * half and got[-6] == 2.0  # the ties went to even, the carry up
    odd = np.array([np.inf, -np.inf, np.nan], np.float32)
    out = np.asarray(tan_keras.per_example.round_significand(ops.convert_to_tensor(odd), bits))
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2])
    np.testing.assert_array_equal(np.asarray(tan_keras.per_example.round_significand(ops.convert_to_tensor(x), 24)),
                                  x)


def test_float32_matmul_bits_reads_the_bits_a_matmul_keeps():
    """The probe counts the bits of ``1 + 2⁻ʲ`` rows that come back from a product with the identity: 24 from an
    exact matmul, 11 and 8 from products rounded as TF32 and bf16 are; this backend's device: 24 on a CPU (11 on
    a GPU at the default TF32 precision)."""
    import ml_dtypes

    from tan_keras.per_example import rounding

    rows, identity = rounding.probe_operands()
    assert rounding.kept_bits(rows @ identity) == 24
    assert rounding.kept_bits(_tf32(rows) @ identity) == 11
    assert rounding.kept_bits(rows.astype(ml_dtypes.bfloat16).astype(np.float32) @ identity) == 8
    on_gpu = bool(keras.config.backend() == "jax" and __import__("jax").default_backend() == "gpu")
    assert tan_keras.per_example.float32_matmul_bits() == (11 if on_gpu else 24)


def _tf32_alternating(positions=64):
    """Output gradients alternating 1 and −(1 − 2⁻¹⁰) (TF32 values): their sum, 2⁻⁵, cancels 64 unit terms."""
    return np.where(np.arange(positions) % 2 == 0, 1.0, -(1.0 - 2.0**-10)).astype("float32")


def _tf32_case(layer, inputs_shape, x, v, width):
    """A private model ``layer`` → fixed readout (``∂ℓ/∂z[:, t, 0] = v_t``), float32, ghost clipping."""
    u = np.zeros((len(v), width), "float32")
    u[:, 0] = v
    inputs = keras.Input(inputs_shape, dtype=x.dtype)
    model = tan_keras.make_private(keras.Model(inputs, _Readout(u)(layer(inputs))), clipping="ghost")
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0),
                  loss=lambda y_true, y_pred: y_pred[:, 0])
    return model


def _tf32_device(device, monkeypatch):
    """"TF32 emulated": the device reports 11 bits (on a CPU, its matmuls stay exact); "this device": the real
    ones (a GPU). Returns whether the matmuls underneath are exact."""
    exact = tan_keras.per_example.float32_matmul_bits() == 24
    if device == "TF32 emulated":
        monkeypatch.setattr(tan_keras.per_example, "float32_matmul_bits", lambda: 11)
    elif exact:
        pytest.skip("this device's float32 matmuls keep all 24 bits (no TF32): nothing is rounded")
    return exact


def _contribution_norm(model, x, l2_norm_clip):
    """``(‖clipped sum‖, norms)`` of a one-example batch: that example's clipped contribution."""
    from keras import ops

    got_sum, got_norms = tan_keras.per_example.clipped_sum_and_norms(model, x, np.zeros((len(x), 1)), l2_norm_clip)
    got = np.sqrt(sum(float(np.sum(np.square(np.asarray(ops.cast(g, "float32"), np.float64)))) for g in got_sum))
    return got, np.asarray(got_norms)


@pytest.mark.parametrize("device", ["TF32 emulated", "this device"])
def test_tf32_dense_contribution_is_bounded_a_priori_within_the_clip_norm(device, monkeypatch):
    """A float32 Dense on 64 positions (input e₁ everywhere, output gradients ``v`` alternating 1 and −(1 − 2⁻¹⁰)),
    ‖∇W‖ = 2⁻⁵. Where matmuls round to TF32 a book-keeping matmul at the plain factor c = C/‖∇W‖ adds
    ``Σ_t tf32(c·v_t)`` = 1.93·C (so it did on an H200 before). The Dense rule's operands bound that rounding a
    priori: the factor clips ``N + κ‖a‖_F‖g‖_F`` (``bookkeeping.rounding_slack``), and the contribution stays
    within C; with exact matmuls under it (emulated on a CPU) it is ``C·N/(N + κ‖a‖‖g‖)`` (to the float32
    rounding of ``c·g``, which these cancelling positions amplify to 5e-5)."""
    from tan_keras.ghost import bookkeeping, registry

    exact = _tf32_device(device, monkeypatch)
    positions, width = 64, 256
    assert registry.use_ghost(positions, width, width)
    v = _tf32_alternating(positions)
    x = np.zeros((1, positions, width), "float32")
    x[0, :, 0] = 1.0
    model = _tf32_case(keras.layers.Dense(width, use_bias=False), (positions, width), x, v, width)
    l2_norm_clip = 0.01619749
    c = np.float32(np.float32(l2_norm_clip) / np.float32(2.0**-5))
    assert np.sum(_tf32(c * v).astype(np.float64)) > 1.9 * l2_norm_clip

    got, norms = _contribution_norm(model, x, l2_norm_clip)
    np.testing.assert_allclose(norms, [2.0**-5], rtol=1e-6)
    assert got <= l2_norm_clip
    if exact:
        u = 2.0**-10  # TF32's 11 bits: the largest relative rounding error, to nearest or truncated
        kappa = (1 + u) * (4 * u + 2.0**-22) / (1 - u) ** 2
        assert bookkeeping.rounding_slack(11) == pytest.approx(kappa, rel=1e-12)
        slack = kappa * np.sqrt(positions) * np.linalg.norm(v.astype(np.float64))  # ‖a‖_F = √64: e₁ everywhere
        np.testing.assert_allclose(got, l2_norm_clip * 2.0**-5 / (2.0**-5 + slack), rtol=2e-4)


@pytest.mark.parametrize("device", ["TF32 emulated", "this device"])
def test_tf32_embedding_contribution_is_measured_and_halved_within_the_clip_norm(device, monkeypatch):
    """A rule without operand bounds (Embedding) is measured where matmuls round: its cotangent is rounded to
    TF32 once, explicitly, for the norm of what it adds and for the share itself. One id at 64 positions and the
    alternating gradients: the share at the margin-reduced factor would be 1.93·C; the step measures it and
    halves the factor, so the example's contribution stays within C."""
    from tan_keras.ghost import bookkeeping

    _tf32_device(device, monkeypatch)
    positions, width = 64, 256
    v = _tf32_alternating(positions)
    ids = np.zeros((1, positions), "int32")
    model = _tf32_case(keras.layers.Embedding(4, width), (positions,), ids, v, width)
    l2_norm_clip = 0.01618556
    c = np.float32(np.float32(l2_norm_clip / (1.0 + bookkeeping.ROUNDING_MARGIN)) / np.float32(2.0**-5))
    assert np.sum(_tf32(c * v).astype(np.float64)) > 1.9 * l2_norm_clip

    got, norms = _contribution_norm(model, ids, l2_norm_clip)
    np.testing.assert_allclose(norms, [2.0**-5], rtol=1e-6)
    assert 0.4 * l2_norm_clip < got <= l2_norm_clip


def test_tf32_bound_costs_ordinary_clipped_examples_under_two_percent_of_their_norm(monkeypatch):
    """With ordinary data (two tanh Dense layers on 16 positions, ghost form) the a-priori TF32 bound shrinks a
    clipped example's contribution by ``N/(N + slack)``: each example alone, against a one-example loop of the
    backend's autodiff, keeps its direction and comes out within 2% below C (emulated 11 bits, exact matmuls)."""
    from keras import ops

    monkeypatch.setattr(tan_keras.per_example, "float32_matmul_bits", lambda: 11)
    model, x, y = _two_dense_token_case(None)
    loop = [np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in grads])
            for grads in tan_keras.per_example.loop_per_example_gradients(model, x, y)]
    l2_norm_clip = 0.5 * min(np.linalg.norm(g) for g in loop)  # every example is clipped
    for i, want in enumerate(loop):
        got_sum, _ = tan_keras.per_example.clipped_sum_and_norms(model, x[i:i + 1], y[i:i + 1], l2_norm_clip)
        got = np.concatenate([np.ravel(np.asarray(ops.cast(g, "float32"), np.float64)) for g in got_sum])
        assert 0.98 * l2_norm_clip < np.linalg.norm(got) <= l2_norm_clip
        assert np.dot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want)) > 1 - 1e-6


def _bf16_strided_conv_case(layer, seed):
    """A 3×3, stride-2, "same" conv ``layer`` of 32 filters (mixed_bfloat16) on 5×5×32 inputs, in the ghost form,
    under a fixed readout (``∂ℓ/∂z = u``): ``(private model, x, u, plain)`` with ``x`` and ``u`` exact in bf16
    and ``plain`` the float64 kernel gradient ``Σ_i patches_iᵀ u`` (TF pads 1 before and 1 after)."""
    import ml_dtypes

    from tan_keras.ghost import registry

    side, channels, filters, batch, out_side = 5, 32, 32, 3, 3
    assert registry.use_ghost(out_side * out_side, 9 * channels, filters)
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(out_side, out_side, filters)).astype(bf16).astype("float32")  # ∂ℓ/∂z per example
    x = rng.normal(size=(batch, side, side, channels)).astype(bf16).astype("float32")
    inputs = keras.Input((side, side, channels))
    readout = _Readout(u.reshape(out_side, out_side * filters), dtype="mixed_bfloat16")
    reshape = keras.layers.Reshape((out_side, out_side * filters), dtype="mixed_bfloat16")
    model = tan_keras.make_private(keras.Model(inputs, readout(reshape(layer(inputs)))), clipping="ghost")
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0),
                  loss=lambda y_true, y_pred: y_pred[:, 0])
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    plain = np.stack([np.stack([np.einsum("bhwc,hwp->cp", padded[:, a:a + 5:2, b:b + 5:2], u)
                                for b in range(3)]) for a in range(3)])
    return model, x, u, plain


def _summed_conv_kernel(monkeypatch, mode):
    """Sets ``TAN_KERAS_FUSED_CONV`` to ``mode`` ("off", or "interpret": the fused kernel in Pallas's interpreter,
    JAX only) and returns a list that records, per call of ``per_example.fused_conv_weight_grad``, whether the
    kernel gave the sum."""
    if mode == "interpret" and keras.backend.backend() != "jax":
        pytest.skip("the fused kernel is JAX's (Pallas)")
    monkeypatch.setenv("TAN_KERAS_FUSED_CONV", mode)
    backend = tan_keras.per_example._backend_module()
    original, calls = backend.fused_conv_weight_grad, []
    monkeypatch.setattr(backend, "fused_conv_weight_grad",
                        lambda *a, **k: calls.append(original(*a, **k)) or calls[-1])
    return calls


@pytest.mark.parametrize("fused", ["off", "interpret"])
def test_bf16_ghost_form_conv_share_of_the_clipped_sum_is_the_float32_sum_of_exact_products(fused, monkeypatch):
    """The same for a Conv2D in the ghost form against float64 numpy (strided, "same" padding, with a bias), its
    kernel's share by one matmul per kernel offset ("off") or by the fused kernel's row groups ("interpret")."""
    from keras import ops

    calls = _summed_conv_kernel(monkeypatch, fused)

    layer = keras.layers.Conv2D(32, 3, strides=2, padding="same", dtype="mixed_bfloat16")
    model, x, u, want_kernel = _bf16_strided_conv_case(layer, seed=1)
    batch = x.shape[0]
    got_sum, _ = tan_keras.per_example.clipped_sum_and_norms(model, x, np.zeros((batch, 1)), 1e9)  # no clipping
    assert calls and all((c is not None) == (fused == "interpret") for c in calls)
    for got, want in [(got_sum[0], want_kernel), (got_sum[1], batch * u.astype(np.float64).sum(axis=(0, 1)))]:
        got = np.asarray(ops.cast(got, "float32"), np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_bf16_ghost_form_share_of_the_clipped_sum_is_the_float32_sum_of_exact_products():
    """A bf16 ghost-form layer's weight gradient summed over the batch comes back float32-accurate (the
    book-keeping VJP runs in float32 on the same bf16 values), not rounded to bf16 (~2e-3) after the sum."""
    import ml_dtypes
    from keras import ops

    from tan_keras.ghost import registry

    positions, width, batch = 16, 48, 4
    assert registry.use_ghost(positions, width, width)
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    u = rng.normal(size=(positions, width)).astype(bf16).astype("float32")  # ∂ℓ/∂z, exact in bf16
    x = rng.normal(size=(batch, positions, width)).astype(bf16).astype("float32")
    inputs = keras.Input((positions, width))
    z = keras.layers.Dense(width, use_bias=False, dtype="mixed_bfloat16")(inputs)
    model = tan_keras.make_private(keras.Model(inputs, _Readout(u, dtype="mixed_bfloat16")(z)), clipping="ghost")
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0),
                  loss=lambda y_true, y_pred: y_pred[:, 0])
    got_sum, _ = tan_keras.per_example.clipped_sum_and_norms(model, x, np.zeros((batch, 1)), 1e9)  # no clipping
    want = np.einsum("btd,tp->dp", x.astype(np.float64), u.astype(np.float64))
    got = np.asarray(ops.cast(got_sum[0], "float32"), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _ws_conv_loss_grads_f64(kernel, gain, eps, plain):
    """float64 ``(∇W, ∇γ)`` of ``L = Σ_o ⟨G_o, Ŵ_o⟩``, ``Ŵ = γ (W - mean) / sqrt(Σ(W - mean)² + eps)`` per output
    channel, by central differences of that formula (not its chain rule): ``plain`` is G = ∂L/∂Ŵ."""
    def loss(w, g, plain_o):  # w (m, fan_in), the channel's gain g and plain gradient (fan_in,): one value per row
        centred = w - w.mean(axis=1, keepdims=True)
        return g * np.sum(plain_o * centred / np.sqrt(np.sum(centred**2, axis=1, keepdims=True) + eps), axis=1)

    fan_in = int(np.prod(kernel.shape[:3]))
    grad_w, grad_gain, h = np.zeros((kernel.shape[-1], fan_in)), np.zeros(kernel.shape[-1]), 1e-5
    steps = h * np.eye(fan_in)
    for o in range(kernel.shape[-1]):
        w, plain_o = kernel[..., o].reshape(-1), plain[..., o].reshape(-1)
        grad_w[o] = (loss(w + steps, gain[o], plain_o) - loss(w - steps, gain[o], plain_o)) / (2 * h)
        grad_gain[o] = (loss(w[None], gain[o] + h, plain_o) - loss(w[None], gain[o] - h, plain_o))[0] / (2 * h)
    return np.moveaxis(grad_w.reshape((kernel.shape[-1],) + kernel.shape[:3]), 0, -1), grad_gain


@pytest.mark.parametrize("fused", ["off", "interpret"])
def test_bf16_ghost_form_ws_conv_share_of_the_clipped_sum_is_the_float32_sum_through_the_standardization(
        fused, monkeypatch):
    """A bf16 ScaledWSConv2D in the ghost form: its rule's weight gradients at a 16-bit cotangent (one bf16
    matmul per kernel offset with float32 sums, then the standardization's chain rule) and the clipped sum that
    book-keeping takes from them equal float64 numpy: the plain conv gradient of the same bf16 values, pushed
    through the standardization by central differences. Strided, "same" padding, a bias, gains ≠ 1; the plain
    gradient by one matmul per offset ("off") or the fused kernel's row groups ("interpret")."""
    from keras import ops

    calls = _summed_conv_kernel(monkeypatch, fused)

    from models.layers import ScaledWSConv2D
    from tan_keras.ghost import registry

    layer = ScaledWSConv2D(32, 3, strides=2, padding="same", dtype="mixed_bfloat16")
    private, x, u, plain = _bf16_strided_conv_case(layer, seed=2)
    batch, rng = x.shape[0], np.random.default_rng(3)
    layer.gain.assign(rng.uniform(0.5, 2.0, size=(32,)).astype("float32"))
    layer.bias.assign(rng.normal(size=(32,)).astype("float32"))
    want_kernel, want_gain = _ws_conv_loss_grads_f64(np.asarray(layer.kernel, np.float64),
                                                     np.asarray(layer.gain, np.float64), layer.eps, plain)
    want = [want_kernel, want_gain, batch * u.astype(np.float64).sum(axis=(0, 1))]

    rule = registry.rule_for(layer)
    assert rule.weight_grads is not None
    cotangent = ops.cast(np.broadcast_to(u, (batch,) + u.shape), "bfloat16")
    shares = rule.weight_grads(layer, ops.cast(x, "bfloat16"), cotangent)
    assert [v.path for v, _ in shares] == [v.path for v in (layer.kernel, layer.gain, layer.bias)]
    got_sum, _ = tan_keras.per_example.clipped_sum_and_norms(private, x, np.zeros((batch, 1)), 1e9)  # no clipping
    assert calls and all((c is not None) == (fused == "interpret") for c in calls)
    for (_, share), summed, expected in zip(shares, got_sum, want):
        for got in (share, summed):
            got = np.asarray(ops.cast(got, "float32"), np.float64)
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
