"""SGD vs Noisy-SGD vs DP-SGD across batch sizes at constant σ/B and fixed S (Implicit-bias paper, Fig. 1).

    KERAS_BACKEND=jax python -m experiments.batch_size_study --dataset=mnist5k --batch_sizes=32,64,128 \
        --noise_per_example=0.004 --steps=100

For each B: σ = ``noise_per_example``·B (so the effective noise σ/B and the
TAN η_step are the same at every B), S steps, the same lr. ``sgd`` adds no
noise, ``noisysgd`` adds N(0, σ²/B²) without clipping, ``dpsgd`` clips to C
first. None of these runs is a private release unless the chosen (B, σ, S)
is accounted as such; ε of the DP-SGD runs is reported. Writes
``batch_size_study.csv`` and ``batch_size_study.png`` (accuracy vs B).
"""

import csv
import json
import os

__all__ = ["run", "define_flags"]


def run(dataset="digits", model="cnn", batch_sizes=(16, 32, 64), noise_per_example=6e-4 * 8, steps=50,
        optimizers=("sgd", "noisysgd", "dpsgd"), lr=0.5, momentum=0.0, ema_decay=0.0, l2_norm_clip=1.0,
        delta=1e-5, seed=0, output_dir="out/batch_size_study", verbose=0, data=None, data_dir=None,
        image_size=None):
    """Returns ``{"rows": [...], "csv": path, "png": path}``; one row per (optimizer, B)."""
    from experiments import datasets, train_image_classifier

    os.makedirs(output_dir, exist_ok=True)
    data = data if data is not None else datasets.load(dataset, data_dir=data_dir, image_size=image_size)
    rows = []
    for opt in optimizers:
        for b in batch_sizes:
            sigma = noise_per_example * b
            res = train_image_classifier.run(
                dataset=dataset, model=model, optimizer=opt, batch_size=b, ref_batch_size=b, ref_noise=sigma,
                ref_steps=steps, lr=lr, momentum=momentum, ema_decay=ema_decay, l2_norm_clip=l2_norm_clip,
                delta=delta, seed=seed, verbose=verbose, data=data)
            rows.append(dict(optimizer=opt, batch_size=b, noise_multiplier=res["noise_multiplier"],
                             sigma_over_b=res["noise_multiplier"] / b, steps=res["steps"],
                             accuracy=res["accuracy"], ema_accuracy=res["ema_accuracy"], epsilon=res["epsilon"]))
    csv_path = os.path.join(output_dir, "batch_size_study.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for opt in optimizers:
        pts = [(r["batch_size"], max(r["accuracy"], r["ema_accuracy"])) for r in rows if r["optimizer"] == opt]
        ax.plot(*zip(*pts), "o-", label={"sgd": "SGD", "noisysgd": "Noisy-SGD", "dpsgd": "DP-SGD"}.get(opt, opt))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{dataset}: σ/B={noise_per_example:g}, S={steps}")
    ax.legend()
    fig.tight_layout()
    png_path = os.path.join(output_dir, "batch_size_study.png")
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return {"rows": rows, "csv": csv_path, "png": png_path}


def define_flags():
    from absl import flags

    flags.DEFINE_enum("dataset", "mnist5k", ["mnist5k", "digits", "cifar10", "imagenet2012"], "Dataset.")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
    flags.DEFINE_enum("model", "cnn", ["cnn", "wrn16_4", "nf_resnet26", "nf_resnet50"], "Model.")
    flags.DEFINE_list("batch_sizes", ["32", "64", "128"], "Batch sizes.")
    flags.DEFINE_float("noise_per_example", 6e-4 * 8, "σ/B, held constant.")
    flags.DEFINE_integer("steps", 100, "S, fixed.")
    flags.DEFINE_list("optimizers", ["sgd", "noisysgd", "dpsgd"], "Optimizers.")
    flags.DEFINE_float("lr", 0.5, "Learning rate (constant).")
    flags.DEFINE_float("ema_decay", 0.0, "EMA decay (0: none).")
    flags.DEFINE_integer("seed", 0, "Seed.")
    flags.DEFINE_string("output_dir", "out/batch_size_study", "Output directory.")


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    out = run(dataset=f.dataset, data_dir=f.data_dir, model=f.model, batch_sizes=[int(b) for b in f.batch_sizes],
              noise_per_example=f.noise_per_example, steps=f.steps, optimizers=list(f.optimizers), lr=f.lr,
              ema_decay=f.ema_decay, seed=f.seed, output_dir=f.output_dir)
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
