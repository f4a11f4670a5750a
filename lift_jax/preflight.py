"""``python -m lift_jax.main ... --check[=full]``: what a long run needs, checked before it starts.

Nothing here asks for an accelerator or builds a model: the checks read manifests, evaluation
files and the text bank, and try the workdir. Each check is one row of a table (OK, WARN or FAIL
with what to do); the command exits 1 when any row fails. ``--check=full`` also hashes every
image and embedding shard (in parallel threads) against the SHA-256 of its manifest, which finds
a damaged or half-copied shard before training reaches it.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable

from eval import benchmarks
from eval import texts as T
from eval.predictor import TextBank
from eval.runner import check_bank_encoder
from lift_jax import checkpoint as ckpt
from lift_jax import cli, pretrained, startup
from lift_jax.data import pipeline, records
from lift_jax.prepare import prepared_config, wants_preparation
from lift_jax.metrics import read_jsonl
from lift_jax.throughput import format_duration

OK, WARN, FAIL = "OK", "WARN", "FAIL"


class Table:
  """Rows of (check, status, detail)."""

  def __init__(self):
    self.rows: list[tuple[str, str, str]] = []

  def add(self, check: str, status: str, detail: str) -> None:
    self.rows.append((check, status, detail))

  def run(self, check: str, fn: Callable[[], Any]) -> Any:
    """Runs ``fn``, which returns a detail or (status, detail[, value]), and returns that (None
    when ``fn`` raised a user error, which becomes a FAIL row)."""
    try:
      out = fn()
    except Exception as e:  # noqa: BLE001 - only user errors become rows
      message = cli.describe(e)
      if message is None:
        raise
      self.add(check, FAIL, message)
      return None
    status, detail = out[:2] if isinstance(out, tuple) else (OK, out)
    self.add(check, status, detail)
    return out

  @property
  def failed(self) -> bool:
    return any(s == FAIL for _, s, _ in self.rows)

  def format(self) -> str:
    width = max(len(c) for c, _, _ in self.rows)
    return "\n".join(f"{c:<{width}}  {s:<4}  {d}" for c, s, d in self.rows)


def _hash_all(folder: str, manifest: dict[str, Any], threads: int) -> str | tuple[str, str]:
  entries = manifest["shards"]

  def one(entry):
    path = os.path.join(folder, entry["file"])
    if not os.path.exists(path):
      return f"{entry['file']}: missing"
    if records.sha256_file(path) != entry.get("sha256"):
      return f"{entry['file']}: SHA-256 differs from the manifest (damaged or changed)"
    return None

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    bad = [b for b in pool.map(one, entries) if b]
  if bad:
    return FAIL, (f"{len(bad)} of {len(entries)} shards in {folder} do not match the manifest: "
                  + "; ".join(bad[:5]) + ". Re-create them with the command that wrote the "
                  "folder (it redoes shards that do not verify)")
  return f"{len(entries)} shards match their SHA-256"


def check(config, workdir: str, full: bool = False, threads: int | None = None) -> Table:
  """The preflight table of a training config (see the module docstring). Writes nothing."""
  t = Table()
  threads = threads or min(32, 4 * (os.cpu_count() or 1))
  t.run("config values", lambda: startup.check_config(config))
  prepared = t.run("data preparation", lambda: _prepared(config, workdir))
  config = prepared[2] if prepared else config
  resolved = t.run("tower shape", lambda: (OK, _tower_shape(config),
                                           pretrained.resolve_shape(config)))
  config = resolved[2] if resolved else config
  t.run("pretrained tower", lambda: startup.check_init_from(config))
  t.run("topology", lambda: startup.check_topology(config))
  data, model = config.data, config.model
  if wants_preparation(config) and not os.path.isdir(data.images or ""):
    t.add("data", WARN, f"data.prepare={data.prepare!r} builds the data: run with "
          "--prepare_only first to check it")
  elif t.run("data paths", lambda: _paths(config)) is not None:
    shards = t.run("image manifest", lambda: _image_summary(data.images))
    if model.mode == "lift":
      warnings: list[str] = []
      t.run("embeddings", lambda: _embedding_summary(config, warnings))
      if warnings:
        t.add("embedding freshness", WARN, " ".join(warnings))
    if full:
      t.run("image SHA-256", lambda: _hash_all(data.images, records.read_manifest(data.images),
                                               threads))
      if model.mode == "lift":
        t.run("embedding SHA-256", lambda: _hash_all(
            data.embeddings, records.read_manifest(data.embeddings), threads))
    if shards:
      n = shards[2]
      samples = int(config.total_steps) * int(config.batch_size)
      t.add("schedule", OK, f"{config.total_steps} steps x {config.batch_size} = {samples:,} "
            f"samples, {samples / max(n, 1):.2f} epochs of {n:,} records" + _eta(config, workdir))
  _check_evals(config, t)
  if t.run("workdir", lambda: _workdir(config, workdir)) is not None:
    t.run("workdir lock", lambda: startup.check_lock(config, workdir))
    t.run("resume", lambda: startup.check_resume(config, workdir, full=full))
  return t


def _prepared(config, workdir: str):
  """The paths data preparation fills in (nothing is built)."""
  if not wants_preparation(config):
    return OK, "none (data made beforehand)", config
  out = prepared_config(config, workdir)
  built = os.path.isdir(out.data.images or "")
  return (OK if built else WARN), (f"data.prepare={config.data.prepare!r}: "
                                   + ("built" if built else "not built yet") + f" in "
                                   f"{os.path.dirname(out.data.images)}"), out


def _tower_shape(config) -> str:
  if config.model.get("tower_shape", "config") == "config":
    return "model.variant and model.vit.* (model.tower_shape='config')"
  return f"from model.init_from={config.model.init_from} (model.tower_shape='init_from')"


def _paths(config) -> str:
  pipeline.require_paths(config)
  lift = config.model.mode == "lift"
  return f"images {config.data.images}" + (f", embeddings {config.data.embeddings}" if lift
                                           else "")


def _image_summary(folder: str):
  paths, counts, _ = records.shard_counts(folder, records.IMAGES)
  return OK, f"{len(paths)} shards, {sum(counts):,} records (from the manifest)", sum(counts)


def _embedding_summary(config, warnings: list[str]) -> str:
  counts = pipeline.check_embeddings(config.data.images, config.data.embeddings,
                                     config.model.embed_dim, warn=warnings.append)
  manifest = records.read_manifest(config.data.embeddings)
  return (f"{len(counts)} shards aligned with the images, dim {manifest.get('dim')}, "
          f"{manifest.get('model', 'unknown encoder')}")


def _eta(config, workdir: str) -> str:
  """An ETA from the step time an earlier run of this workdir logged, when there is one."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return ""
  rows = [r for r in read_jsonl(path) if isinstance(r.get("step_time_s"), float)]
  if not rows:
    return ""
  left = int(config.total_steps) - int(rows[-1]["step"])
  return f"; ETA {format_duration(left * rows[-1]['step_time_s'])} at the logged step time"


def _check_evals(config, t: Table) -> None:
  resolved, dropped = benchmarks.resolve_paths(config)
  if dropped:
    t.add("eval paths", WARN, f"{', '.join(dropped)} skipped: relative paths and no "
          "--config.evals.data_root")
  def parse():
    specs = benchmarks.parse_all(resolved.evals.benchmarks)
    return OK, f"{len(specs)} benchmarks: {', '.join(s.name for s in specs) or '-'}", specs

  specs = t.run("eval config", parse)
  if not specs:
    return
  texts: list[str] = []
  for spec in specs[2]:
    evaluator = t.run(f"eval {spec.name}", lambda s=spec: (OK, "files and images present",
                                                           benchmarks.make_evaluator(s)))
    if evaluator:
      texts.extend(evaluator[2].scored_texts())
  if config.model.mode == "lift" and texts:
    t.run("text bank", lambda: _bank(config, T.unique(texts)))


def _bank(config, texts: list[str]) -> str | tuple[str, str]:
  folder = config.evals.get("text_bank")
  if not folder:
    return FAIL, ("config.evals.text_bank is not set: write the texts with `python -m eval.main "
                  "--config=CONFIG --write_texts=FILE`, embed them with `python -m embed.main "
                  "--config=embed/configs/minilm.py --config.texts=FILE --config.output=DIR`, "
                  "then set --config.evals.text_bank=DIR")
  bank = TextBank(folder, int(config.model.embed_dim))
  bank.check(texts)  # what the run's Predictor checks before step 0
  allowed = check_bank_encoder(config)  # the run's own comparison with the training embeddings
  note = f"; encoder differences allowed: {'; '.join(allowed)}" if allowed else ""
  return f"{len(texts)} texts, all in {folder}{note}"


def _workdir(config, workdir: str) -> str:
  workdir = ckpt.open_workdir(workdir, config, primary=False, write=False)
  return f"{workdir} writable, its checkpoints fit the config"
