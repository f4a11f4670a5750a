"""Start training from pretrained weights: ``model.init_from`` and ``model.init_from_params``.

``model.init_from`` names one of

* a Hugging Face CLIP checkpoint: a folder with ``config.json`` and ``*.safetensors``, or a hub id
  already in the local cache (see :mod:`lift_jax.models.weights` for the name map and for what
  maps exactly); its config.json is checked, and a checkpoint whose towers would compute
  another function here (quick_gelu, another head count) is refused;
* a lift_jax checkpoint: a workdir, its ``checkpoints`` folder or one step folder (e.g. the
  demo's trained run, or an OpenCLIP/LIFT ``.pt`` converted by ``lift_jax.tools.import_torch``).

Only the parameters whose path matches ``model.init_from_params`` (a regex; default ``^visual/``,
the image tower) are taken, and every one of them must be in the source with the same shape;
the rest keep their fresh initialisation. Used once, when a run starts without checkpoints;
a resumed run restores its own parameters. Combine with ``optim.frozen`` to lock what was loaded.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from lift_jax import checkpoint as ckpt
from lift_jax import cli, config_lib, optim
from lift_jax.models import weights
from lift_jax.models.vit import parse_variant
from lift_jax.sharding import path_str


@cli.user_error
class InitFromError(ValueError):
  """model.init_from cannot initialise the config's model; the message names what and why."""


def _flat(tree) -> dict[str, Any]:
  return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _from_lift_checkpoint(source: str, abstract: dict[str, Any], select) -> dict[str, np.ndarray]:
  try:
    saved, step = ckpt.restore_params(source)
  except ckpt.CheckpointError as e:
    raise InitFromError(f"model.init_from={source}: {e}") from None
  saved = {k: np.asarray(v) for k, v in _flat(saved).items()}
  wanted = [k for k in abstract if select.search(k)]
  missing = [k for k in wanted if k not in saved]
  misshaped = [f"{k}: checkpoint {saved[k].shape}, model {tuple(abstract[k].shape)}"
               for k in wanted if k in saved and saved[k].shape != tuple(abstract[k].shape)]
  if missing or misshaped:
    raise InitFromError(
        f"model.init_from={source} (step {step}) does not fit the config's model for "
        f"model.init_from_params={select.pattern!r}: "
        + "; ".join(filter(None, [f"missing {missing[:5]}" if missing else "",
                                  f"mis-shaped {misshaped[:5]}" if misshaped else ""]))
        + ". Use a checkpoint of the same architecture or narrow model.init_from_params")
  return {k: saved[k] for k in wanted}


def _from_hf(source: str, model_cfg: Mapping[str, Any], params, select) -> dict[str, np.ndarray]:
  try:
    state, hf_config = weights.load_hf_clip(source)
    problems = weights.hf_config_problems(hf_config, model_cfg)
    if problems:
      raise InitFromError(f"model.init_from={source}: " + "; ".join(problems))
    skipped: list[str] = []
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    loaded = weights.convert(state, abstract, select=select.pattern, skipped=skipped)
  except weights.StateDictError as e:
    raise InitFromError(f"model.init_from={source}: {e}") from None
  if model_cfg["pool"] == "avg" and any(
      select.search(k) for k in ("visual/ln_post/scale", "visual/transformer")):
    logging.warning(
        "model.init_from=%s: model.pool='avg' averages the patch tokens after ln_post; the "
        "pretrained tower was trained through its class token (HF's pooler_output), so this "
        "feature is new to it. model.pool='tok' keeps the pretrained feature exactly.", source)
  if skipped:
    logging.info("model.init_from=%s: %d of its tensors are not used (model.init_from_params=%r)",
                 source, len(skipped), select.pattern)
  return _flat(loaded)


def source_kind(source: str) -> str:
  """"lift" (a lift_jax checkpoint) or "hf" (a Hugging Face CLIP folder or cached hub id); a
  source that is neither is an InitFromError saying what it is instead."""
  source = os.path.expanduser(source)
  if source.endswith((".pt", ".pth", ".bin")) and os.path.isfile(source):
    raise InitFromError(
        f"model.init_from={source} is a PyTorch file; convert it once with `python -m "
        "lift_jax.tools.import_torch --checkpoint=FILE --config=CONFIG --output=DIR` and set "
        "model.init_from=DIR")
  if ckpt.is_checkpoint(source):
    return "lift"
  if weights.is_hf_checkpoint(source):
    return "hf"
  what = "does not exist" if not os.path.exists(source) else "is a folder of neither kind"
  raise InitFromError(
      f"model.init_from={source} {what}: give a lift_jax checkpoint (workdir, checkpoints folder "
      "or step folder) or a Hugging Face CLIP folder (config.json + *.safetensors) or a hub id "
      "already in the local cache")


SHAPE_KEYS = ("width", "depth", "mlp_dim", "num_heads", "patch_size")


def config_shape(model_cfg: Mapping[str, Any]) -> dict[str, int]:
  """The image tower's shape a model config describes (model.vit.* and model.image_size)."""
  vit = parse_variant(model_cfg["variant"], **dict(model_cfg.get("vit") or {}))
  return {**{k: getattr(vit, k) for k in SHAPE_KEYS}, "image_size": int(model_cfg["image_size"])}


def source_shape(source: str) -> dict[str, int]:
  """The image tower's shape of ``model.init_from`` (from its own config; no tensor is read)."""
  try:
    if source_kind(source) == "lift":
      return config_shape(config_lib.model_config(ckpt.read_config(source).model))
    return weights.hf_vision_shape(weights.hf_config_file(source))
  except (weights.StateDictError, ckpt.CheckpointError) as e:
    raise InitFromError(f"model.init_from={source}: {e}") from None


def shape_problems(model_cfg: Mapping[str, Any]) -> list[str]:
  """Every difference between the config's tower shape and model.init_from's, each with the key
  that fixes it ([] when they agree, or without init_from)."""
  if not model_cfg.get("init_from"):
    return []
  mine, theirs = config_shape(model_cfg), source_shape(str(model_cfg["init_from"]))
  out = []
  for key, value in theirs.items():
    if mine[key] != value:
      flag = "model.image_size" if key == "image_size" else f"model.vit.{key}"
      out.append(f"--config.{flag}={value} (the config has {mine[key]})")
  return out


def resolve_shape(config):
  """With ``model.tower_shape='init_from'``, the config with the tower's shape read from
  model.init_from (the input config is not changed); otherwise the config itself."""
  model = config.model
  if model.get("tower_shape", "config") == "config":
    return config
  if model.tower_shape != "init_from":
    raise cli.ConfigError(f"model.tower_shape={model.tower_shape!r}: expected 'config' or "
                          "'init_from'")
  if not model.get("init_from"):
    raise cli.ConfigError("model.tower_shape='init_from' needs model.init_from (the checkpoint "
                          "whose shape the tower takes)")
  shape = source_shape(str(model.init_from))
  config = ml_collections.ConfigDict(config.to_dict())
  for key in SHAPE_KEYS:
    config.model.vit[key] = shape[key]
  config.model.image_size = shape["image_size"]
  return config


def check(model_cfg: Mapping[str, Any]) -> str:
  """What a run starting from model.init_from checks before building anything: the source is
  there and of a known kind, its tensors compute what ours do (HF: activation, heads, epsilon),
  and its shape is the config's (every mismatch at once, with the keys to set)."""
  source = str(model_cfg["init_from"])
  kind = source_kind(source)
  problems = []
  if kind == "hf":
    try:
      problems += weights.hf_config_problems(weights.hf_config_file(source), model_cfg,
                                             vision_heads=False)
    except weights.StateDictError as e:
      raise InitFromError(f"model.init_from={source}: {e}") from None
  problems += shape_problems(model_cfg)
  if problems:
    raise InitFromError(f"model.init_from={source} does not fit the config's model; set "
                        + "; ".join(problems) + " (or --config.model.tower_shape=init_from to "
                        "take the tower's shape from the checkpoint)")
  shape = source_shape(source)
  return (f"{'lift_jax checkpoint' if kind == 'lift' else 'Hugging Face CLIP'} {source}: tower "
          f"width {shape['width']}, depth {shape['depth']}, {shape['num_heads']} heads, patch "
          f"{shape['patch_size']}, {shape['image_size']} px, as the config")


def load_into(params, model_cfg: Mapping[str, Any], optim_cfg: Mapping[str, Any] | None = None):
  """``params`` (the model's pure dict, possibly sharded) with the selected parameters replaced
  by ``model_cfg['init_from']``'s, each placed as the parameter it replaces. One log line says
  what was loaded and what ``optim_cfg['frozen']`` keeps fixed."""
  model_cfg = config_lib.model_config(model_cfg)
  source = os.path.expanduser(str(model_cfg["init_from"]))
  pattern = model_cfg["init_from_params"]
  try:
    select = re.compile(pattern)
  except re.error as e:
    raise InitFromError(f"model.init_from_params={pattern!r} is not a regex ({e})") from None
  abstract = _flat(params)
  if not any(select.search(k) for k in abstract):
    raise InitFromError(f"model.init_from_params={pattern!r} matches no parameter of the model "
                        f"(paths look like {next(iter(abstract))!r})")
  if source_kind(source) == "lift":
    loaded = _from_lift_checkpoint(source, abstract, select)
  else:
    loaded = _from_hf(source, model_cfg, params, select)

  def replace(path, leaf):
    value = loaded.get(path_str(path))
    if value is None:
      return leaf
    value = np.asarray(value, leaf.dtype)
    if hasattr(leaf, "sharding"):
      return jax.device_put(value, leaf.sharding)
    return value

  out = jax.tree_util.tree_map_with_path(replace, params)
  frozen_rules = optim.frozen_rules(optim_cfg)
  frozen = [k for k, m in _flat(optim.frozen_mask(params, frozen_rules)).items() if m]
  size = lambda names: sum(int(np.prod(abstract[k].shape)) for k in names)  # noqa: E731
  logging.info("model.init_from: loaded %d tensors (%s parameters) from %s into %s; frozen by "
               "optim.frozen=%s: %d tensors (%s parameters), %s trained", len(loaded),
               f"{size(loaded):,}", source, pattern, list(frozen_rules), len(frozen),
               f"{size(frozen):,}", f"{size(abstract) - size(frozen):,}")
  return out


def import_checkpoint(checkpoint: str, config, output: str, overwrite: bool = False) -> str:
  """Writes the parameters of a PyTorch, OpenCLIP-folder or Hugging Face checkpoint, converted
  for ``config``'s model, as a params-only lift_jax checkpoint in ``output``; returns the step
  folder."""
  output = os.path.abspath(os.path.expanduser(output))  # orbax writes absolute paths only
  ckpt.prepare_import_output(output, overwrite)
  model_cfg = config_lib.model_config(config.model.to_dict())
  if weights.is_open_clip_dir(checkpoint):
    state, oc_config = weights.load_open_clip_dir(checkpoint)
    problems = weights.open_clip_config_problems(oc_config, model_cfg)
    if problems:
      raise weights.StateDictError(f"{checkpoint}: " + "; ".join(problems))
  elif weights.is_hf_checkpoint(checkpoint):
    state, hf_config = weights.load_hf_clip(checkpoint)
    problems = weights.hf_config_problems(hf_config, model_cfg)
    if problems:
      raise weights.StateDictError(f"{checkpoint}: " + "; ".join(problems))
  else:
    state = weights.load_torch_state_dict(checkpoint)
  params = weights.convert(state, weights.abstract_params(model_cfg))
  return ckpt.save_params(output, 0, params, config)
