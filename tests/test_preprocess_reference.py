"""Image preprocessing against explicit PIL steps written in the test.

Eval: Resize(shorter side, bicubic) + CenterCrop, for portrait, landscape, odd, extreme and
already-small images, with the resized size and crop box of each worked out by hand, through
``transforms.resize_center_crop`` and the evaluators' ``Predictor`` (then ImageNet mean/std).
Training: RandomResizedCrop(scale (0.9, 1), ratio (3/4, 4/3), bicubic) draws its randomness from
(seed, global position) only, so any worker/thread layout gives the same crops, different
positions give different crops, and the area and aspect ranges hold over many draws.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import fakedata
from lift_jax.data import pipeline, records, transforms


def picture(width, height, seed=0):
  rng = np.random.default_rng(seed)
  # Smooth gradients plus noise: every column and row differs, so an off-by-one crop shows.
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                   (x + y) * 255 // max(width + height - 2, 1)], -1)
  noise = rng.integers(0, 40, (height, width, 3))
  return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


# (width, height) -> (size after Resize(37), crop box (left, top, right, bottom) of CenterCrop(32))
# worked out by hand: the shorter side becomes 37, the longer int(37 * long / short); the crop
# starts at round((side - 32) / 2) (Python rounds halves to even, as torchvision does).
EVAL_CASES = {
    (30, 50): ((37, 61), (2, 14, 34, 46)),     # portrait: 61.67 -> 61; (61-32)/2 = 14.5 -> 14
    (53, 41): ((47, 37), (8, 2, 40, 34)),      # landscape, odd sizes: (47-32)/2 = 7.5 -> 8
    (45, 45): ((37, 37), (2, 2, 34, 34)),      # square
    (61, 37): ((61, 37), (14, 2, 46, 34)),     # shorter side already 37: no resize
    (20, 14): ((52, 37), (10, 2, 42, 34)),     # smaller than the crop: upscaled first
    (16, 90): ((37, 208), (2, 88, 34, 120)),   # extreme portrait
}


def explicit_eval(img, resized, box):
  if img.size != resized:
    img = img.resize(resized, Image.BICUBIC)
  return np.asarray(img.crop(box))


@pytest.mark.parametrize("size", list(EVAL_CASES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_eval_resize_and_centre_crop(size):
  img = picture(*size)
  expected = explicit_eval(img, *EVAL_CASES[size])
  got = transforms.resize_center_crop(img, 37, 32)
  assert got.shape == (32, 32, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, expected)


def test_predictor_loads_images_with_the_eval_transform(tmp_path):
  from eval.predictor import Predictor
  from eval_fixtures import tiny_model

  model = tiny_model("lift")  # 32 px: Resize(round(32 * 256 / 224) = 37), CenterCrop(32)
  predictor = Predictor(model, batch_size=8, workers=1)
  assert predictor.resize_size == 37
  for size, (resized, box) in EVAL_CASES.items():
    img = picture(*size, seed=size[0])
    path = tmp_path / f"{size[0]}x{size[1]}.png"
    img.save(path)
    np.testing.assert_array_equal(predictor.load_image(str(path)),
                                  explicit_eval(img, resized, box), err_msg=str(size))

  # ... normalised with ImageNet's statistics (not the training ones) before the image tower.
  paths = sorted(str(p) for p in tmp_path.glob("*.png"))
  crops = np.stack([predictor.load_image(p) for p in paths]).astype(np.float64)
  x = (crops / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  graphdef, params = nnx.split(model)
  encode = jax.jit(lambda p, images: nnx.merge(graphdef, p).encode_image(images))
  expected = np.asarray(encode(params, jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(predictor.embed_images(paths), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Training crops
# ------------------------------------------------------------------------------------------------


def test_random_resized_crop_is_the_drawn_box_resized_bicubic():
  img = picture(48, 40)
  for seed in range(5):
    top, left, h, w = transforms.crop_params(48, 40, np.random.default_rng(seed))
    expected = np.asarray(img.resize((32, 32), Image.BICUBIC, box=(left, top, left + w, top + h)))
    got = transforms.random_resized_crop(img, 32, np.random.default_rng(seed))
    np.testing.assert_array_equal(got, expected)


def draw(width, height, n=3000, **kw):
  rng = np.random.default_rng(0)
  return np.array([transforms.crop_params(width, height, rng, **kw) for _ in range(n)]).T


@pytest.mark.parametrize("width,height", [(640, 480), (480, 640), (224, 224), (57, 43)])
def test_crop_area_and_aspect_ranges_over_many_draws(width, height):
  top, left, h, w = draw(width, height)
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  # w and h are rounded to whole pixels: allow that much on the ratios.
  slack = 1 / h + 1 / w
  area = h * w / (width * height)
  aspect = w / h
  assert (area >= 0.9 * (1 - slack)).all() and (area <= 1.0).all()
  assert (aspect >= 3 / 4 * (1 - slack)).all() and (aspect <= 4 / 3 * (1 + slack)).all()
  assert area.min() < 0.91 and area.max() > 0.99  # the whole scale range is used
  assert len(set(top.tolist())) > 3 or len(set(left.tolist())) > 3  # the box moves around


def test_crop_aspect_is_log_uniform_over_the_ratio_range():
  # With SPEC's scale (0.9, 1) the image itself bounds the aspect; a wide scale range shows
  # the ratio distribution: log-uniform over [3/4, 4/3].
  _, _, h, w = draw(500, 500, scale=(0.08, 1.0))
  log_aspect = np.log(w / h)
  lo, hi = math.log(3 / 4), math.log(4 / 3)
  assert log_aspect.min() > lo - 0.02 and log_aspect.max() < hi + 0.02
  assert log_aspect.min() < lo + 0.02 and log_aspect.max() > hi - 0.02
  assert abs(np.mean(log_aspect)) < 0.02 and np.mean(np.abs(log_aspect)) > 0.1


def test_crop_falls_back_to_the_central_box_when_no_draw_fits():
  # 300x500: a crop of >= 90% of the area would be narrower than 3/4; torchvision falls back to
  # the central crop of aspect 3/4 after ten tries: 300 x round(300 / 0.75) = 300 x 400.
  top, left, h, w = draw(300, 500, n=50)
  assert set(zip(top, left, h, w)) == {(50, 0, 400, 300)}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  image_dir, emb_dir = fakedata.write_dataset(str(tmp_path_factory.mktemp("d")), n=12,
                                              shards=2, dim=16)
  return pipeline.PairedSource(records.list_shards(image_dir, records.IMAGES),
                               records.list_shards(emb_dir, records.EMBEDDINGS))


def transform(source, seed=0):
  return pipeline.TrainTransform(mode="lift", image_size=32, seed=seed, source=source,
                                 embed_dim=16)


def test_crops_depend_on_seed_and_position_only(source):
  positions = list(range(0, 48))
  item = lambda p: source[p % len(source)]
  first = {p: transform(source)(p, item(p))["image"] for p in positions}
  # Another copy of the transform (as another worker would hold) seeing the positions in another
  # order, interleaved with other work, gives the same crop for each position.
  other = transform(source)
  for p in reversed(positions):
    other(p + 1000, item(p))
    np.testing.assert_array_equal(other(p, item(p))["image"], first[p], err_msg=f"position {p}")
  # The same image at different positions (later epochs) gets different crops ...
  same_image = [first[p] for p in positions if p % len(source) == 3]
  assert len({a.tobytes() for a in same_image}) == len(same_image)
  # ... and another seed gives other crops at the same positions (a 48x40 image has few boxes
  # to choose from, so an occasional coincidence is allowed).
  reseeded = transform(source, seed=1)
  assert sum(np.array_equal(reseeded(p, item(p))["image"], first[p]) for p in positions) <= 4


def test_batches_equal_for_any_thread_count(source):
  image_dir = source.image_files[0].rsplit("/", 1)[0]
  emb_dir = source.embedding_files[0].rsplit("/", 1)[0]
  out = []
  for threads in (1, 4):
    c = fakedata.tiny_config(image_dir, emb_dir, batch=4)
    c.data.read_threads = threads
    it = iter(pipeline.train_dataset(c))
    out.append([next(it)["image"] for _ in range(6)])
  for a, b in zip(*out):
    np.testing.assert_array_equal(a, b)
  # Six batches of four from twelve examples: each image appears twice, with different crops.
  assert len({b.tobytes() for batch in out[0] for b in batch}) == 24
