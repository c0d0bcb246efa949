#!/bin/sh
# Runs the project venv's interpreter. Bazel's runfiles link back to this file
# in the source tree, so its real path gives the repository root.
root=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
if [ ! -x "$root/.venv/bin/python" ]; then
  echo "tan_keras: $root/.venv is missing; run 'make install' first." >&2
  exit 1
fi
exec "$root/.venv/bin/python" "$@"
