#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/README.md, "On a GPU"):
#
#   bash benchmarks/gpu_check.sh            # report into $OUT if set, else benchmarks/
#   bash benchmarks/gpu_check.sh --smoke    # extra arguments go to gpu_check.py
#
# JAX for CUDA must already be installed on the machine (pip install "jax[cuda12]"),
# with flax, equinox and dm-haiku for the peers (a missing one is left out with a note);
# nothing is installed here. It stops by itself within --budget-s (default 300 s).
# PYTHON picks the interpreter (default: python).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" "$here/gpu_check.py" --out "${OUT:-$here}" "$@"
