"""``zeroshot``: classification by text prompts, top-k accuracy.

One image source: ``labels`` + ``image_dir`` (a TSV ``filename<TAB>class_index``, header
optional), ``image_dir`` alone (an ImageFolder ``image_dir/<wnid>/*``; classes in ``wnids`` file
order, or the sorted sub-folders, whose count must equal the class names'), ``shards`` (a folder
of ``images-*.array_record`` whose records hold ``label_field``) or ``tfds_data_dir``
(tensorflow-datasets ``tfds_name``:``tfds_split`` prepared in that local folder; nothing is
downloaded). Classes whose prompts are identical (Keras names repeat "crane" and "maillot";
OpenAI's repeat "missile" and "sunglasses") are positives together.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import numpy as np

from eval import texts as T
from eval.benchmarks.base import BenchmarkConfigError, Evaluator as _Base, as_tuple, field, present
from eval.benchmarks.base import require_file, shard_records
from lift_jax.data import records

PROTOCOLS = ("lift", "openai", "custom")
# The prompt files of each ImageNet protocol, in a folder such as ../shared/data/imagenet.
IMAGENET_PROMPT_FILES = {"lift": ("classnames_keras.txt", "templates_lift.txt"),
                         "openai": ("classnames.txt", "templates.txt")}


@dataclasses.dataclass(frozen=True)
class Spec:
  name: str
  classnames: str | None = field(None, "class names, one per line (required)", path=True)
  templates: str | None = field(None, "prompt templates, one per line, `{}` marks the name "
                                "(required)", path=True)
  protocol: str = field("custom", "'lift' (exactly one template), 'openai' (the 80 templates, "
                        "averaged) or 'custom': a checked label, the files decide the prompts")
  image_dir: str | None = field(None, "image folder (with `labels`), or an ImageFolder",
                                path=True)
  labels: str | None = field(None, "TSV `filename<TAB>class_index` of image_dir", path=True)
  wnids: str | None = field(None, "ImageFolder: one folder name per class, in class order",
                            path=True)
  shards: str | None = field(None, "image shards whose records hold `label_field`", path=True)
  label_field: str = field("label", "shards: the record field holding the class index")
  tfds_data_dir: str | None = field(None, "tensorflow-datasets folder (prepared, read offline)",
                                    path=True)
  tfds_name: str = field("imagenet2012", "tensorflow-datasets name")
  tfds_split: str = field("validation", "tensorflow-datasets split")
  top_k: tuple[int, ...] = field((1, 5), "accuracies reported")
  limit: int | None = field(None, "score only the first N images")
  skip_missing: bool = field(False, "True: missing images are skipped and counted; False: error")
  texts_only: bool = False  # parse(..., texts_only=True): listing texts needs no image source

  def __post_init__(self):
    object.__setattr__(self, "top_k", tuple(int(k) for k in as_tuple(self.top_k)))
    if self.protocol not in PROTOCOLS:
      raise BenchmarkConfigError(f"benchmark {self.name!r}: protocol must be one of "
                                 f"{PROTOCOLS}, got {self.protocol!r}")
    require_file(self.name, "classnames", self.classnames)
    require_file(self.name, "templates", self.templates)
    templates = T.read_lines(self.templates)
    if not templates or any("{}" not in t for t in templates):
      raise BenchmarkConfigError(f"benchmark {self.name!r}: every template in {self.templates} "
                                 "needs a '{}' for the class name")
    if self.protocol == "lift" and len(templates) != 1:
      raise BenchmarkConfigError(
          f"benchmark {self.name!r}: the LIFT protocol uses one template, {self.templates} has "
          f"{len(templates)} (use protocol='openai' or 'custom' for ensembles)")
    if not self.texts_only:
      self.source  # checks that exactly one image source is given

  @property
  def source(self) -> str:
    given = [s for s, on in (("tfds", self.tfds_data_dir), ("shards", self.shards),
                             ("labels", self.labels)) if on]
    if len(given) > 1:
      raise BenchmarkConfigError(f"benchmark {self.name!r}: give one image source, not {given}")
    if given:
      return given[0]
    if self.image_dir:
      return "folder"
    raise BenchmarkConfigError(f"benchmark {self.name!r}: needs an image source: labels + "
                               "image_dir, image_dir (ImageFolder), shards or tfds_data_dir")

  def classnames_list(self) -> list[str]:
    return T.read_lines(self.classnames)

  def prompts(self) -> list[list[str]]:
    """[[prompt per template] per class]."""
    return T.class_prompts(self.classnames_list(), T.read_lines(self.templates))

  def texts(self) -> list[str]:
    return T.unique(p for ps in self.prompts() for p in ps)

  def file_examples(self) -> list[tuple[str, int]]:
    """[(image path, class index)] for the labels and ImageFolder sources."""
    n_classes = len(self.classnames_list())
    if self.source == "labels":
      if not self.image_dir:
        raise BenchmarkConfigError(f"benchmark {self.name!r}: labels needs image_dir")
      rows = T.read_labels(require_file(self.name, "labels", self.labels))
    elif self.source == "folder":
      root = require_file(self.name, "image_dir", self.image_dir)
      dirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
      wnids = T.read_lines(require_file(self.name, "wnids", self.wnids)) if self.wnids else None
      if wnids is None and len(dirs) != n_classes:
        raise BenchmarkConfigError(
            f"benchmark {self.name!r}: {root} has {len(dirs)} class folders but {self.classnames} "
            f"has {n_classes} names; give `wnids` (one folder name per class, in class order)")
      if wnids is not None:
        if len(wnids) != n_classes:
          raise BenchmarkConfigError(f"benchmark {self.name!r}: {self.wnids} has {len(wnids)} "
                                     f"lines but {self.classnames} has {n_classes}")
        unknown = sorted(set(dirs) - set(wnids))
        if unknown:
          raise BenchmarkConfigError(f"benchmark {self.name!r}: folders {unknown[:5]} of {root} "
                                     f"are not in {self.wnids}")
      rows = T.image_folder_labels(root, wnids)
    else:
      raise BenchmarkConfigError(f"benchmark {self.name!r}: source {self.source} has no files")
    bad = [(f, c) for f, c in rows if not 0 <= c < n_classes]
    if bad:
      raise BenchmarkConfigError(f"benchmark {self.name!r}: class index {bad[0][1]} of "
                                 f"{bad[0][0]} is outside the {n_classes} class names")
    rows = rows[:self.limit] if self.limit else rows
    return [(os.path.join(self.image_dir, f), c) for f, c in rows]


def imagenet_benchmark(folder: str, protocol: str) -> dict[str, Any]:
  """The texts-only entry of ImageNet's prompts under ``protocol`` (lift | openai), read from a
  folder holding :data:`IMAGENET_PROMPT_FILES`."""
  if protocol not in IMAGENET_PROMPT_FILES:
    raise BenchmarkConfigError(f"unknown ImageNet protocol {protocol!r}; expected one of "
                               f"{sorted(IMAGENET_PROMPT_FILES)}")
  classnames, templates = IMAGENET_PROMPT_FILES[protocol]
  return {"type": "zeroshot", "protocol": protocol,
          "classnames": os.path.join(folder, classnames),
          "templates": os.path.join(folder, templates)}


def _tfds_examples(spec: Spec) -> Iterator[tuple[bytes, int]]:
  try:
    import tensorflow as tf  # only this source needs TensorFlow
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise BenchmarkConfigError(
        f"benchmark {spec.name!r} reads tensorflow-datasets, which is not installed ({e})"
    ) from None
  tf.config.set_visible_devices([], "GPU")  # TF must not take the accelerators' memory
  try:
    builder = tfds.builder(spec.tfds_name, data_dir=spec.tfds_data_dir)
    ds = builder.as_dataset(split=spec.tfds_split, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
  except Exception as e:  # tfds raises AssertionError, FileNotFoundError, ... when unprepared
    raise BenchmarkConfigError(
        f"benchmark {spec.name!r}: tensorflow-datasets {spec.tfds_name}:{spec.tfds_split} is not "
        f"prepared in {spec.tfds_data_dir} ({type(e).__name__}: {e}). Prepare it once with "
        f"tfds.builder({spec.tfds_name!r}, data_dir=...).download_and_prepare() (ImageNet needs "
        "its tar files in the manual folder).") from None
  if spec.limit:
    ds = ds.take(spec.limit)
  for ex in tfds.as_numpy(ds):
    yield ex["image"], int(ex["label"])


class Evaluator(_Base):
  """Top-k accuracy of the classifier made of the classes' prompt embeddings."""

  CLASS_CHUNK_PROMPTS = 8192  # prompts embedded per classifier chunk

  def __init__(self, spec: Spec):
    super().__init__(spec)
    self.prompts = spec.prompts()
    groups: dict[tuple[str, ...], list[int]] = {}
    for c, ps in enumerate(self.prompts):
      groups.setdefault(tuple(ps), []).append(c)
    self.class_positives = [groups[tuple(ps)] for ps in self.prompts]
    self.skipped_images = 0
    self.paths = self.labels = None
    if spec.source in ("labels", "folder"):
      examples = spec.file_examples()
      found, missing = present(spec, [p for p, _ in examples])
      keep = set(found)
      self.paths = [p for p, _ in examples if p in keep]
      self.labels = np.asarray([c for p, c in examples if p in keep], np.int32)
      self.skipped_images = len(missing)
    elif spec.source == "shards":
      records.list_shards(spec.shards, records.IMAGES)  # fails now if the folder is wrong

  def classifier(self, predictor) -> np.ndarray:
    """[C, D] class embeddings, built a chunk of classes at a time."""
    n_templates = len(self.prompts[0])
    chunk = max(1, self.CLASS_CHUNK_PROMPTS // n_templates)
    out = []
    for start in range(0, len(self.prompts), chunk):
      part = self.prompts[start:start + chunk]
      emb = predictor.embed_texts([p for ps in part for p in ps])
      emb = emb.reshape(len(part), n_templates, -1)
      if len(part) < chunk:  # same shape for every chunk: one compilation
        emb = np.concatenate([emb, np.zeros((chunk - len(part),) + emb.shape[1:], emb.dtype)])
      mask = np.arange(chunk) < len(part)
      prompt_mask = np.broadcast_to(mask[:, None], emb.shape[:2])
      out.append(np.asarray(self.metrics.class_embeddings(emb, prompt_mask))[:len(part)])
    return np.concatenate(out)

  def _stream(self) -> Iterator[tuple[Any, int]]:
    if self.spec.source == "tfds":
      yield from _tfds_examples(self.spec)
      return
    n = 0
    label_field = self.spec.label_field
    for _, r in shard_records(self.spec.shards, ("image", label_field)):
      if self.spec.limit and n >= self.spec.limit:
        return
      yield r["image"], int(r[label_field])
      n += 1

  def run(self, predictor) -> dict[str, float]:
    classifier = self.classifier(predictor)
    if self.paths is not None:
      image_emb, labels = predictor.embed_images(self.paths), self.labels
    else:
      streamed: list[int] = []

      def items():
        for item, label in self._stream():
          streamed.append(label)
          yield item

      image_emb = predictor.embed_images(items())
      labels = np.asarray(streamed, np.int32)
    bad = labels[(labels < 0) | (labels >= len(classifier))]
    if bad.size:
      raise BenchmarkConfigError(
          f"benchmark {self.name!r}: label {int(bad[0])} is outside the {len(classifier)} classes")
    m = self.metrics
    positives = m.padded_positives([self.class_positives[c] for c in labels])
    rank = m.ranks(image_emb, classifier, positives)
    out = {f"{self.name}/top{k}": v for k, v in m.recall_at_k(rank, self.spec.top_k).items()}
    out[f"{self.name}/num_images"] = float(len(labels))
    if self.spec.skip_missing:
      out[f"{self.name}/skipped_images"] = float(self.skipped_images)
    return out
