"""Contrastive objectives over the global batch, in float32.

All take L2-normalised image and text embeddings of the *global* batch (under jit over a mesh the
arrays are sharded; XLA inserts the gathers), so negatives come from every device and the value is
the same on 1 device and on N. ``valid`` (bool, [batch]) masks examples the input pipeline had to
skip (undecodable image, NaN embedding): they are neither positives nor negatives.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from lift_jax import cli

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
  """Symmetric InfoNCE: mean of image->text and text->image cross-entropy, labels on the
  diagonal."""
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


# ----------------------------------------------------------------------------------------------
# The losses a config can name (model.loss): each entry is the whole plug-in
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Loss:
  """A contrastive objective and the scalar parameters it owns.

  ``fn(zimg, ztxt, params, valid)`` gets the model's parameters named in ``params`` (a dict);
  ``params`` maps each name to its initial value, which ``model.<name>_init`` overrides;
  ``bounds`` clip a parameter after every optimizer step. The model creates the parameters at the
  top of its tree (``logit_scale``, ``logit_bias``), so checkpoints and weight maps name them
  the same whatever the loss.
  """
  fn: Callable[..., jax.Array]
  params: Mapping[str, float]
  bounds: Mapping[str, tuple[float, float]]
  doc: str


# The names a loss's parameters may take: model attributes at the top of the parameter tree.
PARAMETER_NAMES = ("logit_scale", "logit_bias")
LOGIT_SCALE_MAX = math.log(100.0)
_SCALE_BOUNDS = {"logit_scale": (0.0, LOGIT_SCALE_MAX)}

LOSSES: dict[str, Loss] = {
    "softmax": Loss(
        lambda zi, zt, p, valid: softmax_loss(zi, zt, p["logit_scale"], valid),
        params={"logit_scale": math.log(1 / 0.07)}, bounds=_SCALE_BOUNDS,
        doc="symmetric InfoNCE over the global batch (the paper's)"),
    "sigmoid": Loss(
        lambda zi, zt, p, valid: sigmoid_loss(zi, zt, p["logit_scale"], p["logit_bias"], valid),
        params={"logit_scale": math.log(10.0), "logit_bias": -10.0}, bounds=_SCALE_BOUNDS,
        doc="SigLIP's pairwise sigmoid"),
    "cos": Loss(
        lambda zi, zt, p, valid: cosine_loss(zi, zt, valid),
        params={}, bounds={}, doc="positive-only cosine ablation, no temperature"),
}


def get(name: str) -> Loss:
  """The loss called ``name`` (``model.loss``); a ConfigError names the choices."""
  if name not in LOSSES:
    raise cli.ConfigError(f"model.loss={name!r}: expected one of {sorted(LOSSES)}")
  return LOSSES[name]


def initial_params(model_cfg: Mapping[str, Any]) -> dict[str, float]:
  """{parameter name: initial value} of the config's loss, with ``model.<name>_init``
  overrides; an override of a parameter the loss does not have is a ConfigError."""
  loss = model_cfg["loss"]
  owned = get(loss).params
  out = dict(owned)
  for key, value in model_cfg.items():
    if key.endswith("_init") and key[:-len("_init")] in PARAMETER_NAMES and value is not None:
      name = key[:-len("_init")]
      if name not in owned:
        raise cli.ConfigError(f"model.{key}={value!r}, but loss {loss!r} has no {name} (its "
                              f"parameters: {sorted(owned) or 'none'})")
      out[name] = float(value)
  return out


def contrastive_loss(kind: str, zimg, ztxt, params: Mapping[str, jax.Array] | None = None,
                     valid=None) -> jax.Array:
  """The loss ``kind`` of the (normalised) embeddings; ``params`` holds its own parameters."""
  return get(kind).fn(zimg, ztxt, dict(params or {}), valid)


def constrain(kind: str, params: dict[str, Any]) -> dict[str, Any]:
  """``params`` (the model's parameter dict) with the loss's parameters clipped to its bounds."""
  for name, (lo, hi) in get(kind).bounds.items():
    if name in params:
      params[name] = jnp.clip(params[name], lo, hi)
  return params
