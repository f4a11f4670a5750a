"""What the suite writes: the Markdown table of its rows, and the reading of a child's log (the
end-to-end row's time breakdown, a failed row's telling line)."""

from __future__ import annotations

import datetime
import os
import re
import statistics
from typing import Any

from lift_jax.metrics import read_jsonl
from lift_jax.tools.bench.common import fmt


def _absl_time(line: str) -> float | None:
  """Seconds since midnight of an absl log line ('I1127 07:55:01.123456 ...')."""
  m = re.match(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d(?:\.\d+)?)", line)
  return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else None


def e2e_breakdown(log_path: str, metrics_path: str, started: float, wall: float
                  ) -> dict[str, Any]:
  """Steady-state img/s and where the wall time of the lift_jax.main run went, from its log
  (absl timestamps) and metrics.jsonl."""
  rows = read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
  train = [r for r in rows if "img_per_s" in r]
  evals = [r for r in rows if "eval/seconds" in r]
  out: dict[str, Any] = {"logged_intervals": len(train)}
  if len(train) >= 2:
    out["steady_img_per_s"] = statistics.median(r["img_per_s"] for r in train[1:])
    out["first_interval_img_per_s"] = train[0]["img_per_s"]
  elif train:
    out["steady_img_per_s"] = train[0]["img_per_s"]
  marks = {}
  day = datetime.datetime.fromtimestamp(started)
  midnight = day.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
  with open(log_path, encoding="utf-8", errors="replace") as f:
    for line in f:
      t = _absl_time(line)
      if t is None:
        continue
      for mark, text in (("loop", "training from step"), ("compiled", "compiled the step")):
        if text in line and mark not in marks:
          marks[mark] = midnight + t
  end = started + wall
  if "loop" in marks:
    out["startup_s"] = marks["loop"] - started
  if "loop" in marks and "compiled" in marks:
    out["first_batch_and_compile_s"] = marks["compiled"] - marks["loop"]
  if "compiled" in marks and train:
    out["training_s"] = train[-1]["time"] - marks["compiled"]
  if evals:
    out["eval_s"] = evals[-1]["eval/seconds"]
  known = sum(out.get(k, 0.0) for k in ("startup_s", "first_batch_and_compile_s", "training_s",
                                        "eval_s"))
  out["rest_s"] = max(end - started - known, 0.0)  # final checkpoint, shutdown
  return out


def last_error(log: str) -> str:
  """The most telling line of a failed child's log: its last exception or error line."""
  with open(log, encoding="utf-8", errors="replace") as f:
    lines = [line.strip() for line in f if line.strip()]
  for line in reversed(lines):
    if "Error" in line or "error:" in line or "Exception" in line:
      return line[:500]
  return lines[-1][:500] if lines else "no output"


def suite_markdown(result: dict[str, Any]) -> str:
  d = result["device"]
  lines = [f"# Bench suite on {d.get('device_kind', '?')} x{d.get('device_count', '?')} "
           f"(jax {d.get('jax', '?')})", "",
           f"{len(result['rows'])} rows in {result['elapsed_s']:.0f} s of a "
           f"{result['budget_s']:.0f} s budget. Command: `{result['command']}`", "",
           "## Train step (random on-device data)", "",
           "| row | status | per-device batch | img/s | img/s/device | GFLOP/img | MFU | "
           "memory GiB (peak in use; CPU: compiled) | compile s |",
           "|---|---|---|---|---|---|---|---|---|"]
  gib = lambda b: b / 2**30 if b else None
  for r in result["rows"]:
    if r["kind"] != "step":
      continue
    x = r.get("result") or {}
    oom = "".join(f"; {b['per_device_batch']} out of memory"
                  for b in x.get("batches_out_of_memory", []))
    lines.append(f"| {r['name']} | {r['status']}{oom} | {fmt(x.get('per_device_batch'))} | "
                 f"{fmt(x.get('img_per_s'))} | {fmt(x.get('img_per_s_per_device'))} | "
                 f"{fmt(x.get('gflops_per_image'))} | {fmt(x.get('mfu'), 3)} | "
                 f"{fmt(gib(x.get('peak_bytes_in_use') or x.get('compiled_bytes')), 3)} | "
                 f"{fmt(x.get('compile_s'), 3)} |")
  for r in result["rows"]:
    x = r.get("result") or {}
    if r["kind"] == "input":
      lines += ["", "## Input pipeline (grain, generated 256-px JPEG shards)", ""]
      if x:
        lines += [f"batch {x['batch']}, {x['cpu_count']} CPU cores; one core without grain: "
                  f"{fmt(x['host_transform'].get('decode_crop_img_per_s_per_core'))} img/s "
                  "(decode + crop)", "", "| workers | img/s | img/s/worker |", "|---|---|---|"]
        lines += [f"| {w['workers']} | {fmt(w['img_per_s'])} | "
                  f"{fmt(w['img_per_s_per_worker'])} |" for w in x["rows"]]
      else:
        lines.append(r["status"])
    elif r["kind"] == "e2e":
      lines += ["", "## End to end (python -m lift_jax.main)", ""]
      lines += ([f"- {k}: {fmt(v)}" for k, v in x.items()] if x else [r["status"]])
    elif r["kind"] == "embed":
      lines += ["", "## Embedding job", ""]
      lines += ([f"- {k}: {fmt(v)}" for k, v in x.items()] if x else [r["status"]])
  if result["summary"]:
    lines += ["", "## Summary", ""] + [f"- {k}: {fmt(v)}" for k, v in result["summary"].items()]
  problems = [r for r in result["rows"] if r["status"] != "ok"]
  if problems:
    lines += ["", "## Not measured", ""]
    lines += [f"- {r['name']}: {r['status']}" + (f" ({r['error']})" if r.get("error") else "")
              for r in problems]
  return "\n".join(lines) + "\n"
