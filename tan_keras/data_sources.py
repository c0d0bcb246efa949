"""Random-access training sets for :class:`tan_keras.sampling.PoissonSampler`.

Poisson sampling draws a random subset of the N examples at every step, so it
needs random access: ``tf.data`` streams cannot give it. Data that fit in
host memory are numpy arrays; data that do not are read one drawn batch at a
time from a source that supports ``source[indices]``:

* **column sources**, one array-like per model input: ``np.memmap``, h5py
  datasets (``h5py.File(path)["images"]``), zarr arrays, or anything with
  ``__len__`` and ``__getitem__(sorted int array) -> array``. Pass them as
  ``x`` / ``y`` / ``sample_weight`` exactly like numpy arrays;
* **record sources**, one record (a dict of features) per index: tfds's
  ArrayRecord ``tfds.data_source(name, split=...)``, Grain / PyGrain sources,
  or any sequence of dicts. Wrap them in :class:`RecordSource`, which names
  the features that feed ``x``, ``y`` and ``sample_weight``, and pass it as
  ``x`` (with ``y=None``).

The sampler reads only the drawn indices of its own shard (plus, for a
zero-example shard, one row to learn the shapes), sorted ascending as h5py
requires: the whole source is never materialized.
"""

import numpy as np

__all__ = ["RecordSource"]


def _check_keys(name, keys, required):
    if keys is None:
        if required:
            raise ValueError(f"RecordSource needs `{name}`: the feature name(s) of the model's input.")
        return None
    leaves = [keys] if isinstance(keys, str) else list(keys.values() if isinstance(keys, dict) else keys)
    if not leaves or not all(isinstance(k, str) for k in leaves):
        raise ValueError(f"`{name}` must be a feature name, or a tuple / list / dict of feature names, got {keys!r}.")
    return keys


def _select(keys, records):
    """Stacks ``record[key]`` over the records, following the structure of ``keys``."""
    if keys is None:
        return None
    if isinstance(keys, str):
        try:
            return np.stack([np.asarray(r[keys]) for r in records])
        except KeyError:
            raise KeyError(f"The records have no feature {keys!r}; they have {sorted(records[0])}.") from None
    if isinstance(keys, dict):
        return {name: _select(k, records) for name, k in keys.items()}
    return type(keys)(_select(k, records) for k in keys)


class RecordSource:
    """Reads the drawn records of a per-record source and splits them into ``(x, y, sample_weight)``.

    Args:
      source: ``len(source)`` records, ``source[i]`` a dict of features
        (numpy-convertible). E.g. ``tfds.data_source("mnist", split="train")``.
      x: the feature name(s) fed to the model: a name, or a tuple / list /
        dict of names for a multi-input model.
      y: the feature name(s) of the targets, or ``None``.
      sample_weight: the feature name of per-example weights, or ``None``.
      transform: optional ``record -> record`` applied to each record after it
        is read (decoding, normalisation). It must not look at other records:
        it runs per example, so it is part of the per-example computation the
        privacy analysis bounds.
      batched: read a batch with ``source.__getitems__(indices)`` (ArrayRecord
        reads them in parallel) instead of ``source[i]`` one at a time.
        ``None``: batched when the source defines ``__getitems__``.
    """

    def __init__(self, source, x, y=None, sample_weight=None, *, transform=None, batched=None):
        if not (hasattr(source, "__getitem__") and hasattr(source, "__len__")):
            raise TypeError(f"RecordSource needs a source with __len__ and __getitem__, got {type(source).__name__}.")
        if transform is not None and not callable(transform):
            raise TypeError(f"`transform` must be a callable record -> record, got {transform!r}.")
        if sample_weight is not None and not isinstance(sample_weight, str):
            raise ValueError(f"`sample_weight` must be one feature name or None, got {sample_weight!r}.")
        self.source = source
        self.x = _check_keys("x", x, required=True)
        self.y = _check_keys("y", y, required=False)
        self.sample_weight = sample_weight
        self.transform = transform
        self.batched = hasattr(source, "__getitems__") if batched is None else bool(batched)
        self._empty = None  # (x, y, sample_weight) with 0 rows, cached from the first read

    def __len__(self):
        return len(self.source)

    def _records(self, indices):
        keys = [int(i) for i in indices]
        records = list(self.source.__getitems__(keys)) if self.batched else [self.source[k] for k in keys]
        if len(records) != len(keys):
            raise ValueError(f"The source returned {len(records)} records for {len(keys)} indices.")
        if self.transform is not None:
            records = [self.transform(r) for r in records]
        return records

    def read(self, indices):
        """``(x, y, sample_weight)`` of the records at ``indices`` (numpy arrays, ``len(indices)`` rows).

        ``sample_weight`` is ``None`` unless the source names a weight feature.
        An empty ``indices`` reads record 0 once (to learn the shapes), then
        never again.
        """
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
            raise ValueError(f"`indices` must be a 1-D integer array, got {indices!r}.")
        if not indices.size:
            if self._empty is None:
                self.read(np.arange(1))
            return self._empty
        records = self._records(indices)
        out = (_select(self.x, records), _select(self.y, records), _select(self.sample_weight, records))
        if self._empty is None:
            self._empty = tuple(_first_rows(part, 0) for part in out)
        return out

    def __repr__(self):
        return (f"RecordSource({type(self.source).__name__} of {len(self)} records, x={self.x!r}, "
                f"y={self.y!r}, sample_weight={self.sample_weight!r})")


def _first_rows(tree, n):
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: _first_rows(v, n) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_first_rows(v, n) for v in tree)
    return tree[:n]

