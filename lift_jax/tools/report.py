"""The demo's report: LIFT vs CLIP results with binomial confidence intervals, training cost, plots.

Every number in the report is read from the run's own files: the eval JSON written by
``eval.main`` and each workdir's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from typing import Any

import matplotlib
import numpy as np

from eval.texts import read_sugarcrepe
from lift_jax import checkpoint as ckpt
from lift_jax.data import records
from lift_jax.metrics import read_jsonl

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

Z95 = 1.959964


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
  """The Wilson score interval of a binomial proportion p observed over n trials."""
  if n <= 0:
    return (float("nan"), float("nan"))
  denom = 1 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, center - half), min(1.0, center + half)


def _subset_sizes(result: dict[str, Any], name: str) -> dict[str, int]:
  """Records per subset of a SugarCrepe-style benchmark, from its data_dir."""
  settings = result.get("benchmarks", {}).get(name, {})
  folder = settings.get("data_dir")
  sizes = {}
  if folder and os.path.isdir(folder):
    for file in os.listdir(folder):
      if file.endswith(".json"):
        with open(os.path.join(folder, file), encoding="utf-8") as f:
          sizes[file[:-5]] = len(json.load(f))
  return sizes


def trials(result: dict[str, Any], key: str) -> int | None:
  """How many binary outcomes a metric averages (for its confidence interval)."""
  metrics = result["metrics"]
  bench, metric = key.rsplit("/", 1)
  if metric.startswith(("num_", "skipped")):
    return None
  if metric.startswith("i2t"):
    return int(metrics.get(f"{bench}/num_images", 0)) or None
  if metric.startswith("t2i"):
    return int(metrics.get(f"{bench}/num_texts", 0)) or None
  if metric.startswith("top"):
    return int(metrics.get(f"{bench}/num_images", 0)) or None
  if metric == "mean":
    return int(metrics.get(f"{bench}/num_samples", 0)) or None
  return _subset_sizes(result, bench).get(metric)


def chance(result: dict[str, Any], key: str) -> float | None:
  """What guessing scores on a metric: 1/2 for a positive-vs-negative caption pair, k/classes
  for top-k classification, the chance that k texts drawn at random include one of an image's
  captions (image->text) or that k images include the caption's image (text->image)."""
  metrics, settings = result["metrics"], result.get("benchmarks", {})
  bench, metric = key.rsplit("/", 1)
  kind = settings.get(bench, {}).get("type")
  m = re.search(r"(?:top|_r)(\d+)$", metric)
  k = int(m[1]) if m else 0
  if kind == "sugarcrepe":
    return 0.5
  if kind == "zeroshot" and metric.startswith("top"):
    names = settings[bench].get("classnames")
    if names and os.path.exists(names):
      with open(names, encoding="utf-8") as f:
        classes = sum(1 for line in f if line.strip())
      return min(1.0, k / classes)
    return None
  images = int(metrics.get(f"{bench}/num_images", 0))
  texts = int(metrics.get(f"{bench}/num_texts", 0))
  if not images or not texts:
    return None
  if metric.startswith("t2i"):
    return min(1.0, k / images)
  if metric.startswith("i2t"):  # a draw of k of `texts` misses all of an image's `per` captions
    per = max(1, round(texts / images))
    miss = math.prod((texts - per - i) / (texts - i) for i in range(min(k, texts - per)))
    return 1.0 - miss
  return None


def what_this_says(results: dict[str, dict[str, Any]]) -> list[str]:
  """A short reading of the table: where one model's interval lies wholly above the other's."""
  table = [r for r in rows(results) if "lift" in r and "clip" in r]
  lift_ahead = [r["metric"] for r in table if r["lift"][1] > r["clip"][2]]
  clip_ahead = [r["metric"] for r in table if r["clip"][1] > r["lift"][2]]
  tied = [r["metric"] for r in table if r["metric"] not in lift_ahead + clip_ahead]
  says = []
  if clip_ahead:
    says.append(f"CLIP is ahead, beyond the intervals, on {len(clip_ahead)} of {len(table)} "
                f"metrics ({', '.join(clip_ahead)}).")
  if lift_ahead:
    says.append(f"LIFT is ahead on {len(lift_ahead)} ({', '.join(lift_ahead)}).")
  if tied:
    says.append(f"On {len(tied)} the intervals overlap: no difference is shown there.")
  says.append(
      "Read it for what it is: both image towers are trained from scratch for a few hundred "
      "steps on a synthetic grammar. CLIP's text tower learns that grammar's words; LIFT's "
      "frozen all-MiniLM-L6-v2 never saw it, and the table of caption distances below shows "
      "how close it puts a caption and its hard negative. The paper's claims (LIFT ahead on "
      "compositional and long-caption tasks) concern LLM encoders such as NV-Embed-v2 and "
      "hundreds of millions of pairs; this demo shows that every stage works and what the "
      "numbers look like, not which method wins at scale.")
  return says


def rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
  keys = [k for k in results["lift"]["metrics"] if trials(results["lift"], k)]
  out = []
  for key in keys:
    row = {"metric": key}
    for name, result in results.items():
      p = result["metrics"].get(key)
      n = trials(result, key)
      if p is None or n is None:
        continue
      lo, hi = wilson(p, n)
      row[name] = (p, lo, hi, n)
    out.append(row)
  return out


def _pct(cell) -> str:
  p, lo, hi, _ = cell
  return f"{100 * p:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def summary_table(results: dict[str, dict[str, Any]]) -> str:
  lines = [f"{'metric':<34} {'LIFT % [95% CI]':>22} {'CLIP % [95% CI]':>22}  n"]
  for r in rows(results):
    if "lift" in r and "clip" in r:
      lines.append(f"{r['metric']:<34} {_pct(r['lift']):>22} {_pct(r['clip']):>22}  "
                   f"{r['lift'][3]}")
  return "\n".join(lines)


def text_encoder_gaps(root: str, result: dict[str, Any]) -> dict[str, float]:
  """Per compositional subset, the mean cosine between the positive and the negative caption
  under LIFT's frozen text encoder (from its text bank). Near 1, the fixed text side barely tells
  them apart, which bounds what LIFT can learn there."""
  bank = ckpt.workdir_config(os.path.join(root, "lift"))["evals"].get("text_bank")
  out = {}
  for name, settings in result.get("benchmarks", {}).items():
    if settings.get("type") != "sugarcrepe" or not bank or not os.path.isdir(bank):
      continue
    index, vectors, _ = records.load_text_bank(bank)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for subset, rows_ in read_sugarcrepe(settings["data_dir"]).items():
      cos = [float(vectors[index[p]] @ vectors[index[n]]) for _, p, n in rows_
             if p in index and n in index]
      if cos:
        out[f"{name}/{subset}"] = sum(cos) / len(cos)
  return out


def training_cost(workdir: str) -> dict[str, Any]:
  metrics = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train = [m for m in metrics if "loss" in m and "step_time_s" in m]
  times = [m["step_time_s"] for m in train[1:]] or [m["step_time_s"] for m in train]
  flops = next((m.get("flops_per_step_per_device") for m in train
                if m.get("flops_per_step_per_device")), None)
  config = ckpt.workdir_config(workdir)
  return {"steps": train[-1]["step"] if train else 0,
          "batch_size": config["batch_size"],
          "step_time_s": statistics.median(times) if times else None,
          "flops_per_step": flops,
          "final_loss": train[-1]["loss"] if train else None,
          "loss_curve": [(m["step"], m["loss"]) for m in train]}


def plots(root: str, results, costs) -> list[str]:
  colors = {"lift": "#1f77b4", "clip": "#d62728"}
  files = []
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for name, cost in costs.items():
    steps, losses = zip(*cost["loss_curve"]) if cost["loss_curve"] else ((), ())
    ax.plot(steps, losses, label=name.upper(), color=colors[name])
  ax.set_xlabel("step")
  files.append(_finish(fig, ax, "contrastive loss (training batch)", "Training loss",
                       os.path.join(root, "loss.png")))

  table = [r for r in rows(results) if "lift" in r and "clip" in r]
  fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(table) + 2), 4))
  width = 0.4
  for i, name in enumerate(("lift", "clip")):
    xs = [j + (i - 0.5) * width for j in range(len(table))]
    ps = [100 * r[name][0] for r in table]
    err = [[100 * (r[name][0] - r[name][1]) for r in table],
           [100 * (r[name][2] - r[name][0]) for r in table]]
    ax.bar(xs, ps, width, yerr=err, capsize=2, label=name.upper(), color=colors[name])
  ax.set_xticks(range(len(table)))
  ax.set_xticklabels([r["metric"] for r in table], rotation=60, ha="right", fontsize=8)
  files.append(_finish(fig, ax, "% (95% Wilson interval)", "Evaluation on the synthetic sets",
                       os.path.join(root, "accuracy.png")))
  return files


def _finish(fig, ax, ylabel: str, title: str, path: str) -> str:
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_report(root: str, results: dict[str, dict[str, Any]], timings: dict[str, float],
                 quick: bool = False, reused: list[str] = ()) -> str:
  """Writes root/report.md (+ report.json, plots). Stages in ``reused`` were complete already:
  their wall time is taken from the previous report, where there is one."""
  previous = {}
  if os.path.exists(os.path.join(root, "report.json")):
    with open(os.path.join(root, "report.json"), encoding="utf-8") as f:
      previous = json.load(f).get("timings", {})
  timings = dict(timings)
  for stage in reused:
    if stage in previous:
      timings[stage] = previous[stage]
  costs = {name: training_cost(os.path.join(root, name)) for name in results}
  plots(root, results, costs)  # loss.png, accuracy.png, linked below
  lines = ["# LIFT vs CLIP on the synthetic compositional set", ""]
  if quick:
    lines += ["*Quick run: a handful of steps on a small set; the numbers show that every stage "
              "works, not what the method reaches.*", ""]
  lift_cfg = ckpt.workdir_config(os.path.join(root, "lift"))
  m = lift_cfg["model"]
  lines += [
      f"Image tower: ViT {m['variant']} at {m['image_size']} px, "
      f"{lift_cfg['total_steps']} steps of {lift_cfg['batch_size']} pairs, seed "
      f"{lift_cfg['seed']}, for both models. LIFT's text side: frozen all-MiniLM-L6-v2 "
      "embeddings computed once by `embed.main`; CLIP's: a text transformer trained from "
      "scratch. Evaluated by `eval.main` on held-out synthetic images.", "",
      "## Results", "",
      "Accuracy / recall in %, with 95% Wilson intervals; n = scored samples (images for "
      "image->text and classification, texts for text->image); chance = what random guessing "
      "scores.", "",
      "| metric | LIFT | CLIP | chance | n |", "|---|---|---|---|---|"]
  for r in rows(results):
    if "lift" in r and "clip" in r:
      c = chance(results["lift"], r["metric"])
      lines.append(f"| {r['metric']} | {_pct(r['lift'])} | {_pct(r['clip'])} | "
                   f"{'n/a' if c is None else f'{100 * c:.1f}'} | {r['lift'][3]} |")
  lines += ["", "### What this says", "", " ".join(what_this_says(results))]
  gaps = text_encoder_gaps(root, results["lift"])
  if gaps:
    lines += ["", "### How far apart the frozen encoder puts the captions", "",
              "Mean cosine similarity between the positive and the negative caption of each "
              "compositional sample, under LIFT's frozen text encoder. LIFT's image embedding "
              "must fall closer to the positive; when the two captions' embeddings are nearly "
              "equal, the fixed text side leaves almost no room to do so (a text tower trained "
              "on these captions can move them apart).", "",
              "| subset | mean cos(positive, negative) |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in gaps.items()]
  lines += ["", "![per-metric accuracy](accuracy.png)", "", "## Training cost", "",
            "| | LIFT | CLIP |", "|---|---|---|"]
  fmt = {"steps": "{:d}", "batch_size": "{:d}", "step_time_s": "{:.3f}",
         "flops_per_step": "{:.3g}", "final_loss": "{:.3f}"}
  labels = {"steps": "steps", "batch_size": "global batch",
            "step_time_s": "median step time (s, this machine)",
            "flops_per_step": "FLOPs per step (XLA cost analysis)",
            "final_loss": "final training loss"}
  for key, label in labels.items():
    cells = []
    for name in ("lift", "clip"):
      v = costs[name][key]
      cells.append("n/a" if v is None else fmt[key].format(v))
    lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
  if costs["lift"]["flops_per_step"] and costs["clip"]["flops_per_step"]:
    ratio = costs["lift"]["flops_per_step"] / costs["clip"]["flops_per_step"]
    lines.append(f"| LIFT / CLIP FLOPs per step | {ratio:.2f} | |")
  lines += ["", "![training loss](loss.png)", "", "## Wall time of the stages", "",
            "| stage | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.0f}{' (earlier run, reused now)' if k in reused else ''} |"
            for k, v in timings.items()]
  lines += ["", "The preparation stage checks and reuses finished data and embeddings (its "
            "logs say which). TensorBoard logs: "
            "`tensorboard --logdir " + root + "`.", "",
            "Files: `lift/` and `clip/` (checkpoints, metrics.jsonl, tensorboard/, "
            "eval/demo-metrics-*.json), `data/synthetic/` (shards, embeddings, text bank), "
            "`logs/` (every command's output)."]
  path = os.path.join(root, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(root, "report.json"), "w", encoding="utf-8") as f:
    json.dump({"results": {k: v["metrics"] for k, v in results.items()},
               "text_encoder_gaps": gaps,
               "costs": {k: {kk: vv for kk, vv in v.items() if kk != "loss_curve"}
                         for k, v in costs.items()},
               "timings": timings, "quick": quick}, f, indent=1)
  return path
