"""Traces ``--steps`` fit steps of a benchmark model with the JAX profiler (for ``experiments.profile_kernels``).

    KERAS_BACKEND=jax python -m experiments.profile_step --model=wrn16_4 --batch_size=1024 \
        --mode=ghost --mixed_precision --trace_dir=/tmp/trace [--hlo_dir=/tmp/hlo]

``--mode``: ``nonprivate`` (Keras SGD) or ``ghost`` / ``vectorized`` (DP-SGD).
The compiled step runs ``--warmup`` times first, so the trace holds only
steady-state steps. The trace is ``TRACE_DIR/plugins/profile/*/*.xplane.pb``.
``--hlo_dir``: XLA also dumps every compiled module's HLO there, and the
path of the train step's optimized HLO is printed: ``profile_kernels --hlo``
reads the phase of each kernel from it.
"""

import glob
import os

from absl import app, flags

from experiments.benchmark_lib import MODELS, SameBatch, build_model

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "wrn16_4", list(MODELS), "Model.")
flags.DEFINE_integer("image_size", None, "nf_resnet50 only: input side, 224 (default) or 128.")
flags.DEFINE_integer("batch_size", 1024, "Batch size.")
flags.DEFINE_enum("mode", "ghost", ["nonprivate", "ghost", "vectorized"], "Which step.")
flags.DEFINE_bool("mixed_precision", False, "Use Keras's `mixed_bfloat16` policy.")
flags.DEFINE_integer("warmup", 3, "Untimed steps before the trace.")
flags.DEFINE_integer("steps", 5, "Traced steps.")
flags.DEFINE_string("trace_dir", None, "Where the JAX profiler writes the trace.")
flags.DEFINE_string("hlo_dir", None, "Optional: where XLA dumps the compiled modules' HLO text.")
flags.mark_flag_as_required("trace_dir")


def main(argv):
    del argv
    if FLAGS.hlo_dir:  # read when XLA's backend starts, i.e. at the first computation below
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_dump_to={FLAGS.hlo_dir} --xla_dump_hlo_as_text").strip()
    import jax
    import keras
    import numpy as np

    import tan_keras

    keras.utils.set_random_seed(0)
    if FLAGS.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model, shape = build_model(FLAGS.model, image_size=FLAGS.image_size)
    if FLAGS.mode == "nonprivate":
        optimizer = keras.optimizers.SGD(0.01)
    else:
        model = tan_keras.make_private(model, clipping=FLAGS.mode)
        optimizer = tan_keras.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.01, seed=0)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(FLAGS.batch_size, *shape)).astype("float32")
    y = rng.integers(0, model.output_shape[-1], size=(FLAGS.batch_size,)).astype("int32")
    model.fit(SameBatch(x, y, FLAGS.warmup), epochs=1, verbose=0)
    jax.profiler.start_trace(FLAGS.trace_dir)
    model.fit(SameBatch(x, y, FLAGS.steps), epochs=1, verbose=0)
    jax.profiler.stop_trace()
    print(f"traced {FLAGS.steps} steps of {FLAGS.model} ({FLAGS.mode}) to {FLAGS.trace_dir}")
    if FLAGS.hlo_dir:
        dumps = glob.glob(os.path.join(FLAGS.hlo_dir, "*jit_train_step*after_optimizations.txt"))
        if dumps:  # the step's largest module: the traced one (others are small helpers)
            print("train step's optimized HLO:", max(dumps, key=os.path.getsize))


if __name__ == "__main__":
    app.run(main)
