"""TAN hyper-parameter search: simulate at a small batch, transfer to one private run (TAN §1.3).

    KERAS_BACKEND=jax python -m experiments.tan_search --dataset=mnist5k --target_epsilon=8 \
        --ref_batch_size=500 --ref_steps=100 --sim_batch_size=62 --lrs=1,2,4 --ema_decays=0,0.99

1. σ_ref is calibrated so that (B_ref, σ_ref, S) on N examples meets (ε, δ)
   (``accounting.calibrate_noise_multiplier``); ``tan.warn_regime`` warns if
   σ_ref < 2, where ε ≈ ε_TAN fails and the TAN scaling rule is weaker.
2. The grid lr × momentum × EMA decay × AugMult K runs at B_sim with
   σ = σ_ref·B_sim/B_ref and the same S (``tan.simulate``): same TAN η,
   B_ref/B_sim times less compute, **not private**. EMA decays share one
   training run (the EMA is post-processing).
3. With ``scaling_batch_sizes``, the best grid point is rerun at those small
   batches; ``tan.fit_scaling_law`` (accuracy vs ln B) predicts the accuracy
   at B_ref (TAN Fig. 4).
4. One private run at (B_ref, σ_ref, S) with the best grid point, lr unchanged.
5. Report (``output_dir``): ``grid.csv``, ``report.md``, ``search.png`` and
   ``summary.json``: the grid, the predicted vs measured private accuracy,
   and the compute saved (examples processed by the search vs the same grid
   at B_ref).

``check_ranking=True`` also runs the grid at B_ref (private runs) and reports
the fraction of grid-point pairs that the simulation orders as the full-batch
grid does (pairs tied in either are left out).
"""

import csv
import itertools
import json
import math
import os
import time
import warnings

__all__ = ["run", "pairwise_agreement", "define_flags"]


def pairwise_agreement(a, b):
    """Fraction of pairs (i, j) ordered alike by scores ``a`` and ``b`` (ties in either skipped).

    Returns ``(fraction, concordant, compared)``; ``fraction`` is nan when no pair can be compared.
    """
    concordant = compared = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 or db == 0:
            continue
        compared += 1
        concordant += (da > 0) == (db > 0)
    return (concordant / compared if compared else math.nan), concordant, compared


def _grid(lrs, momentums, ema_decays, augmults):
    """Grid points as dicts; the EMA decays of one (lr, µ, K) share a training run."""
    runs = [dict(lr=lr, momentum=m, augmult=k) for lr in lrs for m in momentums for k in augmults]
    return runs, [float(d) for d in ema_decays]


def _run_grid(train, runs, decays, **common):
    rows, cost = [], 0
    for r in runs:
        res = train(**common, **r, ema_decay=decays)
        cost += res["examples_processed"]
        for d in decays:
            rows.append(dict(r, ema_decay=d, accuracy=res["ema_accuracies"][d], batch_size=res["batch_size"],
                             noise_multiplier=res["noise_multiplier"], steps=res["steps"],
                             epsilon=res["epsilon"], simulated=res["simulated"]))
    return rows, cost


def _plot(path, rows, full_rows, law, points, b_ref, predicted, measured):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"lr={r['lr']:g} µ={r['momentum']:g}\nema={r['ema_decay']:g} K={r['augmult']}" for r in rows]
    xs = range(len(rows))
    axes[0].bar([x - 0.2 for x in xs], [r["accuracy"] for r in rows], 0.4,
                label=f"simulated B={rows[0]['batch_size']} (not private)")
    if full_rows:
        axes[0].bar([x + 0.2 for x in xs], [r["accuracy"] for r in full_rows], 0.4, label=f"B_ref={b_ref} (private)")
    axes[0].set_xticks(list(xs))
    axes[0].set_xticklabels(labels, fontsize=6, rotation=45, ha="right")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title("hyper-parameter grid")
    axes[0].legend(fontsize=7)
    bs, accs = zip(*points) if points else ((), ())
    axes[1].scatter(bs, accs, label="simulated runs (best HPs)")
    if law is not None:
        grid = [min(bs) / 1.5 * (b_ref * 1.5 / (min(bs) / 1.5)) ** (t / 50) for t in range(51)]
        axes[1].plot(grid, [law.predict(b) for b in grid], "--",
                     label=f"fit: {law.slope_per_doubling:+.3f}/doubling (R²={law.r_squared:.2f})")
    if predicted is not None:
        axes[1].scatter([b_ref], [predicted], marker="x", s=80, label=f"predicted at B_ref: {predicted:.3f}")
    axes[1].scatter([b_ref], [measured], marker="*", s=120, label=f"measured private run: {measured:.3f}")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("batch size B (σ/B and S fixed)")
    axes[1].set_ylabel("test accuracy")
    axes[1].set_title("TAN batch scaling law")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def choose_reference(target_epsilon, delta, num_examples, ref_batch_size, ref_steps, min_ref_noise=2.0,
                     accountant="rdp"):
    """(B_ref, σ_ref): σ_ref calibrated to (ε, δ) at (B_ref, S), with B_ref raised if σ_ref < min_ref_noise.

    TAN §3.2–3.4: below σ ≈ 2 the privacy cost per unit of TAN grows fast
    ("privacy wall"), so at fixed ε and S a larger batch with a larger σ buys
    accuracy. At fixed ε and S, the calibrated σ grows with B, so the smallest
    B ≤ N reaching ``min_ref_noise`` is found by bisection. If even B = N
    cannot reach it, B_ref stays as given and the regime warning stands.
    """
    from tan_keras import accounting

    def sigma(b):
        return accounting.calibrate_noise_multiplier(target_epsilon, ref_steps, delta, batch_size=b,
                                                     num_examples=num_examples, accountant=accountant)

    sigma_ref = sigma(ref_batch_size)
    if not min_ref_noise or sigma_ref >= min_ref_noise or sigma(num_examples) < min_ref_noise:
        return ref_batch_size, sigma_ref
    low, high = ref_batch_size, num_examples  # σ(low) < min ≤ σ(high)
    while high - low > max(1, ref_batch_size // 100):
        mid = (low + high) // 2
        low, high = (mid, high) if sigma(mid) < min_ref_noise else (low, mid)
    print(f"σ_ref={sigma_ref:.3f} < {min_ref_noise} at B_ref={ref_batch_size}: raising B_ref to {high} "
          "(TAN §3.4: a larger batch with a larger σ at the same ε).")
    return high, sigma(high)


def run(dataset="mnist5k", model="cnn", optimizer="dpsgd", target_epsilon=8.0, delta=1e-5,
        ref_batch_size=500, ref_steps=100, sim_batch_size=64, lrs=(1.0, 2.0), momentums=(0.0,),
        ema_decays=(0.0, 0.99), augmults=(0,), scaling_batch_sizes=(), check_ranking=False,
        min_ref_noise=2.0, l2_norm_clip=1.0, accountant="rdp", physical_batch_size=None, seed=0, output_dir="out/tan_search",
        data_dir=None, image_size=None, max_examples=None, verbose=0, data=None):
    """Runs the TAN search; returns a summary dict (also written to ``output_dir/summary.json``)."""
    from experiments import datasets, train_image_classifier
    from tan_keras import accounting, tan

    t0 = time.time()
    os.makedirs(output_dir, exist_ok=True)
    data = data if data is not None else datasets.load(dataset, data_dir=data_dir, image_size=image_size,
                                                       max_examples=max_examples)
    n = len(data[0])
    if not ref_batch_size <= n:
        raise ValueError(f"ref_batch_size={ref_batch_size} exceeds the {n} training examples.")
    # (1) σ_ref from the target (ε, δ) at (B_ref, S), raised to ≥ min_ref_noise where possible.
    ref_batch_size, sigma_ref = choose_reference(target_epsilon, delta, n, ref_batch_size, ref_steps,
                                                 min_ref_noise, accountant)
    reference = tan.TanConfig(ref_batch_size, sigma_ref, ref_steps, n)
    regime = tan.warn_regime(sigma_ref, stacklevel=2)
    print(f"Target (ε={target_epsilon}, δ={delta}) on N={n}: B_ref={ref_batch_size}, S={ref_steps} → "
          f"σ_ref={sigma_ref:.4f} (η={reference.eta:.4g}, ε_TAN={tan.eps_tan(reference.eta, delta):.3f}). "
          f"{regime.message}")

    common = dict(dataset=dataset, model=model, optimizer=optimizer, ref_batch_size=ref_batch_size,
                  ref_noise=sigma_ref, ref_steps=ref_steps, delta=delta, accountant=accountant,
                  l2_norm_clip=l2_norm_clip, physical_batch_size=physical_batch_size, seed=seed,
                  verbose=verbose, data=data)

    def train(**kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the simulation banner is printed; don't repeat it as a warning
            return train_image_classifier.run(**kw)

    # (2) grid at B_sim.
    runs, decays = _grid(lrs, momentums, ema_decays, augmults)
    sim = tan.simulate(reference, sim_batch_size)
    print(f"Grid: {len(runs) * len(decays)} points ({len(runs)} training runs) at B_sim={sim_batch_size}, "
          f"σ={sim.noise_multiplier:.4g}, S={ref_steps}. {sim.note}")
    rows, search_cost = _run_grid(train, runs, decays, batch_size=sim_batch_size, **common)
    best = max(range(len(rows)), key=lambda i: rows[i]["accuracy"])
    best_hp = {k: rows[best][k] for k in ("lr", "momentum", "ema_decay", "augmult")}
    print(f"Best simulated grid point: {best_hp} acc={rows[best]['accuracy']:.4f}")

    # (3) scaling law from small batches, best HPs.
    points = [(sim_batch_size, rows[best]["accuracy"])]
    for b in scaling_batch_sizes:
        if b == sim_batch_size or b >= ref_batch_size:
            continue
        res = train(**common, batch_size=b, lr=best_hp["lr"], momentum=best_hp["momentum"],
                    augmult=best_hp["augmult"], ema_decay=best_hp["ema_decay"])
        search_cost += res["examples_processed"]
        points.append((b, res["ema_accuracy"]))
    law = predicted = None
    if len({b for b, _ in points}) >= 2:
        law = tan.fit_scaling_law(*zip(*points))
        predicted = law.predict(ref_batch_size)
    else:
        predicted = rows[best]["accuracy"]  # flat law: the simulation's accuracy is the prediction

    # (4) private run(s) at B_ref: the full grid if checking the ranking, else the best point only.
    full_rows, agreement = [], None
    if check_ranking:
        full_rows, _ = _run_grid(train, runs, decays, batch_size=ref_batch_size, **common)
        final = dict(full_rows[best])
        fraction, concordant, compared = pairwise_agreement([r["accuracy"] for r in rows],
                                                            [r["accuracy"] for r in full_rows])
        best_full = max(range(len(full_rows)), key=lambda i: full_rows[i]["accuracy"])
        agreement = dict(fraction=fraction, concordant=concordant, compared=compared,
                         pairs=len(rows) * (len(rows) - 1) // 2, majority=bool(fraction > 0.5),
                         same_best=best_full == best)
    else:
        res = train(**common, batch_size=ref_batch_size, lr=best_hp["lr"], momentum=best_hp["momentum"],
                    augmult=best_hp["augmult"], ema_decay=best_hp["ema_decay"])
        final = dict(best_hp, accuracy=res["ema_accuracy"], epsilon=res["epsilon"], steps=res["steps"],
                     noise_multiplier=res["noise_multiplier"], batch_size=ref_batch_size)
    grid_cost_at_ref = len(runs) * ref_batch_size * ref_steps * max(1, max(int(k) for k in augmults))
    summary = {
        "dataset": dataset, "num_examples": n, "target_epsilon": target_epsilon, "delta": delta,
        "ref_batch_size": ref_batch_size, "ref_steps": ref_steps, "sigma_ref": sigma_ref,
        "sim_batch_size": sim_batch_size, "sim_noise_multiplier": sim.noise_multiplier,
        "best_hp": best_hp, "best_simulated_accuracy": rows[best]["accuracy"],
        "scaling_points": points, "scaling_law": None if law is None else
        dict(slope=law.slope, intercept=law.intercept, r_squared=law.r_squared),
        "predicted_accuracy": predicted, "private_accuracy": final["accuracy"],
        "private_epsilon": final["epsilon"], "private_steps": final["steps"],
        "private_noise_multiplier": final["noise_multiplier"],
        "search_examples": search_cost, "grid_examples_at_ref": grid_cost_at_ref,
        "compute_ratio": grid_cost_at_ref / search_cost, "ranking": agreement,
        "wall_s": None,
    }
    # (5) report.
    with open(os.path.join(output_dir, "grid.csv"), "w", newline="") as f:
        fields = ["lr", "momentum", "ema_decay", "augmult", "batch_size", "noise_multiplier", "steps",
                  "accuracy", "epsilon", "simulated"]
        w = csv.DictWriter(f, fieldnames=fields + (["accuracy_at_ref", "epsilon_at_ref"] if full_rows else []),
                           extrasaction="ignore")
        w.writeheader()
        for i, r in enumerate(rows):
            extra = dict(accuracy_at_ref=full_rows[i]["accuracy"], epsilon_at_ref=full_rows[i]["epsilon"]) \
                if full_rows else {}
            w.writerow(dict(r, **extra))
    png = os.path.join(output_dir, "search.png")
    _plot(png, rows, full_rows, law, points, ref_batch_size, predicted, final["accuracy"])
    summary["wall_s"] = time.time() - t0
    md = [f"# TAN search on {dataset} (N={n})", "",
          f"Target (ε, δ) = ({target_epsilon}, {delta}); B_ref={ref_batch_size}, S={ref_steps}, "
          f"σ_ref={sigma_ref:.4f}. Simulation at B={sim_batch_size}, σ={sim.noise_multiplier:.4g} "
          "(**simulated — not private**).", "",
          "| lr | µ | EMA | K | simulated acc |" + (" acc at B_ref (private) |" if full_rows else ""),
          "|---|---|---|---|---|" + ("---|" if full_rows else "")]
    for i, r in enumerate(rows):
        md.append(f"| {r['lr']:g} | {r['momentum']:g} | {r['ema_decay']:g} | {r['augmult']} | {r['accuracy']:.4f} |"
                  + (f" {full_rows[i]['accuracy']:.4f} |" if full_rows else ""))
    md += ["", f"Best simulated point: {best_hp}.", "",
           f"Private run at (B, σ, S) = ({ref_batch_size}, {sigma_ref:.4f}, {final['steps']}): "
           f"test accuracy **{final['accuracy']:.4f}** at (ε, δ) = ({final['epsilon']:.3f}, {delta}).",
           f"Predicted accuracy at B_ref from the simulation: {predicted:.4f}"
           + (f" (scaling law over B={[b for b, _ in points]}, {law.slope_per_doubling:+.4f} per doubling)."
              if law is not None else " (single batch size: flat law)."),
           f"Compute: the search processed {search_cost:,} examples; the same grid at B_ref would process "
           f"{grid_cost_at_ref:,} ({summary['compute_ratio']:.1f}× more).", ""]
    if agreement:
        md.append(f"Ranking check: {agreement['concordant']}/{agreement['compared']} comparable pairs "
                  f"({agreement['fraction']:.1%}) are ordered alike by the simulation and the full-batch grid "
                  f"(majority: {agreement['majority']}; same best point: {agreement['same_best']}).")
    md.append(f"\n![search]({os.path.basename(png)})")
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    summary["output_dir"] = output_dir
    return summary


def define_flags():
    from absl import flags

    flags.DEFINE_enum("dataset", "mnist5k", ["mnist5k", "digits", "cifar10", "imagenet2012"], "Dataset.")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
    flags.DEFINE_integer("image_size", None, "Resize TFDS images.")
    flags.DEFINE_enum("model", "cnn", ["cnn", "wrn16_4", "nf_resnet26", "nf_resnet50"], "Model.")
    flags.DEFINE_enum("optimizer", "dpsgd", ["dpsgd", "dpadam"], "DP optimizer.")
    flags.DEFINE_float("target_epsilon", 8.0, "Target ε of the private run.")
    flags.DEFINE_float("delta", 1e-5, "δ (< 1/N).")
    flags.DEFINE_integer("ref_batch_size", 500, "B_ref of the private run.")
    flags.DEFINE_integer("ref_steps", 100, "S (same in the simulation).")
    flags.DEFINE_integer("sim_batch_size", 64, "B of the simulated grid.")
    flags.DEFINE_list("lrs", ["1", "2"], "Learning rates.")
    flags.DEFINE_list("momentums", ["0"], "Momentums.")
    flags.DEFINE_list("ema_decays", ["0", "0.99"], "EMA decays (0: none).")
    flags.DEFINE_list("augmults", ["0"], "AugMult K values (0: off).")
    flags.DEFINE_list("scaling_batch_sizes", [], "Extra small B for the scaling-law fit.")
    flags.DEFINE_bool("check_ranking", False, "Also run the grid at B_ref and compare rankings.")
    flags.DEFINE_float("min_ref_noise", 2.0, "Raise B_ref until σ_ref reaches this (TAN's regime); 0 keeps B_ref.")
    flags.DEFINE_float("l2_norm_clip", 1.0, "C.")
    flags.DEFINE_integer("physical_batch_size", None, "Examples per on-device chunk.")
    flags.DEFINE_integer("seed", 0, "Seed.")
    flags.DEFINE_string("output_dir", "out/tan_search", "Output directory.")
    flags.DEFINE_integer("verbose", 0, "Keras progress bar.")


def flags_to_params():
    from absl import flags

    f = flags.FLAGS
    return dict(
        dataset=f.dataset, data_dir=f.data_dir, image_size=f.image_size, model=f.model, optimizer=f.optimizer,
        target_epsilon=f.target_epsilon, delta=f.delta, ref_batch_size=f.ref_batch_size, ref_steps=f.ref_steps,
        sim_batch_size=f.sim_batch_size, lrs=[float(v) for v in f.lrs],
        momentums=[float(v) for v in f.momentums], ema_decays=[float(v) for v in f.ema_decays],
        augmults=[int(v) for v in f.augmults], scaling_batch_sizes=[int(v) for v in f.scaling_batch_sizes],
        check_ranking=f.check_ranking, min_ref_noise=f.min_ref_noise, l2_norm_clip=f.l2_norm_clip, physical_batch_size=f.physical_batch_size,
        seed=f.seed, output_dir=f.output_dir, verbose=f.verbose)


def main(argv):
    del argv
    print(json.dumps(run(**flags_to_params()), indent=1, default=str))


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
