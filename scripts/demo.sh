#!/usr/bin/env bash
# Sets up the environment (scripts/env.sh) and runs the demo: synthetic data -> MiniLM
# embeddings -> LIFT and CLIP training -> evaluation -> report in the workdir.
#   bash scripts/demo.sh [--workdir=DIR] [--quick]
# DIR (default demo_workdir) is relative to the current folder. Ctrl-C stops the running stage
# after it saves (training writes a checkpoint); re-running resumes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$VENV_PY" -m lift_jax.tools.demo "$@"
