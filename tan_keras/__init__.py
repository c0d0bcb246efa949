"""tan_keras: differentially private training for Keras 3 (TensorFlow and JAX).

Public API:

* optimizers: ``DPSGD``, ``DPAdam``, ``NoisySGD``
* models: ``PrivateModel``, ``PrivateSequential``, ``make_private``
* ``per_example_gradients`` (vectorized, for tests and tools)
* submodules: ``accounting`` (ε, calibration, ledger), ``tan`` (TAN scaling
  rules), ``clipping`` (pure clipping math)
"""

from tan_keras.optimizers import DPAdam, DPSGD, NoisySGD, is_private_optimizer
from tan_keras.per_example import per_example_gradients
from tan_keras.private_model import PrivateModel, PrivateSequential, check_private_layers, make_private

__all__ = [
    "DPSGD",
    "DPAdam",
    "NoisySGD",
    "PrivateModel",
    "PrivateSequential",
    "make_private",
    "check_private_layers",
    "is_private_optimizer",
    "per_example_gradients",
]

__version__ = "0.1.0"
