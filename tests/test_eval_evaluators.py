"""Evaluators with embeddings chosen by the test (known answers), config checking, missing images,
and the JAX-free list of texts the benchmarks need."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, shared_data
from eval import benchmarks
from eval.benchmarks import MissingImagesError, make_evaluator
from eval_fixtures import FakePredictor, stand_in_image

E = np.eye(4, dtype=np.float32)


def touch_images(folder, names):
  os.makedirs(folder, exist_ok=True)
  for i, n in enumerate(names):
    stand_in_image(os.path.join(folder, n), i, size=(8, 8))


def retrieval_setup(tmp_path, protocol):
  touch_images(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])
  caps = tmp_path / "caps.tsv"
  # "x" describes both a and b, word for word.
  caps.write_text("filename\tcaption_index\tcaption\na.jpg\t0\tx\na.jpg\t1\ty\nb.jpg\t0\tz\n"
                  "b.jpg\t1\tx\nc.jpg\t0\tw\n")
  spec = benchmarks.parse("r", {"type": "retrieval", "captions": str(caps),
                                "image_dir": str(tmp_path / "img"), "protocol": protocol})
  fake = FakePredictor(
      images={"a.jpg": E[0], "b.jpg": 0.8 * E[0] + 0.6 * E[2], "c.jpg": E[1]},
      texts={"x": E[0], "y": E[1], "z": E[2], "w": E[3]})
  return make_evaluator(spec), fake


def test_retrieval_standard_known_answer(tmp_path):
  ev, fake = retrieval_setup(tmp_path, "standard")
  out = ev.run(fake)
  # i2t: a -> x (1.0) hit; b -> x (0.8, its own caption too) hit; c -> w scores 0 while x, z
  #      tie at 0 and y scores 1: rank 3.
  # t2i (a-x, a-y, b-z, b-x, c-w): ranks 0, 2, 0, 1, 2 (w scores 0 on every image: ties).
  assert out == pytest.approx({"r/i2t_r1": 2 / 3, "r/i2t_r5": 1.0, "r/i2t_r10": 1.0,
                               "r/t2i_r1": 2 / 5, "r/t2i_r5": 1.0, "r/t2i_r10": 1.0,
                               "r/num_images": 3, "r/num_texts": 5})


def test_retrieval_lift_protocol_uses_first_caption_and_r1(tmp_path):
  ev, fake = retrieval_setup(tmp_path, "lift")
  # texts x, z, w. i2t: a hit; b: x (0.8) is now a negative above z (0.6): miss; c: ties: miss.
  # t2i: x -> a hit; z -> b hit; w -> all tie: miss.
  assert ev.run(fake) == pytest.approx({"r/i2t_r1": 1 / 3, "r/t2i_r1": 2 / 3,
                                        "r/num_images": 3, "r/num_texts": 3})


def test_sugarcrepe_known_answer_and_skip_missing(tmp_path):
  data = tmp_path / "sc"
  data.mkdir()
  rows = {"add_obj": {"0": ("a.jpg", "x", "y"), "1": ("b.jpg", "x", "z"), "2": ("c.jpg", "w", "w")},
          "swap_att": {"0": ("a.jpg", "y", "x"), "1": ("d.jpg", "x", "y")}}
  for subset, recs in rows.items():
    (data / f"{subset}.json").write_text(json.dumps(
        {k: {"filename": f, "caption": p, "negative_caption": n} for k, (f, p, n) in recs.items()}))
  touch_images(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])  # d.jpg is missing
  cfg = {"type": "sugarcrepe", "data_dir": str(data), "image_dir": str(tmp_path / "img"),
         "subsets": ["add_obj", "swap_att"]}
  with pytest.raises(MissingImagesError, match=r"1 of 4 images are missing from .*img.*d\.jpg"):
    make_evaluator(benchmarks.parse("sc", cfg))
  ev = make_evaluator(benchmarks.parse("sc", dict(cfg, skip_missing=True)))
  fake = FakePredictor(images={"a.jpg": E[0], "b.jpg": E[2], "c.jpg": E[1]},
                       texts={"x": E[0], "y": E[1], "z": E[2], "w": E[3]})
  # add_obj: a: x 1 > y 0 right; b: x 0 > z 1 wrong; c: w == w tie, wrong.
  # swap_att: a: y 0 > x 1 wrong (d.jpg skipped).
  assert ev.run(fake) == pytest.approx({
      "sc/add_obj": 1 / 3, "sc/swap_att": 0.0, "sc/mean": 1 / 6, "sc/num_samples": 4,
      "sc/skipped_images": 1, "sc/skipped_samples": 1})


def test_zeroshot_duplicate_class_names_are_positives_together(tmp_path):
  (tmp_path / "names.txt").write_text("cat\ndog\ncat\nbird\n")
  (tmp_path / "templates.txt").write_text("a {}\nthe {}\n")
  touch_images(tmp_path / "img", ["0.jpg", "1.jpg", "2.jpg", "3.jpg"])
  (tmp_path / "labels.tsv").write_text("0.jpg\t0\n1.jpg\t2\n2.jpg\t1\n3.jpg\t3\n")
  spec = benchmarks.parse("zs", {
      "type": "zeroshot", "labels": str(tmp_path / "labels.tsv"),
      "image_dir": str(tmp_path / "img"), "classnames": str(tmp_path / "names.txt"),
      "templates": str(tmp_path / "templates.txt"), "top_k": (1, 2)})
  ev = make_evaluator(spec)
  assert ev.class_positives == [[0, 2], [1], [0, 2], [3]]
  texts = {"a cat": E[0], "the cat": E[1], "a dog": E[2], "the dog": E[2],
           "a bird": E[3], "the bird": -E[3]}
  classifier = ev.classifier(FakePredictor({}, texts))
  s = 2 ** -0.5
  np.testing.assert_allclose(classifier[[0, 2]], [[s, s, 0, 0]] * 2, atol=1e-6)
  np.testing.assert_allclose(classifier[1], E[2], atol=1e-6)
  np.testing.assert_allclose(classifier[3], 0, atol=1e-6)  # "a bird" and "the bird" cancel
  images = {"0.jpg": E[0], "1.jpg": E[0] + E[1], "2.jpg": E[3], "3.jpg": E[3]}
  # 0, 1: "cat" (classes 0 and 2 tie, both positive) hits top-1; 2 (dog): dog scores 0, ties
  # the bird class and loses to cat -> rank 2; 3 (bird, zero classifier): cat 0 ... ties -> 3.
  assert ev.run(FakePredictor(images, texts)) == pytest.approx(
      {"zs/top1": 0.5, "zs/top2": 0.5, "zs/num_images": 4})


def test_zeroshot_image_folder_with_wnids(tmp_path):
  root = tmp_path / "val"
  for wnid, names in (("n02", ["x.JPEG", "y.JPEG"]), ("n01", ["z.JPEG"])):
    touch_images(root / wnid, names)
  (tmp_path / "wnids.txt").write_text("n01\nn02\nn03\n")
  (tmp_path / "names.txt").write_text("one\ntwo\nthree\n")
  (tmp_path / "t.txt").write_text("It is a photo of a {}\n")
  cfg = {"type": "zeroshot", "image_dir": str(root), "wnids": str(tmp_path / "wnids.txt"),
         "classnames": str(tmp_path / "names.txt"), "templates": str(tmp_path / "t.txt"),
         "protocol": "lift"}
  spec = benchmarks.parse("in", cfg)
  assert [(os.path.relpath(p, root), c) for p, c in spec.file_examples()] == [
      ("n01/z.JPEG", 0), ("n02/x.JPEG", 1), ("n02/y.JPEG", 1)]
  # Without wnids the sorted folders must cover every class name.
  with pytest.raises(benchmarks.BenchmarkConfigError, match="2 class folders.*3 names.*wnids"):
    benchmarks.parse("in", {k: v for k, v in cfg.items() if k != "wnids"}).file_examples()


def test_config_errors_name_the_benchmark_and_field(tmp_path):
  names = shared_data("imagenet", "classnames.txt")
  templates = shared_data("imagenet", "templates.txt")
  with pytest.raises(benchmarks.BenchmarkConfigError, match=r"'x'.*type must be one of"):
    benchmarks.parse("x", {"type": "vqa"})
  with pytest.raises(benchmarks.BenchmarkConfigError, match=r"'x'.*unknown field.*'image_folder'"):
    benchmarks.parse("x", {"type": "retrieval", "image_folder": "y"})
  with pytest.raises(benchmarks.BenchmarkConfigError, match="LIFT protocol uses one template"):
    benchmarks.parse("x", {"type": "zeroshot", "classnames": names, "templates": templates,
                           "image_dir": str(tmp_path), "protocol": "lift"})
  with pytest.raises(benchmarks.BenchmarkConfigError, match="captions .* does not exist"):
    benchmarks.parse("x", {"type": "retrieval", "captions": str(tmp_path / "c.json"),
                           "image_dir": str(tmp_path)})
  with pytest.raises(MissingImagesError, match="image folder .* does not exist"):
    make_evaluator(benchmarks.parse("x", {
        "type": "retrieval", "captions": shared_data("flickr8k_subset", "captions.tsv"),
        "image_dir": str(tmp_path / "nope")}))


def test_required_texts_without_jax():
  """The lists a LIFT bank must hold, from the real files, in a process that never imports JAX."""
  d = shared_data()
  code = f"""
import sys, json
from eval.benchmarks import required_texts
evals = {{"benchmarks": {{
  "sugarcrepe": {{"type": "sugarcrepe", "data_dir": "{d}/sugarcrepe", "image_dir": "/none"}},
  "imagenet": {{"type": "zeroshot", "image_dir": "/none", "protocol": "lift",
               "classnames": "{d}/imagenet/classnames_keras.txt",
               "templates": "{d}/imagenet/templates_lift.txt"}},
  "imagenet_openai": {{"type": "zeroshot", "image_dir": "/none", "protocol": "openai",
               "classnames": "{d}/imagenet/classnames.txt",
               "templates": "{d}/imagenet/templates.txt"}},
  "coco": {{"type": "retrieval", "protocol": "lift", "image_dir": "/none",
            "captions": "{d}/coco/annotations/captions_val2017.json"}},
  "coco_std": {{"type": "retrieval", "image_dir": "/none",
            "captions": "{d}/coco/annotations/captions_val2017.json"}},
  "flickr8k": {{"type": "retrieval", "image_dir": "/none",
                "captions": "{d}/flickr8k_subset/captions.tsv"}}}}}}
per = {{}}
from eval import benchmarks
for s in benchmarks.parse_all(evals["benchmarks"]):
  per[s.name] = len(s.texts())
texts = required_texts(evals)
assert "jax" not in sys.modules and "flax" not in sys.modules
print(json.dumps({{"per": per, "total": len(texts), "has": "It is a photo of a tench" in texts}}))
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True)
  got = json.loads(out.stdout)
  # SugarCrepe: 7511 records, 7511 positives + 7511 negatives minus repeats; ImageNet: 1000
  # Keras names with "crane" and "maillot" twice; OpenAI: 1000 names x 80 with 2 names twice.
  assert got["per"] == {"sugarcrepe": 11844, "imagenet": 998, "imagenet_openai": 79840,
                        "coco": 4959, "coco_std": 24794, "flickr8k": 4998}
  assert got["has"] and got["total"] <= sum(got["per"].values())
  # Every type module is a whole plug-in: a Spec and an Evaluator, found by its file name.
  assert set(benchmarks.TYPES) == {"sugarcrepe", "zeroshot", "retrieval", "long_retrieval"}
  for module in benchmarks.TYPES.values():
    assert callable(module.Spec) and callable(module.Evaluator)


def test_flickr30k_csv_test_split_and_coco_json_order(tmp_path):
  touch_images(tmp_path / "img", ["1.jpg", "2.jpg", "3.jpg"])
  csv_path = tmp_path / "flickr_annotations_30k.csv"
  csv_path.write_text(
      'raw,sentids,split,filename,img_id\n'
      '"[""one a"", ""one b""]","[0, 1]",test,1.jpg,0\n'
      '"[""two a"", ""two b""]","[2, 3]",train,2.jpg,1\n'
      '"[""three a"", ""three b""]","[4, 5]",test,3.jpg,2\n')
  ev = make_evaluator(benchmarks.parse("f30k", {
      "type": "retrieval", "captions": str(csv_path), "image_dir": str(tmp_path / "img"),
      "protocol": "lift"}))
  assert [os.path.basename(p) for p in ev.images] == ["1.jpg", "3.jpg"]
  assert ev._texts == ["one a", "three a"]
  every = make_evaluator(benchmarks.parse("f30k", {
      "type": "retrieval", "captions": str(csv_path), "image_dir": str(tmp_path / "img"),
      "split": ""}))
  assert len(every.images) == 3 and len(every.query_texts) == 6
  coco = tmp_path / "captions.json"
  coco.write_text(json.dumps({
      "images": [{"id": 30, "file_name": "3.jpg"}, {"id": 10, "file_name": "1.jpg"}],
      "annotations": [{"image_id": 30, "caption": "c3 first "}, {"image_id": 10, "caption": "c1"},
                      {"image_id": 30, "caption": "c3 second"}]}))
  ev = make_evaluator(benchmarks.parse("coco", {
      "type": "retrieval", "captions": str(coco), "image_dir": str(tmp_path / "img"),
      "protocol": "lift"}))
  # sorted image id, first caption in annotation order (stripped)
  assert [os.path.basename(p) for p in ev.images] == ["1.jpg", "3.jpg"]
  assert ev._texts == ["c1", "c3 first"]
