"""``retrieval``: image <-> text retrieval, Recall@k both ways.

One source: ``captions`` + ``image_dir`` (COCO ``captions_*.json``, Flickr30K
``flickr_annotations_30k.csv``, or a TSV/CSV/JSONL captions file, see :mod:`eval.texts`) or
``shards`` (image shards whose records hold ``caption_field``, a string or a list). In
image->text an image's positives are the distinct strings of its captions, so a caption shared
word for word by two images (70 of COCO's 5,000 first captions) is a correct answer for both;
text->image queries stay one per caption, as in the standard protocol.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from eval import texts as T
from eval.benchmarks.base import BenchmarkConfigError, Evaluator as _Base, as_tuple, field, present
from eval.benchmarks.base import require_file, shard_images, shard_records

PROTOCOLS = ("lift", "standard")


@dataclasses.dataclass(frozen=True)
class Spec:
  name: str
  captions: str | None = field(None, "captions file (COCO json, Flickr30K csv, TSV/CSV/JSONL)",
                               path=True)
  image_dir: str | None = field(None, "folder the captions' file names are relative to",
                                path=True)
  shards: str | None = field(None, "image shards whose records hold `caption_field`", path=True)
  caption_field: str = field("caption", "shards: the record field holding the caption(s)")
  split: str | None = field("test", "rows of this split when the captions file has a split "
                            "column (Flickr30K's 1k test set; '' = all rows)")
  protocol: str = field("standard", "'lift' (first caption per image, R@1) or 'standard' (all "
                        "captions, R@1/5/10)")
  ks: tuple[int, ...] | None = field(None, "recall cut-offs; default by protocol")
  limit: int | None = field(None, "score only the first N images")
  skip_missing: bool = field(False, "True: missing images are skipped and counted; False: error")
  texts_only: bool = False

  def __post_init__(self):
    if self.protocol not in PROTOCOLS:
      raise BenchmarkConfigError(f"benchmark {self.name!r}: protocol must be one of "
                                 f"{PROTOCOLS}, got {self.protocol!r}")
    ks = self.ks if self.ks is not None else ((1,) if self.protocol == "lift" else (1, 5, 10))
    object.__setattr__(self, "ks", tuple(int(k) for k in as_tuple(ks)))
    if bool(self.captions) == bool(self.shards):
      raise BenchmarkConfigError(f"benchmark {self.name!r}: give either captions + image_dir "
                                 "or shards")
    if self.captions:
      require_file(self.name, "captions", self.captions)
      if not self.image_dir and not self.texts_only:
        raise BenchmarkConfigError(f"benchmark {self.name!r}: captions needs image_dir")

  def _select(self, caps: list[str]) -> list[str]:
    return caps[:1] if self.protocol == "lift" else list(caps)

  def image_captions(self) -> list[tuple[str, list[str]]]:
    """[(image path or shard key, [captions scored])] in file order, limited; images without
    captions are left out (they could never be retrieved)."""
    if self.captions:
      pairs = [(os.path.join(self.image_dir or "", f), self._select(c))
               for f, c in T.read_captions(self.captions, self.split or None).items()]
    else:
      pairs = []
      for key, r in shard_records(self.shards, (self.caption_field,)):
        value = r[self.caption_field]
        pairs.append((key, self._select([value] if isinstance(value, str) else list(value))))
    pairs = [(k, c) for k, c in pairs if c]
    return pairs[:self.limit] if self.limit else pairs

  def texts(self) -> list[str]:
    return T.unique(c for _, caps in self.image_captions() for c in caps)


class Evaluator(_Base):
  """Recall@k image->text (a hit is any of the image's captions) and text->image."""

  def __init__(self, spec):
    super().__init__(spec)
    pairs = spec.image_captions()
    self.skipped_images = 0
    if spec.captions:
      found, missing = present(spec, [p for p, _ in pairs])
      keep = set(found)
      pairs = [(p, c) for p, c in pairs if p in keep]
      self.skipped_images = len(missing)
    self.images = [p for p, _ in pairs]
    self._texts = T.unique(c for _, caps in pairs for c in caps)
    index = {t: i for i, t in enumerate(self._texts)}
    self.image_positives = self.metrics.padded_positives(
        [[index[c] for c in T.unique(caps)] for _, caps in pairs])
    self.query_texts = np.asarray([index[c] for _, caps in pairs for c in caps], np.int64)
    self.query_images = np.asarray([i for i, (_, caps) in enumerate(pairs) for _ in caps],
                                   np.int32)

  def scored_texts(self) -> list[str]:
    return self._texts

  def run(self, predictor) -> dict[str, float]:
    m = self.metrics
    if self.spec.captions:
      image_emb = predictor.embed_images(self.images)
    else:
      image_emb = predictor.embed_images(shard_images(self.spec.shards, self.images))
    text_emb = predictor.embed_texts(self._texts)
    i2t = m.ranks(image_emb, text_emb, self.image_positives)
    t2i = m.ranks(text_emb[self.query_texts], image_emb, self.query_images)
    out = {}
    for direction, rank in (("i2t", i2t), ("t2i", t2i)):
      for k, v in m.recall_at_k(rank, self.spec.ks).items():
        out[f"{self.name}/{direction}_r{k}"] = v
    out[f"{self.name}/num_images"] = float(len(self.images))
    out[f"{self.name}/num_texts"] = float(len(self.query_texts))
    if self.spec.skip_missing:
      out[f"{self.name}/skipped_images"] = float(self.skipped_images)
    return out
