"""The image tower: OpenCLIP's VisionTransformer in Flax NNX.

Patchify (bias-free, as a reshape + matmul) -> prepend class token -> add positions -> ln_pre ->
pre-norm blocks -> ln_post over all tokens -> pool: ``avg`` (mean of the patch tokens, class token
excluded; LIFT) or ``tok`` (the class token; CLIP).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from lift_jax import cli
from lift_jax.models import layers


@dataclasses.dataclass(frozen=True)
class VitShape:
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int


# name -> (width, depth, mlp_dim, heads); the patch size comes from the "/N" suffix.
VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "So400m": (1152, 27, 4304, 16),
    "g": (1408, 40, 6144, 16),
}


def parse_variant(variant: str, **overrides) -> VitShape:
  """'B/16' -> VitShape(768, 12, 3072, 12, 16); keyword overrides replace single fields."""
  m = re.fullmatch(r"(\w+)/(\d+)", variant or "")
  if not m or m[1] not in VARIANTS:
    raise cli.ConfigError(f"model.variant={variant!r}: unknown ViT variant; expected NAME/PATCH "
                          f"with NAME in {sorted(VARIANTS)}, e.g. 'B/16'")
  width, depth, mlp_dim, heads = VARIANTS[m[1]]
  shape = VitShape(width, depth, mlp_dim, heads, int(m[2]))
  return dataclasses.replace(shape, **{k: v for k, v in overrides.items() if v is not None})


class VisionTransformer(nnx.Module):

  def __init__(self, shape: VitShape, image_size: int, *, pool: str = "avg",
               dtype=jnp.float32, remat: bool = False, attention_impl: str | None = None,
               rngs: nnx.Rngs):
    if image_size % shape.patch_size:
      raise cli.ConfigError(f"model.image_size={image_size} is not a multiple of the patch size "
                            f"{shape.patch_size} (model.variant)")
    if pool not in ("avg", "tok"):
      raise cli.ConfigError(f"model.pool={pool!r}: expected 'avg' (LIFT) or 'tok' (CLIP)")
    self.shape = shape
    self.pool = pool
    self.dtype = dtype
    w, p = shape.width, shape.patch_size
    grid = image_size // p
    scale = w ** -0.5
    # conv1 as (patch, patch, 3, width): torch Conv2d default init, U(+-1/sqrt(3*p*p)).
    self.conv1 = nnx.Param(layers.torch_linear_init(3 * p * p)(rngs.params(), (p, p, 3, w)))
    self.class_embedding = nnx.Param(layers.normal_init(scale)(rngs.params(), (w,)))
    self.positional_embedding = nnx.Param(
        layers.normal_init(scale)(rngs.params(), (grid * grid + 1, w)))
    self.ln_pre = layers.layer_norm(w, dtype=dtype, rngs=rngs)
    self.transformer = layers.Transformer(
        w, shape.depth, shape.num_heads, shape.mlp_dim, causal=False, dtype=dtype, rngs=rngs,
        remat=remat, attention_impl=attention_impl)
    self.ln_post = layers.layer_norm(w, dtype=dtype, rngs=rngs)

  def patchify(self, images: jax.Array) -> jax.Array:
    b, h, w, c = images.shape
    p = self.shape.patch_size
    if h % p or w % p or c != 3:
      raise ValueError(f"images of shape {images.shape} do not tile into {p}x{p}x3 patches")
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
    kernel = self.conv1[...].reshape(p * p * c, -1).astype(self.dtype)
    return x @ kernel

  def tokens(self, images: jax.Array) -> jax.Array:
    """All output tokens after ln_post, (batch, 1 + patches, width)."""
    x = self.patchify(images)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    pos = self.positional_embedding[...]
    if pos.shape[0] != x.shape[1]:
      raise ValueError(f"images give {x.shape[1]} tokens but the positional embedding has "
                       f"{pos.shape[0]}: the model was built for another image size")
    x = self.ln_pre(x + pos.astype(x.dtype))
    x = self.transformer(x)
    return self.ln_post(x)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.tokens(images)
    if self.pool == "avg":
      return jnp.mean(x[:, 1:].astype(jnp.float32), axis=1).astype(x.dtype)
    return x[:, 0]
