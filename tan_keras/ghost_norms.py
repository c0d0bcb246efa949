"""The old path of the ghost-clipping package: use ``tan_keras.ghost`` instead.

``tan_keras.ghost_norms`` was one module; its contents now live in
``tan_keras.ghost`` (``registry``, ``norms``, ``keras_layers``, ``capture``,
``bookkeeping``). This module re-exports the names code written against the
old path uses, so ``from tan_keras import ghost_norms`` and
``ghost_norms.register_ghost_norm(...)`` keep working. The fallback messages of
``log_fallback`` are still logged on the logger named ``tan_keras.ghost_norms``.
The rules for ``models/``' layers are registered by ``models.layers`` and
``models.dln`` themselves.
"""

import keras  # noqa: F401  (``ghost_norms.keras.ops`` in code written against the old module)
from keras import ops  # noqa: F401

from tan_keras.ghost.bookkeeping import norms_and_clipped_sum  # noqa: F401
from tan_keras.ghost.capture import (LayerCall, call_inputs, capture, foreign_read_reason,  # noqa: F401
                                     pre_activation_output)
from tan_keras.ghost.keras_layers import (conv_per_example_grads, conv_sq_norms, dense_per_example_grads,  # noqa: F401
                                          dense_sq_norms, einsum_dense_sq_norms, embedding_sq_norms,
                                          group_norm_per_example_grads, layer_norm_per_example_grads)
from tan_keras.ghost.norms import matmul_grad_sq_norms, matmul_per_example_grads, shifted_inputs  # noqa: F401
from tan_keras.ghost.registry import (_RULES, GhostNormRule, GhostPlan, check_calls, ghost_plan,  # noqa: F401
                                      log_fallback, norm_mode, register_ghost_norm, rule_for, use_ghost)
