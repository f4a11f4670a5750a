"""A trained checkpoint's image tower in other libraries' formats (the command is
``python -m lift_jax.tools.export``); the tensor name maps are
:mod:`lift_jax.models.weights`', the config files each format needs are written here.

``hf``: a folder that transformers loads with every weight in place --
``CLIPVisionModelWithProjection`` for a CLIP run (``image_embeds`` is our image feature), and
``CLIPVisionModel`` for a LIFT run (the tower LLaVA-style models load), whose MLP head (and
logit scale) go to ``lift_head.safetensors`` in the authors' names
(``mlp_projector.projector.{0,2,..}``): transformers' classes pool the class token after
``post_layernorm`` and project it linearly; LIFT averages the patch tokens after ``ln_post`` on
every token and applies an MLP, which the folder's ``lift_jax_export.json`` spells out as a
recipe. Plus ``preprocessor_config.json`` (CLIPImageProcessor with the evaluation transform).

``open_clip``: ``open_clip_config.json`` + ``open_clip_model.safetensors``, OpenCLIP's hub and
``local-dir:`` layout, loaded strictly. CLIP: the whole model (text tower, tokenizer files when
the run used a Hugging Face tokenizer, logit scale and bias). LIFT: OpenCLIP's VisionTransformer
with ``pool_type='avg'`` is LIFT's pooling exactly, but it has no MLP projection: ``visual.proj``
is the identity (``encode_image`` gives the pooled feature), the head is in
``lift_head.safetensors``, and the text tower OpenCLIP requires is a placeholder (LIFT's text
side is the precomputed LLM embedding); the manifest lists those placeholder tensors, and the
import (:func:`lift_jax.models.weights.load_open_clip_dir`) leaves them out.

Every file is written in float32, read back and compared bit for bit. ``lift_jax_export.json``
names the run (workdir, step, its config), the text encoder and its settings (from the training
embeddings' ``manifest.json``), the preprocessing, the files with their SHA-256, and how to
use them.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from lift_jax import checkpoint as ckpt
from lift_jax import cli, common, config_lib
from lift_jax.data import records, transforms
from lift_jax.models import vit, weights
from lift_jax.models.text import TextTransformer

FORMATS = ("hf", "open_clip")
FORMAT_VERSION = 1
MANIFEST = weights.EXPORT_MANIFEST
HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
HF_PREPROCESSOR = "preprocessor_config.json"


@cli.user_error
class ExportError(ValueError):
  """The checkpoint cannot be exported as asked; the message names the setting or the folder."""


# --------------------------------------------------------------------------------------------
# What each format's config files say about the model
# --------------------------------------------------------------------------------------------


def _mlp_ratio(width: int, mlp_dim: int) -> float:
  """The ``mlp_ratio`` for which OpenCLIP's ``int(width * mlp_ratio)`` is ``mlp_dim``: the float
  nearest mlp_dim / width, or the next one up where float rounding would floor the product."""
  ratio = mlp_dim / width
  while int(width * ratio) < mlp_dim:
    ratio = math.nextafter(ratio, math.inf)
  return ratio


def export_problems(model_cfg: Mapping[str, Any], fmt: str) -> list[str]:
  """Settings of a model that the format ``fmt`` ('hf' | 'open_clip') cannot express, each
  naming the config key; empty when the export computes the same function."""
  if fmt == "hf" and model_cfg["mode"] == "clip" and model_cfg["pool"] != "tok":
    return [f"model.pool={model_cfg['pool']!r}: transformers' CLIPVisionModelWithProjection "
            "projects the class token only (pooler_output); export this tower with "
            "--format=open_clip (pool_type 'avg')"]
  return []


def hf_vision_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """config.json of transformers' CLIPVisionModelWithProjection (CLIP) or CLIPVisionModel (LIFT:
  its head is no linear projection of the class token) for the model's image tower."""
  shape = vit.parse_variant(model_cfg["variant"], **dict(model_cfg.get("vit") or {}))
  clip = model_cfg["mode"] == "clip"
  config = {
      "architectures": ["CLIPVisionModelWithProjection" if clip else "CLIPVisionModel"],
      "model_type": "clip_vision_model",
      "hidden_act": "gelu",  # exact GELU; absent, transformers would take quick_gelu
      "hidden_size": shape.width, "intermediate_size": shape.mlp_dim,
      "num_hidden_layers": shape.depth, "num_attention_heads": shape.num_heads,
      "image_size": int(model_cfg["image_size"]), "patch_size": shape.patch_size,
      "num_channels": 3, "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "dtype": "float32",
  }
  if clip:
    config["projection_dim"] = int(model_cfg["embed_dim"])
  return config


def hf_preprocessor_config(image_size: int, resize_size: int, mean, std) -> dict[str, Any]:
  """preprocessor_config.json: Resize(shorter side, bicubic) -> CenterCrop -> normalise."""
  return {
      "image_processor_type": "CLIPImageProcessor",
      "do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": int(resize_size)},
      "resample": 3, "do_center_crop": True,
      "crop_size": {"height": int(image_size), "width": int(image_size)},
      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": [float(m) for m in mean], "image_std": [float(s) for s in std],
  }


# A LIFT export's stand-in text tower: OpenCLIP's CLIP class cannot be built without one.
PLACEHOLDER_TEXT = {"context_length": 1, "vocab_size": 1, "width": 8, "heads": 1, "layers": 1}


def open_clip_model_config(model_cfg: Mapping[str, Any], hf_tokenizer: str | None = None
                           ) -> dict[str, Any]:
  """open_clip_config.json's ``model_cfg`` for the model: the ViT as OpenCLIP's
  VisionTransformer (``pool_type`` 'avg' or 'tok', ln_post before pooling) and, for CLIP, the
  text transformer (pooled at the argmax token, or at ``eos_id``; ``hf_tokenizer`` names a
  Hugging Face tokenizer whose files lie in the exported folder, which OpenCLIP's local-dir
  loading reads instead of the name). A LIFT
  model gets ``embed_dim`` = the ViT width (its ``visual.proj`` is the identity: encode_image is
  the pooled feature the head takes) and :data:`PLACEHOLDER_TEXT`."""
  shape = vit.parse_variant(model_cfg["variant"], **dict(model_cfg.get("vit") or {}))
  vision = {"image_size": int(model_cfg["image_size"]), "patch_size": shape.patch_size,
            "width": shape.width, "layers": shape.depth,
            "head_width": shape.width // shape.num_heads,
            "mlp_ratio": _mlp_ratio(shape.width, shape.mlp_dim),
            "pool_type": "avg" if model_cfg["pool"] == "avg" else "tok",
            "final_ln_after_pool": False, "no_ln_pre": False}
  config: dict[str, Any] = {"quick_gelu": False, "vision_cfg": vision}
  if model_cfg["mode"] == "clip":
    t = model_cfg["text"]
    width = int(t["width"])
    text = {"context_length": int(t["context_length"]), "vocab_size": int(t["vocab_size"]),
            "width": width, "heads": int(t["num_heads"]), "layers": int(t["depth"]),
            "mlp_ratio": _mlp_ratio(width, int(t.get("mlp_dim") or 4 * width))}
    if t.get("eot_token_id") is not None:
      text.update(pool_type="eos", eos_id=int(t["eot_token_id"]))
    if hf_tokenizer:
      text["hf_tokenizer_name"] = hf_tokenizer
    config["embed_dim"] = int(model_cfg["embed_dim"])
    config["text_cfg"] = text
  else:
    config["embed_dim"] = shape.width
    config["text_cfg"] = dict(PLACEHOLDER_TEXT)
  if model_cfg.get("loss") == "sigmoid":
    config["init_logit_bias"] = 0.0  # makes OpenCLIP create logit_bias; the value is loaded
  return config


# ---------------------------------------------------------------------------------------------
# Reading the run
# ---------------------------------------------------------------------------------------------


def _step_path(path: str, step: int | None) -> str:
  directory, latest = ckpt.resolve(path)
  if step is None:
    return os.path.join(directory, str(latest))
  found = ckpt.steps(directory)
  if step not in found:
    raise ExportError(f"--step={step}: {directory} has no finished step {step} (it has "
                      f"{found[-10:]})")
  return os.path.join(directory, str(step))


def text_encoder(run: dict[str, Any]) -> dict[str, Any]:
  """What a run's text side is (``run``: its config, completed with the defaults): LIFT's
  embeddings, with the encoder settings from their manifest, or CLIP's trained text tower."""
  if run["model"]["mode"] == "clip":
    t = run["model"]["text"]
    return {"kind": "trained text transformer (CLIP baseline)",
            "tokenizer": run["data"]["tokenizer"], "context_length": t["context_length"],
            "eot_token_id": t["eot_token_id"]}
  folder = run["data"]["embeddings"]
  out: dict[str, Any] = {"kind": "precomputed LLM embeddings (LIFT: no text tower)",
                         "embeddings": folder}
  if folder and os.path.isfile(os.path.join(folder, records.MANIFEST)):
    manifest = records.read_manifest(folder)
    keys = records.ENCODER_SETTINGS + ("dim", "caption_field", "storage_dtype")
    out.update({k: manifest[k] for k in keys if k in manifest})
  else:
    out["note"] = (f"{folder}/{records.MANIFEST} was not readable at export time; the encoder "
                   "settings are not recorded")
  return out


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def save_tensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes float32 tensors as safetensors, then reads the file back and compares bit for bit
  (safetensors' numpy writer stores a non-contiguous array's raw buffer, scrambled)."""
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
  save_file(tensors, path, metadata={"format": "pt"})
  back = load_file(path)
  wrong = sorted(k for k in tensors if k not in back or not np.array_equal(back[k], tensors[k]))
  if wrong or set(back) != set(tensors):
    raise ExportError(f"{path}: read back different from what was written ({wrong[:3]})")


def _prepare_output(output: str, overwrite: bool) -> None:
  if os.path.exists(output) and not os.path.isdir(output):
    raise ExportError(f"--output={output} is a file, not a folder")
  held = sorted(os.listdir(output)) if os.path.isdir(output) else []
  if held and not overwrite:
    raise ExportError(f"--output={output} is not empty (it holds {held[:5]}); give a new folder "
                      "or add --overwrite to replace a previous export there")
  if held and not os.path.isfile(os.path.join(output, MANIFEST)):
    raise ExportError(f"--output={output} holds files of no lift_jax export ({held[:5]}); "
                      "--overwrite only replaces a previous export: give a new folder")
  for name in held:  # a previous export: its files go, so none is left over from it
    path = os.path.join(output, name)
    if os.path.isfile(path):
      os.remove(path)
  os.makedirs(output, exist_ok=True)


def _placeholder_text(embed_dim: int) -> dict[str, np.ndarray]:
  """Zero tensors of :data:`PLACEHOLDER_TEXT` in OpenCLIP's names."""
  t = PLACEHOLDER_TEXT
  abstract = nnx.eval_shape(lambda: TextTransformer(
      vocab_size=t["vocab_size"], context_length=t["context_length"], width=t["width"],
      depth=t["layers"], num_heads=t["heads"], embed_dim=embed_dim, rngs=nnx.Rngs(0)))
  shapes = nnx.to_pure_dict(nnx.split(abstract)[1])
  return weights.to_openclip({"text": jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                                                   shapes)})


def _save_tokenizer(name: str | None, output: str) -> str | None:
  """Copies a Hugging Face tokenizer's files into the export (OpenCLIP's local-dir loading reads
  them there); the tokenizer's name, or None (with a warning) when it cannot be loaded."""
  if not name:
    return None
  from transformers import AutoTokenizer  # tokenizers only (no torch): CLIP exports need it

  path = os.path.expanduser(name)
  try:
    AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path)).save_pretrained(
        output)
  except Exception as e:  # noqa: BLE001 - the weights are still worth exporting
    logging.warning("data.tokenizer=%s could not be loaded (%s); the export has no tokenizer "
                    "files: pass one to open_clip.get_tokenizer yourself", name, e)
    return None
  return name


def _usage(fmt: str, mode: str, pool: str) -> list[str]:
  if fmt == "hf" and mode == "clip":
    return ["m = transformers.CLIPVisionModelWithProjection.from_pretrained(DIR)",
            "features = m(pixel_values=x).image_embeds  # lift_jax's image_features; "
            "L2-normalise to compare"]
  if fmt == "hf":
    tokens = ("tower.post_layernorm(out.last_hidden_state)[:, 1:].mean(1)"
              if pool == "avg" else "out.pooler_output")
    return ["m = transformers.CLIPVisionModel.from_pretrained(DIR)",
            "tower = getattr(m, 'vision_model', m)  # transformers 4 nests the tower, 5 does not",
            "out = m(pixel_values=x)",
            f"pooled = {tokens}  # model.pool={pool!r}: post_layernorm on every token first",
            f"features = head(pooled)  # head: Linear-GELU(exact)-Linear.. from "
            f"{weights.LIFT_EXTRAS} (mlp_projector.projector.{{0,2,..}}, torch (out, in) layout)"]
  if mode == "clip":
    return ["model, _, preprocess = open_clip.create_model_and_transforms('local-dir:DIR')",
            "features = model.encode_image(x)  # lift_jax's image_features",
            "tokenizer = open_clip.get_tokenizer('local-dir:DIR'); model.encode_text(...)"]
  return ["model, _, preprocess = open_clip.create_model_and_transforms('local-dir:DIR')",
          "pooled = model.encode_image(x)  # the ViT's pooled feature (visual.proj is the "
          "identity)",
          f"features = head(pooled)  # the MLP head in {weights.LIFT_EXTRAS}",
          "the text tower is a placeholder: LIFT's text side is the precomputed LLM embedding "
          "named under text_encoder"]


def export(path: str, fmt: str, output: str, step: int | None = None,
           overwrite: bool = False) -> dict[str, Any]:
  """Writes the checkpoint at ``path`` (a workdir, its checkpoints folder or a step folder;
  ``step`` picks one, default the latest) as ``fmt`` into ``output``; returns the manifest."""
  if fmt not in FORMATS:
    raise ExportError(f"--format={fmt!r}: expected one of {FORMATS}")
  step_path = _step_path(path, step)
  config = ckpt.read_config(step_path)
  model_cfg = config_lib.model_config(config.model.to_dict())
  run = config_lib.complete(config, config_lib.base(model_cfg["mode"]))
  problems = export_problems(model_cfg, fmt)
  if problems:
    raise ExportError(f"{step_path} cannot be exported as {fmt}: " + "; ".join(problems))
  params, step = ckpt.restore_params(step_path)
  params = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), params)
  _prepare_output(output, overwrite)

  mode, pool = model_cfg["mode"], model_cfg["pool"]
  state = weights.to_openclip(params)
  extras = {k: v for k, v in state.items()
            if k.startswith("mlp_projector.") or k in ("logit_scale", "logit_bias")}
  evals = run["evals"]
  image_size = int(model_cfg["image_size"])
  resize = transforms.eval_resize_size(image_size, evals["resize_size"])
  mean, std = [float(m) for m in evals["mean"]], [float(s) for s in evals["std"]]
  placeholders: list[str] = []
  written: list[str] = []
  notes = []

  if fmt == "hf":
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    if mode == "lift":
      save_tensors(os.path.join(output, weights.LIFT_EXTRAS), extras)
      written.append(weights.LIFT_EXTRAS)
    hf_state = weights.openclip_to_hf_clip(visual)
    save_tensors(os.path.join(output, HF_WEIGHTS), hf_state)
    common.write_json_atomic(os.path.join(output, HF_CONFIG), hf_vision_config(model_cfg))
    common.write_json_atomic(os.path.join(output, HF_PREPROCESSOR),
                             hf_preprocessor_config(image_size, resize, mean, std))
    written += [HF_WEIGHTS, HF_CONFIG, HF_PREPROCESSOR]
    if mode == "clip":
      notes.append("the image tower and its projection only: the text tower and the logit "
                   "scale are in the open_clip export")
    notes.append("CLIPImageProcessor's center crop floors an odd margin where lift_jax's "
                 "evaluation rounds it: on some image sizes the crop is 1 pixel off")
  else:
    tokenizer = None
    if mode == "clip":
      if model_cfg["text"].get("eot_token_id") is not None:
        tokenizer = _save_tokenizer(run["data"]["tokenizer"], output)
      else:
        notes.append("the text tower pools at the largest token id (CLIP BPE): OpenCLIP's "
                     "default tokenizer is assumed")
      oc_state = state
    else:
      save_tensors(os.path.join(output, weights.LIFT_EXTRAS), extras)
      written.append(weights.LIFT_EXTRAS)
      width = int(state["visual.class_embedding"].shape[0])
      filler = {"visual.proj": np.eye(width, dtype=np.float32), **_placeholder_text(width)}
      filler.update({k: v for k, v in extras.items() if not k.startswith("mlp_projector.")})
      placeholders = sorted(k for k in filler if k not in extras)
      oc_state = {**{k: v for k, v in state.items() if not k.startswith("mlp_projector.")},
                  **filler}
    if "logit_scale" not in oc_state:  # the cosine loss has no temperature; OpenCLIP needs one
      oc_state["logit_scale"] = np.zeros((), np.float32)
      placeholders.append("logit_scale")
    oc_config = {"model_cfg": open_clip_model_config(model_cfg, tokenizer),
                 "preprocess_cfg": {"size": image_size, "mode": "RGB", "mean": mean, "std": std,
                                    "interpolation": "bicubic", "resize_mode": "shortest"}}
    save_tensors(os.path.join(output, weights.OPEN_CLIP_WEIGHTS), oc_state)
    common.write_json_atomic(os.path.join(output, weights.OPEN_CLIP_CONFIG), oc_config,
                             sort_keys=False)
    written += [weights.OPEN_CLIP_WEIGHTS, weights.OPEN_CLIP_CONFIG]
    if resize != image_size:
      notes.append(f"OpenCLIP's preprocess resizes the shorter side to {image_size} before the "
                   f"center crop; lift_jax's evaluation resizes it to {resize}")

  manifest = {
      "format": fmt, "format_version": FORMAT_VERSION,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "run": {"checkpoint": os.path.abspath(step_path), "workdir": ckpt.workdir_of(
          os.path.dirname(os.path.abspath(step_path))), "step": int(step),
              "config": ckpt.config_to_dict(config)},
      "model": {"mode": mode, "variant": model_cfg["variant"],
                "vit": dataclasses.asdict(weights.parse_variant(
                    model_cfg["variant"], **dict(model_cfg.get("vit") or {}))),
                "image_size": image_size, "pool": pool, "loss": model_cfg["loss"],
                "embed_dim": int(model_cfg["embed_dim"]),
                "head": ([int(state["visual.class_embedding"].shape[0]),
                          *map(int, model_cfg["head_hidden"] or ()), int(model_cfg["embed_dim"])]
                         if mode == "lift" else "bias-free linear projection (visual.proj)")},
      "text_encoder": text_encoder(run),
      "preprocess": {"resize_shorter_side": resize, "interpolation": "bicubic",
                     "center_crop": image_size, "mean": mean, "std": std,
                     "note": "the evaluation transform (config.evals); training normalised with "
                             f"data.mean={list(run['data']['mean'])}, data.std="
                             f"{list(run['data']['std'])}"},
      "placeholder_tensors": placeholders,
      "usage": _usage(fmt, mode, pool),
      "notes": notes,
      "files": {name: records.sha256_file(os.path.join(output, name)) for name in sorted(written)},
  }
  common.write_json_atomic(os.path.join(output, MANIFEST), manifest, sort_keys=False)
  return manifest

