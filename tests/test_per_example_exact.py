"""The compiled train step's per-example gradients equal a one-example-at-a-time loop, per layer and per model.

The reference is written here, independent of tan_keras: each example alone
(a batch of one) through the model and its loss, differentiated by the
backend's own autodiff (an eager ``tf.GradientTape`` / ``jax.grad``), with no
``vectorized_map``, ``vmap`` or ghost norm. Against it:

* the vectorized strategy: the per-example gradients of every variable, as the
  step computes them (``tan_keras.per_example_gradients``: under XLA on TF);
* the ghost strategy (book-keeping), where every layer has a rule: the
  per-example norms and the clipped sum ``Σ_i clip_C(∇ℓ_i)``
  (``tan_keras.per_example.clipped_sum_and_norms``, compiled as in the step).

Two examples have inputs scaled ×30 (gradient norms far above C), and C is the
median norm, so some examples are clipped and some are not. TensorFlow's
oneDNN ``BatchMatMulV2`` gave wrong per-example gradients for examples ≥ 3 of
an EinsumDense under ``vectorized_map`` (``docs/tf_onednn_batch_matmul.md``):
the batches here have 6 examples, so rows 3–5 are checked.
"""

import keras
import numpy as np
import pytest

import tan_keras
from models import dln, layers as model_layers, nf_resnet, wrn
from tan_keras import ghost_norms
from tan_keras.per_example import plan as plans

BACKEND = keras.backend.backend()
N = 6
MSE = keras.losses.MeanSquaredError()
XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def loop_grads(model, x, y, loss):
    """∇ℓ_i for each example alone, by the backend's own autodiff (a list per example of numpy arrays)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        out = []
        for i in range(len(x)):
            with tf.GradientTape() as tape:
                value = keras.ops.mean(loss(y[i:i + 1], model(x[i:i + 1], training=True)))
            out.append([np.asarray(tf.convert_to_tensor(g)) for g in
                        tape.gradient(value, model.trainable_variables,
                                      unconnected_gradients=tf.UnconnectedGradients.ZERO)])
        return out
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    kwargs = {"training": True} if model._call_has_training_arg else {}

    def one(trainable, xi, yi):
        y_pred, _ = model.stateless_call(trainable, non_trainable, xi, **kwargs)
        return keras.ops.mean(loss(yi, y_pred))  # a loss function (not a Loss) gives (1,)

    grad = jax.jit(jax.grad(one))  # one compile for the N examples (op by op, each op compiled: 43 s for a NF-ResNet)
    return [[np.asarray(g) for g in grad(trainable, x[i:i + 1], y[i:i + 1])] for i in range(len(x))]


def _floats(shape, rng):
    x = rng.normal(size=(N, *shape)).astype("float32")
    x[1] *= 30.0
    x[4] *= 30.0
    return x


def _regression(inputs, outputs, rng):
    model = keras.Model(inputs, outputs)
    return model, MSE, rng.normal(size=(N, *outputs.shape[1:])).astype("float32")


def dense(rng):
    inputs = keras.Input((4,))
    return (*_regression(inputs, keras.layers.Dense(3, activation="tanh")(inputs), rng), _floats((4,), rng))


def einsum_dense(rng):
    inputs = keras.Input((5, 4))
    out = keras.layers.EinsumDense("abc,cd->abd", output_shape=(5, 3), bias_axes="d")(inputs)
    return (*_regression(inputs, out, rng), _floats((5, 4), rng))


def multi_head_attention(rng):
    """Self-attention. Examples 1 and 4 get their large gradients from ×30 targets, not ×30 inputs: inputs ×30 put
    the softmax's logits ×900, where a float32 gradient (loop and step alike) is 1e-4 of its norm off a float64
    loop, more than the per-variable tolerance of the small query and key gradients, by amounts that differ
    between CPUs (AVX2 against AVX-512)."""
    inputs = keras.Input((5, 8))
    out = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
    model, loss, y = _regression(inputs, out, rng)
    y[[1, 4]] *= 30.0
    return model, loss, y, rng.normal(size=(N, 5, 8)).astype("float32")


def conv1d(rng):
    inputs = keras.Input((8, 3))
    out = keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2)(inputs)
    return (*_regression(inputs, out, rng), _floats((8, 3), rng))


def conv2d(rng):
    inputs = keras.Input((6, 6, 2))
    out = keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu")(inputs)
    return (*_regression(inputs, out, rng), _floats((6, 6, 2), rng))


def embedding(rng):
    inputs = keras.Input((5,), dtype="int32")
    out = keras.layers.Embedding(7, 4)(inputs)
    x = rng.integers(0, 7, size=(N, 5)).astype("int32")
    x[0] = [1, 2, 1, 1, 3]  # repeated ids: rows of the embedding gradient add up
    model, loss, y = _regression(inputs, out, rng)
    return model, loss, 30.0 * y, x


def layer_normalization(rng):
    inputs = keras.Input((5, 4))
    out = keras.layers.LayerNormalization()(inputs)
    return (*_regression(inputs, out, rng), _floats((5, 4), rng))


def group_normalization(rng):
    inputs = keras.Input((4, 4, 4))
    out = keras.layers.GroupNormalization(groups=2)(inputs)
    return (*_regression(inputs, out, rng), _floats((4, 4, 4), rng))


def ws_conv(rng):
    inputs = keras.Input((5, 5, 2))
    out = model_layers.ScaledWSConv2D(3, 3, strides=2, padding="valid", gain_init=0.7)(inputs)
    return (*_regression(inputs, out, rng), _floats((5, 5, 2), rng))


def skip_init(rng):
    inputs = keras.Input((4,))
    out = model_layers.SkipInitGain(alpha=0.2, gain_init=0.5)(keras.layers.Dense(3)(inputs))
    return (*_regression(inputs, out, rng), _floats((4,), rng))


def diagonal_linear_network(rng):
    model = dln.DiagonalLinearNetwork(7, alpha=rng.uniform(0.1, 1.0, size=7))
    model.build((None, 7))
    model.set_weights([w + rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    return model, dln.quarter_squared_error, rng.normal(size=(N, 1)).astype("float32"), _floats((7,), rng)


def wide_resnet(rng):
    model = wrn.WideResNet(depth=10, width=1, num_classes=3, order="gn_relu", weight_standardization=True)
    return model, XENT, rng.integers(0, 3, size=(N,)).astype("int32"), _floats((32, 32, 3), rng)


def nf_resnet_small(rng):
    model = nf_resnet.NFResNet((1, 1, 1, 1), num_classes=3, input_shape=(16, 16, 3), width_multiplier=0.125,
                               small_inputs=True)
    return model, XENT, rng.integers(0, 3, size=(N,)).astype("int32"), _floats((16, 16, 3), rng)


def transformer_block(rng):
    """Embedding, then self-attention, then LayerNorm (residual), then a GELU MLP (residual), then a head."""
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(11, 8)(inputs)
    h = keras.layers.LayerNormalization()(h + keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(h, h))
    mlp = keras.layers.Dense(8)(keras.layers.Dense(16, activation="gelu")(h))
    h = keras.layers.LayerNormalization()(h + mlp)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h))
    x = rng.integers(0, 11, size=(N, 6)).astype("int32")
    return keras.Model(inputs, out), XENT, rng.integers(0, 3, size=(N,)).astype("int32"), x


MODELS = [dense, einsum_dense, multi_head_attention, conv1d, conv2d, embedding, layer_normalization,
          group_normalization, ws_conv, skip_init, diagonal_linear_network, wide_resnet, nf_resnet_small,
          transformer_block]


def build(model_fn, clipping):
    keras.utils.set_random_seed(0)
    model, loss, y, x = model_fn(np.random.default_rng(0))
    model = tan_keras.make_private(model, clipping=clipping)
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0), loss=loss)
    return model, loss, x, y


def _norms(per_example):
    return np.array([np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in grads)) for grads in per_example])


def _clipped_sum(factors, per_example):
    """The loop's ``Σ_i c_i ∇ℓ_i``, one array per trainable variable."""
    return [sum(f * grads[j] for f, grads in zip(factors, per_example)) for j in range(len(per_example[0]))]


def _assert_close_per_variable(model, got, expected):
    """``got[j]`` against the loop's ``expected[j]`` for each trainable variable j.

    ``atol`` is relative to the variable's largest entry, floored at 1e-2 of
    the largest entry of any variable: a gradient that vanishes identically
    (attention's key bias, since the softmax ignores a shift of the keys) is
    float32 noise at the size of the model's gradient in both, and the noise
    differs between CPUs.
    """
    overall = max(float(np.max(np.abs(e))) for e in expected)
    for variable, value, want in zip(model.trainable_variables, got, expected):
        scale = max(float(np.max(np.abs(want))), 1e-3, 1e-2 * overall)
        np.testing.assert_allclose(np.asarray(value), want, rtol=1e-3, atol=1e-4 * scale, err_msg=variable.path)


@pytest.mark.parametrize("model_fn", MODELS)
def test_vectorized_step_per_example_gradients_equal_one_example_loop(model_fn):
    model, loss, x, y = build(model_fn, "vectorized")
    want = loop_grads(model, x, y, loss)
    got = [np.asarray(g) for g in tan_keras.per_example_gradients(model, x, y)]
    _assert_close_per_variable(model, got, [np.stack([grads[j] for grads in want]) for j in range(len(got))])


@pytest.mark.parametrize("model_fn", MODELS)
def test_ghost_step_norms_and_clipped_sum_equal_one_example_loop(model_fn):
    model, loss, x, y = build(model_fn, "ghost")
    assert ghost_norms.ghost_plan(model).reason is None
    want = loop_grads(model, x, y, loss)
    norms = _norms(want)
    l2_norm_clip = min(float(np.median(norms)), float(norms.max()) / 20)  # some examples far above C
    factors = np.minimum(1.0, l2_norm_clip / norms)
    got_sum, got_norms = tan_keras.per_example.clipped_sum_and_norms(model, x, y, l2_norm_clip)
    # atol: an example whose tanh saturates (dense, x·30) has a loop gradient of exactly 0, and the batched step's
    # tanh need not round to exactly ±1 as the loop's did (XLA CPU's at -O0: a norm of 1e-5 against max 1.5).
    np.testing.assert_allclose(np.asarray(got_norms), norms, rtol=1e-3, atol=1e-4 * norms.max())
    _assert_close_per_variable(model, got_sum, _clipped_sum(factors, want))


@pytest.mark.parametrize("model_fn", [einsum_dense, transformer_block, wide_resnet])
def test_check_per_example_passes_on_the_default_auto_step(model_fn):
    model, _, x, y = build(model_fn, "auto")
    report = tan_keras.check_per_example(model, x, y)
    assert report.strategy == "ghost"
    assert report.max_norm_error < 1e-3 and report.max_sum_error < 1e-3


class CenterOverBatch(keras.layers.Layer):
    """``t − mean_batch(t)``: weightless, and it mixes the examples of a batch."""

    def call(self, inputs):
        return inputs - keras.ops.mean(inputs, axis=0, keepdims=True)


def test_check_per_example_raises_on_a_batch_mixing_layer_under_ghost_naming_example_and_layer():
    inputs = keras.Input((4,))
    h = CenterOverBatch()(keras.layers.Dense(5, name="first_dense")(inputs))
    model = tan_keras.make_private(keras.Model(inputs, keras.layers.Dense(3, name="head")(h)), clipping="ghost")
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0), loss=MSE)
    rng = np.random.default_rng(0)
    x, y = _floats((4,), rng), rng.normal(size=(N, 3)).astype("float32")
    with pytest.raises(tan_keras.PerExampleCheckError, match=r"Worst example: #\d.*Worst layer.*'(first_dense|head)'"):
        tan_keras.check_per_example(model, x, y)


def test_default_clipping_is_auto_and_picks_ghost_only_when_every_layer_has_a_rule(caplog):
    assert tan_keras.make_private(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])).clipping == "auto"
    assert tan_keras.PrivateSequential([keras.Input((3,)), keras.layers.Dense(2)]).clipping == "auto"

    class Scale(keras.layers.Layer):
        def build(self, input_shape):
            self.s = self.add_weight(shape=(input_shape[-1],), initializer="ones")

        def call(self, inputs):
            return inputs * self.s

    inputs = keras.Input((4,))
    model = tan_keras.make_private(keras.Model(inputs, keras.layers.Dense(3)(Scale(name="unruled_scale")(inputs))))
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=0.0), loss=MSE)
    x = np.random.default_rng(0).normal(size=(N, 4)).astype("float32")
    import logging

    with caplog.at_level(logging.INFO, logger=ghost_norms.__name__):
        model.fit(x, x[:, :3], batch_size=N, epochs=2, verbose=0)
    fallbacks = [r for r in caplog.records if "Using vectorized" in r.getMessage()]
    assert len(fallbacks) == 1 and fallbacks[0].levelno == logging.INFO
    assert "'unruled_scale' (Scale)" in fallbacks[0].getMessage()
    tan_keras.check_per_example(model, x, x[:, :3])


if BACKEND == "tensorflow":  # JAX always compiles the whole step with XLA

    def _called_functions(nodes):
        for n in nodes:
            for key in ("f", "body", "cond", "then_branch", "else_branch"):
                if key in n.attr and n.attr[key].func.name:
                    yield n, n.attr[key].func.name

    def _ops_by_compilation(graph_def):
        """Op types reachable from the step's graph, split into (under XLA, outside XLA)."""
        library = {f.signature.name: f for f in graph_def.library.function}
        inside, outside, seen = set(), set(), set()

        def visit(nodes, under_xla):
            for n in nodes:
                (inside if under_xla else outside).add(n.op)
            for n, name in _called_functions(nodes):
                xla = under_xla or ("_XlaMustCompile" in n.attr and n.attr["_XlaMustCompile"].b)
                if (name, xla) not in seen and name in library:
                    seen.add((name, xla))
                    visit(library[name].node_def, xla)

        visit(graph_def.node, False)
        return inside, outside

    @pytest.mark.parametrize("physical_batch_size", [None, 3])
    def test_tensorflow_ghost_step_runs_every_batched_matmul_under_xla(physical_batch_size):
        """Pins the oneDNN fix on every CPU: no BatchMatMulV2 of the traced TF ghost step runs outside XLA."""
        import tensorflow as tf

        model, loss, x, y = build(einsum_dense, "ghost")
        model.physical_batch_size = physical_batch_size
        step = tf.function(model.train_step)
        graph_def = step.get_concrete_function((tf.constant(x), tf.constant(y))).graph.as_graph_def()
        inside, outside = _ops_by_compilation(graph_def)
        assert "BatchMatMulV2" in inside
        assert "BatchMatMulV2" not in outside

    @pytest.mark.parametrize("physical_batch_size", [None, 3])
    def test_tensorflow_vectorized_step_converts_batched_matmuls_without_broadcast(physical_batch_size, monkeypatch):
        """Pins the oneDNN fix on every CPU: the vectorized step's per-example matmuls go through our pfor
        converter (no broadcast [B, 1, M, K] x [K, N] batch matmul), and pfor's own converter is restored after."""
        import tensorflow as tf
        from tensorflow.python.ops.parallel_for import pfor

        from tan_keras.per_example.tensorflow import common

        converted = []
        make = common._batch_matmul_converter

        def counting(original):
            convert = make(original)
            return lambda pfor_input: converted.append(pfor_input.op.name) or convert(pfor_input)

        monkeypatch.setattr(common, "_batch_matmul_converter", counting)
        original = pfor._pfor_converter_registry["BatchMatMulV2"]
        model, loss, x, y = build(einsum_dense, "vectorized")
        model.physical_batch_size = physical_batch_size
        graph_def = tf.function(model.train_step).get_concrete_function(
            (tf.constant(x), tf.constant(y))).graph.as_graph_def()
        assert converted, "no per-example BatchMatMulV2 went through the rewritten converter"
        assert pfor._pfor_converter_registry["BatchMatMulV2"] is original
        inside, _ = _ops_by_compilation(graph_def)
        assert "BatchMatMulV2" not in inside  # the vectorized strategy is not compiled (XLA:CPU conv loops are slow)


# --------------------------------------------------------------------------
# AugMult: an example is the mean of its K views' gradients, clipped once
# --------------------------------------------------------------------------

K = 3
VIEW_SCALES, VIEW_SHIFTS = (1.0, -0.5, 2.0), (0.0, 0.3, -0.2)


def _view_fn(integer):
    """Deterministic views of a (n, K, ...) batch: view j is ``s_j·x + t_j`` (floats) or x rolled by j (token ids)."""
    def numpy_views(x):  # (n, ...) -> (n, K, ...)
        if integer:
            return np.stack([np.roll(x, j, axis=-1) for j in range(K)], axis=1)
        return np.stack([s * x + t for s, t in zip(VIEW_SCALES, VIEW_SHIFTS)], axis=1).astype("float32")

    def augment(views, seed):
        ops = keras.ops
        if integer:
            return ops.stack([ops.roll(views[:, j], j, axis=-1) for j in range(K)], axis=1)
        return ops.stack([s * views[:, j] + t for j, (s, t) in enumerate(zip(VIEW_SCALES, VIEW_SHIFTS))], axis=1)

    return numpy_views, augment


def loop_augmult_grads(inner, numpy_views, x, y, loss):
    """∇ of ``(1/K) Σ_j ℓ(f(view_j(x_i)), y_i)`` for each example alone, by the backend's own autodiff."""
    views = numpy_views(x)
    rows = [(views[i], np.repeat(y[i:i + 1], K, axis=0)) for i in range(len(x))]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        out = []
        for vi, yi in rows:
            with tf.GradientTape() as tape:
                value = keras.ops.mean(loss(yi, inner(vi, training=True)))
            out.append([np.asarray(tf.convert_to_tensor(g)) for g in tape.gradient(
                value, inner.trainable_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)])
        return out
    import jax

    non_trainable = [v.value for v in inner.non_trainable_variables]

    def one(trainable, vi, yi):
        y_pred, _ = inner.stateless_call(trainable, non_trainable, vi, training=True)
        return keras.ops.mean(loss(yi, y_pred))

    trainable = [v.value for v in inner.trainable_variables]
    grad = jax.jit(jax.grad(one))
    return [[np.asarray(g) for g in grad(trainable, vi, yi)] for vi, yi in rows]


AUGMULT_MODELS = [dense, einsum_dense, multi_head_attention, conv1d, conv2d, embedding, layer_normalization,
                  group_normalization, ws_conv, skip_init, nf_resnet_small, transformer_block]


def build_augmult(model_fn, clipping):
    keras.utils.set_random_seed(0)
    inner, loss, y, x = model_fn(np.random.default_rng(0))
    numpy_views, augment = _view_fn(np.issubdtype(x.dtype, np.integer))
    model = tan_keras.augmult.wrap(inner, K, augment=augment, clipping=clipping)
    model(x[:1])  # builds the wrapper (fit would)
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0), loss=loss)
    return model, inner, loss, x, y, numpy_views


@pytest.mark.parametrize("clipping", ["ghost", "vectorized"])
@pytest.mark.parametrize("model_fn", AUGMULT_MODELS)
def test_augmult_step_clips_each_examples_mean_over_views_as_one_example_loop(model_fn, clipping):
    """Both strategies give the norms of, and clip, each example's K-view mean gradient (not each view's)."""
    model, inner, loss, x, y, numpy_views = build_augmult(model_fn, clipping)
    assert plans.strategy(model) == clipping
    if clipping == "ghost":
        assert ghost_norms.ghost_plan(model).reason is None
    want = loop_augmult_grads(inner, numpy_views, x, y, loss)
    norms = _norms(want)
    l2_norm_clip = min(float(np.median(norms)), float(norms.max()) / 20)
    factors = np.minimum(1.0, l2_norm_clip / norms)
    got_sum, got_norms = tan_keras.per_example.clipped_sum_and_norms(model, numpy_views(x), y, l2_norm_clip)
    # atol: a saturated tanh's gradient (1 - tanh²) rounds differently in fp32 batches of K and of n·K rows.
    np.testing.assert_allclose(np.asarray(got_norms), norms, rtol=1e-3, atol=1e-5 * norms.max())
    _assert_close_per_variable(model, got_sum, _clipped_sum(factors, want))


def test_augmult_ghost_falls_back_for_a_rule_that_does_not_group_views(caplog):
    """A user rule without ``views=True`` would clip views, not examples: AugMult then uses the vectorized path."""
    import logging

    class Scale(keras.layers.Layer):
        def build(self, input_shape):
            self.s = self.add_weight(shape=(input_shape[-1],), initializer="ones")

        def call(self, inputs):
            return inputs * self.s

    @ghost_norms.register_ghost_norm(Scale)
    def scale_sq_norms(layer, inputs, output_grad):  # per row: right for rows, wrong for groups of views
        return keras.ops.sum(keras.ops.square(keras.ops.sum(output_grad * inputs, axis=1)), axis=-1)

    inputs = keras.Input((4,))
    inner = keras.Model(inputs, keras.layers.Dense(3)(Scale(name="rowwise_scale")(inputs)))
    numpy_views, augment = _view_fn(False)
    model = tan_keras.augmult.wrap(inner, K, augment=augment)
    model(np.zeros((1, 4), "float32"))
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=0.1, noise_multiplier=0.0), loss=MSE)
    assert "does not group the K=3 AugMult views" in ghost_norms.ghost_plan(model).reason
    rng = np.random.default_rng(0)
    x, y = _floats((4,), rng), rng.normal(size=(N, 3)).astype("float32")
    with caplog.at_level(logging.INFO, logger=ghost_norms.__name__):
        got_sum, got_norms = tan_keras.per_example.clipped_sum_and_norms(model, numpy_views(x), y, 0.1)
    assert any("'rowwise_scale'" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(np.asarray(got_norms), _norms(loop_augmult_grads(inner, numpy_views, x, y, MSE)),
                               rtol=1e-3)
