"""Layers that void per-example clipping: refused at ``compile``, ``make_private`` and when the step is traced.

An example's clipped gradient bounds its influence only if the forward pass
treats the examples of a batch separately. ``BatchNormalization`` (in
training mode) normalizes with batch statistics, so each example's
"gradient" depends on the other examples and clipping bounds nothing.

What is checked, by layer class and attribute: every sublayer, however
nested, at ``compile``/``make_private`` and again each time the private
train step is traced (so layers added after ``compile`` or created lazily in
``build()`` are seen): ``keras.layers.BatchNormalization`` and any layer with
``mixes_examples = True`` (set it on a custom layer that uses batch
statistics). What is not checked: weightless operations inside a layer's
``call`` that mix the batch (``t - ops.mean(t, axis=0)``). The vectorized
strategy is immune to them (each example runs alone); the ghost strategy
runs the batch together and is not. ``tan_keras.check_per_example`` catches
them by comparing the step with a one-example loop.
"""

import keras

#: Layers that mix information across the examples of a batch.
EXAMPLE_MIXING_LAYERS = (keras.layers.BatchNormalization,)


def check_private_layers(model):
    """Raises ValueError if ``model`` holds a layer that mixes examples."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, EXAMPLE_MIXING_LAYERS) or getattr(layer, "mixes_examples", False):
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) mixes information across the "
                "examples of a batch, so per-example gradient clipping cannot bound any one "
                "example's influence and DP-SGD would not be private. Replace it with "
                "keras.layers.GroupNormalization (or LayerNormalization), or remove it."
            )
