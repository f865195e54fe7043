#!/usr/bin/env bash
# The README's test command: installs what the suite needs into the active Python (a virtual environment if one
# is active, as `.ci/run` does), then runs it. Extra arguments go to pytest (e.g. `bash scripts/test.sh -k merge`).
set -euo pipefail
cd "$(dirname "$0")/.."
# The interpreter of the active virtual environment when there is one, else the first python3 on PATH.
PYTHON="python3"
if [ -n "${VIRTUAL_ENV:-}" ]; then
    PYTHON="$VIRTUAL_ENV/bin/python"
fi
# A CPU build of PyTorch first (see OFFLINE.md): a bare `torch` requirement would pull CUDA wheels.
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q torch==2.13.0
"$PYTHON" -m pip install -q -e ".[test]"
set +e
"$PYTHON" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; that is a failure." >&2
    exit 1
fi
exit "$rc"
