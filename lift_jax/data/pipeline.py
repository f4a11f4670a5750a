"""The training input pipeline: grain over ArrayRecord shards -> global, sharded jax.Arrays.

Order of operations (all lazy, random access)::

    PairedSource (image record i [+ embedding record i])
      -> shuffle(seed)            a global permutation, reseeded every epoch (seed + epoch)
      -> repeat()                 endless
      -> map_with_index(decode)   crop randomness drawn from (seed, global position): the same
                                  example gets the same crop whatever the worker/process layout
      -> ProcessSlice             process p of P takes rows [p*b, (p+1)*b) of every global batch
      -> batch(b)                 b = global batch / P
      -> to_iter_dataset -> mp_prefetch(workers)

So global batch t holds exactly the examples at global positions [t*B, (t+1)*B), in the same rows,
on any number of processes, devices and workers, and the data stream is fully described by the
number of batches handed out. That count is saved with every checkpoint (with the counts of
unusable examples and an order-sensitive digest of the records served, see :class:`Batches`);
a resumed run slices the batched dataset there (``train_dataset(..., start_batch=t)``), so it
sees the batches an uninterrupted one would, on any topology and worker count.

Examples that cannot be used (undecodable image, NaN/flagged embedding, missing caption) are kept
in the batch with ``valid=False`` and a ``reason`` code; the loss ignores them, and ``Batches``
counts them by reason on the host (the codes never go to the devices) and keeps the counts in its
checkpointed state, so nothing is dropped silently and shapes stay static.
"""

from __future__ import annotations

import bisect
import queue
import sys
import threading
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from lift_jax import cli
from lift_jax.data import records, transforms
from lift_jax.data.tokenizer import get_tokenizer

REASONS = ("ok", "bad_image", "nan_embedding", "flagged_embedding", "missing_caption",
           "large_image")


@cli.user_error
class PipelineError(ValueError):
  """The data does not match the config or the record contract; the message names the file."""


# ----------------------------------------------------------------------------------------------
# Source
# ----------------------------------------------------------------------------------------------


class PairedSource(grain.sources.RandomAccessDataSource):
  """Record i of the image shards, with record i of the aligned embedding shards (LIFT).

  Readers are opened lazily in each process (the source is pickled into grain's workers).
  """

  def __init__(self, image_files: Sequence[str], embedding_files: Sequence[str] | None = None,
               counts: Sequence[int] | None = None):
    """``counts``: records per shard (from the manifests); None opens every shard to count."""
    self.image_files = list(image_files)
    self.embedding_files = list(embedding_files) if embedding_files else None
    if self.embedding_files is not None and len(self.embedding_files) != len(self.image_files):
      raise PipelineError(f"{len(self.embedding_files)} embedding shards for "
                          f"{len(self.image_files)} image shards")
    if counts is None:
      counts = [records.count_records(p) for p in self.image_files]
      for img, emb, n in zip(self.image_files, self.embedding_files or (), counts):
        m = records.count_records(emb)
        if m != n:
          raise PipelineError(f"{emb} holds {m} records but its image shard {img} holds {n}")
    self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
    self._readers = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_readers"] = None
    return state

  def __len__(self) -> int:
    return self.offsets[-1]

  def _open(self):
    self._readers = ([None] * len(self.image_files),
                     [None] * len(self.embedding_files) if self.embedding_files else None)

  @staticmethod
  def _read(readers: list, files: Sequence[str], shard: int, offset: int) -> bytes:
    """Record ``offset`` of shard ``shard``; opened on first use, errors name shard and record."""
    from array_record.python import array_record_module

    path = files[shard]
    try:
      if readers[shard] is None:
        readers[shard] = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
      return readers[shard].read([offset])[0]
    except Exception as e:  # a damaged or truncated shard: name it instead of riegeli's bytes
      raise records.RecordError(
          f"{path} record {offset}: damaged shard ({str(e).splitlines()[0][:200]}). Check every "
          "shard against its manifest with `python -m lift_jax.main --config=CONFIG "
          "--workdir=WORKDIR --check=full`, then "
          "re-create the damaged one") from None

  def _locate(self, index: int) -> tuple[int, int]:
    shard = bisect.bisect_right(self.offsets, index) - 1
    return shard, index - self.offsets[shard]

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._getitems([index])[0]

  def _getitems(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    if self._readers is None:
      self._open()
    images, embeddings = self._readers
    out = []
    for index in indices:
      shard, offset = self._locate(int(index))
      item = {"shard": shard, "offset": offset,
              "image_record": self._read(images, self.image_files, shard, offset)}
      if embeddings is not None:
        item["embedding_record"] = self._read(embeddings, self.embedding_files, shard, offset)
      out.append(item)
    return out


# ----------------------------------------------------------------------------------------------
# Per-example transform
# ----------------------------------------------------------------------------------------------


class TrainTransform:
  """Raw records -> {image uint8 HWC, text, valid, reason}; randomness from (seed, position)."""

  def __init__(self, *, mode: str, image_size: int, seed: int, source: PairedSource,
               embed_dim: int | None = None, crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3),
               caption_field: str = "caption", tokenizer: str | None = None,
               context_length: int | None = None, max_image_bytes: int | None = None):
    self.mode = mode
    self.image_size = image_size
    self.seed = seed
    self.embed_dim = embed_dim
    self.crop_scale = tuple(crop_scale)
    self.crop_ratio = tuple(crop_ratio)
    self.caption_field = caption_field
    self.tokenizer = tokenizer
    self.context_length = context_length
    self.max_image_bytes = max_image_bytes
    self.image_files = source.image_files
    self.embedding_files = source.embedding_files
    self.offsets = source.offsets  # record = its index in the source (for the digest)

  def _where(self, files, item) -> str:
    return f"{files[item['shard']]} record {item['offset']}"

  def __call__(self, position: int, item: Mapping[str, Any]) -> dict[str, np.ndarray]:
    reason = 0
    image_rec = records.unpack(item["image_record"], self._where(self.image_files, item))
    if self.mode == "lift":
      emb_rec = records.unpack(item["embedding_record"], self._where(self.embedding_files, item))
      if emb_rec["key"] != image_rec["key"]:
        raise records.RecordError(
            f"{self._where(self.embedding_files, item)} has key {emb_rec['key']!r} but "
            f"{self._where(self.image_files, item)} has key {image_rec['key']!r}: the embedding "
            "shards are not aligned with the image shards")
      text = records.decode_embedding(emb_rec)
      if text.shape != (self.embed_dim,):
        raise records.RecordError(f"{self._where(self.embedding_files, item)}: embedding of "
                                  f"dim {text.shape[0]}, the config expects {self.embed_dim}")
      if emb_rec.get("flag"):
        reason = REASONS.index("flagged_embedding")
      elif not np.all(np.isfinite(text)):
        reason = REASONS.index("nan_embedding")
      if reason:
        text = np.zeros_like(text)
    else:
      caption = image_rec.get(self.caption_field)
      if not isinstance(caption, str) or not caption.strip():
        reason = REASONS.index("missing_caption")
        caption = ""
      text = get_tokenizer(self.tokenizer, self.context_length)([caption])[0]
    data = image_rec.get("image", b"")
    image = None
    if self.max_image_bytes and len(data) > self.max_image_bytes:
      reason = reason or REASONS.index("large_image")
    else:
      try:
        rng = np.random.default_rng([self.seed, position])
        img = transforms.decode(data, min_size=self.image_size)
        image = transforms.random_resized_crop(img, self.image_size, rng, self.crop_scale,
                                               self.crop_ratio)
      except transforms.DecodeError:
        reason = reason or REASONS.index("bad_image")
    if image is None:
      image = np.zeros((self.image_size, self.image_size, 3), np.uint8)
    return {"image": image, "text": text, "valid": np.bool_(reason == 0),
            "reason": np.int8(reason), "record": np.int64(self.offsets[item["shard"]] +
                                                         item["offset"])}


# ----------------------------------------------------------------------------------------------
# Per-process slicing of global batches
# ----------------------------------------------------------------------------------------------


class ProcessSlice(grain.MapDataset):
  """Element i of process p = global position (i // b) * B + p * b + i % b."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    if global_batch % process_count:
      raise PipelineError(f"global batch {global_batch} does not divide by the "
                          f"{process_count} processes")
    self._global = global_batch
    self._local = global_batch // process_count
    self._index = process_index

  def __len__(self) -> int:
    return sys.maxsize

  def _position(self, i: int) -> int:
    step, k = divmod(i, self._local)
    return step * self._global + self._index * self._local + k

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._position(index)]

  def _getitems(self, indices):
    positions = [self._position(i) for i in indices]
    return self._parent._getitems(positions)  # pylint: disable=protected-access

  def __str__(self) -> str:
    return f"ProcessSlice(process={self._index}, local={self._local}, global={self._global})"


# ----------------------------------------------------------------------------------------------
# Building the pipeline from the config
# ----------------------------------------------------------------------------------------------


def check_embeddings(image_dir: str, embedding_dir: str, embed_dim: int,
                     warn=None) -> list[int]:
  """Checks the embedding manifest against the config and the image shards' manifest (counts,
  freshness); returns the per-shard record counts. Opens no shard."""
  manifest = records.read_manifest(embedding_dir)
  dim = manifest.get("dim")
  if dim is not None and int(dim) != int(embed_dim):
    raise PipelineError(f"{embedding_dir}/manifest.json: embeddings have dim {dim}, but "
                        f"config.model.embed_dim is {embed_dim}")
  dtype = manifest.get("storage_dtype")
  if dtype is not None and dtype not in records.STORAGE_DTYPES:
    raise PipelineError(f"{embedding_dir}/manifest.json: unknown storage_dtype {dtype!r}")
  return records.check_aligned(image_dir, embedding_dir, warn=warn)


def require_paths(config) -> None:
  """Names the missing data setting and the command that makes the data."""
  data = config.data
  prepared = "" if data.get("prepare") in (None, "", "None", "none") else (
      f" (data.prepare={data.prepare!r} builds it: `python -m lift_jax.main --config=CONFIG "
      "--workdir=WORKDIR --prepare_only`, or run without --prepare_only)")
  if not data.get("images"):
    raise PipelineError("config.data.images is not set: point it at a folder of image shards "
                        "(--config.data.images=DIR), made with `python -m lift_jax.data.convert "
                        "--output=DIR --images=IMAGES_DIR --captions=FILE`" + prepared)
  if config.model.mode == "lift" and not data.get("embeddings"):
    raise PipelineError("config.data.embeddings is not set: LIFT trains against precomputed "
                        "caption embeddings (--config.data.embeddings=DIR), made with "
                        "`python -m embed.main --config=embed/configs/minilm.py --config.images="
                        f"{data.images} --config.output=DIR`" + prepared)


def train_dataset(config, process_index: int = 0, process_count: int = 1,
                  warn=None, start_batch: int = 0) -> grain.IterDataset:
  """The per-process grain IterDataset of local batches for ``config`` (a training config),
  from global batch ``start_batch`` on.

  Record counts come from the manifests: start-up opens no shard (each worker opens the shards
  it reads, when it first reads them).
  """
  data, model = config.data, config.model
  require_paths(config)
  embedding_files = None
  if model.mode == "lift":
    counts = check_embeddings(data.images, data.embeddings, model.embed_dim, warn=warn)
    image_files = records.list_shards(data.images, records.IMAGES)
    embedding_files = records.list_shards(data.embeddings, records.EMBEDDINGS)
  else:
    image_files, counts, _ = records.shard_counts(data.images, records.IMAGES, warn)
  if model.mode == "clip":  # loaded here, once, before any reader thread asks for it
    get_tokenizer(data.tokenizer, model.text.context_length)
  source = PairedSource(image_files, embedding_files, counts)
  if len(source) == 0:
    raise PipelineError(f"{data.images} holds no records")
  transform = TrainTransform(
      mode=model.mode, image_size=model.image_size, seed=config.seed, source=source,
      embed_dim=model.embed_dim, crop_scale=data.crop_scale, crop_ratio=data.crop_ratio,
      caption_field=data.caption_field, tokenizer=data.tokenizer,
      context_length=model.text.context_length if model.mode == "clip" else None,
      max_image_bytes=data.max_image_bytes)
  ds = grain.MapDataset.source(source).shuffle(seed=config.seed).repeat()
  ds = ds.map_with_index(transform)
  ds = ProcessSlice(ds, config.batch_size, process_index, process_count)
  ds = ds.batch(config.batch_size // process_count, drop_remainder=True)
  if start_batch:
    ds = ds[start_batch:]  # local batch t is global batch t on any number of processes
  threads = int(data.read_threads)
  ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                             prefetch_buffer_size=max(2 * threads, 2)))
  workers = int(data.workers)
  if workers > 0:
    _absl_flags_parsed()
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                      per_worker_buffer_size=2))
  return ids


def _absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside ``app.run`` (notebooks, tests) they would
  raise UnparsedFlagAccessError, so take the defaults."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


_MASK64 = (1 << 64) - 1


def record_digest(records: np.ndarray, batch: int) -> int:
  """An order-sensitive digest of the records of one batch: the sum (mod 2**64) of a 64-bit mix
  of each (record, batch index). Sums over processes and batches add up, whatever the split."""
  with np.errstate(over="ignore"):
    x = np.asarray(records, np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(batch)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
      x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
    x ^= x >> np.uint64(31)
    return int(np.sum(x, dtype=np.uint64)) & _MASK64


class Batches:
  """Global batches as jax.Arrays, prefetched on a thread.

  It counts what it has handed out (not what sits in the prefetch queue, so a checkpoint taken
  after step t resumes at batch t + 1): ``batches_served``, the examples of this process by
  REASON (``reason_counts``), and ``digest``, the sum of :func:`record_digest` over the batches
  (this process's rows). A resumed run passes the saved values in ``start`` (the counts and
  digest summed over every process on process 0, zeros on the others).
  """

  def __init__(self, dataset: grain.IterDataset, sharding, prefetch: int = 2,
               start: tuple[int, Sequence[int], int] | None = None):
    self._iterator = iter(dataset)
    self._sharding = sharding
    self._prefetch = max(int(prefetch), 0)
    batches, reasons, digest = start or (0, (), 0)
    self._batches = int(batches)
    self._reasons = [int(r) for r in reasons] or [0] * len(REASONS)
    self._reasons += [0] * (len(REASONS) - len(self._reasons))
    self._digest = int(digest) & _MASK64
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()

  # -- producer ---------------------------------------------------------------------------------
  def _fetch(self):
    import jax  # this module stays importable without JAX (the embedding job reads records)

    local = next(self._iterator)
    # Reason codes and record ids stay on the host: counted here, the step needs only `valid`.
    arrays = {k: jax.make_array_from_process_local_data(self._sharding, np.asarray(v))
              for k, v in local.items() if k not in ("reason", "record")}
    reasons = np.bincount(np.asarray(local["reason"]).astype(np.int64), minlength=len(REASONS))
    return arrays, reasons, np.asarray(local["record"])

  def _run(self):
    try:
      while not self._stop.is_set():
        item = self._fetch()
        while not self._stop.is_set():
          try:
            self._queue.put(("ok", item), timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # surfaced to the consumer, with its traceback
      self._queue.put(("error", e))

  # -- consumer ---------------------------------------------------------------------------------
  def __iter__(self):
    return self

  def __next__(self) -> tuple[dict[str, Any], np.ndarray]:
    """(global batch dict, this process's counts of each REASON in it)."""
    if self._prefetch == 0:
      arrays, reasons, record_ids = self._fetch()
    else:
      if self._thread is None:
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._thread = threading.Thread(target=self._run, daemon=True, name="batches")
        self._thread.start()
      kind, item = self._queue.get()
      if kind == "error":
        raise item
      arrays, reasons, record_ids = item
    self._digest = (self._digest + record_digest(record_ids, self._batches)) & _MASK64
    self._batches += 1
    self._reasons = [a + int(b) for a, b in zip(self._reasons, reasons)]
    return arrays, reasons

  @property
  def batches_served(self) -> int:
    return self._batches

  @property
  def reason_counts(self) -> dict[str, int]:
    """This process's examples handed out so far (resumed runs included), by REASON."""
    return dict(zip(REASONS, self._reasons))

  @property
  def digest(self) -> int:
    return self._digest

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
    close = getattr(self._iterator, "close", None)
    if close:
      close()
