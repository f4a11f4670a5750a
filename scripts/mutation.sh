#!/usr/bin/env bash
# Mutation testing with mutmut 3: breaks one thing at a time in a module (a comparison, a
# constant, an argument) and runs the tests that cover it; a mutant no test notices is a bug the
# suite would let through. Not part of CI (minutes per module); part of how we work: run it on a
# module you changed, then kill each survivor with a test or list it as equivalent in
# scripts/mutation_equivalents.txt with the reason.
#
#   bash scripts/mutation.sh [--budget=SECONDS] [--tests="FILE..."] [--only=GLOB] [--jobs=N] \
#                            MODULE...
#
#   MODULE     a source file, e.g. lift_jax/losses.py; one module at a time, in the order given
#   --budget   wall-clock seconds per module (default: the module's entry in BUDGET below, else
#              900); what is not tried by then is reported as not tried
#   --tests    the covering tests (pytest paths or node ids), instead of the TESTS table below
#   --only     restrict the mutated functions: mutmut names, globs allowed, e.g.
#              "lift_jax.losses.x_softmax_loss*" (repeat the flag for several)
#   --jobs     mutants tested at once (default 2, this machine's cores); runs under nice -n 15
#   --report   run nothing: recount the last run of each module against the equivalents list
#
# Each module runs in its own copy of the tree, .mutation/<module>/ (git-ignored; mutmut writes
# its mutants/ folder and caches there), so the worktree stays untouched and usable meanwhile.
# Per module it prints one table row (the README's testing section keeps them), and writes
# .mutation/<module>/results.txt: every mutant's status and the diff of each unexplained one.
# Exit status 1 when a module has an unexplained mutant (survived, or reached by no test).
#
# Python: $VENV_PY if set (e.g. VENV_PY=.venv/bin/python), otherwise scripts/env.sh's venv;
# it needs mutmut (pip install -e '.[test]').
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VENV_PY:-}" ]; then
  source "$REPO/scripts/env.sh"
fi
EQUIVALENTS="$REPO/scripts/mutation_equivalents.txt"

# module -> the few test files that cover it (targeted, not the suite: every mutant reruns the
# tests that reach its function).
declare -A TESTS=(
  [lift_jax/losses.py]="tests/test_losses.py"
  [lift_jax/data/records.py]="tests/test_records.py tests/test_storage.py \
                              tests/test_bank_encoder.py"
  [lift_jax/data/transforms.py]="tests/test_transforms.py tests/test_preprocess_reference.py"
  [eval/metrics.py]="tests/test_eval_metrics.py"
  [eval/benchmarks/long_retrieval.py]="tests/test_eval_long.py"
  [lift_jax/optim.py]="tests/test_optim_reference.py tests/test_pretrained.py"
  [lift_jax/models/weights.py]="tests/test_weights_import.py tests/test_pretrained.py \
                                tests/test_models.py"
  [lift_jax/pretrained.py]="tests/test_pretrained.py"
)
# module -> seconds it may take on the 2-core CPU machine (mutants x covering-test time).
declare -A BUDGET=(
  [lift_jax/losses.py]=900
  [lift_jax/data/records.py]=1800
  [lift_jax/data/transforms.py]=1200
  [eval/metrics.py]=1200
  [eval/benchmarks/long_retrieval.py]=1200
  [lift_jax/optim.py]=1500
  [lift_jax/models/weights.py]=2400
  [lift_jax/pretrained.py]=1800
)

budget="" tests="" jobs=2 report=0 only=() modules=()
for arg in "$@"; do
  case "$arg" in
    --budget=*) budget="${arg#*=}" ;;
    --tests=*) tests="${arg#*=}" ;;
    --only=*) only+=("${arg#*=}") ;;
    --jobs=*) jobs="${arg#*=}" ;;
    --report) report=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "mutation.sh: error: unknown flag $arg (see --help)" >&2; exit 2 ;;
    *) modules+=("$arg") ;;
  esac
done
if [ ${#modules[@]} -eq 0 ]; then
  echo "mutation.sh: error: name at least one module, e.g. lift_jax/losses.py (see --help)" >&2
  exit 2
fi
"$VENV_PY" -c "import mutmut" 2>/dev/null || {
  echo "mutation.sh: error: $VENV_PY has no mutmut; pip install 'mutmut>=3' (the test extra)" >&2
  exit 2
}
# The copy's conftest cannot find ../shared/data relative to itself: resolve it here.
export LIFT_SHARED_DATA="${LIFT_SHARED_DATA:-$(dirname "$REPO")/shared/data}"
export LIFT_REQUIRE_ALL=1  # a test that would skip (missing data) fails the clean run instead

status=0
printf '| module | killed / total | equivalent | unexplained | not tried | minutes |\n'
printf '|---|---|---|---|---|---|\n'
for module in "${modules[@]}"; do
  if [ ! -f "$REPO/$module" ]; then
    echo "mutation.sh: error: $module is not a file of $REPO" >&2
    exit 2
  fi
  selection="${tests:-${TESTS[$module]:-}}"
  if [ -z "$selection" ]; then
    echo "mutation.sh: error: no covering tests known for $module: pass --tests=\"...\"" >&2
    exit 2
  fi
  seconds="${budget:-${BUDGET[$module]:-900}}"
  work="$REPO/.mutation/$(echo "${module%.py}" | tr / .)"
  if [ "$report" = 1 ]; then
    if [ ! -f "$work/minutes" ]; then
      echo "mutation.sh: error: no finished run of $module in $work to report on" >&2
      exit 2
    fi
    selection="$(sed -n 's/^# .*: mutmut 3 against: //p' "$work/results.txt")"
    seconds="$(cat "$work/budget")"
  else
    rm -rf "$work"
    mkdir -p "$work"
    # Tracked and new (not ignored) files, as they are in the worktree now.
    (cd "$REPO" && git ls-files -co --exclude-standard -z \
      | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$work" -xf -
    {
      echo "[mutmut]"
      echo "source_paths ="
      for d in lift_jax eval embed; do echo "    $d"; done
      echo "only_mutate = $module"
      echo "pytest_add_cli_args_test_selection ="
      for t in $selection; do echo "    $t"; done
      echo "also_copy ="
      for f in pytest.ini configs; do echo "    $f"; done
      # Fork workers from a server that has imported the tests but never run JAX: forking a
      # process whose XLA runtime has started its threads is not safe.
      echo "process_isolation = forkserver"
      echo "use_git_change_detection = false"
    } > "$work/setup.cfg"

    start=$SECONDS
    rc=0
    (cd "$work" && env -u PYTHONPATH timeout -s INT "$seconds" \
      nice -n 15 "$VENV_PY" -m mutmut run --max-children "$jobs" "${only[@]}") \
      > "$work/run.log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then
      echo "mutation.sh: mutmut failed on $module (exit $rc); the end of $work/run.log:" >&2
      tail -c 2000 "$work/run.log" | tr '\r' '\n' | tail -n 25 >&2
      status=1
      continue
    fi
    echo $(( (SECONDS - start + 30) / 60 )) > "$work/minutes"
    echo "$seconds" > "$work/budget"
  fi
  minutes="$(cat "$work/minutes")"
  (cd "$work" && env -u PYTHONPATH "$VENV_PY" -m mutmut results --all true 2>/dev/null) \
    | sed -n 's/^ *\([^ ]*\): \(.*\)$/\1\t\2/p' > "$work/statuses.tsv"
  # Names listed as equivalent: the first word of each non-comment line.
  known="$(sed -n 's/^\([^# ][^ ]*\).*/\1/p' "$EQUIVALENTS" 2>/dev/null || true)"
  total=0 caught=0 equivalent=0 untried=0 unexplained=()
  while IFS=$'\t' read -r name state; do
    total=$((total + 1))
    case "$state" in
      killed|timeout|segfault) caught=$((caught + 1)) ;;
      "not checked"|"check was interrupted by user") untried=$((untried + 1)) ;;
      *) if grep -qxF "$name" <<< "$known"; then equivalent=$((equivalent + 1));
         else unexplained+=("$name ($state)"); fi ;;
    esac
  done < "$work/statuses.tsv"
  {
    echo "# $module: mutmut 3 against: $selection"
    echo "# caught $caught of $total; equivalent $equivalent; unexplained ${#unexplained[@]};"\
      "not tried $untried (budget ${seconds}s, $minutes min)"
    sort "$work/statuses.tsv"
    echo
    # The diff of each unexplained mutant, in one process (`mutmut show NAME` starts one each).
    printf '%s\n' "${unexplained[@]%% *}" | (cd "$work" && "$VENV_PY" -c '
import sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
for name in sys.stdin.read().split():
  print(f"# {name}")
  print(get_diff_for_mutant(name))
' 2>&1) || true
  } > "$work/results.txt"
  printf '| %s | %d / %d | %d | %d | %d | %d |\n' "$module" "$caught" "$total" "$equivalent" \
    "${#unexplained[@]}" "$untried" "$minutes"
  for entry in "${unexplained[@]}"; do
    echo "    unexplained: $entry" >&2
  done
  if [ ${#unexplained[@]} -gt 0 ]; then
    status=1
  fi
done
exit $status
