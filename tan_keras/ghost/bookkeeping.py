"""Book-keeping: the per-example norms and the clipped gradient sum of a ghost step, layer by layer.

From the calls recorded by ``capture.capture`` and their output gradients
``g`` (one backward pass of the batched model):

    ‖∇ℓ_i‖² = Σ_layers ‖∇_layer ℓ_i‖²,      c_i = min(1, C/‖∇ℓ_i‖),
    Σ_i c_i ∇_W ℓ_i = (∂z/∂W)ᵀ (c ⊙ g)        (Bu et al., ICML'23)

(details in ``norms_and_clipped_sum``). The backends supply the layer's
vector-Jacobian product; where the cotangent is 16-bit, a rule's own
``weight_grads`` (bf16 matmuls with float32 sums) takes its place. Where
that cotangent is rounded (to 16 bits, or to TF32 by a GPU's float32
matmuls), the factors are checked against what will be added and halved
where needed (``_backed_off_factors``).
"""

import contextlib

import keras
from keras import ops

from tan_keras import clipping, per_example
from tan_keras.ghost.capture import _drop_examples, _with_input, call_inputs
from tan_keras.ghost.norms import entry_sum_sq, example_rows, operand_norms
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
    calls = list(calls)  # a measured call's input is replaced by the values its matmuls read (``_matmul_exact``)
    sq_norms = ops.zeros_like(like, dtype="float32")
    scaled_exactly = sq_norms  # the part whose clipped contribution is c_i times the one measured (see below)
    clip_sq = sq_norms  # what the factors clip: the norms, with TF32-bounded layers at their bound (below)
    explicit, rounded = [], []  # per call: its per-example gradients or None; the calls measured (rounded)
    with example_rows(views):
        for index, (call, g) in enumerate(zip(calls, output_grads)):
            rule = call.rule
            pairs = rule.per_example_grads(call.layer, call.inputs, g) if rule.per_example_grads else None
            explicit.append(pairs)
            if pairs is None:
                bits = _bounded_bits(call, g)
                measured = bits is None and _rounds_cotangent(g)
                if measured:
                    calls[index] = call = _with_input(call, _matmul_exact)
                    rounded.append(index)
                with operand_norms() if bits is not None else contextlib.nullcontext([]) as products:
                    term = rule.sq_norms(call.layer, call.inputs, g)
                _check_per_example(term, like, call, "norms")
                sq_norms = sq_norms + term
                if bits is not None and products:  # the norm's matmuls gave their operands' norms
                    term = ops.square(ops.sqrt(ops.maximum(term, 0.0)) + rounding_slack(bits) * sum(products))
                if not measured:
                    scaled_exactly = scaled_exactly + term
                clip_sq = clip_sq + term
            else:
                for entry in pairs:
                    v, grads = entry[:2]
                    _check_per_example(grads, like, call, f"gradients of '{v.path}'")
                    term = entry_sum_sq(entry)
                    sq_norms, scaled_exactly, clip_sq = sq_norms + term, scaled_exactly + term, clip_sq + term
    # max(., 0): the WS-conv formula subtracts, and can round a zero norm below 0.
    norms = ops.sqrt(ops.maximum(sq_norms, 0.0))
    clip_norms = ops.sqrt(ops.maximum(clip_sq, 0.0))  # = norms where no layer is TF32-bounded (a CPU, bf16)
    if rounded:
        factors = _backed_off_factors(calls, output_grads, rounded, clip_norms, scaled_exactly, l2_norm_clip,
                                      views)
    else:
        factors = clipping.clip_factors(clip_norms, l2_norm_clip)  # 0 for a non-finite norm
    all_finite = ops.all(factors != 0)
    row_factors = _row_factors(factors, views)
    keep = row_factors != 0

    variables = model.trainable_variables
    index = {id(v): i for i, v in enumerate(variables)}

    def clipped_sum(drop):
        """Every layer's share of ``Σ_i c_i ∇ℓ_i``; ``drop``: zero the dropped examples' rows first."""
        out = [None] * len(variables)
        for position, (call, g, pairs) in enumerate(zip(calls, output_grads, explicit)):
            own = _own_trainable_variables(call.layer, index)
            done = set()
            for v, grads, *_ in pairs or ():
                out[index[id(v)]] = ops.cast(clipping.weighted_sum([grads], factors, drop)[0], v.dtype)
                done.add(id(v))
            rest = [v for v in own if id(v) not in done]
            if rest:
                cotangent = scaled_cotangent(g, row_factors)
                if position in rounded:
                    cotangent = _matmul_exact(cotangent)
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
    cotangent ``c ⊙ g``. A rounded cotangent (16-bit, or float32 rounded for a GPU's TF32 matmuls) goes to the
    rule's ``weight_grads`` where it has one (matmuls of exact products with float32 sums); the rest to the
    backend's ``layer_vjp`` (the layer re-run in float32)."""
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
    """Whether a ghost-form layer's clipped contribution comes from a rounded cotangent: ``c ⊙ g`` in 16 bits,
    or in float32 where the device's float32 matmuls round their operands (TF32 on a GPU: ``_matmul_exact``)."""
    dtype = keras.backend.standardize_dtype(g.dtype)
    return dtype in ("bfloat16", "float16") or (dtype == "float32" and per_example.float32_matmul_bits() < 24)


def _matmul_exact(x):
    """``x`` as the device's default float32 matmul reads it, so that every matmul multiplies it exactly.

    Where float32 matmuls keep fewer significand bits of their operands
    than float32 has (a GPU's TF32: 11 of 24, ``per_example.float32_matmul_bits``),
    a ghost-form layer's input and its cotangent ``c ⊙ g`` are rounded so
    once, explicitly: book-keeping's matmul and its measurement
    (``contribution_norms``) then read the same values, whatever rounding a
    kernel would apply, and the measured norm is that of what is added.
    16-bit values, and all values where nothing is dropped (a CPU), pass
    unchanged.
    """
    if keras.backend.standardize_dtype(x.dtype) != "float32":
        return x
    bits = per_example.float32_matmul_bits()
    return x if bits >= 24 else per_example.round_significand(x, bits)


def rounding_slack(bits):
    """``κ``: a TF32-bounded layer's clipped contribution is at most ``c_i (N_i + κ Σ ‖a_i‖_F ‖g_i‖_F)``.

    For a matmul whose operands are rounded to ``bits`` significant bits
    (relative error ``u = 2^(1 - bits)`` at most, rounded to nearest or
    truncated) with exact products and float32 sums. The norm ``N_i`` is that
    of ``r₁(a)ᵀ r₁(g)`` (the norm's own matmuls), the contribution
    ``r₂(a)ᵀ r₂(c g)`` (book-keeping's matmul, rounded its own way), so

        ‖r₂(a)ᵀ r₂(cg) − c r₁(a)ᵀ r₁(g)‖_F ≤ ‖r₂(a) − r₁(a)‖_F ‖r₂(cg)‖_F + ‖r₁(a)‖_F ‖r₂(cg) − c r₁(g)‖_F
                                          ≤ c ‖a‖_F ‖g‖_F (1 + u)(4u + 2⁻²²)

    (``‖Xᵀ Y‖_F ≤ ‖X‖_F ‖Y‖_F``; ``2⁻²²`` covers the float32 product
    ``c·g``), and ``1/(1 − u)²`` more allows for the operand norms being
    taken of the rounded values. Cancellation over positions cannot beat
    it: the bound is on the operands, not on their product.
    """
    u = 2.0 ** (1 - bits)
    return (1 + u) * (4 * u + 2.0**-22) / (1 - u) ** 2


def _bounded_bits(call, g):
    """The bits this device's float32 matmuls keep, for a ghost-form call whose TF32 rounding is bounded a priori
    (``rounding_slack``): a float32 cotangent, a device that rounds, a rule whose share is its norm's matmuls
    (``GhostNormRule.matmul_share``). None elsewhere: a CPU and 16-bit operands need no bound (16-bit cotangents
    are measured by ``_backed_off_factors``), nor do other rules' (measured too)."""
    share = call.rule.matmul_share
    if share is None or keras.backend.standardize_dtype(g.dtype) != "float32":
        return None
    bits = per_example.float32_matmul_bits()
    return bits if bits < 24 and share(call.layer, call.inputs) else None


def _backed_off_factors(calls, output_grads, rounded, norms, scaled_exactly, l2_norm_clip, views):
    """Clip factors for a step in which some ghost-form layers get their cotangent ``c ⊙ g`` rounded.

    Book-keeping gives a ghost-form layer's share of the clipped sum as its
    weight gradient at the cotangent ``ĝ_i = round(c_i g_i)``: the layer's
    compute dtype (bf16 under ``mixed_bfloat16``), or in float32 the 11 bits
    of TF32 that a GPU's float32 matmuls keep (``_matmul_exact``, which also
    rounds the layer's input once for both). Rounding is elementwise,
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
    (about 2⁻⁹ of the norm in bf16, 2⁻¹² in TF32) does not halve an example:
    the bound holds with clip norm C, and clipped examples come out at most
    0.8% shorter than C. ``n̂`` is computed as the norms are (fp32 sums of
    exact products of the same rounded values), so the bound holds to that
    accuracy.
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
    """``c ⊙ g`` in ``g``'s dtype: the cotangent of book-keeping (of a measured call, ``_matmul_exact`` of it, the
    one ``contribution_norms`` measures)."""
    return g * ops.reshape(ops.cast(row_factors, g.dtype), (-1,) + (1,) * (len(g.shape) - 1))


def contribution_norms(calls, output_grads, rounded, factors, scaled_exactly, views):
    """``n̂_i``: the norm of example i's clipped contribution with factors ``c``, the ``rounded`` calls at
    ``round(c ⊙ g)`` (their rules' norms at that cotangent), the others ``c_i`` times ``√scaled_exactly``."""
    row_factors = _row_factors(factors, views)
    measured = ops.square(factors) * scaled_exactly
    with example_rows(views):
        for i in rounded:
            call, g = calls[i], output_grads[i]
            cotangent = _matmul_exact(scaled_cotangent(g, row_factors))
            measured = measured + call.rule.sq_norms(call.layer, call.inputs, cotangent)
    return ops.sqrt(ops.maximum(measured, 0.0))


def _check_per_example(value, like, call, what):
    """A rule's result must have one row per example (static shapes): a per-row result under AugMult is a bug."""
    rows, want = value.shape[0], like.shape[0]
    if rows is not None and want is not None and int(rows) != int(want):
        raise ValueError(
            f"The ghost-norm rule of layer '{call.layer.name}' ({type(call.layer).__name__}) gave {what} for "
            f"{int(rows)} rows, not one per example ({int(want)}). A rule registered with views=True must group "
            "the K rows of each example (tan_keras.ghost.norms: positions, example_sums).")
