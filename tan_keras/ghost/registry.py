"""The ghost-norm rule registry, the ghost/explicit cost rule, and which layers a ghost step watches.

* ``@register_ghost_norm(keras.layers.Dense, ...)`` maps a Keras layer class
  to a function ``(layer, inputs, output_grad) -> (B,)`` giving the squared
  per-example norm of the gradient of all the layer's trainable weights
  (Opacus's ``register_grad_sampler`` pattern), and optionally to a function
  giving the per-example gradients themselves where they are cheap;
* ``use_ghost``: per layer, the ghost form ``⟨a_i a_iᵀ, g_i g_iᵀ⟩`` (cost
  ``T²(d+p)``) iff it is cheaper than the explicit ``‖a_iᵀ g_i‖²_F``
  (``T·d·p``), the "mixed" ghost clipping of Li et al. ICLR'22; ``norm_mode``
  forces one form (tests, benchmarks);
* ``ghost_plan(model)``: which layers to watch, or why the model must use the
  vectorized per-example path instead; ``check_calls`` and ``log_fallback``
  for the reasons found once the step is traced.

.. warning:: Rules are looked up by *exact* layer class (or by registered
   Keras name), never by ``isinstance``: a subclass may change the math (a
   weight-standardized conv is not a conv in its kernel). Register subclasses
   explicitly.
"""

import contextlib
import dataclasses
import logging
from typing import Callable, Optional

import keras

# The logger keeps the name of the module the registry came from (``tan_keras.ghost_norms``),
# so that logging configured for that name keeps applying.
_log = logging.getLogger("tan_keras.ghost_norms")


@dataclasses.dataclass(frozen=True)
class GhostNormRule:
    """How one layer class gives its per-example squared gradient norms.

    Attributes:
      sq_norms: ``(layer, inputs, output_grad) -> (B,)`` squared L2 norm of
        each example's gradient w.r.t. all trainable weights of the layer.
        ``inputs`` is the first argument of the layer's ``call``;
        ``output_grad`` is ``∂(Σ_i ℓ_i)/∂z`` for the layer's (pre-activation)
        output ``z``, whose example-i slice is ``∂ℓ_i/∂z_i``.
      activation_attr: name of an attribute holding a built-in activation
        (``Dense(..., activation="relu")``). It is switched off while the layer
        runs, so the captured output is the pre-activation ``z``, and applied
        afterwards.
      unsupported: ``layer -> reason or None`` for configurations the rule
        does not cover (LoRA, quantization, grouped convs, ...).
      per_example_grads: optional ``(layer, inputs, output_grad) ->
        [(variable, (B, *variable.shape)), ...] or None``: the per-example
        gradients themselves when they are the cheaper form (``use_ghost``
        says no), else None. When given, they serve both the norms and the
        clipped sum ``Σ_i c_i ∇W_i`` (no weight-gradient pass for the layer).
      weight_grads: optional ``(layer, inputs, cotangent) -> [(variable, grad),
        ...]``: the layer's weight gradients summed over the batch at a 16-bit
        cotangent (``c ⊙ g`` rounded), as float32 sums of exact products of
        the 16-bit values. Book-keeping takes a ghost-form layer's share of
        the clipped sum from it where the cotangent is 16-bit; without it,
        from the backend's VJP of the layer re-run in float32
        (``capture.pre_activation_output``), which gives the same sums by
        float32 (on a GPU, TF32) matmuls: slower on an H200 (one 8×8 conv,
        256 → 256, B = 1,024: 0.67 ms against 0.48 for the Conv2D rule's
        nine bf16 matmuls with float32 results; WRN-16-4's bf16 ghost step
        went from 65.1k to 71.6k–72.2k ex/s).
      matmul_share: optional ``(layer, inputs) -> bool``: whether the layer's
        ghost-form share of the clipped sum is exactly the weight-gradient
        matmuls ``a_iᵀ g_i`` that ``sq_norms`` passes to
        ``norms.matmul_grad_sq_norms`` (its input, or a conv's patches, and
        its output gradient), plus sums of the cotangent. Where a GPU's
        float32 matmuls round their operands (TF32), book-keeping then bounds
        that rounding a priori from those operands' norms instead of
        measuring the rounded contribution (``bookkeeping.rounding_slack``).
      views: whether the rule is exact when an example is K consecutive rows
        of the layer's batch (AugMult's K views, ``norms.example_rows``):
        it finds the examples with ``norms.positions`` / ``num_examples``
        and sums per-row quantities with ``norms.example_sums``. An AugMult
        model with a layer whose rule does not say so uses the vectorized path.
    """

    sq_norms: Callable
    activation_attr: Optional[str] = None
    unsupported: Optional[Callable] = None
    per_example_grads: Optional[Callable] = None
    views: bool = False
    weight_grads: Optional[Callable] = None
    matmul_share: Optional[Callable] = None


_RULES = {}


def register_ghost_norm(*layer_types, activation_attr=None, unsupported=None, per_example_grads=None, views=False,
                        weight_grads=None, matmul_share=None):
    """Decorator registering ``fn(layer, inputs, output_grad) -> (B,)`` for layer classes.

    ``layer_types`` are Keras layer classes, or registered Keras names
    (``"package>ClassName"``, as ``keras.saving.get_registered_name`` gives) for
    layers defined where this module cannot import them. Example::

        @register_ghost_norm(MyScale)
        def my_scale_sq_norms(layer, inputs, output_grad):
            g = ops.sum(output_grad * inputs, axis=range(1, len(inputs.shape) - 1))
            return ops.sum(ops.square(g), axis=-1)
    """

    def decorator(fn):
        rule = GhostNormRule(fn, activation_attr, unsupported, per_example_grads, views, weight_grads, matmul_share)
        for layer_type in layer_types:
            _RULES[layer_type] = rule
        return fn

    return decorator


def rule_for(layer):
    """The rule registered for ``type(layer)`` (exact class, then registered name), or None.

    A subclassed model made private in place (``make_private``) is looked up
    by its own class, not by the ``Private...`` class swapped in.
    """
    cls = type(layer).__dict__.get("_private_base", type(layer))
    rule = _RULES.get(cls)
    if rule is None:
        rule = _RULES.get(keras.saving.get_registered_name(cls))
    return rule


# --------------------------------------------------------------------------
# Norm mode: "auto" (by cost), or forced "ghost" / "explicit" (tests, benchmarks)
# --------------------------------------------------------------------------

_MODE = ["auto"]


@contextlib.contextmanager
def norm_mode(mode):
    """Forces the ghost (``"ghost"``) or materialized (``"explicit"``) form while tracing.

    ``"auto"`` (the default) picks the cheaper form per layer. The forms are
    mathematically equal; forcing one exists to test and time both.
    """
    if mode not in ("auto", "ghost", "explicit"):
        raise ValueError(f"`mode` must be 'auto', 'ghost' or 'explicit', got {mode!r}.")
    previous = _MODE[0]
    _MODE[0] = mode
    try:
        yield
    finally:
        _MODE[0] = previous


def use_ghost(num_positions, in_dim, out_dim):
    """The ghost form iff it takes fewer multiply-adds: ``T²(d+p) < T·d·p``, i.e. ``T(d+p) < d·p``.

    Per example, the ghost form builds two T×T Grams (``T²(d+p)``), the
    explicit form the d×p gradient (``T·d·p``). When the ghost form wins,
    ``T < dp/(d+p) < min(d, p)``, so its ``T²`` memory is also below the
    explicit form's ``d·p``. Li et al.'s memory rule (ghost iff ``2T² < dp``)
    picks the ghost form for some layers where it is slower: on one H100 at
    B = 1,024, WRN-16-4's 3×3 128→128 convs at 16×16 (T=256, d=1152, p=128)
    take 3.2 ms in the ghost form and 2.1 ms explicitly.
    """
    if _MODE[0] != "auto":
        return _MODE[0] == "ghost"
    if num_positions is None:
        return False
    return num_positions * (in_dim + out_dim) < in_dim * out_dim


# --------------------------------------------------------------------------
# Which layers to watch
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GhostPlan:
    """The layers whose calls a ghost step watches, or why it cannot run.

    Attributes:
      layers: ``(layer, rule)`` for every layer that owns trainable weights.
      reason: None if ghost clipping applies; else why the model needs the
        vectorized per-example path (the first layer that forced it).
      views: rows of each watched layer's batch per example (AugMult's K, else 1).
    """

    layers: tuple
    reason: Optional[str] = None
    views: int = 1


def _own_trainable_variables(layer, among=None):
    """The trainable variables a layer owns itself (not its sublayers'), optionally only those with ids in ``among``."""
    return [v for v in layer._trainable_variables if v.trainable and (among is None or id(v) in among)]


def ghost_plan(model):
    """Checks that every trainable weight belongs to a layer with a ghost-norm rule (one that groups AugMult views
    when the model has ``views_per_example`` K > 1)."""
    views = getattr(model, "views_per_example", 1)
    model_vars = {id(v) for v in model.trainable_variables}
    layers = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        own = _own_trainable_variables(layer, model_vars)
        if getattr(layer, "activity_regularizer", None) is not None:
            return GhostPlan((), f"layer '{layer.name}' has an activity regularizer")
        if any(v.regularizer is not None for v in own):
            return GhostPlan((), f"layer '{layer.name}' has a weight regularizer")
        if not own:
            continue
        rule = rule_for(layer)
        if rule is None:
            return GhostPlan((), f"layer '{layer.name}' ({type(layer).__name__}) has trainable weights "
                                 "and no registered ghost-norm rule")
        reason = rule.unsupported(layer) if rule.unsupported else None
        if reason:
            return GhostPlan((), f"layer '{layer.name}' ({type(layer).__name__}): {reason}")
        if views > 1 and not rule.views:
            return GhostPlan((), f"layer '{layer.name}' ({type(layer).__name__}) has a ghost-norm rule that does not "
                                 f"group the K={views} AugMult views of an example (register it with views=True "
                                 "once it does: tan_keras.ghost.norms)")
        layers.append((layer, rule))
    return GhostPlan(tuple(layers), views=views)


def check_calls(plan, calls, num_examples=None):
    """Reason to fall back after tracing (a watched layer called twice, or not on ``n·K`` rows), or None.

    ``num_examples``: n, the examples of the traced batch (None: not checked).
    Every watched call must run on ``n · plan.views`` rows, since the norms
    group ``plan.views`` consecutive rows per example (AugMult).
    """
    rows = None if num_examples is None else int(num_examples) * plan.views
    seen = set()
    for call in calls:
        leading = call.output.shape[0] if getattr(call.output, "shape", None) is not None else None
        if rows is not None and leading is not None and int(leading) != rows:
            return (f"layer '{call.layer.name}' runs on {int(leading)} rows, not the {rows} of the AugMult views "
                    "(K consecutive rows per example)")
        if id(call.layer) in seen:
            return (f"layer '{call.layer.name}' is called more than once per forward pass "
                    "(shared weights)")
        seen.add(id(call.layer))
    return None


def log_fallback(model, reason):
    """Logs once per (model, reason) that ``model`` uses vectorized per-example gradients.

    A warning when the user asked for ``clipping="ghost"``; INFO under the
    default ``clipping="auto"``, for which the fallback is expected behaviour.
    """
    logged = model.__dict__.setdefault("_tan_logged_fallbacks", set())  # per model object: ids are reused
    if reason not in logged:
        logged.add(reason)
        level = logging.INFO if getattr(model, "clipping", "ghost") == "auto" else logging.WARNING
        _log.log(level, "Ghost clipping is not available for model '%s': %s. Using vectorized "
                 "per-example gradients instead.", model.name, reason)
