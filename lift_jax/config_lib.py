"""The shared defaults of every config in ``configs/``: SPEC.md's recipe, field by field.

Each experiment file in ``configs/`` calls :func:`base` (or :func:`base_clip`) and changes what
differs. Optional strings and ints are ml_collections placeholders so ``--config.KEY=VALUE`` works.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from lift_jax.data import transforms

# Samples seen -> steps at global batch 16384 (the paper's schedules).
STEPS = {"128M": 7_816, "512M": 31_264, "1.28B": 78_024}


def base(mode: str = "lift") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = STEPS["1.28B"]
  c.batch_size = 16384  # global
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.eval_every_steps = 0  # 0: evaluate at the end only
  c.keep_checkpoints = 3
  c.keep_checkpoint_every_steps = config_dict.placeholder(int)
  c.async_checkpoints = True
  c.tensorboard = True

  # data x fsdp must equal the device count; -1 = the rest. num_devices: use only the first N.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1,
                                      "num_devices": config_dict.placeholder(int)})
  # (regex over parameter paths, "replicated" | "fsdp" | per-dim axis names); first match wins.
  c.sharding_rules = [(".*", "replicated")]

  m = c.model = ml_collections.ConfigDict()
  m.mode = mode
  m.variant = "B/16"
  m.image_size = 224
  m.pool = "avg" if mode == "lift" else "tok"
  m.vit = ml_collections.ConfigDict({"width": config_dict.placeholder(int),
                                     "depth": config_dict.placeholder(int),
                                     "mlp_dim": config_dict.placeholder(int),
                                     "num_heads": config_dict.placeholder(int)})
  m.loss = "softmax"  # softmax (InfoNCE) | sigmoid | cos (positive-only ablation)
  m.logit_scale_init = config_dict.placeholder(float)  # None: ln(1/0.07) (sigmoid: ln 10)
  m.logit_bias_init = config_dict.placeholder(float)  # None: no bias (sigmoid: -10)
  m.dtype = "bfloat16"  # compute dtype; parameters are float32
  m.remat = False
  m.attention_impl = config_dict.placeholder(str)  # None: cuDNN where available, else XLA
  if mode == "lift":
    m.embed_dim = 4096  # NV-Embed-v2
    m.head_hidden = (4096,)  # Linear(768->4096) -> GELU -> Linear(4096->4096)
  else:
    m.embed_dim = 512
    m.head_hidden = ()
    m.text = ml_collections.ConfigDict({
        "vocab_size": 49408, "context_length": 77, "width": 512, "depth": 12, "num_heads": 8,
        "eot_token_id": config_dict.placeholder(int)})  # None: argmax (CLIP BPE)

  o = c.optim = ml_collections.ConfigDict()
  o.lr = 1e-3
  o.b1, o.b2, o.eps = 0.9, 0.98, 1e-6
  o.weight_decay = 0.2
  o.wd_min_ndim = 2  # decay parameters with ndim >= 2 only
  o.warmup_steps = 500
  o.grad_clip_norm = config_dict.placeholder(float)
  o.grad_clip_norm = 1.0 if mode == "lift" else None  # the CLIP baseline is not clipped
  o.grad_accum_steps = 1

  d = c.data = ml_collections.ConfigDict()
  d.images = config_dict.placeholder(str)  # folder of images-*.array_record
  d.embeddings = config_dict.placeholder(str)  # LIFT: folder of embeddings-*.array_record
  d.caption_field = "caption"
  d.tokenizer = config_dict.placeholder(str)  # CLIP: HF tokenizer name or local folder
  d.crop_scale = (0.9, 1.0)
  d.crop_ratio = (3 / 4, 4 / 3)
  d.mean = transforms.OPENAI_MEAN
  d.std = transforms.OPENAI_STD
  d.workers = 8  # grain worker processes
  d.read_threads = 2  # threads per worker
  d.prefetch = 2  # global batches prefetched onto the devices
  d.max_skipped = config_dict.placeholder(int)  # stop when more examples were unusable
  d.max_image_bytes = config_dict.placeholder(int)  # the original loader's 50,000-byte quirk
  d.prepare = config_dict.placeholder(str)  # "synthetic": build the data set when missing
  d.synthetic = ml_collections.ConfigDict({
      "dir": config_dict.placeholder(str), "num_train": 20000, "num_eval": 500,
      "image_size": 64, "seed": 0, "num_shards": 8})
  d.embed_config = config_dict.placeholder(str)  # embed/configs/*.py used by prepare

  e = c.evals = ml_collections.ConfigDict()
  e.batch_size = 1024
  e.text_bank = config_dict.placeholder(str)  # LIFT: folder written by embed.main texts mode
  e.resize_size = config_dict.placeholder(int)  # None: image_size * 256 / 224
  e.mean = transforms.IMAGENET_MEAN
  e.std = transforms.IMAGENET_STD
  e.workers = 8
  e.benchmarks = ml_collections.ConfigDict()
  return c


def add_paper_benchmarks(c: ml_collections.ConfigDict, data_root: str = "") -> None:
  """SugarCrepe, ImageNet-1K (LIFT protocol), COCO 5k and Flickr30K 1k (LIFT protocol).

  Paths default to ``data_root`` sub-folders; override each with --config.evals.benchmarks....
  """
  join = lambda *p: "/".join((data_root.rstrip("/"),) + p) if data_root else config_dict.placeholder(str)
  c.evals.benchmarks = ml_collections.ConfigDict({
      "sugarcrepe": {"type": "sugarcrepe", "data_dir": join("sugarcrepe"),
                     "image_dir": join("coco", "val2017")},
      "imagenet": {"type": "zeroshot", "image_dir": join("imagenet", "val"),
                   "classnames": join("imagenet", "classnames_keras.txt"),
                   "templates": join("imagenet", "templates_lift.txt"), "protocol": "lift"},
      "coco": {"type": "retrieval", "captions": join("coco", "annotations",
                                                     "captions_val2017.json"),
               "image_dir": join("coco", "val2017"), "protocol": "lift"},
      "flickr30k": {"type": "retrieval", "captions": join("flickr30k",
                                                          "flickr_annotations_30k.csv"),
                    "image_dir": join("flickr30k", "flickr30k-images"), "split": "test",
                    "protocol": "lift"},
  })
