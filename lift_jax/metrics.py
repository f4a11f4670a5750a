"""Metric writing: ``metrics.jsonl`` always, TensorBoard through clu when it can be imported.

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


class MetricWriter:
  """Writes scalars to metrics.jsonl (primary process), TensorBoard and the log."""

  def __init__(self, workdir: str, primary: bool = True, tensorboard: bool = True):
    self.primary = primary
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") \
        if primary else None
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
