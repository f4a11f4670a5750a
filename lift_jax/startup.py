"""What a run checks before step 0: the one owner of start-up validation.

The trainer (:func:`lift_jax.train.train_and_evaluate`) calls these and stops at the first that
fails; ``python -m lift_jax.main --check`` (:mod:`lift_jax.preflight`) calls the same functions
and prints one row each, so whatever would stop the run before its first step fails the check.
Each function raises a user error (one line, naming the key, file or folder) or returns a short
description of what it found.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax

from lift_jax import checkpoint as ckpt
from lift_jax import cli, losses, optim, pretrained
from lift_jax.data import pipeline, records
from lift_jax.lock import WorkdirLock
from lift_jax.models.two_tower import MODES
from lift_jax.models.vit import parse_variant


def _number(config, key: str):
  value = config
  for part in key.split("."):
    value = value.get(part) if hasattr(value, "get") else None
  return value


# (key, test, what it must be); a None value passes where the key is optional.
_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("total_steps", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("batch_size", lambda v: isinstance(v, int) and v > 0, "an integer > 0"),
    ("log_every_steps", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 = off)"),
    ("checkpoint_every_steps", lambda v: isinstance(v, int) and v >= 0,
     "an integer >= 0 (0 = at the end only)"),
    ("eval_every_steps", lambda v: isinstance(v, int) and v >= 0,
     "an integer >= 0 (0 = at the end only)"),
    ("keep_checkpoints", lambda v: v is None or (isinstance(v, int) and v >= 1),
     "None (keep all) or an integer >= 1"),
    ("keep_checkpoint_every_steps", lambda v: v is None or (isinstance(v, int) and v >= 1),
     "None or an integer >= 1"),
    ("lock_stale_seconds", lambda v: isinstance(v, (int, float)) and v > 0, "> 0 seconds"),
    ("mesh.data", lambda v: isinstance(v, int) and (v == -1 or v >= 1), "-1 or an integer >= 1"),
    ("mesh.fsdp", lambda v: isinstance(v, int) and (v == -1 or v >= 1), "-1 or an integer >= 1"),
    ("model.image_size", lambda v: isinstance(v, int) and v > 0, "an integer > 0"),
    ("model.embed_dim", lambda v: isinstance(v, int) and v > 0, "an integer > 0"),
    ("optim.lr", lambda v: isinstance(v, (int, float)) and v >= 0, ">= 0"),
    ("optim.warmup_steps", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("optim.weight_decay", lambda v: isinstance(v, (int, float)) and v >= 0, ">= 0"),
    ("optim.grad_accum_steps", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("data.workers", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("data.read_threads", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("data.prefetch", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("data.max_skipped_fraction", lambda v: v is None or 0 <= v <= 1, "None or within [0, 1]"),
    ("evals.batch_size", lambda v: isinstance(v, int) and v > 0, "an integer > 0"),
]


def config_problems(config) -> list[str]:
  """Every value of a training config that no run can use, each as ``key=value: must be ...``."""
  out = [f"{key}={_number(config, key)!r} must be {what}" for key, ok, what in _RULES
         if not ok(_number(config, key))]
  model = config.model
  if model.mode not in MODES:
    out.append(f"model.mode={model.mode!r} must be one of {MODES}")
  try:
    losses.initial_params(model)
  except cli.ConfigError as e:
    out.append(str(e))
  try:
    vit = parse_variant(model.variant, **dict(model.get("vit") or {}))
    if isinstance(model.image_size, int) and model.image_size % vit.patch_size:
      out.append(f"model.image_size={model.image_size} is not a multiple of the patch size "
                 f"{vit.patch_size}")
    if vit.width % vit.num_heads:
      out.append(f"model.vit: width {vit.width} does not divide by {vit.num_heads} heads")
  except cli.ConfigError as e:
    out.append(str(e))
  for key in ("optim.frozen", "optim.lr_multipliers"):
    for rule in optim.rules(_number(config, key)):
      pattern = rule if isinstance(rule, str) else rule[0]
      try:
        re.compile(pattern)
      except re.error as e:
        out.append(f"{key}: {pattern!r} is not a regular expression ({e})")
  batch, accum = config.batch_size, config.optim.grad_accum_steps
  if isinstance(batch, int) and isinstance(accum, int) and accum > 0 and batch % accum:
    out.append(f"optim.grad_accum_steps={accum} does not divide batch_size={batch}")
  return out


def check_config(config) -> str:
  problems = config_problems(config)
  if problems:
    raise cli.ConfigError("; ".join(problems))
  return f"{config.total_steps} steps of {config.batch_size}, {config.model.mode} " \
         f"{config.model.variant}"


def check_init_from(config) -> str:
  """model.init_from present, of a known kind, computing what ours does, of the config's shape."""
  if not config.model.get("init_from"):
    frozen = optim.frozen_rules(config.optim)
    if any(re.search(rule, "visual/conv1") for rule in frozen):
      raise cli.ConfigError(
          f"optim.frozen={list(frozen)} freezes the image tower but model.init_from is not set: "
          "the tower would stay at its random initialisation. Set --config.model.init_from=DIR "
          "(a Hugging Face CLIP folder or a lift_jax checkpoint)")
    return "none (random initialisation)"
  return pretrained.check(config.model)


def check_topology(config, device_count: int | None = None) -> str:
  """The global batch divides over the devices the mesh will use."""
  n = device_count or jax.device_count()
  if config.mesh.get("num_devices"):
    n = min(n, int(config.mesh.num_devices))
  data, fsdp = config.mesh.data, config.mesh.fsdp
  if data != -1 and fsdp != -1 and data * fsdp != n:
    raise cli.ConfigError(f"mesh.data={data} x mesh.fsdp={fsdp} does not match the {n} devices "
                          "(set one of them to -1 to use what is left)")
  if config.batch_size % n:
    raise cli.ConfigError(f"batch_size={config.batch_size} does not divide by the {n} devices "
                          f"({jax.process_count()} processes): use a multiple of {n}")
  return f"{n} devices, {config.batch_size // n} examples per device"


def check_data(config, warn=None) -> list[int]:
  """The data paths, manifests, alignment and embedding width (opens no shard); the per-shard
  record counts."""
  pipeline.require_paths(config)
  if config.model.mode == "lift":
    return pipeline.check_embeddings(config.data.images, config.data.embeddings,
                                     config.model.embed_dim, warn=warn)
  return records.shard_counts(config.data.images, records.IMAGES, warn)[1]


def check_lock(config, workdir: str) -> str:
  """No other live trainer holds the workdir (a stale lock is taken over at start)."""
  lock = WorkdirLock(workdir, config.lock_stale_seconds)
  holder, stale = lock.holder()
  if holder is None:
    return "not in use"
  if stale:
    return (f"a stale lock of host {holder.get('host')} pid {holder.get('pid')} ({stale}): "
            "taken over")
  lock.refuse(holder)
  return ""


def check_resume(config, workdir: str, full: bool = False) -> str:
  """Where the run would start: the newest intact step (damaged newest steps are named, not
  moved), a fresh start, or a refusal (no intact step left). ``full`` also reads the arrays of
  the steps it settles on (the run finds a truncated array file only by reading it)."""
  directory = ckpt.checkpoints_dir(workdir)
  present = ckpt.steps(directory)
  if not present:
    return "starts from step 0"
  candidates = ckpt.resume_candidates(directory, config, move=False)
  while full and candidates:
    try:
      ckpt.read_back(directory, candidates[0][0])
      break
    except ckpt.DamagedStep:
      candidates = candidates[1:]
  skipped = [s for s in present if s > (candidates[0][0] if candidates else -1)]
  if not candidates:
    if config.get("fresh_start_if_damaged"):
      return f"every step ({present}) is damaged: starts again from step 0"
    raise ckpt.no_intact_step(directory)
  note = f" (damaged, to be moved aside: {skipped})" if skipped else ""
  return f"resumes from step {candidates[0][0]}{note}"
