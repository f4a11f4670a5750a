# Sourced by scripts/test.sh and scripts/demo.sh: creates (or reuses) a virtual environment with
# lift_jax and everything the tests and the demo need, then exports $VENV_PY.
#
#   LIFT_VENV    where the environment lives (default: .venv in the repository)
#   PYTHON       the interpreter that creates it (default: python3; 3.11 or newer)
#   TORCH_SPEC   the PyTorch requirement, installed first so nothing pulls another build
#                (default: torch==2.13.0, the CPU build; on a GPU machine pass the CUDA build)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LIFT_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
VENV_PY="$VENV/bin/python"
stamp="$VENV/.lift_jax-installed"
if [ ! -f "$stamp" ] || [ "$REPO/setup.py" -nt "$stamp" ]; then
  echo "[env] installing $TORCH_SPEC, then lift_jax[embed,test,demo] (a few minutes the first time)"
  "$VENV_PY" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  "$VENV_PY" -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
  "$VENV_PY" -m pip install -q -e "$REPO[embed,test,demo]" 2>&1 | grep -v "is ignored" || true
  # OpenCLIP's model code for the export tests, without its dependencies (its torchvision
  # would not import beside the CPU torch; the tests load the model classes without it).
  "$VENV_PY" -m pip install -q --no-deps "open_clip_torch==3.3.0" 2>&1 | grep -v "is ignored" \
    || true
  "$VENV_PY" -c "import jax, flax, grain, torch, transformers, lift_jax, embed, eval" \
    || { echo "[env] installation failed" >&2; exit 1; }
  touch "$stamp"
else
  echo "[env] reusing $VENV"
fi
export VENV_PY
