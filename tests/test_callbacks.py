"""EMA, privacy budget, and privacy-safe checkpoint / resume.

Runs on the backend named by KERAS_BACKEND.
"""

import keras
import numpy as np
import pytest

import tan_keras
from tan_keras import accounting, callbacks, sampling

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SIGMA, Q, DELTA = 5.0, 0.25, 1e-5  # ε(5 steps) = 0.492, ε(6 steps) = 0.537 (RDP)
TARGET = 0.5


def dense_model(seed=0, physical_batch_size=4):
    keras.utils.set_random_seed(seed)
    return tan_keras.PrivateSequential([keras.Input((6,)), keras.layers.Dense(3)],
                                       physical_batch_size=physical_batch_size)


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, size=(n,)).astype("int32")


def weights(model):
    return [np.array(w) for w in model.get_weights()]


def iterations(model):
    return int(np.asarray(model.optimizer.iterations))


class WeightRecorder(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        self.seen.append([np.array(v.value, np.float64) for v in self.model.trainable_variables])

    def on_train_begin(self, logs=None):
        self.seen = [[np.array(v.value, np.float64) for v in self.model.trainable_variables]]


def test_ema_warmup_follows_tan_formula():
    """ema_t = ema_{t−1} − (1 − d_t)(ema_{t−1} − θ_t), d_t = min(decay, (1+t)/(10+t)), t = 1, 2, ..."""
    x, y = data(12)
    model = dense_model()
    model.compile(optimizer=tan_keras.DPSGD(1.0, SIGMA, seed=0, learning_rate=0.5), loss=LOSS)
    ema = callbacks.EMA(decay=0.3, validation_data=(x, y))  # d_t = 2/11, 3/12, then 0.3 from t = 3
    recorder = WeightRecorder()
    history = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[ema, recorder])
    assert [ema.decay_at(t) for t in (1, 2, 3, 4)] == [2 / 11, 3 / 12, 0.3, 0.3]
    expected = recorder.seen[0]
    for t, theta in enumerate(recorder.seen[1:], start=1):
        d = min(0.3, (1 + t) / (10 + t))
        expected = [e - (1 - d) * (e - p) for e, p in zip(expected, theta)]
    assert ema.updates == 3
    for got, want in zip(ema.average, expected):
        np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)
    live = weights(model)
    with ema.swapped(model):
        np.testing.assert_allclose(weights(model)[0], expected[0], rtol=1e-5, atol=1e-6)
        ema_loss = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    for a, b in zip(weights(model), live):
        np.testing.assert_array_equal(a, b)
    assert history.history["ema_val_loss"][0] == pytest.approx(ema_loss, rel=1e-5)


def budget_run(over_budget, steps=8):
    n = 16
    x, y = data(n)
    model = dense_model()
    model.compile(optimizer=tan_keras.DPSGD(1.0, SIGMA, seed=0, learning_rate=0.1), loss=LOSS)
    sampler = sampling.PoissonSampler(n, sampling_rate=Q, physical_batch_size=4, seed=0)
    budget = callbacks.PrivacyBudget(TARGET, DELTA, SIGMA, Q, over_budget=over_budget)
    history = model.fit(sampler.dataset(x, y, steps_per_epoch=steps, model=model), verbose=0, callbacks=[budget])
    return model, budget, history


def test_budget_callback_stops_at_the_last_step_within_budget():
    model, budget, history = budget_run("stop")
    assert budget.ledger.steps == iterations(model) == 5  # ε(5) ≤ TARGET < ε(6)
    assert budget.ledger.records[0].sampling == "poisson"
    eps = history.history["epsilon"][0]
    assert eps == pytest.approx(accounting.epsilon(SIGMA, 5, DELTA, sampling_rate=Q)) and eps <= TARGET
    assert accounting.epsilon(SIGMA, 6, DELTA, sampling_rate=Q) > TARGET


def test_budget_callback_refuses_an_over_budget_plan():
    with pytest.raises(ValueError, match="plans 8 steps.*At most 5 more steps"):
        budget_run("refuse")


def test_budget_callback_refuses_a_sampler_or_noise_that_does_not_match():
    x, y = data(16)
    model = dense_model()
    model.compile(optimizer=tan_keras.DPSGD(1.0, SIGMA, seed=0), loss=LOSS)
    fit = lambda data, cb: model.fit(*data, verbose=0, callbacks=[cb])  # noqa: E731
    # A plain fit walks through shuffled fixed batches: not Poisson.
    with pytest.raises(ValueError, match="sampling='shuffle'"):
        fit((x, y), callbacks.PrivacyBudget(10.0, DELTA, SIGMA, Q))
    with pytest.raises(ValueError, match="noise_multiplier"):
        fit((x, y), callbacks.PrivacyBudget(10.0, DELTA, 1.0, Q, sampling="shuffle"))
    shuffled = sampling.PoissonSampler(16, batch_size=4, seed=0, sampling="shuffle")
    with pytest.raises(ValueError, match="sampling='shuffle'.*accounts sampling='poisson'"):
        fit((shuffled.dataset(x, y, steps_per_epoch=2, model=model),), callbacks.PrivacyBudget(10.0, DELTA, SIGMA))
    assert iterations(model) == 0
    # Configured with a sampler but fed arrays: refused before the first step.
    with pytest.raises(RuntimeError, match="did not come from the sampler"):
        model.fit(x, y, batch_size=4, verbose=0, callbacks=[callbacks.PrivacyBudget(10.0, DELTA, SIGMA, sampling="shuffle")])


def run(model_seed, sampler_seed, epochs, directory=None, restore=False, noise_seed=7):
    """A small private run with momentum, EMA, budget and (optionally) checkpoints."""
    n = 24
    x, y = data(n)
    model = dense_model(model_seed)
    model.compile(optimizer=tan_keras.DPSGD(0.5, SIGMA, seed=noise_seed, learning_rate=0.3, momentum=0.9), loss=LOSS)
    sampler = sampling.PoissonSampler(n, batch_size=6, physical_batch_size=4, seed=sampler_seed)
    ema = callbacks.EMA(0.9)
    budget = callbacks.PrivacyBudget(50.0, DELTA, SIGMA)
    extra = [callbacks.PrivateCheckpoint(directory, ema=ema, budget=budget)] if directory and not restore else []
    sampler.configure(model)
    if restore:
        callbacks.restore_checkpoint(directory, model, sampler=sampler, ema=ema, budget=budget)
    model.fit(sampler.dataset(x, y, steps_per_epoch=2), epochs=epochs, verbose=0, callbacks=[*extra, ema, budget])
    return model, ema, budget


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    straight, ema_a, budget_a = run(model_seed=0, sampler_seed=3, epochs=2)
    run(model_seed=0, sampler_seed=3, epochs=1, directory=str(tmp_path))  # "killed" after 2 steps
    # A fresh process: other initial weights, noise seed and sampler seed, all overwritten by the checkpoint.
    resumed, ema_c, budget_c = run(model_seed=1, sampler_seed=None, epochs=1, directory=str(tmp_path),
                                   restore=True, noise_seed=None)
    for a, c in zip(weights(straight), weights(resumed)):
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)
    for a, c in zip(ema_a.average, ema_c.average):
        np.testing.assert_allclose(np.array(c), np.array(a), rtol=1e-5, atol=1e-6)
    assert iterations(resumed) == ema_c.updates == budget_c.ledger.steps == budget_a.ledger.steps == 4
    assert budget_c.epsilon() == budget_a.epsilon()


def test_callbacks_and_accounting_modules_import_in_one_direction():
    """ema alone; checkpoint → budget → accounting → ledger → dp_events (read from the import statements)."""
    import ast
    from pathlib import Path

    root = Path(tan_keras.__file__).parent
    allowed = {  # module: the tan_keras modules it may import
        "dp_events": set(), "ledger": {"dp_events"}, "accounting": {"dp_events", "ledger"},
        "callbacks.ema": set(), "callbacks.budget": {"accounting", "ledger"},
        "callbacks.checkpoint": {"callbacks.budget", "ledger"},
        "callbacks": {"callbacks.budget", "callbacks.checkpoint", "callbacks.ema"},
    }
    for module, may_import in allowed.items():
        path = root / (module.replace(".", "/") + ("/__init__.py" if module == "callbacks" else ".py"))
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tan_keras"):
                names = [node.module] if node.module != "tan_keras" else [f"tan_keras.{a.name}" for a in node.names]
                imported |= {n[len("tan_keras."):] for n in names}
            elif isinstance(node, ast.Import):
                imported |= {a.name[len("tan_keras."):] for a in node.names if a.name.startswith("tan_keras.")}
        assert imported == may_import, (module, imported)
