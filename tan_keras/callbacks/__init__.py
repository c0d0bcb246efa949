"""Callbacks: privacy budget, EMA of the weights, privacy-safe checkpoint and resume.

One module per concept; this package re-exports their public names, so
``tan_keras.callbacks.PrivacyBudget`` etc. are the public paths:

* ``budget``: :class:`PrivacyBudget` keeps the run's ledger, one DP event per
  logical step, logs ε each epoch and enforces the target;
* ``ema``: :class:`EMA`, TAN's moving average of the weights with warm-up;
* ``checkpoint``: :class:`PrivateCheckpoint`, :func:`save_checkpoint`,
  :func:`latest_checkpoint`, :func:`restore_checkpoint`: weights, optimizer
  (with the noise RNG), sampler, EMA and ledger, saved and restored together.

Imports run one way: ``checkpoint`` → ``budget`` → ``tan_keras.accounting`` /
``tan_keras.ledger``; ``ema`` stands alone.
"""

from tan_keras.callbacks.budget import PrivacyBudget
from tan_keras.callbacks.checkpoint import PrivateCheckpoint, latest_checkpoint, restore_checkpoint, save_checkpoint
from tan_keras.callbacks.ema import EMA

__all__ = ["PrivacyBudget", "EMA", "PrivateCheckpoint", "save_checkpoint", "latest_checkpoint", "restore_checkpoint"]
