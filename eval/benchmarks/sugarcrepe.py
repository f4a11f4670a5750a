"""``sugarcrepe``: SugarCrepe, or any suite in its schema (the synthetic compositional set).

A sample is correct iff sim(image, caption) > sim(image, negative caption), strictly; the metric
is the accuracy per subset and ``<name>/mean``, the unweighted mean of the subsets' accuracies.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from eval import texts as T
from eval.benchmarks.base import BenchmarkConfigError, Evaluator as _Base, as_tuple, field, present
from eval.benchmarks.base import require_file


@dataclasses.dataclass(frozen=True)
class Spec:
  name: str
  data_dir: str | None = field(None, "folder of `<subset>.json` files (required)", path=True)
  image_dir: str | None = field(None, "folder the records' `filename` is relative to (COCO "
                                "val2017)", path=True)
  subsets: tuple[str, ...] = field(T.SUGARCREPE_SUBSETS, "which subset files to score")
  limit: int | None = field(None, "score only the first N records of each subset")
  skip_missing: bool = field(False, "True: records of missing images are skipped and counted "
                             "(skipped_images); False: a missing image is an error")

  def __post_init__(self):
    object.__setattr__(self, "subsets", as_tuple(self.subsets))
    require_file(self.name, "data_dir", self.data_dir)

  def rows(self) -> dict[str, list[tuple[str, str, str]]]:
    """{subset: [(image filename, positive caption, negative caption)]}, limited."""
    rows = T.read_sugarcrepe(self.data_dir, self.subsets)
    return {s: r[:self.limit] if self.limit else r for s, r in rows.items()}

  def texts(self) -> list[str]:
    return T.unique(t for rows in self.rows().values() for _, pos, neg in rows for t in (pos, neg))


class Evaluator(_Base):
  """Accuracy per subset: sim(image, caption) > sim(image, negative caption), strictly."""

  def __init__(self, spec: Spec):
    super().__init__(spec)
    if not spec.image_dir:
      raise BenchmarkConfigError(f"benchmark {spec.name!r}: image_dir is required")
    rows = spec.rows()
    paths = {f: os.path.join(spec.image_dir, f)
             for f in T.unique(f for subset in rows.values() for f, _, _ in subset)}
    _, missing = present(spec, list(paths.values()))
    missing = set(missing)
    gone = {f for f, p in paths.items() if p in missing}
    self.rows = {s: [r for r in subset if r[0] not in gone] for s, subset in rows.items()}
    self.skipped_images = len(gone)
    self.skipped_samples = sum(len(r) for r in rows.values()) - sum(
        len(r) for r in self.rows.values())
    image_index = {f: i for i, f in enumerate(f for f in paths if f not in gone)}
    self.images = [paths[f] for f in image_index]
    self._texts = T.unique(t for subset in self.rows.values() for _, p, n in subset for t in (p, n))
    text_index = {t: i for i, t in enumerate(self._texts)}
    self.indices = {
        s: (np.asarray([image_index[f] for f, _, _ in subset], np.int32),
            np.asarray([text_index[p] for _, p, _ in subset], np.int32),
            np.asarray([text_index[n] for _, _, n in subset], np.int32))
        for s, subset in self.rows.items()}

  def scored_texts(self) -> list[str]:
    return self._texts

  def run(self, predictor) -> dict[str, float]:
    image_emb = predictor.embed_images(self.images)
    text_emb = predictor.embed_texts(self._texts)
    out, accs = {}, []
    for subset, (img, pos, neg) in self.indices.items():
      acc = self.metrics.pair_accuracy(image_emb, text_emb, img, pos, neg) if len(img) \
          else np.nan
      out[f"{self.name}/{subset}"] = acc
      if len(img):
        accs.append(acc)
    out[f"{self.name}/mean"] = float(np.mean(accs)) if accs else np.nan
    out[f"{self.name}/num_samples"] = float(sum(len(i[0]) for i in self.indices.values()))
    if self.spec.skip_missing:
      out[f"{self.name}/skipped_images"] = float(self.skipped_images)
      out[f"{self.name}/skipped_samples"] = float(self.skipped_samples)
    return out
