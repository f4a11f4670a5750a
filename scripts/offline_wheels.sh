#!/usr/bin/env bash
# Downloads, on a machine that reaches PyPI, the wheels an offline GPU host needs to train and
# benchmark lift_jax, for that host's Python (manylinux x86-64), and prints their total size.
#
#   scripts/offline_wheels.sh DIR [--python-version 3.12] [--glibc 2.28] [--with-base] [--dry-run]
#
# What is fetched: the trainer's and the bench's data stack (grain, array-record, ml_collections,
# Pillow, msgpack, absl-py, tqdm) with every dependency, less whatever a CUDA JAX + PyTorch image
# already has (the packages that jax[cuda12], flax, optax, orbax-checkpoint, torch and
# transformers pull in). Both sets are resolved together by pip, so the versions agree.
# --with-base fetches that base as well (several GB: the CUDA wheels of jax and torch).
# DIR also gets requirements.txt (the pins fetched); on the host:
#
#   pip install --no-index --find-links=DIR -r DIR/requirements.txt
#
# PYTHON (default python3) is the interpreter whose pip (22.2 or newer) does the resolving.
set -euo pipefail

usage() {
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
  echo "offline_wheels.sh: error: $*" >&2
  exit 2
}

DIR=""
PYVER="3.12"
GLIBC="2.28"
WITH_BASE=0
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --python-version) [ $# -ge 2 ] || die "--python-version needs a value such as 3.12"
                      PYVER="$2"; shift 2 ;;
    --python-version=*) PYVER="${1#*=}"; shift ;;
    --glibc) [ $# -ge 2 ] || die "--glibc needs a value such as 2.28"; GLIBC="$2"; shift 2 ;;
    --glibc=*) GLIBC="${1#*=}"; shift ;;
    --with-base) WITH_BASE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$DIR" ] || die "one DIR only (got '$DIR' and '$1')"; DIR="$1"; shift ;;
  esac
done
[ -n "$DIR" ] || die "give the folder to download into: scripts/offline_wheels.sh DIR [--python-version 3.12]"
[[ "$PYVER" =~ ^3\.([0-9]+)$ ]] || die "--python-version must look like 3.12, got '$PYVER'"
MINOR="${BASH_REMATCH[1]}"
[[ "$GLIBC" =~ ^2\.([0-9]+)$ ]] || die "--glibc must look like 2.28, got '$GLIBC'"
GLIBC_MINOR="${BASH_REMATCH[1]}"
[ "$GLIBC_MINOR" -ge 17 ] || die "--glibc must be 2.17 or newer (manylinux2014), got '$GLIBC'"
[ ! -e "$DIR" ] || [ -d "$DIR" ] || die "$DIR exists and is not a folder"

# pip takes the platform tags literally: list every manylinux tag up to the host's glibc.
PLATFORMS=(--platform manylinux2014_x86_64)
for ((m = 17; m <= GLIBC_MINOR; m++)); do
  PLATFORMS+=(--platform "manylinux_2_${m}_x86_64")
done
TARGET=(--only-binary=:all: "${PLATFORMS[@]}" --python-version "$PYVER" --implementation cp
        --abi "cp3${MINOR}")
# What the trainer, the bench and the evaluators import beyond the base image.
WANTED=(grain array-record ml-collections pillow msgpack absl-py tqdm)
# What a CUDA JAX + PyTorch image has.
BASE=("jax[cuda12]" flax optax orbax-checkpoint torch transformers)

PYTHON="${PYTHON:-python3}"
if [ "$DRY_RUN" = 1 ]; then
  echo "target: CPython $PYVER, manylinux x86-64 up to glibc $GLIBC"
  echo "resolve: $PYTHON -m pip install --dry-run --ignore-installed --report FILE ${TARGET[*]} ${BASE[*]} ${WANTED[*]}"
  [ "$WITH_BASE" = 1 ] || echo "resolve: $PYTHON -m pip install --dry-run --ignore-installed --report FILE ${TARGET[*]} ${BASE[*]}"
  echo "download: $PYTHON -m pip download --no-deps -d $DIR ${TARGET[*]} NAME==VERSION..."
  exit 0
fi

"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip (set PYTHON=/path/to/python)"
mkdir -p "$DIR"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

resolve() {  # resolve REPORT PACKAGES...: pip's resolution for the target, without installing
  local report="$1"; shift
  if ! "$PYTHON" -m pip install --quiet --dry-run --ignore-installed --report "$report" \
      "${TARGET[@]}" "$@" >"$WORK/pip.log" 2>&1; then
    grep -v "is ignored" "$WORK/pip.log" | tail -20 >&2
    die "pip could not resolve $* for CPython $PYVER (log above)"
  fi
}

echo "resolving for CPython $PYVER, manylinux x86-64 (glibc >= $GLIBC) ..."
resolve "$WORK/all.json" "${BASE[@]}" "${WANTED[@]}"
if [ "$WITH_BASE" = 1 ]; then
  echo '{"install": []}' >"$WORK/base.json"
else
  resolve "$WORK/base.json" "${BASE[@]}"
fi
"$PYTHON" - "$WORK/all.json" "$WORK/base.json" >"$WORK/pins.txt" <<'EOF'
import json, re, sys

def items(path):
  with open(path) as f:
    return {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"]
            for i in json.load(f)["install"]}

everything, base = items(sys.argv[1]), items(sys.argv[2])
for name in sorted(set(everything) - set(base)):
  print(f"{name}=={everything[name]}")
EOF
[ -s "$WORK/pins.txt" ] || die "nothing to download: the base already has every package"
mapfile -t PINS <"$WORK/pins.txt"
echo "downloading ${#PINS[@]} wheels into $DIR ..."
if ! "$PYTHON" -m pip download --quiet --no-deps -d "$DIR" "${TARGET[@]}" "${PINS[@]}" \
    >"$WORK/pip.log" 2>&1; then
  grep -v "is ignored" "$WORK/pip.log" | tail -20 >&2
  die "pip download failed (log above)"
fi
cp "$WORK/pins.txt" "$DIR/requirements.txt"

"$PYTHON" - "$DIR" "$WORK/pins.txt" <<'EOF'
import os, re, sys

folder, pins = sys.argv[1], open(sys.argv[2]).read().split()
wanted = {p.split("==")[0] for p in pins}
total = 0
for name in sorted(os.listdir(folder)):
  if not name.endswith(".whl"):
    continue
  project = re.sub(r"[-_.]+", "-", name.split("-")[0]).lower()
  if project not in wanted:
    continue  # an older download in the same folder
  size = os.path.getsize(os.path.join(folder, name))
  total += size
  print(f"  {size / 2**20:8.2f} MiB  {name}")
print(f"{len(wanted)} wheels, {total / 2**20:.1f} MiB in {folder}")
print(f"install on the host: pip install --no-index --find-links={folder} "
      f"-r {folder}/requirements.txt")
EOF
