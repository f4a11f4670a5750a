"""Metric writing (``metrics.jsonl`` always, TensorBoard through clu when it can be imported), the
trainer's throughput / MFU / ETA reporter, and the report of skipped training examples.

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

# Dense bf16 peak FLOP/s per device, for MFU. Matched against jax's device_kind, lower-cased; the
# first match wins, so the slower PCIe / NVL boards come before their SXM siblings. H100 SXM:
# 989.4 TFLOP/s dense (NVIDIA quotes 1979 with 2:4 sparsity); H200 is the same GH100 chip at the
# same clocks with more memory, so the same peak.
PEAK_FLOPS = {
    "h100 pcie": 756e12,
    "h100 nvl": 835e12,
    "h200 nvl": 835e12,
    "h100": 989.4e12,
    "h200": 989.4e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5p": 459e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return None


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
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in keep)
  os.replace(tmp, path)
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
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    if self._clu is not None:
      self._clu.write_scalars(int(step), clean)
      self._clu.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._clu is not None:
      self._clu.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Throughput:
  """img/s, img/s/device, step time and MFU between two reports, and the ETA of the run.

  Compilation is excluded: call :meth:`compiled` once the step is compiled.
  """

  def __init__(self, *, start_step: int, total_steps: int, batch_size: int, num_devices: int,
               device_kind: str):
    self.start_step, self.total_steps = start_step, total_steps
    self.batch_size, self.num_devices = batch_size, num_devices
    self.peak = peak_flops(device_kind)
    self.flops: float | None = None
    self._t0 = self._t_start = time.time()
    self._steps = 0

  def compiled(self, flops: float | None) -> None:
    self.flops = flops or 0.0
    self._t0 = time.time()

  def step(self) -> None:
    self._steps += 1

  def report(self) -> dict[str, float]:
    """The scalars since the last report (and restarts the interval)."""
    dt = max(time.time() - self._t0, 1e-9)
    rate = self._steps * self.batch_size / dt
    out = {"img_per_s": rate, "img_per_s_per_device": rate / self.num_devices,
           "step_time_s": dt / max(self._steps, 1), "flops_per_step_per_device": self.flops or 0.0}
    if self.flops and self.peak:
      out["mfu"] = self.flops * self._steps / dt / self.peak
    self._t0, self._steps = time.time(), 0
    return out

  def eta(self, step: int) -> str:
    elapsed = time.time() - self._t_start
    return format_duration(elapsed / max(step - self.start_step, 1) * (self.total_steps - step))


DATA_REPORT = "data_report.json"


class SkipReport:
  """Counts of unusable training examples by reason; writes ``data_report.json``.

  :meth:`update` takes the run's cumulative counts (every process, every reason, ``ok``
  included) and returns a message when the run must stop: more than ``max_skipped`` skipped in
  all, or more than ``max_fraction`` of the examples since the previous update.
  """

  def __init__(self, workdir: str, primary: bool, *, max_skipped: int | None,
               max_fraction: float | None, sources: Mapping[str, Any]):
    self.path = os.path.join(workdir, DATA_REPORT)
    self.primary = primary
    self.max_skipped, self.max_fraction = max_skipped, max_fraction
    self.sources = dict(sources)
    self._previous: dict[str, int] | None = None

  @staticmethod
  def skipped(counts: Mapping[str, int]) -> dict[str, int]:
    return {k: int(v) for k, v in counts.items() if k != "ok" and v}

  def summary(self, counts: Mapping[str, int]) -> str:
    """``skipped 3 (bad_image 2, nan_embedding 1)`` for the log line."""
    by = self.skipped(counts)
    detail = f" ({', '.join(f'{k} {v}' for k, v in by.items())})" if by else ""
    return f"skipped {sum(by.values())}{detail}"

  def update(self, step: int, counts: Mapping[str, int]) -> str | None:
    counts = {k: int(v) for k, v in counts.items()}
    previous = self._previous or {k: 0 for k in counts}
    self._previous = counts
    seen = sum(counts.values())
    skipped = sum(self.skipped(counts).values())
    recent_seen = seen - sum(previous.values())
    recent_skipped = skipped - sum(self.skipped(previous).values())
    fraction = recent_skipped / recent_seen if recent_seen else 0.0
    problem = None
    if self.max_skipped is not None and skipped > self.max_skipped:
      problem = (f"{skipped} training examples were unusable by step {step}, more than "
                 f"config.data.max_skipped={self.max_skipped}")
    elif self.max_fraction is not None and recent_seen and fraction > self.max_fraction:
      problem = (f"{recent_skipped} of the {recent_seen} training examples of the last steps "
                 f"(up to step {step}) were unusable ({fraction:.0%}, more than "
                 f"config.data.max_skipped_fraction={self.max_fraction:g}): the run would learn "
                 "from almost nothing")
    if self.primary:
      from lift_jax.common import write_json_atomic

      write_json_atomic(self.path, {
          "step": int(step), "examples": seen, "usable": counts.get("ok", 0),
          "skipped": skipped, "skipped_by_reason": self.skipped(counts),
          "recent": {"examples": recent_seen, "skipped": recent_skipped},
          "limits": {"max_skipped": self.max_skipped,
                     "max_skipped_fraction": self.max_fraction},
          "data": self.sources, "stopped": problem})
    if problem:
      return (f"{problem}; counts by reason in {self.path} ({self.summary(counts)}). Fix or "
              "drop the named shards (python -m lift_jax.main ... --check), or raise the limit")
    return None


class _LibraryNoise(logging.Filter):
  """Drops INFO/DEBUG lines of orbax, grain and jax internals (they log every checkpoint write)."""

  NOISY = ("/orbax/", "/grain/", "/jax/_src/", "/etils/")

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return not any(part in record.pathname for part in self.NOISY)


def quiet_libraries() -> None:
  """Keeps the log readable: our progress lines, the libraries' warnings and errors."""
  noise = _LibraryNoise()
  for handler in logging.getLogger().handlers:
    handler.addFilter(noise)
  logging.getLogger("absl").addFilter(noise)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
