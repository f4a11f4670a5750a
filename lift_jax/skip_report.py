"""The report of unusable training examples: counts by reason, the limits that stop a run, and
``data_report.json`` in the workdir."""

from __future__ import annotations

import os
from typing import Any, Mapping

from lift_jax.common import write_json_atomic

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

  def update(self, step: int, counts: Mapping[str, int], digest: int | None = None
             ) -> str | None:
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
      write_json_atomic(self.path, {
          "step": int(step), "examples": seen, "usable": counts.get("ok", 0),
          "skipped": skipped, "skipped_by_reason": self.skipped(counts),
          "recent": {"examples": recent_seen, "skipped": recent_skipped},
          "limits": {"max_skipped": self.max_skipped,
                     "max_skipped_fraction": self.max_fraction},
          "data": self.sources, "stopped": problem,
          # An order-sensitive digest of every (step, record) the run trained on: equal for
          # an uninterrupted run and one resumed on any topology (lift_jax.data.pipeline).
          "examples_digest": None if digest is None else f"{digest:016x}"})
    if problem:
      return (f"{problem}; counts by reason in {self.path} ({self.summary(counts)}). Fix or "
              "drop the named shards (`python -m lift_jax.main --config=CONFIG --workdir=WORKDIR "
              "--check`), or raise the limit")
    return None
