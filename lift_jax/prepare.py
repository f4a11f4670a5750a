"""Builds the data a config asks for when it is missing: the built-in synthetic set, its caption
embeddings and the evaluation text bank.

A step of its own: ``lift_jax.main`` runs it before the trainer is entered (alone with
``--prepare_only``; the demo does so), the trainer never calls it. Only configs with
``data.prepare = "synthetic"`` (``configs/tiny_synthetic.py``,
``configs/clip_tiny_synthetic.py``) use this; full-scale configs point at shards made beforehand
with ``lift_jax.data.convert`` and ``embed.main``. Every stage is skipped when its output is
complete, and says so. The embedding job runs in a subprocess: the trainer never imports torch.

Resulting layout (``data.synthetic.dir``, default ``WORKDIR/synthetic``)::

    train/images-*.array_record       the synthetic training pairs
    eval/...                          compositional / classification / retrieval sets
    embeddings-<encoder>/             LIFT: caption embeddings aligned with train/
    bank-<encoder>-<hash>/            LIFT: embeddings of every evaluation text
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys

import jax
import ml_collections
from jax.experimental import multihost_utils

import embed.configs
from eval.benchmarks import required_texts
from eval.texts import write_texts
from lift_jax import cli
from lift_jax.data import records, shards, synthetic


@cli.user_error
class PrepareError(RuntimeError):
  """The data a config asks to prepare cannot be built; the message says why."""

log = logging.getLogger(__name__)


def embed_config_path(config) -> str:
  """The embed/configs file of a config: ``data.embed_config``, or embed.configs.DEFAULT."""
  return config.data.get("embed_config") or embed.configs.DEFAULT


def run_embed(embed_config: str, output: str, *, images: str | None = None,
              texts: str | None = None) -> None:
  args = [sys.executable, "-m", "embed.main", f"--config={embed_config}",
          f"--config.output={output}"]
  args.append(f"--config.images={images}" if images else f"--config.texts={texts}")
  log.info("embedding %s -> %s (%s)", images or texts, output, os.path.basename(embed_config))
  proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if proc.returncode:
    raise PrepareError(f"the embedding job failed ({' '.join(args)}):\n{proc.stdout[-4000:]}")
  for line in proc.stdout.splitlines()[-6:]:
    log.info("%s", line)


def wants_preparation(config) -> bool:
  return config.data.get("prepare") not in (None, "", "None", "none")


def prepared_config(config: ml_collections.ConfigDict, workdir: str
                    ) -> ml_collections.ConfigDict:
  """The config with the paths preparation writes filled in, without building anything (the
  input config is not changed): what the preflight checks and ``eval.main`` evaluates. The text
  bank's folder is named after the evaluation texts, so it is filled only once the evaluation
  files exist."""
  if not wants_preparation(config):
    return config
  if config.data.prepare != "synthetic":
    raise PrepareError(f"config.data.prepare={config.data.prepare!r}: the only preparation is "
                       "'synthetic'; leave it unset (--config.data.prepare=None) for data made "
                       "beforehand with lift_jax.data.convert and embed.main")
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
  root = synthetic_root(config, workdir)
  tag = os.path.splitext(os.path.basename(embed_config_path(config)))[0]
  config.data.images = config.data.get("images") or os.path.join(root, "train")
  if config.evals.get("synthetic_suite"):
    config.evals.benchmarks = synthetic.eval_benchmarks(os.path.join(root, "eval"))
  if config.model.mode == "lift":
    config.data.embeddings = config.data.get("embeddings") or os.path.join(root,
                                                                           f"embeddings-{tag}")
    if config.evals.get("benchmarks") and not config.evals.get("text_bank") and \
        synthetic.eval_complete(os.path.join(root, "eval")):
      digest = _digest(required_texts(config.evals))
      config.evals.text_bank = os.path.join(root, f"bank-{tag}-{digest}")
  return config


def synthetic_root(config, workdir: str) -> str:
  return os.path.abspath(config.data.synthetic.get("dir") or os.path.join(workdir, "synthetic"))


def _digest(texts: list[str]) -> str:
  return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:10]


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Builds what :func:`prepared_config` names and is missing; returns that config."""
  if not wants_preparation(config):
    return config
  prepared_config(config, workdir)  # refuses an unknown preparation before building anything
  primary = jax.process_index() == 0
  syn = config.data.synthetic
  root = synthetic_root(config, workdir)
  if primary:
    synthetic.generate(root, synthetic.Settings(
        num_train=syn.num_train, num_eval=syn.num_eval, image_size=syn.image_size,
        seed=syn.seed), num_shards=syn.get("num_shards"))
  config = prepared_config(config, workdir)
  embed_config = embed_config_path(config)
  if config.model.mode == "lift" and primary:
    n_images = len(records.list_shards(config.data.images, records.IMAGES))
    if shards.is_complete(config.data.embeddings, records.EMBEDDINGS, n_images):
      log.info("caption embeddings ready in %s (skipping the embedding job)",
               config.data.embeddings)
    else:
      run_embed(embed_config, config.data.embeddings, images=config.data.images)
    bank = config.evals.get("text_bank")
    if bank and os.path.dirname(bank) == root:  # a bank preparation names (not the user's)
      texts = required_texts(config.evals)
      if shards.is_complete(bank, records.BANK):
        log.info("evaluation text bank ready in %s (%d texts)", bank, len(texts))
      else:
        texts_file = os.path.join(root, f"eval-texts-{_digest(texts)}.json")
        write_texts(texts_file, texts)
        run_embed(embed_config, bank, texts=texts_file)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("lift_jax.prepare")
  return config
