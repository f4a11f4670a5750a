"""Image and text embeddings for the evaluators, computed in sharded global batches.

Images: decoded on a thread pool (any PIL mode -> RGB), Resize(shorter side, bicubic) +
CenterCrop, sent to the devices as uint8 and normalised there. Every global batch has the same
shape: the last one is padded with blank images whose rows are dropped afterwards, so one
compiled function serves every batch. Each process decodes only its own rows of a global batch
(``jax.make_array_from_process_local_data``); the embeddings come back replicated, so every
process returns the full matrix.

Texts: LIFT looks texts up in a text bank (exact strings, written by ``embed.main``); CLIP
tokenises them and runs the model's text tower in the same sharded batches.

The model's parameters are an argument of the jitted functions, not a constant baked into them:
the trainer calls :meth:`Predictor.set_params` between evaluations without recompiling.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from PIL import Image

from lift_jax import cli
from lift_jax import config_lib
from lift_jax import sharding as shd
from lift_jax.data import records, transforms
from lift_jax.data.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)

BANK_HELP = (
    "Create the bank from the texts the benchmarks score: write them with "
    "`python -m eval.main --config=CONFIG --write_texts=FILE` (or `python -m embed.banks "
    "--out=FILE --imagenet=DIR --captions=FILE --sugarcrepe=DIR`), "
    "then embed them with the encoder of the training captions: `python -m embed.main "
    "--config=embed/configs/minilm.py --config.texts=FILE --config.output=DIR` "
    "(embed/configs/nvembed_v2.py for NV-Embed-v2), and set config.evals.text_bank=DIR.")


@cli.user_error
class ImageLoadError(ValueError):
  """An image could not be read or decoded; the message names it."""


@cli.user_error
class TextBankError(ValueError):
  """The text bank is missing, unreadable, of the wrong width or lacks texts."""


# --------------------------------------------------------------------------------------------
# Text bank (LIFT)
# --------------------------------------------------------------------------------------------


class TextBank:
  """Exact text -> L2-normalised float32 embedding, from a folder written by ``embed.main``."""

  def __init__(self, folder: str, dim: int | None = None):
    self.folder = folder
    if not os.path.isdir(folder):
      raise TextBankError(f"text bank {folder} does not exist. {BANK_HELP}")
    try:
      self.index, matrix, self.manifest = records.load_text_bank(folder)
    except records.RecordError as e:
      raise TextBankError(f"text bank {folder} is not readable: {e}. {BANK_HELP}") from None
    if dim is not None and matrix.shape[1] != dim:
      raise TextBankError(f"text bank {folder} holds {matrix.shape[1]}-d embeddings but the model "
                          f"embeds into {dim} dimensions: it was made with another encoder "
                          f"({self.manifest.get('model', 'unknown model')}). {BANK_HELP}")
    # Normalised as the training forward pass normalises the text side (float32).
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    self.matrix = (matrix / np.maximum(norms, 1e-12)).astype(np.float32)

  def missing(self, texts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(t for t in texts if t not in self.index))

  def check(self, texts: Sequence[str]) -> None:
    missing = self.missing(texts)
    if missing:
      examples = "; ".join(repr(t) for t in missing[:5])
      raise TextBankError(
          f"{len(missing)} of {len(set(texts))} texts are missing from the text bank "
          f"{self.folder} (e.g. {examples}). {BANK_HELP}")

  def lookup(self, texts: Sequence[str]) -> np.ndarray:
    self.check(texts)
    return self.matrix[np.asarray([self.index[t] for t in texts], np.int64).reshape(-1)]


# --------------------------------------------------------------------------------------------
# Image loading (host)
# --------------------------------------------------------------------------------------------


def to_pil(item: Any) -> Image.Image:
  """A file path, encoded bytes, a uint8 HW/HWC array or a PIL image -> an RGB PIL image."""
  if isinstance(item, (str, os.PathLike)):
    try:
      with open(item, "rb") as f:
        data = f.read()
    except OSError as e:
      raise ImageLoadError(f"{item}: cannot read ({e.strerror or e})") from None
    try:
      # Full decode, no JPEG draft mode: eval must see the pixels torchvision's loader sees.
      return transforms.decode(data)
    except transforms.DecodeError as e:
      raise ImageLoadError(f"{item}: not a decodable image ({e})") from None
  if isinstance(item, (bytes, bytearray, memoryview)):
    try:
      return transforms.decode(bytes(item))
    except transforms.DecodeError as e:
      raise ImageLoadError(f"image bytes ({len(item)} bytes): not decodable ({e})") from None
  if isinstance(item, Image.Image):
    return transforms.to_rgb(item)
  if isinstance(item, np.ndarray):
    a = item
    if a.ndim == 3 and a.shape[-1] == 1:
      a = a[..., 0]
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
      raise ImageLoadError(f"image array of shape {item.shape} and dtype {item.dtype}: expected "
                           "uint8 HW, HWC with 1, 3 or 4 channels")
    return transforms.to_rgb(Image.fromarray(a))
  raise ImageLoadError(f"cannot load an image from a {type(item).__name__}")


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def _local_rows(sharding: NamedSharding, global_rows: int) -> np.ndarray:
  """Sorted indices of the rows of a batch-sharded global array held by this process's devices
  (``make_array_from_process_local_data`` expects them in this order)."""
  spans = set()
  for index in sharding.addressable_devices_indices_map((global_rows,)).values():
    spans.add(index[0].indices(global_rows)[:2])
  return np.concatenate([np.arange(a, b) for a, b in sorted(spans)])


# --------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------


class Predictor:
  """Embeds images and texts with a TwoTower model over a device mesh."""

  def __init__(self, model, *, mesh=None, batch_size: int | None = None,
               image_size: int | None = None,
               resize_size: int | None = None, mean=transforms.IMAGENET_MEAN,
               std=transforms.IMAGENET_STD, text_bank: str | TextBank | None = None,
               tokenizer: str | Callable[[list[str]], np.ndarray] | None = None,
               context_length: int | None = None, workers: int | None = None):
    """``batch_size`` and ``workers`` default to ``config.evals``'s (lift_jax.config_lib)."""
    defaults = config_lib.base().evals
    batch_size = batch_size or defaults.batch_size
    workers = workers or defaults.workers
    self.mesh = mesh if mesh is not None else shd.make_mesh()
    devices = self.mesh.devices.size
    # The global batch must split evenly over the devices; eval results do not depend on it.
    self.batch_size = -(-int(batch_size) // devices) * devices
    self.mode = model.mode
    self.embed_dim = int(model.embed_dim)
    self.image_size = int(image_size or model.image_size)
    self.resize_size = transforms.eval_resize_size(self.image_size, resize_size)
    self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    self.workers = max(1, int(workers))
    self._batch_sharding = shd.batch_sharding(self.mesh)
    self._replicated = shd.replicated(self.mesh)
    self._rows = _local_rows(self._batch_sharding, self.batch_size)
    self._image_cache: dict[str, np.ndarray] = {}
    # Images that could not be read or decoded, embedded as NaN rows (every process agrees).
    self.unusable_images = 0

    graphdef, state = nnx.split(model)
    self._graphdef = graphdef
    self.set_params(nnx.to_pure_dict(state))
    self._image_fn = jax.jit(self._encode_images, out_shardings=self._replicated)
    self._text_fn = self.tokenizer = None
    # LIFT: the bank is read on first use (a folder) or given ready (a TextBank).
    self.text_bank = text_bank if isinstance(text_bank, TextBank) else None
    self._bank_folder = None if self.text_bank or not text_bank else str(text_bank)
    if self.mode == "clip":
      self._text_fn = jax.jit(self._encode_texts, out_shardings=self._replicated)
      self.context_length = int(context_length or model.text.context_length)
      if callable(tokenizer):
        self.tokenizer = tokenizer
      elif tokenizer:
        self.tokenizer = get_tokenizer(str(tokenizer), self.context_length)

  # ------------------------------------------------------------------ parameters

  def set_params(self, params) -> None:
    """Uses ``params`` (the model's pure-dict parameters) from now on; clears the image cache.

    Arrays already laid out on this mesh (the trainer's, replicated or FSDP-sharded) are used
    as they are; anything else is replicated over the mesh.
    """
    def place(x):
      if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and \
          x.sharding.mesh == self.mesh:
        return x
      return jax.device_put(x, self._replicated)

    self._params = jax.tree.map(place, params)
    self._image_cache.clear()

  def clear_cache(self) -> None:
    self._image_cache.clear()

  # ------------------------------------------------------------------ jitted bodies

  def _encode_images(self, params, images, usable):
    model = nnx.merge(self._graphdef, params)
    z = model.encode_image(transforms.normalize(images, self.mean, self.std))
    # An image that could not be decoded gets NaN: never a hit in any metric, and counted.
    return jnp.where(usable[:, None], z, jnp.nan)

  def _encode_texts(self, params, tokens):
    model = nnx.merge(self._graphdef, params)
    return model.encode_text(tokens)

  # ------------------------------------------------------------------ batching

  def _global(self, local: np.ndarray) -> jax.Array:
    shape = (self.batch_size,) + local.shape[1:]
    return jax.make_array_from_process_local_data(self._batch_sharding, local, shape)

  def _run(self, fn, local_batches: Iterator[tuple[np.ndarray, int]]) -> np.ndarray:
    """Runs ``fn(params, global batch)`` on each (process-local rows, valid rows) and stacks
    the valid rows; the next batch is dispatched before the previous result is fetched."""
    out, pending = [], None
    with jax.set_mesh(self.mesh):
      for local, n_valid in local_batches:
        local = local if isinstance(local, tuple) else (local,)
        result = fn(self._params, *map(self._global, local))
        if pending is not None:
          out.append(self._fetch(*pending))
        pending = (result, n_valid)
      if pending is not None:
        out.append(self._fetch(*pending))
    if not out:
      return np.zeros((0, self.embed_dim), np.float32)
    return np.concatenate(out)

  @staticmethod
  def _fetch(result: jax.Array, n_valid: int) -> np.ndarray:
    # Replicated output: this process's first shard is the whole batch.
    return np.asarray(result.addressable_shards[0].data)[:n_valid]

  # ------------------------------------------------------------------ images

  def load_image(self, item: Any) -> np.ndarray:
    """uint8 [image_size, image_size, 3]: the eval transform of one item."""
    img = to_pil(item)
    try:
      return transforms.resize_center_crop(img, self.resize_size, self.image_size)
    except ValueError as e:
      where = item if isinstance(item, (str, os.PathLike)) else "image"
      raise ImageLoadError(f"{where}: {e}") from None

  def _load_or_none(self, item: Any) -> np.ndarray | None:
    """The eval transform of one item, or None (logged, then counted) when it cannot be read."""
    try:
      return self.load_image(item)
    except ImageLoadError as e:
      logger.warning("eval image unusable, scored as a miss: %s", e)
      return None

  def _image_batches(self, items: Iterable[Any], pool
                     ) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], int]]:
    s = self.image_size
    blank = np.zeros((s, s, 3), np.uint8)
    rows = len(self._rows)

    def submit(batch):
      mine = [batch[i] for i in self._rows if i < len(batch)]  # padding rows come last
      return [pool.submit(self._load_or_none, it) for it in mine], len(batch)

    ahead = collections.deque()
    for batch in _batches(items, self.batch_size):  # two batches decode while devices work
      ahead.append(submit(batch))
      if len(ahead) == 2:
        yield self._collect(*ahead.popleft(), rows, blank)
    while ahead:
      yield self._collect(*ahead.popleft(), rows, blank)

  @staticmethod
  def _collect(futures, n_valid, rows, blank):
    images = [f.result() for f in futures]
    usable = np.asarray([im is not None for im in images] + [True] * (rows - len(images)))
    images = [blank if im is None else im for im in images]
    images += [blank] * (rows - len(images))  # padding of the last batch
    return (np.stack(images), usable), n_valid

  def embed_images(self, items: Iterable[Any]) -> np.ndarray:
    """float32 [N, D] L2-normalised embeddings of images given as paths, encoded bytes, uint8
    arrays or PIL images (any iterable; streamed in global batches).

    Embeddings of file paths are cached until the next :meth:`set_params` / :meth:`clear_cache`,
    so benchmarks sharing images (COCO retrieval and SugarCrepe) embed them once.
    """
    if isinstance(items, Sequence) and items and all(isinstance(i, str) for i in items):
      todo = [p for p in dict.fromkeys(items) if p not in self._image_cache]
      if todo:
        for path, row in zip(todo, self._embed_images(todo)):
          self._image_cache[path] = row
      self.unusable_images += sum(bool(np.isnan(self._image_cache[p]).any())
                                  for p in dict.fromkeys(items))
      return np.stack([self._image_cache[p] for p in items])
    out = self._embed_images(items)
    self.unusable_images += int(np.isnan(out).any(axis=1).sum())
    return out

  def _embed_images(self, items: Iterable[Any]) -> np.ndarray:
    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
      return self._run(self._image_fn, self._image_batches(items, pool))

  # ------------------------------------------------------------------ texts

  def _bank(self) -> TextBank:
    if self.text_bank is None:
      if not self._bank_folder:
        raise TextBankError(f"a LIFT model scores texts through a text bank, and "
                            f"config.evals.text_bank is not set. {BANK_HELP}")
      self.text_bank = TextBank(self._bank_folder, self.embed_dim)
    return self.text_bank

  def check_texts(self, texts: Sequence[str]) -> None:
    """LIFT: raises TextBankError unless the bank holds every text (CLIP: nothing to check)."""
    if self.mode == "lift":
      self._bank().check(texts)

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """float32 [N, D] L2-normalised text embeddings, one row per text (duplicates included)."""
    texts = list(texts)
    if self.mode == "lift":
      return self._bank().lookup(texts)
    if self.tokenizer is None:
      raise ValueError("a CLIP model needs a tokenizer (config.data.tokenizer) to embed texts")
    def batches():
      for batch in _batches(texts, self.batch_size):
        mine = [batch[i] for i in self._rows if i < len(batch)]
        tokens = np.zeros((len(self._rows), self.context_length), np.int32)  # padding: id 0
        if mine:
          ids = np.asarray(self.tokenizer(mine), np.int32)
          if ids.ndim != 2 or ids.shape[1] > self.context_length:
            raise ValueError(f"the tokenizer gave ids of shape {ids.shape}; expected "
                             f"({len(mine)}, <= {self.context_length})")
          tokens[:len(mine), :ids.shape[1]] = ids
        yield tokens, len(batch)

    return self._run(self._text_fn, batches())
