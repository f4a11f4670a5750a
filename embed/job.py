"""The embedding job: divide the shards among ranks, skip finished ones, embed the rest.

Two modes, by which input the config names:

* ``images``: the captions of every ``images-i-of-n`` shard become ``embeddings-i-of-n`` (same keys,
  same order, one record per image record, flagged placeholders included);
* ``texts``: the distinct texts of a file become a text bank, ``bank-i-of-n`` shards keyed by text.

Each shard is embedded by one rank (shard i by rank i mod world size), written under a temporary
name and renamed, then its manifest entry is written beside it (see :mod:`embed.writer`). A
re-run skips every shard whose file matches its entry (count and SHA-256, checked by
``lift_jax.data.shards.verified``) and whose input is unchanged (the image shard's SHA-256 as its
folder's manifest records it, or the bank's texts), and redoes the others.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from embed import encoders as enc_lib
from embed import inputs, writer
from embed.batching import PaddingStats, plan_batches
from embed.config import POLICIES
from embed.errors import EmbedError
from lift_jax import common
from lift_jax.data import records
from lift_jax.data import shards

FLOAT16_MAX = 65504.0


@dataclasses.dataclass
class Task:
  """One output shard: the image shard it mirrors, or the texts it holds."""
  index: int
  file: str
  source: str | None = None  # image shard path (images mode)
  items: list[inputs.Item] | None = None  # bank texts (texts mode)
  image_sha256: str | None = None  # of the image shard, as its folder's manifest.json says

  def read_items(self, caption_field: str) -> list[inputs.Item]:
    return self.items if self.items is not None else inputs.shard_items(self.source, caption_field)

  def size(self) -> int:
    return len(self.items) if self.items is not None else records.count_records(self.source)


@dataclasses.dataclass
class ShardResult:
  vectors: np.ndarray  # float32 [n, dim], zeros where flagged
  flags: list[str]
  truncated: int
  stats: PaddingStats


def log(message: str) -> None:
  print(f"[embed] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Ranks and configuration
# --------------------------------------------------------------------------------------------


def rank_info(env: dict[str, str] | None = None) -> tuple[int, int, int]:
  """(rank, world size, local rank) of this process by the rule the converter uses too
  (:func:`lift_jax.common.task_of`: torchrun, SLURM arrays and tasks, Kubernetes indexed Jobs);
  (0, 1, 0) alone."""
  task = common.task_of(env, error=EmbedError)
  return task.index, task.count, task.local


def check_config(cfg) -> str:
  """The mode ("images" or "texts") of a valid config; a clear error otherwise."""
  if bool(cfg.images) == bool(cfg.texts):
    raise EmbedError("set exactly one of config.images (a folder of image shards) and "
                     "config.texts (a file of texts for a text bank)")
  if not cfg.output:
    raise EmbedError("config.output is empty: name the folder to write to")
  if cfg.images:
    if not os.path.isdir(cfg.images):
      raise EmbedError(f"config.images={cfg.images} is not a folder")
    if os.path.abspath(cfg.images) == os.path.abspath(cfg.output):
      raise EmbedError("config.output must differ from config.images (both hold a manifest.json)")
  if cfg.encoder:
    enc_lib.architecture(cfg.encoder)  # an unknown kind is an EmbedError naming the choices
  if cfg.storage_dtype not in records.STORAGE_DTYPES:
    raise EmbedError(f"config.storage_dtype={cfg.storage_dtype!r}; "
                     f"expected one of {records.STORAGE_DTYPES}")
  for name in ("empty_policy", "nan_policy"):
    if cfg[name] not in POLICIES:
      raise EmbedError(f"config.{name}={cfg[name]!r}; expected one of {POLICIES}")
  for name in ("max_length", "batch_tokens", "max_batch_size", "bank_shard_size"):
    if cfg[name] < 1:
      raise EmbedError(f"config.{name}={cfg[name]} must be at least 1")
  if cfg.batch_overhead_tokens < 0:
    raise EmbedError(f"config.batch_overhead_tokens={cfg.batch_overhead_tokens} is negative")
  return "images" if cfg.images else "texts"


def plan_tasks(cfg, mode: str) -> tuple[list[Task], dict[str, Any]]:
  """Every output shard of the job, and what the manifest says about the input."""
  if mode == "images":
    records.check_finished(cfg.images, records.IMAGES)  # a half-made set is refused, by name
    sources = records.list_shards(cfg.images, records.IMAGES)
    n = len(sources)
    digests = image_digests(cfg.images, sources)
    tasks = [Task(i, records.shard_name(records.EMBEDDINGS, i, n), source=p,
                  image_sha256=digests[os.path.basename(p)]) for i, p in enumerate(sources)]
    return tasks, {"images": os.path.abspath(cfg.images)}
  texts = inputs.read_texts_file(cfg.texts)
  items = inputs.bank_items(texts)
  if not items:
    raise EmbedError(f"texts file {cfg.texts} holds no texts")
  size = cfg.bank_shard_size
  n = math.ceil(len(items) / size)
  tasks = [Task(i, records.shard_name(records.BANK, i, n), items=items[i * size:(i + 1) * size])
           for i in range(n)]
  context = {"texts": os.path.abspath(cfg.texts), "num_texts": len(items),
             "duplicates_dropped": len(texts) - len(items)}
  return tasks, context


def image_digests(folder: str, paths: Sequence[str]) -> dict[str, str]:
  """{image shard file: SHA-256} as the image folder's manifest.json records them; a shard the
  manifest does not list (or a folder without one) is hashed here."""
  try:
    listed = {e.get("file"): e.get("sha256") for e in records.read_manifest(folder)["shards"]}
  except records.RecordError:
    listed = {}
  out = {}
  for path in paths:
    name = os.path.basename(path)
    out[name] = listed.get(name) or records.sha256_file(path)
  return out


def keys_digest(keys: Sequence[str]) -> str:
  return hashlib.sha256(json.dumps(list(keys), ensure_ascii=False).encode("utf-8")).hexdigest()


def settings_of(cfg, mode: str, tasks: list[Task], ref: enc_lib.ModelRef, kind: str, dtype: str
                ) -> dict[str, Any]:
  """What decides the vectors: a re-run into the same folder must agree on all of it."""
  settings = {
      "kind": "embeddings" if mode == "images" else "text_bank",
      "model": ref.name,
      "revision": cfg.revision or (enc_lib.snapshot_revision(ref.source) if ref.is_local else None),
      "encoder": kind,
      "pooling": enc_lib.architecture(kind).pooling,
      "instruction": cfg.instruction,
      "max_length": cfg.max_length,
      "append_eos": cfg.append_eos,
      "normalized": cfg.normalize,
      "storage_dtype": cfg.storage_dtype,
      "dtype": dtype,
      "num_shards": len(tasks),
  }
  if cfg.random_init:  # recorded only when set: vectors of random weights are never mistaken
    settings["random_init"] = True
  if mode == "images":
    settings["caption_field"] = cfg.caption_field
  else:
    settings["texts_sha256"] = keys_digest([it.key for t in tasks for it in t.items])
  return settings


# --------------------------------------------------------------------------------------------
# Embedding one shard
# --------------------------------------------------------------------------------------------


def embed_items(encoder: enc_lib.Encoder, items: list[inputs.Item], cfg, where: str,
                progress=None) -> ShardResult:
  """Vectors for ``items`` in their order, batched by tokens in length order."""
  flags = [it.flag for it in items]
  if cfg.empty_policy == "fail":
    for i, it in enumerate(items):
      if it.flag:
        raise EmbedError(f"{where} record {i} (key {it.key!r}): {it.flag} caption "
                         "(config.empty_policy='fail'; 'flag' writes a flagged placeholder)")
  live = [i for i, f in enumerate(flags) if not f]
  vectors = np.zeros((len(items), encoder.dim), np.float32)
  stats = PaddingStats()
  if progress is not None:
    progress.update(len(items) - len(live))
  prepared = (encoder.prepare([items[i].text for i in live]) if live
              else enc_lib.Prepared([], [], []))
  for batch in plan_batches(prepared.lengths, cfg.batch_tokens, cfg.max_batch_size,
                           cfg.batch_overhead_tokens):
    out = run_batch(encoder, [prepared.inputs[j] for j in batch], where,
                    max(prepared.lengths[j] for j in batch), cfg.batch_tokens)
    vectors[[live[j] for j in batch]] = out
    lengths = [prepared.lengths[j] for j in batch]
    stats.add_batch(lengths)
    if progress is not None:
      progress.add(len(batch), sum(lengths), len(batch) * max(lengths))
  flag_non_finite(vectors, flags, items, cfg, where)
  if cfg.normalize:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.maximum(norms, 1e-12)
  return ShardResult(vectors, flags, sum(prepared.truncated), stats)


def run_batch(encoder: enc_lib.Encoder, batch_inputs: list, where: str, width: int,
              batch_tokens: int) -> np.ndarray:
  import torch

  try:
    out = encoder.encode(batch_inputs)
  except torch.OutOfMemoryError:
    raise EmbedError(f"{where}: out of memory on a batch of {len(batch_inputs)} texts x {width} "
                     f"tokens; lower config.batch_tokens (now {batch_tokens})") from None
  if out.shape != (len(batch_inputs), encoder.dim):
    raise EmbedError(f"{where}: the encoder returned shape {out.shape} for {len(batch_inputs)} "
                     f"texts; expected ({len(batch_inputs)}, {encoder.dim})")
  return out


def flag_non_finite(vectors: np.ndarray, flags: list[str], items: list[inputs.Item], cfg,
                    where: str) -> None:
  """NaN/Inf outputs, and outputs float16 storage would turn into Inf, become placeholders."""
  bad = ~np.isfinite(vectors).all(axis=1)
  if cfg.storage_dtype == "float16" and not cfg.normalize:
    bad |= (np.abs(np.nan_to_num(vectors)) > FLOAT16_MAX).any(axis=1)
  for i in np.flatnonzero(bad):
    if cfg.nan_policy == "fail":
      raise EmbedError(f"{where} record {i} (key {items[i].key!r}): the encoder output holds "
                       "NaN/Inf or overflows float16 (config.nan_policy='fail')")
    flags[i] = "nan"
    vectors[i] = 0.0


def write_output(path: str, items: list[inputs.Item], result: ShardResult, storage_dtype: str
                 ) -> dict[str, Any]:
  """Writes the shard atomically; returns its manifest entry (file, count, SHA-256, counters)."""
  writer.remove_stale_temporaries(path)
  entry = records.write_shard(path, (
      records.embedding_record(it.key, result.vectors[i], storage_dtype, result.flags[i])
      for i, it in enumerate(items)))
  keys = [it.key for it in items]
  entry.update({
      "dim": int(result.vectors.shape[1]),
      "keys_sha256": keys_digest(keys),
      "first_key": keys[0] if keys else None,
      "last_key": keys[-1] if keys else None,
      "truncated": result.truncated,
      "tokens": result.stats.tokens,
      "padded_tokens": result.stats.padded,
  })
  for flag in ("empty", "undecodable", "missing", "nan"):
    entry[flag] = result.flags.count(flag)
  entry["failed"] = sum(1 for f in result.flags if f)
  return entry


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


def check_stray_shards(output: str, prefix: str, num_shards: int) -> None:
  """Shards of another shard count in the folder mean another input was embedded there."""
  for path in sorted(glob.glob(os.path.join(glob.escape(output), f"{prefix}-*-of-*.array_record"))):
    name = os.path.basename(path)
    if not name.endswith(f"-of-{num_shards:05d}.array_record"):
      raise EmbedError(f"{path} belongs to a set of a different size than the {num_shards} shards "
                       "of this input; use a new output folder")


def check_source(output: str, task: Task, entry: dict[str, Any]) -> str | None:
  """Raises if a finished embedding shard no longer matches its image shard; for a bank shard,
  returns why it must be redone (its texts changed) or None."""
  if task.items is not None:
    if entry.get("keys_sha256") != keys_digest([it.key for it in task.items]):
      return "its texts differ from the texts file"
    return None
  if entry.get("image_sha256"):
    if entry["image_sha256"] != task.image_sha256:
      return (f"its image shard {task.source} changed since it was embedded (SHA-256 "
              f"{entry['image_sha256'][:12]}... then, {str(task.image_sha256)[:12]}... now)")
    return None
  # An entry written before image digests were recorded: counts and end keys must still agree.
  n = records.count_records(task.source)
  shard = os.path.join(output, task.file)
  if n != entry["count"]:
    raise EmbedError(f"{shard} holds {entry['count']} records but its image shard {task.source} "
                     f"holds {n}: the image shards changed after the embeddings were written; "
                     "use a new output folder, or delete the embedding shard to redo it")
  if n and "first_key" in entry:
    first, last = (records.unpack(d, task.source, "surrogateescape")["key"]
                   for d in records.read_raw(task.source, [0, n - 1]))
    for index, have, want in ((0, entry["first_key"], first), (n - 1, entry["last_key"], last)):
      if have != want:
        raise EmbedError(f"{shard} record {index} has key {have!r} but its image shard "
                         f"{task.source} has {want!r}; use a new output folder, or delete the "
                         "embedding shard to redo it")
  return None


def split_done(output: str, tasks: list[Task]) -> tuple[list[Task], list[Task]]:
  """(finished, to do) among ``tasks``, checked against their entries and their inputs."""
  known = writer.manifest_entries(output)
  known.update(writer.read_entries(output))
  intact = shards.verified(output, [known[t.file] for t in tasks if t.file in known],
                           log=lambda message: log(f"redoing {message}"))
  done, todo = [], []
  for task in tasks:
    entry = intact.get(task.file)
    why = "not written yet" if entry is None else check_source(output, task, entry)
    if why is None:
      if not os.path.exists(writer.entry_path(output, task.file)):
        writer.write_entry(output, entry)
      done.append(task)
      continue
    if entry is not None:
      log(f"redoing {os.path.join(output, task.file)}: {why}")
    todo.append(task)
  return done, todo


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class Progress:
  """tqdm bar over texts: texts/s and ETA from tqdm, tokens/s and padding waste beside them."""

  def __init__(self, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    self.bar = tqdm(total=total, desc=desc, unit="cap", unit_scale=True, disable=not enabled,
                    mininterval=0.5 if interactive else 30.0, dynamic_ncols=True)
    self.start = time.perf_counter()
    self.tokens = 0
    self.padded = 0

  def restart_clock(self) -> None:
    self.start = time.perf_counter()
    self.bar.reset()

  def update(self, n: int) -> None:
    self.bar.update(n)

  def add(self, n: int, tokens: int, padded: int) -> None:
    """``n`` texts embedded in a batch of ``padded`` tokens, ``tokens`` of them real."""
    self.tokens += tokens
    self.padded += padded
    seconds = max(time.perf_counter() - self.start, 1e-9)
    waste = 1 - self.tokens / self.padded if self.padded else 0.0
    self.bar.set_postfix_str(f"{self.tokens / seconds:,.0f} tok/s, pad {waste:.1%}", refresh=False)
    self.bar.update(n)

  def close(self) -> None:
    self.bar.close()


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def run(cfg) -> dict[str, Any]:
  """Runs this rank's share of the job; returns this rank's summary."""
  mode = check_config(cfg)
  rank, world, local_rank = rank_info()
  tasks, context = plan_tasks(cfg, mode)
  kind_name = "embeddings" if mode == "images" else "text_bank"
  mine = tasks[rank::world]
  if cfg.verify:
    return verify(cfg, tasks, mine, kind_name, rank)

  import torch

  if cfg.threads:
    torch.set_num_threads(cfg.threads)
  device = enc_lib.resolve_device(cfg.device, local_rank)
  dtype = enc_lib.resolve_dtype(cfg.dtype, device)
  ref = enc_lib.resolve_model(cfg.model)
  kind = cfg.encoder or ref.default_encoder
  if not kind:
    raise EmbedError(f"config.encoder is empty and {cfg.model} has no known encoder; "
                     f"set one of {sorted(enc_lib.ARCHITECTURES)}")

  os.makedirs(cfg.output, exist_ok=True)
  writer.ensure_settings(cfg.output, settings_of(cfg, mode, tasks, ref, kind, dtype), context)
  check_stray_shards(cfg.output, records.EMBEDDINGS if mode == "images" else records.BANK,
                     len(tasks))
  done, todo = split_done(cfg.output, mine)
  who = f"rank {rank}/{world}" if world > 1 else "embed"
  log(f"{who}: {len(mine)} of {len(tasks)} shards are this rank's; {len(done)} already done, "
      f"{len(todo)} to do on {device}")

  def load_encoder():
    return enc_lib.build_encoder(kind, ref, cfg.revision, dtype, device, cfg.instruction,
                                 cfg.max_length, cfg.append_eos, cfg.padding_side,
                                 cfg.trust_remote_code, random_init=cfg.random_init)

  tally = RankTally(rank, world, str(device), skipped=len(done))
  progress = Progress(sum(t.size() for t in todo), who, cfg.progress and bool(todo))
  shards = embed_shards(todo, load_encoder, cfg, progress)
  try:
    for entry, stats in shards:
      entry.update(rank=rank, device=str(device))
      writer.write_entry(cfg.output, entry)
      writer.assemble_manifest(cfg.output, len(tasks), kind_name)
      tally.add(entry, stats)
  finally:
    shards.close()  # stops the reader thread whatever went wrong
    progress.close()
  manifest = writer.assemble_manifest(cfg.output, len(tasks), kind_name)
  summary = tally.summary(manifest)
  print_summary(summary, cfg.output)
  return summary


def embed_shards(todo: list[Task], load_encoder, cfg, progress):
  """Embeds and writes each shard; yields (manifest entry, padding stats) per finished shard.

  The encoder is loaded on the first shard (a rank with nothing to do never loads it), and the
  next shard's captions are read while one is embedded: image shards are large, and reading one
  should not leave the GPU idle.
  """
  encoder = None
  reader = concurrent.futures.ThreadPoolExecutor(1)
  upcoming = [reader.submit(t.read_items, cfg.caption_field) for t in todo[:1]]
  try:
    for position, task in enumerate(todo):
      if encoder is None:
        encoder = load_encoder()
        progress.restart_clock()  # rates without the model's loading time
      start = time.perf_counter()
      items = upcoming.pop(0).result()
      upcoming += [reader.submit(t.read_items, cfg.caption_field)
                   for t in todo[position + 1:position + 2]]
      where = task.source or os.path.join(cfg.output, task.file)
      result = embed_items(encoder, items, cfg, where, progress)
      entry = write_output(os.path.join(cfg.output, task.file), items, result, cfg.storage_dtype)
      entry["seconds"] = round(time.perf_counter() - start, 3)
      entry["model_revision"] = encoder.revision
      if task.source:
        entry["image_shard"] = os.path.basename(task.source)
        entry["image_sha256"] = task.image_sha256
      yield entry, result.stats
  finally:
    for pending in upcoming:
      pending.cancel()
    reader.shutdown(wait=True)


@dataclasses.dataclass
class RankTally:
  """What this rank did in this run."""
  rank: int
  world_size: int
  device: str
  skipped: int
  written: int = 0
  texts: int = 0
  seconds: float = 0.0
  counters: dict[str, int] = dataclasses.field(
      default_factory=lambda: {k: 0 for k in writer.COUNTERS})
  stats: PaddingStats = dataclasses.field(default_factory=PaddingStats)

  def add(self, entry: dict[str, Any], stats: PaddingStats) -> None:
    self.written += 1
    self.texts += entry["count"]
    self.seconds += entry["seconds"]
    self.stats.tokens += stats.tokens
    self.stats.padded += stats.padded
    for k in self.counters:
      self.counters[k] += entry[k]

  def summary(self, manifest: dict[str, Any]) -> dict[str, Any]:
    rate = (lambda n: n / self.seconds) if self.seconds else (lambda n: None)
    return {
        "rank": self.rank, "world_size": self.world_size, "device": self.device,
        "written": self.written, "skipped": self.skipped, "texts": self.texts,
        "seconds": self.seconds, **self.counters,
        "tokens": self.stats.tokens, "padded_tokens": self.stats.padded,
        "padding_waste": self.stats.waste,
        "captions_per_second": rate(self.texts), "tokens_per_second": rate(self.stats.tokens),
        "manifest_complete": manifest["complete"], "manifest_shards": len(manifest["shards"]),
        "num_shards": manifest["num_shards"],
    }


def print_summary(s: dict[str, Any], output: str) -> None:
  who = f"rank {s['rank']}/{s['world_size']}" if s["world_size"] > 1 else "embed"
  lines = [f"{who}: {s['written']} shards written, {s['skipped']} already done, on {s['device']}"]
  if s["written"]:
    lines.append(
        f"  {s['texts']} texts in {s['seconds']:.1f} s: {s['captions_per_second']:.1f} captions/s, "
        f"{s['tokens_per_second']:.0f} tokens/s, padding waste {s['padding_waste']:.1%}")
    lines.append(
        f"  truncated {s['truncated']}, placeholders {s['failed']} (empty {s['empty']}, "
        f"undecodable {s['undecodable']}, missing {s['missing']}, nan {s['nan']})")
  lines.append(f"  manifest {os.path.join(output, records.MANIFEST)}: {s['manifest_shards']} of "
               f"{s['num_shards']} shards" + (" (complete)" if s["manifest_complete"] else
                                              " (other ranks still running, or re-run to finish)"))
  print("\n".join(lines), flush=True)


# --------------------------------------------------------------------------------------------
# verify=True
# --------------------------------------------------------------------------------------------


def verify(cfg, tasks: list[Task], mine: list[Task], kind: str, rank: int) -> dict[str, Any]:
  """Checks finished output; raises an EmbedError listing every problem found."""
  output = cfg.output
  manifest = records.read_manifest(output)
  problems = []
  if manifest.get("kind") != kind:
    problems.append(f"manifest kind is {manifest.get('kind')!r}, expected {kind!r}")
  if manifest.get("num_shards") != len(tasks):
    problems.append(f"manifest counts {manifest.get('num_shards')} shards; the input has "
                    f"{len(tasks)}")
  entries = {e["file"]: e for e in manifest["shards"]}
  for task in mine:
    problem = verify_shard(output, task, entries.get(task.file), manifest, cfg.caption_field)
    if problem:
      problems.append(f"{task.file}: {problem}")
  log(f"verify rank {rank}: {len(mine)} shards checked, {len(problems)} problems")
  if problems:
    raise EmbedError(f"verify found {len(problems)} problems in {output}:\n  "
                     + "\n  ".join(problems) + "\nre-run without verify to redo damaged shards")
  print(f"verify: {len(mine)} shards of {output} match the manifest and their inputs", flush=True)
  return {"verified": len(mine), "problems": 0}


def verify_shard(output: str, task: Task, entry: dict[str, Any] | None, manifest: dict[str, Any],
                 caption_field: str) -> str | None:
  if entry is None:
    return "not in the manifest"
  why = records.verify_shard(output, entry)
  if why:
    return why
  if task.image_sha256 and entry.get("image_sha256") not in (None, task.image_sha256):
    return (f"embedded from another version of its image shard {task.source} (SHA-256 "
            f"{entry['image_sha256'][:12]}... in the embedding manifest, "
            f"{task.image_sha256[:12]}... now); re-run `python -m embed.main "
            "--config=EMBED_CONFIG --config.images=IMAGES_DIR --config.output=DIR` without "
            "verify to redo it")
  path = os.path.join(output, task.file)
  if task.items is not None:
    want = [it.key for it in task.items]
  else:
    want = records.read_keys(task.source)
  dim, dtype = manifest.get("dim"), manifest.get("storage_dtype")
  count = 0
  for index, record in enumerate(records.iter_records(path)):
    count += 1
    if index >= len(want):
      break
    if record["key"] != want[index]:
      source = task.source or "the texts file"
      return f"record {index} has key {record['key']!r}; {source} has {want[index]!r}"
    if record.get("dtype") != dtype:
      return f"record {index} is stored as {record.get('dtype')!r}; the manifest says {dtype!r}"
    if dim and records.decode_embedding(record).shape != (dim,):
      return f"record {index} has {records.decode_embedding(record).shape[0]} values, not {dim}"
  if count != len(want):
    source = task.source or "the texts file"
    return f"holds {count} records; {source} has {len(want)}"
  return None
