r"""LIFT, ViT-B/16, DataComp web captions (short), 1.28B samples seen (78,024 steps of 16,384).

Data: image shards from Recap-DataComp-1B (``lift_jax.data.convert``) and their NV-Embed-v2
embeddings of the ``caption`` field, max_length 77 (``embed.main --config=embed/configs/
nvembed_v2.py --config.caption_field=caption --config.max_length=77``).

    python -m lift_jax.main --config=configs/vitb16_datacomp.py --workdir=$WORKDIR \
      --config.data.images=$DATA/images --config.data.embeddings=$DATA/emb-nvembed-short \
      --config.evals.text_bank=$DATA/bank-nvembed

Ablations: ``--config=configs/vitb16_datacomp.py:cos`` (positive-only cosine loss),
``:sigmoid`` (SigLIP loss; not in the paper).

Paper (ViT-B/16, this setting): SugarCrepe add_obj 89.0, add_att 86.1, replace_obj 93.2,
replace_att 86.0, replace_rel 70.6, swap_obj 64.1, swap_att 63.4; ImageNet-1K zero-shot top-1
58.3 (LIFT protocol); COCO R@1 I2T 29.1 / T2I 28.1; Flickr30K R@1 I2T 58.8 / T2I 63.7.
"""

from lift_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.paper("lift", "short", "1.28B", arg)
