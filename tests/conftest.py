import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# JAX on a CPU: XLA's LLVM back end at -O0 (the HLO, what tan_keras builds, is the same; only its machine code is
# less optimized). The suite is mostly compile time: on a 2-core AMD EPYC (AVX-512) the JAX run took 449 s with
# this instead of 645 s. Set before any test imports JAX (XLA reads the flag when its CPU client starts); an
# XLA_FLAGS that already names an optimization level is kept.
if os.environ["KERAS_BACKEND"] == "jax" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
