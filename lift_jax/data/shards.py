"""Writing a folder of shards resumably, the one way convert, the synthetic generator and the
embedding job do it.

A folder of shards is finished shard by shard; each finished shard has a manifest entry (file,
record count, SHA-256). A re-run

* refuses a folder made with other settings, listing every difference (:func:`check_settings`);
* keeps the shards that verify against their entries and redoes the others (:func:`verified`);
* rewrites ``manifest.json`` after every shard (``records.write_manifest``), ``"complete": false``
  until the last one (:func:`is_complete` tells a finished folder).

Many tasks (a SLURM array, a Kubernetes indexed Job, Beam workers) write one folder together
without waiting for each other: task ``I`` of ``N`` writes the contiguous block of shards
:func:`task_shards` gives it, and the entry of each finished shard goes to its own file in
``manifest.d/`` (:func:`write_part`) beside ``manifest.d/settings.json`` (what the set is made
with). ``manifest.json`` appears only when every shard has its entry, written by the task that
finishes the set or by :func:`finish_set` (``convert --finalize``), so no reader ever takes a
half-made set for a whole one (``records.check_finished`` refuses it).

:func:`build_shards` runs the whole cycle for image shards, on one process or as one task of many
(convert, synthetic); :func:`build_shards_beam` runs it as an Apache Beam pipeline; the embedding
job (``embed.job`` / ``embed.writer``) runs it over many ranks with the same functions.
:class:`Report` counts the per-record outcomes by reason.
"""

from __future__ import annotations

import collections
import glob
import json
import multiprocessing
import os
import shutil
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import msgpack

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
# Sets written by many tasks: manifest parts
# --------------------------------------------------------------------------------------------

SETTINGS = "settings.json"  # in manifest.d/: what the set is made with


def parts_dir(folder: str) -> str:
  return os.path.join(folder, records.PARTS)


def read_json(path: str, error: type[Exception] | None = None) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise (error or ShardSetError)(
        f"{path}: not valid JSON ({e}); delete it to redo what it describes") from None


def write_part(folder: str, entry: Mapping[str, Any]) -> None:
  """Records one finished shard (after the shard itself was renamed into place)."""
  common.write_json_atomic(records.part_path(folder, entry["file"]), dict(entry))


def read_parts(folder: str, error: type[Exception] | None = None) -> dict[str, dict[str, Any]]:
  """{shard file: entry} of every finished shard that has a part in ``manifest.d/``."""
  entries: dict[str, dict[str, Any]] = {}
  pattern = os.path.join(glob.escape(parts_dir(folder)), "*.array_record.json")
  for path in sorted(glob.glob(pattern)):
    entry = read_json(path, error)
    entries[entry["file"]] = entry
  return entries


def task_shards(num_shards: int, task: common.Task) -> range:
  """The shards task ``index`` of ``count`` writes: the contiguous block
  ``[index*n//count, (index+1)*n//count)``, so that each task reads neighbouring inputs. Which
  records a shard holds does not depend on the task count."""
  return range(task.index * num_shards // task.count, (task.index + 1) * num_shards // task.count)


def _set_manifest(settings: Mapping[str, Any], entries: Mapping[str, dict[str, Any]],
                  complete: bool) -> dict[str, Any]:
  """The manifest of an image set: a pure function of its settings and its shards' entries."""
  names = [records.shard_name(settings["prefix"], i, settings["num_shards"])
           for i in range(settings["num_shards"])]
  listed = [entries[name] for name in names if name in entries]
  total = Report(settings["base_report"])
  for e in listed:
    total.merge(e["report"])
  return {**settings["info"], "kind": settings["kind"], "identity": settings["identity"],
          "num_shards": settings["num_shards"], "complete": complete, "shards": listed,
          "total": sum(e["count"] for e in listed), "report": total.to_dict(),
          "code_version": records.code_version()}


def _known_entries(folder: str, error: type[Exception]) -> dict[str, dict[str, Any]]:
  """Entries of an existing manifest.json (a folder copied without its parts, or a run of one
  process that stopped), updated by the parts."""
  known: dict[str, dict[str, Any]] = {}
  if os.path.exists(os.path.join(folder, records.MANIFEST)):
    known = {e["file"]: e for e in records.read_manifest(folder)["shards"]}
  known.update(read_parts(folder, error))
  return known


def finish_set(folder: str, *, verify: bool = False, error: type[Exception] | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes ``manifest.json`` of a set written by many tasks once every shard has its entry.

  Returns the manifest; ``"complete": false`` (and nothing written) while shards are missing.
  ``verify`` checks every shard against its entry (SHA-256, count) and raises ``error`` naming
  each missing or damaged shard instead (``convert --finalize``); without it, only that the
  files exist.
  """
  error = error or ShardSetError
  path = os.path.join(parts_dir(folder), SETTINGS)
  if not os.path.exists(path):
    if verify and is_complete(folder, records.IMAGES):
      log(f"{folder}: {records.MANIFEST} is complete (written by one process); checking it")
      manifest = records.read_manifest(folder)
      bad = [f"{e['file']}: {why}" for e in manifest["shards"]
             if (why := records.verify_shard(folder, e))]
      if bad:
        raise error(f"{folder}: {len(bad)} shards do not match {records.MANIFEST}: "
                    + "; ".join(bad[:5]) + "; re-run the convert command to redo them")
      return manifest
    raise error(f"{folder} holds no set written by tasks ({path} is missing): run the convert "
                "command (with --task_index/--task_count, or on one machine) first")
  settings = read_json(path, error)
  if "identity" not in settings:
    raise error(f"{path} does not describe a set of image shards (an embedding folder?)")
  n = settings["num_shards"]
  names = [records.shard_name(settings["prefix"], i, n) for i in range(n)]
  known = _known_entries(folder, error)
  problems = []
  for name in names:
    entry = known.get(name)
    if entry is None:
      problems.append(f"{name}: not finished")
    elif not os.path.exists(os.path.join(folder, name)):
      problems.append(f"{name}: missing")
    elif verify:
      why = records.verify_shard(folder, entry)
      if why:
        problems.append(f"{name}: {why}")
  if problems:
    if verify:
      raise error(f"{folder}: {len(problems)} of {n} shards are not finished or do not match their "
                  f"entries ({'; '.join(problems[:5])}{'; ...' if len(problems) > 5 else ''}); "
                  "re-run the tasks that own them (the same convert command with their "
                  "--task_index), then --finalize again")
    return _set_manifest(settings, known, False)
  manifest = _set_manifest(settings, known, True)
  old = records.read_manifest(folder) if os.path.exists(
      os.path.join(folder, records.MANIFEST)) else {}
  if not old.get("complete") or any(old.get(k) != manifest[k] for k in ("shards", "report",
                                                                          "identity")):
    records.write_manifest(folder, manifest)
    log(f"{folder}: all {n} shards are finished; wrote {records.MANIFEST}")
  return records.read_manifest(folder)


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


def write_image_shard(path: str, outcomes: Iterator[Outcome], count: int,
                      on_item: Callable[[], None] | None = None) -> dict[str, Any]:
  """Writes the records among the next ``count`` outcomes to ``path`` (atomically); returns its
  manifest entry with the number of items and their report."""
  report = Report()

  def produce():
    for _ in range(count):
      key, record, tags = next(outcomes)
      report.add(key, tags + (("written",) if record is not None else ()))
      if on_item is not None:
        on_item()
      if record is not None:
        yield record

  entry = records.write_shard(path, produce(), records.UNCOMPRESSED)
  entry["items"] = count
  entry["report"] = report.to_dict()
  return entry


def _settings(kind: str, prefix: str, num_shards: int, identity: dict[str, Any],
              info: dict[str, Any] | None, base_report: Report | None) -> dict[str, Any]:
  """What a set is made with (``manifest.d/settings.json``): with the shards' entries, all that
  its manifest is made of."""
  return {"kind": kind, "prefix": prefix, "num_shards": num_shards,
          "identity": normalise(identity), "info": normalise(info or {}),
          "base_report": (base_report or Report()).to_dict()}


def _prepare(folder: str, settings: dict[str, Any], mine: Sequence[int], many: bool,
             task_count: int, overwrite: bool, hint: str, error: type[Exception],
             log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
  """Checks ``folder`` against ``settings``, removes what a killed run of these shards left, and
  returns the entries of the shards among ``mine`` that verify (kept) and of other tasks'."""
  os.makedirs(folder, exist_ok=True)
  prefix, n = settings["prefix"], settings["num_shards"]
  names = [records.shard_name(prefix, i, n) for i in range(n)]
  manifest_path = os.path.join(folder, records.MANIFEST)
  settings_path = os.path.join(parts_dir(folder), SETTINGS)
  if overwrite:
    if task_count > 1:
      raise error(f"--overwrite with {task_count} tasks: each would delete what the others "
                  f"wrote. Remove {folder} (or use another output folder) and start the tasks "
                  "again")
    if os.path.exists(manifest_path):
      os.remove(manifest_path)
    shutil.rmtree(parts_dir(folder), ignore_errors=True)
  old_manifest = records.read_manifest(folder) if os.path.exists(manifest_path) else None
  old_settings = read_json(settings_path, error) if os.path.exists(settings_path) else None
  for where, old in ((manifest_path, old_manifest), (settings_path, old_settings)):
    if old is not None:
      check_settings(where, old.get("identity") or {}, settings["identity"], hint, error,
                     what="input or options")
  known = {e["file"]: e for e in old_manifest["shards"]} if old_manifest else {}
  if many:
    known.update(read_parts(folder, error))
  mine_names = {names[i] for i in mine}
  kept = verified(folder, [known[name] for name in names if name in mine_names and name in known],
                  names, log)
  if many:
    os.makedirs(parts_dir(folder), exist_ok=True)
    if not os.path.exists(settings_path):
      common.write_json_atomic(settings_path, settings)
    for name, entry in kept.items():
      if not os.path.exists(records.part_path(folder, name)):
        write_part(folder, entry)  # a shard of an earlier one-process run, adopted
  # Stale temporaries of a killed run, and shards that no entry vouches for, are removed (a
  # task touches only its own shards: the others may be being written right now).
  for path in glob.glob(os.path.join(glob.escape(folder), f"{prefix}-*.array_record*")):
    name = os.path.basename(path)
    shard = name.split(".tmp-")[0]
    if name in kept or (many and shard in names and shard not in mine_names):
      continue
    if name.endswith(".array_record") and name not in names and not overwrite:
      raise error(f"{path} does not belong to this output ({n} shards); remove it or {hint}")
    os.remove(path)
  others = {name: e for name, e in known.items() if name in names and name not in mine_names}
  return {**others, **kept}


def build_shards(folder: str, shards: Sequence[Sequence[Any]], fn: Callable[[Any], Outcome], *,
                 identity: dict[str, Any], info: dict[str, Any] | None = None,
                 base_report: Report | None = None, workers: int = 1, chunksize: int = 16,
                 progress: bool = True, overwrite: bool = False, desc: str = "images",
                 unit: str = "images",
                 mismatch_hint: str = "use --overwrite or another output folder",
                 error: type[Exception] | None = None,
                 log: Callable[[str], None] = print, prefix: str = records.IMAGES,
                 kind: str = "images",
                 entry_info: Callable[[int], dict[str, Any]] | None = None,
                 task: common.Task | None = None) -> dict[str, Any]:
  """Writes ``{prefix}-i-of-n`` shards of ``fn(item)`` records into ``folder``, resumably.

  ``identity`` is everything the output depends on (options, a fingerprint of the input): an
  existing manifest with another identity is an error (or discarded with ``overwrite``); with the
  same identity, shards that verify against it are kept. ``error`` is the exception type of the
  caller's refusals (default :class:`ShardSetError`). ``entry_info(i)`` adds fields to shard
  ``i``'s manifest entry (e.g. the SHA-256 of the image shard an embedding shard mirrors).

  ``task`` (or a ``manifest.d/`` already in ``folder``) makes this run one task of many: it
  writes only :func:`task_shards` and their parts, and ``manifest.json`` once the whole set is
  there (see the module docstring). Returns the manifest (``"complete": false`` while other
  tasks' shards are missing).
  """
  error = error or ShardSetError
  n = len(shards)
  settings = _settings(kind, prefix, n, identity, info, base_report)
  many = task is not None or (os.path.isdir(parts_dir(folder)) and not overwrite)
  task = task or common.Task()
  mine = task_shards(n, task) if many else range(n)
  names = [records.shard_name(prefix, i, n) for i in range(n)]
  done = _prepare(folder, settings, mine, many, task.count, overwrite, mismatch_hint, error, log)
  who = f"task {task.index} of {task.count}: " if task.count > 1 else ""
  pending = [i for i in mine if names[i] not in done]
  if not pending:
    if many:
      manifest = finish_set(folder, error=error, log=log)
      log(f"{folder}: {who}its {len(mine)} shards are complete and verified; "
          + _set_state(manifest))
      return manifest
    final = _set_manifest(settings, done, True)
    old = records.read_manifest(folder) if os.path.exists(
        os.path.join(folder, records.MANIFEST)) else {}
    if not old.get("complete") or any(old.get(k) != final.get(k) for k in ("shards", "report")):
      records.write_manifest(folder, final)
    log(f"{folder}: all {n} shards are complete and verified; nothing to do")
    return records.read_manifest(folder)
  kept = len(mine) - len(pending)
  if kept:
    log(f"{folder}: {who}resuming; {kept} of {len(mine)} shards verified and kept, "
        f"{len(pending)} to write")
  if not many:
    records.write_manifest(folder, _set_manifest(settings, done, False))

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
      entry = write_image_shard(os.path.join(folder, names[i]), results, len(shards[i]),
                                (lambda: bar.update(1)) if bar is not None else None)
      entry.update(entry_info(i) if entry_info else {})
      done[names[i]] = entry
      if many:
        write_part(folder, entry)
      else:
        records.write_manifest(folder, _set_manifest(settings, done, i == pending[-1]))
  finally:
    if bar is not None:
      bar.close()
    results.close()  # stops the worker pool if a shard failed
  seconds = time.perf_counter() - start
  mine_report = Report()
  for i in pending:
    mine_report.merge(done[names[i]]["report"])
  final = finish_set(folder, error=error, log=log) if many else records.read_manifest(folder)
  log(f"{folder}: {who}wrote {len(pending)} of {n} shards, {todo} {unit} in {seconds:.1f} s "
      f"({todo / max(seconds, 1e-9):.0f} {unit}/s)" + (
          f"; {final['total']} records in all\n{Report(final['report']).summary()}"
          if final["complete"] else f"\n{mine_report.summary()}\n" + _set_state(final)))
  return final


def _set_state(manifest: Mapping[str, Any]) -> str:
  if manifest["complete"]:
    return f"the set is complete ({manifest['total']} records)"
  return (f"{len(manifest['shards'])} of {manifest['num_shards']} shards of the set are finished; "
          f"{records.MANIFEST} is written by the task that finishes the last one (or by "
          "python -m lift_jax.data.convert --finalize --output=DIR)")


# --------------------------------------------------------------------------------------------
# The same set as an Apache Beam pipeline
# --------------------------------------------------------------------------------------------

PLANS = "plan"  # in manifest.d/: the items of each shard still to write, for Beam's workers


def _plan_path(folder: str, shard_file: str) -> str:
  return os.path.join(parts_dir(folder), PLANS, shard_file + ".msgpack")


def _beam_write_shard(index: int, folder: str, prefix: str, num_shards: int,
                      fn: Callable[[Any], Outcome]) -> str:
  """One Beam element: a whole shard, written with the writer of :func:`build_shards` (records
  in listing order whatever Beam's bundling, retries or worker count), then its part."""
  name = records.shard_name(prefix, index, num_shards)
  with open(_plan_path(folder, name), "rb") as f:
    items = msgpack.unpackb(f.read(), raw=False)
  entry = write_image_shard(os.path.join(folder, name), map(fn, items), len(items))
  write_part(folder, entry)
  return name


def _beam_finish(count: int, folder: str) -> int:
  finish_set(folder, log=lambda message: None)
  return count


def build_shards_beam(folder: str, shards: Sequence[Sequence[Any]], fn: Callable[[Any], Outcome],
                      *, runner: str, beam_options: Sequence[str] = (),
                      identity: dict[str, Any], info: dict[str, Any] | None = None,
                      base_report: Report | None = None, overwrite: bool = False,
                      mismatch_hint: str = "use --overwrite or another output folder",
                      error: type[Exception] | None = None, log: Callable[[str], None] = print,
                      prefix: str = records.IMAGES, kind: str = "images") -> dict[str, Any]:
  """:func:`build_shards` as an Apache Beam pipeline on ``runner`` (``DirectRunner`` here;
  Dataflow, Flink or Spark with Beam's own ``beam_options``): the same shard files and manifest.

  This process lists nothing itself (the caller did), checks and cleans the folder as a task
  would, and writes the items of each unfinished shard to ``manifest.d/plan/``; the pipeline has
  one element per unfinished shard, each written whole by one worker (so its bytes do not depend
  on how the runner bundles or retries), and a last step that writes ``manifest.json``. The
  output folder must be one file system that this process and every worker see (the inputs too:
  items name their files). Shards already finished are kept, as on a re-run of a task.
  """
  import apache_beam as beam  # an optional extra (pip install -e '.[beam]'); import takes ~4 s
  from apache_beam.options.pipeline_options import PipelineOptions

  error = error or ShardSetError
  n = len(shards)
  settings = _settings(kind, prefix, n, identity, info, base_report)
  names = [records.shard_name(prefix, i, n) for i in range(n)]
  done = _prepare(folder, settings, range(n), True, 1, overwrite, mismatch_hint, error, log)
  pending = [i for i in range(n) if names[i] not in done]
  if not pending:
    final = finish_set(folder, error=error, log=log)
    log(f"{folder}: all {n} shards are complete and verified; nothing to do")
    return final
  plans = os.path.join(parts_dir(folder), PLANS)
  shutil.rmtree(plans, ignore_errors=True)
  os.makedirs(plans)
  for i in pending:
    common.write_bytes_atomic(_plan_path(folder, names[i]),
                              msgpack.packb([list(item) for item in shards[i]], use_bin_type=True))
  log(f"{folder}: Beam ({runner}) writes {len(pending)} of {n} shards"
      + (f"; {n - len(pending)} verified and kept" if len(pending) < n else ""))
  start = time.perf_counter()
  options = PipelineOptions([f"--runner={runner}", *beam_options])
  with beam.Pipeline(options=options) as pipeline:
    _ = (pipeline
         | "shards" >> beam.Create(pending)
         | "spread" >> beam.Reshuffle()
         | "write" >> beam.Map(_beam_write_shard, folder, prefix, n, fn)
         | "count" >> beam.combiners.Count.Globally()
         | "manifest" >> beam.Map(_beam_finish, folder))
  shutil.rmtree(plans, ignore_errors=True)
  final = finish_set(folder, error=error, log=log)
  todo = sum(len(shards[i]) for i in pending)
  seconds = time.perf_counter() - start
  log(f"{folder}: Beam wrote {len(pending)} of {n} shards, {todo} images in {seconds:.1f} s "
      f"({todo / max(seconds, 1e-9):.0f} images/s); " + _set_state(final)
      + (f"\n{Report(final['report']).summary()}" if final["complete"] else ""))
  return final
