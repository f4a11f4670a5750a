"""Shared helpers of the embedding-job tests (no tests here): image shards, configs, captions."""

from __future__ import annotations

import glob
import os
import random

import torch

from embed.config import default_config
from lift_jax.data import records

# One thread: on a small shared machine, OpenMP threads that wait for busy cores make torch
# several times slower; results are the same.
torch.set_num_threads(1)

WORDS = ("a dog runs across the green field while two children play with a red ball near "
         "an old wooden fence under bright blue sky and white clouds as people walk by the "
         "river carrying bags of fresh bread from small bakery on corner street").split()


def captions(n: int, seed: int = 0) -> list[str]:
  """Caption-like texts with DataComp-like lengths (a few to a few dozen words)."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    k = max(2, min(60, int(rng.lognormvariate(2.3, 0.5))))
    out.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
  return out


def write_image_shards(folder: str, shards: list[list], prefix: str = "img") -> list[str]:
  """Image shards whose records carry the given captions (or full record dicts)."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i, caps in enumerate(shards):
    path = os.path.join(folder, records.shard_name(records.IMAGES, i, len(shards)))
    recs = []
    for j, cap in enumerate(caps):
      if isinstance(cap, dict):
        recs.append(records.pack({"key": f"{prefix}{i}_{j}", "image": b"\xff\xd8jpeg", **cap}))
      elif isinstance(cap, bytes):  # a record packed by hand
        recs.append(cap)
      else:
        recs.append(records.image_record(f"{prefix}{i}_{j}", b"\xff\xd8jpeg", cap))
    records.write_shard(path, recs)
    paths.append(path)
  return paths


def minilm_config(model: str, **overrides):
  c = default_config()
  c.model = model
  c.encoder = "mean"
  c.dtype = "float32"
  c.device = "cpu"
  c.progress = False
  c.max_length = 77
  c.batch_tokens = 2048
  c.threads = 1
  for k, v in overrides.items():
    c[k] = v
  return c


def shard_bytes(folder: str, prefix: str = records.EMBEDDINGS) -> dict[str, bytes]:
  out = {}
  for path in sorted(glob.glob(os.path.join(folder, f"{prefix}-*.array_record"))):
    with open(path, "rb") as f:
      out[os.path.basename(path)] = f.read()
  return out


def vectors(path: str):
  """(keys, float32 matrix, flags) of an embedding or bank shard."""
  import numpy as np

  recs = list(records.iter_records(path))
  return ([r["key"] for r in recs], np.stack([records.decode_embedding(r) for r in recs]),
          [r["flag"] for r in recs])
