"""NV-Embed-v2 (4096-d), the text tower of the LIFT paper.

Short captions (DataComp):   --config.max_length=77   (the default here)
Long captions (Recap):       --config.max_length=323 --config.caption_field=recaption

  python -m embed.main --config=embed/configs/nvembed_v2.py --config.images=DIR --config.output=DIR
  torchrun --nproc_per_node=8 -m embed.main --config=embed/configs/nvembed_v2.py ...

As in the paper: float16 compute, no instruction prefix, L2-normalised, stored as float16
(8 KiB per caption). The model's own code (trust_remote_code) tokenises, appends EOS and pools.
"""

from embed.config import default_config


def get_config():
  c = default_config()
  c.model = "nvidia/NV-Embed-v2"
  c.encoder = "nv_embed"
  c.instruction = ""
  c.max_length = 77
  c.normalize = True
  c.dtype = "auto"  # float16 on GPU
  c.storage_dtype = "float16"
  c.batch_tokens = 32768
  return c
