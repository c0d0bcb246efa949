# Sourced from .gpu/ on the device machine: carried wheels into /tmp/site (the machine's own jax/torch stay).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site whl/*.whl || return 1
# Only where the image's copy is older than what jax_privacy / pydantic need.
python3 - <<'PY' > /tmp/cond.txt
from importlib.metadata import version, PackageNotFoundError
need = {"typing_extensions": "4.16.0", "optax": "0.2.8", "chex": "0.1.92"}
def t(v): return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())
for name, v in need.items():
    try:
        have = version(name)
    except PackageNotFoundError:
        have = "0"
    if t(have) < t(v):
        print(name)
PY
for n in $(cat /tmp/cond.txt); do echo "installing carried $n"; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site whl/cond/${n}-*.whl || return 1; done
export PYTHONPATH=/tmp/site KERAS_BACKEND=jax PYTHONUNBUFFERED=1
python3 - <<'PY'
import importlib
for m in ["jax", "jaxlib", "torch", "keras", "optax", "chex", "opacus", "jax_privacy", "dp_accounting", "pydantic", "typing_extensions", "numpy"]:
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "?"), mod.__file__)
    except Exception as e:
        print(m, "IMPORT FAILED", repr(e))
import jax; print(jax.devices())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
