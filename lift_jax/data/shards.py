"""Writing a folder of shards resumably, the one way convert, the synthetic generator and the
embedding job do it.

A folder of shards is finished shard by shard; each finished shard has a manifest entry (file,
record count, SHA-256). A re-run

* refuses a folder made with other settings, listing every difference (:func:`check_settings`);
* keeps the shards that verify against their entries and redoes the others (:func:`verified`);
* rewrites ``manifest.json`` after every shard (``records.write_manifest``), ``"complete": false``
  until the last one (:func:`is_complete` tells a finished folder).

:func:`build_shards` runs the whole cycle for image shards on one process (convert, synthetic);
the embedding job (``embed.job`` / ``embed.writer``) runs it over many ranks with the same
functions. :class:`Report` counts the per-record outcomes by reason.
"""

from __future__ import annotations

import collections
import glob
import json
import multiprocessing
import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from lift_jax import cli
from lift_jax import common
from lift_jax.data import records

_EXAMPLES = 5  # example keys kept per reason in reports
SAMPLES_PER_SHARD = 10_000  # the shard count when none is given: ceil(N / this)


@cli.user_error
class ShardSetError(ValueError):
  """An output folder holds shards made with other settings; the message lists the differences."""


# --------------------------------------------------------------------------------------------
# Settings, verification, completeness
# --------------------------------------------------------------------------------------------


def check_settings(where: str, old: Mapping[str, Any], new: Mapping[str, Any], hint: str,
                   error: type[Exception] | None = None, what: str = "settings") -> None:
  """Raises ``error`` (default ShardSetError) naming ``where`` and every setting that differs
  between what a folder was made with (``old``) and what is asked now (``new``)."""
  diffs = common.differences(old, new)
  if diffs:
    raise (error or ShardSetError)(
        f"{where} was made with other {what} ({'; '.join(diffs)}); {hint}")


def verified(folder: str, entries: Iterable[Mapping[str, Any]], names: Sequence[str] | None = None,
             log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
  """{file: entry} of the shards among ``entries`` that are intact (record count and SHA-256 as
  the entry says, and, when ``names`` is given, one of those names); the others are logged as
  to be written again."""
  done: dict[str, dict[str, Any]] = {}
  for entry in entries:
    name = entry.get("file")
    problem = ("unexpected" if names is not None and name not in names
               else records.verify_shard(folder, entry))
    if problem is None:
      done[name] = dict(entry)
    else:
      log(f"{os.path.join(folder, str(name))}: {problem}; it is written again")
  return done


def is_complete(folder: str, prefix: str, num_shards: int | None = None) -> bool:
  """Whether ``folder`` holds a finished set of ``prefix`` shards: a manifest that says it is
  complete (when it says), ``num_shards`` entries (when given), every file present. Cheap:
  nothing is opened or hashed (:func:`verified` does that)."""
  try:
    manifest = records.read_manifest(folder)
  except records.RecordError:
    return False
  shards = manifest.get("shards", [])
  if manifest.get("complete") is False:
    return False
  if num_shards is not None and len(shards) != num_shards:
    return False
  return bool(shards) and all(
      str(e.get("file", "")).startswith(prefix + "-") and
      os.path.exists(os.path.join(folder, e["file"])) for e in shards)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


class Report:
  """Counts of outcomes by ``section/reason`` tags, with a few example keys per tag.

  Sections: ``tars`` (source files skipped or cut short; the examples are their paths),
  ``skipped`` (no record), ``converted`` (kept, re-encoded as RGB JPEG),
  ``captions_dropped`` (kept, some captions removed), ``notes``; the bare tag ``resized`` counts
  pre-resized images and ``written`` the records written.
  """

  def __init__(self, data: dict[str, Any] | None = None):
    self.counts: collections.Counter = collections.Counter()
    self.examples: dict[str, list[str]] = {}
    if data:
      self.merge(data)

  def add(self, key: str, tags: Iterable[str], n: int = 1) -> None:
    for tag in tags:
      self.counts[tag] += n
      if "/" not in tag:
        continue  # plain tallies (written, resized) need no examples
      ex = self.examples.setdefault(tag, [])
      if len(ex) < _EXAMPLES and key not in ex:
        ex.append(key)

  def merge(self, data: dict[str, Any]) -> None:
    for tag, n in data.get("counts", {}).items():
      self.counts[tag] += n
    for tag, keys in data.get("examples", {}).items():
      ex = self.examples.setdefault(tag, [])
      ex.extend(k for k in keys if k not in ex and len(ex) < _EXAMPLES)

  def to_dict(self) -> dict[str, Any]:
    return {"counts": dict(sorted(self.counts.items())),
            "examples": {t: self.examples[t] for t in sorted(self.examples)}}

  def section(self, name: str) -> dict[str, int]:
    prefix = name + "/"
    return {t[len(prefix):]: n for t, n in sorted(self.counts.items()) if t.startswith(prefix)}

  def summary(self) -> str:
    lines = [f"  written: {self.counts['written']}" +
             (f" ({self.counts['resized']} pre-resized)" if self.counts["resized"] else "")]
    for name in ("tars", "skipped", "converted", "captions_dropped", "notes"):
      part = self.section(name)
      if part:
        lines.append(f"  {name}: {sum(part.values())}")
        for reason, n in part.items():
          ex = ", ".join(self.examples.get(f"{name}/{reason}", [])[:3])
          lines.append(f"    {reason:<22} {n:>9}   e.g. {ex}")
    if len(lines) == 1:
      lines.append("  no bad input")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Writing image shards with resume (convert and the synthetic generator)
# --------------------------------------------------------------------------------------------

# A worker function maps one listed item to (key, packed record or None, report tags).
Outcome = tuple[str, "bytes | None", tuple[str, ...]]


def split_even(items: Sequence[Any], num_shards: int) -> list[Sequence[Any]]:
  """Contiguous, balanced slices: shard i gets items[i*N//n : (i+1)*N//n]."""
  n = len(items)
  return [items[i * n // num_shards:(i + 1) * n // num_shards] for i in range(num_shards)]


def normalise(value: Any) -> Any:
  """``value`` as JSON would read it back (tuples become lists), so that settings compare
  equal to their stored form."""
  return json.loads(json.dumps(value, sort_keys=True))


def _ordered_results(fn: Callable[[Any], Outcome], items: Iterable[Any], workers: int,
                     chunksize: int) -> Iterator[Outcome]:
  if workers <= 1:
    yield from map(fn, items)
    return
  # spawn, not fork: callers (the trainer) may hold JAX threads, which fork would copy broken.
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(workers) as pool:
    yield from pool.imap(fn, items, chunksize=chunksize)


def build_shards(folder: str, shards: Sequence[Sequence[Any]], fn: Callable[[Any], Outcome], *,
                 identity: dict[str, Any], info: dict[str, Any] | None = None,
                 base_report: Report | None = None, workers: int = 1, chunksize: int = 16,
                 progress: bool = True, overwrite: bool = False, desc: str = "images",
                 unit: str = "images",
                 mismatch_hint: str = "use --overwrite or another output folder",
                 error: type[Exception] | None = None,
                 log: Callable[[str], None] = print, prefix: str = records.IMAGES,
                 kind: str = "images",
                 entry_info: Callable[[int], dict[str, Any]] | None = None) -> dict[str, Any]:
  """Writes ``{prefix}-i-of-n`` shards of ``fn(item)`` records into ``folder``, resumably.

  ``identity`` is everything the output depends on (options, a fingerprint of the input): an
  existing manifest with another identity is an error (or discarded with ``overwrite``); with the
  same identity, shards that verify against it are kept. ``error`` is the exception type of the
  caller's refusals (default :class:`ShardSetError`). ``entry_info(i)`` adds fields to shard
  ``i``'s manifest entry (e.g. the SHA-256 of the image shard an embedding shard mirrors).
  Returns the final manifest.
  """
  error = error or ShardSetError
  os.makedirs(folder, exist_ok=True)
  identity = normalise(identity)
  n = len(shards)
  names = [records.shard_name(prefix, i, n) for i in range(n)]
  done: dict[str, dict[str, Any]] = {}
  manifest_path = os.path.join(folder, records.MANIFEST)
  if os.path.exists(manifest_path) and not overwrite:
    old = records.read_manifest(folder)
    check_settings(manifest_path, old.get("identity") or {}, identity, mismatch_hint, error,
                   what="input or options")
    done = verified(folder, old["shards"], names, log)
  # Stale temporaries of a killed run, and shards that no manifest vouches for, are removed.
  for path in glob.glob(os.path.join(glob.escape(folder), f"{prefix}-*.array_record*")):
    name = os.path.basename(path)
    if name in done:
      continue
    if name.endswith(".array_record") and name not in names and not overwrite:
      raise error(f"{path} does not belong to this output ({n} shards); "
                         f"remove it or {mismatch_hint}")
    os.remove(path)

  def manifest(complete: bool) -> dict[str, Any]:
    entries = [done[name] for name in names if name in done]
    total = Report(base_report.to_dict() if base_report else None)
    for e in entries:
      total.merge(e["report"])
    return {**(info or {}), "kind": kind, "identity": identity, "num_shards": n,
            "complete": complete, "shards": entries, "total": sum(e["count"] for e in entries),
            "report": total.to_dict(), "code_version": records.code_version()}

  pending = [i for i in range(n) if names[i] not in done]
  if not pending:
    final = manifest(True)
    old = records.read_manifest(folder) if os.path.exists(manifest_path) else {}
    if not old.get("complete") or any(old.get(k) != final.get(k) for k in ("shards", "report")):
      records.write_manifest(folder, final)
    log(f"{folder}: all {n} shards are complete and verified; nothing to do")
    return records.read_manifest(folder)
  if done:
    log(f"{folder}: resuming; {len(done)} of {n} shards verified and kept, {len(pending)} to write")
  records.write_manifest(folder, manifest(False))

  todo = sum(len(shards[i]) for i in pending)
  bar = None
  if progress:
    from tqdm import tqdm

    bar = tqdm(total=todo, unit="img", desc=desc, smoothing=0.05, dynamic_ncols=True)
  start = time.perf_counter()
  results = _ordered_results(fn, (item for i in pending for item in shards[i]), workers,
                             chunksize)
  try:
    for i in pending:
      report = Report()

      def produce(count=len(shards[i]), report=report):
        for _ in range(count):
          key, record, tags = next(results)
          report.add(key, tags + (("written",) if record is not None else ()))
          if bar is not None:
            bar.update(1)
          if record is not None:
            yield record

      entry = records.write_shard(os.path.join(folder, names[i]), produce(),
                                  records.UNCOMPRESSED)
      entry["items"] = len(shards[i])
      entry["report"] = report.to_dict()
      entry.update(entry_info(i) if entry_info else {})
      done[names[i]] = entry
      records.write_manifest(folder, manifest(i == pending[-1]))
  finally:
    if bar is not None:
      bar.close()
    results.close()  # stops the worker pool if a shard failed
  seconds = time.perf_counter() - start
  final = records.read_manifest(folder)
  final_report = Report(final["report"])
  log(f"{folder}: wrote {len(pending)} of {n} shards, {todo} {unit} in {seconds:.1f} s "
      f"({todo / max(seconds, 1e-9):.0f} {unit}/s); {final['total']} records in all\n"
      f"{final_report.summary()}")
  return final
