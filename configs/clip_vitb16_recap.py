r"""The CLIP baseline, ViT-B/16 + text transformer with context 323, Recap-DataComp re-captions,
512M samples seen.

    python -m lift_jax.main --config=configs/clip_vitb16_recap.py --workdir=$WORKDIR \
      --config.data.images=$DATA/images --config.data.tokenizer=openai/clip-vit-base-patch16

Paper (ViT-B/16, this setting): SugarCrepe add_obj 77.0, add_att 73.7, replace_obj 88.9,
replace_att 80.8, replace_rel 63.4, swap_obj 62.0, swap_att 76.3; ImageNet-1K top-1 34.6;
COCO R@1 I2T 25.7 / T2I 26.7; Flickr30K R@1 I2T 56.4 / T2I 57.9.
"""

from lift_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.paper("clip", "long", "512M", arg)
