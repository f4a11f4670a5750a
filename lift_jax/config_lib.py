"""The shared defaults of every config in ``configs/``: SPEC.md's recipe, field by field.

Each experiment file in ``configs/`` calls :func:`base` (or :func:`base_clip`) and changes what
differs. Optional strings and ints are ml_collections placeholders so ``--config.KEY=VALUE`` works.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from lift_jax import cli
from lift_jax.data import synthetic, transforms

# Samples seen -> steps at global batch 16384 (the paper's schedules).
STEPS = {"128M": 7_816, "512M": 31_264, "1.28B": 78_024}


def base(mode: str = "lift") -> ml_collections.ConfigDict:
  """Every field, with the paper's values for ViT-B/16 (see DOCS for what each field means)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = STEPS["1.28B"]
  c.batch_size = 16384
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.eval_every_steps = 0
  c.keep_checkpoints = 3
  c.keep_checkpoint_every_steps = config_dict.placeholder(int)
  c.async_checkpoints = True
  c.fresh_start_if_damaged = False
  c.lock_stale_seconds = 600.0
  c.tensorboard = True
  c.wandb = ml_collections.ConfigDict({
      "project": config_dict.placeholder(str), "entity": config_dict.placeholder(str),
      "name": config_dict.placeholder(str), "group": config_dict.placeholder(str), "tags": (),
      "mode": config_dict.placeholder(str)})
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1,
                                      "num_devices": config_dict.placeholder(int)})
  c.sharding_rules = ((".*", "replicated"),)

  m = c.model = ml_collections.ConfigDict()
  m.mode = mode
  m.variant = "B/16"
  m.image_size = 224
  m.pool = "avg" if mode == "lift" else "tok"
  m.vit = ml_collections.ConfigDict({"width": config_dict.placeholder(int),
                                     "depth": config_dict.placeholder(int),
                                     "mlp_dim": config_dict.placeholder(int),
                                     "num_heads": config_dict.placeholder(int),
                                     "patch_size": config_dict.placeholder(int)})
  m.loss = "softmax"
  m.logit_scale_init = config_dict.placeholder(float)
  m.logit_bias_init = config_dict.placeholder(float)
  m.dtype = "bfloat16"
  m.remat = False
  m.attention_impl = config_dict.placeholder(str)
  m.init_from = config_dict.placeholder(str)
  m.init_from_params = "^visual/"
  m.tower_shape = "config"
  if mode == "lift":
    m.embed_dim = 4096
    m.head_hidden = (4096,)
  else:
    m.embed_dim = 512
    m.head_hidden = ()
    m.text = ml_collections.ConfigDict({
        "vocab_size": 49408, "context_length": 77, "width": 512, "depth": 12, "num_heads": 8,
        "eot_token_id": config_dict.placeholder(int)})

  o = c.optim = ml_collections.ConfigDict()
  o.lr = 1e-3
  o.b1, o.b2, o.eps = 0.9, 0.98, 1e-6
  o.weight_decay = 0.2
  o.wd_min_ndim = 2
  o.warmup_steps = 500
  o.grad_clip_norm = config_dict.placeholder(float)
  o.grad_clip_norm = 1.0 if mode == "lift" else None
  o.grad_accum_steps = 1
  o.frozen = ()
  o.lr_multipliers = ()

  d = c.data = ml_collections.ConfigDict()
  d.images = config_dict.placeholder(str)
  d.embeddings = config_dict.placeholder(str)
  d.caption_field = "caption"
  d.allow_new_data = False
  d.tokenizer = config_dict.placeholder(str)
  d.crop_scale = (0.9, 1.0)
  d.crop_ratio = (3 / 4, 4 / 3)
  d.mean = transforms.OPENAI_MEAN
  d.std = transforms.OPENAI_STD
  d.workers = 8
  d.read_threads = 2
  d.prefetch = 2
  d.max_skipped = config_dict.placeholder(int)
  d.max_skipped_fraction = 0.5
  d.max_image_bytes = config_dict.placeholder(int)
  d.prepare = config_dict.placeholder(str)
  syn = synthetic.Settings()  # the generator owns these defaults
  d.synthetic = ml_collections.ConfigDict({
      "dir": config_dict.placeholder(str), "num_train": syn.num_train,
      "num_eval": syn.num_eval, "image_size": syn.image_size, "seed": syn.seed,
      "num_shards": config_dict.placeholder(int)})
  d.embed_config = config_dict.placeholder(str)

  e = c.evals = ml_collections.ConfigDict()
  e.batch_size = 1024
  e.text_bank = config_dict.placeholder(str)
  e.allow_encoder_mismatch = False
  e.resize_size = config_dict.placeholder(int)
  e.mean = transforms.IMAGENET_MEAN
  e.std = transforms.IMAGENET_STD
  e.workers = 8
  e.data_root = config_dict.placeholder(str)
  e.synthetic_suite = False
  e.skip_missing = False
  e.benchmarks = ml_collections.ConfigDict()
  return c


def complete(given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
  """``given`` (a possibly partial config section, e.g. a model dict written by hand or stored
  by an older run) with every missing key taken from ``defaults``, nested sections included: code
  that reads a config falls back to these defaults, never to numbers of its own."""
  if hasattr(given, "to_dict"):
    given = given.to_dict()
  if hasattr(defaults, "to_dict"):
    defaults = defaults.to_dict()
  out = dict(defaults)
  for key, value in given.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = complete(value, out[key])
    else:
      out[key] = value
  return out


def model_config(model: Mapping[str, Any]) -> dict[str, Any]:
  """A model section completed with the defaults of its mode (``model.mode``)."""
  mode = dict(model).get("mode", "lift")
  return complete(model, base(mode if mode in ("lift", "clip") else "lift").model)


DOCS = {
    "seed": "Seed of the initialisation, the data order and the crops.",
    "total_steps": "Training steps; the paper's 128M / 512M / 1.28B samples seen at batch 16384 "
                   "are 7,816 / 31,264 / 78,024.",
    "batch_size": "Global batch (all devices, all processes); the contrastive loss uses all of "
                  "it as negatives.",
    "log_every_steps": "Metrics to metrics.jsonl, TensorBoard and the log every N steps (and at "
                       "the end); 0 = at the end only.",
    "checkpoint_every_steps": "Checkpoint every N steps (and at the end, and on SIGTERM); 0 = at "
                              "the end only.",
    "eval_every_steps": "Run `evals` every N steps; 0 = at the end only.",
    "keep_checkpoints": "How many of the latest checkpoints to keep (None = all).",
    "keep_checkpoint_every_steps": "Also keep every checkpoint whose step divides by N.",
    "async_checkpoints": "Write checkpoints in the background.",
    "fresh_start_if_damaged": "When every checkpoint of the workdir is damaged (moved aside as "
                              "<step>.damaged), start again from step 0 instead of stopping.",
    "lock_stale_seconds": "The workdir's lock.json, not refreshed for this long, is taken over "
                          "(its holder is gone); a live holder refreshes it every quarter.",
    "tensorboard": "Write TensorBoard event files (needs tensorflow; metrics.jsonl is always "
                   "written).",
    "wandb.project": "Also log to this Weights & Biases project: the same scalars, each "
                     "evaluation as a table, the config (needs the wandb extra); None = off.",
    "wandb.entity": "W&B user or team (None: the logged-in user's default).",
    "wandb.name": "W&B run name (None: the workdir's folder name).",
    "wandb.group": "W&B group, e.g. one per experiment.",
    "wandb.tags": "W&B tags.",
    "wandb.mode": "'online', 'offline' (no network; upload later with `wandb sync`) or "
                  "'disabled'; None = wandb's default (WANDB_MODE).",
    "mesh.data": "Data-parallel axis size; -1 = the devices left after fsdp.",
    "mesh.fsdp": "FSDP axis size (parameters and optimizer state sharded over it by "
                 "sharding_rules); -1 = the devices left after data.",
    "mesh.num_devices": "Use only the first N devices (None = all).",
    "sharding_rules": "(regex over parameter paths, 'replicated' | 'fsdp' | per-dim axis names) "
                      "pairs; the first match wins; optimizer state follows its parameter.",
    "model.mode": "'lift' (fixed text embeddings, MLP head) or 'clip' (trainable text tower).",
    "model.variant": "ViT variant NAME/PATCH: Ti, S, M, B, L, H, So400m, g; e.g. 'B/16'.",
    "model.image_size": "Input resolution (any multiple of the patch size).",
    "model.pool": "'avg' (mean of patch tokens after ln_post, class token excluded: LIFT) or "
                  "'tok' (class token: CLIP).",
    "model.vit.width": "Override the variant's width.",
    "model.vit.depth": "Override the variant's depth.",
    "model.vit.mlp_dim": "Override the variant's MLP width.",
    "model.vit.num_heads": "Override the variant's head count.",
    "model.vit.patch_size": "Override the variant's patch size (the /N of model.variant).",
    "model.loss": "'softmax' (symmetric InfoNCE, the paper's), 'sigmoid' (SigLIP) or 'cos' "
                  "(positive-only cosine ablation).",
    "model.logit_scale_init": "Initial log logit scale; None = ln(1/0.07) (sigmoid: ln 10). "
                              "Clipped to [0, ln 100] after every update.",
    "model.logit_bias_init": "Initial logit bias; None = none (sigmoid: -10).",
    "model.dtype": "Compute dtype (parameters stay float32): bfloat16 on accelerators.",
    "model.remat": "Rematerialise each transformer block (less memory, one more forward).",
    "model.attention_impl": "jax.nn.dot_product_attention implementation: None (cuDNN where "
                            "possible, else XLA), 'xla' or 'cudnn'.",
    "model.init_from": "Start a new run from pretrained weights: a Hugging Face CLIP folder "
                       "(config.json + *.safetensors) or cached hub id, or a lift_jax checkpoint "
                       "(see lift_jax/pretrained.py); None = random init.",
    "model.init_from_params": "Regex over parameter paths taken from model.init_from "
                              "(default the image tower, '^visual/'); re.search, so '^' anchors "
                              "it at the start of the path.",
    "model.tower_shape": "'config': the ViT shape is model.variant + model.vit.* (model.init_from "
                         "must match it; every mismatch is listed with the key to set); "
                         "'init_from': width, depth, heads, MLP width, patch and image size are "
                         "read from model.init_from's own config.",
    "model.embed_dim": "Width of the compared embeddings: the text encoder's (NV-Embed-v2: "
                       "4096; MiniLM: 384) for LIFT, the projection's for CLIP.",
    "model.head_hidden": "LIFT head hidden widths: Linear(width -> h) -> GELU -> ... -> "
                         "Linear(-> embed_dim); () = one Linear.",
    "model.text.vocab_size": "CLIP text tower vocabulary (CLIP BPE: 49408).",
    "model.text.context_length": "CLIP text tower context: 77 (short captions) or 323 (long).",
    "model.text.width": "CLIP text tower width.",
    "model.text.depth": "CLIP text tower depth.",
    "model.text.num_heads": "CLIP text tower heads.",
    "model.text.eot_token_id": "Token the text tower pools at; None = the largest id (CLIP "
                               "BPE's end of text).",
    "optim.lr": "Peak learning rate (AdamW).",
    "optim.b1": "AdamW beta1.",
    "optim.b2": "AdamW beta2.",
    "optim.eps": "AdamW epsilon.",
    "optim.weight_decay": "Decoupled weight decay on parameters with ndim >= wd_min_ndim.",
    "optim.wd_min_ndim": "Parameters with fewer dimensions (norms, biases, class token, logit "
                         "scale) are not decayed.",
    "optim.warmup_steps": "Linear warmup lr * (step + 1) / warmup, then cosine to 0.",
    "optim.grad_clip_norm": "Global-norm gradient clipping; 1.0 for LIFT, None for CLIP.",
    "optim.grad_accum_steps": "Split each global batch into N micro-batches; the gradient of "
                              "the global-batch loss stays exact (embeddings cached).",
    "optim.frozen": "Regexes over parameter paths (e.g. '^visual/'): matching parameters "
                    "stay bit-identical and hold no optimizer state. A rule matches anywhere in "
                    "the path (re.search): 'ln_' freezes every LayerNorm, '^visual/' the tower.",
    "optim.lr_multipliers": "(regex, factor) pairs, first match wins (re.search, anywhere in "
                            "the path): the parameter's AdamW update (weight decay included) is "
                            "scaled by factor.",
    "data.images": "Folder of images-*.array_record shards.",
    "data.embeddings": "LIFT: folder of embeddings-*.array_record aligned with data.images.",
    "data.caption_field": "Caption field the CLIP baseline tokenises ('caption' or "
                          "'recaption').",
    "data.allow_new_data": "Resume on data whose manifests differ from the data the checkpoints "
                           "were trained on (refused otherwise).",
    "data.tokenizer": "CLIP: Hugging Face tokenizer, hub id or local folder.",
    "data.crop_scale": "RandomResizedCrop area range.",
    "data.crop_ratio": "RandomResizedCrop aspect-ratio range.",
    "data.mean": "Training normalisation mean (OpenAI CLIP's).",
    "data.std": "Training normalisation std (OpenAI CLIP's).",
    "data.workers": "grain worker processes per host (0 = threads in the main process).",
    "data.read_threads": "Threads per worker.",
    "data.prefetch": "Global batches prefetched onto the devices.",
    "data.max_skipped": "Stop when more training examples than this were unusable "
                        "(undecodable image, NaN embedding, missing caption); None = never.",
    "data.max_skipped_fraction": "Stop when more than this share of the training examples "
                                 "since the previous log line were unusable (a run must not "
                                 "succeed on data it cannot read); None = never.",
    "data.max_image_bytes": "Skip encoded images larger than this (the original loader's "
                            "50,000-byte quirk, off by default).",
    "data.prepare": "'synthetic': generate the synthetic set, its embeddings and eval bank "
                    "when missing.",
    "data.synthetic.dir": "Where the synthetic set goes (default WORKDIR/synthetic).",
    "data.synthetic.num_train": "Synthetic training pairs.",
    "data.synthetic.num_eval": "Synthetic eval scenes per kind (two-object and one-object).",
    "data.synthetic.image_size": "Synthetic image side in pixels.",
    "data.synthetic.seed": "Seed of the synthetic set.",
    "data.synthetic.num_shards": "Synthetic training shards (None: one per 10,000 pairs).",
    "data.embed_config": "embed/configs/*.py that data.prepare uses (default minilm.py).",
    "evals.batch_size": "Global eval batch (images per step).",
    "evals.text_bank": "LIFT: folder of the text bank holding every eval text.",
    "evals.allow_encoder_mismatch": "LIFT: evaluate with a text bank whose encoder settings "
                                    "(model, revision, pooling, instruction, max_length, "
                                    "normalisation) differ from the training embeddings'.",
    "evals.resize_size": "Eval Resize(shorter side) before CenterCrop(image_size); None = "
                         "image_size * 256 / 224.",
    "evals.mean": "Eval normalisation mean (ImageNet's, as the paper's eval).",
    "evals.std": "Eval normalisation std (ImageNet's).",
    "evals.workers": "Image decoding threads.",
    "evals.data_root": "Folder that relative benchmark paths are joined to.",
    "evals.synthetic_suite": "Evaluate the synthetic set's compositional, classification and "
                             "retrieval sets (with data.prepare='synthetic').",
    "evals.skip_missing": "Score every benchmark without the images missing from its folder "
                          "(counted as skipped_images) instead of refusing; a benchmark's own "
                          "skip_missing wins.",
    "evals.benchmarks": "{name: {type: TYPE, ...that type's fields}}; the types and their "
                        "fields are listed in the benchmark reference below (generated from "
                        "eval/benchmarks/*.py).",
}


def add_paper_benchmarks(c: ml_collections.ConfigDict) -> None:
  """SugarCrepe, ImageNet-1K (LIFT protocol), COCO 5k and Flickr30K 1k (LIFT protocol).

  Paths are relative to ``config.evals.data_root`` (see ``eval.benchmarks.resolve_paths``)::

      sugarcrepe/{add_obj,...}.json            coco/val2017/*.jpg
      coco/annotations/captions_val2017.json   imagenet/val/<wnid>/*.JPEG
      imagenet/classnames_keras.txt            imagenet/templates_lift.txt
      flickr30k/flickr30k-images/*.jpg         flickr30k/flickr_annotations_30k.csv

  Any field can be overridden with an absolute path: --config.evals.benchmarks.NAME.FIELD=PATH.
  """
  c.evals.benchmarks = ml_collections.ConfigDict({
      "sugarcrepe": {"type": "sugarcrepe", "data_dir": "sugarcrepe",
                     "image_dir": "coco/val2017"},
      "imagenet": {"type": "zeroshot", "image_dir": "imagenet/val",
                   "classnames": "imagenet/classnames_keras.txt",
                   "templates": "imagenet/templates_lift.txt", "protocol": "lift"},
      "coco": {"type": "retrieval", "captions": "coco/annotations/captions_val2017.json",
               "image_dir": "coco/val2017", "protocol": "lift"},
      "flickr30k": {"type": "retrieval", "captions": "flickr30k/flickr_annotations_30k.csv",
                    "image_dir": "flickr30k/flickr30k-images", "split": "test",
                    "protocol": "lift"},
  })


def add_long_caption_benchmarks(c: ml_collections.ConfigDict) -> None:
  """Urban1k, DOCCI (test) and ShareGPT4V-1k long-caption retrieval (see
  ``eval/benchmarks/long_retrieval.py``), each evaluated when its folder is under
  ``config.evals.data_root`` and skipped (with a log line) when it is not::

      urban1k/image/<id>.jpg  urban1k/caption/<id>.txt
      docci/docci_descriptions.jsonlines  docci/images/<image_file>
      sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json  sharegpt4v/<record's image path>
  """
  for name in ("urban1k", "docci", "sharegpt4v"):
    c.evals.benchmarks[name] = {"type": "long_retrieval", "format": name, "data_dir": name,
                                "if_present": True}


def paper(mode: str, captions: str, samples: str, variant_arg: str | None = None
          ) -> ml_collections.ConfigDict:
  """One of the paper's ViT-B/16 runs: ``mode`` lift|clip, ``captions`` short|long (DataComp's web
  captions | Recap-DataComp's re-captions), ``samples`` 512M|1.28B. ``variant_arg`` is the
  ``:ARG`` of ``--config=FILE:ARG``: ``cos`` (positive-only ablation), ``sigmoid`` (SigLIP loss),
  or empty."""
  c = base(mode)
  c.total_steps = STEPS[samples]
  long = captions == "long"
  c.data.caption_field = "recaption" if long else "caption"
  if mode == "clip":
    c.model.text.context_length = 323 if long else 77
    c.data.tokenizer = "openai/clip-vit-base-patch16"  # CLIP's BPE; a local folder works too
  c.data.embed_config = "embed/configs/nvembed_v2.py"
  add_paper_benchmarks(c)
  if long:
    add_long_caption_benchmarks(c)
  if variant_arg:
    if variant_arg not in ("cos", "sigmoid"):
      raise cli.ConfigError(f"unknown config argument {variant_arg!r} (--config=FILE:ARG); "
                            "expected 'cos' or 'sigmoid'")
    c.model.loss = variant_arg
  return c
