"""Ghost clipping: per-example gradient norms without per-example gradients.

Fast ("mixed ghost") clipping, Li et al. ICLR'22 (arXiv 2110.05679), after
Goodfellow 2015 and Lee & Kifer 2021. For a layer ``z = a W + b`` over the
``T`` positions of one example, ``∇W_i = a_iᵀ g_i`` with ``g_i = ∂ℓ_i/∂z_i``, so

    ‖∇W_i‖²_F = ⟨a_i a_iᵀ, g_i g_iᵀ⟩ = ‖a_iᵀ g_i‖²_F,      ‖∇b_i‖² = ‖Σ_t g_i,t‖².

A train step needs one forward and one backward pass of the ordinary batched
model, for the output gradients ``g_i`` (hence the norms and the clip factors
``c_i = min(1, C/‖∇ℓ_i‖)``); the clipped sum ``Σ_i clip_C(∇ℓ_i)`` is assembled
layer by layer from the recorded ``a`` and ``g`` (book-keeping).

Modules, each importing only those above it:

* ``registry``: ``register_ghost_norm``, ``GhostNormRule``, the cost rule
  ``use_ghost`` and ``norm_mode``; ``ghost_plan`` (which layers to watch, or
  why not), ``check_calls``, ``log_fallback``;
* ``norms``: the matmul norm math (``matmul_grad_sq_norms``, conv patches
  ``shifted_inputs``) and the helpers a rule is written with;
* ``keras_layers``: the rules for Keras's own layers (imported here, so
  importing ``tan_keras.ghost`` registers them);
* ``capture``: the forward-pass recording and the tied-weight check;
* ``bookkeeping``: ``norms_and_clipped_sum``, the norms and the clipped sum.

A custom layer registers its own rule next to its definition, as
``models/layers.py`` does::

    from tan_keras.ghost import register_ghost_norm

    @register_ghost_norm(MyScale, views=True)
    def my_scale_sq_norms(layer, inputs, output_grad):
        g = ops.sum(output_grad * inputs, axis=range(1, len(inputs.shape) - 1))  # per row
        return ops.sum(ops.square(example_sums(g)), axis=-1)                     # per example

``views=True`` says the rule is exact under AugMult, where an example is K
consecutive rows (``norms``: ``positions`` and ``example_sums`` group them).

The train steps that use this package live in ``tan_keras.per_example``.
"""

from tan_keras.ghost import keras_layers  # noqa: F401  (registers the rules for Keras's layers)
from tan_keras.ghost.bookkeeping import norms_and_clipped_sum
from tan_keras.ghost.capture import LayerCall, call_inputs, capture, foreign_read_reason, pre_activation_output
from tan_keras.ghost.norms import (cheaper_patch_gram, conv_per_example_grads, conv_weight_grad, entry_sum_sq, example_rows,
                                   example_sums, matmul_grad_sq_norms, matmul_per_example_grads, matmul_weight_grad,
                                   num_examples, patch_gram, patch_gram_is_cheaper, per_example, per_example_sum_sq,
                                   position_sum_sq, positions, shifted_inputs, sq_norms_from)
from tan_keras.ghost.registry import (GhostNormRule, GhostPlan, check_calls, ghost_plan, log_fallback, norm_mode,
                                      register_ghost_norm, rule_for, use_ghost)

__all__ = [
    "GhostNormRule", "GhostPlan", "LayerCall", "call_inputs", "capture", "cheaper_patch_gram", "check_calls",
    "conv_per_example_grads", "conv_weight_grad", "entry_sum_sq", "example_rows", "example_sums", "foreign_read_reason", "ghost_plan",
    "log_fallback", "matmul_grad_sq_norms", "matmul_per_example_grads", "matmul_weight_grad", "norm_mode",
    "norms_and_clipped_sum", "num_examples", "patch_gram", "patch_gram_is_cheaper", "per_example",
    "per_example_sum_sq", "position_sum_sq", "positions", "pre_activation_output", "register_ghost_norm", "rule_for",
    "shifted_inputs", "sq_norms_from", "use_ghost",
]
