#!/usr/bin/env bash
# Sets up the environment (scripts/env.sh) and runs the test suite on 8 fake CPU devices.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
exec "$VENV_PY" -m pytest "$@"
