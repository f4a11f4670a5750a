r"""LIFT, ViT-B/16, Recap-DataComp re-captions (long), 512M samples seen (31,264 steps of 16,384).

Embeddings: NV-Embed-v2 of the ``recaption`` field, max_length 323.

    python -m lift_jax.main --config=configs/vitb16_recap.py --workdir=$WORKDIR \
      --config.data.images=$DATA/images --config.data.embeddings=$DATA/emb-nvembed-long \
      --config.evals.text_bank=$DATA/bank-nvembed

Paper (ViT-B/16, this setting): SugarCrepe add_obj 88.8, add_att 92.2, replace_obj 92.3,
replace_att 88.2, replace_rel 76.8, swap_obj 66.5, swap_att 72.8; ImageNet-1K top-1 43.6;
COCO R@1 I2T 34.6 / T2I 36.0; Flickr30K R@1 I2T 69.1 / T2I 72.9.
"""

from lift_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.paper("lift", "long", "512M", arg)
