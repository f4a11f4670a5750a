"""Small, fully synthetic shard folders for trainer and pipeline tests (random images, captions
and embedding vectors), written through lift_jax.data.records like the real converters."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from lift_jax.data import records

WORDS = "red blue green small large circle square triangle left right above below".split()


def png(rng: np.random.Generator, size: int = 40) -> bytes:
  pixels = rng.integers(0, 256, size=(size, size + 8, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def write_dataset(root: str, n: int = 96, shards: int = 3, dim: int = 16, seed: int = 0,
                  bad_images=(), nan_embeddings=(), flagged=(), key_swap: tuple | None = None):
  """Writes root/images and root/embeddings; returns (image_dir, embedding_dir)."""
  rng = np.random.default_rng(seed)
  image_dir, emb_dir = os.path.join(root, "images"), os.path.join(root, "embeddings")
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(emb_dir, exist_ok=True)
  bounds = np.linspace(0, n, shards + 1).astype(int)
  img_entries, emb_entries = [], []
  for s in range(shards):
    img_recs, emb_recs = [], []
    for i in range(bounds[s], bounds[s + 1]):
      key = f"{i:06d}"
      image = b"\xff\xd8 not a jpeg" if i in bad_images else png(rng)
      caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
      img_recs.append(records.image_record(key, image, caption))
      vec = rng.normal(size=dim).astype(np.float32)
      if i in nan_embeddings:
        vec[0] = np.nan
      emb_key = key if not (key_swap and i == key_swap[0]) else key_swap[1]
      emb_recs.append(records.embedding_record(emb_key, vec, "float16",
                                               flag="empty" if i in flagged else ""))
    img_entries.append(records.write_shard(
        os.path.join(image_dir, records.shard_name("images", s, shards)), img_recs))
    emb_entries.append(records.write_shard(
        os.path.join(emb_dir, records.shard_name("embeddings", s, shards)), emb_recs))
  records.write_manifest(image_dir, {"kind": "images", "shards": img_entries})
  records.write_manifest(emb_dir, {"kind": "embeddings", "dim": dim, "storage_dtype": "float16",
                                   "normalized": False, "shards": emb_entries})
  return image_dir, emb_dir


def tiny_config(image_dir: str, emb_dir: str | None, mode: str = "lift", dim: int = 16,
                steps: int = 6, batch: int = 16, tokenizer: str | None = None):
  """A config small enough to train a few steps in seconds on CPU."""
  from lift_jax import config_lib

  c = config_lib.base(mode)
  c.total_steps = steps
  c.batch_size = batch
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.tensorboard = False
  c.async_checkpoints = False
  c.model.variant = "Ti/8"
  c.model.image_size = 32
  c.model.vit.width, c.model.vit.depth = 32, 2
  c.model.vit.num_heads, c.model.vit.mlp_dim = 2, 64
  c.model.dtype = "float32"
  c.model.embed_dim = dim
  c.optim.warmup_steps = 2
  c.optim.lr = 1e-3
  if mode == "lift":
    c.model.head_hidden = (24,)
  else:
    c.model.text.vocab_size = 30522
    c.model.text.context_length = 16
    c.model.text.width, c.model.text.depth, c.model.text.num_heads = 32, 1, 2
    c.model.text.eot_token_id = 102
    c.data.tokenizer = tokenizer
  c.data.images = image_dir
  c.data.embeddings = emb_dir
  c.data.workers = 0
  c.data.read_threads = 1
  return c
