#!/usr/bin/env bash
# The README's test command: installs what the suite needs, then runs it.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k merge`).
set -euo pipefail
cd "$(dirname "$0")/.."
# A CPU build of PyTorch first (see OFFLINE.md): a bare `torch` requirement would pull CUDA wheels.
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
set +e
python3 -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; that is a failure." >&2
    exit 1
fi
exit "$rc"
