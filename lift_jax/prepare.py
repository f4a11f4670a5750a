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

from lift_jax import cli
from lift_jax.data import records
from lift_jax.data import shards


@cli.user_error
class PrepareError(RuntimeError):
  """The data a config asks to prepare cannot be built; the message says why."""

log = logging.getLogger(__name__)


def _embed_config_path(config) -> str:
  if config.data.get("embed_config"):
    return config.data.embed_config
  import embed  # the package's __init__ is empty: no torch is imported

  return os.path.join(os.path.dirname(embed.__file__), "configs", "minilm.py")


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


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Returns the config with the prepared paths filled in (the input config is not changed)."""
  if config.data.get("prepare") in (None, "", "None", "none"):
    return config
  if config.data.prepare != "synthetic":
    raise PrepareError(f"config.data.prepare={config.data.prepare!r}: the only preparation is "
                       "'synthetic'; leave it unset (--config.data.prepare=) for data made "
                       "beforehand with lift_jax.data.convert and embed.main")
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
  syn = config.data.synthetic
  root = os.path.abspath(syn.get("dir") or os.path.join(workdir, "synthetic"))
  primary = jax.process_index() == 0
  embed_config = _embed_config_path(config)
  tag = os.path.splitext(os.path.basename(embed_config))[0]

  if primary:
    from lift_jax.data import synthetic

    synthetic.generate(root, num_train=syn.num_train, num_eval=syn.num_eval,
                       image_size=syn.image_size, seed=syn.seed,
                       num_shards=syn.get("num_shards"))
  config.data.images = config.data.get("images") or os.path.join(root, "train")
  if config.evals.get("synthetic_suite"):
    from lift_jax.data import synthetic

    config.evals.benchmarks = synthetic.eval_benchmarks(os.path.join(root, "eval"))

  if config.model.mode == "lift":
    emb = config.data.get("embeddings") or os.path.join(root, f"embeddings-{tag}")
    n_images = len(records.list_shards(config.data.images, records.IMAGES)) if primary else None
    if primary:
      if shards.is_complete(emb, records.EMBEDDINGS, n_images):
        log.info("caption embeddings ready in %s (skipping the embedding job)", emb)
      else:
        run_embed(embed_config, emb, images=config.data.images)
    config.data.embeddings = emb
    if config.evals.get("benchmarks") and not config.evals.get("text_bank"):
      from eval.benchmarks import required_texts

      texts = required_texts(config.evals)
      digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:10]
      bank = os.path.join(root, f"bank-{tag}-{digest}")
      if primary:
        if shards.is_complete(bank, records.BANK):
          log.info("evaluation text bank ready in %s (%d texts)", bank, len(texts))
        else:
          from eval.texts import write_texts  # JAX-free

          texts_file = os.path.join(root, f"eval-texts-{digest}.json")
          write_texts(texts_file, texts)
          run_embed(embed_config, bank, texts=texts_file)
      config.evals.text_bank = bank

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("lift_jax.prepare")
  return config
