"""Import an official LIFT or OpenCLIP PyTorch checkpoint as a lift_jax checkpoint.

    python -m lift_jax.tools.import_torch --checkpoint=FILE.pt --config=configs/vitb16_datacomp.py \
        --output=DIR

The config decides the model's shape; every tensor of the state dict must map onto a parameter of
that model with the same shape and every parameter must be covered, otherwise the tool stops and
names the missing, unexpected and mis-shaped keys. The result (``DIR/checkpoints/0``) is read by
``lift_jax.load``, ``eval.main`` and, as initial parameters, by training. ``DIR`` must be new or
empty (``--overwrite`` replaces its ``checkpoints/`` and ``config.json``).

Accepted layouts: a bare state dict, or ``{"state_dict": ...}`` (OpenCLIP training checkpoints),
with or without DDP's ``module.`` prefix. torch is imported by this tool only.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Mapping

import numpy as np

from lift_jax import cli

# Buffers that are not parameters (OpenCLIP registers the causal mask as a buffer).
IGNORED = (r"^attn_mask$", r"^text\.attn_mask$")

_BLOCK = {
    "ln_1.weight": ("ln_1", "scale"), "ln_1.bias": ("ln_1", "bias"),
    "ln_2.weight": ("ln_2", "scale"), "ln_2.bias": ("ln_2", "bias"),
    "attn.in_proj_weight": ("attn", "in_proj", "kernel"),
    "attn.in_proj_bias": ("attn", "in_proj", "bias"),
    "attn.out_proj.weight": ("attn", "out_proj", "kernel"),
    "attn.out_proj.bias": ("attn", "out_proj", "bias"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "kernel"), "mlp.c_fc.bias": ("mlp", "c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "kernel"),
    "mlp.c_proj.bias": ("mlp", "c_proj", "bias"),
}
_LN = {"weight": "scale", "bias": "bias"}


@cli.user_error
class StateDictError(ValueError):
  """The state dict does not fit the model; the message lists every problem."""


def strip_wrappers(obj: Any) -> dict[str, Any]:
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise StateDictError(f"expected a state dict (mapping of names to tensors), got {type(obj)}")
  return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _target(name: str) -> tuple[tuple[Any, ...], str] | None:
  """OpenCLIP name -> (path in our params, how to transform the tensor), or None if unknown."""
  m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", name)
  if m:
    tower = "visual" if m[1] else "text"
    if m[3] not in _BLOCK:
      return None
    path = (tower, "transformer", "resblocks", int(m[2])) + _BLOCK[m[3]]
    return path, ("linear" if path[-1] == "kernel" else "copy")
  m = re.fullmatch(r"visual\.(ln_pre|ln_post)\.(weight|bias)", name)
  if m:
    return ("visual", m[1], _LN[m[2]]), "copy"
  m = re.fullmatch(r"ln_final\.(weight|bias)", name)
  if m:
    return ("text", "ln_final", _LN[m[1]]), "copy"
  m = re.fullmatch(r"mlp_projector\.projector\.(\d+)\.(weight|bias)", name)
  if m:
    idx = int(m[1])
    if idx % 2:
      return None  # odd indices are the GELUs between the Linears: no parameters
    return ("head", "layers", idx // 2, "kernel" if m[2] == "weight" else "bias"), (
        "linear" if m[2] == "weight" else "copy")
  simple = {
      "visual.conv1.weight": (("visual", "conv1"), "conv"),
      "visual.class_embedding": (("visual", "class_embedding"), "copy"),
      "visual.positional_embedding": (("visual", "positional_embedding"), "copy"),
      "visual.proj": (("head", "kernel"), "copy"),
      "token_embedding.weight": (("text", "token_embedding"), "copy"),
      "positional_embedding": (("text", "positional_embedding"), "copy"),
      "text_projection": (("text", "text_projection"), "copy"),
      "logit_scale": (("logit_scale",), "scalar"),
      "logit_bias": (("logit_bias",), "scalar"),
  }
  return simple.get(name)


def _transform(array: np.ndarray, how: str) -> np.ndarray:
  if how == "linear":  # torch Linear (out, in) -> (in, out)
    return array.T
  if how == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
    return array.transpose(2, 3, 1, 0)
  if how == "scalar":
    return array.reshape(())
  return array


def _get(tree, path):
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _flat_paths(tree, prefix=()):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _flat_paths(v, prefix + (k,))
  else:
    yield prefix


def convert(state_dict: Mapping[str, np.ndarray], abstract_params) -> dict[str, Any]:
  """Maps an OpenCLIP-named state dict of numpy arrays onto ``abstract_params`` (a nested dict of
  objects with ``.shape``). Raises StateDictError listing every missing/unexpected/mis-shaped key."""
  params: dict[str, Any] = {}
  unexpected, misshaped = [], []
  covered = set()
  for name, value in state_dict.items():
    if any(re.search(p, name) for p in IGNORED):
      continue
    target = _target(name)
    expected = None if target is None else _get(abstract_params, target[0])
    if target is None or expected is None:
      unexpected.append(name)
      continue
    path, how = target
    array = _transform(np.asarray(value, np.float32), how)
    if tuple(array.shape) != tuple(expected.shape):
      misshaped.append(f"{name}: checkpoint {tuple(np.shape(value))} -> {tuple(array.shape)}, "
                       f"model {'/'.join(map(str, path))} expects {tuple(expected.shape)}")
      continue
    _set(params, path, array)
    covered.add(path)
  missing = ["/".join(map(str, p)) for p in _flat_paths(abstract_params) if p not in covered]
  if unexpected or misshaped or missing:
    lines = []
    for title, items in (("missing (model parameters with no tensor)", missing),
                         ("unexpected (tensors the model has no place for)", unexpected),
                         ("mis-shaped", misshaped)):
      if items:
        lines.append(f"{len(items)} {title}:\n  " + "\n  ".join(items[:20]) +
                     ("\n  ..." if len(items) > 20 else ""))
    raise StateDictError("the checkpoint does not fit the config's model.\n" + "\n".join(lines))
  return params


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  import torch

  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise StateDictError(f"{path}: no such file") from None
  except Exception as e:
    raise StateDictError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})"
                       ) from None
  state = strip_wrappers(obj)
  out = {}
  for k, v in state.items():
    if not hasattr(v, "detach"):
      raise StateDictError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = v.detach().to(torch.float32).cpu().numpy()
  return out


def abstract_params(model_cfg: Mapping[str, Any]):
  from flax import nnx

  from lift_jax.models.two_tower import TwoTower

  abstract = nnx.eval_shape(lambda: TwoTower(dict(model_cfg), rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.split(abstract)[1])


@cli.user_error
class OutputFolderError(ValueError):
  """The output folder already holds something an import would sit beside."""


def prepare_output(output: str, overwrite: bool = False) -> None:
  """Refuses a non-empty ``output``: step 0 written beside a training run's later steps would
  never be read (eval and training take the latest step). With ``overwrite``, the folder's
  ``checkpoints/`` and ``config.json`` are removed first; nothing else is touched."""
  from lift_jax import checkpoint as ckpt

  if os.path.exists(output) and not os.path.isdir(output):
    raise OutputFolderError(f"--output={output} is a file, not a folder")
  if not os.path.isdir(output) or not os.listdir(output):
    return
  held = sorted(os.listdir(output))
  if not overwrite:
    steps = os.path.join(output, ckpt.CHECKPOINTS)
    what = (f"checkpoint steps {sorted(os.listdir(steps))[:5]}" if os.path.isdir(steps)
            else f"{held[:5]}")
    raise OutputFolderError(
        f"--output={output} is not empty (it holds {what}); an import writes step 0 there and "
        "eval or training would read the latest step instead. Give a new folder, or add "
        "--overwrite to replace its checkpoints and config.json")
  for name in (ckpt.CHECKPOINTS, "config.json"):
    path = os.path.join(output, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def import_checkpoint(checkpoint: str, config, output: str, overwrite: bool = False) -> str:
  from lift_jax import checkpoint as ckpt

  prepare_output(output, overwrite)
  state = load_torch_state_dict(checkpoint)
  params = convert(state, abstract_params(config.model.to_dict()))
  return ckpt.save_params(output, 0, params, config)


def main(argv):
  del argv
  from absl import flags

  folder = import_checkpoint(flags.FLAGS.checkpoint, flags.FLAGS.config, flags.FLAGS.output,
                             overwrite=flags.FLAGS.overwrite)
  print(f"wrote {folder}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint (.pt/.bin) in OpenCLIP naming.",
                      required=True)
  flags.DEFINE_string("output", None, "Output folder (a lift_jax workdir); must be new or empty.",
                      required=True)
  flags.DEFINE_bool("overwrite", False, "Replace the checkpoints and config.json of a non-empty "
                    "--output.")
  config_flags.DEFINE_config_file("config", None, "A lift_jax config describing the model.",
                                  lock_config=False)
  flags.mark_flag_as_required("config")
  app.run(lambda argv: cli.run("python -m lift_jax.tools.import_torch", main, argv))
