"""Book-keeping: the per-example norms and the clipped gradient sum of a ghost step, layer by layer.

From the calls recorded by ``capture.capture`` and their output gradients
``g`` (one backward pass of the batched model):

    ‖∇ℓ_i‖² = Σ_layers ‖∇_layer ℓ_i‖²,      c_i = min(1, C/‖∇ℓ_i‖),
    Σ_i c_i ∇_W ℓ_i = (∂z/∂W)ᵀ (c ⊙ g)        (Bu et al., ICML'23)

(details in ``norms_and_clipped_sum``). The backends supply the layer's
vector-Jacobian product; where the cotangent is 16-bit, a rule's own
``weight_grads`` (bf16 matmuls with float32 sums) takes its place. Where
that cotangent is rounded to 16 bits, the factors are checked against what
will be added and halved where needed (``_backed_off_factors``).
"""

import keras
from keras import ops

from tan_keras import clipping
from tan_keras.ghost.capture import _drop_examples, call_inputs
from tan_keras.ghost.norms import entry_sum_sq, example_rows
from tan_keras.ghost.registry import _own_trainable_variables


def norms_and_clipped_sum(model, calls, output_grads, l2_norm_clip, layer_vjp, like):
    """Per-example norms ``‖∇ℓ_i‖`` and the clipped sum ``Σ_i c_i ∇ℓ_i``, layer by layer.

    Norms: ``‖∇ℓ_i‖² = Σ_layers ‖∇_layer ℓ_i‖²``, each term from the rule's
    ghost norm, or from its per-example gradients where those are the cheaper
    form (``GhostNormRule.per_example_grads``); ``c_i = min(1, C/‖∇ℓ_i‖)``.

    Clipped sum, by book-keeping (Bu et al., "Differentially Private
    Optimization on Large Model at Small Cost", ICML'23): a layer's weights
    ``W`` reach the loss only through its output ``z``, so

        Σ_i c_i ∇_W ℓ_i = (∂z/∂W)ᵀ (c ⊙ g),      g = ∂(Σ_i ℓ_i)/∂z,

    the layer's own weight gradient at its recorded arguments with the output
    gradient of the one backward pass scaled per example (``layer_vjp``), or
    ``Σ_i c_i G_i`` where the per-example gradients ``G_i`` were formed for
    the norm. Nothing is propagated through the network a second time.

    Args:
      model: the model; gradients are aligned with ``model.trainable_variables``.
      calls: the captured ``LayerCall`` (each watched layer at most once).
      output_grads: ``g`` for each call.
      l2_norm_clip: C.
      layer_vjp: backend function ``(call, variables, cotangent) -> grads``:
        the vector-Jacobian product of ``pre_activation_output(call)`` w.r.t.
        ``variables`` (some of the layer's own trainable variables).
      like: a (B,) tensor (the per-example losses) giving the batch size.
        Under AugMult (``model.views_per_example`` K > 1) the layers ran on
        ``B·K`` rows, K consecutive rows per example: the rules group them
        (``norms.example_rows``) and each example's factor scales its K rows.

    Returns:
      ``(grads, norms)``: gradients aligned with ``model.trainable_variables``
      (zeros for a variable whose layer was not called) and the (B,) norms.
    """
    views = getattr(model, "views_per_example", 1)
    sq_norms = ops.zeros_like(like, dtype="float32")
    scaled_exactly = sq_norms  # the part whose clipped contribution is c_i times the one measured (see below)
    explicit, rounded = [], []  # per call: its per-example gradients or None; the calls of rounded cotangents
    with example_rows(views):
        for index, (call, g) in enumerate(zip(calls, output_grads)):
            rule = call.rule
            pairs = rule.per_example_grads(call.layer, call.inputs, g) if rule.per_example_grads else None
            explicit.append(pairs)
            if pairs is None:
                term = rule.sq_norms(call.layer, call.inputs, g)
                _check_per_example(term, like, call, "norms")
                sq_norms = sq_norms + term
                if _rounds_cotangent(g):
                    rounded.append(index)
                else:
                    scaled_exactly = scaled_exactly + term
            else:
                for entry in pairs:
                    v, grads = entry[:2]
                    _check_per_example(grads, like, call, f"gradients of '{v.path}'")
                    term = entry_sum_sq(entry)
                    sq_norms, scaled_exactly = sq_norms + term, scaled_exactly + term
    # max(., 0): the WS-conv formula subtracts, and can round a zero norm below 0.
    norms = ops.sqrt(ops.maximum(sq_norms, 0.0))
    if rounded:
        factors = _backed_off_factors(calls, output_grads, rounded, norms, scaled_exactly, l2_norm_clip, views)
    else:
        factors = clipping.clip_factors(norms, l2_norm_clip)  # 0 for a non-finite norm
    all_finite = ops.all(factors != 0)
    row_factors = _row_factors(factors, views)
    keep = row_factors != 0

    variables = model.trainable_variables
    index = {id(v): i for i, v in enumerate(variables)}

    def clipped_sum(drop):
        """Every layer's share of ``Σ_i c_i ∇ℓ_i``; ``drop``: zero the dropped examples' rows first."""
        out = [None] * len(variables)
        for call, g, pairs in zip(calls, output_grads, explicit):
            own = _own_trainable_variables(call.layer, index)
            done = set()
            for v, grads, *_ in pairs or ():
                out[index[id(v)]] = ops.cast(clipping.weighted_sum([grads], factors, drop)[0], v.dtype)
                done.add(id(v))
            rest = [v for v in own if id(v) not in done]
            if rest:
                cotangent = scaled_cotangent(g, row_factors)
                if drop:
                    call, cotangent = _drop_examples(call, keep), clipping.zero_rows(cotangent, keep)
                for v, grad in zip(rest, layer_share(call, rest, cotangent, layer_vjp)):
                    out[index[id(v)]] = grad
        return [ops.zeros(v.shape, v.dtype) if g is None else g for v, g in zip(variables, out)]

    # A dropped example (non-finite gradient, factor 0) must add exactly 0: in a step that has one,
    # its rows of every cotangent, layer input and per-example gradient are zeroed (NaN · 0 = NaN).
    # One branch for the whole chunk: on a GPU each ``cond`` waits for its predicate on the host. On an
    # H200 (WRN-16-4, B = 1,024, fp32) one per layer cost 2.6 ms of a 30.3 ms step, this one 0.9 ms of 28.8.
    grads = ops.cond(all_finite, lambda: clipped_sum(False), lambda: clipped_sum(True))
    return grads, norms


def layer_share(call, variables, cotangent, layer_vjp):
    """A ghost-form layer's share of the clipped sum: its weight gradients (aligned with ``variables``) at the
    cotangent ``c ⊙ g``. A 16-bit cotangent goes to the rule's ``weight_grads`` where it has one (16-bit
    matmuls with float32 sums); the rest to the backend's ``layer_vjp`` (the layer re-run in float32)."""
    shares = {}
    if call.rule.weight_grads is not None and _rounds_cotangent(cotangent):
        inputs = call_inputs(call.layer, call.args, call.kwargs)
        shares = {id(v): grad for v, grad in call.rule.weight_grads(call.layer, inputs, cotangent)}
    missing = [v for v in variables if id(v) not in shares]
    if missing:
        shares.update(zip(map(id, missing), layer_vjp(call, missing, cotangent)))
    return [ops.cast(shares[id(v)], v.dtype) for v in variables]


ROUNDING_MARGIN = 2.0**-7


def _rounds_cotangent(g):
    """Whether a ghost-form layer's clipped contribution comes from a rounded cotangent: ``c ⊙ g`` in 16 bits."""
    return keras.backend.standardize_dtype(g.dtype) in ("bfloat16", "float16")


def _backed_off_factors(calls, output_grads, rounded, norms, scaled_exactly, l2_norm_clip, views):
    """Clip factors for a step in which some ghost-form layers get their cotangent ``c ⊙ g`` rounded to 16 bits.

    Book-keeping gives a ghost-form layer's share of the clipped sum as its
    weight gradient at the cotangent ``ĝ_i = round(c_i g_i)`` (the layer's
    compute dtype, bf16 under ``mixed_bfloat16``). Rounding is elementwise,
    but the contribution ``a_iᵀ ĝ_i`` sums over positions: where ``a_iᵀ g_i``
    cancels, the rounding errors need not, and ``‖a_iᵀ ĝ_i‖`` can exceed
    ``c_i ‖a_iᵀ g_i‖`` by far more than one rounding (a 64-position Dense
    input with alternating output gradients reaches 1.33·C,
    ``tests/test_ghost_clipping.py``). So the step measures what it will add:

        n̂_i² = c_i² Σ_exact ‖∇_l ℓ_i‖² + Σ_rounded ‖a_iᵀ ĝ_i‖²

    (the second sum by the same rules, on ``ĝ``), and halves ``c_i`` until
    ``n̂_i ≤ C``. Halving is exact: ``round(2⁻ʲ c ⊙ g) = 2⁻ʲ round(c ⊙ g)`` in
    binary floating point, so the contribution is exactly ``2⁻ʲ`` times the
    one measured, and every layer's share (explicit per-example gradients
    ``c_i G_i`` too) shrinks by the same ``2⁻ʲ``. The factors start from
    ``C / (1 + 2⁻⁷)`` (``ROUNDING_MARGIN``), so that an ordinary rounding
    (about 2⁻⁹ of the norm) does not halve an example: the bound holds with
    clip norm C, and clipped examples come out at most 0.8% shorter than C.
    ``n̂`` is computed as the norms are (fp32 sums of exact products of the
    same 16-bit values), so the bound holds to that accuracy.
    """
    factors = clipping.clip_factors(norms, l2_norm_clip / (1.0 + ROUNDING_MARGIN))
    measured = contribution_norms(calls, output_grads, rounded, factors, scaled_exactly, views)
    clip = ops.cast(l2_norm_clip, "float32")
    halvings = ops.ceil(ops.log2(ops.maximum(measured / clip, 1.0)))
    back_off = ops.power(2.0, -halvings)
    back_off = ops.where(back_off * measured > clip, back_off * 0.5, back_off)  # log2's last-bit rounding
    back_off = ops.where(ops.isfinite(measured), back_off, ops.ones_like(back_off))  # factor 0 stays 0
    return factors * back_off


def _row_factors(factors, views):
    """One factor per row of the layers' batches: an example's K views (AugMult) share its factor."""
    return factors if views == 1 else ops.repeat(factors, views, axis=0)


def scaled_cotangent(g, row_factors):
    """``c ⊙ g`` in ``g``'s dtype: the cotangent of book-keeping, and the one ``contribution_norms`` measures."""
    return g * ops.reshape(ops.cast(row_factors, g.dtype), (-1,) + (1,) * (len(g.shape) - 1))


def contribution_norms(calls, output_grads, rounded, factors, scaled_exactly, views):
    """``n̂_i``: the norm of example i's clipped contribution with factors ``c``, the ``rounded`` calls at
    ``round(c ⊙ g)`` (their rules' norms at that cotangent), the others ``c_i`` times ``√scaled_exactly``."""
    row_factors = _row_factors(factors, views)
    measured = ops.square(factors) * scaled_exactly
    with example_rows(views):
        for i in rounded:
            call, g = calls[i], output_grads[i]
            measured = measured + call.rule.sq_norms(call.layer, call.inputs, scaled_cotangent(g, row_factors))
    return ops.sqrt(ops.maximum(measured, 0.0))


def _check_per_example(value, like, call, what):
    """A rule's result must have one row per example (static shapes): a per-row result under AugMult is a bug."""
    rows, want = value.shape[0], like.shape[0]
    if rows is not None and want is not None and int(rows) != int(want):
        raise ValueError(
            f"The ghost-norm rule of layer '{call.layer.name}' ({type(call.layer).__name__}) gave {what} for "
            f"{int(rows)} rows, not one per example ({int(want)}). A rule registered with views=True must group "
            "the K rows of each example (tan_keras.ghost.norms: positions, example_sums).")
