"""Builds image shards (``images-XXXXX-of-YYYYY.array_record`` + ``manifest.json``) from raw pairs.

    python -m lift_jax.data.convert --output=DIR --tars='shards/*.tar' \
        [--extra_captions=recap.parquet]
    python -m lift_jax.data.convert --output=DIR --images=IMAGES_DIR --captions=captions.tsv

Sources
-------
* webdataset tars as img2dataset writes them: members ``KEY.jpg|jpeg|png|webp|...``, ``KEY.txt``,
  ``KEY.json``. The key is the member path up to the first dot of its file name (webdataset's
  rule). The caption comes from ``KEY.txt`` (``--caption_source=txt``) or from a field of
  ``KEY.json`` (``--caption_source=json:caption``). ``--extra_captions`` names parquet files whose
  rows are joined to the samples by ``--join_field`` (the sample key, or a field of ``KEY.json``
  such as ``uid``); ``--extra_fields=re_caption:recaption`` copies the parquet column
  ``re_caption`` into the record field ``recaption`` (Recap-DataComp's long captions). Tars must be
  uncompressed (img2dataset's default): members are read by offset, in parallel.
* an image folder plus a captions file read by :func:`eval.texts.read_captions` (TSV
  ``filename<TAB>caption_index<TAB>caption``, CSV with ``filename``/``caption`` columns, JSONL,
  COCO ``captions_*.json``). File names in the captions file are paths relative to the folder.
  The key is that relative path without its extension (``sub/img001``). Records keep every caption:
  ``caption`` is the first, ``captions`` the list of all in file order.

Records (msgpack maps, see :mod:`lift_jax.data.records`)
--------------------------------------------------------
``key``, ``image`` (the source bytes unchanged, or a JPEG when the image was resized or converted),
``caption``; folder sources add ``captions``; tars add the ``--extra_fields`` targets (e.g.
``recaption``) and any ``--json_fields`` copied from ``KEY.json`` (e.g. ``uid``, ``url``).
Shards are written without ArrayRecord compression (``records.UNCOMPRESSED``): image bytes are
compressed already.

Order, shards, resume
---------------------
Samples are listed in a fixed order (folders: sorted by key; tars: tar files in the order given,
globs sorted, members in tar order) and shard ``i`` of ``n`` takes the contiguous slice
``[i*N//n, (i+1)*N//n)`` of the N listed samples. Output does not depend on the worker count.
After every finished shard the manifest is rewritten (``"complete": false`` until the end), so a
re-run of the same command keeps the shards whose count and SHA-256 match the manifest, redoes the
rest, and ends byte-identical to an uninterrupted run. A re-run with other options or other input
is refused unless ``--overwrite`` is given.

Bad input (counted by reason, printed, stored in the manifest)
--------------------------------------------------------------
``manifest["report"]`` is ``{"counts": {"written": n, "resized": n, "skipped/zero_byte": n,
"converted/cmyk": n, ...}, "examples": {"skipped/zero_byte": [up to 5 keys], ...}}`` over the
whole run; each shard entry (``file``, ``count``, ``sha256``) carries its own ``report`` too.
Skipped (no record written): ``zero_byte``, ``unreadable_image`` (undecodable or truncated),
``too_small`` (shorter side < ``--min_image_size``), ``extreme_aspect`` (longer/shorter side >
``--max_aspect_ratio``), ``missing_caption`` (absent or blank), ``undecodable_caption`` (not
UTF-8), ``bad_json``, ``missing_image`` (a caption or sidecar without an image),
``duplicate_key`` (every occurrence of a key after the first: a later tar, or ``a.png`` beside
``a.jpg`` in a folder, where the first in sorted order is kept), ``missing_extra_caption``.
Converted to RGB and re-encoded as JPEG at ``--jpeg_quality`` (kept): ``cmyk``, ``16bit``, ``palette``, ``alpha``
(composited on white), ``grayscale``, ``other_mode``, ``format`` (RGB but not JPEG/PNG/WebP).
Dropped captions of kept images (folder sources): ``empty``, ``undecodable``.
EXIF orientation is not applied (as in the reference loader); animated images keep frame one.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import hashlib
import io
import json
import math
import multiprocessing
import os
import posixpath
import sys
import tarfile
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from PIL import Image

from lift_jax import cli
from lift_jax.data import records
from lift_jax.data import transforms

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_KEPT_FORMATS = ("JPEG", "PNG", "WEBP")  # stored as found; others are re-encoded
_EXAMPLES = 5  # example keys kept per reason in reports
SAMPLES_PER_SHARD = 10_000  # --num_shards=0 picks ceil(N / this)


@cli.user_error
class ConvertError(ValueError):
  """The input or the output folder is not usable; the message names the file or key."""


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


class Report:
  """Counts of outcomes by ``section/reason`` tags, with a few example keys per tag.

  Sections: ``skipped`` (no record), ``converted`` (kept, re-encoded as RGB JPEG),
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
    for name in ("skipped", "converted", "captions_dropped", "notes"):
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
# Sharded writing with resume (shared with the synthetic generator)
# --------------------------------------------------------------------------------------------

# A worker function maps one listed item to (key, packed record or None, report tags).
Outcome = tuple[str, "bytes | None", tuple[str, ...]]


def split_even(items: Sequence[Any], num_shards: int) -> list[Sequence[Any]]:
  """Contiguous, balanced slices: shard i gets items[i*N//n : (i+1)*N//n]."""
  n = len(items)
  return [items[i * n // num_shards:(i + 1) * n // num_shards] for i in range(num_shards)]


def _normalise(value: Any) -> Any:
  return json.loads(json.dumps(value, sort_keys=True))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
  """'key: old -> new' for every (nested) setting that differs."""
  old, new = _flatten(old), _flatten(new)
  keys = sorted(set(old) | set(new))
  diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
  return "; ".join(d if len(d) < 200 else d[:200] + "..." for d in diffs)


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
                 log: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes ``images-i-of-n`` shards of ``fn(item)`` records into ``folder``, resumably.

  ``identity`` is everything the output depends on (options, a fingerprint of the input): an
  existing manifest with another identity is an error (or discarded with ``overwrite``); with the
  same identity, shards that verify against it are kept. Returns the final manifest.
  """
  os.makedirs(folder, exist_ok=True)
  identity = _normalise(identity)
  n = len(shards)
  names = [records.shard_name(records.IMAGES, i, n) for i in range(n)]
  done: dict[str, dict[str, Any]] = {}
  manifest_path = os.path.join(folder, records.MANIFEST)
  if os.path.exists(manifest_path) and not overwrite:
    old = records.read_manifest(folder)
    if old.get("identity") != identity:
      raise ConvertError(
          f"{manifest_path} was made from other input or options "
          f"({_differences(old.get('identity') or {}, identity)}); {mismatch_hint}")
    for entry in old["shards"]:
      problem = records.verify_shard(folder, entry) if entry.get("file") in names else "unexpected"
      if problem is None:
        done[entry["file"]] = entry
      else:
        log(f"{os.path.join(folder, entry['file'])}: {problem}; it is written again")
  # Stale temporaries of a killed run, and shards that no manifest vouches for, are removed.
  for path in glob.glob(os.path.join(glob.escape(folder), f"{records.IMAGES}-*.array_record*")):
    name = os.path.basename(path)
    if name in done:
      continue
    if name.endswith(".array_record") and name not in names and not overwrite:
      raise ConvertError(f"{path} does not belong to this output ({n} shards); "
                         f"remove it or {mismatch_hint}")
    os.remove(path)

  def manifest(complete: bool) -> dict[str, Any]:
    entries = [done[name] for name in names if name in done]
    total = Report(base_report.to_dict() if base_report else None)
    for e in entries:
      total.merge(e["report"])
    return {**(info or {}), "kind": "images", "identity": identity, "num_shards": n,
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


# --------------------------------------------------------------------------------------------
# Options and per-image work
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
  """Conversion options; all of them but ``workers`` decide the output bytes."""
  num_shards: int = 0
  resize: int = 0
  jpeg_quality: int = 95
  min_image_size: int = 32
  max_aspect_ratio: float = 10.0
  caption_source: str = "txt"
  extra_fields: tuple[tuple[str, str], ...] = (("re_caption", "recaption"),)
  join_field: str = "key"
  json_fields: tuple[str, ...] = ()
  limit: int = 0

  def output_options(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _conversion(img: Image.Image, data: bytes) -> str | None:
  """Why an image must be converted to an RGB JPEG, or None when its bytes can be kept."""
  mode = img.mode
  if mode == "CMYK":
    return "cmyk"
  if mode.startswith("I;16") or mode == "I" or (img.format == "PNG" and len(data) > 24
                                                 and data[24] == 16):
    return "16bit"  # PIL opens 16-bit RGB(A) PNGs as 8-bit modes; the header tells the truth
  if mode in ("P", "PA"):
    return "palette"
  if mode in ("RGBA", "LA", "La", "RGBa"):
    return "alpha"
  if mode in ("L", "1"):
    return "grayscale"
  if mode != "RGB":
    return "other_mode"
  if img.format not in _KEPT_FORMATS:
    return "format"
  return None


_TAR_HANDLES: dict[str, Any] = {}  # open tars of this process, so members are not reopened


def _read(loc: tuple) -> bytes:
  if loc[0] == "file":
    with open(loc[1], "rb") as f:
      return f.read()
  _, path, offset, size = loc
  f = _TAR_HANDLES.get(path)
  if f is None:
    if len(_TAR_HANDLES) >= 16:
      for handle in _TAR_HANDLES.values():
        handle.close()
      _TAR_HANDLES.clear()
    f = _TAR_HANDLES[path] = open(path, "rb")
  f.seek(offset)
  data = f.read(size)
  if len(data) != size:
    raise OSError(f"{path}: member at offset {offset} is cut short")
  return data


def process_item(opts: Options, item: tuple[str, tuple, dict[str, Any]]) -> Outcome:
  """Reads, judges and (if needed) re-encodes one image; returns its record or why it was not."""
  key, loc, fields = item
  try:
    data = _read(loc)
  except OSError:
    return key, None, ("skipped/unreadable_image",)
  if not data:
    return key, None, ("skipped/zero_byte",)
  try:
    img = transforms.open_image(data)
  except transforms.DecodeError:
    return key, None, ("skipped/unreadable_image",)
  w, h = img.size
  if min(w, h) <= 0:
    return key, None, ("skipped/unreadable_image",)
  if max(w, h) / min(w, h) > opts.max_aspect_ratio:
    return key, None, ("skipped/extreme_aspect",)
  if min(w, h) < opts.min_image_size:
    return key, None, ("skipped/too_small",)
  reason = _conversion(img, data)
  resize = bool(opts.resize) and min(w, h) > opts.resize
  tags: tuple[str, ...] = ()
  try:
    if reason is None and not resize:
      # Only a check that the whole file decodes; for a JPEG the 1/8 DCT scale is enough.
      transforms.load(img, min_size=1)
    else:
      rgb = transforms.to_rgb(transforms.load(img, min_size=opts.resize if resize else None))
      if resize:
        s = opts.resize
        size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        rgb = rgb.resize(size, Image.BICUBIC)
        tags += ("resized",)
      if reason:
        tags += (f"converted/{reason}",)
      buf = io.BytesIO()
      rgb.save(buf, "JPEG", quality=opts.jpeg_quality)
      data = buf.getvalue()
  except (transforms.DecodeError, OSError, ValueError):
    return key, None, ("skipped/unreadable_image",)
  return key, records.image_record(key, data, **fields), tags


# --------------------------------------------------------------------------------------------
# Listing: folder + captions file
# --------------------------------------------------------------------------------------------


def _strip_ext(rel: str) -> str:
  stem, _ = posixpath.splitext(rel)
  return stem


def _clean_caption_file(path: str) -> tuple[str, list[str]]:
  """``path``, or a temporary copy without its lines that are not UTF-8, and the keys of the
  images those lines belonged to (as far as the damaged line still tells)."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    raw.decode("utf-8")
    return path, []
  except UnicodeDecodeError as e:
    if path.lower().endswith(".json"):
      raise ConvertError(f"{path}: not UTF-8 at byte {e.start}; a JSON file must be") from None
  good, dropped = [], []
  for n, line in enumerate(raw.splitlines(keepends=True)):
    try:
      line.decode("utf-8")
      good.append(line)
      continue
    except UnicodeDecodeError:
      pass
    text = line.decode("utf-8", "replace")
    name = ""
    if path.lower().endswith(".jsonl"):
      try:
        r = json.loads(text)
        name = str(r.get("filename", r.get("image", "")))
      except (json.JSONDecodeError, AttributeError):
        pass
    else:
      name = text.split("\t" if "\t" in text else ",")[0].strip()
    dropped.append(_strip_ext(posixpath.normpath(name)) if name else f"{path} line {n + 1}")
  tmp = tempfile.NamedTemporaryFile("wb", delete=False, suffix="-" + os.path.basename(path))
  with tmp:
    tmp.write(b"".join(good))
  return tmp.name, dropped


def list_folder(images: str, captions: str, opts: Options
                ) -> tuple[list[tuple[str, tuple, dict[str, Any]]], Report, str]:
  """Items (key, location, record fields), the listing's report and a fingerprint of the input."""
  from eval import texts

  if not os.path.isdir(images):
    raise ConvertError(f"--images={images} is not a folder")
  if not os.path.exists(captions):
    raise ConvertError(f"--captions={captions} does not exist")
  report = Report()
  clean, undecodable = _clean_caption_file(captions)
  try:
    caps = texts.read_captions(clean)
  except (ValueError, KeyError, IndexError) as e:
    raise ConvertError(f"{captions}: cannot read captions ({e})") from None
  finally:
    if clean != captions:
      os.remove(clean)
  for key in undecodable:
    report.add(key, ("captions_dropped/undecodable",))
  undecodable_keys = set(undecodable)

  files: dict[str, str] = {}
  for root, dirs, names in os.walk(images):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in names:
      ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
      if ext in IMAGE_EXTENSIONS and not name.startswith("."):
        path = os.path.join(root, name)
        files[os.path.relpath(path, images).replace(os.sep, "/")] = path
  named = {posixpath.normpath(name.replace("\\", "/")): c for name, c in caps.items()}

  by_key: dict[str, list[str]] = collections.defaultdict(list)
  for rel in set(files) | set(named):
    by_key[_strip_ext(rel)].append(rel)
  keys = sorted(by_key)
  if opts.limit:
    keys = keys[:opts.limit]
  items = []
  h = hashlib.sha256()
  for key in keys:
    with_image = [r for r in sorted(by_key[key]) if r in files]
    if not with_image:
      report.add(key, ("skipped/missing_image",))
      continue
    rel = with_image[0]
    for _ in with_image[1:]:
      report.add(key, ("skipped/duplicate_key",))
    raw_caps = named.get(rel, [])
    good = [c.strip() for c in raw_caps if c and c.strip()]
    if len(good) < len(raw_caps):
      report.add(key, ("captions_dropped/empty",), len(raw_caps) - len(good))
    if not good:
      report.add(key, ("skipped/undecodable_caption",) if key in undecodable_keys
                 else ("skipped/missing_caption",))
      continue
    fields = {"caption": good[0], "captions": good}
    size = os.path.getsize(files[rel])
    h.update(json.dumps([key, rel, size, good], ensure_ascii=False).encode())
    items.append((key, ("file", files[rel]), fields))
  return items, report, h.hexdigest()


# --------------------------------------------------------------------------------------------
# Listing: webdataset tars
# --------------------------------------------------------------------------------------------


def load_extra_captions(paths: Sequence[str], join_field: str, columns: Sequence[str],
                        report: Report) -> dict[str, tuple]:
  """{join value (as str): (column values...)} from parquet files; repeated join values keep the
  first row and are counted under ``notes/duplicate_extra_row``."""
  import pyarrow.parquet as pq

  table: dict[str, tuple] = {}
  for path in paths:
    try:
      t = pq.read_table(path, columns=[join_field, *columns])
    except Exception as e:
      raise ConvertError(f"{path}: cannot read columns {[join_field, *columns]} ({e})") from None
    cols = [t.column(c).to_pylist() for c in (join_field, *columns)]
    for row in zip(*cols):
      k = str(row[0])
      if k in table:
        report.add(k, ("notes/duplicate_extra_row",))
      else:
        table[k] = row[1:]
  return table


def _sample_fields(key: str, group: dict[str, tarfile.TarInfo], tf: tarfile.TarFile,
                   opts: Options, extra: dict[str, tuple] | None
                   ) -> tuple[dict[str, Any] | None, str | None]:
  """The record fields of one tar sample, or why it is skipped."""
  json_field = opts.caption_source[5:] if opts.caption_source.startswith("json:") else None
  meta: dict[str, Any] = {}
  if "json" in group and (json_field or opts.json_fields or
                          (extra is not None and opts.join_field != "key")):
    try:
      meta = json.loads(tf.extractfile(group["json"]).read())
    except UnicodeDecodeError:
      return None, "undecodable_caption" if json_field else "bad_json"
    except json.JSONDecodeError:
      return None, "bad_json"
    if not isinstance(meta, dict):
      return None, "bad_json"
  if json_field is None:
    if "txt" not in group:
      return None, "missing_caption"
    try:
      caption = tf.extractfile(group["txt"]).read().decode("utf-8").strip()
    except UnicodeDecodeError:
      return None, "undecodable_caption"
  else:
    value = meta.get(json_field)
    caption = value.strip() if isinstance(value, str) else ""
  if not caption:
    return None, "missing_caption"
  fields: dict[str, Any] = {"caption": caption}
  if extra is not None:
    join = key if opts.join_field == "key" else meta.get(opts.join_field)
    row = extra.get(str(join)) if join is not None else None
    values = [v.strip() if isinstance(v, str) else v for v in (row or ())]
    if row is None or any(v is None or v == "" for v in values):
      return None, "missing_extra_caption"
    for (_, target), v in zip(opts.extra_fields, values):
      fields[target] = v
  for name in opts.json_fields:
    if name in meta:
      fields[name] = meta[name]
  return fields, None


def list_webdataset(tars: Sequence[str], opts: Options, extra: dict[str, tuple] | None
                    ) -> tuple[list[tuple[str, tuple, dict[str, Any]]], Report, str]:
  """Items (key, location, record fields), the listing's report and a fingerprint of the input."""
  if opts.caption_source != "txt" and not opts.caption_source.startswith("json:"):
    raise ConvertError(f"--caption_source={opts.caption_source}: expected 'txt' or 'json:FIELD'")
  report = Report()
  items = []
  seen: set[str] = set()
  listed = 0
  h = hashlib.sha256()
  for tar_path in tars:
    if opts.limit and listed >= opts.limit:
      break
    try:
      tf = tarfile.open(tar_path, "r:")  # "r:" refuses compressed tars: members are read by offset
    except tarfile.ReadError as e:
      raise ConvertError(
          f"{tar_path}: not an uncompressed tar ({e}); decompress it first") from None
    with tf:
      groups: dict[str, dict[str, tarfile.TarInfo]] = {}
      for m in tf:
        if not m.isfile():
          continue
        dirname, base = posixpath.split(m.name)
        dot = base.find(".")
        if dot <= 0:
          continue
        key = posixpath.join(dirname, base[:dot])
        group = groups.setdefault(key, {})
        ext = base[dot + 1:].lower()
        if ext in group:
          report.add(key, ("skipped/duplicate_key",))  # the same member twice in one tar
        else:
          group[ext] = m
      for key, group in groups.items():
        if opts.limit and listed >= opts.limit:
          break
        listed += 1
        images = [e for e in IMAGE_EXTENSIONS if e in group]
        if not images:
          report.add(key, ("skipped/missing_image",))
          continue
        if key in seen:
          report.add(key, ("skipped/duplicate_key",))
          continue
        seen.add(key)
        for _ in images[1:]:
          report.add(key, ("skipped/duplicate_key",))  # KEY.jpg and KEY.png: which is meant?
        fields, reason = _sample_fields(key, group, tf, opts, extra)
        if reason is not None:
          report.add(key, (f"skipped/{reason}",))
          continue
        img = group[images[0]]
        h.update(json.dumps([key, img.size, fields], ensure_ascii=False, sort_keys=True,
                            default=str).encode())
        items.append((key, ("tar", os.path.abspath(tar_path), img.offset_data, img.size), fields))
  return items, report, h.hexdigest()


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _expand(patterns: Sequence[str], what: str) -> list[str]:
  paths: list[str] = []
  for pattern in patterns:
    found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not found or not all(os.path.exists(p) for p in found):
      raise ConvertError(f"{what} {pattern}: no such file")
    paths.extend(p for p in found if p not in paths)
  return paths


def convert(output: str, *, tars: Sequence[str] = (), images: str | None = None,
            captions: str | None = None, extra_captions: Sequence[str] = (),
            options: Options = Options(), workers: int | None = None, progress: bool = True,
            overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Converts webdataset ``tars``, or an ``images`` folder with a ``captions`` file.

  Returns the manifest; see the module docstring for the options and the report.
  """
  if bool(tars) == bool(images):
    raise ConvertError("give either tars or an image folder (with a captions file), not both")
  listing_start = time.perf_counter()
  if tars:
    tar_paths = _expand(tars, "tar")
    report = Report()
    extra = None
    if extra_captions:
      columns = [c for c, _ in options.extra_fields]
      extra = load_extra_captions(_expand(extra_captions, "parquet"), options.join_field, columns,
                                  report)
    items, listing, fingerprint = list_webdataset(tar_paths, options, extra)
    listing.merge(report.to_dict())
    source = {"type": "webdataset", "tars": [os.path.abspath(p) for p in tar_paths],
              "extra_captions": [os.path.abspath(p) for p in _expand(extra_captions, "parquet")]
              if extra_captions else []}
    fields = ["key", "image", "caption"] + [t for _, t in options.extra_fields if extra_captions]
    fields += list(options.json_fields)
  else:
    if not captions:
      raise ConvertError("an image folder needs --captions")
    items, listing, fingerprint = list_folder(images, captions, options)
    source = {"type": "folder", "images": os.path.abspath(images),
              "captions": os.path.abspath(captions)}
    fields = ["key", "image", "caption", "captions"]
  listed = len(items) + sum(listing.section("skipped").values())
  log(f"listed {listed} samples in {time.perf_counter() - listing_start:.1f} s: {len(items)} to "
      f"convert, {listed - len(items)} skipped while listing")
  num_shards = options.num_shards or max(1, math.ceil(len(items) / SAMPLES_PER_SHARD))
  if not items:
    raise ConvertError(f"nothing to convert from {source}:\n{listing.summary()}")
  shards = split_even(items, num_shards)
  identity = {"options": {**options.output_options(), "num_shards": num_shards},
              "input_sha256": fingerprint, "items": len(items)}
  info = {"source": source, "fields": fields, "options": identity["options"]}
  return build_shards(
      output, shards, functools.partial(process_item, options), identity=identity, info=info,
      base_report=listing, workers=workers if workers is not None else (os.cpu_count() or 1),
      chunksize=16, progress=progress, overwrite=overwrite, log=log)


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m lift_jax.data.convert",
      description="Build lift_jax image shards (images-XXXXX-of-YYYYY.array_record + "
                  "manifest.json) from webdataset tars or an image folder with a captions file. "
                  "Re-running the same command resumes.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--output", required=True, help="output folder for shards and manifest.json")
  src = p.add_argument_group("source (tars, or images + captions)")
  src.add_argument("--tars", action="append", default=[],
                   help="webdataset tar file or glob; repeatable or comma-separated")
  src.add_argument("--images", help="image folder (searched recursively)")
  src.add_argument("--captions", help="captions file: TSV, CSV, JSONL or COCO captions_*.json")
  src.add_argument("--caption_source", default="txt",
                   help="tars: 'txt' (KEY.txt) or 'json:FIELD' (a field of KEY.json)")
  src.add_argument("--extra_captions", action="append", default=[],
                   help="tars: parquet file(s) or glob of extra captions joined by --join_field")
  src.add_argument("--extra_fields", default="re_caption:recaption",
                   help="COLUMN:FIELD[,COLUMN:FIELD]: parquet columns copied into record fields")
  src.add_argument("--join_field", default="key",
                   help="parquet column matched to the sample key ('key') or to that field of "
                        "KEY.json (e.g. uid)")
  src.add_argument("--json_fields", default="",
                   help="tars: comma-separated KEY.json fields copied into records (e.g. uid,url)")
  src.add_argument("--limit", type=int, default=0,
                   help="convert only the first N samples of the listing (0: all)")
  out = p.add_argument_group("output")
  out.add_argument("--num_shards", type=int, default=0,
                   help=f"number of shards (0: one per {SAMPLES_PER_SHARD} samples)")
  out.add_argument("--resize", type=int, default=0,
                   help="pre-resize: shorter side to N px (bicubic, never enlarged), saved as "
                        "JPEG; 0 keeps the source bytes")
  out.add_argument("--jpeg_quality", type=int, default=95,
                   help="JPEG quality for resized and converted images")
  out.add_argument("--min_image_size", type=int, default=32,
                   help="skip images whose shorter side is below this (too_small)")
  out.add_argument("--max_aspect_ratio", type=float, default=10.0,
                   help="skip images whose longer/shorter side exceeds this (extreme_aspect)")
  run = p.add_argument_group("run")
  run.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="decode/encode processes (the output does not depend on it)")
  run.add_argument("--overwrite", action="store_true",
                   help="discard an existing output made with other input or options")
  run.add_argument("--no_progress", action="store_true", help="no progress bar")
  return p.parse_args(argv)


def _split_list(values: Sequence[str]) -> list[str]:
  return [v.strip() for value in values for v in value.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  extra_fields = []
  for pair in _split_list([args.extra_fields]):
    column, _, field = pair.partition(":")
    extra_fields.append((column, field or column))
  options = Options(
      num_shards=args.num_shards, resize=args.resize, jpeg_quality=args.jpeg_quality,
      min_image_size=args.min_image_size, max_aspect_ratio=args.max_aspect_ratio,
      caption_source=args.caption_source, extra_fields=tuple(extra_fields),
      join_field=args.join_field, json_fields=tuple(_split_list([args.json_fields])),
      limit=args.limit)
  try:
    return convert(args.output, tars=_split_list(args.tars), images=args.images,
                   captions=args.captions, extra_captions=_split_list(args.extra_captions),
                   options=options, workers=args.workers, progress=not args.no_progress,
                   overwrite=args.overwrite)
  except (ConvertError, records.RecordError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
