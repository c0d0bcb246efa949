"""The privacy ledger of a run: composed DP-SGD events, saveable with checkpoints.

:class:`PrivacyLedger` keeps every step a run took as :class:`LedgerRecord` s
(consecutive steps of one mechanism merged), gives ε or δ of their
composition, and round-trips through JSON (``tan_keras.callbacks`` saves it
with the weights). Plain Python + ``dp_accounting``: this module imports no
Keras, TensorFlow or JAX. The events are ``tan_keras.dp_events``'.
"""

import dataclasses
import json

import dp_accounting

from tan_keras.dp_events import (
    DEFAULT_PLD_DISCRETIZATION,
    _check_accountant,
    _check_delta,
    _check_epsilon,
    _check_noise_multiplier,
    _check_steps,
    _composed_accountant,
    _Relation,
    _resolve_sampling,
    make_dp_event,
    neighboring_relation,
)

__all__ = ["LedgerRecord", "PrivacyLedger"]


@dataclasses.dataclass(frozen=True)
class LedgerRecord:
    """``steps`` consecutive DP-SGD steps with the same (σ, q, sampling, B, N)."""

    noise_multiplier: float
    sampling_rate: float
    steps: int
    sampling: str = "poisson"
    num_examples: int | None = None
    batch_size: int | None = None

    def __post_init__(self):
        sigma = _check_noise_multiplier(self.noise_multiplier)
        steps = _check_steps(self.steps)
        q, b, n = _resolve_sampling(self.sampling_rate, self.batch_size,
                                    self.num_examples, self.sampling)
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(
            self, "sampling_rate", q if self.sampling_rate is None else float(self.sampling_rate)
        )
        object.__setattr__(self, "batch_size", b)
        object.__setattr__(self, "num_examples", n)

    def same_mechanism(self, other):
        """True if ``other`` differs from this record only in ``steps``."""
        return dataclasses.replace(self, steps=1) == dataclasses.replace(other, steps=1)

    def dp_event(self):
        """This record's ``dp_accounting`` event (see :func:`make_dp_event`)."""
        if self.batch_size is not None:
            return make_dp_event(self.noise_multiplier, self.steps,
                                 batch_size=self.batch_size,
                                 num_examples=self.num_examples, sampling=self.sampling)
        return make_dp_event(self.noise_multiplier, self.steps,
                             sampling_rate=self.sampling_rate, sampling=self.sampling)


class PrivacyLedger:
    """The composed DP events of a training run, serializable with checkpoints.

    Each :meth:`record` call appends DP-SGD steps; a record identical to the
    previous one except for ``steps`` is merged into it (one
    ``SelfComposedDpEvent``), so a ledger fed once per step stays one entry
    long while (σ, q) do not change. ε is computed from the composition of
    all records, so runs that change σ, q or the sampler mid-way are
    accounted correctly.

    ``to_json`` / ``from_json`` round-trip exactly (floats are written with
    ``repr`` precision). Schema (version 1)::

        {"schema": "tan_keras.PrivacyLedger", "version": 1,
         "records": [{"noise_multiplier": σ, "sampling_rate": q, "steps": S,
                      "sampling": "poisson", "num_examples": N|null,
                      "batch_size": B|null}, ...]}
    """

    SCHEMA = "tan_keras.PrivacyLedger"
    VERSION = 1

    def __init__(self, records=()):
        self._records = []
        for r in records:
            if not isinstance(r, LedgerRecord):
                raise ValueError(f"records must be LedgerRecord instances, got {r!r}.")
            self._append(r)

    def _append(self, rec):
        if self._records and self._records[-1].same_mechanism(rec):
            last = self._records[-1]
            self._records[-1] = dataclasses.replace(last, steps=last.steps + rec.steps)
        else:
            self._records.append(rec)

    def record(self, noise_multiplier, sampling_rate, steps=1, *, sampling="poisson",
               num_examples=None, batch_size=None):
        """Appends ``steps`` steps at noise multiplier σ and sampling rate q.

        For ``sampling="sampled_without_replacement"`` (and optionally for the
        others) also give ``batch_size`` and ``num_examples``; they must agree
        with ``sampling_rate = B/N``.
        """
        self._append(LedgerRecord(noise_multiplier, sampling_rate, steps, sampling,
                                  num_examples, batch_size))
        return self

    @property
    def records(self):
        """The (merged) records, oldest first, as a tuple."""
        return tuple(self._records)

    @property
    def steps(self):
        """Total number of recorded steps."""
        return sum(r.steps for r in self._records)

    def __len__(self):
        return len(self._records)

    def dp_event(self):
        """The ``dp_accounting.ComposedDpEvent`` of all records."""
        return dp_accounting.ComposedDpEvent([r.dp_event() for r in self._records])

    def _relation(self):
        relations = {neighboring_relation(r.sampling) for r in self._records}
        if len(relations) > 1:
            raise ValueError(
                "the ledger mixes sampling methods accounted under different "
                "neighbouring relations (sampled_without_replacement uses REPLACE_ONE, "
                "the others ADD_OR_REMOVE_ONE); their ε cannot be composed. Use one "
                "family of samplers within a run."
            )
        return relations.pop() if relations else _Relation.ADD_OR_REMOVE_ONE

    def _accountant(self, accountant, pld_discretization):
        samplings = sorted({r.sampling for r in self._records})
        return _composed_accountant(self.dp_event(), self._relation(), accountant,
                                    pld_discretization, f"sampling={samplings}")

    def epsilon(self, delta, accountant="rdp", *,
                pld_discretization=DEFAULT_PLD_DISCRETIZATION):
        """ε of everything recorded so far, at target δ (0 for an empty ledger)."""
        delta = _check_delta(delta)
        _check_accountant(accountant)
        if not self._records:
            return 0.0
        return float(self._accountant(accountant, pld_discretization).get_epsilon(delta))

    def delta(self, epsilon, accountant="rdp", *,
              pld_discretization=DEFAULT_PLD_DISCRETIZATION):
        """δ of everything recorded so far, at ε (0 for an empty ledger)."""
        eps = _check_epsilon(epsilon)
        _check_accountant(accountant)
        if not self._records:
            return 0.0
        return float(self._accountant(accountant, pld_discretization).get_delta(eps))

    def to_json(self):
        """Serializes the ledger (see the class docstring for the schema)."""
        return json.dumps({
            "schema": self.SCHEMA,
            "version": self.VERSION,
            "records": [dataclasses.asdict(r) for r in self._records],
        })

    @classmethod
    def from_json(cls, s):
        """Inverse of :meth:`to_json`; validates the schema and every record."""
        try:
            data = json.loads(s)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"s is not a PrivacyLedger JSON string: {e}.") from e
        if not isinstance(data, dict) or data.get("schema") != cls.SCHEMA:
            raise ValueError(
                f"s is not a PrivacyLedger JSON document (expected schema {cls.SCHEMA!r}, "
                f"got {data.get('schema') if isinstance(data, dict) else data!r})."
            )
        if data.get("version") != cls.VERSION:
            raise ValueError(
                f"PrivacyLedger JSON version {data.get('version')!r} is not supported "
                f"(this tan_keras reads version {cls.VERSION})."
            )
        fields = {f.name for f in dataclasses.fields(LedgerRecord)}
        records = []
        for i, r in enumerate(data.get("records", [])):
            if not isinstance(r, dict) or set(r) != fields:
                raise ValueError(
                    f"records[{i}]={r!r} must have exactly the keys {sorted(fields)}."
                )
            records.append(LedgerRecord(**r))
        return cls(records)

    def __eq__(self, other):
        if not isinstance(other, PrivacyLedger):
            return NotImplemented
        return self._records == other._records

    __hash__ = None

    def __repr__(self):
        return f"PrivacyLedger(steps={self.steps}, records={self._records!r})"
