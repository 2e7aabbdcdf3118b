#!/usr/bin/env bash
# Set up, then run the whole test suite (-rs: the reason of every skip, grouped with counts, in
# the summary). Triton kernels run through the interpreter on CPU tensors; GPU tests skip without
# a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh
"$PYTHON" -m pytest -q -rs "$@"
