"""NV-Embed-v2 (4096-d), the text tower of the LIFT paper; NV-Embed-v1 with --config.model.

Short captions (DataComp):   --config.max_length=77   (the default here)
Long captions (Recap):       --config.max_length=323 --config.caption_field=recaption

  python -m embed.main --config=embed/configs/nvembed_v2.py --config.images=DIR --config.output=DIR
  torchrun --nproc_per_node=8 -m embed.main --config=embed/configs/nvembed_v2.py ...
  # a downloaded checkpoint folder, or NV-Embed-v1:
  ... --config.model=/models/NV-Embed-v2      ... --config.model=nvidia/NV-Embed-v1

As in the paper: float16 compute, no instruction prefix, L2-normalised, stored as float16
(8 KiB per caption). The model is built natively (embed/nvembed.py) from the checkpoint's
config.json and safetensors: transformers' Mistral run bidirectionally plus NV-Embed's
latent-attention pooling; the checkpoint's own Python files are never run. Texts are tokenised as
NV-Embed's encode() does: instruction + caption + EOS, truncated at max_length.
"""

from embed.config import default_config


def get_config():
  c = default_config()
  c.model = "nvidia/NV-Embed-v2"
  c.encoder = "nv_embed"
  c.instruction = ""
  c.max_length = 77
  c.normalize = True
  c.dtype = "auto"  # float16 on GPU, float32 on CPU
  c.storage_dtype = "float16"
  c.batch_tokens = 32768
  return c
