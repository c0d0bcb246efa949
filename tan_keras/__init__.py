"""tan_keras: differentially private training for Keras 3 (TensorFlow and JAX).

Public API:

* optimizers: ``DPSGD``, ``DPAdam``, ``NoisySGD``
* models: ``PrivateModel``, ``PrivateSequential``, ``make_private``
* ``per_example_gradients`` (vectorized, for tests and tools);
  ``check_per_example(model, x, y)``: the train step's clipping against a
  one-example loop (run it on a new architecture)
* data path: ``PoissonSampler``, ``private_fit``, ``PrivacyBudget``, ``EMA``,
  ``PrivateCheckpoint``; ``augmult.wrap`` for augmentation multiplicity
* submodules: ``accounting`` (ε, calibration; re-exports ``ledger``, the
  saveable ledger, and ``dp_events``, sampling → DP event) and ``tan`` (TAN
  scaling rules) are pure Python + dp-accounting; ``clipping`` is the
  clipping math; ``sampling`` and ``callbacks`` hold the data path;
  ``auditing``: one-run ε lower bounds with canaries.

Names are imported lazily (PEP 562), so ``import tan_keras.accounting`` does
not import Keras, TensorFlow or JAX.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DPSGD": "tan_keras.optimizers",
    "DPAdam": "tan_keras.optimizers",
    "NoisySGD": "tan_keras.optimizers",
    "is_private_optimizer": "tan_keras.optimizers",
    "PrivateModel": "tan_keras.private_model",
    "PrivateSequential": "tan_keras.private_model",
    "make_private": "tan_keras.private_model",
    "check_private_layers": "tan_keras.layer_checks",
    "per_example_gradients": "tan_keras.per_example",
    "check_per_example": "tan_keras.selfcheck",
    "PerExampleCheckError": "tan_keras.selfcheck",
    "PoissonSampler": "tan_keras.sampling",
    "RecordSource": "tan_keras.data_sources",
    "private_fit": "tan_keras.sampling",
    "PrivacyBudget": "tan_keras.callbacks",
    "EMA": "tan_keras.callbacks",
    "PrivateCheckpoint": "tan_keras.callbacks",
}
_SUBMODULES = ("accounting", "dp_events", "ledger", "tan", "clipping", "optimizers", "private_model", "per_example",
               "sampling", "augmult", "callbacks", "ghost", "ghost_norms", "selfcheck", "layer_checks", "auditing",
               "data_sources")

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"tan_keras.{name}")
    raise AttributeError(f"module 'tan_keras' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
