"""The evaluators of a config with one :class:`~eval.predictor.Predictor`: what ``eval.main`` runs
on a checkpoint and what the trainer calls between steps (``lift_jax.main`` hands
:func:`training_runner` to ``lift_jax.train.train_and_evaluate``).

Metrics are fractions in [0, 1]; counts are named ``num_*``, ``skipped_*`` or ``unusable_*``.
"""

from __future__ import annotations

import logging
import os
import time

from eval import benchmarks
from eval import texts as T
from eval.benchmarks.base import BenchmarkConfigError
from eval.predictor import Predictor
from lift_jax import cli, config_lib
from lift_jax.data import records

logger = logging.getLogger(__name__)


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
        raise BenchmarkConfigError(
            f"no benchmark named {unknown} in the config (it has {[s.name for s in self.specs]})")
      self.specs = [s for s in self.specs if s.name in only]
    self.evaluators = [benchmarks.make_evaluator(s) for s in self.specs]
    tokenizer = context_length = None
    if model.mode == "clip":
      tokenizer = config.get("data", {}).get("tokenizer")
      context_length = config.model.text.context_length
    ev = config_lib.complete(ev, config_lib.base().evals)
    self.predictor = Predictor(
        model, mesh=mesh, batch_size=ev["batch_size"], image_size=int(config.model.image_size),
        resize_size=ev["resize_size"], mean=tuple(ev["mean"]), std=tuple(ev["std"]),
        text_bank=ev["text_bank"], tokenizer=tokenizer, context_length=context_length,
        workers=ev["workers"])
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
  config, dropped = benchmarks.resolve_paths(config)
  if dropped:
    logger.warning("evaluation of %s skipped: their paths are relative and "
                   "--config.evals.data_root is not set", ", ".join(dropped))
  if not config.evals.get("benchmarks"):
    return None
  return EvalRunner(config, model, mesh)
