"""The Predictor: embeddings equal a direct forward pass, 8 devices equal 1, parameters swap without
recompiling, odd image modes load, text banks and CLIP's text tower."""

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from eval.predictor import ImageLoadError, Predictor, TextBankError
from eval_fixtures import DIM, odd_images, tiny_model, write_bank
from lift_jax import sharding
from lift_jax.data import transforms


@pytest.fixture(scope="module")
def lift_model():
  return tiny_model("lift", 0)


@pytest.fixture(scope="module")
def mesh8():
  assert jax.device_count() == 8
  return sharding.make_mesh()


@pytest.fixture(scope="module")
def mesh1():
  return sharding.make_mesh(devices=jax.devices()[:1])


def random_arrays(n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (int(rng.integers(20, 70)), int(rng.integers(20, 70)), 3),
                       dtype=np.uint8) for _ in range(n)]


def forward(model, method: str, inputs):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: getattr(nnx.merge(graphdef, s), method)(x))
  return np.asarray(fn(state, inputs))


def direct(model, predictor, items):
  crops = np.stack([predictor.load_image(it) for it in items])
  x = transforms.normalize(crops, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
  return forward(model, "encode_image", x)


def test_embed_images_equals_direct_forward_with_padded_last_batch(lift_model, mesh8):
  p = Predictor(lift_model, mesh=mesh8, batch_size=16, workers=2)
  assert (p.image_size, p.resize_size) == (32, 37)  # round(32 * 256 / 224)
  items = random_arrays(21)  # one full batch and one padded with 11 blanks
  out = p.embed_images(items)
  assert out.shape == (21, DIM) and out.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, rtol=1e-5)
  np.testing.assert_allclose(out, direct(lift_model, p, items), atol=2e-5)
  assert p.embed_images([]).shape == (0, DIM)


def test_eight_devices_equal_one_device(lift_model, mesh8, mesh1):
  items = random_arrays(27, seed=1)
  a = Predictor(lift_model, mesh=mesh8, batch_size=8, workers=2).embed_images(items)
  b = Predictor(lift_model, mesh=mesh1, batch_size=5, workers=1).embed_images(items)
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_batch_size_rounds_up_to_the_devices(lift_model, mesh8):
  p = Predictor(lift_model, mesh=mesh8, batch_size=10)
  assert p.batch_size == 16
  np.testing.assert_array_equal(p._rows, np.arange(16))  # one process holds every row


def test_set_params_swaps_weights_without_recompiling(lift_model, mesh8):
  other = tiny_model("lift", 1)
  items = random_arrays(10, seed=2)
  p = Predictor(lift_model, mesh=mesh8, batch_size=8, workers=2)
  first = p.embed_images(items)
  assert p._image_fn._cache_size() == 1
  p.set_params(nnx.to_pure_dict(nnx.state(other)))
  second = p.embed_images(items)
  # the trainer's arrays: already replicated over the mesh
  placed = jax.device_put(nnx.to_pure_dict(nnx.state(lift_model)), sharding.replicated(mesh8))
  p.set_params(placed)
  third = p.embed_images(items)
  assert p._image_fn._cache_size() == 1
  assert not np.allclose(first, second)
  np.testing.assert_allclose(second, Predictor(other, mesh=mesh8, batch_size=8).embed_images(
      items), atol=1e-6)
  np.testing.assert_allclose(third, first, atol=1e-6)


def test_path_cache_until_set_params(lift_model, mesh8, tmp_path):
  paths = []
  for i, a in enumerate(random_arrays(5, seed=3)):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(a).save(paths[-1])
  p = Predictor(lift_model, mesh=mesh8, batch_size=8, workers=2)
  loads = []
  original = p.load_image
  p.load_image = lambda it: (loads.append(it), original(it))[1]
  a = p.embed_images(paths)
  b = p.embed_images(paths[::-1] + paths[:2])
  assert len(loads) == 5  # the second call read nothing
  np.testing.assert_array_equal(b[:5], a[::-1])
  p.set_params(nnx.to_pure_dict(nnx.state(lift_model)))
  p.embed_images(paths[:1])
  assert len(loads) == 6


def test_odd_images_load_as_rgb(lift_model, mesh8, tmp_path):
  paths = odd_images(str(tmp_path))
  p = Predictor(lift_model, mesh=mesh8, batch_size=8, workers=2)
  for path in paths:
    crop = p.load_image(path)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8, path
  with open(paths[0], "rb") as f:
    cmyk_bytes = f.read()
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (40, 30), dtype=np.uint8)
  items = paths + [cmyk_bytes, gray, np.stack([gray] * 3, -1), gray[..., None],
                   rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), Image.fromarray(gray)]
  out = p.embed_images(items)
  assert out.shape == (len(items), DIM) and np.isfinite(out).all()
  np.testing.assert_allclose(out[len(paths)], out[0], atol=1e-6)  # bytes == path
  np.testing.assert_allclose(out[len(paths) + 2], out[len(paths) + 1], atol=1e-6)  # L == RGB
  np.testing.assert_allclose(out[len(paths) + 3], out[len(paths) + 1], atol=1e-6)
  np.testing.assert_allclose(out[-1], out[len(paths) + 1], atol=1e-6)


def test_bad_images_are_named_counted_and_never_a_hit(lift_model, mesh8, tmp_path, caplog):
  p = Predictor(lift_model, mesh=mesh8, batch_size=8, workers=2)
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  good = np.full((40, 40, 3), 128, np.uint8)
  out = p.embed_images([good, bad.read_bytes(), good])
  assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()  # NaN scores never hit
  assert p.unusable_images == 1
  out = p.embed_images([str(bad), str(tmp_path / "nowhere.jpg"), str(bad)])
  assert np.isnan(out).all() and p.unusable_images == 3  # each distinct image counted once
  for name in ("broken.jpg: not a decodable image", "nowhere.jpg: cannot read"):
    assert any(name in r.getMessage() for r in caplog.records), name
  with pytest.raises(ImageLoadError, match="broken.jpg"):
    p.load_image(str(bad))
  with pytest.raises(ImageLoadError, match="float32"):
    p.load_image(np.zeros((8, 8, 3), np.float32))


def test_text_bank_lookup(lift_model, mesh8, tmp_path):
  texts = ["a dog", "a cat", "two birds"]
  vectors = np.random.default_rng(0).standard_normal((3, DIM)).astype(np.float32) * 3
  bank = write_bank(str(tmp_path / "bank"), texts, vectors=vectors)
  p = Predictor(lift_model, mesh=mesh8, text_bank=bank)
  out = p.embed_texts(["two birds", "a dog", "two birds"])
  expected = vectors[[2, 0, 2]] / np.linalg.norm(vectors[[2, 0, 2]], axis=1, keepdims=True)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  with pytest.raises(TextBankError) as e:
    p.embed_texts(["a dog", "a horse", "a cow", "a horse"])
  msg = str(e.value)
  assert "2 of 3 texts are missing" in msg and "'a horse'" in msg and bank in msg
  assert "python -m embed.main" in msg and "--config.texts=FILE" in msg


def test_text_bank_errors(lift_model, mesh8, tmp_path):
  with pytest.raises(TextBankError, match="does not exist.*embed.main"):
    Predictor(lift_model, mesh=mesh8, text_bank=str(tmp_path / "none")).embed_texts(["x"])
  with pytest.raises(TextBankError, match="text_bank is not set"):
    Predictor(lift_model, mesh=mesh8).embed_texts(["x"])
  wide = write_bank(str(tmp_path / "wide"), ["x"], dim=DIM + 1)
  with pytest.raises(TextBankError, match=f"{DIM + 1}-d embeddings.*{DIM} dimensions"):
    Predictor(lift_model, mesh=mesh8, text_bank=wide).embed_texts(["x"])
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(TextBankError, match="not readable.*manifest"):
    Predictor(lift_model, mesh=mesh8, text_bank=str(empty)).embed_texts(["x"])


def test_clip_texts_equal_direct_forward_and_shard_evenly(minilm_path, mesh8, mesh1):
  from lift_jax.data.tokenizer import get_tokenizer

  model = tiny_model("clip", 0)
  texts = [f"a photo of {n} {w}" for n in range(7) for w in ("cats", "a red car", "")][:19]
  tok = get_tokenizer(minilm_path, 24)
  want = forward(model, "encode_text", tok(texts))
  a = Predictor(model, mesh=mesh8, batch_size=8, tokenizer=minilm_path).embed_texts(texts)
  b = Predictor(model, mesh=mesh1, batch_size=7, tokenizer=tok).embed_texts(texts)
  assert a.shape == (19, DIM)
  np.testing.assert_allclose(a, want, atol=2e-6)
  np.testing.assert_allclose(b, want, atol=2e-6)
  images = random_arrays(9)
  np.testing.assert_allclose(
      Predictor(model, mesh=mesh8, batch_size=8).embed_images(images),
      Predictor(model, mesh=mesh1, batch_size=8).embed_images(images), atol=1e-6)
