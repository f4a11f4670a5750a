"""Data the benchmarks generate, written through the project's own shard writer
(:func:`lift_jax.data.shards.build_shards`, resumable and verified like every other folder of
shards): JPEG image shards the size of pre-resized web photos, random caption embeddings aligned
with an image folder, a random text bank, and captions of web-like lengths."""

from __future__ import annotations

import functools
import io
import os
import tempfile

import numpy as np
from PIL import Image

from lift_jax.data import records, shards

# Captions for the generated records and the embedding row: lengths spread like web alt-texts
# and short re-captions (3 to 40 words), from a fixed vocabulary.
_CAPTION_WORDS = ("a photo of the small large red blue green old new wooden metal dog cat man "
                  "woman child car house tree street table on in with near under next to "
                  "standing sitting running white black bright dark city beach field room "
                  "window light water sky building two three people group close view").split()


def caption(rng: np.random.Generator) -> str:
  n = int(rng.integers(3, 41))
  return " ".join(rng.choice(_CAPTION_WORDS, size=n))


def jpeg_record(seed: int, index: int) -> shards.Outcome:
  """Record ``index`` of a generated image set: a 256x341 JPEG (quality 90) of smooth colour
  fields plus noise, about the size and decode cost of a pre-resized web photo, and a caption.
  A ``shards.build_shards`` worker (module level, so it pickles)."""
  rng = np.random.default_rng([seed, index])
  coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(coarse).resize((341, 256), Image.BICUBIC), np.float32)
  img += rng.normal(0, 12, img.shape)
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
  key = f"bench-{index:08d}"
  return key, records.image_record(key, buf.getvalue(), caption(rng)), ()


def _random_embedding(dim: int, item: tuple[int, str]) -> shards.Outcome:
  """A random float16 vector for ``item`` = (position, key); a build_shards worker."""
  position, key = item
  vector = np.random.default_rng([dim, position]).normal(size=dim)
  return key, records.embedding_record(key, vector), ()


def images(folder: str, n: int, num_shards: int, seed: int = 0, workers: int = 1) -> str:
  """``n`` generated JPEG records in ``num_shards`` image shards (kept when complete)."""
  shards.build_shards(folder, shards.split_even(range(n), num_shards),
                      functools.partial(jpeg_record, seed),
                      identity={"bench_jpeg": 1, "seed": seed, "records": n,
                                "shards": num_shards},
                      workers=workers, progress=False, desc="images", log=print)
  return folder


def embeddings(image_dir: str, dim: int, out: str | None = None) -> str:
  """Random embedding shards aligned with ``image_dir`` (a benchmark needs only their bytes), with
  a manifest like the embedding job's: dim, storage dtype, per-shard counts and SHA-256s, and
  the SHA-256 of the image shard each was computed from."""
  out = out or tempfile.mkdtemp(prefix="bench_embeddings_")
  paths = records.list_shards(image_dir, records.IMAGES)
  image_sha = {e["file"]: e.get("sha256") for e in records.read_manifest(image_dir)["shards"]}
  keys = [records.read_keys(p) for p in paths]
  starts = np.cumsum([0] + [len(k) for k in keys])
  items = [list(enumerate(k, start=int(s))) for k, s in zip(keys, starts)]
  shards.build_shards(
      out, items, functools.partial(_random_embedding, dim),
      identity={"bench_embeddings": 1, "dim": dim, "images": [image_sha.get(os.path.basename(p))
                                                             for p in paths]},
      info={"dim": dim, "storage_dtype": "float16", "normalized": False},
      prefix=records.EMBEDDINGS, kind="embeddings", progress=False, log=lambda _: None,
      entry_info=lambda i: {"image_sha256": image_sha.get(os.path.basename(paths[i]))})
  return out


def text_bank(folder: str, texts: list[str], dim: int) -> str:
  """A text bank of random vectors for ``texts`` (distinct), keyed by the exact text."""
  texts = list(dict.fromkeys(texts))
  shards.build_shards(folder, [list(enumerate(texts))], functools.partial(_random_embedding, dim),
                      identity={"bench_bank": 1, "dim": dim, "texts": len(texts)},
                      info={"dim": dim, "storage_dtype": "float16"}, prefix=records.BANK,
                      kind="text_bank", progress=False, log=lambda _: None)
  return folder


def suite_data(folder: str, records_n: int, dim: int, eval_n: int = 256) -> dict[str, str]:
  """JPEG image shards + aligned embedding shards (no embedding job), a small eval shard folder
  and a text bank of its captions; each part is reused when already complete."""
  out = {"images": os.path.join(folder, "images"), "embeddings": os.path.join(folder, "embeddings"),
         "eval_images": os.path.join(folder, "eval_images"), "bank": os.path.join(folder, "bank"),
         "captions": os.path.join(folder, "captions.txt")}
  workers = min(os.cpu_count() or 1, 16)
  images(out["images"], records_n, max(1, min(16, records_n // 256)), seed=0, workers=workers)
  images(out["eval_images"], eval_n, 1, seed=1, workers=workers)
  embeddings(out["images"], dim, out["embeddings"])
  captions = [r["caption"] for p in records.list_shards(out["eval_images"], records.IMAGES)
              for r in records.iter_records(p)]
  text_bank(out["bank"], captions, dim)
  return out


def captions_file(path: str, n: int) -> str:
  """``n`` generated captions, one per line."""
  rng = np.random.default_rng(2)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(caption(rng) + "\n" for _ in range(n))
  return path
