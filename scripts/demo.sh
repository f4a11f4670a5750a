#!/usr/bin/env bash
# Sets up the environment (scripts/env.sh) and runs the demo: synthetic data -> MiniLM
# embeddings -> LIFT and CLIP training -> evaluation -> report in the workdir.
#   bash scripts/demo.sh [--workdir=DIR] [--quick]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
exec "$VENV_PY" -m lift_jax.tools.demo "$@"
