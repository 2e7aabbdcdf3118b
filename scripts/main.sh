#!/usr/bin/env bash
# The main job: set up, verify every available backend against the reference,
# run the quick kernel benchmark and the quick distillation run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh
"$PYTHON" -m fastkd.verify
"$PYTHON" -m fastkd.bench --quick
"$PYTHON" examples/distill_digits.py --quick
