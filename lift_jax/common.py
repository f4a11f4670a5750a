"""Small helpers every command shares: atomic file writes, a config file loaded by path, the
differences between two settings, plain-text tables, and which task of a job this process is
(:func:`task_of`: scheduler arrays and ranks, one rule for the converter and the embedding job).

No heavy imports (no JAX, no torch): the PyTorch embedding job uses this module too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
from typing import Any, Iterable, Mapping, Sequence

from lift_jax import cli


def temporary_name(path: str) -> str:
  """``path`` + a suffix unique to this process, for a file renamed into place when whole."""
  # Host and pid: processes on different hosts that share a disk can share a pid.
  return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def write_text_atomic(path: str, text: str) -> None:
  """Writes ``text`` (UTF-8, ``\\n`` line ends) under a temporary name, then renames it into
  place: a reader sees the old file or the new one, never half of one."""
  write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str, data: bytes) -> None:
  """``data`` written under a temporary name, then renamed into place (see
  :func:`write_text_atomic`)."""
  tmp = temporary_name(path)
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json_atomic(path: str, data: Any, *, sort_keys: bool = True, indent: int = 1) -> None:
  """``data`` as JSON (non-ASCII kept as is), written atomically (see :func:`write_text_atomic`)."""
  write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys,
                                     ensure_ascii=False) + "\n")


def load_config_file(path: str, arg: str | None = None):
  """``get_config()`` (or ``get_config(arg)``) of a Python config file given by path."""
  if not os.path.isfile(path):
    raise FileNotFoundError(2, "no such config file", path)
  name = "config_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a.b.c": value} for every leaf of nested mappings (ConfigDicts included)."""
  if hasattr(tree, "to_dict"):
    tree = tree.to_dict()
  out: dict[str, Any] = {}
  for key, value in tree.items():
    if hasattr(value, "to_dict"):
      value = value.to_dict()
    if isinstance(value, Mapping) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def differences(old: Mapping[str, Any], new: Mapping[str, Any],
                keys: Iterable[str] | None = None) -> list[str]:
  """``"key: old -> new"`` for every (nested) setting that differs, sorted by key; ``keys``
  limits the comparison to those flattened keys. Long values are cut at 200 characters."""
  a, b = flatten(old), flatten(new)
  names = sorted(set(a) | set(b)) if keys is None else list(keys)
  out = []
  for k in names:
    if a.get(k) != b.get(k):
      line = f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
      out.append(line if len(line) < 200 else line[:200] + "...")
  return out


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None,
                 right: Iterable[int] = ()) -> str:
  """Columns padded to their widest cell, two spaces apart; ``right`` = indices of the columns
  aligned right (numbers); a rule under the header."""
  right = set(right)
  cells = [[str(c) for c in r] for r in ([header] if header else []) + list(rows)]
  if not cells:
    return ""
  widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(map(len, cells)))]

  def line(r):
    return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                     for i, (c, w) in enumerate(zip(r, widths))).rstrip()

  lines = [line(r) for r in cells]
  if header:
    lines.insert(1, "-" * len(max(lines, key=len)))
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Which task of a job this process is
# --------------------------------------------------------------------------------------------

# The variable that carries a Kubernetes indexed Job's task count: Kubernetes sets only the index
# (JOB_COMPLETION_INDEX), so the Job's manifest sets this to its spec.completions.
TASK_COUNT_VAR = "LIFT_TASK_COUNT"


@cli.user_error
class TaskError(ValueError):
  """Task flags or scheduler variables that do not name one task of a job; says which."""


@dataclasses.dataclass(frozen=True)
class Task:
  """Task ``index`` of ``count``; ``local`` is the process's index on its host (its GPU)."""
  index: int = 0
  count: int = 1
  local: int = 0
  source: str = ""  # where the numbers came from (scheduler variables, flags), for logs


def _ints(env: Mapping[str, str], names: Sequence[str], error: type[Exception]) -> list[int]:
  try:
    return [int(env[n]) for n in names]
  except ValueError:
    raise error(f"{'/'.join(names)} must be integers: {[env.get(n) for n in names]}") from None


def _slurm_array(env: Mapping[str, str], error: type[Exception]) -> tuple[int, int]:
  """(position, count) of this element in a SLURM job array. The ids need not start at 0
  (``--array=1-7:2`` gives 1, 3, 5, 7); a list that is not an evenly spaced range is refused."""
  missing = [n for n in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN") if n not in env]
  if missing:
    raise error(f"SLURM_ARRAY_TASK_ID is set but {', '.join(missing)} is not; pass "
                "--task_index and --task_count")
  ident, count, low = _ints(env, ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                                  "SLURM_ARRAY_TASK_MIN"), error)
  step = _ints(env, ("SLURM_ARRAY_TASK_STEP",), error)[0] if (
      "SLURM_ARRAY_TASK_STEP" in env) else 1
  high = _ints(env, ("SLURM_ARRAY_TASK_MAX",), error)[0] if (
      "SLURM_ARRAY_TASK_MAX" in env) else low + (count - 1) * step
  position, off = divmod(ident - low, step) if step > 0 else (-1, 1)
  if count < 1 or off or not 0 <= position < count or low + (count - 1) * step != high:
    raise error(f"SLURM array ids {low}..{high} step {step} ({count} ids, this one {ident}) are "
                "not an evenly spaced range (e.g. --array=1,3,20): submit --array=0-<N-1> or "
                "pass --task_index and --task_count")
  return position, count


def _task_from_env(env: Mapping[str, str], local: int, k8s_count: int | None,
                   error: type[Exception]) -> Task:
  if "RANK" in env or "WORLD_SIZE" in env:
    if not ("RANK" in env and "WORLD_SIZE" in env):
      raise error("torchrun's RANK and WORLD_SIZE must be set together; one of them is missing")
    rank, world = _ints(env, ("RANK", "WORLD_SIZE"), error)
    return Task(rank, world, local, "RANK/WORLD_SIZE")
  slurm_tasks = "SLURM_PROCID" in env and "SLURM_NTASKS" in env
  proc, procs = _ints(env, ("SLURM_PROCID", "SLURM_NTASKS"), error) if slurm_tasks else (0, 1)
  if "SLURM_ARRAY_TASK_ID" in env:
    position, count = _slurm_array(env, error)
    return Task(position * procs + proc, count * procs, local,
                "the SLURM array" + (" x SLURM_NTASKS" if procs > 1 else ""))
  if slurm_tasks:
    return Task(proc, procs, local, "SLURM_PROCID/SLURM_NTASKS")
  if "JOB_COMPLETION_INDEX" in env:
    (index,) = _ints(env, ("JOB_COMPLETION_INDEX",), error)
    if k8s_count is not None:
      return Task(index, k8s_count, 0, "JOB_COMPLETION_INDEX/--task_count")
    if TASK_COUNT_VAR not in env:
      raise error(f"JOB_COMPLETION_INDEX={index} (a Kubernetes indexed Job) but no task count: "
                  f"set {TASK_COUNT_VAR} to the Job's spec.completions in its manifest, or pass "
                  "--task_count")
    (count,) = _ints(env, (TASK_COUNT_VAR,), error)
    return Task(index, count, 0, f"JOB_COMPLETION_INDEX/{TASK_COUNT_VAR}")
  return Task()


def task_of(env: Mapping[str, str] | None = None, index: int | None = None,
            count: int | None = None, error: type[Exception] = TaskError) -> Task:
  """Which task of a job this process is, by the first rule that applies:

  1. ``index`` and ``count`` given (command-line flags);
  2. torchrun: ``RANK`` of ``WORLD_SIZE``;
  3. a SLURM job array: position ``(SLURM_ARRAY_TASK_ID - _MIN) / _STEP`` of
     ``SLURM_ARRAY_TASK_COUNT``; with several tasks per element (``srun``, ``SLURM_NTASKS`` >
     1) task ``position * NTASKS + SLURM_PROCID`` of ``COUNT * NTASKS``;
  4. SLURM tasks: ``SLURM_PROCID`` of ``SLURM_NTASKS``;
  5. a Kubernetes indexed Job: ``JOB_COMPLETION_INDEX`` of ``count`` or ``$LIFT_TASK_COUNT``
     (Kubernetes does not export the count: an index without one is an error);
  6. task 0 of 1.

  ``count`` alone is the count for rule 5, or must agree with the count the environment gives.
  ``local`` (the GPU of the process on its host) is ``LOCAL_RANK`` or ``SLURM_LOCALID``, else 0.
  Errors are ``error`` (default :class:`TaskError`) and name the variables.
  """
  env = os.environ if env is None else env
  local = 0
  for name in ("LOCAL_RANK", "SLURM_LOCALID"):
    if name in env:
      (local,) = _ints(env, (name,), error)
      break
  if index is not None and count is not None:
    task = Task(index, count, local, "--task_index/--task_count")
  elif index is not None:
    raise error(f"--task_index={index} needs --task_count (the number of tasks)")
  else:
    task = _task_from_env(env, local, count, error)
    if count is not None and task.source == Task.source:
      raise error(f"--task_count={count} without --task_index, and no scheduler variable gives "
                  "this task's index; pass --task_index too")
    if count is not None and task.count != count:
      raise error(f"--task_count={count} but {task.source} says {task.count} tasks")
  if task.count < 1 or not 0 <= task.index < task.count or task.local < 0:
    raise error(f"task {task.index} of {task.count} (local {task.local}, from {task.source}) is "
                "not a valid task: the index must lie in [0, count)")
  return task
