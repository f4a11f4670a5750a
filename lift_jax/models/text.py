"""The CLIP baseline's text tower (OpenCLIP TextTransformer) and its tokenizer wrapper.

Causal transformer over token ids, final LayerNorm, pooled at the end-of-text token, bias-free
projection. With CLIP's BPE the end-of-text token has the largest id, so ``eot_token_id=None``
pools at the argmax as OpenCLIP does; other tokenizers pass their EOS/SEP id and the tower pools at
its first occurrence.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lift_jax.models import layers


class TextTransformer(nnx.Module):

  def __init__(self, *, vocab_size: int, context_length: int, width: int = 512, depth: int = 12,
               num_heads: int = 8, mlp_dim: int | None = None, embed_dim: int = 512,
               eot_token_id: int | None = None, dtype=jnp.float32, remat: bool = False,
               attention_impl: str | None = None, rngs: nnx.Rngs):
    self.context_length = context_length
    self.eot_token_id = eot_token_id
    self.dtype = dtype
    mlp_dim = mlp_dim or 4 * width
    attn_std = width ** -0.5
    proj_std = width ** -0.5 * (2 * depth) ** -0.5
    fc_std = (2 * width) ** -0.5
    self.token_embedding = nnx.Param(layers.normal_init(0.02)(rngs.params(), (vocab_size, width)))
    self.positional_embedding = nnx.Param(
        layers.normal_init(0.01)(rngs.params(), (context_length, width)))
    self.transformer = layers.Transformer(
        width, depth, num_heads, mlp_dim, causal=True, dtype=dtype, rngs=rngs, remat=remat,
        attention_impl=attention_impl,
        inits={"in_proj": layers.normal_init(attn_std), "out_proj": layers.normal_init(proj_std),
               "c_fc": layers.normal_init(fc_std), "c_proj": layers.normal_init(proj_std)})
    self.ln_final = layers.layer_norm(width, dtype=dtype, rngs=rngs)
    self.text_projection = nnx.Param(layers.normal_init(attn_std)(rngs.params(),
                                                                  (width, embed_dim)))

  def eot_positions(self, tokens: jax.Array) -> jax.Array:
    if self.eot_token_id is None:
      return jnp.argmax(tokens, axis=-1)
    is_eot = tokens == self.eot_token_id
    # First EOT; a row without one (should not happen) falls back to its last position.
    return jnp.where(is_eot.any(-1), jnp.argmax(is_eot, axis=-1), tokens.shape[-1] - 1)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    b, t = tokens.shape
    if t > self.context_length:
      raise ValueError(f"{t} tokens exceed the text tower's context length {self.context_length}")
    x = jnp.take(self.token_embedding[...], tokens, axis=0).astype(self.dtype)
    x = x + self.positional_embedding[:t].astype(self.dtype)
    x = self.ln_final(self.transformer(x))
    pooled = x[jnp.arange(b), self.eot_positions(tokens)]
    return pooled @ self.text_projection[...].astype(self.dtype)


class Tokenizer:
  """A Hugging Face tokenizer (hub name or local folder) that pads/truncates to a fixed length.

  Truncation keeps the end-of-text token last, as the text tower pools there. Padding uses id 0
  for CLIP's BPE (as OpenCLIP) and the tokenizer's own pad id otherwise.
  """

  def __init__(self, name_or_path: str, context_length: int):
    from transformers import AutoTokenizer  # tokenizers only: no torch needed

    local = os.path.isdir(os.path.expanduser(name_or_path))
    try:
      self._tok = AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path),
                                                local_files_only=local)
    except Exception as e:
      raise ValueError(f"cannot load tokenizer {name_or_path!r}: {e}") from None
    self.context_length = context_length
    tok = self._tok
    self.eot_token_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    self.is_clip_bpe = type(tok).__name__.startswith("CLIPTokenizer")
    self.pad_token_id = 0 if self.is_clip_bpe else (tok.pad_token_id or 0)
    self.vocab_size = len(tok)

  @property
  def pool_token_id(self) -> int | None:
    """The id the text tower pools at (None: argmax, CLIP's convention)."""
    return None if self.is_clip_bpe else self.eot_token_id

  def lengths(self, texts: list[str]) -> list[int]:
    """Token counts before truncation, special tokens included (> context_length: cut)."""
    return [len(ids) for ids in self._tok(list(texts), add_special_tokens=True,
                                           truncation=False)["input_ids"]]

  def __call__(self, texts: list[str]) -> np.ndarray:
    enc = self._tok(list(texts), add_special_tokens=True, truncation=True,
                    max_length=self.context_length, padding=False)["input_ids"]
    out = np.full((len(enc), self.context_length), self.pad_token_id, np.int32)
    for i, ids in enumerate(enc):
      if self.eot_token_id is not None and ids and ids[-1] != self.eot_token_id:
        ids = ids[: self.context_length - 1] + [self.eot_token_id]
      out[i, : len(ids)] = ids
    return out


@functools.lru_cache(maxsize=8)
def get_tokenizer(name_or_path: str, context_length: int) -> Tokenizer:
  return Tokenizer(name_or_path, context_length)
