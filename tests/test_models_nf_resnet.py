"""Tests for models.nf_resnet (NF-ResNet of TAN / De et al.) and the layers it uses.

Run on both backends:
    KERAS_BACKEND=tensorflow pytest -q tests/test_models_nf_resnet.py
    KERAS_BACKEND=jax        pytest -q tests/test_models_nf_resnet.py
"""

import math

import keras
import numpy as np
import pytest
from keras import ops

from models.layers import RELU_GAMMA, ScaledActivation, ScaledWSConv2D, SkipInitGain
from models.nf_resnet import (
    STAGE_CHANNELS,
    STAGE_DEPTHS,
    NFResNet,
    expected_block_variances,
    make_divisible,
    nf_block_output_model,
    nf_block_output_names,
    nf_resnet26,
    nf_resnet50,
)

# Signal-propagation models: NF-ResNet-50 stage depths (3, 4, 6, 3), 1/8 width
# (bottlenecks 8..64 channels), 32x32 inputs with the small-input stem.
SIGPROP_WIDTH = 0.125


# --------------------------------------------------------------------------- helpers


def numpy_standardize(kernel, gain, eps):
    """Reference W_hat = gain * (W - mean) / sqrt(var * fan_in + eps), per output channel."""
    axes = tuple(range(kernel.ndim - 1))
    fan_in = np.prod(kernel.shape[:-1])
    mean = kernel.mean(axis=axes, keepdims=True)
    var = kernel.var(axis=axes, keepdims=True)
    return gain * (kernel - mean) / np.sqrt(var * fan_in + eps)


def numpy_conv_same(x, kernel, stride):
    """Reference channels-last conv with TF/Keras "same" padding (extra pad at the end)."""
    n, h, w, _ = x.shape
    kh, kw, _, cout = kernel.shape
    out_h, out_w = -(-h // stride), -(-w // stride)
    pad_h = max((out_h - 1) * stride + kh - h, 0)
    pad_w = max((out_w - 1) * stride + kw - w, 0)
    xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    out = np.zeros((n, out_h, out_w, cout), dtype=np.float64)
    for dy in range(kh):
        for dx in range(kw):
            patch = xp[:, dy : dy + (out_h - 1) * stride + 1 : stride, dx : dx + (out_w - 1) * stride + 1 : stride, :]
            out += np.einsum("nhwc,co->nhwo", patch, kernel[dy, dx])
    return out


def nf_resnet_param_count(stage_depths, num_classes, width_multiplier=1.0, small_inputs=False, in_channels=3):
    """Analytic parameter count: each WS conv has k*k*in*out weights + out biases + out gains."""

    def ws_conv(k, cin, cout):
        return k * k * cin * cout + 2 * cout

    stem = make_divisible(64 * width_multiplier)
    total = ws_conv(3 if small_inputs else 7, in_channels, stem)
    cin = stem
    for s, depth in enumerate(stage_depths):
        cout = make_divisible(STAGE_CHANNELS[s] * width_multiplier)
        mid = make_divisible(cout * 0.25)
        for b in range(depth):
            total += ws_conv(1, cin, mid) + ws_conv(3, mid, mid) + ws_conv(1, mid, cout) + 1  # + skip_gain
            if b == 0:
                total += ws_conv(1, cin, cout)  # transition shortcut
            cin = cout
    return total + cin * num_classes + num_classes


def block_variances(model, x):
    """Per block output: mean over channels of the per-channel variance over (batch, H, W),
    and mean over channels of the squared per-channel mean."""
    outs = nf_block_output_model(model)(x)
    variances = [float(np.asarray(o).var(axis=(0, 1, 2)).mean()) for o in outs]
    squared_means = [float((np.asarray(o).mean(axis=(0, 1, 2)) ** 2).mean()) for o in outs]
    return variances, squared_means


def split_by_stage(values, stage_depths):
    out, i = [], 0
    for d in stage_depths:
        out.append(values[i : i + d])
        i += d
    return out


@pytest.fixture(scope="module")
def noise_images():
    """N(0, 1) inputs for the signal-propagation tests (batch 16, 32x32x3)."""
    return np.random.default_rng(0).standard_normal((16, 32, 32, 3)).astype("float32")


def sigprop_model(**kwargs):
    """NF-ResNet-50 stage depths at 1/8 width, 32x32 small-input stem, seeded init (NumPy draws:
    the same weights on every backend)."""
    keras.utils.set_random_seed(0)
    return nf_resnet50(
        num_classes=10, input_shape=(32, 32, 3), width_multiplier=SIGPROP_WIDTH, small_inputs=True, **kwargs
    )


# --------------------------------------------------------------------------- ScaledWSConv2D


def test_ws_conv_standardized_kernel_has_zero_mean_and_fan_in_variance_equal_gain_squared():
    layer = ScaledWSConv2D(5, 3, eps=0.0)
    layer.build((None, 8, 8, 4))
    rng = np.random.default_rng(1)
    layer.kernel.assign(rng.normal(0.7, 3.0, size=(3, 3, 4, 5)).astype("float32"))  # off-centre, badly scaled
    gain = rng.uniform(0.5, 2.0, size=5).astype("float32")
    layer.gain.assign(gain)
    w_hat = np.asarray(layer.standardized_kernel()).reshape(-1, 5)
    fan_in = 3 * 3 * 4
    np.testing.assert_allclose(w_hat.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(w_hat.var(axis=0) * fan_in, gain**2, rtol=1e-5)


@pytest.mark.parametrize("strides, kernel_size", [(1, 3), (2, 3), (2, 1)])
def test_ws_conv_forward_matches_numpy_standardized_conv(strides, kernel_size):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 7, 6, 3)).astype("float32")
    layer = ScaledWSConv2D(4, kernel_size, strides=strides, eps=1e-4)
    layer.build(x.shape)
    layer.gain.assign(rng.uniform(0.5, 2.0, size=4).astype("float32"))
    layer.bias.assign(rng.standard_normal(4).astype("float32"))
    w_hat = numpy_standardize(np.asarray(layer.kernel, np.float64), np.asarray(layer.gain, np.float64), 1e-4)
    expected = numpy_conv_same(x.astype(np.float64), w_hat, strides) + np.asarray(layer.bias)
    got = np.asarray(layer(x))
    assert got.shape == expected.shape == tuple(layer.compute_output_shape(x.shape))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_ws_conv_gradients_through_standardization_match_finite_differences():
    """One SGD step (lr = 1) of loss = sum(R * conv(x)) moves each weight by -dL/dw; compare with
    central finite differences of the float64 NumPy reference."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 5, 2)).astype("float32")
    r = rng.standard_normal((2, 5, 5, 3)).astype("float32")
    eps = 1e-3
    model = keras.Sequential([keras.Input((5, 5, 2)), ScaledWSConv2D(3, 3, eps=eps, name="ws")])
    layer = model.get_layer("ws")
    layer.gain.assign(rng.uniform(0.5, 2.0, size=3).astype("float32"))
    before = {v.name: np.asarray(v, np.float64) for v in (layer.kernel, layer.gain, layer.bias)}
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss=lambda y, p: ops.sum(y * p))
    model.train_on_batch(x, r)
    after = {v.name: np.asarray(v, np.float64) for v in (layer.kernel, layer.gain, layer.bias)}
    grads = {name: before[name] - after[name] for name in before}

    def loss(params):
        w_hat = numpy_standardize(params["kernel"], params["gain"], eps)
        return float(np.sum(r * (numpy_conv_same(x.astype(np.float64), w_hat, 1) + params["bias"])))

    h = 1e-6
    for name in before:
        fd = np.zeros_like(before[name])
        for idx in np.ndindex(fd.shape):
            plus = {k: v.copy() for k, v in before.items()}
            minus = {k: v.copy() for k, v in before.items()}
            plus[name][idx] += h
            minus[name][idx] -= h
            fd[idx] = (loss(plus) - loss(minus)) / (2 * h)
        np.testing.assert_allclose(grads[name], fd, rtol=2e-3, atol=2e-3 * np.abs(fd).max(), err_msg=name)
    # The standardization really is differentiated: the kernel gradient is centred per output channel.
    kernel_grad = grads["kernel"].reshape(-1, 3)
    np.testing.assert_allclose(kernel_grad.sum(axis=0), 0.0, atol=1e-3 * np.abs(kernel_grad).max())


def test_relu_gamma_gives_unit_variance_relu_of_standard_normal():
    z = np.random.default_rng(4).standard_normal(400_000).astype("float32")
    out = np.asarray(ScaledActivation("relu", RELU_GAMMA)(z))
    assert RELU_GAMMA == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-3)  # timm's constant
    assert out.var() == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize(
    "layer",
    [ScaledWSConv2D(4, 3, strides=2, eps=1e-6, gain_init=0.5), ScaledActivation("relu", 1.5), SkipInitGain(0.3, 0.0)],
)
def test_custom_layers_round_trip_through_keras_serialization(layer):
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(clone) is type(layer)
    assert clone.get_config() == layer.get_config()


# --------------------------------------------------------------------------- architecture


@pytest.fixture(scope="module")
def nf_resnet50_imagenet():
    return nf_resnet50(num_classes=1000)  # 224x224x3; inspected, never run


def test_nf_resnet50_has_25_6M_parameters_at_1000_classes(nf_resnet50_imagenet):
    model = nf_resnet50_imagenet
    expected = nf_resnet_param_count(STAGE_DEPTHS[50], 1000)
    assert expected == 25_557_048
    assert model.count_params() == expected
    assert abs(model.count_params() - 25.5e6) / 25.5e6 < 0.03


def test_nf_resnet50_stages_have_bottleneck_widths_64_to_512_with_expansion_4(nf_resnet50_imagenet):
    model = nf_resnet50_imagenet
    for s, mid in enumerate((64, 128, 256, 512), start=1):
        assert model.get_layer(f"stage{s}_block1_conv2").filters == mid
        assert model.get_layer(f"stage{s}_block1_conv3").filters == 4 * mid
    assert nf_block_output_names(model)[-1] == "stage4_block3_out"
    assert model.get_layer("stage4_block3_out").output.shape[1:] == (7, 7, 2048)


def test_nf_resnet26_small_inputs_gives_finite_logits_of_shape_batch_by_classes(noise_images):
    model = nf_resnet26(num_classes=10, input_shape=(32, 32, 3), width_multiplier=SIGPROP_WIDTH, small_inputs=True)
    assert model.count_params() == nf_resnet_param_count((2, 2, 2, 2), 10, SIGPROP_WIDTH, small_inputs=True)
    assert model.get_layer("stage1_block1_out").output.shape[1:3] == (32, 32)  # 3x3/1 stem, no max-pool
    # The signal-propagation batch (16 x 32x32x3): on JAX its per-op compiles are shared by all tests here.
    logits = np.asarray(model(noise_images))
    assert logits.shape == (16, 10)
    assert np.all(np.isfinite(logits))


def test_nf_resnet_has_no_normalization_layers():
    model = nf_resnet26(num_classes=10, input_shape=(32, 32, 3), width_multiplier=SIGPROP_WIDTH, small_inputs=True)
    norm_types = (keras.layers.BatchNormalization, keras.layers.GroupNormalization, keras.layers.LayerNormalization)
    assert not any(isinstance(layer, norm_types) for layer in model.layers)


def test_nf_block_with_zero_skip_gain_is_identity_on_non_transition_blocks(noise_images):
    model = sigprop_model(skip_gain_init=0.0)
    outs = dict(zip(nf_block_output_names(model), nf_block_output_model(model)(noise_images)))
    np.testing.assert_array_equal(np.asarray(outs["stage3_block2_out"]), np.asarray(outs["stage3_block6_out"]))


def test_nf_resnet_saves_and_reloads_with_identical_outputs(tmp_path, noise_images):
    model = NFResNet(
        (1, 1), 5, (32, 32, 3), width_multiplier=SIGPROP_WIDTH, small_inputs=True, skip_gain_init=0.5
    )
    path = str(tmp_path / "nf.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        np.asarray(reloaded(noise_images)), np.asarray(model(noise_images)), rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------- signal propagation at init


def test_expected_block_variance_grows_by_alpha_squared_and_resets_after_transitions():
    assert expected_block_variances((3, 2), alpha=0.5) == [[1.25, 1.5, 1.75], [1.25, 1.5]]


def test_nf_block_variance_grows_as_designed_beta_squared_within_each_stage(noise_images):
    """alpha = 1 so the designed growth (2, 3, ..., 7 in stage 3) is large next to the tolerance.

    Within a stage, block i's input is divided by its designed std beta_i, so its
    residual branch adds alpha^2 * Var(x_i) / beta_i^2 and Var(x_i) / beta_i^2 stays
    constant: Var(block_i) / Var(block_0) = E_i / E_0 whatever the stage's scale.
    Tolerance 20%: at 1/8 width the bottlenecks have 8-64 channels, WS projects out
    the part of the input shared by all channels, and 3x3 zero padding covers most
    of the 4x4 maps of stage 4; over seeds the ratio stays within ~10%.
    Without the 1/beta scaling stage 3 would grow as 2^i (x32 instead of x3.5).
    """
    depths = STAGE_DEPTHS[50]
    variances, _ = block_variances(sigprop_model(alpha=1.0), noise_images)
    for got, want in zip(split_by_stage(variances, depths), expected_block_variances(depths, 1.0)):
        growth = np.array(got) / got[0]
        designed = np.array(want) / want[0]
        np.testing.assert_allclose(growth, designed, rtol=0.2)


def test_nf_first_stage_block_variance_matches_designed_value(noise_images):
    """Stage 1 has no pooling: the stem and the WS-conv shortcut output unit variance,
    so Var(block_i) = 1 + (i + 1) alpha^2 up to finite-width fluctuations (25%)."""
    depths = STAGE_DEPTHS[50]
    for alpha in (0.2, 1.0):
        variances, _ = block_variances(sigprop_model(alpha=alpha), noise_images)
        got = split_by_stage(variances, depths)[0]
        np.testing.assert_allclose(got, expected_block_variances(depths, alpha)[0], rtol=0.25)


def test_nf_block_variance_stays_near_design_and_centred_with_strided_shortcuts(noise_images):
    """With strided 1x1 shortcuts (no 2x2 average of white noise) the designed variance
    holds across all 16 blocks within a factor 1.6 (over seeds 0-5 the ratio to design
    lies in [0.71, 1.08]: finite-width losses compound from stage to stage; gamma = 1
    would be ~100x off), and the average squared channel mean stays < 10% of the
    variance (WS removes the ReLU mean shift, Brock et al. 2021)."""
    depths = STAGE_DEPTHS[50]
    variances, squared_means = block_variances(sigprop_model(avg_down=False), noise_images)
    ratio = np.array(variances) / np.concatenate(expected_block_variances(depths, 0.2))
    assert np.all((ratio > 1 / 1.6) & (ratio < 1.6)), ratio
    assert np.all(np.array(squared_means) < 0.1 * np.array(variances))


def test_nf_signal_propagation_check_rejects_gamma_1_of_the_tan_code(noise_images):
    """Negative control: with gamma = 1 (TAN's unused ``scale``) each ReLU halves the
    second moment, the residual branches add ~alpha^2/8, and the designed growth fails."""
    depths = STAGE_DEPTHS[50]
    variances, _ = block_variances(sigprop_model(alpha=1.0, activation_gamma=1.0), noise_images)
    stage3 = split_by_stage(variances, depths)[2]
    designed = expected_block_variances(depths, 1.0)[2]
    assert stage3[-1] / stage3[0] < 0.5 * designed[-1] / designed[0]


@pytest.mark.parametrize("kwargs, field", [({"depth": 34}, "depth"), ({"width_multiplier": 0}, "width_multiplier")])
def test_nf_resnet_rejects_bad_arguments_naming_the_field(kwargs, field):
    from models.nf_resnet import nf_resnet

    with pytest.raises(ValueError, match=field):
        nf_resnet(**kwargs)


def test_make_divisible_rounds_widths_like_timm():
    assert [make_divisible(v) for v in (64, 32, 8, 12, 4)] == [64, 32, 8, 16, 8]
