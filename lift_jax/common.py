"""Small helpers every command shares: atomic file writes, a config file loaded by path, the
differences between two settings, plain-text tables.

No heavy imports (no JAX, no torch): the PyTorch embedding job uses this module too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from typing import Any, Iterable, Mapping, Sequence


def temporary_name(path: str) -> str:
  """``path`` + a suffix unique to this process, for a file renamed into place when whole."""
  # Host and pid: processes on different hosts that share a disk can share a pid.
  return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def write_text_atomic(path: str, text: str) -> None:
  """Writes ``text`` (UTF-8, ``\\n`` line ends) under a temporary name, then renames it into
  place: a reader sees the old file or the new one, never half of one."""
  tmp = temporary_name(path)
  try:
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
      f.write(text)
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
