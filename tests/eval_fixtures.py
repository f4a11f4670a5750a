"""Shared pieces of the eval tests: tiny model configs, text banks, image files in odd modes."""

from __future__ import annotations

import functools
import os

import ml_collections
import numpy as np
from PIL import Image

from lift_jax.data import records

VIT = dict(width=32, depth=1, num_heads=2, mlp_dim=64)
DIM = 16


def lift_model_config() -> dict:
  return dict(mode="lift", variant="Ti/16", vit=dict(VIT), image_size=32, embed_dim=DIM,
              head_hidden=(32,), dtype="float32")


def clip_model_config(eot_token_id: int = 102, vocab_size: int = 30522) -> dict:
  return dict(mode="clip", variant="Ti/16", vit=dict(VIT), image_size=32, embed_dim=DIM,
              head_hidden=(), dtype="float32",
              text=dict(vocab_size=vocab_size, context_length=24, width=32, depth=1, num_heads=2,
                        eot_token_id=eot_token_id))


@functools.cache
def tiny_model(mode: str = "lift", seed: int = 0):
  """A randomly initialised tiny TwoTower, built once per test session (eager init is slow)."""
  from lift_jax.models.two_tower import build_model

  cfg = lift_model_config() if mode == "lift" else clip_model_config()
  return build_model(cfg, seed=seed)


def config(model: dict, benchmarks: dict, text_bank: str | None = None,
           tokenizer: str | None = None, batch_size: int = 64) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model
  c.data = dict(tokenizer=tokenizer)
  c.evals = dict(batch_size=batch_size, text_bank=text_bank, resize_size=None, workers=2,
                 benchmarks=benchmarks)
  return c


def write_bank(folder: str, texts, dim: int = DIM, seed: int = 0, vectors=None) -> str:
  """A text bank of ``texts`` (random vectors unless given), as embed.main writes one."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  texts = list(texts)
  if vectors is None:
    vectors = rng.standard_normal((len(texts), dim)).astype(np.float32)
  entry = records.write_shard(
      os.path.join(folder, records.shard_name(records.BANK, 0, 1)),
      (records.embedding_record(t, v, "float32") for t, v in zip(texts, vectors)))
  records.write_manifest(folder, {"kind": "text_bank", "dim": int(dim), "shards": [entry]})
  return folder


def odd_images(folder: str) -> list[str]:
  """Image files in modes a loader must convert: CMYK JPEG, palette PNG (with transparency),
  RGBA PNG, 16-bit grayscale PNG, LA PNG, a tiny 1x1 and a very wide image."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(1)
  rgb = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
  paths = []

  def save(name, img, **kw):
    p = os.path.join(folder, name)
    img.save(p, **kw)
    paths.append(p)

  save("cmyk.jpg", rgb.convert("CMYK"), quality=90)
  pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
  pal.info["transparency"] = 0
  save("palette.png", pal, transparency=0)
  rgba = rgb.convert("RGBA")
  rgba.putalpha(Image.fromarray(rng.integers(0, 256, (48, 40), dtype=np.uint8)))
  save("rgba.png", rgba)
  save("gray16.png", Image.fromarray(rng.integers(0, 65535, (30, 50), dtype=np.uint16)))
  save("la.png", rgb.convert("LA"))
  save("tiny.png", Image.new("RGB", (1, 1), (200, 10, 10)))
  save("wide.jpg", Image.fromarray(rng.integers(0, 256, (8, 400, 3), dtype=np.uint8)))
  return paths


def stand_in_image(path: str, seed: int, size=(64, 48)) -> None:
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
      path, quality=90)


class FakePredictor:
  """Embeddings chosen by the test: images by file name, texts by string."""

  def __init__(self, images: dict[str, np.ndarray], texts: dict[str, np.ndarray]):
    self.images, self.texts = images, texts

  def embed_images(self, items):
    return np.stack([np.asarray(self.images[os.path.basename(p)], np.float32) for p in items])

  def embed_texts(self, texts):
    return np.stack([np.asarray(self.texts[t], np.float32) for t in texts])
