r"""The CLIP baseline, ViT-B/16 + 12-layer text transformer (context 77), DataComp web captions,
1.28B samples seen. No gradient clipping, as the paper's CLIP.

    python -m lift_jax.main --config=configs/clip_vitb16_datacomp.py --workdir=$WORKDIR \
      --config.data.images=$DATA/images --config.data.tokenizer=openai/clip-vit-base-patch16

Paper (ViT-B/16, this setting): SugarCrepe add_obj 82.3, add_att 73.7, replace_obj 91.7,
replace_att 79.4, replace_rel 61.2, swap_obj 59.6, swap_att 56.9; ImageNet-1K top-1 58.4;
COCO R@1 I2T 31.0 / T2I 27.2; Flickr30K R@1 I2T 62.9 / T2I 59.6.
"""

from lift_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.paper("clip", "short", "1.28B", arg)
