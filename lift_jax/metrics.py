"""Metric files: ``metrics.jsonl`` always, TensorBoard through clu when it can be imported.

clu's writers import TensorFlow. Where TF is not installed (a lean accelerator image), or
``config.tensorboard`` is False, the writer falls back to log lines plus the JSONL file, which
holds every scalar anyway. When TF is imported on a GPU host it is told to keep off the GPUs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

from lift_jax import cli, common


@cli.user_error
class MetricsError(OSError):
  """A metric file cannot be written (a full disk, a read-only folder); the message names it."""


def _clu_writer(logdir: str, primary: bool):
  try:
    import tensorflow as tf  # imported by clu anyway; keep it off the accelerators

    tf.config.set_visible_devices([], "GPU")
    from clu import metric_writers
  except Exception as e:  # TF or clu missing / broken: the JSONL file still has everything
    logging.info("TensorBoard writer unavailable (%s); writing metrics.jsonl and logs only", e)
    return None
  return metric_writers.create_default_writer(logdir, just_logging=not primary)


def _drop_rows_after(path: str, step: int) -> None:
  """Removes rows logged after ``step`` (a run killed after its last checkpoint logged them; the
  resumed run logs those steps again)."""
  if not os.path.exists(path):
    return
  rows = read_jsonl(path)
  keep = [r for r in rows if int(r.get("step", 0)) <= step]
  if len(keep) == len(rows):
    return
  common.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
  logging.info("metrics.jsonl: dropped %d rows after step %d (logged after the last checkpoint)",
               len(rows) - len(keep), step)


class MetricWriter:
  """Writes scalars to metrics.jsonl (primary process), TensorBoard and the log.

  ``resume_step``: the step a run resumes from; rows of later steps are dropped first, so the file
  holds each step once however often the run was interrupted.
  """

  def __init__(self, workdir: str, primary: bool = True, tensorboard: bool = True,
               resume_step: int | None = None):
    self.primary = primary
    path = os.path.join(workdir, "metrics.jsonl")
    if primary and resume_step is not None:
      _drop_rows_after(path, resume_step)
    self._jsonl = open(path, "a", encoding="utf-8") if primary else None
    self._clu = _clu_writer(os.path.join(workdir, "tensorboard"), primary) if tensorboard else None

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    clean = {}
    for k, v in scalars.items():
      try:
        v = float(v)
      except (TypeError, ValueError):
        continue
      clean[k] = v
    if self._jsonl is not None:
      row = {"step": int(step), "time": time.time()}
      row.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
      try:
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
      except OSError as e:
        raise MetricsError(f"could not write {self._jsonl.name} ({e.strerror or e}); free space "
                           "or fix the folder, then re-run to resume from the last checkpoint"
                           ) from None
    if self._clu is not None:
      self._clu.write_scalars(int(step), clean)
      self._clu.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._clu is not None:
      self._clu.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
