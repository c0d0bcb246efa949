"""What the benchmark binaries share (no flags): their models, the repeated batch, device and peak memory.

``experiments.benchmark`` and ``experiments.benchmark_peers`` both import
this module; it defines no absl flags, so either binary (and the tests) can
use it.

Models (``build_model``):

* ``cnn``, ``mlp``: MNIST-sized (28x28x1 / 784), 10 classes.
* ``wrn16_4``: ``models/wrn.py``'s WRN-16-4 (GroupNorm 16), 32x32x3, 10 classes,
  2,751,562 parameters.
* ``nf_resnet50``: ``models/nf_resnet.py``'s NF-ResNet-50, ImageNet-sized
  (1000 classes, 25.5M parameters); ``image_size`` 224 (default) or 128.
* ``vit``: ``experiments/vit.py``'s ``vit_small`` (6 blocks x 384 wide,
  ``MultiHeadAttention``), 32x32x3, 10 classes.
"""

import os
import platform
import resource
import time

MODELS = ("cnn", "mlp", "wrn16_4", "nf_resnet50", "vit")
NF_RESNET_IMAGE_SIZES = (224, 128)
DEFAULT_CLASSES = {"cnn": 10, "mlp": 10, "wrn16_4": 10, "nf_resnet50": 1000, "vit": 10}


def build_model(name, num_classes=None, image_size=None):
    """``(model, input_shape)`` for a benchmark model name (one of ``MODELS``).

    ``num_classes`` defaults to the model's dataset (1000 for ``nf_resnet50``,
    else 10); ``image_size`` is ``nf_resnet50``'s input side (224 or 128).
    """
    import keras

    if name not in MODELS:
        raise ValueError(f"Unknown benchmark model {name!r}; expected one of {MODELS}.")
    if image_size is not None and name != "nf_resnet50":
        raise ValueError(f"`image_size` applies to nf_resnet50 only, not to {name!r}.")
    num_classes = DEFAULT_CLASSES[name] if num_classes is None else num_classes
    if name == "cnn":
        inputs = keras.Input((28, 28, 1))
        h = keras.layers.Conv2D(16, 5, strides=2, padding="same", activation="relu")(inputs)
        h = keras.layers.GroupNormalization(groups=4)(h)
        h = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(h)
        h = keras.layers.GroupNormalization(groups=8)(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        h = keras.layers.Dense(32, activation="relu")(h)
        return keras.Model(inputs, keras.layers.Dense(num_classes)(h), name="benchmark_cnn"), (28, 28, 1)
    if name == "mlp":
        inputs = keras.Input((784,))
        h = keras.layers.Dense(256, activation="relu")(inputs)
        return keras.Model(inputs, keras.layers.Dense(num_classes)(h), name="benchmark_mlp"), (784,)
    if name == "wrn16_4":
        from models import wrn

        return wrn.wrn_16_4(num_classes=num_classes), (32, 32, 3)
    if name == "nf_resnet50":
        from models import nf_resnet

        size = NF_RESNET_IMAGE_SIZES[0] if image_size is None else image_size
        if size not in NF_RESNET_IMAGE_SIZES:
            raise ValueError(f"nf_resnet50's `image_size` must be one of {NF_RESNET_IMAGE_SIZES}, got {size!r}.")
        shape = (size, size, 3)
        return nf_resnet.nf_resnet50(num_classes=num_classes, input_shape=shape), shape
    from experiments import vit

    return vit.vit_small(num_classes=num_classes), (32, 32, 3)


def SameBatch(x, y, steps):
    """A ``PyDataset`` of ``steps`` batches, all the same host batch (no copies, constant memory)."""
    import keras

    class _SameBatch(keras.utils.PyDataset):
        def __len__(self):
            return steps

        def __getitem__(self, index):
            return x, y

    return _SameBatch()


def jax_accelerator():
    """The JAX backend's first device if it is not the CPU, else None."""
    import keras

    if keras.backend.backend() != "jax":
        return None
    import jax

    device = jax.devices()[0]
    return None if device.platform == "cpu" else device


def device_name():
    """The accelerator's kind (e.g. 'NVIDIA H200'), else the CPU's core count and architecture."""
    device = jax_accelerator()
    if device is not None:
        return device.device_kind
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def peak_memory_bytes():
    """``(bytes, what was read)``: JAX's device ``peak_bytes_in_use`` on an accelerator, else max RSS."""
    device = jax_accelerator()
    if device is not None:
        stats = device.memory_stats() or {}
        return int(stats.get("peak_bytes_in_use", 0)), f"{device.platform} peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def median_ms(fn, *args, repeats):
    """Median wall time (ms) of ``fn(*args)`` over ``repeats`` runs after one untimed (compiling) run (JAX)."""
    import jax

    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    times.sort()
    return 1000 * times[len(times) // 2]
