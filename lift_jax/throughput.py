"""What a training step costs: img/s, img/s/device, step time, MFU against the device's peak, ETA.

Compilation is excluded from the rates (:meth:`Throughput.compiled` starts the clock).
"""

from __future__ import annotations

import time

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


def flops_per_step(compiled) -> float | None:
  """FLOPs of one step per device, from XLA's cost analysis of the compiled program."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])
