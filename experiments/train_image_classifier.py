"""Train an image classifier with DP-SGD, following TAN's reference code (facebookresearch/tan).

    KERAS_BACKEND=jax python -m experiments.train_image_classifier --dataset=mnist5k --model=cnn \
        --batch_size=125 --ref_batch_size=1000 --ref_noise=3 --ref_steps=200 --lr=2

Privacy parameters follow the reference code's flags (papers.md §2):

* ``--ref_batch_size`` B_ref, ``--ref_noise`` σ_ref, ``--ref_steps`` S fix the
  target run; this run uses ``--batch_size`` B with ``σ = σ_ref·B/B_ref`` and
  the same S (``tan_keras.tan.simulate``, TAN §1.3 step 2; ``get_noise_from_bs``).
  **When B < B_ref the run is a simulation and is NOT private**: its σ is
  B_ref/B times smaller; its ε is logged as ``inf`` (no meaningful guarantee).
  ``noisysgd`` (no clipping) and ``sgd`` (no noise) are never private either.
* ``--target_epsilon`` instead calibrates σ for (B, S, δ)
  (``accounting.calibrate_noise_multiplier``); the run is then private.

Batches are Poisson-sampled with q = B/N (``tan_keras.sampling.PoissonSampler``,
fixed padded shapes, the optimizer divides by the expected B). Every epoch
(one pass's worth of steps, ``ceil(N/B)``, the last one cut at S) logs to
``output_dir/log.csv`` and TensorBoard: ε of the steps done, train and test
accuracy, the EMA model's test accuracy (``ema_val_accuracy``), and the
train step's ``signal_norm``, ``noise_norm``, ``clip_fraction``,
``per_example_norm``.

``run(**params) -> dict`` is what tests and the other binaries call; the absl
``main`` only maps flags to it.
"""

import csv
import json
import math
import os
import time
import warnings

__all__ = ["MODELS", "OPTIMIZERS", "build_model", "run", "define_flags"]

MODELS = ("cnn", "wrn16_4", "nf_resnet26", "nf_resnet50")
OPTIMIZERS = ("dpsgd", "dpadam", "noisysgd", "sgd")
SIMULATION_BANNER = "SIMULATED — NOT PRIVATE"


def build_model(name, input_shape, num_classes, seed=0):
    """A ``keras.Model`` (logits) without BatchNorm, so per-example clipping is meaningful."""
    import keras

    keras.utils.set_random_seed(seed)
    if name == "cnn":
        # Small GroupNorm CNN (Tramèr & Boneh-style tanh CNNs do well under DP; ReLU here).
        inputs = keras.Input(input_shape, name="images")
        h = inputs
        for i, (filters, stride) in enumerate(((16, 2), (32, 2))):
            h = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", name=f"conv{i}")(h)
            h = keras.layers.GroupNormalization(groups=4, name=f"gn{i}")(h)
            h = keras.layers.Activation("tanh", name=f"act{i}")(h)
        h = keras.layers.GlobalAveragePooling2D(name="pool")(h) if min(input_shape[:2]) < 16 else \
            keras.layers.Flatten(name="flatten")(keras.layers.AveragePooling2D(2, name="pool")(h))
        h = keras.layers.Dense(32, activation="tanh", name="fc")(h)
        outputs = keras.layers.Dense(num_classes, name="logits")(h)
        return keras.Model(inputs, outputs, name="gn_cnn")
    if name == "wrn16_4":
        from models import wrn

        return wrn.wrn_16_4(num_classes=num_classes, input_shape=input_shape)
    if name in ("nf_resnet26", "nf_resnet50"):
        from models import nf_resnet

        depth = int(name[len("nf_resnet"):])
        return nf_resnet.nf_resnet(depth, num_classes=num_classes, input_shape=input_shape,
                                   small_inputs=min(input_shape[:2]) <= 64)
    raise ValueError(f"Unknown model {name!r}; choose one of {MODELS}.")


def _make_optimizer(name, lr, momentum, l2_norm_clip, noise_multiplier, seed):
    import tan_keras

    if name == "dpsgd":
        return tan_keras.DPSGD(l2_norm_clip, noise_multiplier, seed=seed, learning_rate=lr, momentum=momentum)
    if name == "dpadam":
        return tan_keras.DPAdam(l2_norm_clip, noise_multiplier, seed=seed, learning_rate=lr)
    if name == "noisysgd":  # no clipping: not private (Implicit-bias paper, Eq. 11)
        return tan_keras.NoisySGD(noise_multiplier, seed=seed, learning_rate=lr, momentum=momentum)
    if name == "sgd":  # Noisy-SGD at σ = 0 = SGD on the Poisson batches, mean over the expected B
        return tan_keras.NoisySGD(0.0, seed=seed, learning_rate=lr, momentum=momentum)
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


def _callbacks_module():
    try:
        from tan_keras import callbacks
    except ImportError as e:  # pragma: no cover - teammates' module
        raise ImportError("experiments.train_image_classifier needs tan_keras.callbacks (EMA).") from e
    return callbacks


def _sampling_module():
    try:
        from tan_keras import sampling
    except ImportError as e:  # pragma: no cover - teammates' module
        raise ImportError("experiments.train_image_classifier needs tan_keras.sampling (PoissonSampler): "
                          "without Poisson sampling the run's ε would be wrong.") from e
    return sampling


def _static_tf_dataset(sampler, model, x, y, steps):
    """TensorFlow: the sampler's draws of steps 0..S-1 as a ``tf.data`` pipeline of static batch shape.

    Workaround: the TF per-example train step fails to trace with an unknown
    batch dimension (what ``fit`` gives a ``PyDataset``), so the padded
    batch size is fixed here. A draw above the padded size (≈3·10⁻⁵ per step)
    would not fit this shape and fails loudly instead of being truncated.
    """
    import tensorflow as tf

    sampler.configure(model)  # sets the optimizer's expected_batch_size = qN
    size = sampler.padded_batch_size

    def gen():
        for t in range(steps):
            xb, yb, sw = sampler.batch(t, x, y)
            if len(sw) != size:
                raise RuntimeError(f"Poisson draw of step {t} exceeds the padded batch size {size}; rerun "
                                   "with another seed or a larger physical_batch_size.")
            yield xb, yb, sw

    signature = (tf.TensorSpec((size, *x.shape[1:]), tf.float32), tf.TensorSpec((size,), tf.int32),
                 tf.TensorSpec((size,), tf.float32))
    return tf.data.Dataset.from_generator(gen, output_signature=signature).prefetch(2)


def _keras_callbacks(steps, noise_multiplier, sampling_rate, delta, accountant, private):
    """Stop at exactly S logical steps and log ε of the steps done at each epoch end."""
    import keras

    from tan_keras import accounting

    class StepsAndEpsilon(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.steps_done = 0

        def on_train_batch_end(self, batch, logs=None):
            self.steps_done += 1
            if self.steps_done >= steps:
                self.model.stop_training = True

        def epsilon(self):
            if not private or self.steps_done == 0:
                return math.inf if self.steps_done else 0.0
            return accounting.epsilon(noise_multiplier, self.steps_done, delta,
                                      sampling_rate=sampling_rate, accountant=accountant)

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["epsilon"] = self.epsilon()
                logs["steps"] = self.steps_done

    return StepsAndEpsilon()


def _have_tensorboard():
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        warnings.warn("TensorBoard is not installed: logging to CSV only (pip install tensorboard).")
        return False
    return True


def run(dataset="mnist5k", model="cnn", optimizer="dpsgd", batch_size=256, ref_batch_size=None,
        ref_noise=3.0, ref_steps=100, target_epsilon=None, delta=1e-5, accountant="rdp",
        l2_norm_clip=1.0, lr=1.0, momentum=0.0, ema_decay=0.0, augmult=0, physical_batch_size=None,
        seed=0, output_dir=None, data_dir=None, image_size=None, max_examples=None, verbose=0,
        data=None, log_tensorboard=True):
    """Trains once; returns a dict of the run's privacy parameters and accuracies.

    Args (the reference code's flags, papers.md §2):
      batch_size: B, the expected (Poisson) batch size of this run.
      ref_batch_size, ref_noise, ref_steps: B_ref, σ_ref, S. σ = σ_ref·B/B_ref,
        S steps. ``ref_batch_size=None`` means B_ref = B (σ = σ_ref).
      target_epsilon: if given, σ is calibrated so that (B, S) meets (ε, δ)
        and ``ref_noise`` is ignored.
      optimizer: ``dpsgd`` / ``dpadam`` (private when B >= B_ref), ``noisysgd``
        (no clipping) or ``sgd`` (no noise): never private.
      ema_decay: EMA decay (0 = no EMA) or a list of decays, all tracked in
        one run (EMA is post-processing: free in privacy and in gradients).
      augmult: K augmented views per example averaged before clipping (0 = off).
      data: optional ``(x_train, y_train, x_test, y_test, num_classes)`` to skip loading.

    Returns:
      dict with ``accuracy``, ``ema_accuracy`` (of the first decay),
      ``ema_accuracies``, ``epsilon``, ``delta``, ``noise_multiplier``,
      ``steps``, ``batch_size``, ``is_private``, ``examples_processed``
      (B·S, ×K with AugMult), ``simulated``, ``wall_s``.
    """
    import keras

    import tan_keras
    from experiments import datasets
    from tan_keras import accounting, tan

    t0 = time.time()
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}.")
    x_tr, y_tr, x_te, y_te, num_classes = data if data is not None else datasets.load(
        dataset, data_dir=data_dir, image_size=image_size, max_examples=max_examples)
    n = len(x_tr)
    b_ref = batch_size if ref_batch_size is None else ref_batch_size
    steps = int(ref_steps)
    if target_epsilon is not None:
        sigma = accounting.calibrate_noise_multiplier(target_epsilon, steps, delta, batch_size=batch_size,
                                                      num_examples=n, accountant=accountant)
        sim = None
    else:
        reference = tan.TanConfig(b_ref, ref_noise, steps, n)
        sim = tan.simulate(reference, batch_size)
        sigma = sim.noise_multiplier
    dp = optimizer in ("dpsgd", "dpadam")
    simulated = dp and sim is not None and not sim.is_private
    is_private = dp and not simulated
    if optimizer == "sgd":
        sigma_used = 0.0
    else:
        sigma_used = sigma
    if simulated:
        msg = (f"{SIMULATION_BANNER}: B={batch_size} < B_ref={b_ref}, σ={sigma:.4g} = σ_ref·B/B_ref "
               f"(σ_ref={ref_noise}), S={steps}. {sim.note}")
        print(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    elif is_private:
        tan.warn_regime(sigma, stacklevel=2)

    decays = list(ema_decay) if isinstance(ema_decay, (list, tuple)) else [ema_decay]
    decays = [float(d) for d in decays]

    net = build_model(model, x_tr.shape[1:], num_classes, seed=seed)
    if augmult and augmult > 0:
        from tan_keras import augmult as augmult_lib

        net = augmult_lib.wrap(net, int(augmult), seed=seed, physical_batch_size=physical_batch_size)
    else:
        net = tan_keras.make_private(net, physical_batch_size=physical_batch_size)
    opt = _make_optimizer(optimizer, lr, momentum, l2_norm_clip, sigma_used, seed)
    net.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])

    sampling = _sampling_module()
    sampler = sampling.PoissonSampler(n, batch_size=batch_size, physical_batch_size=physical_batch_size, seed=seed)
    steps_per_epoch = min(steps, math.ceil(n / batch_size))
    epochs = math.ceil(steps / steps_per_epoch)
    if keras.backend.backend() == "tensorflow":
        train_data = _static_tf_dataset(sampler, net, x_tr, y_tr, steps)
        fit_kwargs = dict(steps_per_epoch=steps_per_epoch)
    else:
        train_data = sampler.dataset(x_tr, y_tr, steps_per_epoch=steps_per_epoch, model=net)
        fit_kwargs = {}

    callbacks = _callbacks_module()
    counter = _keras_callbacks(steps, sigma, sampler.sampling_rate, delta, accountant, is_private)
    emas = [callbacks.EMA(d) for d in decays if d > 0]
    # The first EMA evaluates on the test set each epoch (logged as ema_val_accuracy).
    if emas:
        emas[0].validation_data = (x_te, y_te)
        emas[0].validation_batch_size = 512
    cbs = [counter, *emas]
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        cbs.append(keras.callbacks.CSVLogger(os.path.join(output_dir, "log.csv")))
        if log_tensorboard and _have_tensorboard():
            cbs.append(keras.callbacks.TensorBoard(os.path.join(output_dir, "tensorboard"), write_graph=False))
    net.fit(train_data, epochs=epochs, callbacks=cbs, validation_data=(x_te, y_te),
            validation_batch_size=512, verbose=verbose, **fit_kwargs)

    acc = float(net.evaluate(x_te, y_te, batch_size=512, verbose=0, return_dict=True)["accuracy"])
    ema_accs = {}
    for d in decays:
        if d <= 0:
            ema_accs[d] = acc
            continue
        ema = emas[[e.decay for e in emas].index(d)]
        with ema.swapped(net):
            ema_accs[d] = float(net.evaluate(x_te, y_te, batch_size=512, verbose=0, return_dict=True)["accuracy"])
    eps = counter.epsilon() if dp else math.inf
    result = {
        "dataset": dataset, "model": model, "optimizer": optimizer,
        "accuracy": acc, "ema_accuracy": ema_accs[decays[0]], "ema_accuracies": ema_accs,
        "best_accuracy": max([acc, *ema_accs.values()]),
        "epsilon": eps, "delta": delta, "noise_multiplier": sigma_used, "steps": counter.steps_done,
        "batch_size": batch_size, "ref_batch_size": b_ref, "num_examples": n,
        "is_private": is_private, "simulated": simulated,
        "examples_processed": batch_size * counter.steps_done * max(1, int(augmult or 0)),
        "lr": lr, "momentum": momentum, "ema_decay": decays[0], "augmult": int(augmult or 0),
        "wall_s": time.time() - t0,
    }
    tag = SIMULATION_BANNER if simulated else ("PRIVATE" if is_private else "NOT PRIVATE")
    print(f"[{tag}] {dataset}/{model}/{optimizer} B={batch_size} σ={sigma_used:.4g} S={counter.steps_done} "
          f"lr={lr} µ={momentum} K={result['augmult']}: acc={acc:.4f} ema={result['ema_accuracy']:.4f} "
          f"ε={eps:.4g} (δ={delta}) [{result['wall_s']:.1f}s]")
    if output_dir:
        with open(os.path.join(output_dir, "result.json"), "w") as f:
            json.dump({k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                       for k, v in result.items() if k != "ema_accuracies"}, f, indent=1)
    return result


def define_flags():
    from absl import flags

    flags.DEFINE_enum("dataset", "mnist5k", ["mnist5k", "digits", "cifar10", "imagenet2012"], "Dataset.")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
    flags.DEFINE_integer("image_size", None, "Resize TFDS images (imagenet2012 default 224).")
    flags.DEFINE_enum("model", "cnn", list(MODELS), "Model.")
    flags.DEFINE_enum("optimizer", "dpsgd", list(OPTIMIZERS), "Optimizer.")
    flags.DEFINE_integer("batch_size", 256, "Expected (Poisson) batch size B of this run.")
    flags.DEFINE_integer("ref_batch_size", None, "B_ref of the target run (default: B).")
    flags.DEFINE_float("ref_noise", 3.0, "σ_ref at B_ref; this run uses σ = σ_ref·B/B_ref.")
    flags.DEFINE_integer("ref_steps", 100, "S, number of steps (same for the simulation).")
    flags.DEFINE_float("target_epsilon", None, "Calibrate σ for this ε at (B, S, δ) instead.")
    flags.DEFINE_float("delta", 1e-5, "δ.")
    flags.DEFINE_enum("accountant", "rdp", ["rdp", "pld"], "Accountant.")
    flags.DEFINE_float("l2_norm_clip", 1.0, "C.")
    flags.DEFINE_float("lr", 1.0, "Learning rate (not rescaled between simulation and private run).")
    flags.DEFINE_float("momentum", 0.0, "Momentum.")
    flags.DEFINE_float("ema_decay", 0.0, "EMA decay (0: none).")
    flags.DEFINE_integer("augmult", 0, "AugMult K (0: off).")
    flags.DEFINE_integer("physical_batch_size", None, "Examples per on-device chunk.")
    flags.DEFINE_integer("seed", 0, "Seed (sampling, noise, init).")
    flags.DEFINE_string("output_dir", "out/train", "CSV, TensorBoard and result.json go here.")
    flags.DEFINE_integer("verbose", 1, "Keras progress bar (0, 1, 2).")


def main(argv):
    del argv
    from absl import flags

    from experiments import datasets

    f = flags.FLAGS
    try:
        result = run(**{k: getattr(f, k) for k in (
            "dataset", "data_dir", "image_size", "model", "optimizer", "batch_size", "ref_batch_size", "ref_noise",
            "ref_steps", "target_epsilon", "delta", "accountant", "l2_norm_clip", "lr", "momentum", "ema_decay",
            "augmult", "physical_batch_size", "seed", "output_dir", "verbose")})
    except datasets.DatasetNotPrepared as e:  # one line, not a traceback through tfds
        raise SystemExit(f"experiments.train_image_classifier: error: {e}") from None
    print(json.dumps({k: v for k, v in result.items() if k != "ema_accuracies"}, default=str, indent=1))


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
