"""Contrastive objectives over the global batch, in float32.

All take L2-normalised image and text embeddings of the *global* batch (under jit over a mesh the
arrays are sharded; XLA inserts the gathers), so negatives come from every device and the value is
the same on 1 device and on N. ``valid`` (bool, [batch]) masks examples the input pipeline had to
skip (undecodable image, NaN embedding): they are neither positives nor negatives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
_NEG = -1e30  # "minus infinity" that keeps gradients finite


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / ||x||`` along the last axis, in float32 (the one normalisation of embeddings: the
  model's forward pass and the evaluators both use it)."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _similarities(zimg: jax.Array, ztxt: jax.Array) -> jax.Array:
  return jnp.matmul(zimg.astype(jnp.float32), ztxt.astype(jnp.float32).T, precision=_HIGHEST)


def _mean(x: jax.Array, valid: jax.Array | None) -> jax.Array:
  if valid is None:
    return jnp.mean(x)
  w = valid.astype(jnp.float32)
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def softmax_loss(zimg, ztxt, logit_scale, valid=None) -> jax.Array:
  """Symmetric InfoNCE: mean of image->text and text->image cross-entropy, labels on the diagonal."""
  logits = jnp.exp(logit_scale.astype(jnp.float32)) * _similarities(zimg, ztxt)
  if valid is not None:
    keep = valid[None, :] & valid[:, None]
    # An invalid row/column must not act as a negative: it is removed from both softmaxes.
    logits = jnp.where(keep | jnp.eye(logits.shape[0], dtype=bool), logits, _NEG)
  diag = jnp.diagonal(logits)
  i2t = jax.nn.logsumexp(logits, axis=1) - diag
  t2i = jax.nn.logsumexp(logits, axis=0) - diag
  return 0.5 * (_mean(i2t, valid) + _mean(t2i, valid))


def sigmoid_loss(zimg, ztxt, logit_scale, logit_bias, valid=None) -> jax.Array:
  """SigLIP: -sum log sigmoid(label * (exp(s) * sim + b)) over all pairs, divided by batch."""
  logits = jnp.exp(logit_scale.astype(jnp.float32)) * _similarities(zimg, ztxt) + logit_bias
  n = logits.shape[0]
  labels = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
  pair_loss = -jax.nn.log_sigmoid(labels * logits)
  if valid is None:
    return jnp.sum(pair_loss) / n
  keep = (valid[None, :] & valid[:, None]).astype(jnp.float32)
  return jnp.sum(pair_loss * keep) / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def cosine_loss(zimg, ztxt, valid=None) -> jax.Array:
  """The positive-only ablation: mean(1 - cos(z_img_i, z_txt_i))."""
  cos = jnp.sum(zimg.astype(jnp.float32) * ztxt.astype(jnp.float32), axis=-1)
  return _mean(1.0 - cos, valid)


def contrastive_loss(kind: str, zimg, ztxt, logit_scale=None, logit_bias=None, valid=None):
  if kind == "softmax":
    return softmax_loss(zimg, ztxt, logit_scale, valid)
  if kind == "sigmoid":
    return sigmoid_loss(zimg, ztxt, logit_scale, logit_bias, valid)
  if kind == "cos":
    return cosine_loss(zimg, ztxt, valid)
  raise ValueError(f"unknown loss {kind!r}; expected softmax, sigmoid or cos")
