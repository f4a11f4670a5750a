r"""Builds image shards (``images-XXXXX-of-YYYYY.array_record`` + ``manifest.json``) from raw pairs.

    python -m lift_jax.data.convert --output=DIR --tars='shards/*.tar' \
        [--extra_captions=recap.parquet]
    python -m lift_jax.data.convert --output=DIR --images=IMAGES_DIR --captions=captions.tsv
    # many machines: the same command as task I of N (or under a SLURM array, a Kubernetes
    # indexed Job, torchrun, srun: read from their variables), or as an Apache Beam pipeline
    python -m lift_jax.data.convert ... --task_index=I --task_count=N
    python -m lift_jax.data.convert --output=DIR --finalize
    python -m lift_jax.data.convert ... --beam_runner=DirectRunner [--beam_options='...']

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
* an image folder plus a captions file read by :func:`lift_jax.data.captions.read_captions` (TSV
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

Many machines
-------------
Every task lists the whole input the same way (tars are read by ``--workers`` processes) and
writes the contiguous block of shards ``[I*n//N, (I+1)*n//N)``: which records a shard holds does
not depend on N. A task keeps its shards that verify, redoes the rest, and records each finished
shard in ``manifest.d/``; ``manifest.json`` appears when the last shard of the set is finished
(``--finalize`` verifies every shard and writes it, e.g. when the tasks' file system shows new
files late). Until then readers (the trainer, ``embed.main``) refuse the folder, naming the
unfinished shards. ``--beam_runner`` lists on this machine and lets Beam's workers write one whole
shard per element (the items of each shard go through ``manifest.d/plan/``). Which task this is:
:func:`lift_jax.common.task_of`. Shard files and manifest are the same, byte for byte (apart
from its ``created`` time), on one machine, N tasks in any order, or Beam.

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
``a.jpg`` in a folder, where the first in sorted order is kept), ``missing_extra_caption``,
``truncated_tar`` (a sample of a tar cut off mid-download that lost its image or caption).
Tars themselves (``tars/...``, with their paths as examples; all of them listed in
``manifest["source"]["bad_tars"]``): ``truncated`` (its complete samples are kept),
``not_a_tar``, ``compressed``, ``unreadable`` (skipped whole). The run fails only when nothing
could be listed at all.
Converted to RGB and re-encoded as JPEG at ``--jpeg_quality`` (kept): ``cmyk``, ``16bit``,
``palette``, ``alpha`` (composited on white), ``grayscale``, ``other_mode``, ``format`` (RGB but
not JPEG/PNG/WebP).
Dropped captions of kept images (folder sources): ``empty``, ``undecodable``.
EXIF orientation is not applied (as in the reference loader); animated images keep frame one.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import hashlib
import importlib.util
import io
import json
import math
import os
import posixpath
import shlex
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

from absl import flags
from PIL import Image

from lift_jax import cli
from lift_jax import common
from lift_jax.data import captions as captions_lib
from lift_jax.data import records
from lift_jax.data import shards
from lift_jax.data import tars
from lift_jax.data import transforms

IMAGE_EXTENSIONS = tars.IMAGE_EXTENSIONS
_KEPT_FORMATS = ("JPEG", "PNG", "WEBP")  # stored as found; others are re-encoded


@cli.user_error
class ConvertError(ValueError):
  """The input or the output folder is not usable; the message names the file or key."""


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


def process_item(opts: Options, item: tuple[str, tuple, dict[str, Any]]) -> shards.Outcome:
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
                ) -> tuple[list[tuple[str, tuple, dict[str, Any]]], shards.Report, str]:
  """Items (key, location, record fields), the listing's report and a fingerprint of the input."""
  if not os.path.isdir(images):
    raise ConvertError(f"--images={images} is not a folder")
  if not os.path.exists(captions):
    raise ConvertError(f"--captions={captions} does not exist")
  report = shards.Report()
  clean, undecodable = _clean_caption_file(captions)
  try:
    caps = captions_lib.read_captions(clean)
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
                        report: shards.Report) -> dict[str, tuple]:
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


def _sample_fields(caption: str, join: Any, json_values: dict[str, Any], opts: Options,
                   extra: dict[str, tuple] | None) -> tuple[dict[str, Any] | None, str | None]:
  """The record fields of a sample with a caption (the extra captions joined), or why it is
  skipped."""
  fields: dict[str, Any] = {"caption": caption}
  if extra is not None:
    row = extra.get(str(join)) if join is not None else None
    values = [v.strip() if isinstance(v, str) else v for v in (row or ())]
    if row is None or any(v is None or v == "" for v in values):
      return None, "missing_extra_caption"
    for (_, target), v in zip(opts.extra_fields, values):
      fields[target] = v
  fields.update(json_values)
  return fields, None


def list_webdataset(tar_paths: Sequence[str], opts: Options, extra: dict[str, tuple] | None,
                    log: Callable[[str], None] = print, bad_tars: dict[str, str] | None = None,
                    workers: int = 1
                    ) -> tuple[list[tuple[str, tuple, dict[str, Any]]], shards.Report, str]:
  """Items (key, location, record fields), the listing's report and a fingerprint of the input.

  A tar cut short keeps its complete samples (the rest are ``skipped/truncated_tar``, the tar is
  counted under ``tars/truncated``); a file that is not an uncompressed tar is skipped and
  counted under ``tars/<reason>``. Every such tar is named in the log and in ``bad_tars``
  ({path: reason}). ``workers`` processes read the tars; what depends on more than one tar
  (duplicate keys, ``--limit``, the extra captions) is decided here, in tar order, so the result
  does not depend on ``workers``.
  """
  bad_tars = {} if bad_tars is None else bad_tars
  if opts.caption_source != "txt" and not opts.caption_source.startswith("json:"):
    raise ConvertError(f"--caption_source={opts.caption_source}: expected 'txt' or 'json:FIELD'")
  report = shards.Report()
  items = []
  seen: set[str] = set()
  listed = 0
  h = hashlib.sha256()
  one_tar = functools.partial(tars.list_tar, opts=opts,
                              join_in_json=extra is not None and opts.join_field != "key")
  # --limit reads tars one by one: a parallel pool would read every tar of the input.
  with tars.pool(1 if opts.limit else min(workers, len(tar_paths))) as imap:
    for tar_path, (problem, cut, complete, events) in zip(tar_paths, imap(one_tar, tar_paths)):
      if opts.limit and listed >= opts.limit:
        break
      if problem is not None:
        report.add(tar_path, (f"tars/{problem}",))
        bad_tars[tar_path] = problem
        log(f"{tar_path}: skipped, {tars.PROBLEMS[problem]}")
        continue
      if cut is not None:
        report.add(tar_path, ("tars/truncated",))
        bad_tars[tar_path] = "truncated"
        log(f"{tar_path}: cut short ({cut}); its {complete} complete members are kept, the "
            "samples it lost are counted as skipped/truncated_tar")
      where = os.path.abspath(tar_path)  # one string shared by the tar's items
      for event in events:
        if event[0] == "member_twice":
          report.add(event[1], ("skipped/duplicate_key",))
          continue
        if opts.limit and listed >= opts.limit:
          break
        listed += 1
        if event[0] == "no_image":
          report.add(event[1], (f"skipped/{event[2]}",))
          continue
        _, key, images, reason, caption, join, json_values, offset, size = event
        if key in seen:
          report.add(key, ("skipped/duplicate_key",))
          continue
        seen.add(key)
        for _ in range(images - 1):
          report.add(key, ("skipped/duplicate_key",))  # KEY.jpg and KEY.png: which is meant?
        fields = None
        if reason is None:
          fields, reason = _sample_fields(caption, join, json_values, opts, extra)
        if reason is not None:
          report.add(key, (f"skipped/{reason}",))
          continue
        h.update(json.dumps([key, size, fields], ensure_ascii=False, sort_keys=True,
                            default=str).encode())
        items.append((key, ("tar", where, offset, size), fields))
  return items, report, h.hexdigest()


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _expand(patterns: Sequence[str], what: str) -> list[str]:
  paths: list[str] = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      flag = {"tar": "--tars", "parquet": "--extra_captions"}.get(what, what)
      raise ConvertError(f"{flag}={pattern} is a folder; give the files or a quoted glob, e.g. "
                         f"{flag}='{os.path.join(pattern, '*.' + what)}'")
    found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    found = [p for p in found if not os.path.isdir(p)]
    if not found or not all(os.path.exists(p) for p in found):
      raise ConvertError(f"{what} {pattern}: no such file")
    paths.extend(p for p in found if p not in paths)
  return paths


# A source format: a function (inputs, options, log, workers) -> Listing, selected by its input
# flag; ``workers`` processes may share the reading, the listing must not depend on them.
@dataclasses.dataclass
class Listing:
  items: list[tuple[str, tuple, dict[str, Any]]]  # (key, location, record fields), in order
  report: shards.Report  # what listing skipped, by reason
  fingerprint: str  # SHA-256 of everything listed that the output depends on
  source: dict[str, Any]  # the manifest's description of the input
  fields: list[str]  # the record fields written


def list_tars(inputs: dict[str, Any], options: Options, log: Callable[[str], None],
              workers: int = 1) -> Listing:
  """``--tars`` (webdataset tars, with optional ``--extra_captions`` parquet files), read by
  ``workers`` processes."""
  tar_paths = _expand(inputs["tars"], "tar")
  extra_captions = inputs.get("extra_captions") or ()
  report = shards.Report()
  extra = None
  if extra_captions:
    columns = [c for c, _ in options.extra_fields]
    extra = load_extra_captions(_expand(extra_captions, "parquet"), options.join_field, columns,
                                report)
  bad_tars: dict[str, str] = {}
  items, listing, fingerprint = list_webdataset(tar_paths, options, extra, log, bad_tars,
                                                workers)
  listing.merge(report.to_dict())
  source = {"type": "webdataset", "tars": [os.path.abspath(p) for p in tar_paths],
            "bad_tars": {os.path.abspath(p): why for p, why in bad_tars.items()},
            "extra_captions": [os.path.abspath(p) for p in _expand(extra_captions, "parquet")]
            if extra_captions else []}
  fields = ["key", "image", "caption"] + [t for _, t in options.extra_fields if extra_captions]
  return Listing(items, listing, fingerprint, source, fields + list(options.json_fields))


def list_image_folder(inputs: dict[str, Any], options: Options, log: Callable[[str], None],
                      workers: int = 1) -> Listing:
  """``--images`` (a folder, searched recursively) with ``--captions``."""
  del log, workers
  images, captions = inputs["images"], inputs.get("captions")
  if not captions:
    raise ConvertError("an image folder needs --captions")
  items, listing, fingerprint = list_folder(images, captions, options)
  source = {"type": "folder", "images": os.path.abspath(images),
            "captions": os.path.abspath(captions)}
  return Listing(items, listing, fingerprint, source, ["key", "image", "caption", "captions"])


# The source formats, by the input flag that selects each (see the README's "Extending").
SOURCES: dict[str, Callable[[dict[str, Any], Options, Callable[[str], None], int], Listing]] = {
    "tars": list_tars,
    "images": list_image_folder,
}


def convert(output: str, *, options: Options = Options(), workers: int | None = None,
            progress: bool = True, overwrite: bool = False, log: Callable[[str], None] = print,
            task: common.Task | None = None, beam_runner: str | None = None,
            beam_options: Sequence[str] = (), **inputs) -> dict[str, Any]:
  """Converts the input one source format names (``tars=[...]``, or ``images=DIR`` with
  ``captions=FILE``; see :data:`SOURCES`). Returns the manifest; see the module docstring for the
  options and the report.

  ``task`` makes this run one task of many (it writes its block of shards; ``manifest.json``
  appears when the last shard of the set is written); ``beam_runner`` runs the conversion as an
  Apache Beam pipeline on that runner, with Beam's ``beam_options``. Every way gives the same
  shard files and manifest.
  """
  given = [name for name in SOURCES if inputs.get(name)]
  if len(given) != 1:
    raise ConvertError("give one source: " + " or ".join(f"--{n}" for n in SOURCES) +
                       (", not both" if given else ""))
  if beam_runner and importlib.util.find_spec("apache_beam") is None:
    raise ConvertError(f"--beam_runner={beam_runner} needs Apache Beam, which is not installed: "
                       "pip install -e '.[beam]'")
  if beam_runner and task is not None and task.count > 1:
    raise ConvertError(f"--beam_runner={beam_runner} with task {task.index} of {task.count}: "
                       "Beam spreads the shards over its own workers; run it once, without "
                       "--task_index/--task_count (or outside the scheduler's array)")
  workers = workers if workers is not None else (os.cpu_count() or 1)
  listing_start = time.perf_counter()
  listing = SOURCES[given[0]](inputs, options, log, workers)
  items = listing.items
  listed = len(items) + sum(listing.report.section("skipped").values())
  log(f"listed {listed} samples in {time.perf_counter() - listing_start:.1f} s: {len(items)} to "
      f"convert, {listed - len(items)} skipped while listing")
  num_shards = options.num_shards or max(1, math.ceil(len(items) / shards.SAMPLES_PER_SHARD))
  if not items:
    raise ConvertError(f"nothing to convert from {listing.source}:\n{listing.report.summary()}")
  slices = shards.split_even(items, num_shards)
  identity = {"options": {**options.output_options(), "num_shards": num_shards},
              "input_sha256": listing.fingerprint, "items": len(items)}
  info = {"source": listing.source, "fields": listing.fields, "options": identity["options"]}
  common_args = dict(identity=identity, info=info, base_report=listing.report,
                     overwrite=overwrite, error=ConvertError, log=log)
  if beam_runner:
    return shards.build_shards_beam(output, slices, functools.partial(process_item, options),
                                    runner=beam_runner, beam_options=beam_options, **common_args)
  if task is not None:
    mine = shards.task_shards(num_shards, task)
    who = f"task {task.index} of {task.count}" + (f" (from {task.source})" if task.source else "")
    log(f"{who}: shards {mine.start} to {mine.stop - 1} of {num_shards}" if mine else
        f"{who}: none of the {num_shards} shards (more tasks than shards)")
  return shards.build_shards(
      output, slices, functools.partial(process_item, options),
      workers=workers, chunksize=16,
      progress=progress, task=task, **common_args)


def finalize(output: str, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Checks every shard of a set written by tasks against its entry (SHA-256, record count) and
  writes ``manifest.json``; raises naming each unfinished or damaged shard."""
  if not os.path.isdir(output):
    raise ConvertError(f"--output={output} is not a folder")
  manifest = shards.finish_set(output, verify=True, error=ConvertError, log=log)
  log(f"{output}: {manifest['num_shards']} shards, {manifest['total']} records, all verified\n"
      f"{shards.Report(manifest['report']).summary()}")
  return manifest


FLAGS = flags.FlagValues()
flags.DEFINE_string("output", None, "output folder for shards and manifest.json", flag_values=FLAGS)
# Source: tars, or images + captions.
flags.DEFINE_multi_string("tars", [], "webdataset tar file or glob; repeatable or comma-separated",
                          flag_values=FLAGS)
flags.DEFINE_string("images", None, "image folder (searched recursively)", flag_values=FLAGS)
flags.DEFINE_string("captions", None, "captions file: TSV, CSV, JSONL or COCO captions_*.json",
                    flag_values=FLAGS)
flags.DEFINE_string("caption_source", Options.caption_source,
                    "tars: 'txt' (KEY.txt) or 'json:FIELD' (a field of KEY.json)",
                    flag_values=FLAGS)
flags.DEFINE_multi_string("extra_captions", [], "tars: parquet file(s) or glob of extra captions "
                          "joined by --join_field", flag_values=FLAGS)
flags.DEFINE_string("extra_fields", ",".join(f"{c}:{f}" for c, f in Options.extra_fields),
                    "COLUMN:FIELD[,COLUMN:FIELD]: parquet columns copied into record fields",
                    flag_values=FLAGS)
flags.DEFINE_string("join_field", Options.join_field,
                    "parquet column matched to the sample key ('key') or to "
                    "that field of KEY.json (e.g. uid)", flag_values=FLAGS)
flags.DEFINE_string("json_fields", ",".join(Options.json_fields),
                    "tars: comma-separated KEY.json fields copied into records "
                    "(e.g. uid,url)", flag_values=FLAGS)
flags.DEFINE_integer("limit", Options.limit,
                     "convert only the first N samples of the listing (0: all)",
                     flag_values=FLAGS)
# Output.
flags.DEFINE_integer("num_shards", Options.num_shards,
                     f"number of shards (0: one per {shards.SAMPLES_PER_SHARD} samples)",
                     flag_values=FLAGS)
flags.DEFINE_integer("resize", Options.resize,
                     "pre-resize: shorter side to N px (bicubic, never enlarged), "
                     "saved as JPEG; 0 keeps the source bytes", flag_values=FLAGS)
flags.DEFINE_integer("jpeg_quality", Options.jpeg_quality,
                     "JPEG quality for resized and converted images",
                     flag_values=FLAGS)
flags.DEFINE_integer("min_image_size", Options.min_image_size,
                     "skip images whose shorter side is below this (too_small)", flag_values=FLAGS)
flags.DEFINE_float("max_aspect_ratio", Options.max_aspect_ratio,
                   "skip images whose longer/shorter side exceeds this (extreme_aspect)",
                   flag_values=FLAGS)
# Run.
flags.DEFINE_integer("workers", os.cpu_count() or 1,
                     "decode/encode processes (the output does not depend on it)",
                     flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "discard an existing output made with other input or "
                  "options", flag_values=FLAGS)
flags.DEFINE_bool("no_progress", False, "no progress bar", flag_values=FLAGS)
# Many machines.
flags.DEFINE_integer("task_index", None, "this task's index among --task_count tasks that share "
                     "the output (default: from SLURM array / torchrun / SLURM task / Kubernetes "
                     "indexed Job variables)", flag_values=FLAGS)
flags.DEFINE_integer("task_count", None, "how many tasks share the output (default: from the "
                     "scheduler's variables; a Kubernetes indexed Job needs "
                     f"${common.TASK_COUNT_VAR} or this flag)", flag_values=FLAGS)
flags.DEFINE_bool("finalize", False, "verify every shard of a set written by tasks and write "
                  "manifest.json; needs only --output", flag_values=FLAGS)
flags.DEFINE_string("beam_runner", None, "run as an Apache Beam pipeline on this runner "
                    "(DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...)",
                    flag_values=FLAGS)
flags.DEFINE_multi_string("beam_options", [], "Beam pipeline options, passed on as they are "
                          "(e.g. --beam_options='--project=P --region=R'); repeatable",
                          flag_values=FLAGS)


def _split_list(values: Sequence[str]) -> list[str]:
  return [v.strip() for value in values for v in value.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Build lift_jax image shards (images-XXXXX-of-YYYYY.array_record + manifest.json) from
  webdataset tars or an image folder with a captions file. Re-running the same command resumes."""
  cli.parse_flags(FLAGS, sys.argv[1:] if argv is None else argv, __doc__)
  if not FLAGS.output:
    raise cli.UsageError("--output=DIR is required: the folder to write the shards into")
  if FLAGS.finalize:
    return finalize(FLAGS.output)
  task = common.task_of(index=FLAGS.task_index, count=FLAGS.task_count, error=ConvertError)
  extra_fields = []
  for pair in _split_list([FLAGS.extra_fields]):
    column, _, field = pair.partition(":")
    extra_fields.append((column, field or column))
  options = Options(
      num_shards=FLAGS.num_shards, resize=FLAGS.resize, jpeg_quality=FLAGS.jpeg_quality,
      min_image_size=FLAGS.min_image_size, max_aspect_ratio=FLAGS.max_aspect_ratio,
      caption_source=FLAGS.caption_source, extra_fields=tuple(extra_fields),
      join_field=FLAGS.join_field, json_fields=tuple(_split_list([FLAGS.json_fields])),
      limit=FLAGS.limit)
  return convert(FLAGS.output, tars=_split_list(FLAGS.tars), images=FLAGS.images,
                 captions=FLAGS.captions, extra_captions=_split_list(FLAGS.extra_captions),
                 options=options, workers=FLAGS.workers, progress=not FLAGS.no_progress,
                 overwrite=FLAGS.overwrite, task=task if task.count > 1 else None,
                 beam_runner=FLAGS.beam_runner,
                 beam_options=[o for v in FLAGS.beam_options for o in shlex.split(v)])


if __name__ == "__main__":
  sys.exit(cli.run("python -m lift_jax.data.convert", main))
