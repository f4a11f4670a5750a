"""Evaluators (SugarCrepe, zero-shot classification, retrieval) and the runner that holds them.

Every evaluator follows one protocol: built once from its spec (:mod:`eval.benchmarks`; files are
read and image paths checked then, so a training run fails at start, not at its first
evaluation), it has ``name``, ``texts()`` (the exact texts it scores) and
``run(predictor) -> {"<name>/<metric>": value}``. The ``type`` string of a benchmark config picks
the class (:data:`EVALUATORS`). Metrics are fractions in [0, 1]; counts are named ``num_*`` or
``skipped_*``.

Identical texts are one candidate. In retrieval an image's positives are the distinct strings of
its captions, so a caption shared word for word by two images (70 of COCO's 5,000 first captions)
is a correct answer for both rather than a tie that :mod:`eval.metrics` would count against both;
in classification the classes whose prompts are identical (Keras names repeat "crane" and
"maillot"; OpenAI's repeat "missile" and "sunglasses") are positives together. Text-to-image
queries stay one per caption, as in the standard protocol.

:class:`EvalRunner` builds the :class:`~eval.predictor.Predictor` and the evaluators from a
training config (``config.evals``) and is what the trainer calls between steps.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterator, Protocol

import numpy as np

from eval import benchmarks, metrics
from eval import texts as T
from eval.predictor import Predictor
from lift_jax import cli
from lift_jax.data import records, transforms

logger = logging.getLogger(__name__)


@cli.user_error
class MissingImagesError(FileNotFoundError):
  """Images a benchmark needs are not in its image folder; the message names them."""


class Evaluator(Protocol):
  name: str

  def texts(self) -> list[str]:
    ...

  def scored_texts(self) -> list[str]:
    """The texts a run scores (without those of images skipped as missing)."""
    ...

  def run(self, predictor: Predictor) -> dict[str, float]:
    ...


def _present(spec, paths: list[str]) -> tuple[list[str], list[str]]:
  """(present, missing) image paths; missing ones are an error unless ``spec.skip_missing``."""
  folder = spec.image_dir
  if not os.path.isdir(folder):
    raise MissingImagesError(f"benchmark {spec.name!r}: image folder {folder} does not exist")
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing and not spec.skip_missing:
    names = ", ".join(os.path.relpath(p, folder) for p in missing[:5])
    raise MissingImagesError(
        f"benchmark {spec.name!r}: {len(missing)} of {len(paths)} images are missing from "
        f"{folder} (first: {names}). Put them there, or set skip_missing=True in the benchmark's "
        "config to score without them (they are counted as skipped_images).")
  gone = set(missing)
  return [p for p in paths if p not in gone], missing


def _shard_images(folder: str, keys: list[str]) -> Iterator[bytes]:
  """The image bytes of ``keys`` (in the shards' order, which is the keys' order)."""
  wanted = set(keys)
  n = 0
  for key, r in benchmarks.shard_records(folder, ("image",)):
    if key in wanted:
      yield r["image"]
      n += 1
      if n == len(keys):
        return
  raise benchmarks.BenchmarkConfigError(f"{folder}: {len(keys) - n} images vanished while reading")


# --------------------------------------------------------------------------------------------
# SugarCrepe
# --------------------------------------------------------------------------------------------


class SugarCrepeEvaluator:
  """Accuracy per subset: sim(image, caption) > sim(image, negative caption), strictly.

  ``<name>/mean`` is the unweighted mean of the subsets' accuracies.
  """

  def __init__(self, spec: benchmarks.SugarCrepeSpec):
    self.spec, self.name = spec, spec.name
    if not spec.image_dir:
      raise benchmarks.BenchmarkConfigError(f"benchmark {spec.name!r}: image_dir is required")
    rows = spec.rows()
    paths = {f: os.path.join(spec.image_dir, f)
             for f in T.unique(f for subset in rows.values() for f, _, _ in subset)}
    _, missing = _present(spec, list(paths.values()))
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

  def texts(self) -> list[str]:
    return self.spec.texts()

  def scored_texts(self) -> list[str]:
    """The texts :meth:`run` looks up: without those of skipped (missing) images."""
    return self._texts

  def run(self, predictor: Predictor) -> dict[str, float]:
    image_emb = predictor.embed_images(self.images)
    text_emb = predictor.embed_texts(self._texts)
    out, accs = {}, []
    for subset, (img, pos, neg) in self.indices.items():
      acc = metrics.pair_accuracy(image_emb, text_emb, img, pos, neg) if len(img) else np.nan
      out[f"{self.name}/{subset}"] = acc
      if len(img):
        accs.append(acc)
    out[f"{self.name}/mean"] = float(np.mean(accs)) if accs else np.nan
    out[f"{self.name}/num_samples"] = float(sum(len(i[0]) for i in self.indices.values()))
    if self.spec.skip_missing:
      out[f"{self.name}/skipped_images"] = float(self.skipped_images)
      out[f"{self.name}/skipped_samples"] = float(self.skipped_samples)
    return out


# --------------------------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------------------------


def _tfds_examples(spec: benchmarks.ZeroShotSpec) -> Iterator[tuple[bytes, int]]:
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise benchmarks.BenchmarkConfigError(
        f"benchmark {spec.name!r} reads tensorflow-datasets, which is not installed ({e})"
    ) from None
  tf.config.set_visible_devices([], "GPU")  # TF must not take the accelerators' memory
  try:
    builder = tfds.builder(spec.tfds_name, data_dir=spec.tfds_data_dir)
    ds = builder.as_dataset(split=spec.tfds_split, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
  except Exception as e:  # tfds raises AssertionError, FileNotFoundError, ... when unprepared
    raise benchmarks.BenchmarkConfigError(
        f"benchmark {spec.name!r}: tensorflow-datasets {spec.tfds_name}:{spec.tfds_split} is not "
        f"prepared in {spec.tfds_data_dir} ({type(e).__name__}: {e}). Prepare it once with "
        f"tfds.builder({spec.tfds_name!r}, data_dir=...).download_and_prepare() (ImageNet needs "
        "its tar files in the manual folder).") from None
  if spec.limit:
    ds = ds.take(spec.limit)
  for ex in tfds.as_numpy(ds):
    yield ex["image"], int(ex["label"])


class ZeroShotEvaluator:
  """Top-k accuracy of the classifier made of the classes' prompt embeddings."""

  CLASS_CHUNK_PROMPTS = 8192  # prompts embedded per classifier chunk

  def __init__(self, spec: benchmarks.ZeroShotSpec):
    self.spec, self.name = spec, spec.name
    self.prompts = spec.prompts()
    groups: dict[tuple[str, ...], list[int]] = {}
    for c, ps in enumerate(self.prompts):
      groups.setdefault(tuple(ps), []).append(c)
    self.class_positives = [groups[tuple(ps)] for ps in self.prompts]
    self.skipped_images = 0
    self.paths = self.labels = None
    if spec.source in ("labels", "folder"):
      examples = spec.file_examples()
      present, missing = _present(spec, [p for p, _ in examples])
      keep = set(present)
      self.paths = [p for p, _ in examples if p in keep]
      self.labels = np.asarray([c for p, c in examples if p in keep], np.int32)
      self.skipped_images = len(missing)
    elif spec.source == "shards":
      records.list_shards(spec.shards, records.IMAGES)  # fails now if the folder is wrong

  def texts(self) -> list[str]:
    return self.spec.texts()

  def scored_texts(self) -> list[str]:
    return self.texts()  # every class prompt is scored

  def classifier(self, predictor: Predictor) -> np.ndarray:
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
      out.append(np.asarray(metrics.class_embeddings(emb, prompt_mask))[:len(part)])
    return np.concatenate(out)

  def _stream(self) -> Iterator[tuple[Any, int]]:
    if self.spec.source == "tfds":
      yield from _tfds_examples(self.spec)
      return
    n = 0
    field = self.spec.label_field
    for _, r in benchmarks.shard_records(self.spec.shards, ("image", field)):
      if self.spec.limit and n >= self.spec.limit:
        return
      yield r["image"], int(r[field])
      n += 1

  def run(self, predictor: Predictor) -> dict[str, float]:
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
      raise benchmarks.BenchmarkConfigError(
          f"benchmark {self.name!r}: label {int(bad[0])} is outside the {len(classifier)} classes")
    positives = metrics.padded_positives([self.class_positives[c] for c in labels])
    rank = metrics.ranks(image_emb, classifier, positives)
    out = {f"{self.name}/top{k}": v for k, v in metrics.recall_at_k(rank, self.spec.top_k).items()}
    out[f"{self.name}/num_images"] = float(len(labels))
    if self.spec.skip_missing:
      out[f"{self.name}/skipped_images"] = float(self.skipped_images)
    return out


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------


class RetrievalEvaluator:
  """Recall@k image->text (a hit is any of the image's captions) and text->image."""

  def __init__(self, spec: benchmarks.RetrievalSpec):
    self.spec, self.name = spec, spec.name
    pairs = spec.image_captions()
    self.skipped_images = 0
    if spec.captions:
      present, missing = _present(spec, [p for p, _ in pairs])
      keep = set(present)
      pairs = [(p, c) for p, c in pairs if p in keep]
      self.skipped_images = len(missing)
    self.images = [p for p, _ in pairs]
    self._texts = T.unique(c for _, caps in pairs for c in caps)
    index = {t: i for i, t in enumerate(self._texts)}
    self.image_positives = metrics.padded_positives(
        [[index[c] for c in T.unique(caps)] for _, caps in pairs])
    self.query_texts = np.asarray([index[c] for _, caps in pairs for c in caps], np.int64)
    self.query_images = np.asarray([i for i, (_, caps) in enumerate(pairs) for _ in caps],
                                   np.int32)

  def texts(self) -> list[str]:
    return self.spec.texts()

  def scored_texts(self) -> list[str]:
    """The texts :meth:`run` looks up: without those of skipped (missing) images."""
    return self._texts

  def run(self, predictor: Predictor) -> dict[str, float]:
    if self.spec.captions:
      image_emb = predictor.embed_images(self.images)
    else:
      image_emb = predictor.embed_images(_shard_images(self.spec.shards, self.images))
    text_emb = predictor.embed_texts(self._texts)
    i2t = metrics.ranks(image_emb, text_emb, self.image_positives)
    t2i = metrics.ranks(text_emb[self.query_texts], image_emb, self.query_images)
    out = {}
    for direction, rank in (("i2t", i2t), ("t2i", t2i)):
      for k, v in metrics.recall_at_k(rank, self.spec.ks).items():
        out[f"{self.name}/{direction}_r{k}"] = v
    out[f"{self.name}/num_images"] = float(len(self.images))
    out[f"{self.name}/num_texts"] = float(len(self.query_texts))
    if self.spec.skip_missing:
      out[f"{self.name}/skipped_images"] = float(self.skipped_images)
    return out


EVALUATORS = {"sugarcrepe": SugarCrepeEvaluator, "zeroshot": ZeroShotEvaluator,
              "retrieval": RetrievalEvaluator}


class LongRetrievalEvaluator(RetrievalEvaluator):
  """Retrieval with long captions (Urban1k, DOCCI, ShareGPT4V-1k), plus what the text side could
  read of them: a CLIP model reports ``num_texts_truncated`` (captions longer than its context,
  counted with its tokenizer) and ``num_context_tokens``; a LIFT model reports its text bank's
  max_length as ``num_bank_max_tokens`` and warns when the bank was embedded shorter than the
  spec's ``max_length``."""

  _truncated: int | None = None  # captions longer than the CLIP context, counted once

  def run(self, predictor: Predictor) -> dict[str, float]:
    out = super().run(predictor)
    mode = getattr(predictor, "mode", None)
    if mode == "clip":
      lengths = getattr(predictor.tokenizer, "lengths", None)
      if lengths is not None:
        if self._truncated is None:  # the captions and the tokenizer never change
          self._truncated = sum(int(k > predictor.context_length) for k in lengths(self._texts))
        n = self._truncated
        out[f"{self.name}/num_texts_truncated"] = float(n)
        out[f"{self.name}/num_context_tokens"] = float(predictor.context_length)
        if n:
          logger.info("%s: %d of %d captions are longer than the text tower's context (%d "
                      "tokens) and were cut", self.name, n, len(self._texts),
                      predictor.context_length)
    elif mode == "lift":
      bank = predictor.text_bank
      made_at = (bank.manifest.get("max_length") if bank is not None else None)
      if made_at is not None:
        out[f"{self.name}/num_bank_max_tokens"] = float(made_at)
        if int(made_at) < self.spec.max_length:
          logger.warning("%s: the text bank %s embedded texts at max_length %s, shorter than the "
                         "%d this benchmark's captions call for; re-embed them with "
                         "--config.max_length=%d", self.name, bank.folder, made_at,
                         self.spec.max_length, self.spec.max_length)
    return out


EVALUATORS["long_retrieval"] = LongRetrievalEvaluator


def make_evaluator(spec) -> Evaluator:
  return EVALUATORS[spec.type](spec)


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------


def check_bank_encoder(config) -> list[str]:
  """LIFT: refuses a text bank made with other encoder settings than the training embeddings
  (``records.check_same_encoder``), unless ``config.evals.allow_encoder_mismatch``; a bank or
  an embedding folder that is not on this machine cannot be compared and is passed over with a
  warning. Returns the differences that were allowed."""
  bank = config.evals.get("text_bank")
  embeddings = config.get("data", {}).get("embeddings")
  if not bank or not embeddings:
    return []
  have = [os.path.exists(os.path.join(f, records.MANIFEST)) for f in (bank, embeddings)]
  if not all(have):
    if have[0]:
      logger.warning("cannot compare the text bank's encoder with the training embeddings': "
                     "%s has no manifest.json", embeddings)
    return []
  allowed = records.check_same_encoder(bank, embeddings,
                                       bool(config.evals.get("allow_encoder_mismatch")))
  for d in allowed:
    logger.warning("text bank %s differs from the training embeddings (allowed): %s", bank, d)
  return allowed


class EvalRunner:
  """The evaluators of ``config.evals`` with one Predictor; ``run(params)`` scores them all.

  ``config.evals``: ``batch_size`` (global), ``text_bank`` (LIFT), ``resize_size`` (None:
  round(image_size * 256 / 224)), ``mean``, ``std`` (ImageNet's by default), ``workers`` and
  ``benchmarks`` ({name: {type, ...}}, see :mod:`eval.benchmarks`). CLIP models take their
  tokenizer from ``config.data.tokenizer`` and its length from ``config.model.text``.
  """

  def __init__(self, config, model, mesh=None, only: list[str] | None = None):
    ev = config.evals
    self.specs = benchmarks.parse_all(ev.get("benchmarks"))
    if only:
      unknown = sorted(set(only) - {s.name for s in self.specs})
      if unknown:
        raise benchmarks.BenchmarkConfigError(
            f"no benchmark named {unknown} in the config (it has {[s.name for s in self.specs]})")
      self.specs = [s for s in self.specs if s.name in only]
    self.evaluators = [make_evaluator(s) for s in self.specs]
    tokenizer = context_length = None
    if model.mode == "clip":
      tokenizer = config.get("data", {}).get("tokenizer")
      context_length = config.model.text.context_length
    mean, std = ev.get("mean"), ev.get("std")
    self.predictor = Predictor(
        model, mesh=mesh, batch_size=ev.get("batch_size"),
        image_size=int(config.model.image_size), resize_size=ev.get("resize_size"),
        mean=tuple(mean) if mean else transforms.IMAGENET_MEAN,
        std=tuple(std) if std else transforms.IMAGENET_STD,
        text_bank=ev.get("text_bank"), tokenizer=tokenizer, context_length=context_length,
        workers=ev.get("workers"))
    if model.mode == "lift":
      check_bank_encoder(config)
    # LIFT: a text missing from the bank is found now, before any training step. Texts of
    # records skipped for missing images (skip_missing) are not asked for.
    self.predictor.check_texts(T.unique(t for e in self.evaluators for t in e.scored_texts()))
    self.timings: dict[str, float] = {}

  def run(self, params=None, keep_going: bool = False) -> dict[str, float]:
    """{"<benchmark>/<metric>": value}; ``params`` (the model's pure dict) replaces the
    current parameters first. Seconds per benchmark are left in ``self.timings``.

    Images that cannot be decoded are scored as misses and counted as
    ``<benchmark>/unusable_images``. ``keep_going`` (the trainer's): a benchmark that fails is
    logged with its error and reported as ``<benchmark>/failed`` = 1; the others still run.
    """
    if params is not None:
      self.predictor.set_params(params)
    results: dict[str, float] = {}
    try:
      for evaluator in self.evaluators:
        t0 = time.perf_counter()
        before = self.predictor.unusable_images
        try:
          results.update(evaluator.run(self.predictor))
        except Exception as e:  # noqa: BLE001 - a training run outlives any one evaluation
          if not keep_going:
            raise
          logger.error("eval %s failed, the run goes on: %s", evaluator.name,
                       cli.describe(e) or f"{type(e).__name__}: {e}")
          results[f"{evaluator.name}/failed"] = 1.0
        unusable = self.predictor.unusable_images - before
        if unusable:
          results[f"{evaluator.name}/unusable_images"] = float(unusable)
          logger.warning("eval %s: %d images could not be decoded and were scored as misses",
                         evaluator.name, unusable)
        self.timings[evaluator.name] = time.perf_counter() - t0
        logger.info("eval %s: %.1f s", evaluator.name, self.timings[evaluator.name])
    finally:
      self.predictor.clear_cache()  # image embeddings belong to these parameters only
    return {k: float(v) for k, v in results.items()}


def training_runner(config, model, mesh) -> EvalRunner | None:
  """The runner a training run evaluates with, or None when ``config.evals`` names no
  benchmark. Benchmarks whose paths are relative while ``evals.data_root`` is unset are left
  out with a warning: a run whose evaluation data was not given still trains."""
  from lift_jax import config_lib

  config, dropped = config_lib.resolve_eval_paths(config)
  if dropped:
    logger.warning("evaluation of %s skipped: their paths are relative and "
                   "--config.evals.data_root is not set", ", ".join(dropped))
  if not config.evals.get("benchmarks"):
    return None
  return EvalRunner(config, model, mesh)

