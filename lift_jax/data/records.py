"""The on-disk record format shared by the converters, the embedding job, the trainer and eval.

This module is the single owner of the format. It imports neither JAX nor torch, so the PyTorch
embedding job can use it.

Files
-----
Shards are ArrayRecord files written with ``group_size:1`` (random access), named
``{prefix}-{i:05d}-of-{n:05d}.array_record``:

* ``images-*``      image records, written by ``lift_jax.data.convert`` and the synthetic generator;
* ``embeddings-*``  embedding records aligned 1:1 with the image shards (same keys, same order);
* ``bank-*``        a text bank: embedding records keyed by the exact text they embed.

Each folder of shards carries a ``manifest.json`` (see :func:`write_manifest`) with per-shard
record counts and SHA-256 digests, so that an interrupted job can tell finished shards from
damaged ones (:mod:`lift_jax.data.shards` writes folders of shards resumably). A folder written by
many tasks at once also holds ``manifest.d/`` (:data:`PARTS`): the entry of each finished shard,
written by the task that wrote the shard, from which ``manifest.json`` is assembled; until then
the set is half-made and readers refuse it (:func:`check_finished`). An embedding
folder's entries also carry ``image_sha256``, the digest of the image shard they were computed
from as the image folder's manifest recorded it; embeddings and text banks record their encoder
settings (:data:`ENCODER_SETTINGS`, compared by :func:`check_same_encoder`).

Records
-------
Each record is one msgpack map with string keys.

* Image record: ``key`` (str, unique in the dataset), ``image`` (encoded JPEG/PNG/WebP bytes),
  ``caption`` (str) and optionally further caption fields (``recaption``, ...) and ``label`` (int).
* Embedding record: ``key`` (str), ``embedding`` (raw little-endian bytes), ``dtype``
  (``float16`` | ``bfloat16`` | ``float32`` | ``int8``), ``scale`` (float, int8 only: the vector is
  ``int8 * scale``) and ``flag`` (``""`` for a good vector, otherwise why the vector is a
  placeholder: ``"empty"``, ``"nan"``, ``"undecodable"``, ``"missing"`` (no caption field)).
  Flagged vectors are never trained on.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import re
from typing import Any, Iterable, Iterator, Sequence

import msgpack
import numpy as np

from lift_jax import cli, common

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS = "manifest.d"  # a set written by many tasks: one entry per finished shard, and settings
IMAGES = "images"
EMBEDDINGS = "embeddings"
BANK = "bank"
STORAGE_DTYPES = ("float16", "bfloat16", "float32", "int8")
_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.array_record$")


@cli.user_error
class RecordError(ValueError):
  """A shard, record or manifest is not what the format promises. The message names it."""


# --------------------------------------------------------------------------------------------
# Shard names
# --------------------------------------------------------------------------------------------


def shard_name(prefix: str, index: int, count: int) -> str:
  return f"{prefix}-{index:05d}-of-{count:05d}.array_record"


def list_shards(folder: str, prefix: str) -> list[str]:
  """All shards ``{prefix}-i-of-n`` in ``folder``, sorted; raises if the set is incomplete."""
  paths = sorted(glob.glob(os.path.join(glob.escape(folder), f"{prefix}-*-of-*.array_record")))
  if not paths:
    raise RecordError(f"no '{prefix}-*-of-*.array_record' shards in {folder}")
  counts = set()
  indices = []
  for p in paths:
    m = _SHARD_RE.match(os.path.basename(p))
    if not m or m["prefix"] != prefix:
      raise RecordError(f"unexpected shard file name {p}")
    counts.add(int(m["n"]))
    indices.append(int(m["i"]))
  if len(counts) != 1:
    raise RecordError(f"shards in {folder} disagree on the shard count: {sorted(counts)}")
  (n,) = counts
  missing = sorted(set(range(n)) - set(indices))
  if missing:
    names = ", ".join(shard_name(prefix, i, n) for i in missing[:5])
    raise RecordError(f"{folder} is missing {len(missing)} of {n} shards: {names}")
  return paths


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def pack(record: dict[str, Any]) -> bytes:
  return msgpack.packb(record, use_bin_type=True)


def unpack(data: bytes, where: str = "record", unicode_errors: str = "strict") -> dict[str, Any]:
  """Decodes one record. ``unicode_errors="surrogateescape"`` lets a reader that must survive
  strings holding invalid UTF-8 (e.g. a caption from a foreign writer) get the record and judge
  the field itself, instead of losing the whole record."""
  try:
    record = msgpack.unpackb(data, raw=False, unicode_errors=unicode_errors)
  except Exception as e:  # msgpack raises several unrelated types
    raise RecordError(f"{where}: not a msgpack record ({type(e).__name__}: {e})") from None
  if not isinstance(record, dict) or "key" not in record:
    raise RecordError(f"{where}: record is not a map with a 'key'")
  return record


def image_record(key: str, image: bytes, caption: str | None = None, **fields: Any) -> bytes:
  record: dict[str, Any] = {"key": key, "image": bytes(image)}
  if caption is not None:
    record["caption"] = caption
  record.update({k: v for k, v in fields.items() if v is not None})
  return pack(record)


def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # a small dependency of jax; imported only when needed

    return np.dtype(ml_dtypes.bfloat16)
  if name not in STORAGE_DTYPES:
    raise RecordError(f"unknown storage dtype {name!r}; expected one of {STORAGE_DTYPES}")
  return np.dtype(name)


def quantize(vector: np.ndarray, dtype: str) -> tuple[bytes, float | None]:
  """Encodes a float vector in a storage dtype; returns (bytes, int8 scale or None)."""
  v = np.asarray(vector, np.float32).reshape(-1)
  if dtype == "int8":
    peak = float(np.max(np.abs(v))) if v.size else 0.0
    scale = peak / 127.0 if peak > 0 else 1.0
    q = np.clip(np.rint(v / scale), -127, 127).astype("<i1")
    return q.tobytes(), scale
  return v.astype(_np_dtype(dtype).newbyteorder("<")).tobytes(), None


def embedding_record(key: str, vector: np.ndarray, dtype: str = "float16", flag: str = "") -> bytes:
  data, scale = quantize(vector, dtype)
  record: dict[str, Any] = {"key": key, "embedding": data, "dtype": dtype, "flag": flag}
  if scale is not None:
    record["scale"] = scale
  return pack(record)


def decode_embedding(record: dict[str, Any]) -> np.ndarray:
  """The float32 vector of an embedding record."""
  dtype = record.get("dtype", "float16")
  v = np.frombuffer(record["embedding"], dtype=_np_dtype(dtype).newbyteorder("<"))
  v = v.astype(np.float32)
  if dtype == "int8":
    v = v * np.float32(record["scale"])
  return v


# --------------------------------------------------------------------------------------------
# Reading and writing shards
# --------------------------------------------------------------------------------------------


def _reader(path: str):
  from array_record.python import array_record_module

  if not os.path.exists(path):
    raise RecordError(f"{path}: no such shard")
  try:
    reader = array_record_module.ArrayRecordReader(path)
    if not reader.ok():  # e.g. a file too short for the format: it opens, then fails on use
      reader.close()  # raises the reader's reason
  except Exception as e:
    raise RecordError(f"{path}: not a readable ArrayRecord file ({e})") from None
  return reader


def count_records(path: str) -> int:
  reader = _reader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def read_raw(path: str, indices: Sequence[int] | None = None) -> list[bytes]:
  reader = _reader(path)
  try:
    return list(reader.read_all() if indices is None else reader.read(list(indices)))
  except Exception as e:
    raise RecordError(f"{path}: damaged shard ({e})") from None
  finally:
    reader.close()


def iter_records(path: str, chunk: int = 1024, unicode_errors: str = "strict"
                 ) -> Iterator[dict[str, Any]]:
  """Yields every record of a shard as a dict, in order (``unicode_errors``: see :func:`unpack`)."""
  reader = _reader(path)
  try:
    n = reader.num_records()
    for start in range(0, n, chunk):
      try:
        raw = reader.read(list(range(start, min(n, start + chunk))))
      except Exception as e:
        raise RecordError(f"{path}: damaged shard near record {start} ({e})") from None
      for offset, data in enumerate(raw):
        yield unpack(data, f"{path} record {start + offset}", unicode_errors)
  finally:
    reader.close()


def read_keys(path: str) -> list[str]:
  return [r["key"] for r in iter_records(path)]


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


# Writer options for records whose payload is already compressed (JPEG / PNG / WebP images):
# ArrayRecord's default brotli gains nothing there, makes writing ~6x and reading ~1.6x slower.
UNCOMPRESSED = "group_size:1,uncompressed"


def _writing(path: str, call):
  """``call()``; an error of the ArrayRecord writer (a full disk, a vanished folder) becomes a
  RecordError naming the shard and the writer's own first line."""
  try:
    return call()
  except Exception as e:  # noqa: BLE001 - riegeli raises RuntimeError/OSError/ValueError
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise RecordError(f"could not write {path} ({first}); nothing half-written is left: free "
                      f"space in {os.path.dirname(path) or '.'} and re-run") from None


def write_shard(path: str, records: Iterable[bytes], options: str = "group_size:1"
                ) -> dict[str, Any]:
  """Writes packed records to ``path`` atomically (temporary name, then rename).

  ``options`` are ArrayRecord writer options; keep ``group_size:1`` (random access). Readers need
  no option: the compression is recorded in the file. Returns the shard's manifest entry: file
  name, record count and SHA-256.
  """
  from array_record.python import array_record_module

  tmp = common.temporary_name(path)
  count = 0
  try:
    writer = _writing(path, lambda: array_record_module.ArrayRecordWriter(tmp, options))
    try:
      for data in records:  # errors of the records' producer pass through unchanged
        _writing(path, lambda: writer.write(data))
        count += 1
    finally:
      _writing(path, writer.close)  # flushes: a full disk often shows here
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  digest = sha256_file(tmp)
  os.replace(tmp, path)
  return {"file": os.path.basename(path), "count": count, "sha256": digest}


def verify_shard(folder: str, entry: dict[str, Any]) -> str | None:
  """Checks one shard against its manifest entry; returns what is wrong, or None."""
  path = os.path.join(folder, entry["file"])
  if not os.path.exists(path):
    return "missing"
  if sha256_file(path) != entry.get("sha256"):
    return "SHA-256 differs from the manifest"
  try:
    n = count_records(path)
  except RecordError as e:
    return str(e)
  if n != entry.get("count"):
    return f"holds {n} records, the manifest says {entry.get('count')}"
  return None


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------


def read_manifest(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    raise RecordError(f"{path}: no manifest (is {folder} a folder of lift_jax shards?)")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise RecordError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(manifest, dict) or "shards" not in manifest:
    raise RecordError(f"{path}: a manifest needs a 'shards' list")
  return manifest


def write_manifest(folder: str, manifest: dict[str, Any]) -> str:
  """Writes ``manifest.json`` atomically, adding format version and creation time if absent."""
  manifest = dict(manifest)
  manifest.setdefault("format_version", FORMAT_VERSION)
  manifest.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat())
  path = os.path.join(folder, MANIFEST)
  common.write_json_atomic(path, manifest)
  return path


def code_version() -> str:
  from importlib import metadata

  try:
    return metadata.version("lift_jax")
  except metadata.PackageNotFoundError:
    return "unknown"


# --------------------------------------------------------------------------------------------
# Alignment and text banks
# --------------------------------------------------------------------------------------------


def part_path(folder: str, shard_file: str) -> str:
  """Where the manifest entry of one finished shard of a many-task set is kept."""
  return os.path.join(folder, PARTS, shard_file + ".json")


def check_finished(folder: str, prefix: str) -> None:
  """Refuses a half-made set of ``prefix`` shards in one line naming the unfinished shards.

  Half-made: ``manifest.json`` says ``"complete": false`` (a job still running, or stopped), or
  there is no ``manifest.json`` but ``manifest.d/`` holds the entries of a job of many tasks
  (some tasks have not finished, or no task has assembled the manifest yet). A folder with
  neither (shards written by hand) passes. Opens no shard.
  """
  if os.path.exists(os.path.join(folder, MANIFEST)):
    manifest = read_manifest(folder)
    if manifest.get("complete") is not False:
      return
    done = {e.get("file") for e in manifest["shards"] if isinstance(e, dict)}
    n = manifest.get("num_shards")
    state = f"its {MANIFEST} says it is not complete"
  elif os.path.isdir(os.path.join(folder, PARTS)):
    done = {name[:-len(".json")] for name in os.listdir(os.path.join(folder, PARTS))
            if name.endswith(".array_record.json")}
    n = None
    state = f"{PARTS}/ holds the shards of a job of many tasks and there is no {MANIFEST} yet"
  else:
    return
  if not isinstance(n, int):
    sizes = {int(m["n"]) for m in map(_SHARD_RE.match, done | set(os.listdir(folder)))
             if m and m["prefix"] == prefix}
    n = max(sizes, default=0)
  missing = [shard_name(prefix, i, n) for i in range(n) if shard_name(prefix, i, n) not in done]
  names = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
  unfinished = (f"{len(missing)} of {n} shards are not finished: {names}" if missing else
                "every shard is listed but the manifest was not marked complete")
  fix = ("re-run the tasks that own them (the same convert command with their --task_index), "
         "then python -m lift_jax.data.convert --finalize --output=" + folder
         if prefix == IMAGES else "re-run the job that writes it (python -m embed.main ...)")
  raise RecordError(f"{folder} is a half-made set ({state}); {unfinished}; {fix}")


def shard_counts(folder: str, prefix: str, warn=None
                 ) -> tuple[list[str], list[int], dict[str, Any]]:
  """(shard paths, record counts, manifest) of a folder, counts read from its manifest.

  Opens no shard: at 40,000 shards on network storage, opening each one costs minutes. A shard
  on disk that the manifest does not list is an error naming it. A folder without a manifest
  (shards written by hand) or an entry without a ``count`` falls back to opening those shards,
  said once through ``warn``. A half-made set (see :func:`check_finished`) is refused.
  """
  check_finished(folder, prefix)
  paths = list_shards(folder, prefix)
  if not os.path.exists(os.path.join(folder, MANIFEST)):
    if warn is not None:
      warn(f"{folder} has no {MANIFEST}: counting records by opening its {len(paths)} shards "
           "(slow on network storage; the converter writes the manifest)")
    return paths, [count_records(p) for p in paths], {"shards": []}
  manifest = read_manifest(folder)
  entries = {e.get("file"): e for e in manifest["shards"] if isinstance(e, dict)}
  names = [os.path.basename(p) for p in paths]
  unlisted = [n for n in names if n not in entries]
  if unlisted:
    raise RecordError(f"{folder}/{MANIFEST} does not list {len(unlisted)} of the {len(names)} "
                      f"shards in the folder (first: {unlisted[0]}); the manifest belongs to "
                      "another run: re-run the command that wrote the folder")
  counts = []
  for path, name in zip(paths, names):
    count = entries[name].get("count")
    counts.append(int(count) if isinstance(count, int) else count_records(path))
  return paths, counts, manifest


def check_aligned(image_folder: str, embedding_folder: str, check_keys: bool = False,
                  warn=None) -> list[int]:
  """Raises a RecordError naming the shard when embeddings do not align with the image shards.

  Counts come from both manifests. An embedding shard whose manifest entry records the SHA-256
  of the image shard it was computed from (``image_sha256``) must match the image manifest's
  current digest: images re-converted since (new captions, same keys) make its vectors stale.
  Entries without ``image_sha256`` (older embedding runs) are reported through ``warn`` (one
  message) and accepted. Returns the per-shard record counts. ``check_keys`` also reads every
  key of both sides and compares them (slow: it opens every shard).
  """
  images, image_counts, image_manifest = shard_counts(image_folder, IMAGES, warn)
  embeddings, emb_counts, emb_manifest = shard_counts(embedding_folder, EMBEDDINGS, warn)
  if len(images) != len(embeddings):
    raise RecordError(
        f"{embedding_folder} has {len(embeddings)} embedding shards but {image_folder} has "
        f"{len(images)} image shards")
  image_sha = {e.get("file"): e.get("sha256") for e in image_manifest["shards"]}
  emb_entries = {e.get("file"): e for e in emb_manifest["shards"]}
  unrecorded = 0
  for img, emb, ni, ne in zip(images, embeddings, image_counts, emb_counts):
    if ni != ne:
      raise RecordError(f"{emb} holds {ne} records but its image shard {img} holds {ni}")
    recorded = emb_entries.get(os.path.basename(emb), {}).get("image_sha256")
    current = image_sha.get(os.path.basename(img))
    if recorded is None:
      unrecorded += 1
    elif current is not None and recorded != current:
      raise RecordError(
          f"{emb} was computed from another version of {img} (the image shard's SHA-256 "
          "changed since; e.g. it was re-converted with new captions): its vectors are stale. "
          f"Re-embed them: `python -m embed.main --config=EMBED_CONFIG --config.images="
          f"{image_folder} --config.output={embedding_folder}` (it redoes only stale shards)")
    if check_keys:
      for idx, (a, b) in enumerate(zip(read_keys(img), read_keys(emb))):
        if a != b:
          raise RecordError(f"{emb} record {idx} has key {b!r}; image shard {img} has {a!r}")
  if unrecorded and warn is not None:
    warn(f"{embedding_folder}/{MANIFEST}: {unrecorded} of {len(embeddings)} shards do not record "
         "the image shard they were computed from (image_sha256; made by an older embed.main), "
         "so their freshness cannot be checked")
  return image_counts


# The manifest fields of an embedding folder or a text bank that decide what a vector means: a
# bank scored against a model trained on embeddings must agree with them on every one.
ENCODER_SETTINGS = ("model", "revision", "encoder", "pooling", "instruction", "max_length",
                    "append_eos", "normalized", "random_init")
# Settings a manifest records only when they differ from this default (embed.main writes
# random_init only when set): an absent one means the default, so they are always compared.
ENCODER_DEFAULTS = {"random_init": False}
_ABSENT = object()


@cli.user_error
class EncoderMismatchError(RecordError):
  """A text bank was made with other encoder settings than the training embeddings."""


def encoder_differences(bank: dict[str, Any], embeddings: dict[str, Any]) -> list[str]:
  """``"field: X in the embeddings, Y in the bank"`` for each of :data:`ENCODER_SETTINGS` on
  which two manifests disagree (empty when they agree). A field that one manifest does not
  record (a folder written by other code) cannot be compared and is left out, except those of
  :data:`ENCODER_DEFAULTS`, whose absence means their default."""
  out = []
  for k in ENCODER_SETTINGS:
    default = ENCODER_DEFAULTS.get(k, _ABSENT)
    b, e = bank.get(k, default), embeddings.get(k, default)
    if b is not _ABSENT and e is not _ABSENT and b != e:
      out.append(f"{k}: {e!r} in the embeddings, {b!r} in the bank")
  return out


def check_same_encoder(bank_folder: str, embeddings_folder: str, allow: bool = False
                       ) -> list[str]:
  """Compares the manifests of a text bank and of the training embeddings.

  Raises :class:`EncoderMismatchError` naming both folders and every differing field, unless
  ``allow`` (then the differences are returned for the caller to report). Returns [] when the
  encoders agree.
  """
  diffs = encoder_differences(read_manifest(bank_folder), read_manifest(embeddings_folder))
  if diffs and not allow:
    raise EncoderMismatchError(
        f"text bank {bank_folder} was made with other encoder settings than the training "
        f"embeddings {embeddings_folder} ({'; '.join(diffs)}): scores against it are not "
        "comparable. Re-embed the bank's texts with the embeddings' encoder config "
        "(`python -m embed.main --config=EMBED_CONFIG --config.texts=FILE --config.output=DIR`), "
        "or set "
        "config.evals.allow_encoder_mismatch=True to evaluate anyway")
  return diffs


def load_text_bank(folder: str) -> tuple[dict[str, int], np.ndarray, dict[str, Any]]:
  """Loads a text bank: ({text: row}, float32 matrix [n, dim], manifest)."""
  manifest = read_manifest(folder)
  index: dict[str, int] = {}
  rows: list[np.ndarray] = []
  for path in list_shards(folder, BANK):
    for record in iter_records(path):
      if record.get("flag"):
        continue  # placeholders (empty text, NaN output) are not usable for scoring
      index.setdefault(record["key"], len(rows))
      if index[record["key"]] == len(rows):
        rows.append(decode_embedding(record))
  matrix = np.stack(rows) if rows else np.zeros((0, int(manifest.get("dim", 0))), np.float32)
  return index, matrix, manifest
