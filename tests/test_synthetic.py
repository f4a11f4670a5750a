"""lift_jax.data.synthetic: determinism, speed, true positives / true negatives (checked with an
independent caption parser and box geometry), agreement of images with their recorded scenes,
and the eval files read back by eval/texts.py."""

import collections
import hashlib
import io
import logging
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from eval import texts
from lift_jax import cli
from lift_jax.data import records
from lift_jax.data import synthetic

# The grammar written out independently of the generator's own phrase builder.
_SHAPES = "circle|square|triangle|star|cross|diamond|hexagon|heart"
_COLORS = "red|green|blue|yellow|purple|orange|white|black"
_PHRASE = rf"(a|an) (?:(small|large) )?(?:({_COLORS}) )?({_SHAPES})"
_CAPTION = re.compile(
    rf"^{_PHRASE}(?: (to the left of|to the right of|above|below) {_PHRASE})?$")


def parse(caption):
  """(phrase, relation, phrase) with phrase = (shape, colour or None, size or None)."""
  m = _CAPTION.match(caption)
  assert m, f"caption outside the grammar: {caption!r}"
  art1, size1, color1, shape1, rel, art2, size2, color2, shape2 = m.groups()
  for art, words in ((art1, (size1, color1, shape1)), (art2, (size2, color2, shape2))):
    if art:
      first_word = next(w for w in words if w)
      assert (art == "an") == (first_word[0] in "aeiou"), caption
  return (shape1, color1, size1), rel, ((shape2, color2, size2) if rel else None)


def geometric_relation(a, b):
  """Relation of box a to box b, derived here from the coordinates alone."""
  ax0, ay0, ax1, ay1 = a
  bx0, by0, bx1, by1 = b
  holds = {
      "to the left of": ax1 < bx0 and ay0 < by1 and by0 < ay1,
      "to the right of": bx1 < ax0 and ay0 < by1 and by0 < ay1,
      "above": ay1 < by0 and ax0 < bx1 and bx0 < ax1,
      "below": by1 < ay0 and ax0 < bx1 and bx0 < ax1,
  }
  true = [r for r, ok in holds.items() if ok]
  assert len(true) == 1, (a, b, true)  # exactly one relation holds, clearly
  return true[0]


def fits(obj, phrase):
  shape, color, size, _ = obj
  want_shape, want_color, want_size = phrase
  return shape == want_shape and want_color in (None, color) and want_size in (None, size)


def is_true(objects, caption):
  first, rel, second = parse(caption)
  if rel is None:
    return any(fits(o, first) for o in objects)
  return any(fits(a, first) and fits(b, second) and geometric_relation(a[3], b[3]) == rel
             for i, a in enumerate(objects) for j, b in enumerate(objects) if i != j)


def check_pixels(png, objects, side):
  """The drawing agrees with the recorded structure: nothing drawn outside the boxes, and each
  box's dominant colour is the named one."""
  img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
  assert img.shape == (side, side, 3)
  background = img[0, 0]
  drawn = np.abs(img - background).sum(-1) > 12
  inside = np.zeros_like(drawn)
  for shape, color, size, (x0, y0, x1, y1) in objects:
    ys, xs = slice(max(0, int(y0) - 1), int(np.ceil(y1)) + 1), slice(max(0, int(x0) - 1),
                                                                     int(np.ceil(x1)) + 1)
    inside[ys, xs] = True
    patch = img[ys, xs][drawn[ys, xs]]
    assert len(patch) > 10, (shape, color)
    values, n = np.unique(patch, axis=0, return_counts=True)
    dominant = values[n.argmax()]
    nearest = min(synthetic.COLORS, key=lambda c: np.abs(np.array(synthetic.COLORS[c]) -
                                                          dominant).sum())
    assert nearest == color, (shape, color, dominant)
    extent = (x1 - x0) / side
    assert (extent < 0.3) == (size == "small")
  assert not (drawn & ~inside).any()


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic") / "set")
  synthetic.generate(out, num_train=1200, num_eval=120, image_size=64, seed=0, num_shards=3,
                     workers=1)
  return out


def all_files(root):
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, root)
      if name == "manifest.json":
        continue  # holds the creation time
      out[rel] = open(path, "rb").read()
  return out


def test_same_seed_same_bytes_whatever_the_workers(small_set, tmp_path):
  other = str(tmp_path / "again")
  synthetic.generate(other, num_train=1200, num_eval=120, image_size=64, seed=0, num_shards=3,
                     workers=2)
  a, b = all_files(small_set), all_files(other)
  assert sorted(a) == sorted(b)
  assert [k for k in a if a[k] != b[k]] == []
  ma = records.read_manifest(os.path.join(small_set, "train"))
  mb = records.read_manifest(os.path.join(other, "train"))
  assert [e["sha256"] for e in ma["shards"]] == [e["sha256"] for e in mb["shards"]]


def test_different_seeds_differ(small_set, tmp_path):
  other = str(tmp_path / "seed1")
  synthetic.generate(other, num_train=1200, num_eval=120, image_size=64, seed=1, num_shards=3,
                     workers=1)
  a, b = all_files(small_set), all_files(other)
  shards = [k for k in a if k.endswith(".array_record")]
  pngs = [k for k in a if k.endswith(".png")]
  assert len(shards) == 3 and len(pngs) == 240
  assert all(a[k] != b[k] for k in shards)
  assert sum(a[k] != b[k] for k in pngs) > 0.95 * len(pngs)


def test_generator_speed(tmp_path, capsys):
  n = 3000
  start = time.perf_counter()
  synthetic.generate(str(tmp_path / "speed"), num_train=n, num_eval=8, num_shards=2, workers=1)
  rate = n / (time.perf_counter() - start)
  with capsys.disabled():
    print(f"\nsynthetic generator: {rate:.0f} pairs/s on one process (64 px, PNG, shards)")
  assert rate > 300  # "thousands per second" on an idle core; loose for busy test machines


def test_train_records_are_true_and_match_their_images(small_set):
  recs = []
  for path in records.list_shards(os.path.join(small_set, "train"), "images"):
    recs.extend(records.iter_records(path))
  assert len(recs) == 1200 and len({r["key"] for r in recs}) == 1200
  singles = [r for r in recs if not r["relation"]]
  assert 0.15 < len(singles) / len(recs) < 0.35
  omitted = 0
  for r in recs:
    objects = [(o[0], o[1], o[2], tuple(o[3])) for o in r["objects"]]
    assert is_true(objects, r["caption"]), (r["key"], r["caption"], objects)
    if len(objects) == 2:
      assert geometric_relation(objects[0][3], objects[1][3]) == r["relation"]
      assert r["label"] == -1
    else:
      shape, color = objects[0][:2]
      assert synthetic.class_names()[r["label"]] == f"{color} {shape}"
    first, _, second = parse(r["caption"])
    omitted += sum(v is None for p in (first, second) if p for v in p[1:])
    check_pixels(r["image"], objects, 64)
  assert omitted > 0  # the grammar's optional words do occur


def _eval_scenes(folder):
  import json

  with open(os.path.join(folder, "scenes.json"), encoding="utf-8") as f:
    scenes = json.load(f)
  return {name: [(o[0], o[1], o[2], tuple(o[3])) for o in s["objects"]]
          for name, s in scenes.items()}


def test_compositional_positives_true_negatives_false(small_set):
  folder = os.path.join(small_set, "eval")
  scenes = _eval_scenes(folder)
  sets = texts.read_sugarcrepe(os.path.join(folder, "compositional"))
  assert set(sets) == set(texts.SUGARCREPE_SUBSETS)
  for subset, rows in sets.items():
    assert len(rows) == 120, subset
    for filename, pos, neg in rows:
      objects = scenes[filename]
      assert is_true(objects, pos), (subset, filename, pos)
      assert not is_true(objects, neg), (subset, filename, neg)
      p, n = parse(pos), parse(neg)
      if subset == "add_obj":
        assert len(objects) == 1 and n[1] is not None
        added = n[2] if fits(objects[0], n[0]) else n[0]
        assert added[0] != objects[0][0]  # a shape that is not in the image
      elif subset == "replace_rel":
        assert (p[0], p[2]) == (n[0], n[2]) and p[1] != n[1]
      elif subset == "swap_obj":
        assert (p[0][0], p[2][0]) == (n[2][0], n[0][0]) and p[1] == n[1]
        assert p[0][1:] == n[0][1:] and p[2][1:] == n[2][1:]
      elif subset == "swap_att":
        changed = [i for i in (1, 2) if p[0][i] != n[0][i]]
        assert len(changed) == 1 and p[0][0] == n[0][0] and p[2][0] == n[2][0]
        i = changed[0]
        assert (n[0][i], n[2][i]) == (p[2][i], p[0][i]) and p[0][i] != p[2][i]
      elif subset == "replace_obj":
        diff = [k for k in (0, 2) if p[k] != n[k]]
        assert len(diff) == 1 and p[diff[0]][1:] == n[diff[0]][1:]
      elif subset == "replace_att":
        diff = [k for k in (0, 2) if p[k] != n[k]]
        assert len(diff) == 1 and p[diff[0]][0] == n[diff[0]][0]
      elif subset == "add_att":
        diff = [k for k in (0, 2) if p[k] != n[k]]
        assert len(diff) == 1
        nones = [i for i in (1, 2) if p[diff[0]][i] is None]
        assert len(nones) == 1 and n[diff[0]][nones[0]] is not None


def test_eval_images_match_scenes_and_are_not_training_images(small_set):
  folder = os.path.join(small_set, "eval")
  scenes = _eval_scenes(folder)
  images = sorted(os.listdir(os.path.join(folder, "images")))
  assert images == sorted(scenes) and len(images) == 240
  eval_hashes = set()
  for name in images:
    png = open(os.path.join(folder, "images", name), "rb").read()
    check_pixels(png, scenes[name], 64)
    eval_hashes.add(hashlib.sha256(png).hexdigest())
  train_hashes = set()
  for path in records.list_shards(os.path.join(small_set, "train"), "images"):
    train_hashes.update(hashlib.sha256(r["image"]).hexdigest() for r in records.iter_records(path))
  assert not eval_hashes & train_hashes


def test_eval_files_read_by_eval_texts(small_set):
  folder = os.path.join(small_set, "eval")
  cls = os.path.join(folder, "classification")
  labels = texts.read_labels(os.path.join(cls, "labels.tsv"))
  names = texts.read_lines(os.path.join(cls, "classnames.txt"))
  templates = texts.read_lines(os.path.join(cls, "templates.txt"))
  assert len(names) == 64 and len(set(names)) == 64
  assert all("{}" in t for t in templates)
  prompts = texts.class_prompts(names, templates)
  assert prompts[0][0] == "a red circle"
  scenes = _eval_scenes(folder)
  assert len(labels) == 120
  for filename, index in labels:
    (obj,) = scenes[filename]
    assert names[index] == f"{obj[1]} {obj[0]}"
    assert os.path.exists(os.path.join(folder, "images", filename))
  per_class = collections.Counter(i for _, i in labels)
  assert len(per_class) == 64 and max(per_class.values()) - min(per_class.values()) <= 1
  caps = texts.read_captions(os.path.join(folder, "retrieval", "captions.tsv"))
  assert len(caps) == 120 and all(len(c) == 2 for c in caps.values())
  all_first = [c[0] for c in caps.values()]
  assert len(set(all_first)) == len(all_first)  # no two retrieval images share a description
  for filename, (a, b) in caps.items():
    assert is_true(scenes[filename], a) and is_true(scenes[filename], b)
  assert all(texts.read_sugarcrepe(os.path.join(folder, "compositional")).values())
  manifest = records.read_manifest(folder)
  assert manifest["counts"]["compositional"] == {s: 120 for s in texts.SUGARCREPE_SUBSETS}


def test_rerun_is_noop_and_other_settings_are_an_error(small_set, caplog):
  train = os.path.join(small_set, "train")
  before = {n: os.stat(os.path.join(train, n)).st_mtime_ns for n in os.listdir(train)}
  with caplog.at_level(logging.INFO, logger="lift_jax.data.synthetic"):
    synthetic.generate(small_set, num_train=1200, num_eval=120, image_size=64, seed=0,
                       num_shards=3, workers=1)
  assert "nothing to do" in caplog.text
  assert {n: os.stat(os.path.join(train, n)).st_mtime_ns for n in os.listdir(train)} == before
  with pytest.raises(synthetic.SyntheticSetError, match="image_size: 64 -> 32"):
    synthetic.generate(small_set, num_train=1200, num_eval=120, image_size=32, seed=0,
                       num_shards=3, workers=1)


def test_cli_and_resume_of_a_damaged_set(tmp_path):
  out = str(tmp_path / "cli")
  args = [f"--output={out}", "--num_train=300", "--num_eval=10", "--num_shards=3",
          "--workers=1", "--seed=5", "--no_progress", "--image_size=48"]
  synthetic.main(args)
  before = all_files(out)
  os.remove(os.path.join(out, "train", records.shard_name("images", 1, 3)))
  os.remove(os.path.join(out, "eval", "images", "pair_00003.png"))
  synthetic.main(args)
  assert all_files(out) == before


def test_cli_errors_are_one_line(tmp_path):
  out = str(tmp_path / "x")
  with pytest.raises(cli.UsageError, match="--output=DIR is required"):
    synthetic.main(["--num_train=10"])
  with pytest.raises(cli.UsageError, match="num_trian"):
    synthetic.main([f"--output={out}", "--num_trian=10"])
  run = subprocess.run([sys.executable, "-m", "lift_jax.data.synthetic", f"--output={out}",
                        "--image_size=8", "--no_progress"], capture_output=True, text=True,
                       cwd=REPO)
  lines = run.stderr.strip().splitlines()
  assert run.returncode == 1 and len(lines) == 1, run.stderr
  assert lines[0] == ("python -m lift_jax.data.synthetic: error: image_size=8: at least 16 px "
                      "are needed to draw two objects; use --image_size=16 or more")
