"""TensorFlow reference per-example gradients: one example at a time, no vectorization (``check_per_example``)."""

import tensorflow as tf

from tan_keras.per_example.tensorflow.common import call_model, compute_loss, leading_dim


def loop_per_example_gradients(model, x, y=None, sample_weight=None):
    """``∇ℓ_i`` one example at a time, each in its own eager ``GradientTape`` (lists of numpy arrays)."""
    n = int(leading_dim(x))
    variables = model.trainable_variables
    out = []
    for i in range(n):
        xi, yi = tf.nest.map_structure(lambda a: tf.convert_to_tensor(a[i:i + 1]), (x, y))
        wi = None if sample_weight is None else tf.convert_to_tensor(sample_weight[i:i + 1])
        with tf.GradientTape() as tape:
            y_pred = call_model(model, xi)
            loss = compute_loss(model, xi, yi, y_pred, wi)
        grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        out.append([tf.convert_to_tensor(g).numpy() for g in grads])
    return out
