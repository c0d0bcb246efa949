"""Poisson sampling with fixed physical shapes: logical vs physical batches.

DP-SGD's privacy analysis (TAN §2, Eq. 2; Abadi et al. 2016) assumes that
each logical batch is a **Poisson sample**: every one of the N examples joins
step t's batch independently with probability ``q``, so the batch size is
Binomial(N, q) with mean ``B = qN``. A plain ``fit(x, y, batch_size=B,
shuffle=True)`` walks through fixed shuffled batches instead, for which no
amplification by sampling is known (tensorflow/privacy#483,
jax_privacy#84/#272). :class:`PoissonSampler` draws the real thing and feeds
Keras ``fit`` with batches of a **fixed physical shape**:

* step t's logical batch ``{i : u_{t,i} < q}`` is drawn from a numpy
  ``Generator`` seeded with ``SeedSequence(seed, spawn_key=(0, t))``: the draw
  of a step depends only on ``(seed, t)``. The optimizer iteration i trains
  on step ``t = offset + i`` (``offset`` is 0 unless the sampler is re-bound
  to a new optimizer), so the sampler's state is ``(seed, offset)``
  (``get_state`` / ``set_state``, JSON-serializable) plus the optimizer's
  ``iterations``, saved with its variables: a resumed run redraws exactly
  the batches an uninterrupted run would, and no two optimizer steps share
  a draw;
* the batch is padded with zero-weight examples up to ``padded_batch_size``:
  the smallest multiple of ``physical_batch_size`` that is at least
  ``B + 4√B`` (the binomial's std is ``√(B(1−q)) ≤ √B``). Padded examples
  carry ``sample_weight = 0``: the train step gives them a zero gradient and
  leaves them out of compiled metrics and clip statistics (the logged
  ``loss`` follows Keras's sum-over-batch-size convention and is divided by
  the padded size); the clipped sum is divided by the
  *expected* batch size ``B = qN`` (the optimizer's ``expected_batch_size``,
  which the sampler sets or checks), never by the padded size;
* sampled examples are **never dropped**: a draw larger than
  ``padded_batch_size`` (probability ≈ 3·10⁻⁵ per step at 4 std) is padded to
  the next multiple of ``physical_batch_size`` instead. On JAX that new shape
  compiles the train step once more (each distinct size once); on TensorFlow
  Keras traces with an unknown batch dimension, so nothing retraces;
* an empty draw is a batch made only of padding: a **noise-only** step, which
  the analysis counts like any other step.

Other samplers are explicit opt-ins (``sampling=``), with names matching
``tan_keras.accounting.SAMPLING_METHODS`` so the privacy ledger is told which
one ran (``tan_keras.callbacks.PrivacyBudget`` checks it):

``"sampled_without_replacement"``
    each step draws exactly ``B`` examples uniformly without replacement.
``"shuffle"``
    a fresh permutation per data epoch (``SeedSequence(seed, spawn_key=(1,
    epoch))``), walked in ``ceil(N/B)`` batches of ``B`` (the last one shorter
    and padded; no example is dropped, so each example is used once per data
    epoch, as the accountant's conservative "shuffle" charge assumes).

**Sharded sampling** (several processes feeding one logical step, e.g. JAX
multi-process data parallelism, where each process feeds its local part of
the global batch): every process builds the same sampler with its own
``shard_index`` out of ``num_shards`` (``num_shards="jax_processes"`` reads
``jax.process_count()`` / ``jax.process_index()``). Each draws the same
*global* mask from ``(seed, step)``, so the inclusion probability of every
example stays ``q`` and the accountant is told the true ``q``, and takes
shard k's slice of the sorted drawn indices (``np.array_split`` into
``num_shards`` near-equal, disjoint, contiguous parts whose union is the
draw). The global padded size is a multiple of ``num_shards · p`` and every
shard feeds ``padded_size / num_shards`` rows: all processes take the same
number of steps with the same shapes, whatever the draw, and an empty draw
is a noise-only step everywhere. ``expected_batch_size`` stays the global
``qN``.

**Random-access sources** (``tan_keras.data_sources``): ``x`` / ``y`` /
``sample_weight`` may be ``np.memmap`` or h5py datasets, and ``x`` may be a
``RecordSource`` over per-record sources such as tfds's ArrayRecord
``tfds.data_source(...)``; each step reads only the drawn indices of the
shard, so the data need not fit in host memory.

Usage, with ``fit``::

    sampler = PoissonSampler(len(x), batch_size=256, physical_batch_size=64, seed=0)
    model.compile(optimizer=tan_keras.DPSGD(1.0, 2.5), loss=...)
    dataset = sampler.dataset(x, y, steps_per_epoch=200, model=model)  # sets expected_batch_size
    model.fit(dataset, epochs=10, callbacks=[tan_keras.callbacks.PrivacyBudget(...)])

or in one call: ``private_fit(model, x, y, batch_size=256, steps=2000,
steps_per_epoch=200, physical_batch_size=64, seed=0)``.

.. warning:: numpy's PCG64 is not a cryptographically secure generator, and
   anyone who knows the seed knows every batch. Keep the seed secret (it is
   stored in checkpoints: protect them like the data).
.. note:: ``fit``'s ``shuffle`` has no effect on a sampler dataset: the k-th
   batch requested in an epoch is the k-th step, whatever index Keras asks for.
.. warning:: Use one sampler per training run: steps are numbered by the
   bound optimizer's iteration count.
"""

import math
import numbers

import keras
import numpy as np

from tan_keras import data_sources

__all__ = ["SAMPLING_METHODS", "JAX_PROCESSES", "PoissonSampler", "SamplerDataset", "materialize", "private_fit"]

#: Samplers this module implements; the names are ``accounting.SAMPLING_METHODS``.
SAMPLING_METHODS = ("poisson", "sampled_without_replacement", "shuffle")

#: ``num_shards=JAX_PROCESSES``: one shard per JAX process (``jax.process_count()``, ``jax.process_index()``).
JAX_PROCESSES = "jax_processes"

_POISSON_STREAM, _SHUFFLE_STREAM = 0, 1
_STATE_SCHEMA = "tan_keras.PoissonSampler"


def _round_up(n, multiple):
    return int(math.ceil(n / multiple) * multiple)


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _map(fn, tree):
    """Applies ``fn`` to the arrays of a dict/list/tuple structure (or one array)."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(fn, v) for v in tree)
    return fn(tree)


def _leaves(tree):
    if tree is None:
        return []
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [a for v in tree for a in _leaves(v)]
    return [tree]


def _as_indexable(a):
    """numpy arrays, memmaps and indexable sources (h5py, ...) pass; lists become arrays."""
    if isinstance(a, (list, tuple)) or not (hasattr(a, "__getitem__") and hasattr(a, "__len__")):
        return np.asarray(a)
    return a


def _read(a, indices):
    """``a[indices]`` as a numpy array; a zero-row array of ``a``'s row shape when ``indices`` is empty."""
    if len(indices):
        return np.asarray(a[indices])
    first = np.asarray(a[np.arange(1)]) if len(a) else np.zeros((1,), np.float32)
    return first[:0]


def _pad(rows, size):
    """``rows`` followed by ``size - len(rows)`` rows of zeros."""
    n = len(rows)
    if size > n:
        rows = np.concatenate([rows, np.zeros((size - n,) + rows.shape[1:], rows.dtype)], axis=0)
    return rows


def _take_padded(a, indices, size):
    """``a[indices]`` followed by ``size - len(indices)`` rows of zeros."""
    return _pad(_read(a, indices), size)


def _jax_process_layout():
    """``(jax.process_count(), jax.process_index())`` on the JAX backend, else ``(1, 0)``."""
    if keras.backend.backend() != "jax":
        return 1, 0
    import jax

    return jax.process_count(), jax.process_index()


def _shards(num_shards, shard_index):
    """Validated ``(num_shards, shard_index)``; ``JAX_PROCESSES`` asks JAX."""
    if num_shards == JAX_PROCESSES:
        if shard_index is not None:
            raise ValueError(f"num_shards={JAX_PROCESSES!r} reads the shard index from JAX; do not pass `shard_index`.")
        import jax  # only when asked: the process layout of jax.distributed

        return jax.process_count(), jax.process_index()
    num_shards = _check_int("num_shards", num_shards)
    shard_index = 0 if shard_index is None else _check_int("shard_index", shard_index, minimum=0)
    if shard_index >= num_shards:
        raise ValueError(f"`shard_index`={shard_index} must be < `num_shards`={num_shards}.")
    return num_shards, shard_index


def materialize(dataset):
    """Reads a finite, *unbatched* ``tf.data`` / tfds dataset into numpy arrays.

    Elements may be tensors, tuples (``as_supervised=True`` gives ``(x, y)``)
    or dicts; the result has the same structure with a leading example axis.
    Poisson sampling needs random access, which ``tf.data`` does not offer: the
    data must fit in host memory (or use any indexable source, e.g. an
    ``np.memmap`` or an h5py dataset, directly).
    """
    if not hasattr(dataset, "as_numpy_iterator"):
        raise TypeError(f"materialize expects a tf.data.Dataset, got {type(dataset).__name__}.")
    elements = list(dataset.as_numpy_iterator())
    if not elements:
        raise ValueError("The dataset is empty.")

    def stack(*items):
        first = items[0]
        if isinstance(first, dict):
            return {k: stack(*(it[k] for it in items)) for k in first}
        if isinstance(first, (tuple, list)):
            return type(first)(stack(*parts) for parts in zip(*items))
        return np.stack([np.asarray(it) for it in items])

    return stack(*elements)


class PoissonSampler:
    """Draws DP-SGD's logical batches and pads them to fixed physical shapes.

    Args:
      num_examples: N, the size of the training set.
      sampling_rate: q. Give it, or ``batch_size`` (then ``q = B/N``, TAN §2).
      batch_size: B, the expected (Poisson) or exact (other samplers) batch size.
      physical_batch_size: p, examples per on-device chunk; logical batches are
        padded to a multiple of p. Use the model's ``physical_batch_size``.
        ``None`` pads to a multiple of 1 (one chunk per step).
      seed: int seed of the batch draws. ``None`` draws fresh OS entropy; it is
        then kept in ``get_state()`` so that a resumed run redraws the same
        batches.
      sampling: ``"poisson"`` (default), or the explicit opt-ins
        ``"sampled_without_replacement"`` and ``"shuffle"`` (module docstring).
      max_batch_stds: head-room of the fixed padded size, in binomial std's
        (``√B``) above B.
      num_shards: K, the processes that feed one logical step together, each
        with its own slice of every draw (module docstring). ``1`` (default):
        this process feeds the whole batch. ``"jax_processes"``
        (:data:`JAX_PROCESSES`): ``jax.process_count()``, with the shard index
        ``jax.process_index()``.
      shard_index: k in ``[0, K)``, this process's shard (default 0).

    Attributes:
      expected_batch_size: ``qN`` — the B of ``(Σ clip + noise) / B``.
      padded_batch_size: the fixed number of examples fed per step, over all
        shards (a draw larger than this is padded to the next multiple of
        ``K·p``; see the module docstring).
      shard_batch_size: ``padded_batch_size / K``, the rows this shard feeds
        per step (the local batch of a data-parallel process).
      offset: the model's optimizer iteration i (one logical step) uses the
        draw of step ``offset + i``. A resumed run restores ``iterations`` with
        the optimizer, and the seed and offset with :meth:`set_state`, so it
        draws exactly the batches an uninterrupted run would; a draw that was
        prefetched but never trained on may be drawn again (it released
        nothing). Rebinding the sampler to a new optimizer (whose iterations
        restart at 0) moves the offset past every draw handed out, so one
        sampler never gives two trained steps the same draw.
    """

    def __init__(self, num_examples, *, sampling_rate=None, batch_size=None, physical_batch_size=None,
                 seed=None, sampling="poisson", max_batch_stds=4.0, num_shards=1, shard_index=None):
        self.num_examples = _check_int("num_examples", num_examples)
        if sampling not in SAMPLING_METHODS:
            raise ValueError(f"`sampling` must be one of {SAMPLING_METHODS}, got {sampling!r}.")
        self.sampling = sampling
        if (sampling_rate is None) == (batch_size is None):
            raise ValueError("Pass exactly one of `sampling_rate` (q) and `batch_size` (B = qN).")
        n = self.num_examples
        if batch_size is not None:
            batch_size = _check_int("batch_size", batch_size)
            if batch_size > n:
                raise ValueError(f"`batch_size`={batch_size} exceeds `num_examples`={n}.")
            sampling_rate = batch_size / n
        if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, numbers.Real) or not 0 < sampling_rate <= 1:
            raise ValueError(f"`sampling_rate` must be in (0, 1], got {sampling_rate!r}.")
        self.sampling_rate = float(sampling_rate)
        self.expected_batch_size = self.sampling_rate * n
        if sampling == "poisson":
            self.batch_size = batch_size
        else:
            b = batch_size if batch_size is not None else round(self.expected_batch_size)
            if b < 1 or not math.isclose(b, self.expected_batch_size, rel_tol=1e-9):
                raise ValueError(
                    f"sampling={sampling!r} uses fixed batches of B = qN examples, but q·N = "
                    f"{self.expected_batch_size} is not a positive integer; pass `batch_size`.")
            self.batch_size = int(b)
            self.expected_batch_size = float(b)
        self.physical_batch_size = (None if physical_batch_size is None
                                    else _check_int("physical_batch_size", physical_batch_size))
        if isinstance(max_batch_stds, bool) or not isinstance(max_batch_stds, numbers.Real) or max_batch_stds < 0:
            raise ValueError(f"`max_batch_stds` must be a number >= 0, got {max_batch_stds!r}.")
        self.max_batch_stds = float(max_batch_stds)
        self.num_shards, self.shard_index = _shards(num_shards, shard_index)
        multiple = (self.physical_batch_size or 1) * self.num_shards
        if sampling == "poisson":
            b = self.expected_batch_size
            cap = math.ceil(b + self.max_batch_stds * math.sqrt(b))
            self.padded_batch_size = max(multiple, min(_round_up(cap, multiple), _round_up(n, multiple)))
        else:
            self.padded_batch_size = _round_up(self.batch_size, multiple)
        self.shard_batch_size = self.padded_batch_size // self.num_shards
        if seed is None:
            seed = int(np.random.SeedSequence().entropy)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative int or None, got {seed!r}.")
        self.seed = int(seed)
        self.offset = 0  # the bound optimizer's iteration i draws logical step offset + i
        self.served_until = 0  # 1 + the largest step handed out so far
        self._model = self._optimizer = None
        self.batches_served = 0  # incremented per batch built; PrivacyBudget checks fit uses it

    # -- draws ----------------------------------------------------------------------------------

    def _rng(self, *key):
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=key)))

    def indices(self, step):
        """Sorted indices of the examples in logical step ``step`` (a pure function of (seed, step))."""
        step = _check_int("step", step, minimum=0)
        n = self.num_examples
        if self.sampling == "poisson":
            return np.flatnonzero(self._rng(_POISSON_STREAM, step).random(n) < self.sampling_rate)
        if self.sampling == "sampled_without_replacement":
            return np.sort(self._rng(_POISSON_STREAM, step).choice(n, self.batch_size, replace=False))
        per_epoch = self.batches_per_epoch
        epoch, j = divmod(step, per_epoch)
        order = self._rng(_SHUFFLE_STREAM, epoch).permutation(n)
        return np.sort(order[j * self.batch_size:(j + 1) * self.batch_size])

    def shard_indices(self, step):
        """This shard's part of :meth:`indices` (``step``): slice k of its ``np.array_split`` into K parts.

        The K parts are disjoint and their union is the global draw; their
        sizes differ by at most one.
        """
        idx = self.indices(step)
        if self.num_shards == 1:
            return idx
        return np.array_split(idx, self.num_shards)[self.shard_index]

    @property
    def batches_per_epoch(self):
        """Steps per data epoch: ``ceil(N/B)`` for "shuffle", else ``1/q`` (in expectation)."""
        if self.sampling == "shuffle":
            return math.ceil(self.num_examples / self.batch_size)
        return 1.0 / self.sampling_rate

    def padded_size(self, num_sampled):
        """Physical batch size, over all shards, for a draw of ``num_sampled`` examples (never truncates)."""
        multiple = (self.physical_batch_size or 1) * self.num_shards
        return max(self.padded_batch_size, _round_up(num_sampled, multiple))

    def batch(self, step, x, y=None, sample_weight=None):
        """``(x, y, sample_weight)`` of this shard's part of logical step ``step``, zero-weight padded.

        ``sample_weight`` is 1 (or the user's weight) for sampled examples and 0
        for padding; ``x`` / ``y`` may be arrays, random-access sources
        (``np.memmap``, h5py), or dicts / tuples of them, or ``x`` a
        :class:`tan_keras.data_sources.RecordSource` (then ``y`` and
        ``sample_weight`` come from its records). Only the drawn rows of this
        shard are read. Every shard returns :meth:`padded_size` ``/ K`` rows.
        """
        all_idx = self.indices(step)
        size = self.padded_size(len(all_idx)) // self.num_shards
        idx = all_idx if self.num_shards == 1 else np.array_split(all_idx, self.num_shards)[self.shard_index]
        if isinstance(x, data_sources.RecordSource):
            if y is not None or sample_weight is not None:
                raise ValueError("A RecordSource gives x, y and sample_weight from its records; pass y=None and "
                                 "sample_weight=None (name the features in RecordSource(..., y=, sample_weight=)).")
            x_rows, y_rows, w_rows = x.read(idx)
        else:
            read = lambda a: _read(_as_indexable(a), idx)  # noqa: E731
            x_rows, y_rows = _map(read, x), _map(read, y)
            w_rows = None if sample_weight is None else _read(_as_indexable(sample_weight), idx)
        weights = np.zeros((size,), np.float32)
        weights[:len(idx)] = 1.0 if w_rows is None else np.asarray(w_rows, np.float32).reshape(len(idx))
        self.batches_served += 1
        self.served_until = max(self.served_until, step + 1)
        pad = lambda rows: _pad(rows, size)  # noqa: E731
        return _map(pad, x_rows), _map(pad, y_rows), weights

    # -- state ----------------------------------------------------------------------------------

    def _config(self):
        return {"num_examples": self.num_examples, "sampling_rate": self.sampling_rate,
                "sampling": self.sampling, "batch_size": self.batch_size,
                "physical_batch_size": self.physical_batch_size,
                "padded_batch_size": self.padded_batch_size}

    def get_state(self):
        """JSON-serializable state: the seed, the draw offset, and the config it must match.

        With the optimizer's ``iterations`` (saved with its variables) this
        fixes every future batch: iteration i draws step ``offset + i``.
        """
        return {"schema": _STATE_SCHEMA, "seed": self.seed, "offset": self.offset,
                "served_until": self.served_until, "config": self._config()}

    def set_state(self, state):
        """Restores :meth:`get_state` output (checks that the config is the same)."""
        if not isinstance(state, dict) or state.get("schema") != _STATE_SCHEMA:
            raise ValueError(f"Not a PoissonSampler state: {state!r}.")
        saved = state["config"]
        mine = self._config()
        diff = {k: (saved.get(k), v) for k, v in mine.items() if k != "padded_batch_size" and saved.get(k) != v}
        if diff:
            raise ValueError(
                "The checkpointed sampler differs from this one (field: (saved, now)): "
                f"{diff}. Build the sampler with the same arguments to resume the run.")
        self.seed = int(state["seed"])
        self.offset = _check_int("offset", state["offset"], minimum=0)
        self.served_until = _check_int("served_until", state["served_until"], minimum=0)
        self._optimizer = None  # the next configure() (with the restored optimizer) keeps this offset

    def next_step(self):
        """The logical step the bound optimizer's next iteration draws: ``offset + iterations``."""
        if self._model is None:
            raise ValueError("The sampler is not bound to a model: call sampler.configure(model) after compile.")
        try:
            iterations = int(keras.ops.convert_to_numpy(self._model.optimizer.iterations))
        except Exception as e:  # JAX detaches variable values while an epoch runs
            raise RuntimeError("The optimizer's iteration count cannot be read in the middle of an epoch.") from e
        return self.offset + iterations

    # -- Keras glue ------------------------------------------------------------------------------

    def check(self, model, allow_unset=False):
        """Raises ValueError unless ``model``'s optimizer and chunks fit this sampler.

        Checks that the optimizer is a tan_keras private optimizer whose
        ``expected_batch_size`` is ``qN`` (or unset, with ``allow_unset``),
        that it clips every example (no microbatches), that the model's
        ``physical_batch_size`` divides the padded batch size, and, when a
        ``keras.distribution`` joins the batches of several JAX processes
        (``jax.distributed``) into one global batch, that the sampler is
        sharded one shard per process: an unsharded sampler in every process
        would feed each drawn example once per process, multiplying its
        contribution (and the sensitivity) by the process count. Under
        ``keras.distribution.DataParallel`` it also checks that every batch
        splits evenly over the data-parallel devices (``K·p`` a multiple of
        their number).
        """
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError("Compile the model (with a tan_keras optimizer) before configuring the sampler.")
        if not hasattr(optimizer, "expected_batch_size"):
            raise ValueError(
                f"{type(optimizer).__name__} is not a tan_keras private optimizer; sampling alone does "
                "not make training private. Use tan_keras.DPSGD / DPAdam.")
        expected = optimizer.expected_batch_size
        if expected is None and not allow_unset:
            raise ValueError(
                "The optimizer's expected_batch_size is unset, so each step would be divided by the padded "
                "batch size. Configure the sampler before fit: sampler.dataset(x, y, ..., model=model) or "
                "sampler.configure(model).")
        if expected is not None and not math.isclose(expected, self.expected_batch_size, rel_tol=1e-9):
            raise ValueError(
                f"The optimizer has expected_batch_size={expected}, but the sampler draws batches of "
                f"expected size q·N = {self.sampling_rate}·{self.num_examples} = {self.expected_batch_size}. "
                "DP-SGD divides by the expected batch size (TAN Eq. 2): leave `expected_batch_size` "
                "unset (the sampler sets it) or make it equal q·N.")
        if getattr(optimizer, "num_microbatches", None) is not None:
            raise ValueError(
                "Sampled batches vary in size and are padded, so they cannot be split into "
                "`num_microbatches` groups; use num_microbatches=None (per-example clipping).")
        processes, process = _jax_process_layout()
        joined = processes > 1 and keras.distribution.distribution() is not None
        if joined and (self.num_shards, self.shard_index) != (processes, process):
            raise ValueError(
                f"This is JAX process {process} of {processes}, but the sampler has num_shards="
                f"{self.num_shards}, shard_index={self.shard_index}. Each process must feed its own slice of "
                "the global draw, or each drawn example would enter the step once per process (sensitivity "
                f"{processes}·C instead of C). Build the sampler with num_shards={JAX_PROCESSES!r}.")
        distribution = keras.distribution.distribution()
        if isinstance(distribution, keras.distribution.DataParallel):
            replicas = int(np.size(distribution.device_mesh.devices))
            multiple = (self.physical_batch_size or 1) * self.num_shards
            if multiple % replicas:
                raise ValueError(
                    f"Batches are padded to multiples of physical_batch_size·num_shards = {multiple}, which "
                    f"does not split over the {replicas} data-parallel devices. Build the sampler with a "
                    f"physical_batch_size that makes it a multiple of {replicas}.")
        model_p = getattr(model, "physical_batch_size", None)
        if model_p and self.padded_batch_size % model_p:
            raise ValueError(
                f"The model's physical_batch_size={model_p} does not divide the sampler's padded "
                f"batch size {self.padded_batch_size}; build the sampler with physical_batch_size={model_p}.")

    def configure(self, model):
        """Sets (or checks) the optimizer's ``expected_batch_size = qN`` and binds the sampler to ``model``.

        Call after ``compile`` and before ``fit`` (``dataset(..., model=model)``
        does it). Raises ValueError as :meth:`check` does. Binding to a new
        optimizer (a re-compiled model) moves :attr:`offset` past every draw
        already handed out.
        """
        self.check(model, allow_unset=True)
        optimizer = model.optimizer
        if optimizer.expected_batch_size is None:
            optimizer.expected_batch_size = self.expected_batch_size
            model.train_function = None  # a step traced before would still divide by the batch's size
        if self._optimizer is not None and optimizer is not self._optimizer:
            # A new optimizer restarts `iterations` at 0: move past every draw already handed out.
            iterations = int(keras.ops.convert_to_numpy(optimizer.iterations))
            self.offset = max(self.offset, self.served_until - iterations)
        self._model, self._optimizer = model, optimizer
        object.__setattr__(model, "_tan_sampler", self)
        return model

    def dataset(self, x, y=None, sample_weight=None, *, steps_per_epoch, model=None):
        """A ``keras.utils.PyDataset`` of ``steps_per_epoch`` logical batches per epoch.

        Batch i of an epoch is step :meth:`next_step` (read when the epoch
        begins) ``+ i``: the step number is the optimizer's iteration count.
        Pass ``model`` to :meth:`configure` the sampler at the same time.
        """
        if model is not None:
            self.configure(model)
        if self._model is None:
            raise ValueError("Pass `model=` (or call sampler.configure(model) after compile) so that the "
                             "sampler can number the steps and set the optimizer's expected_batch_size.")
        return SamplerDataset(self, x, y, sample_weight, steps_per_epoch)

    def __repr__(self):
        shards = f", num_shards={self.num_shards}, shard_index={self.shard_index}" if self.num_shards > 1 else ""
        return (f"PoissonSampler(num_examples={self.num_examples}, sampling_rate={self.sampling_rate}, "
                f"sampling={self.sampling!r}, physical_batch_size={self.physical_batch_size}, "
                f"padded_batch_size={self.padded_batch_size}{shards})")


class SamplerDataset(keras.utils.PyDataset):
    """``fit`` input yielding a :class:`PoissonSampler`'s padded ``(x, y, sample_weight)``.

    The k-th batch requested in an epoch is logical step ``start + k``, where
    ``start`` is the sampler's :meth:`~PoissonSampler.next_step` when the
    epoch begins (the optimizer's iteration count): batches are consumed in
    order, one optimizer step each, so the step number is the iteration that
    trains on it. The index Keras asks for is ignored (``fit`` shuffles a
    PyDataset's indices by default). Runs with one worker (the draws are
    cheap; ``tf.data`` prefetches on TensorFlow).
    """

    def __init__(self, sampler, x, y=None, sample_weight=None, steps_per_epoch=None):
        super().__init__(workers=1, use_multiprocessing=False)
        self.sampler = sampler
        self.steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch)
        n = sampler.num_examples
        for a in _leaves(x) + _leaves(y) + _leaves(sample_weight):
            if len(a) != n:
                raise ValueError(f"The sampler has num_examples={n}, but an input array has {len(a)} rows.")
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self._start, self._count = None, 0

    @property
    def num_batches(self):
        return self.steps_per_epoch

    def __len__(self):
        return self.steps_per_epoch

    def on_epoch_begin(self):
        self._start, self._count = self.sampler.next_step(), 0

    def on_epoch_end(self):
        self._start = None

    def __getitem__(self, index):
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(index)
        if self._start is None:
            # Outside an epoch Keras only peeks at a batch for its shapes.
            try:
                step = self.sampler.next_step() + index
            except RuntimeError:
                step = self.sampler.served_until + index
        else:
            # The k-th batch requested in the epoch is trained as the k-th step, whatever index
            # Keras asks for (fit(shuffle=True), the default, permutes a PyDataset's indices).
            step, self._count = self._start + self._count, self._count + 1
        x, y, sw = self.sampler.batch(step, self.x, self.y, self.sample_weight)
        return (x, sw) if y is None else (x, y, sw)


def private_fit(model, x, y=None, *, steps, sampling_rate=None, batch_size=None, sample_weight=None,
                steps_per_epoch=None, physical_batch_size=None, seed=None, sampling="poisson",
                num_shards=1, shard_index=None, sampler=None, callbacks=None, **fit_kwargs):
    """``model.fit`` for ``steps`` logical DP-SGD steps on batches drawn by a :class:`PoissonSampler`.

    Builds the sampler (unless ``sampler`` is given, e.g. restored from a
    checkpoint), sets the optimizer's ``expected_batch_size = qN``, and runs
    ``steps // steps_per_epoch`` epochs of ``steps_per_epoch`` steps (default:
    one epoch of ``steps``). ``physical_batch_size`` defaults to the model's.
    ``num_shards`` / ``shard_index`` shard every draw across processes
    (:class:`PoissonSampler`; ``num_shards="jax_processes"`` under
    ``jax.distributed``): each process feeds its slice, all with the same
    seed. ``x`` may be a :class:`tan_keras.data_sources.RecordSource`.
    Extra keyword arguments (``validation_data``, ``verbose``, ...) go to
    ``fit``. Returns the ``History``.
    """
    steps = _check_int("steps", steps)
    for key in ("batch_size", "shuffle", "steps_per_epoch", "epochs"):
        if key in fit_kwargs:
            raise ValueError(f"private_fit chooses `{key}` for fit; do not pass it.")
    if sampler is None:
        x_len = len(_leaves(x)[0])
        sampler = PoissonSampler(
            x_len, sampling_rate=sampling_rate, batch_size=batch_size,
            physical_batch_size=physical_batch_size or getattr(model, "physical_batch_size", None),
            seed=seed, sampling=sampling, num_shards=num_shards, shard_index=shard_index)
    elif sampling_rate is not None or batch_size is not None:
        raise ValueError("Pass either `sampler` or `sampling_rate`/`batch_size`, not both.")
    elif num_shards != 1 or shard_index is not None:
        raise ValueError("Pass `num_shards`/`shard_index` to the PoissonSampler you give as `sampler`.")
    steps_per_epoch = steps if steps_per_epoch is None else _check_int("steps_per_epoch", steps_per_epoch)
    if steps % steps_per_epoch:
        raise ValueError(f"`steps_per_epoch`={steps_per_epoch} must divide `steps`={steps}.")
    dataset = sampler.dataset(x, y, sample_weight, steps_per_epoch=steps_per_epoch, model=model)
    return model.fit(dataset, epochs=steps // steps_per_epoch, callbacks=callbacks, **fit_kwargs)
