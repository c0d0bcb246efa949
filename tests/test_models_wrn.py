"""Tests for models.wrn (GroupNorm Wide ResNet of TAN) and its initializer.

Run on both backends:
    KERAS_BACKEND=tensorflow pytest -q tests/test_models_wrn.py
    KERAS_BACKEND=jax        pytest -q tests/test_models_wrn.py
"""

import math

import keras
import numpy as np
import pytest

from models.layers import FanInTruncatedNormal, ScaledWSConv2D
from models.wrn import WideResNet, wrn_16_4


def wrn_param_count(depth, width, num_classes, in_channels=3, ws_gain=False):
    """Analytic parameter count of TAN's WideResNet (GroupNorm has 2 params per channel).

    Per block (in -> out): GN(in) + conv3x3(in, out) + GN(out) + conv3x3(out, out),
    plus GN(in) + conv1x1(in, out) when in != out. Stem conv3x3(3, 16), final
    GN(64k), Dense(64k, classes). Convs have a bias; WS convs also a gain.
    """
    extra = 1 if ws_gain else 0

    def conv(k, cin, cout):
        return k * k * cin * cout + cout + extra * cout

    n = (depth - 4) // 6
    chans = [16, 16 * width, 32 * width, 64 * width]
    total = conv(3, in_channels, chans[0])
    cin = chans[0]
    for cout in chans[1:]:
        for _ in range(n):
            total += 2 * cin + conv(3, cin, cout) + 2 * cout + conv(3, cout, cout)
            if cin != cout:
                total += 2 * cin + conv(1, cin, cout)
            cin = cout
    total += 2 * cin + cin * num_classes + num_classes
    return total


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32")


def test_wrn_16_4_parameter_count_equals_analytic_count_of_2_75M():
    model = wrn_16_4(num_classes=10)
    expected = wrn_param_count(16, 4, 10)
    assert expected == 2_751_562
    assert model.count_params() == expected
    assert abs(model.count_params() - 2.75e6) / 2.75e6 < 0.02


def test_wrn_weight_standardization_adds_one_gain_per_conv_output_channel():
    model = WideResNet(depth=10, width=2, weight_standardization=True)
    convs = [layer for layer in model.layers if "conv" in layer.name]
    assert convs and all(isinstance(layer, ScaledWSConv2D) for layer in convs)
    assert model.count_params() == wrn_param_count(10, 2, 10, ws_gain=True)


@pytest.mark.parametrize("order", ["relu_gn", "gn_relu"])
def test_wrn_16_4_forward_gives_finite_logits_for_both_orders(order, images):
    model = wrn_16_4(num_classes=10, order=order)
    logits = np.asarray(model(images, training=False))
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize("order", ["relu_gn", "gn_relu"])
def test_wrn_order_sets_which_of_relu_and_groupnorm_comes_first(order):
    model = WideResNet(depth=10, width=1, order=order)
    for prefix in ("group2_block1_pre1", "group2_block1_shortcut", "final"):
        relu, gn = model.get_layer(f"{prefix}_relu"), model.get_layer(f"{prefix}_gn")
        if order == "relu_gn":  # conv(GN(ReLU(x)))
            assert gn.input is relu.output
        else:  # conv(ReLU(GN(x)))
            assert relu.input is gn.output


def test_wrn_has_no_batch_normalization_and_groupnorm_uses_16_groups():
    model = wrn_16_4()
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.GroupNormalization)]
    # 3 groups x 2 blocks x 2 norms + 3 shortcut norms + 1 final norm
    assert len(norms) == 16
    assert all(layer.groups == 16 for layer in norms)


def test_wrn_16_4_stages_have_16_64_128_256_channels_and_identity_or_1x1_shortcuts():
    model = wrn_16_4()
    assert model.get_layer("stem_conv").filters == 16
    for g, filters in zip((1, 2, 3), (64, 128, 256)):
        for b in (1, 2):
            assert model.get_layer(f"group{g}_block{b}_conv1").filters == filters
        assert model.get_layer(f"group{g}_block1_shortcut_conv").kernel_size == (1, 1)
    shortcut_convs = [layer.name for layer in model.layers if layer.name.endswith("_shortcut_conv")]
    assert shortcut_convs == [f"group{g}_block1_shortcut_conv" for g in (1, 2, 3)]
    assert model.get_layer("group3_block2_out").output.shape[1:] == (8, 8, 256)


def test_wrn_init_is_fan_in_normal_kernels_and_zero_biases():
    keras.utils.set_random_seed(0)
    model = wrn_16_4()
    for name in ("group3_block2_conv2", "logits"):
        layer = model.get_layer(name)
        kernel = np.asarray(layer.kernel)
        fan_in = math.prod(kernel.shape[:-1])
        # The sample std of n normal draws has relative standard error 1/sqrt(2n)
        # (1.4% for the 2,560-entry logits kernel): allow 5 standard errors.
        assert kernel.std() == pytest.approx(1 / math.sqrt(fan_in), rel=5 / math.sqrt(2 * kernel.size))
        assert abs(kernel.mean()) < 0.1 / math.sqrt(fan_in)
        assert np.all(np.asarray(layer.bias) == 0)


def test_fan_in_truncated_normal_std_is_one_over_sqrt_fan_in_and_bounds_are_absolute():
    keras.utils.set_random_seed(1)
    # fan_in = 3*3*64 = 576: bounds +-2 are ~48 std away, so the draw is a plain normal.
    w = np.asarray(FanInTruncatedNormal()((3, 3, 64, 64)))
    assert w.std() == pytest.approx(1 / 24, rel=0.02)
    # fan_in = 1: std 1 cut at +-2 (torch trunc_normal_ with a=-2, b=2): std of N(0,1) on [-2, 2] is 0.8796.
    w1 = np.asarray(FanInTruncatedNormal()((1, 20000)))
    assert w1.min() >= -2.0 and w1.max() <= 2.0
    assert w1.std() == pytest.approx(0.8796, rel=0.03)


def test_fan_in_truncated_normal_round_trips_through_keras_serialization():
    init = FanInTruncatedNormal(scale=2.0, seed=3)
    clone = keras.initializers.deserialize(keras.initializers.serialize(init))
    assert isinstance(clone, FanInTruncatedNormal)
    assert clone.get_config() == init.get_config()
    np.testing.assert_array_equal(np.asarray(clone((4, 5))), np.asarray(init((4, 5))))


def test_wrn_with_ws_convs_saves_and_reloads_with_identical_outputs(tmp_path, images):
    model = WideResNet(depth=10, width=1, weight_standardization=True, order="gn_relu")
    path = str(tmp_path / "wrn.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(np.asarray(reloaded(images)), np.asarray(model(images)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"order": "bn_relu"}, "order"), ({"depth": 15}, "depth"), ({"width": 0}, "width"), ({"groups": 5}, "groups")],
)
def test_wrn_rejects_bad_arguments_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WideResNet(**kwargs)
