"""Writes the embedding row's NV-Embed-v2-architecture checkpoint folder (no weights: the job runs
with ``config.random_init``), in a child process so that the suite itself never imports torch.

    python -m lift_jax.tools.bench.nvembed_checkpoint FOLDER 7b|tiny

Prints the sizes written, as JSON, on its last line.
"""

from __future__ import annotations

import json
import sys

from embed import fixtures

# The same layout at a size a CPU runs in seconds.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=32000, num_latents=16, latent_dim=64,
            num_cross_heads=2, cross_dim_head=32)
SIZES = {"7b": fixtures.NV_EMBED_V2, "tiny": TINY}


def main(argv: list[str]) -> int:
  if len(argv) != 3 or argv[2] not in SIZES:
    print(f"usage: python -m lift_jax.tools.bench.nvembed_checkpoint FOLDER {'|'.join(SIZES)}",
          file=sys.stderr)
    return 2
  sizes = SIZES[argv[2]]
  fixtures.write_checkpoint(argv[1], weights=False, **sizes)
  print(json.dumps(sizes))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
