"""Qwen3-Embedding (Qwen3 decoder, last-token pooling): 0.6B (1024-d), 4B (2560-d), 8B (4096-d).

  python -m embed.main --config=embed/configs/qwen3_embedding.py \
      --config.images=DIR --config.output=DIR [--config.model=Qwen/Qwen3-Embedding-0.6B]

As the model card uses it: left padding, the hidden state of the last token, which is the
<|endoftext|> token that Qwen3-Embedding's own tokenizer appends to every text (so append_eos stays
False; truncation at max_length keeps it), L2-normalised. Captions are embedded as documents, with
no instruction. A query instruction has the card's form "Instruct: {task}\nQuery:" (no space after
"Query:"); in bash: --config.instruction=$'Instruct: Retrieve matching captions\nQuery:'.
The released weights are bfloat16; on a CPU pass --config.dtype=float32.
"""

from embed.config import default_config


def get_config():
  c = default_config()
  c.model = "Qwen/Qwen3-Embedding-8B"
  c.encoder = "last_token"
  c.padding_side = "left"
  c.append_eos = False  # the tokenizer appends <|endoftext|> itself
  c.instruction = ""
  c.max_length = 77
  c.normalize = True
  c.dtype = "bfloat16"
  c.storage_dtype = "float16"
  c.batch_tokens = 32768
  return c
