import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# XLA's CPU back end at -O0 (the HLO, what tan_keras builds, is the same; only its machine code is less
# optimized), for JAX and for TensorFlow's XLA-compiled steps (the ghost chunk). The suite is mostly compile time:
# on a 2-core AMD EPYC (AVX-512) the JAX run took 449 s with this instead of 645 s; on a 2-core Intel Xeon (AMX),
# TensorFlow's tests/test_ghost_clipping.py took 65 s instead of 83. Set before any test imports JAX or
# TensorFlow (XLA reads the flag when its CPU client starts); an XLA_FLAGS that already names an optimization
# level is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
