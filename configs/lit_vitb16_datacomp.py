r"""LIFT from a pretrained image tower: OpenCLIP's DataComp ViT-B/16, locked, with LIFT's head
trained against NV-Embed-v2 embeddings of the DataComp web captions (128M samples seen).

    python -m lift_jax.main --config=configs/lit_vitb16_datacomp.py --workdir=$WORKDIR \
      --config.data.images=$DATA/images --config.data.embeddings=$DATA/emb-nvembed \
      --config.evals.text_bank=$DATA/bank-nvembed --config.evals.data_root=$EVAL

    # fine-tune variant: nothing frozen, the tower at 0.1 x the learning rate
    python -m lift_jax.main --config=configs/lit_vitb16_datacomp.py:finetune ...

The tower is ``laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K`` (Hugging Face CLIP layout, exact GELU,
so it imports exactly; see lift_jax/models/weights.py). Nothing is downloaded at run time:
put it in the Hugging Face cache first (``hf download
laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K``) or pass a local copy with
``--config.model.init_from=DIR``. OpenAI's ``openai/clip-vit-base-patch16`` is refused (its
quick_gelu is not this ViT's function).

``model.pool='tok'`` keeps the pretrained feature (post-LayerNorm class token, HF's
``pooler_output``) exactly; LIFT's own 'avg' pooling would feed the head a feature the tower
never produced. Locked, the tower has no optimizer state: AdamW's moments shrink from 806.7 MiB
to 152.1 MiB (ViT-B/16 + the 768-4096-4096 head, float32; ``tests/test_pretrained.py``), and
XLA drops the tower's weight gradients.

What to expect: not measured here. For reference, LiT (Zhai et al., CVPR 2022, arXiv
2111.07991) found that locking a pretrained image tower and training only the text side beat
unlocking it, and LLM2CLIP (arXiv 2411.04997) and SAIL (Zhang et al., CVPR 2025) align
pretrained vision encoders with LLM text embeddings at a fraction of from-scratch compute.
The tower's own ImageNet zero-shot top-1 with its CLIP text tower is 73.5 (DataComp, arXiv
2304.14108): an upper-end reference, not this run's target.
"""

from lift_jax import cli, config_lib

TOWER = "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"


def get_config(arg: str | None = None):
  if arg not in (None, "", "finetune"):
    raise cli.ConfigError(f"unknown config argument {arg!r} (--config=FILE:ARG); expected "
                          "'finetune' or nothing")
  c = config_lib.paper("lift", "short", "1.28B")
  c.total_steps = config_lib.STEPS["128M"]
  m = c.model
  m.pool = "tok"
  m.init_from = TOWER
  m.init_from_params = "^visual/"
  if arg == "finetune":
    c.optim.lr_multipliers = (("^visual/", 0.1),)
  else:
    c.optim.frozen = ("^visual/",)
  return c
