"""e5-mistral-7b-instruct (4096-d) and the encoders trained from it the same way:
Salesforce/SFR-Embedding-Mistral and Linq-AI-Research/Linq-Embed-Mistral (--config.model=...).

  python -m embed.main --config=embed/configs/e5_mistral.py --config.images=DIR --config.output=DIR

As the model card uses it: BOS from the tokenizer, the text truncated to max_length - 1 tokens,
then the EOS id appended (append_eos), the hidden state of that last token, L2-normalised.
Captions are embedded as documents, with no instruction; a query instruction has the form
"Instruct: {task}\nQuery: " (bash: --config.instruction=$'Instruct: ...\nQuery: ').
"""

from embed.config import default_config


def get_config():
  c = default_config()
  c.model = "intfloat/e5-mistral-7b-instruct"
  c.encoder = "last_token"
  c.append_eos = True
  c.padding_side = ""  # the tokenizer's; positions count from the first real token either way
  c.instruction = ""
  c.max_length = 77
  c.normalize = True
  c.dtype = "auto"  # float16 on GPU (the released weights), float32 on CPU
  c.storage_dtype = "float16"
  c.batch_tokens = 32768
  return c
