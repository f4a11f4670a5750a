"""Decoding and crops at their edges, against numpy formulas and explicit PIL steps: every image
mode to RGB, the JPEG draft scale, decode errors, each branch of the crop draw with chosen draws,
the centre crop's size check and the normalisation on host and device."""

import io
import math

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lift_jax.data import transforms


def encode(img, fmt="JPEG"):
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


def noise(h, w, channels=3, seed=0):
  shape = (h, w, channels) if channels else (h, w)
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# Modes


def on_white(colour, alpha):
  """Alpha compositing over white, in float64."""
  a = alpha.astype(np.float64)[..., None] / 255.0
  return colour.astype(np.float64) * a + 255.0 * (1 - a)


def test_rgb_is_returned_as_it_is():
  img = Image.fromarray(noise(4, 5))
  assert transforms.to_rgb(img) is img


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode):
  pixels = noise(6, 7, 4)
  pixels[0, :, 3] = 0  # fully transparent: white
  pixels[1, :, 3] = 255  # opaque: the colour itself
  img = Image.fromarray(pixels, "RGBA")
  if mode == "LA":
    img = img.convert("LA")
  colour = np.asarray(img.convert("RGB"), np.float64)
  alpha = np.asarray(img.getchannel("A"))
  got = np.asarray(transforms.to_rgb(img))
  assert got.dtype == np.uint8 and got.shape == (6, 7, 3)
  np.testing.assert_allclose(got, on_white(colour, alpha), atol=1)
  assert (got[0] == 255).all()


def palette_image():
  img = Image.new("P", (3, 1))
  img.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 0] + [0] * 759)
  img.putdata([0, 1, 2])
  return img


def test_palettes_with_transparency_are_composited_on_white():
  pal = palette_image()
  assert np.asarray(transforms.to_rgb(pal)).tolist() == [[[10, 20, 30], [200, 100, 50],
                                                          [0, 0, 0]]]
  pal.info["transparency"] = 1  # palette index 1 is transparent
  assert np.asarray(transforms.to_rgb(pal)).tolist() == [[[10, 20, 30], [255, 255, 255],
                                                          [0, 0, 0]]]
  grey = Image.fromarray(np.array([[0, 80, 160]], np.uint8), "L")
  grey.info["transparency"] = 80  # a transparent grey level (PNG tRNS)
  assert np.asarray(transforms.to_rgb(grey))[..., 0].tolist() == [[0, 255, 160]]
  pa = palette_image().convert("PA")
  pa.putalpha(Image.fromarray(np.array([[255, 0, 128]], np.uint8)))
  assert pa.mode == "PA"
  got = np.asarray(transforms.to_rgb(pa)).astype(np.float64)
  want = on_white(np.array([[[10, 20, 30], [200, 100, 50], [0, 0, 0]]]), np.array([[255, 0, 128]]))
  np.testing.assert_allclose(got, want, atol=1)


def sixteen_bit(values):
  """What 16-bit grey becomes: scaled by 255/65535, rounded half up, kept in [0, 255]."""
  return np.clip(np.floor(np.asarray(values, np.float64) / 65535 * 255 + 0.5), 0, 255)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_sixteen_bit_grey_is_scaled_to_eight_bits(mode):
  # 256 is the smallest value that marks an image as 16-bit; 32767 and 51529 sit next to a
  # rounding boundary (127.498 and 200.502 before rounding).
  values = np.array([[0, 256, 300, 32767, 51529, 65535]])
  dtype = ">u2" if mode == "I;16B" else "<u2"
  img = Image.frombytes(mode, (6, 1), values.astype(dtype).tobytes())
  assert img.mode == mode
  got = np.asarray(transforms.to_rgb(img))
  assert got.shape == (1, 6, 3) and (got == sixteen_bit(values)[..., None]).all()
  assert sixteen_bit(values).tolist() == [[0, 1, 1, 127, 201, 255]]  # PIL would clip 256 to 255
  img.info["transparency"] = 300  # a transparent level is not applied to 16-bit grey
  assert (np.asarray(transforms.to_rgb(img)) == got).all()
  just_16_bit = Image.frombytes(mode, (2, 1), np.array([0, 256]).astype(dtype).tobytes())
  assert np.asarray(transforms.to_rgb(just_16_bit))[..., 0].tolist() == [[0, 1]]


def test_32_bit_grey():
  values = np.array([[-40000, 0, 300, 70000]])  # out of 16-bit range on both sides: clipped
  got = np.asarray(transforms.to_rgb(Image.fromarray(values.astype(np.int32))))
  assert (got == sixteen_bit(values)[..., None]).all() and got[0, :, 0].tolist() == [0, 0, 1, 255]
  low = Image.fromarray(np.array([[0, 7, 255]], np.int32))  # no value above 255: kept as is
  assert np.asarray(transforms.to_rgb(low))[..., 0].tolist() == [[0, 7, 255]]


def test_other_modes():
  f = Image.fromarray(np.array([[12.7, -3.0, 300.0, 255.9]], np.float32))
  assert np.asarray(transforms.to_rgb(f))[..., 1].tolist() == [[12, 0, 255, 255]]  # clip, cut
  grey = noise(3, 4, channels=0)
  got = np.asarray(transforms.to_rgb(Image.fromarray(grey, "L")))
  assert (got == grey[..., None]).all()
  cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [100, 50, 25, 128]]], np.uint8)
  got = np.asarray(transforms.to_rgb(Image.fromarray(cmyk, "CMYK"))).astype(np.float64)
  want = (255 - cmyk[..., :3].astype(np.float64)) * (255 - cmyk[..., 3:].astype(np.float64)) / 255
  np.testing.assert_allclose(got, want, atol=1)


# ------------------------------------------------------------------------------------------------
# Decoding


def test_decode_errors_say_why():
  with pytest.raises(transforms.DecodeError) as err:
    transforms.decode(b"")
  assert str(err.value) == "zero-byte image"
  with pytest.raises(transforms.DecodeError) as err:
    transforms.decode(b"not an image at all")
  assert str(err.value).startswith("UnidentifiedImageError: cannot identify image file")
  data = encode(Image.fromarray(noise(64, 80)))
  for min_size in (None, 16):  # also when decoded at a reduced scale
    with pytest.raises(transforms.DecodeError) as err:
      transforms.decode(data[:len(data) // 2], min_size)
    assert str(err.value).startswith("OSError: image file is truncated")


def test_large_jpegs_decode_at_a_reduced_scale_no_smaller_than_needed():
  data = encode(Image.fromarray(noise(600, 800)))
  # 800x600: the shorter side / min_size is the largest DCT reduction allowed (1/2, 1/4, 1/8).
  for min_size, size in ((100, (200, 150)), (150, (200, 150)), (151, (400, 300)),
                         (300, (400, 300)), (301, (800, 600)), (None, (800, 600))):
    img = transforms.decode(data, min_size)
    assert (img.size, img.mode) == (size, "RGB"), min_size
  png = encode(Image.fromarray(noise(600, 800)), "PNG")
  assert transforms.decode(png, 100).size == (800, 600)  # not a JPEG: full size
  grey = transforms.decode(encode(Image.fromarray(noise(600, 800, channels=0))), 100)
  assert (grey.size, grey.mode) == ((200, 150), "RGB")


# ------------------------------------------------------------------------------------------------
# The training crop's draw


class Draws:
  """Stands in for the numpy Generator with chosen draws: ``uniform(low, high)`` returns
  ``low + (high - low) * u`` for the next scripted ``u``, ``integers(low, high)`` the next
  scripted offset above ``low``."""

  def __init__(self, us, offsets=()):
    self.us, self.offsets = iter(us), iter(offsets)

  def uniform(self, low=0.0, high=1.0):
    return low + (high - low) * next(self.us)

  def integers(self, low, high=None):
    low, high = (0, low) if high is None else (low, high)
    value = low + next(self.offsets)
    assert value < high
    return value


def u_for(aspect, ratio=(3 / 4, 4 / 3)):
  """The uniform draw that gives ``aspect`` (the aspect is log-uniform over ``ratio``)."""
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  return (math.log(aspect) - lo) / (hi - lo)


def test_a_draw_that_fits_is_taken_whole_sides_included():
  # 400x300 at 90% of the area and aspect 1.2: 360x300, as tall as the image.
  box = transforms.crop_params(400, 300, Draws([0.0, u_for(1.2)], [0, 7]))
  assert box == (0, 7, 300, 360)
  # A 1x1 crop is a crop: 5x5 at 4% of the area, aspect 1.
  assert transforms.crop_params(5, 5, Draws([0.0, 0.5], [2, 3]), scale=(0.04, 0.04)) == \
      (2, 3, 1, 1)
  # The scale's upper end counts: 25% of a 40x40 image, aspect 1.
  assert transforms.crop_params(40, 40, Draws([1.0, 0.5], [1, 2]), scale=(0.0, 0.25)) == \
      (1, 2, 20, 20)


def test_draws_of_zero_width_or_height_do_not_fit():
  # 5x5 at 1% (0.25 px): aspect 3/4 rounds to 0 wide, 1 high; 4/3 to 1 wide, 0 high.
  for u in (0.0, 1.0):
    draws = Draws([0.0, u] * 10)
    assert transforms.crop_params(5, 5, draws, scale=(0.01, 0.01)) == (0, 0, 5, 5)


def test_ten_tries_then_the_central_box():
  # 300x500 with scale (0.08, 1): ten draws too wide for the image, then one that would fit.
  draws = Draws([1.0, 1.0] * 10 + [0.0, 0.5], [0, 0])
  assert transforms.crop_params(300, 500, draws, scale=(0.08, 1.0)) == (50, 0, 400, 300)


@pytest.mark.parametrize("width, height, aspect, box", [
    (301, 500, 4 / 3, (49, 0, 401, 301)),  # too tall: full width, height round(301 / 0.75)
    (501, 300, 3 / 4, (0, 50, 300, 400)),  # too wide: full height, width 300 * 4/3
    (300, 400, 4 / 3, (0, 0, 400, 300)),   # exactly 3/4: the whole image
])
def test_the_central_box_when_nothing_fits(width, height, aspect, box):
  draws = Draws([1.0, u_for(aspect)] * 10)  # the whole area at an aspect the image cannot hold
  got = transforms.crop_params(width, height, draws)
  assert got == box and all(type(v) is int for v in got)


def test_random_resized_crop_uses_its_scale_and_ratio():
  img = Image.fromarray(noise(40, 48))
  draws = Draws([0.0, 0.0], [3, 5])  # ratio (1, 1): aspect 1 whatever the draw
  got = transforms.random_resized_crop(img, 16, draws, scale=(0.25, 0.25), ratio=(1.0, 1.0))
  # 25% of 48x40 = 480 px, aspect 1: 22x22 at (top 3, left 5)
  want = np.asarray(img.resize((16, 16), Image.BICUBIC, box=(5, 3, 27, 25)))
  np.testing.assert_array_equal(got, want)


def test_centre_crop_as_large_as_the_resized_side_and_no_larger():
  img = Image.fromarray(noise(32, 64))
  np.testing.assert_array_equal(transforms.resize_center_crop(img, 32, 32),
                                np.asarray(img.crop((16, 0, 48, 32))))
  for crop in (33, 40):
    with pytest.raises(ValueError) as err:
      transforms.resize_center_crop(img, 32, crop)
    assert str(err.value) == f"crop {crop} is larger than the resized image 64x32"


# ------------------------------------------------------------------------------------------------
# Normalisation


def test_normalize_on_host_and_device():
  images = noise(2, 3, seed=4)[None].repeat(2, 0)
  want = (images / 255.0 - np.array(transforms.OPENAI_MEAN)) / np.array(transforms.OPENAI_STD)
  kept = images.copy()
  host = transforms.normalize(images, transforms.OPENAI_MEAN, transforms.OPENAI_STD)
  assert isinstance(host, np.ndarray) and host.dtype == np.float32
  np.testing.assert_allclose(host, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(images, kept)  # the input is left alone
  device = transforms.normalize(jnp.asarray(images), transforms.OPENAI_MEAN,
                                transforms.OPENAI_STD)
  assert isinstance(device, jnp.ndarray) and device.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(device), want, rtol=1e-5, atol=1e-6)
