"""Image decoding and the train / eval crops, on the host with PIL (no JAX, no torch).

Both crops return uint8 HWC arrays; the mean/std normalisation happens on the accelerator
(:func:`normalize`), which moves 4x fewer bytes from host to device than float32 pixels would.

``random_resized_crop`` draws its crop exactly as torchvision's RandomResizedCrop (ten tries of
area and log-uniform aspect, then the central fallback); ``resize_center_crop`` matches
torchvision's Resize(shorter side) + CenterCrop. Both resample with bicubic.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile

from lift_jax import cli

Image.init()  # every format plugin registered now, before reader threads open images at once

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a grey half image


@cli.user_error
class DecodeError(ValueError):
  """The bytes are not a decodable image."""


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode (L, LA, P, PA, CMYK, I;16, RGBA, ...) -> RGB; alpha, or a transparent
  colour (``info["transparency"]`` of P and L images), is composited on white."""
  if img.mode == "RGB":
    return img
  if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("P", "L") and "transparency" in img.info):
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    a = np.asarray(img, dtype=np.float64)
    peak = 65535.0 if a.max() > 255 else 255.0
    return Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
  if img.mode == "F":
    a = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
  return img.convert("RGB")


def open_image(data: bytes) -> Image.Image:
  """Opens image bytes lazily: format, mode and size are read from the header, pixels are not.

  Converters use this to judge an image (tiny, extreme aspect, CMYK, ...) before paying for the
  decode; :func:`load` then decodes it. Raises DecodeError with the reason.
  """
  if not data:
    raise DecodeError("zero-byte image")
  try:
    return Image.open(io.BytesIO(data))
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
    raise DecodeError(f"{type(e).__name__}: {e}") from None


def load(img: Image.Image, min_size: int | None = None) -> Image.Image:
  """Decodes the pixels of an image from :func:`open_image`, keeping its own mode.

  With ``min_size``, a JPEG much larger than needed is decoded at a reduced DCT scale (PIL's draft
  mode) whose shorter side stays >= ``min_size``: the same picture for the crop, far fewer pixels.
  A truncated or damaged file raises DecodeError, also at a reduced scale.
  """
  try:
    if min_size and img.format == "JPEG":
      w, h = img.size
      scale = min(w, h) / min_size
      if scale >= 2:  # the scale only: to_rgb converts the mode
        img.draft(None, (math.ceil(w / scale), math.ceil(h / scale)))
    img.load()
  except Exception as e:
    raise DecodeError(f"{type(e).__name__}: {e}") from None
  return img


def decode(data: bytes, min_size: int | None = None) -> Image.Image:
  """Decodes image bytes to an RGB PIL image; raises DecodeError with the reason.

  ``min_size`` as in :func:`load`.
  """
  return to_rgb(load(open_image(data), min_size))


def crop_params(width: int, height: int, rng: np.random.Generator,
                scale: Sequence[float] = (0.9, 1.0),
                ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, crop_height, crop_width) as torchvision's RandomResizedCrop.get_params."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale: Sequence[float] = (0.9, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
  top, left, h, w = crop_params(img.width, img.height, rng, scale, ratio)
  out = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
  return np.asarray(out, dtype=np.uint8)


def eval_resize_size(image_size: int, resize_size: int | None = None) -> int:
  """The shorter side evaluation resizes to before CenterCrop(image_size): ``resize_size``, or
  by default image_size * 256 / 224 (Resize(256) -> CenterCrop(224) at 224 px)."""
  return int(resize_size or round(image_size * 256 / 224))


def resize_center_crop(img: Image.Image, resize: int, crop: int) -> np.ndarray:
  """Resize the shorter side to ``resize`` (bicubic), then take the central ``crop`` square."""
  w, h = img.size
  if w <= h:
    new_w, new_h = resize, int(resize * h / w)
  else:
    new_w, new_h = int(resize * w / h), resize
  if crop > resize:  # the box would reach past the image, and PIL would pad it with black
    raise ValueError(f"crop {crop} is larger than the resized image {new_w}x{new_h}")
  if (new_w, new_h) != (w, h):
    img = img.resize((new_w, new_h), Image.BICUBIC)
  top = int(round((new_h - crop) / 2.0))
  left = int(round((new_w - crop) / 2.0))
  return np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def normalize(images, mean: Sequence[float], std: Sequence[float]):
  """uint8 (or float in [0, 255]) NHWC -> float32 (x/255 - mean)/std. Works on numpy and jax."""
  if isinstance(images, np.ndarray):
    xp = np
  else:
    import jax.numpy as xp  # only when called on device arrays
  mean = xp.asarray(mean, dtype=xp.float32) * 255.0
  inv_std = 1.0 / (xp.asarray(std, dtype=xp.float32) * 255.0)
  if xp is np:  # in place: no temporaries on the host
    out = images.astype(np.float32)
    out -= mean
    out *= inv_std
    return out
  return (images.astype(xp.float32) - mean) * inv_std
