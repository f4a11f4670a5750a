"""Transformer building blocks shared by the image and text towers (OpenCLIP layout, Flax NNX).

Parameters are float32; ``dtype`` is the compute dtype (bfloat16 on accelerators). Linear kernels
are stored (in, out), the transpose of PyTorch's (out, in).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lift_jax import cli

LN_EPS = 1e-5


def torch_linear_init(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear weights and biases."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def normal_init(std: float):
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)

  return init


def zeros_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def linear(din: int, dout: int, *, dtype, rngs: nnx.Rngs, use_bias: bool = True,
           kernel_init=None, bias_init=None) -> nnx.Linear:
  """A Linear layer, PyTorch-default initialised unless told otherwise."""
  return nnx.Linear(
      din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=kernel_init or torch_linear_init(din),
      bias_init=bias_init or torch_linear_init(din), rngs=rngs)


def layer_norm(width: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32,
                       use_fast_variance=False, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused q/k/v projection (``in_proj``), as torch's MHA."""

  def __init__(self, width: int, num_heads: int, *, causal: bool, dtype, rngs: nnx.Rngs,
               in_proj_init=None, out_proj_init=None, implementation: str | None = None):
    if width % num_heads:
      raise cli.ConfigError(f"a transformer of width {width} cannot have {num_heads} heads (the "
                            "width must divide by the head count: model.vit.num_heads, "
                            "model.text.num_heads)")
    self.num_heads = num_heads
    self.causal = causal
    self.dtype = dtype
    self.implementation = implementation
    if in_proj_init is None:  # xavier-uniform over the fused (3*width, width) torch weight
      bound = math.sqrt(6.0 / (width + 3 * width))
      in_proj_init = lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound)
    self.in_proj = linear(width, 3 * width, dtype=dtype, rngs=rngs, kernel_init=in_proj_init,
                          bias_init=zeros_init)
    self.out_proj = linear(width, width, dtype=dtype, rngs=rngs, kernel_init=out_proj_init,
                           bias_init=zeros_init)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    qkv = self.in_proj(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal,
                                       implementation=self.implementation)
    return self.out_proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
  def __init__(self, width: int, hidden: int, *, dtype, rngs: nnx.Rngs, fc_init=None,
               proj_init=None):
    self.c_fc = linear(width, hidden, dtype=dtype, rngs=rngs, kernel_init=fc_init)
    self.c_proj = linear(hidden, width, dtype=dtype, rngs=rngs, kernel_init=proj_init)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=False))


class Block(nnx.Module):
  """Pre-norm residual block: x += attn(ln_1(x)); x += mlp(ln_2(x))."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, causal: bool, dtype,
               rngs: nnx.Rngs, inits: dict[str, Any] | None = None,
               attention_impl: str | None = None):
    inits = inits or {}
    self.ln_1 = layer_norm(width, dtype=dtype, rngs=rngs)
    self.attn = Attention(width, num_heads, causal=causal, dtype=dtype, rngs=rngs,
                          in_proj_init=inits.get("in_proj"), out_proj_init=inits.get("out_proj"),
                          implementation=attention_impl)
    self.ln_2 = layer_norm(width, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(width, mlp_dim, dtype=dtype, rngs=rngs, fc_init=inits.get("c_fc"),
                   proj_init=inits.get("c_proj"))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


def _apply_block(block: Block, x: jax.Array) -> jax.Array:
  return block(x)


_remat_block = nnx.remat(_apply_block)


class Transformer(nnx.Module):
  """A stack of blocks, each optionally rematerialised (gradient checkpointing)."""

  def __init__(self, width: int, depth: int, num_heads: int, mlp_dim: int, *, causal: bool,
               dtype, rngs: nnx.Rngs, inits=None, remat: bool = False,
               attention_impl: str | None = None):
    self.remat = remat
    self.resblocks = nnx.List([
        Block(width, num_heads, mlp_dim, causal=causal, dtype=dtype, rngs=rngs, inits=inits,
              attention_impl=attention_impl) for _ in range(depth)])

  def __call__(self, x: jax.Array) -> jax.Array:
    apply = _remat_block if self.remat else _apply_block
    for block in self.resblocks:
      x = apply(block, x)
    return x
