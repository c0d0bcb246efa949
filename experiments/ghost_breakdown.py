"""Where a ghost-clipping step spends its time beyond the non-private step, per layer family (JAX backend).

    KERAS_BACKEND=jax python -m experiments.ghost_breakdown --model=wrn16_4 --batch_size=1024
    KERAS_BACKEND=jax python -m experiments.ghost_breakdown --model=nf_resnet50 --batch_size=64

A ghost step (``tan_keras.per_example.jax.ghost``) is the non-private forward
pass and the backward pass for the activations' gradients, plus, for every
layer with weights:

* **norm**: its per-example squared gradient norm (ghost form) or its
  per-example gradients (explicit form), from the recorded layer input ``a``
  and output gradient ``g``: the rule's work (``tan_keras.ghost``);
* **sum**: its share of the clipped sum: the layer's weight-gradient VJP with
  cotangent ``c ⊙ g`` (book-keeping), or ``Σ_i c_i G_i`` when the norm
  formed the per-example gradients ``G_i``.

This binary records every watched call of one forward pass of a chunk of
``--batch_size`` examples (real layer inputs; output gradients of the right
shape, drawn at random: costs do not depend on values), then times each
layer's **norm** and **sum** as separately jitted functions (median of
``--repeats`` runs, less the time to launch and wait for a trivial jitted
function), and sums them by layer class. Run alone, each piece
misses the fusion it would get inside the step; the table is a guide to
where the DP cost lies, not a decomposition of the step's time. The step
times themselves come from ``experiments.benchmark``.
"""

import collections
import json

from absl import app, flags

from experiments.benchmark_lib import MODELS, build_model, device_name, median_ms

FLAGS = flags.FLAGS


def _define_flags():
    """Flags, defined only when run as a binary: ``breakdown`` is imported by tests next to other binaries."""
    flags.DEFINE_enum("model", "wrn16_4", list(MODELS), "Model.")
    flags.DEFINE_integer("image_size", None, "nf_resnet50 only: input side, 224 (default) or 128.")
    flags.DEFINE_integer("batch_size", 1024, "Examples per chunk (the step's physical batch).")
    flags.DEFINE_bool("mixed_precision", False, "Use Keras's `mixed_bfloat16` policy.")
    flags.DEFINE_integer("repeats", 10, "Timed runs per piece (the median is reported).")
    flags.DEFINE_string("output_json", None, "Optional path for the results as JSON.")


def breakdown(model_name, batch_size, image_size=None, mixed_precision=False, repeats=10):
    """``{"layers": [per-call rows], "families": {class: {"norm_ms", "sum_ms", "calls"}}}`` for one chunk."""
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    import tan_keras
    from tan_keras import clipping
    from tan_keras.ghost import LayerCall, call_inputs, capture, entry_sum_sq, ghost_plan, pre_activation_output
    from tan_keras.ghost.bookkeeping import layer_share
    from tan_keras.ghost.registry import _own_trainable_variables

    if keras.backend.backend() != "jax":
        raise SystemExit("experiments.ghost_breakdown times JAX-compiled pieces: run it with KERAS_BACKEND=jax.")
    keras.utils.set_random_seed(0)
    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model, shape = build_model(model_name, image_size=image_size)
    model = tan_keras.make_private(model, clipping="ghost")
    model.compile(optimizer=tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    watch = ghost_plan(model)
    if watch.reason:
        raise SystemExit(f"{model_name} has no ghost step: {watch.reason}")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch_size, *shape)).astype("float32"))
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    calls = []

    @jax.jit
    def record(trainable, non_trainable, x):
        with capture(watch, lambda k, z: z) as found:
            model.stateless_call(trainable, non_trainable, x, training=True)
        calls[:] = found
        leaves = [jax.tree_util.tree_leaves((c.args, c.kwargs)) for c in found]
        return [[leaf for leaf in ls if isinstance(leaf, jax.Array)] for ls in leaves], [c.output for c in found]

    recorded, outputs = record(trainable, non_trainable, x)
    # Launching a jitted function and waiting for it costs tens of µs whatever it does: measured once on
    # a function that reads one element of its arguments, and subtracted from every piece.
    dispatch_ms = median_ms(jax.jit(lambda arrays, g: g.ravel()[0]), recorded[0], outputs[0], repeats=repeats)
    mapping = list(zip(model.trainable_variables, trainable)) + list(zip(model.non_trainable_variables,
                                                                         non_trainable))
    rng = np.random.default_rng(1)
    rows = []
    for call, arrays, z in zip(calls, recorded, outputs):
        layer, rule = call.layer, call.rule
        static_leaves, treedef = jax.tree_util.tree_flatten((call.args, call.kwargs))
        is_array = [isinstance(leaf, jax.Array) for leaf in static_leaves]  # tracers of ``record``
        g = jnp.asarray(rng.normal(size=z.shape).astype("float32")).astype(z.dtype)
        own = _own_trainable_variables(layer)

        def rebuilt(arrays, treedef=treedef, is_array=is_array, static_leaves=static_leaves):
            it = iter(arrays)
            leaves = [next(it) if a else leaf for a, leaf in zip(is_array, static_leaves)]
            args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
            return args, kwargs

        def norm_piece(arrays, g, layer=layer, rule=rule, rebuilt=rebuilt):
            inputs = call_inputs(layer, *rebuilt(arrays))
            with keras.StatelessScope(state_mapping=mapping):
                pairs = rule.per_example_grads(layer, inputs, g) if rule.per_example_grads else None
                if pairs is None:
                    return rule.sq_norms(layer, inputs, g), None
                return sum(entry_sum_sq(entry) for entry in pairs), [entry[1] for entry in pairs]

        norm_fn = jax.jit(norm_piece)
        _, explicit = norm_fn(arrays, g)
        factors = jnp.asarray(rng.uniform(size=(batch_size,)).astype("float32"))
        if explicit is not None:
            def sum_piece(explicit, factors):
                return clipping.weighted_sum(explicit, factors, drop=False)

            sum_fn, sum_args = jax.jit(sum_piece), (explicit, factors)
        else:
            def sum_piece(arrays, g, factors, layer=layer, own=own, rebuilt=rebuilt, rule=rule):
                args, kwargs = rebuilt(arrays)
                cotangent = g * factors.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)
                rerun = LayerCall(layer, rule, None, None, tuple(args), dict(kwargs))

                def layer_vjp(call, variables, cotangent):
                    def pre(values):
                        with keras.StatelessScope(state_mapping=mapping + list(zip(variables, values))):
                            return pre_activation_output(call)

                    _, pullback = jax.vjp(pre, [_value(mapping, v) for v in variables])
                    return pullback(cotangent)[0]

                with keras.StatelessScope(state_mapping=mapping):  # as book-keeping chooses the layer's share
                    return layer_share(rerun, own, cotangent, layer_vjp)

            sum_fn, sum_args = jax.jit(sum_piece), (arrays, g, factors)
        rows.append({"layer": layer.name, "family": type(layer).__name__,
                     "output_shape": list(z.shape), "form": "explicit" if explicit is not None else "ghost/vjp",
                     "norm_ms": max(median_ms(norm_fn, arrays, g, repeats=repeats) - dispatch_ms, 0.0),
                     "sum_ms": max(median_ms(sum_fn, *sum_args, repeats=repeats) - dispatch_ms, 0.0)})
    families = collections.OrderedDict()
    for row in rows:
        f = families.setdefault(row["family"], {"calls": 0, "norm_ms": 0.0, "sum_ms": 0.0})
        f["calls"] += 1
        f["norm_ms"] += row["norm_ms"]
        f["sum_ms"] += row["sum_ms"]
    return {"model": model_name, "image_size": image_size, "batch_size": batch_size,
            "dtype_policy": keras.mixed_precision.dtype_policy().name, "device": device_name(),
            "dispatch_ms": dispatch_ms, "layers": rows, "families": families}


def _value(mapping, variable):
    return next(value for v, value in mapping if v is variable)


def main(argv):
    del argv
    result = breakdown(FLAGS.model, FLAGS.batch_size, FLAGS.image_size, FLAGS.mixed_precision, FLAGS.repeats)
    print(f"model={result['model']} image_size={result['image_size']} batch={result['batch_size']} "
          f"policy={result['dtype_policy']} device={result['device']!r}")
    print(f"{'layer family':<22}{'calls':>6}{'norm ms':>10}{'sum ms':>10}")
    total_norm = total_sum = 0.0
    for name, f in result["families"].items():
        print(f"{name:<22}{f['calls']:>6}{f['norm_ms']:>10.2f}{f['sum_ms']:>10.2f}")
        total_norm += f["norm_ms"]
        total_sum += f["sum_ms"]
    print(f"{'total':<22}{len(result['layers']):>6}{total_norm:>10.2f}{total_sum:>10.2f}")
    print("slowest calls (norm + sum):")
    for row in sorted(result["layers"], key=lambda r: -(r["norm_ms"] + r["sum_ms"]))[:10]:
        print(f"  {row['layer']:<28}{row['family']:<18}{str(tuple(row['output_shape'])):<22}{row['form']:<10}"
              f"{row['norm_ms']:>8.2f}{row['sum_ms']:>8.2f}")
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
