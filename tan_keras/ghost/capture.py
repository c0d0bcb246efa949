"""The forward-pass recording of a ghost step, and its check for tied weights.

``capture(plan, tap)`` runs the model with every watched layer's call
intercepted (``registry.ghost_plan``), recording its input and handing its
*pre-activation* output to a backend ``tap`` (TF records it for
``tape.gradient``; JAX adds a zero "probe" input whose gradient is the output
gradient). A layer's built-in activation is switched off for the call and
applied afterwards, so the recorded ``z`` is the pre-activation output.

.. warning:: The per-example decomposition assumes examples do not interact
   in the forward pass (no BatchNormalization: ``check_private_layers``) and
   that each watched layer is called once per forward pass (weight sharing
   falls back to the vectorized path: ``registry.check_calls``). Dropout is
   allowed, but the masks drawn in a batched pass differ from those of the
   vectorized path. Book-keeping also needs a layer's weights to reach the
   loss only through its own call; ``capture(..., foreign_reads=...)``
   records any other read when the step is traced (a layer reading another
   layer's variables sends the step to the vectorized path:
   ``foreign_read_reason``).
"""

import contextlib
import dataclasses

import keras
from keras import ops

from tan_keras import clipping
from tan_keras.ghost.registry import GhostNormRule, _own_trainable_variables


@dataclasses.dataclass
class LayerCall:
    """One intercepted call: the layer, its rule, its input, its (pre-activation) output, its arguments.

    ``args``/``kwargs`` are what ``layer.call`` received, so that
    ``pre_activation_output`` can run the call again (book-keeping).
    """

    layer: object
    rule: GhostNormRule
    inputs: object
    output: object
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def _activation_off(layer, rule):
    """Switches off a layer's built-in activation; yields it (or None)."""
    activation = getattr(layer, rule.activation_attr) if rule.activation_attr else None
    if activation is not None:
        object.__setattr__(layer, rule.activation_attr, None)
    try:
        yield activation
    finally:
        if activation is not None:
            object.__setattr__(layer, rule.activation_attr, activation)


def call_inputs(layer, args, kwargs):
    """The first argument of ``layer.call`` (its inputs), given positionally or by name."""
    return args[0] if args else kwargs[next(iter(layer._call_signature.parameters))]


def _with_input(call, fn):
    """``call`` with ``fn`` applied to its floating input (in ``inputs`` and in the arguments it was given as)."""
    inputs = call_inputs(call.layer, call.args, call.kwargs)
    if not (ops.is_tensor(inputs) and "float" in str(inputs.dtype)):
        return call
    new = fn(inputs)
    if call.args:
        return dataclasses.replace(call, inputs=new, args=(new,) + tuple(call.args[1:]))
    name = next(iter(call.layer._call_signature.parameters))
    return dataclasses.replace(call, inputs=new, kwargs={**call.kwargs, name: new})


def _drop_examples(call, keep):
    """``call`` with the rows of its (floating) input zeroed where ``keep`` is False."""
    return _with_input(call, lambda inputs: clipping.zero_rows(inputs, keep))


def pre_activation_output(call):
    """Runs a captured call again: ``z`` as a function of the layer's *current* variable values.

    The backends differentiate it w.r.t. the layer's own weights, with the
    cotangent ``c ⊙ g`` (see ``norms_and_clipped_sum``). A layer that
    computes in 16 bits (``mixed_bfloat16``) runs here in float32 on the same
    16-bit values (its inputs are cast up, exactly): its weight gradient, the
    layer's share of the batch's clipped sum, then comes back in float32 with
    exact products, instead of rounded to 16 bits after the sum over the
    batch. (bf16 values are exact in TF32 too, so a GPU's TF32 matmul
    multiplies them exactly.)
    """
    with _activation_off(call.layer, call.rule), _float32_compute(call.layer):
        # Through ``__call__``: it sets the layer's autocast scope (mixed precision) as the forward pass did.
        return call.layer(*call.args, **call.kwargs)


@contextlib.contextmanager
def _float32_compute(layer):
    """While active, a 16-bit-compute layer (and its sublayers) computes in float32, on the same values."""
    changed = []
    for sub in layer._flatten_layers(include_self=True):
        if sub.compute_dtype in ("bfloat16", "float16"):
            changed.append((sub, sub.dtype_policy))
            sub.dtype_policy = keras.DTypePolicy("float32")
    try:
        yield
    finally:
        for sub, policy in reversed(changed):
            sub.dtype_policy = policy


_ACTIVE_CALLS = []  # the watched layers whose call is running, innermost last
_MISSING = object()


@contextlib.contextmanager
def _foreign_reads(plan, found):
    """Records in ``found`` every read of a watched layer's weight outside that layer's own call.

    Book-keeping needs each weight to reach the loss through its own layer's
    output only. Keras reads a variable through its ``value`` property, so
    the property of the variables' classes is wrapped while the forward pass
    is traced (trace time only; nothing is added to the compiled step).
    """
    owned = [(v, layer) for layer, _ in plan.layers for v in _own_trainable_variables(layer)]
    owner = {id(v): layer for v, layer in owned}
    saved = []
    for cls in {type(v) for v, _ in owned}:
        base = next(k for k in cls.__mro__ if "value" in k.__dict__)
        original = base.__dict__["value"]

        def getter(variable, _original=original):
            layer = owner.get(id(variable))
            if layer is not None and (not _ACTIVE_CALLS or _ACTIVE_CALLS[-1] is not layer):
                where = f"in the call of layer '{_ACTIVE_CALLS[-1].name}'" if _ACTIVE_CALLS else "outside layer calls"
                found.append(f"weight '{variable.path}' of layer '{layer.name}' is read {where}")
            return _original.fget(variable)

        saved.append((cls, cls.__dict__.get("value", _MISSING)))
        cls.value = property(getter)
    try:
        yield found
    finally:
        for cls, previous in saved:
            if previous is _MISSING:
                del cls.value
            else:
                cls.value = previous


@contextlib.contextmanager
def capture(plan, tap, foreign_reads=None):
    """Intercepts the watched layers' calls; yields the list of ``LayerCall`` in call order.

    ``tap(index, z) -> z'`` receives each pre-activation output; what it returns
    (``z`` itself, or ``z + probe``) continues through the activation and the
    rest of the model. Works for any model whose forward pass calls its layers
    through ``Layer.__call__`` (functional, Sequential, subclassed).

    ``foreign_reads``: a list to which every read of a watched layer's weight
    outside that layer's own call is appended (a message each), or None.
    """
    calls = []
    patched = []

    def wrap(layer, rule):
        original = layer.call

        def call(*args, **kwargs):
            inputs = call_inputs(layer, args, kwargs)
            _ACTIVE_CALLS.append(layer)
            try:
                with _activation_off(layer, rule) as activation:
                    z = original(*args, **kwargs)
            finally:
                _ACTIVE_CALLS.pop()
            z = tap(len(calls), z)
            calls.append(LayerCall(layer, rule, inputs, z, args, kwargs))
            return activation(z) if activation is not None else z

        return call

    reads = _foreign_reads(plan, foreign_reads) if foreign_reads is not None else contextlib.nullcontext()
    try:
        for layer, rule in plan.layers:
            patched.append((layer, layer.__dict__.get("call")))
            layer.__dict__["call"] = wrap(layer, rule)
        with reads:
            yield calls
    finally:
        for layer, previous in patched:
            if previous is None:
                layer.__dict__.pop("call", None)
            else:
                layer.__dict__["call"] = previous


def foreign_read_reason(found):
    """The fall-back reason for the reads recorded by ``capture(..., foreign_reads=found)``, or None."""
    if not found:
        return None
    return f"{found[0]} (weights used outside their own layer's call; book-keeping would miss that use)"
