#!/usr/bin/env bash
# The main job: set up (scripts/setup.sh), verify every public loss on every backend here against
# float64 (python -m fastkd.verify), the quick benchmark (every loss and the fused LM head), and the
# quick distillation runs (digits; a small language model with the fused head, fused = unfused;
# the language-model transfer set through the transformers integration, where distillation helps). Outputs go to $OUT
# (default results/main, ignored by git); the time of each part is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-results/main}
mkdir -p "$OUT"
times=()
part() {  # part NAME COMMAND...: run it and keep its wall time
  local name=$1 t0=$SECONDS
  shift
  echo "== $name: $*"
  "$@"
  times+=("$(printf '%-12s %4d s' "$name" $((SECONDS - t0)))")
}
part setup bash scripts/setup.sh
part verify "$PYTHON" -m fastkd.verify
part bench "$PYTHON" -m fastkd.bench --quick --csv "$OUT/bench-quick.csv"
part digits "$PYTHON" examples/distill_digits.py --quick
part distill_lm "$PYTHON" examples/distill_lm.py --quick --out "$OUT/distill_lm-quick.md"
part lm_transfer "$PYTHON" examples/distill_lm_transfer.py --quick --out-dir "$OUT"
echo "== main job done; outputs in $OUT; wall time per part:"
printf '  %s\n' "${times[@]}"
