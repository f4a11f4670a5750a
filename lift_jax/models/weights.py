"""PyTorch checkpoints (OpenCLIP / the official LIFT release, Hugging Face CLIP) as this project's
parameters, and back: the one place that knows both naming schemes.

Used by :mod:`lift_jax.pretrained` (``model.init_from``, ``import_checkpoint``) and by the command
``python -m lift_jax.tools.import_torch``. OpenCLIP state dicts are accepted bare or as
``{"state_dict": ...}`` (OpenCLIP training checkpoints), with or without DDP's ``module.`` prefix;
torch is imported only to read ``.pt`` files.

Hugging Face CLIP (``CLIPModel``, ``CLIPVisionModel[WithProjection]``,
``CLIPTextModel[WithProjection]``): a folder holding ``config.json`` and ``*.safetensors``, or a
hub id already in the local Hugging Face cache (nothing is downloaded). Its names are first
rewritten to OpenCLIP's (:func:`hf_clip_to_openclip`), so one map serves both:

    vision_model.embeddings.patch_embedding.weight      visual.conv1.weight
    vision_model.embeddings.class_embedding             visual.class_embedding
    vision_model.embeddings.position_embedding.weight   visual.positional_embedding
    vision_model.pre_layrnorm.*                         visual.ln_pre.*
    vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj.*  ...resblocks.{i}.attn.in_proj_*
                                                        (q, k, v concatenated, in that order)
    ...self_attn.out_proj.*                             ...attn.out_proj.*
    ...layer_norm1.* / layer_norm2.*                    ...ln_1.* / ln_2.*
    ...mlp.fc1.* / mlp.fc2.*                            ...mlp.c_fc.* / mlp.c_proj.*
    vision_model.post_layernorm.*                       visual.ln_post.*
    visual_projection.weight                            visual.proj (transposed)
    text_model.embeddings.{token,position}_embedding.weight  token_embedding.weight,
                                                        positional_embedding
    text_model.encoder.layers.{i}.*                     transformer.resblocks.{i}.* (as above)
    text_model.final_layer_norm.*                       ln_final.*
    text_projection.weight                              text_projection (transposed)
    logit_scale                                         logit_scale

What maps exactly and what does not: every tensor above has the same meaning here, so the blocks,
ln_pre and the class-token output are HF's function exactly (``model.pool='tok'``:
post_layernorm of the class token, HF's ``pooler_output``; with the projection, its
``image_embeds``). Two things differ, and the importer does not let them pass silently:

* Activation. This project's MLPs use exact (erf) GELU, as SPEC prescribes. OpenAI's CLIP weights
  (``openai/clip-vit-*``) were trained with ``quick_gelu``, which their config.json states
  (``hidden_act``; HF's default when absent). Such checkpoints are refused: the imported tower
  would compute another function. Checkpoints trained with exact GELU (the LAION and DataComp
  OpenCLIP releases on the hub, ``hidden_act: "gelu"``) import exactly.
* Pooling. HF applies ``post_layernorm`` to the class token only; this ViT applies ``ln_post`` to
  every token, then ``model.pool='avg'`` (LIFT's) averages the patch tokens. Through the class
  token that is the same function; the average of patch tokens is a feature the pretrained
  tower never produced, which the tower-initialising path (``model.init_from``) logs as a
  warning.

The head count (``num_attention_heads``) and LayerNorm epsilon are not visible in the tensors'
shapes; they are checked against config.json too.

OpenCLIP folders (``open_clip_config.json`` + ``open_clip_model.safetensors``, the layout of
OpenCLIP's hub and ``local-dir:`` loading) are read by :func:`load_open_clip_dir`, with a lift_jax
export's ``lift_head.safetensors`` and without the placeholder tensors its manifest lists.

The other direction, used by :mod:`lift_jax.export`: :func:`to_openclip` (our parameters ->
OpenCLIP names; checked against the map above, so :func:`convert` gives them back exactly),
:func:`openclip_to_hf_clip` (-> Hugging Face names, q, k, v split), and the config files of both
formats (:func:`hf_vision_config`, :func:`hf_preprocessor_config`,
:func:`open_clip_model_config`); :func:`export_problems` names what a format cannot express.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from lift_jax import cli
from lift_jax.models.two_tower import TwoTower
from lift_jax.models.vit import parse_variant

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
_SIMPLE = {
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
  return _SIMPLE.get(name)


_HF_BLOCK = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
}
_HF_SIMPLE = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
# HF Linear weights that OpenCLIP stores as plain (in, out) matrices.
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj",
                  "text_projection.weight": "text_projection"}
_HF_IGNORED = (r"(^|\.)position_ids$",)


# Single-tower models (CLIPVisionModel, CLIPTextModel) may be saved without their tower prefix
# (transformers 5 does): names starting so get it back.
_BARE_TOWER = {"clip_vision_model": ("vision_model.", ("embeddings.", "encoder.", "pre_layrnorm.",
                                                       "post_layernorm.")),
               "clip_text_model": ("text_model.", ("embeddings.", "encoder.",
                                                   "final_layer_norm."))}


def hf_clip_to_openclip(state: Mapping[str, np.ndarray], model_type: str | None = None
                        ) -> dict[str, np.ndarray]:
  """Renames a Hugging Face CLIP state dict to OpenCLIP's names (fusing q, k, v); names it does not
  know are kept, so :func:`convert` reports them as unexpected. ``model_type`` is config.json's."""
  out: dict[str, np.ndarray] = {}
  qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  if model_type in _BARE_TOWER:
    prefix, starts = _BARE_TOWER[model_type]
    state = {(prefix + k if k.startswith(starts) else k): v for k, v in state.items()}
  for name, value in state.items():
    if any(re.search(p, name) for p in _HF_IGNORED):
      continue
    if name in _HF_SIMPLE:
      out[_HF_SIMPLE[name]] = value
      continue
    if name in _HF_TRANSPOSED:
      out[_HF_TRANSPOSED[name]] = np.asarray(value).T
      continue
    m = re.fullmatch(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)", name)
    if m:
      prefix = ("visual." if m[1] == "vision" else "") + f"transformer.resblocks.{m[2]}."
      a = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", m[3])
      if a:
        qkv.setdefault((prefix, a[2]), {})[a[1]] = value
        continue
      if m[3] in _HF_BLOCK:
        out[prefix + _HF_BLOCK[m[3]]] = value
        continue
    out[name] = value
  for (prefix, kind), parts in qkv.items():
    if set(parts) != {"q", "k", "v"}:
      absent = sorted({"q", "k", "v"} - set(parts))
      raise StateDictError(f"{prefix}attn: the checkpoint has no self_attn.{absent[0]}_proj.{kind} "
                           "for this layer (q, k and v are all needed)")
    out[f"{prefix}attn.in_proj_{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]])
  return out


def is_hf_checkpoint(source: str) -> bool:
  """A folder with a config.json, or a hub id (``org/name``, not an existing path)."""
  path = os.path.expanduser(source)
  if os.path.isdir(path):
    return os.path.isfile(os.path.join(path, "config.json"))
  return not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


def hf_folder(source: str) -> str:
  """The local folder of a Hugging Face checkpoint: ``source`` itself, or the local cache's
  snapshot of a hub id (the cache is read only; nothing is downloaded)."""
  path = os.path.expanduser(source)
  if os.path.isdir(path):
    return path
  from huggingface_hub import snapshot_download

  try:
    return snapshot_download(source, local_files_only=True,
                             allow_patterns=["*.json", "*.safetensors"])
  except Exception as e:  # not cached (LocalEntryNotFoundError), bad id, ...
    raise StateDictError(
        f"{source}: not a local folder and not in the Hugging Face cache ({type(e).__name__}). "
        f"Download it where there is network (`hf download {source}`) and pass "
        "the cached snapshot or a copy of the folder") from None


def load_hf_clip(source: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(OpenCLIP-named float32 state dict, config.json) of a Hugging Face CLIP checkpoint."""
  folder = hf_folder(source)
  hf_config = hf_config_file(source)
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not files:
    raise StateDictError(
        f"{folder}: no *.safetensors file (only safetensors are read; re-save the model with "
        "`model.save_pretrained(folder, safe_serialization=True)`)")
  state: dict[str, np.ndarray] = {}
  for path in files:
    try:
      tensors = load_file(path)
    except Exception as e:
      raise StateDictError(f"{path}: not a readable safetensors file ({e})") from None
    state.update({k: np.asarray(v, np.float32) for k, v in tensors.items()})
  return hf_clip_to_openclip(state, hf_config.get("model_type")), hf_config


# transformers' CLIPVisionConfig / CLIPTextConfig defaults for the fields read here: a config.json
# that leaves a field out means these (tests/test_pretrained.py checks them against transformers).
HF_DEFAULTS = {
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
               "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 8, "max_position_embeddings": 77,
             "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
}


def hf_sections(hf_config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """{"vision": ..., "text": ...} of a CLIP config.json, each with transformers' defaults for the
  fields it leaves out (single-tower configs have one section)."""
  if hf_config.get("model_type") == "clip_vision_model":
    sections = {"vision": hf_config}
  elif hf_config.get("model_type") == "clip_text_model":
    sections = {"text": hf_config}
  else:
    sections = {k: hf_config.get(f"{k}_config") or {} for k in ("vision", "text")}
  return {k: {**HF_DEFAULTS[k], **v} for k, v in sections.items()}


def hf_vision_shape(hf_config: Mapping[str, Any]) -> dict[str, int]:
  """The image tower's shape, in this project's terms (model.vit.* and model.image_size)."""
  v = hf_sections(hf_config).get("vision")
  if v is None:
    raise StateDictError("the checkpoint's config.json describes no image tower")
  return {"width": int(v["hidden_size"]), "depth": int(v["num_hidden_layers"]),
          "mlp_dim": int(v["intermediate_size"]), "num_heads": int(v["num_attention_heads"]),
          "patch_size": int(v["patch_size"]), "image_size": int(v["image_size"])}


def hf_config_problems(hf_config: Mapping[str, Any], model_cfg: Mapping[str, Any],
                       towers: tuple[str, ...] = ("vision", "text"),
                       vision_heads: bool = True) -> list[str]:
  """What in a Hugging Face CLIP config.json would make the imported towers compute a different
  function than this project's (activation, head count, LayerNorm epsilon); empty if none.
  ``vision_heads=False`` leaves the image tower's head count to a shape check."""
  problems = []
  for tower, section in hf_sections(hf_config).items():
    if tower not in towers or (tower == "text" and model_cfg.get("mode") != "clip"):
      continue
    act = section["hidden_act"]
    if act != "gelu":
      problems.append(
          f"{tower}_config.hidden_act is {act!r}, but this project's transformer MLPs use exact "
          "GELU ('gelu'); the imported tower would compute a different function. Use a "
          "checkpoint trained with exact GELU (e.g. the LAION/DataComp OpenCLIP releases)")
    if tower == "vision":
      heads = parse_variant(model_cfg["variant"], **dict(model_cfg.get("vit") or {})).num_heads
      key = "model.vit.num_heads"
    else:
      heads = dict(model_cfg.get("text") or {}).get("num_heads")
      key = "model.text.num_heads"
    hf_heads = section["num_attention_heads"]
    if heads is not None and int(hf_heads) != int(heads) and (tower == "text" or vision_heads):
      problems.append(f"{tower}_config.num_attention_heads is {hf_heads}, the config's model has "
                      f"{heads} heads: set --config.{key}={hf_heads}")
    eps = float(section["layer_norm_eps"])
    if abs(eps - 1e-5) > 1e-12:
      problems.append(f"{tower}_config.layer_norm_eps is {eps}; this project's LayerNorms use "
                      "1e-5")
  return problems


def hf_config_file(source: str) -> dict[str, Any]:
  """The config.json of a Hugging Face checkpoint (folder or cached hub id), no tensors read."""
  folder = hf_folder(source)
  path = os.path.join(folder, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise StateDictError(f"{folder}: no config.json; a Hugging Face checkpoint folder holds "
                         "config.json and *.safetensors") from None
  except json.JSONDecodeError as e:
    raise StateDictError(f"{path}: not valid JSON ({e})") from None


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


def convert(state_dict: Mapping[str, np.ndarray], abstract_params, select: str | None = None,
            skipped: list[str] | None = None) -> dict[str, Any]:
  """Maps an OpenCLIP-named state dict of numpy arrays onto ``abstract_params`` (a nested dict of
  objects with ``.shape``). Raises StateDictError listing every missing/unexpected/mis-shaped key.

  ``select`` (a regex over parameter paths such as ``visual/ln_pre/scale``) imports only the
  parameters it matches: those must all be covered, and tensors for other parameters (or for
  parts the model lacks, like a CLIP text tower when the model is LIFT's) are left out and their
  names appended to ``skipped``. Names no map knows are unexpected either way."""
  params: dict[str, Any] = {}
  unexpected, misshaped = [], []
  covered = set()
  chosen = re.compile(select) if select else None
  for name, value in state_dict.items():
    if any(re.search(p, name) for p in IGNORED):
      continue
    target = _target(name)
    if target is not None and chosen and not chosen.search("/".join(map(str, target[0]))):
      if skipped is not None:
        skipped.append(name)
      continue
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
  missing = ["/".join(map(str, p)) for p in _flat_paths(abstract_params) if p not in covered
             and (chosen is None or chosen.search("/".join(map(str, p))))]
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
  import torch  # only this reader needs PyTorch; the trainer never imports it

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
  """ShapeDtypeStructs of the parameters of the model ``model_cfg`` describes (nothing is
  allocated)."""
  abstract = nnx.eval_shape(lambda: TwoTower(dict(model_cfg), rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.split(abstract)[1])


# --------------------------------------------------------------------------------------------
# OpenCLIP folders (``open_clip_config.json`` + ``open_clip_model.safetensors``)
# --------------------------------------------------------------------------------------------

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
# Tensors of a LIFT model that neither transformers' nor OpenCLIP's image classes hold (the MLP
# head in the authors' names, the logit scale and bias), written beside their weights.
LIFT_EXTRAS = "lift_head.safetensors"
# What a lift_jax export folder says about itself (lift_jax.export writes it).
EXPORT_MANIFEST = "lift_jax_export.json"


def is_open_clip_dir(source: str) -> bool:
  """A folder holding ``open_clip_config.json`` (OpenCLIP's hub and local-dir layout)."""
  return os.path.isfile(os.path.join(os.path.expanduser(source), OPEN_CLIP_CONFIG))


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise StateDictError(f"{path}: not valid JSON ({e})") from None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # light, but only the readers need it

  try:
    return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
  except Exception as e:
    raise StateDictError(f"{path}: not a readable safetensors file ({e})") from None


def load_open_clip_dir(source: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(OpenCLIP-named float32 state dict, open_clip_config.json) of an OpenCLIP folder.

  Reads ``open_clip_model.safetensors`` and, where present, ``lift_head.safetensors``; tensors
  that a lift_jax export lists as placeholders (a LIFT export's identity ``visual.proj`` and
  stand-in text tower, which OpenCLIP's loader requires) are left out."""
  folder = os.path.expanduser(source)
  oc_config = read_json(os.path.join(folder, OPEN_CLIP_CONFIG))
  if "model_cfg" not in oc_config:
    raise StateDictError(f"{folder}/{OPEN_CLIP_CONFIG} has no 'model_cfg' (not an OpenCLIP "
                         "model folder)")
  weights_path = os.path.join(folder, OPEN_CLIP_WEIGHTS)
  if not os.path.isfile(weights_path):
    raise StateDictError(f"{folder}: no {OPEN_CLIP_WEIGHTS} (only safetensors are read; a "
                         ".bin checkpoint imports as a .pt file: --checkpoint=FILE)")
  state = _read_safetensors(weights_path)
  extras = os.path.join(folder, LIFT_EXTRAS)
  if os.path.isfile(extras):
    state.update(_read_safetensors(extras))
  manifest = os.path.join(folder, EXPORT_MANIFEST)
  if os.path.isfile(manifest):
    for name in read_json(manifest).get("placeholder_tensors", ()):
      state.pop(name, None)
  return strip_wrappers(state), oc_config


def open_clip_config_problems(oc_config: Mapping[str, Any], model_cfg: Mapping[str, Any]
                              ) -> list[str]:
  """What in an open_clip_config.json would make the imported model compute a different function
  than the config's (activation, pooling, head count); empty if none."""
  cfg = oc_config.get("model_cfg", {})
  vision = cfg.get("vision_cfg", {})
  problems = []
  if cfg.get("quick_gelu"):
    problems.append("model_cfg.quick_gelu is true, but this project's MLPs use exact GELU; the "
                    "imported model would compute a different function")
  pool = "tok" if vision.get("pool_type", "tok") == "tok" else vision.get("pool_type")
  if pool != model_cfg.get("pool"):
    problems.append(f"vision_cfg.pool_type is {pool!r}, the config's model.pool is "
                    f"{model_cfg.get('pool')!r}: set model.pool={pool!r}")
  if vision.get("final_ln_after_pool") or vision.get("attentional_pool"):
    problems.append("vision_cfg.final_ln_after_pool / attentional_pool: this ViT applies ln_post "
                    "to every token before pooling and has no attentional pooler")
  shape = parse_variant(model_cfg["variant"], **dict(model_cfg.get("vit") or {}))
  heads = int(vision.get("width", shape.width)) // int(vision.get("head_width", 64))
  if heads != shape.num_heads:
    problems.append(f"vision_cfg gives {heads} heads (width / head_width), the config's model "
                    f"has {shape.num_heads}: set model.vit.num_heads={heads}")
  return problems


# --------------------------------------------------------------------------------------------
# Export: this project's parameters -> OpenCLIP names -> Hugging Face names
# --------------------------------------------------------------------------------------------

_SIMPLE_NAMES = {path: name for name, (path, _) in _SIMPLE.items()}
_BLOCK_NAMES = {path: name for name, path in _BLOCK.items()}
_LN_NAMES = {v: k for k, v in _LN.items()}


def _key(p):
  """Orbax restores list indices as strings: '3' -> 3, so paths compare with the maps'."""
  return int(p) if isinstance(p, str) and p.isdigit() else p


def _openclip_name(path: tuple[Any, ...]) -> str | None:
  """The OpenCLIP / official-LIFT name of one of our parameters (what :func:`_target` inverts)."""
  if path in _SIMPLE_NAMES:
    return _SIMPLE_NAMES[path]
  if len(path) >= 5 and path[1:3] == ("transformer", "resblocks"):
    rest = _BLOCK_NAMES.get(tuple(path[4:]))
    prefix = "visual." if path[0] == "visual" else ""
    return rest and f"{prefix}transformer.resblocks.{path[3]}.{rest}"
  if len(path) == 3 and path[:2] in (("visual", "ln_pre"), ("visual", "ln_post"),
                                     ("text", "ln_final")):
    prefix = "visual." if path[0] == "visual" else ""
    return f"{prefix}{path[1]}.{_LN_NAMES[path[2]]}"
  if len(path) == 4 and path[:2] == ("head", "layers"):
    return (f"mlp_projector.projector.{2 * int(path[2])}."
            f"{'weight' if path[3] == 'kernel' else 'bias'}")
  return None


def _untransform(array: np.ndarray, how: str) -> np.ndarray:
  """The inverse of :func:`_transform`."""
  if how == "linear":  # (in, out) -> torch Linear (out, in)
    return array.T
  if how == "conv":  # (kh, kw, in, out) -> (out, in, kh, kw)
    return array.transpose(3, 2, 0, 1)
  if how == "scalar":
    return array.reshape(())
  return array


def to_openclip(params) -> dict[str, np.ndarray]:
  """Our parameters (a nested dict, as restored from a checkpoint) -> an OpenCLIP / official-LIFT
  named state dict of contiguous float32 arrays; :func:`convert` maps it back exactly.

  Contiguous because safetensors' numpy writer stores a transposed (non-contiguous) array's raw
  buffer, which reads back scrambled."""
  out = {}
  for raw in _flat_paths(params):
    path = tuple(_key(p) for p in raw)
    name = _openclip_name(path)
    target = _target(name) if name else None
    if target is None or tuple(target[0]) != path:  # the two maps disagree: a bug here
      raise ValueError(f"parameter {'/'.join(map(str, path))} has no OpenCLIP name")
    value = np.asarray(_get(params, raw), np.float32)
    out[name] = np.ascontiguousarray(_untransform(value, target[1]))
  return out


_HF_NAMES = {v: k for k, v in _HF_SIMPLE.items()}
_HF_BLOCK_NAMES = {v: k for k, v in _HF_BLOCK.items()}
_HF_TRANSPOSED_NAMES = {v: k for k, v in _HF_TRANSPOSED.items()}


def openclip_to_hf_clip(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """OpenCLIP names -> Hugging Face CLIP names (``in_proj`` split into q, k, v), the inverse of
  :func:`hf_clip_to_openclip`; a name with no Hugging Face counterpart (the LIFT head) is an
  error."""
  out: dict[str, np.ndarray] = {}
  for name, value in state.items():
    value = np.asarray(value, np.float32)
    m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", name)
    if name in _HF_NAMES:
      out[_HF_NAMES[name]] = value
    elif name in _HF_TRANSPOSED_NAMES:
      out[_HF_TRANSPOSED_NAMES[name]] = value.T
    elif m and m[3] in ("attn.in_proj_weight", "attn.in_proj_bias"):
      prefix = f"{'vision' if m[1] else 'text'}_model.encoder.layers.{m[2]}.self_attn."
      kind = m[3].rsplit("_", 1)[1]
      for part, chunk in zip("qkv", np.split(value, 3)):
        out[f"{prefix}{part}_proj.{kind}"] = chunk
    elif m and m[3] in _HF_BLOCK_NAMES:
      prefix = f"{'vision' if m[1] else 'text'}_model.encoder.layers.{m[2]}."
      out[prefix + _HF_BLOCK_NAMES[m[3]]] = value
    else:
      raise StateDictError(f"{name}: transformers' CLIP classes have no place for this tensor")
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
