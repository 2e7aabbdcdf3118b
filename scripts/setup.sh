#!/usr/bin/env bash
# Installs everything fastkd needs on a fresh Linux machine with Python and pip,
# then builds fastkd from this checkout (editable, against the installed torch).
# Used by scripts/main.sh and scripts/test.sh. The build is skipped when the
# sources, the build files, torch and the FASTKD_ build switches are unchanged since the last
# one (FASTKD_REQUIRE_EXTENSION is read by the tests, not the build: it is not part of the stamp).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# torch first: the extension is compiled against the torch that runs it.
"$PYTHON" -m pip install --quiet "torch>=2.8" "setuptools>=64" wheel ninja numpy

stamp_file=build/.fastkd_build_stamp
stamp=$( (cat setup.py pyproject.toml csrc/sources.txt; find csrc -type f | sort | xargs cat;
          "$PYTHON" -c "import torch; print(torch.__version__)"
          env | grep '^FASTKD_' | grep -v '^FASTKD_REQUIRE_EXTENSION=' | sort || true) | sha256sum | cut -d' ' -f1)
if [[ -f $stamp_file && $(cat "$stamp_file") == "$stamp" ]] && "$PYTHON" -c "import fastkd._C" 2>/dev/null; then
  echo "fastkd: build is up to date"
else
  "$PYTHON" -m pip install --quiet --no-build-isolation -e ".[test,bench,examples]"
  mkdir -p build && echo "$stamp" > "$stamp_file"
fi
"$PYTHON" - <<'PY'
import fastkd
from fastkd.dispatch import ops as _ops
print(f"fastkd {fastkd.__version__} installed; compiled extension: "
      f"{'loaded' if _ops.LOAD_ERROR is None else _ops.LOAD_ERROR}")
PY
