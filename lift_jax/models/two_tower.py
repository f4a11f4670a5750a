"""The two-tower model used for both LIFT and the CLIP baseline.

LIFT:  ViT (avg pool) -> MLP head (768 -> 4096 -> 4096 for B/16 + NV-Embed-v2); the text side is a
       precomputed embedding given to the loss as is (normalised there).
CLIP:  ViT (class token) -> bias-free projection; text transformer -> bias-free projection.

Both: a learnable logit scale (init ln(1/0.07), clipped to [0, ln 100] after every update), and for
the sigmoid loss a learnable logit bias. The positive-only cosine ablation has neither.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lift_jax import cli, config_lib, losses
from lift_jax.losses import l2_normalize
from lift_jax.models import layers
from lift_jax.models.text import TextTransformer
from lift_jax.models.vit import VisionTransformer, parse_variant

MODES = ("lift", "clip")


def _dtype(name: str | Any):
  return jnp.dtype(name) if isinstance(name, str) else name


class MlpHead(nnx.Module):
  """Linear -> exact GELU -> Linear ... (PyTorch-default init, with biases, no norm)."""

  def __init__(self, din: int, widths: tuple[int, ...], *, dtype, rngs: nnx.Rngs):
    dims = (din, *widths)
    self.layers = nnx.List([layers.linear(a, b, dtype=dtype, rngs=rngs)
                            for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      if i:
        x = jax.nn.gelu(x, approximate=False)
      x = layer(x)
    return x


class Projection(nnx.Module):
  """Bias-free linear projection, weight N(0, width^-0.5) as OpenCLIP's ``visual.proj``."""

  def __init__(self, din: int, dout: int, *, dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = nnx.Param(layers.normal_init(din ** -0.5)(rngs.params(), (din, dout)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)


class TwoTower(nnx.Module):

  def __init__(self, cfg: Mapping[str, Any], *, rngs: nnx.Rngs):
    mode = dict(cfg).get("mode")
    if mode not in MODES:
      raise cli.ConfigError(f"model.mode={mode!r}: expected one of {MODES}")
    cfg = config_lib.model_config(cfg)  # keys a hand-written dict leaves out: the defaults
    loss_params = losses.initial_params(cfg)
    self.mode, self.loss = mode, cfg["loss"]
    dtype = _dtype(cfg["dtype"])
    remat = bool(cfg["remat"])
    attention_impl = cfg["attention_impl"] or None
    shape = parse_variant(cfg["variant"], **dict(cfg["vit"] or {}))
    pool = cfg["pool"]
    self.image_size = int(cfg["image_size"])
    self.embed_dim = int(cfg["embed_dim"])
    self.visual = VisionTransformer(shape, self.image_size, pool=pool, dtype=dtype, remat=remat,
                                    attention_impl=attention_impl, rngs=rngs)
    if mode == "lift":
      widths = tuple(cfg["head_hidden"] or ()) + (self.embed_dim,)
      self.head = MlpHead(shape.width, widths, dtype=dtype, rngs=rngs)
      self.text = None
    else:
      self.head = Projection(shape.width, self.embed_dim, dtype=dtype, rngs=rngs)
      t = cfg["text"]
      self.text = TextTransformer(
          vocab_size=int(t["vocab_size"]), context_length=int(t["context_length"]),
          width=int(t["width"]), depth=int(t["depth"]), num_heads=int(t["num_heads"]),
          mlp_dim=t.get("mlp_dim"),
          embed_dim=self.embed_dim, eot_token_id=t.get("eot_token_id"), dtype=dtype,
          remat=remat, attention_impl=attention_impl, rngs=rngs)
    # The loss's own scalars (losses.LOSSES), at the top of the parameter tree; None where the
    # loss has none (each attribute is assigned once: nnx fixes its kind at the first).
    for name in losses.PARAMETER_NAMES:
      value = loss_params.get(name)
      setattr(self, name, None if value is None else nnx.Param(jnp.asarray(value, jnp.float32)))

  def image_features(self, images: jax.Array) -> jax.Array:
    """Un-normalised image embeddings (after the head/projection), float32."""
    return self.head(self.visual(images)).astype(jnp.float32)

  def encode_image(self, images: jax.Array) -> jax.Array:
    """float32 NHWC images, already normalised -> L2-normalised embeddings (float32)."""
    return l2_normalize(self.image_features(images))

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """CLIP only: int token ids (batch, length) -> L2-normalised embeddings (float32)."""
    if self.text is None:
      raise cli.ConfigError("a LIFT model has no text tower: its text side is the precomputed "
                       "LLM embedding (see embed/)")
    return l2_normalize(self.text(tokens))

  def __call__(self, images: jax.Array, text: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(normalised image embeddings, normalised text embeddings).

    ``text`` is the precomputed embedding for LIFT, token ids for CLIP.
    """
    zimg = self.encode_image(images)
    ztxt = l2_normalize(text) if self.mode == "lift" else self.encode_text(text)
    return zimg, ztxt


def build_model(cfg: Mapping[str, Any], seed: int = 0) -> TwoTower:
  return TwoTower(cfg, rngs=nnx.Rngs(params=seed))


def count_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
