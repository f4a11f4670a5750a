"""The embedding job's configuration: every field, its default and what it means.

Files in ``embed/configs/`` start from :func:`default_config` and set the model. Every field can be
overridden on the command line, e.g. ``--config.images=DIR --config.output=DIR``.
"""

import ml_collections

POLICIES = ("flag", "fail")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Input: exactly one of `images` (a folder of images-*.array_record shards, whose captions are
  # embedded into embeddings-* shards aligned 1:1) or `texts` (a file of texts, one per line or a
  # JSON list, embedded into a text bank keyed by the exact text).
  c.images = ""
  c.texts = ""
  c.output = ""
  c.caption_field = "caption"  # or "recaption", or any string field of the image records

  # Encoder.
  c.model = ""  # hub id (matched case-insensitively) or a local folder
  c.revision = ""  # hub revision to load; "" = the default branch
  c.encoder = ""  # a kind of embed.encoders.ARCHITECTURES; "" = the known default of the model
  c.instruction = ""  # text prefixed to every input (nv_embed: passed to its encode())
  c.max_length = 77  # tokens per text, special tokens included; longer texts are truncated
  c.normalize = True  # L2-normalise the vectors before storage
  c.append_eos = False  # last_token/mean/cls: append the EOS id after truncation (e5-style models)
  c.padding_side = ""  # left | right; "" = the tokenizer's own
  c.trust_remote_code = False  # last_token/mean/cls only; nv_embed never runs a model's own code
  # Build the architecture of the model's config.json with random weights instead of loading
  # them (no weights need to be present): the cost of an encoder without downloading it. The
  # vectors are meaningless; the manifest records random_init.
  c.random_init = False
  c.dtype = "auto"  # compute: float32 | float16 | bfloat16; auto = float16 on GPU, else float32
  c.device = "auto"  # auto = cuda:LOCAL_RANK when CUDA is available, else cpu

  # Output.
  c.storage_dtype = "float16"  # float16 | bfloat16 | float32 | int8 (per-vector scale)
  c.bank_shard_size = 16384  # texts per bank shard (text-bank mode; 256 MiB of float32 at 4096-d)

  # Speed.
  c.batch_tokens = 16384  # padded tokens per batch (batch size x longest text in the batch)
  c.max_batch_size = 4096  # texts per batch, whatever their length
  # The cost of one more batch, in padded tokens: batches are cut to minimise padded tokens +
  # this x batches (0 = one batch per distinct length; large = full batches, more padding).
  c.batch_overhead_tokens = 256
  c.threads = 0  # torch CPU threads; 0 = torch's default

  # Bad input: "flag" writes a zero placeholder whose record `flag` says why (never trained on)
  # and counts it; "fail" stops with an error naming the shard and record.
  c.empty_policy = "flag"  # empty, whitespace-only, undecodable or missing captions
  c.nan_policy = "flag"  # NaN/Inf in the encoder's output

  # verify=True checks the finished output (shards against the manifest, keys against the image
  # shards or the texts file) and embeds nothing.
  c.verify = False
  c.progress = True
  return c


def get_config() -> ml_collections.ConfigDict:
  return default_config()
