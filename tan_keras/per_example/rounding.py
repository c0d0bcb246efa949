"""How many significand bits a device's default float32 matmul keeps of its operands (backend-neutral numpy).

A GPU's tensor cores multiply float32 operands as TF32 by default (JAX's
default matmul precision, TensorFlow's ``tensor_float_32_execution``): each
operand is rounded to 11 significant bits (10 stored), the products of the
rounded values are exact and the sums float32. A CPU keeps all 24. Ghost
book-keeping needs to know, because its share of a ghost-form layer is a
matmul at the rounded cotangent ``c ⊙ g`` (``ghost.bookkeeping``).

The probe multiplies rows ``1 + 2⁻ʲ`` (j = 1..23) by the identity: a row
comes back unchanged where the matmul keeps at least ``j + 1`` bits.
"""

import numpy as np

FLOAT32_BITS = 24  # float32's significant bits, the implicit one included
_SIZE = 64  # large enough that no compiler turns the probe's matmul into an elementwise product


def probe_operands():
    """``(rows, identity)``: (64, 64) float32 operands; row ``j - 1`` of ``rows`` holds ``1 + 2⁻ʲ`` (j = 1..23)."""
    rows = np.ones((_SIZE, _SIZE), np.float32)
    j = np.arange(1, FLOAT32_BITS, dtype=np.float64)
    rows[: FLOAT32_BITS - 1] = (1.0 + 2.0**-j)[:, None].astype(np.float32)
    return rows, np.eye(_SIZE, dtype=np.float32)


def kept_bits(product):
    """The significand bits the matmul kept, from its ``rows @ identity`` (``probe_operands``): 24 if all."""
    rows, _ = probe_operands()
    exact = np.all(np.asarray(product, np.float32) == rows, axis=1)[: FLOAT32_BITS - 1]
    first_lost = int(np.argmin(exact)) if not np.all(exact) else FLOAT32_BITS - 1
    return first_lost + 1  # rows 1 + 2^-1 .. 1 + 2^-first_lost came back: first_lost + 1 bits
