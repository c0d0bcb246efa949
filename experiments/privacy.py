r"""Privacy report for one DP-SGD config, its TAN simulations, and TAN Fig. 2.

Prints ε (RDP, as in the paper, and the tighter PLD), η (TAN Def. 3.1),
ε_TAN (TAN Eq. 4), the σ regime, and the simulated (non-private) configs
that share the config's η and S at smaller batch sizes (TAN §1.3).

Defaults reproduce the CIFAR-10 setting of TAN Table 5 (ε ≈ 7.1)::

  python -m experiments.privacy
  python -m experiments.privacy --num_examples=1281167 --batch_size=32768 \
      --noise_multiplier=2.5 --steps=18000 --delta=8e-7      # ImageNet, ε ≈ 8
  python -m experiments.privacy --target_epsilon=8            # calibrate σ
  python -m experiments.privacy --plot=/tmp/tan_fig2.png       # TAN Fig. 2
"""

import math

from absl import app
from absl import flags

from tan_keras import accounting
from tan_keras import tan

FLAGS = flags.FLAGS

DEFAULT_SIMULATE_BATCH_SIZES = (128, 256, 512, 1024)
FIG2_STEPS = (1_000, 10_000, 100_000)


@accounting.quiet_rdp_convergence_warnings()  # harmless: see that function's docstring
def run(
    num_examples,
    batch_size,
    noise_multiplier=None,
    steps=2500,
    delta=1e-5,
    target_epsilon=None,
    sampling="poisson",
    simulate_batch_sizes=DEFAULT_SIMULATE_BATCH_SIZES,
    plot=None,
    plot_points=20,
    pld_discretization=accounting.DEFAULT_PLD_DISCRETIZATION,
):
    """Computes the privacy report; returns it as a dict (see keys below).

    Exactly one of ``noise_multiplier`` and ``target_epsilon`` must be given.
    Every ε, the simulated configurations' included, is accounted with
    ``sampling``. dp_accounting's "failed to converge" warnings for fractional
    RDP orders at small σ are dropped (harmless: the order is left out of the
    minimum, so ε stays an upper bound; ``accounting.quiet_rdp_convergence_warnings``).

    Returns:
      dict with ``noise_multiplier`` (given or calibrated), ``calibrated``,
      ``sampling_rate``, ``epsilon_rdp``, ``epsilon_pld`` (None with a reason
      in ``epsilon_pld_note`` if PLD cannot express the sampler), ``eta``,
      ``eps_tan``, ``regime`` (``tan.Regime``), ``simulated`` (list of row
      dicts), ``plot`` (path or None) and the inputs.
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(
            "give exactly one of noise_multiplier and target_epsilon, got "
            f"noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}."
        )
    sampling_args = dict(batch_size=batch_size, num_examples=num_examples, sampling=sampling)
    calibrated = target_epsilon is not None
    if calibrated:
        noise_multiplier = accounting.calibrate_noise_multiplier(
            target_epsilon, steps, delta, **sampling_args)
    eps_rdp = accounting.epsilon(noise_multiplier, steps, delta, **sampling_args)
    eps_pld, pld_note = None, None
    try:
        eps_pld = accounting.epsilon(noise_multiplier, steps, delta, accountant="pld",
                                     pld_discretization=pld_discretization, **sampling_args)
    except ValueError as e:
        pld_note = str(e)
    reference = tan.TanConfig(batch_size, noise_multiplier, steps, num_examples)
    eta = reference.eta

    simulated = []
    for b in simulate_batch_sizes:
        sim = tan.simulate(reference, int(b))
        simulated.append({
            "batch_size": sim.batch_size,
            "noise_multiplier": sim.noise_multiplier,
            "steps": sim.steps,
            "epochs": sim.config.epochs,
            "compute_ratio": sim.compute_ratio,
            "eta": sim.eta,
            "epsilon_rdp": accounting.epsilon(sim.noise_multiplier, sim.steps, delta,
                                              batch_size=sim.batch_size,
                                              num_examples=num_examples, sampling=sampling),
            "is_private": sim.is_private,
            "regime": tan.check_regime(sim.noise_multiplier).level.value,
        })

    result = {
        "num_examples": num_examples,
        "batch_size": batch_size,
        "steps": steps,
        "delta": delta,
        "sampling": sampling,
        "target_epsilon": target_epsilon,
        "noise_multiplier": noise_multiplier,
        "calibrated": calibrated,
        "sampling_rate": reference.sampling_rate,
        "epochs": reference.epochs,
        "epsilon_rdp": eps_rdp,
        "epsilon_pld": eps_pld,
        "epsilon_pld_note": pld_note,
        "eta": eta,
        "eps_tan": tan.eps_tan(eta, delta),
        "regime": tan.check_regime(noise_multiplier),
        "simulated": simulated,
        "plot": None,
    }
    if plot:
        result["plot"] = plot_fig2(plot, eta, delta, num_points=plot_points)
    return result


@accounting.quiet_rdp_convergence_warnings()
def fig2_curves(eta, delta, steps_list=FIG2_STEPS, num_points=20, sigma_range=(0.2, 10.0)):
    """TAN Fig. 2 data: ε(RDP) against σ at constant η, one curve per S.

    At fixed η and S, ``q = η·σ·√(2/S)`` (TAN Def. 3.1); points with q > 1
    are dropped. Returns ``{S: (sigmas, epsilons)}``.
    """
    import numpy as np

    sigmas = np.geomspace(*sigma_range, num_points)
    curves = {}
    for s in steps_list:
        xs, ys = [], []
        for sigma in sigmas:
            q = eta * sigma * math.sqrt(2.0 / s)
            if q > 1:
                continue
            xs.append(float(sigma))
            ys.append(accounting.epsilon(float(sigma), s, delta, sampling_rate=q))
        curves[s] = (xs, ys)
    return curves


def plot_fig2(path, eta, delta, num_points=20):
    """Writes TAN Fig. 2 (ε vs σ at constant η, plus the ε_TAN line) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, (xs, ys) in fig2_curves(eta, delta, num_points=num_points).items():
        ax.plot(xs, ys, marker="o", ms=3, label=f"S = {s:,}")
    ax.axhline(tan.eps_tan(eta, delta), color="k", ls="--", label="ε_TAN (Eq. 4)")
    ax.axvspan(0, tan.WALL_NOISE_MULTIPLIER, color="red", alpha=0.08, label="privacy wall")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("noise multiplier σ")
    ax.set_ylabel("ε (RDP)")
    ax.set_title(f"ε at constant η = {eta:.3g}, δ = {delta:g} (TAN Fig. 2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def format_report(r):
    """Human-readable text of a :func:`run` result."""
    sigma_src = f"calibrated for ε = {r['target_epsilon']:g}" if r["calibrated"] else "given"
    pld = (f"{r['epsilon_pld']:.4f}" if r["epsilon_pld"] is not None
           else f"n/a ({r['epsilon_pld_note']})")
    lines = [
        f"N = {r['num_examples']:,}  B = {r['batch_size']:,}  S = {r['steps']:,}  "
        f"δ = {r['delta']:g}  sampling = {r['sampling']}",
        f"σ = {r['noise_multiplier']:.4f} ({sigma_src})   q = B/N = {r['sampling_rate']:.6g}"
        f"   epochs = {r['epochs']:.2f}",
        f"ε (RDP)  = {r['epsilon_rdp']:.4f}",
        f"ε (PLD)  = {pld}",
        f"η        = {r['eta']:.4f}   ε_TAN = {r['eps_tan']:.4f}   (TAN Def. 3.1, Eq. 4)",
        f"regime   = {r['regime'].level.value}: {r['regime'].message}",
    ]
    if r["sampling"] != "poisson":
        lines.append("note: η and ε_TAN assume Poisson sampling with q = B/N.")
    if r["simulated"]:
        lines += [
            "",
            "TAN-simulated configs (same η and S, σ = σ_ref·B/B_ref; "
            "B < B_ref is NOT private):",
            f"{'B':>7} {'σ':>9} {'S':>8} {'epochs':>8} {'compute÷':>9} {'η':>7} "
            f"{'ε (RDP)':>12} {'private':>8} {'regime':>8}",
        ]
        for row in r["simulated"]:
            lines.append(
                f"{row['batch_size']:>7} {row['noise_multiplier']:>9.4g} {row['steps']:>8} "
                f"{row['epochs']:>8.2f} {row['compute_ratio']:>9.4g} {row['eta']:>7.4f} "
                f"{row['epsilon_rdp']:>12.4g} {str(row['is_private']):>8} {row['regime']:>8}"
            )
    if r["plot"]:
        lines += ["", f"TAN Fig. 2 written to {r['plot']}"]
    return "\n".join(lines)


def define_flags():
    """Defines this binary's absl flags.

    Called only when run as a program, so that importing the module (tests,
    notebooks) does not register flags that could clash with other binaries'.
    """
    flags.DEFINE_integer("num_examples", 50_000, "N, training set size.")
    flags.DEFINE_integer("batch_size", 4096, "B, (expected) batch size; q = B/N.")
    flags.DEFINE_float("noise_multiplier", 3.0,
                       "σ. Replaced by the calibrated σ with --target_epsilon "
                       "(setting both explicitly is an error).")
    flags.DEFINE_integer("steps", 2500, "S, number of DP-SGD steps.")
    flags.DEFINE_float("delta", 1e-5, "Target δ.")
    flags.DEFINE_float("target_epsilon", None, "If set, calibrate σ to reach this ε (RDP).")
    flags.DEFINE_enum("sampling", "poisson", list(accounting.SAMPLING_METHODS),
                      "Batch sampler (see tan_keras.accounting).")
    flags.DEFINE_list("simulate_batch_sizes", ["128", "256", "512", "1024"],
                      "Batch sizes of the TAN-simulated configs to tabulate.")
    flags.DEFINE_string("plot", None, "If set, write TAN Fig. 2 (ε vs σ at constant η) here.")


def main(argv):
    """Prints the report; a bad value exits with status 1 and one line naming it (no traceback)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    noise_multiplier = FLAGS.noise_multiplier
    if FLAGS.target_epsilon is not None and not FLAGS["noise_multiplier"].present:
        noise_multiplier = None
    try:
        result = run(
            num_examples=FLAGS.num_examples,
            batch_size=FLAGS.batch_size,
            noise_multiplier=noise_multiplier,
            steps=FLAGS.steps,
            delta=FLAGS.delta,
            target_epsilon=FLAGS.target_epsilon,
            sampling=FLAGS.sampling,
            simulate_batch_sizes=[_batch_size(b) for b in FLAGS.simulate_batch_sizes],
            plot=FLAGS.plot,
        )
    except ValueError as e:
        raise SystemExit(f"experiments.privacy: error: {e}") from None
    print(format_report(result))


def _batch_size(text):
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--simulate_batch_sizes must be a comma-separated list of integers, got {text!r}.") from None


if __name__ == "__main__":
    define_flags()
    app.run(main)
