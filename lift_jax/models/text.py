"""The CLIP baseline's text tower (OpenCLIP TextTransformer); its tokenizer is in
:mod:`lift_jax.data.tokenizer`.

Causal transformer over token ids, final LayerNorm, pooled at the end-of-text token, bias-free
projection. With CLIP's BPE the end-of-text token has the largest id, so ``eot_token_id=None``
pools at the argmax as OpenCLIP does; other tokenizers pass their EOS/SEP id and the tower pools at
its first occurrence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
