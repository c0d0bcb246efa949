"""Poisson sampling sharded across processes, and random-access sources that never load whole.

Runs on the backend named by KERAS_BACKEND (run once with ``tensorflow`` and
once with ``jax``). The reference for every batch is the unsharded sampler's
global draw, ``x[indices(step)]`` on an in-memory numpy copy of the data.
"""

import math

import keras
import numpy as np
import pytest

import tan_keras
from tan_keras import data_sources, sampling

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(n, inputs=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, inputs)).astype("float32"), rng.integers(0, 3, size=(n,)).astype("int32")


def shards(num_shards, *args, **kwargs):
    return [sampling.PoissonSampler(*args, num_shards=num_shards, shard_index=k, **kwargs)
            for k in range(num_shards)]


def real_rows(batch):
    """The sampled rows of a padded ``(x, y, sample_weight)`` batch (padding has weight 0)."""
    x, y, sw = batch
    keep = sw != 0
    return x[keep], y[keep]


class CountingColumn:
    """An array-like column that records every index it is asked for (and refuses anything else)."""

    def __init__(self, array):
        self.array, self.reads = array, []

    def __len__(self):
        return len(self.array)

    def __getitem__(self, indices):
        indices = np.asarray(indices)
        assert indices.ndim == 1 and np.issubdtype(indices.dtype, np.integer), f"not a row read: {indices!r}"
        self.reads.extend(indices.tolist())
        return self.array[indices]


class CountingRecords:
    """A per-record source of dicts (the tfds ``data_source`` protocol) that counts record reads."""

    def __init__(self, x, y, batched):
        self.x, self.y, self.reads = x, y, []
        if batched:
            self.__getitems__ = lambda keys: [self[k] for k in keys]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        assert isinstance(i, int), f"one record at a time, got {i!r}"
        self.reads.append(i)
        return {"features": self.x[i], "label": self.y[i]}


# --- sharded draws -------------------------------------------------------------------------------


def test_shards_split_the_same_global_draw_into_disjoint_near_equal_slices():
    """Every shard sees the unsharded draw (inclusion probability q) and takes a disjoint part of it."""
    n, k = 500, 3
    single = sampling.PoissonSampler(n, batch_size=50, seed=4)
    sharded = shards(k, n, batch_size=50, seed=4)
    for s in sharded:
        assert s.sampling_rate == single.sampling_rate == 0.1
        assert s.expected_batch_size == single.expected_batch_size == 50.0  # the accountant's q and B = qN
    for t in range(30):
        draw = single.indices(t)
        parts = [s.shard_indices(t) for s in sharded]
        for s in sharded:
            np.testing.assert_array_equal(s.indices(t), draw)
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), draw)  # the union is the draw ...
        assert sum(len(p) for p in parts) == len(set(np.concatenate(parts).tolist()))  # ... disjointly
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_sharded_batches_hold_exactly_the_global_draw_with_one_shape_on_every_shard():
    n, k, p = 400, 4, 2
    x, y = data(n)
    single = sampling.PoissonSampler(n, batch_size=40, physical_batch_size=p, seed=0)
    sharded = shards(k, n, batch_size=40, physical_batch_size=p, seed=0)
    per_shard = sharded[0].shard_batch_size
    assert sharded[0].padded_batch_size == k * per_shard and per_shard % p == 0
    assert sharded[0].padded_batch_size >= 40 + 4 * math.sqrt(40)
    for t in range(10):
        idx = single.indices(t)
        batches = [s.batch(t, x, y) for s in sharded]
        assert {b[0].shape for b in batches} == {(per_shard, 6)}
        got_x = np.concatenate([real_rows(b)[0] for b in batches])
        got_y = np.concatenate([real_rows(b)[1] for b in batches])
        np.testing.assert_array_equal(got_x, x[idx])  # shards in order: the global batch's real rows
        np.testing.assert_array_equal(got_y, y[idx])
        assert sum(b[2].sum() for b in batches) == len(idx)


def test_empty_draw_is_a_noise_only_step_on_every_shard():
    n, k = 50, 4
    x, y = data(n)
    sharded = shards(k, n, sampling_rate=0.01, physical_batch_size=2, seed=0)
    empty = [t for t in range(20) if len(sharded[0].indices(t)) == 0]
    assert empty, "q = 0.01, N = 50: about 60% of the draws are empty"
    for t in empty:
        for s in sharded:
            xb, yb, sw = s.batch(t, x, y)
            assert xb.shape == (s.shard_batch_size, 6) and len(yb) == len(sw)
            assert not sw.any()


def test_lopsided_and_oversized_draws_give_every_shard_the_same_larger_shape():
    """A draw above the padded size grows every shard alike, to the next multiple of K·p; nothing is dropped."""
    n, k, p = 400, 3, 2
    x, y = data(n)
    sharded = shards(k, n, batch_size=40, physical_batch_size=p, seed=0, max_batch_stds=0)
    big = [t for t in range(30) if len(sharded[0].indices(t)) > sharded[0].padded_batch_size]
    assert big
    for t in big:
        drawn = len(sharded[0].indices(t))
        shapes = {s.batch(t, x, y)[0].shape for s in sharded}
        assert shapes == {(math.ceil(drawn / (k * p)) * p, 6)}
    # A draw smaller than the shard count leaves some shards with padding only, same shape for all.
    few = shards(k, 20, sampling_rate=0.05, seed=1)
    t = next(t for t in range(50) if 0 < len(few[0].indices(t)) < k)
    weights = [s.batch(t, x[:20], y[:20])[2] for s in few]
    assert len({len(w) for w in weights}) == 1
    assert sum(w.sum() for w in weights) == len(few[0].indices(t)) and any(w.sum() == 0 for w in weights)


def test_sharded_sampler_sets_the_global_expected_batch_size_on_the_optimizer():
    keras.utils.set_random_seed(0)
    model = tan_keras.PrivateSequential([keras.Input((6,)), keras.layers.Dense(3)])
    model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0, seed=0), loss=LOSS)
    sampler = sampling.PoissonSampler(300, batch_size=30, num_shards=3, shard_index=2, seed=0)
    sampler.configure(model)
    assert model.optimizer.expected_batch_size == 30.0  # qN over all shards, not the shard's 10


def test_shard_arguments_are_validated():
    with pytest.raises(ValueError, match="shard_index"):
        sampling.PoissonSampler(100, batch_size=10, num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="num_shards"):
        sampling.PoissonSampler(100, batch_size=10, num_shards=0)
    with pytest.raises(ValueError, match="do not pass `shard_index`"):
        sampling.PoissonSampler(100, batch_size=10, num_shards=sampling.JAX_PROCESSES, shard_index=0)


def test_jax_processes_takes_the_shard_layout_from_jax():
    import jax

    sampler = sampling.PoissonSampler(100, batch_size=10, num_shards=sampling.JAX_PROCESSES)
    assert (sampler.num_shards, sampler.shard_index) == (jax.process_count(), jax.process_index())


# --- random-access sources ------------------------------------------------------------------------


def test_memmap_and_h5py_sources_give_the_in_memory_batches(tmp_path):
    import h5py  # a Keras dependency

    n = 120
    x, y = data(n)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=x.dtype, shape=x.shape)
    mm[:] = x
    mm.flush()
    memmap = np.load(tmp_path / "x.npy", mmap_mode="r")
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["x"], f["y"] = x, y
    in_memory = sampling.PoissonSampler(n, batch_size=12, seed=3, num_shards=2, shard_index=1)
    with h5py.File(tmp_path / "data.h5", "r") as f:
        for t in range(5):
            want = in_memory.batch(t, x, y)
            for got in (in_memory.batch(t, memmap, y), in_memory.batch(t, f["x"], f["y"])):
                for a, b in zip(got, want):
                    np.testing.assert_array_equal(a, b)


def test_sampler_reads_only_the_drawn_rows_of_its_shard():
    n, k, steps = 1000, 2, 6
    x, y = data(n)
    xs, ys, ws = CountingColumn(x), CountingColumn(y), CountingColumn(np.ones(n, np.float32))
    sampler = sampling.PoissonSampler(n, sampling_rate=0.02, num_shards=k, shard_index=0, seed=5)
    expected = []
    for t in range(steps):
        drawn = sampler.shard_indices(t)
        batch = sampler.batch(t, xs, ys, ws)
        expected.extend(drawn.tolist() if len(drawn) else [0])  # an empty shard reads one row for its shape
        np.testing.assert_array_equal(real_rows(batch)[0], x[drawn])
    for column in (xs, ys, ws):
        assert column.reads == expected
    assert len(set(xs.reads)) < n * 0.02 * steps  # about q·N/K rows per step: never the whole source


@pytest.mark.parametrize("batched", [True, False], ids=["getitems", "getitem"])
def test_record_source_reads_each_drawn_record_once(batched):
    n = 300
    x, y = data(n)
    records = CountingRecords(x, y, batched)
    source = data_sources.RecordSource(records, x="features", y="label")
    assert source.batched == batched
    sampler = sampling.PoissonSampler(n, batch_size=15, num_shards=3, shard_index=1, seed=2)
    expected = []
    for t in range(5):
        drawn = sampler.shard_indices(t)
        xb, yb, sw = sampler.batch(t, source)
        expected.extend(drawn.tolist())
        assert len(xb) == len(yb) == len(sw) == sampler.shard_batch_size
        np.testing.assert_array_equal(xb[sw != 0], x[drawn])
        np.testing.assert_array_equal(yb[sw != 0], y[drawn])
    assert records.reads == expected


def test_record_source_rejects_separate_targets_and_unknown_features():
    x, y = data(10)
    source = data_sources.RecordSource(CountingRecords(x, y, batched=False), x="features", y="label")
    sampler = sampling.PoissonSampler(10, batch_size=5, seed=0)
    with pytest.raises(ValueError, match="y=None"):
        sampler.batch(0, source, y)
    with pytest.raises(KeyError, match="image"):
        sampler.batch(0, data_sources.RecordSource(CountingRecords(x, y, batched=False), x="image"))
    with pytest.raises(ValueError, match="`x`"):
        data_sources.RecordSource(CountingRecords(x, y, batched=False), x=None)


def test_tfds_array_record_data_source_trains_with_private_fit():
    """``tfds.data_source`` (ArrayRecord) under ``tfds.testing.mock_data``, read record by record.

    tfds 4.9.10's mock assigns an unbound ``__getitems__`` to its ArrayRecord
    mock (a call fails with "missing ... 'record_keys'"), so this test reads
    with ``batched=False``; the batched path is tested above.
    """
    import tensorflow_datasets as tfds

    n = 64
    with tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = tfds.data_source("mnist", split="train")
        assert len(ds) == n
        scale = lambda r: {"image": r["image"].astype("float32") / 255.0, "label": r["label"]}  # noqa: E731
        source = data_sources.RecordSource(ds, x="image", y="label", batched=False, transform=scale)
        sampler = sampling.PoissonSampler(n, batch_size=8, physical_batch_size=4, seed=0)
        xb, yb, sw = sampler.batch(0, source)
        drawn = sampler.indices(0)
        np.testing.assert_array_equal(xb[:len(drawn)], np.stack([scale(ds[int(i)])["image"] for i in drawn]))
        np.testing.assert_array_equal(yb[:len(drawn)], [ds[int(i)]["label"] for i in drawn])
        keras.utils.set_random_seed(0)
        model = tan_keras.PrivateSequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                             keras.layers.Dense(10)], physical_batch_size=4)
        model.compile(optimizer=tan_keras.DPSGD(1.0, 1.0, seed=0), loss=LOSS)
        history = tan_keras.sampling.private_fit(model, source, steps=2, sampler=sampler, verbose=0)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 2
    assert np.isfinite(history.history["loss"]).all()
