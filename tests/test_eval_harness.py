"""The evaluators end to end on the real reference data with randomly initialised tiny models:
right counts, every reported R@k, top-k and accuracy equal to a numpy reference computed on the
same full set (straight from the data files and the text bank's shards), zero-shot classifiers
built in chunks equal to one chunk, no crash on odd images.

COCO val2017 images are not in ../shared/data, so the SugarCrepe test scores the real JSON files
and a text bank of all their texts against stand-in images (random pixels) named like the COCO
files, for a sample of the filenames; the rest are skipped and counted.
"""

import json
import os

import numpy as np
import pytest

from conftest import require, shared_data
from eval import metrics, reference
from eval.runner import EvalRunner
from eval.predictor import TextBankError
from eval.benchmarks import required_texts
from eval.texts import SUGARCREPE_SUBSETS
from eval_fixtures import config, lift_model_config, clip_model_config, odd_images
from eval_fixtures import stand_in_image, tiny_model, write_bank
from lift_jax.data import records


def bank_embeddings(folder):
  """{text: L2-normalised float32 vector}, read straight from the bank's shards."""
  out = {}
  for path in records.list_shards(folder, records.BANK):
    for r in records.iter_records(path):
      v = records.decode_embedding(r)
      out[r["key"]] = (v / np.linalg.norm(v)).astype(np.float32)
  return out


def reference_recall(queries, candidates, positive, ks):
  """Recall@k with numpy: a query's rank is the number of non-positive candidates scoring at
  least as high as its best positive (``positive``: bool [queries, candidates])."""
  scores = np.asarray(queries, np.float32) @ np.asarray(candidates, np.float32).T
  best = np.where(positive, scores, -np.inf).max(axis=1)
  rank = np.sum((scores >= best[:, None]) & ~positive, axis=1)
  return {k: float(np.mean(rank < k)) for k in ks}


def check_flickr_recalls(out, name, predictor, embed_text, first_only, ks, limit=None):
  """Every recall ``name`` reported against numpy, from the caption file as written (filename,
  caption_index, caption; tab-separated) and embeddings of its images and texts. Identical
  caption strings are one candidate, positive for each of their images."""
  rows = tsv_rows(shared_data("flickr8k_subset", "captions.tsv"))
  files = list(dict.fromkeys(r["filename"] for r in rows))[:limit]
  used = [r for r in rows if r["filename"] in set(files)
          and (not first_only or r["caption_index"] == "0")]
  texts = list(dict.fromkeys(r["caption"] for r in used))
  text_emb = embed_text(texts)
  image_emb = predictor.embed_images(
      [os.path.join(shared_data("flickr8k_subset", "images"), f) for f in files])
  owner = np.asarray([files.index(r["filename"]) for r in used])
  i2t_positive = np.zeros((len(files), len(texts)), bool)
  for r, i in zip(used, owner):
    i2t_positive[i, texts.index(r["caption"])] = True
  query_emb = text_emb[[texts.index(r["caption"]) for r in used]]
  t2i_positive = owner[:, None] == np.arange(len(files))[None, :]
  for direction, expected in (
      ("t2i", reference_recall(query_emb, image_emb, t2i_positive, ks)),
      ("i2t", reference_recall(image_emb, text_emb, i2t_positive, ks))):
    for k, v in expected.items():
      assert out[f"{name}/{direction}_r{k}"] == pytest.approx(v, abs=1e-9), (name, direction, k)


def tsv_rows(path):
  with open(path, encoding="utf-8") as f:
    header, *rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  return [dict(zip(header, row)) for row in rows]


def lift_runner(tmp_path, benchmarks, **kw):
  cfg = config(lift_model_config(), benchmarks, text_bank=str(tmp_path / "bank"), **kw)
  write_bank(cfg.evals.text_bank, required_texts(cfg.evals))
  return EvalRunner(cfg, tiny_model("lift"))


def imagenet_benchmark(protocol="lift"):
  names, templates = (("classnames_keras.txt", "templates_lift.txt") if protocol == "lift"
                      else ("classnames.txt", "templates_simple7.txt"))
  return {"type": "zeroshot", "labels": shared_data("imagenet_samples", "labels.tsv"),
          "image_dir": shared_data("imagenet_samples", "images"),
          "classnames": shared_data("imagenet", names),
          "templates": shared_data("imagenet", templates),
          "protocol": "lift" if protocol == "lift" else "custom"}


def flickr_benchmark(protocol, **kw):
  return {"type": "retrieval", "captions": shared_data("flickr8k_subset", "captions.tsv"),
          "image_dir": shared_data("flickr8k_subset", "images"), "protocol": protocol, **kw}


def test_flickr8k_retrieval_lift_model(tmp_path):
  runner = lift_runner(tmp_path, {"flickr8k": flickr_benchmark("standard"),
                                  "flickr8k_lift": flickr_benchmark("lift")})
  out = runner.run()
  assert out["flickr8k/num_images"] == 1000 and out["flickr8k/num_texts"] == 5000
  assert out["flickr8k_lift/num_images"] == 1000 and out["flickr8k_lift/num_texts"] == 1000
  assert set(out) == {f"flickr8k/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {
      "flickr8k_lift/i2t_r1", "flickr8k_lift/t2i_r1"} | {
      f"{n}/num_{w}" for n in ("flickr8k", "flickr8k_lift") for w in ("images", "texts")}
  # chance: R@1 = 0.1% (i2t with 5 captions: 0.5%), R@10 = 1% (5%)
  assert out["flickr8k/t2i_r10"] < 0.04 and out["flickr8k/i2t_r10"] < 0.12
  assert out["flickr8k_lift/i2t_r1"] < 0.02 and out["flickr8k_lift/t2i_r1"] < 0.02
  assert runner.timings.keys() == {"flickr8k", "flickr8k_lift"}

  # Every reported recall against numpy on the full set, texts from the bank's own shards.
  bank = bank_embeddings(str(tmp_path / "bank"))
  embed_text = lambda texts: np.stack([bank[t] for t in texts])
  check_flickr_recalls(out, "flickr8k", runner.predictor, embed_text, False, (1, 5, 10))
  check_flickr_recalls(out, "flickr8k_lift", runner.predictor, embed_text, True, (1,))

  # The same ranks from the same embeddings by the numpy reference (a sample of the queries).
  ev = runner.evaluators[0]
  image_emb = runner.predictor.embed_images(ev.images)
  text_emb = runner.predictor.embed_texts(ev._texts)
  q = slice(0, 400)
  np.testing.assert_array_equal(
      np.asarray(metrics.ranks(text_emb[ev.query_texts[q]], image_emb, ev.query_images[q])),
      reference.ranks(text_emb[ev.query_texts[q]], image_emb, ev.query_images[q, None]))
  q = slice(0, 100)
  np.testing.assert_array_equal(
      np.asarray(metrics.ranks(image_emb[q], text_emb, ev.image_positives[q])),
      reference.ranks(image_emb[q], text_emb, ev.image_positives[q]))


def test_imagenet_samples_lift_model(tmp_path):
  runner = lift_runner(tmp_path, {"imagenet": imagenet_benchmark("lift")})
  out = runner.run()
  assert out["imagenet/num_images"] == 1000
  assert out["imagenet/top1"] <= 0.02 and out["imagenet/top5"] <= 0.05  # chance 0.1% / 0.5%
  # "crane" (134, 517) and "maillot" (638, 639) share prompts: positives together
  ev = runner.evaluators[0]
  assert ev.class_positives[134] == [134, 517] and ev.class_positives[639] == [638, 639]

  # top-k against numpy on all 1000 images: "It is a photo of a {}" with each Keras name, the
  # bank's vector of each prompt as the class embedding; classes with the same prompt are
  # positives together.
  rows = tsv_rows(shared_data("imagenet_samples", "labels.tsv"))
  names = open(shared_data("imagenet", "classnames_keras.txt"), encoding="utf-8").read()
  prompts = [f"It is a photo of a {n}" for n in names.splitlines()]
  assert len(prompts) == 1000
  bank = bank_embeddings(str(tmp_path / "bank"))
  classes = np.stack([bank[p] for p in prompts])
  image_emb = runner.predictor.embed_images(
      [os.path.join(shared_data("imagenet_samples", "images"), r["filename"]) for r in rows])
  label_prompt = np.asarray([prompts[int(r["class_index"])] for r in rows])
  positive = label_prompt[:, None] == np.asarray(prompts)[None, :]
  expected = reference_recall(image_emb, classes, positive, (1, 5))
  assert out["imagenet/top1"] == pytest.approx(expected[1], abs=1e-9)
  assert out["imagenet/top5"] == pytest.approx(expected[5], abs=1e-9)

  # The classifier built in several chunks of prompts (the last one padded) equals one chunk.
  whole = ev.classifier(runner.predictor)
  ev.CLASS_CHUNK_PROMPTS = 96  # 11 chunks: 10 of 96 classes and one of 40
  np.testing.assert_allclose(ev.classifier(runner.predictor), whole, rtol=0, atol=1e-6)
  assert runner.run() == out


def test_imagenet_samples_clip_model_and_prompt_ensembles(tmp_path, minilm_path):
  cfg = config(clip_model_config(), {"imagenet": imagenet_benchmark("lift"),
                                     "imagenet_7": imagenet_benchmark("simple7")},
               tokenizer=minilm_path)
  runner = EvalRunner(cfg, tiny_model("clip"))
  out = runner.run()
  for name in ("imagenet", "imagenet_7"):
    assert out[f"{name}/num_images"] == 1000
    assert out[f"{name}/top1"] <= 0.02 and out[f"{name}/top5"] <= 0.05
  # top-k of both benchmarks against numpy on all 1000 images: prompts from the files as written,
  # embedded by the text tower, averaged per class by the numpy reference; classes with the same
  # prompts are positives together.
  rows = tsv_rows(shared_data("imagenet_samples", "labels.tsv"))
  labels = [int(r["class_index"]) for r in rows]
  image_emb = runner.predictor.embed_images(
      [os.path.join(shared_data("imagenet_samples", "images"), r["filename"]) for r in rows])
  for name, names, templates in (("imagenet", "classnames_keras.txt", "templates_lift.txt"),
                                 ("imagenet_7", "classnames.txt", "templates_simple7.txt")):
    read = lambda f: open(shared_data("imagenet", f), encoding="utf-8").read().splitlines()
    prompts = [tuple(t.replace("{}", n) for t in read(templates)) for n in read(names)]
    flat = runner.predictor.embed_texts([p for ps in prompts for p in ps])
    classes = reference.class_embeddings(flat.reshape(len(prompts), len(prompts[0]), -1))
    positive = np.asarray([[prompts[c] == prompts[label] for c in range(len(prompts))]
                           for label in labels])
    expected = reference_recall(image_emb, classes, positive, (1, 5))
    assert out[f"{name}/top1"] == pytest.approx(expected[1], abs=1e-9), name
    assert out[f"{name}/top5"] == pytest.approx(expected[5], abs=1e-9), name

  # The 7-template classifier is the ensemble of its prompts' text-tower embeddings, also when it
  # is built in several chunks of prompts (7 chunks of 150 classes x 7 templates, the last one
  # padded; the run above used one chunk).
  ev = runner.evaluators[1]
  ev.CLASS_CHUNK_PROMPTS = 150 * 7
  np.testing.assert_allclose(ev.classifier(runner.predictor), classes, atol=1e-5)


def test_sugarcrepe_real_json_with_stand_in_images(tmp_path):
  data = shared_data("sugarcrepe")
  filenames = [f for f in open(os.path.join(data, "image_filenames.txt")).read().split() if f]
  sample = set(filenames[:60])
  images = tmp_path / "val2017"
  images.mkdir()
  for i, f in enumerate(sorted(sample)):
    stand_in_image(str(images / f), i)
  bench = {"type": "sugarcrepe", "data_dir": data, "image_dir": str(images), "skip_missing": True}
  runner = lift_runner(tmp_path, {"sugarcrepe": bench})
  assert len(runner.predictor.text_bank.index) == 11844  # every positive and negative text
  out = runner.run()
  expected = {}
  for subset in SUGARCREPE_SUBSETS:
    recs = json.load(open(os.path.join(data, f"{subset}.json"))).values()
    expected[subset] = sum(r["filename"] in sample for r in recs)
  assert out["sugarcrepe/num_samples"] == sum(expected.values())
  assert out["sugarcrepe/skipped_images"] == len(filenames) - 60
  assert out["sugarcrepe/skipped_samples"] == 7511 - sum(expected.values())
  accs = [out[f"sugarcrepe/{s}"] for s in SUGARCREPE_SUBSETS]
  assert all(0 <= a <= 1 for a in accs if expected)
  assert out["sugarcrepe/mean"] == pytest.approx(np.mean([a for a, s in zip(
      accs, SUGARCREPE_SUBSETS) if expected[s]]))
  total = sum(a * expected[s] for a, s in zip(accs, SUGARCREPE_SUBSETS) if expected[s])
  assert 0.3 < total / sum(expected.values()) < 0.7  # chance is 50%
  # Each subset's accuracy against numpy over the samples whose image is present:
  # correct iff sim(image, caption) > sim(image, negative_caption), strictly.
  bank = bank_embeddings(str(tmp_path / "bank"))
  files = sorted(sample)
  image_emb = dict(zip(files, runner.predictor.embed_images([str(images / f) for f in files])))
  for subset in SUGARCREPE_SUBSETS:
    recs = [r for r in json.load(open(os.path.join(data, f"{subset}.json"))).values()
            if r["filename"] in sample]
    correct = [float(image_emb[r["filename"]] @ bank[r["caption"]]) >
               float(image_emb[r["filename"]] @ bank[r["negative_caption"]]) for r in recs]
    assert out[f"sugarcrepe/{subset}"] == pytest.approx(np.mean(correct), abs=1e-9), subset


def test_missing_bank_text_fails_at_start(tmp_path):
  cfg = config(lift_model_config(), {"flickr8k": flickr_benchmark("lift")},
               text_bank=str(tmp_path / "bank"))
  texts = required_texts(cfg.evals)
  write_bank(cfg.evals.text_bank, texts[:-3])
  with pytest.raises(TextBankError, match=r"3 of 1000 texts are missing .*embed\.main"):
    EvalRunner(cfg, tiny_model("lift"))


def test_clip_retrieval_and_odd_images_in_an_image_folder(tmp_path, minilm_path):
  folder = tmp_path / "odd"
  paths = odd_images(str(folder / "things"))
  os.makedirs(folder / "other")
  stand_in_image(str(folder / "other" / "x.jpg"), 3)
  (tmp_path / "names.txt").write_text("other thing\nodd thing\n")
  (tmp_path / "t.txt").write_text("a photo of a {}.\n")
  caps = tmp_path / "caps.jsonl"
  caps.write_text("".join(json.dumps({"filename": os.path.relpath(p, folder),
                                      "captions": [f"picture {i}", f"image number {i}"]}) + "\n"
                          for i, p in enumerate(paths)))
  cfg = config(clip_model_config(), {
      "odd_cls": {"type": "zeroshot", "image_dir": str(folder), "top_k": [1],
                  "classnames": str(tmp_path / "names.txt"), "templates": str(tmp_path / "t.txt")},
      "odd_ret": {"type": "retrieval", "captions": str(caps), "image_dir": str(folder)},
      "flickr_clip": flickr_benchmark("standard", limit=200)}, tokenizer=minilm_path,
      batch_size=16)
  runner = EvalRunner(cfg, tiny_model("clip"))
  out = runner.run()
  assert out["odd_cls/num_images"] == len(paths) + 1 and 0 <= out["odd_cls/top1"] <= 1
  assert out["odd_ret/num_images"] == len(paths) and out["odd_ret/num_texts"] == 2 * len(paths)
  assert out["flickr_clip/num_images"] == 200 and out["flickr_clip/num_texts"] == 1000
  assert out["flickr_clip/t2i_r10"] < 0.15  # chance 5%
  assert all(np.isfinite(v) for v in out.values())
  # Flickr8k through the text tower, first 200 images with all their captions, against numpy.
  check_flickr_recalls(out, "flickr_clip", runner.predictor, runner.predictor.embed_texts, False,
                       (1, 5, 10), limit=200)


def test_image_shards_source_equals_image_files(tmp_path):
  """The synthetic set's image shards (records with caption and label) score like the same
  images as files."""
  import io

  from PIL import Image

  from lift_jax.data import records

  (tmp_path / "files").mkdir()
  rng = np.random.default_rng(0)
  recs, lines, labels = [], ["filename\tcaption_index\tcaption"], ["filename\tclass_index"]
  for i in range(13):
    img = Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    img.save(tmp_path / "files" / f"{i}.png")
    caption = f"a scene with {i % 5} shapes" + (" and more" if i % 2 else "")
    recs.append(records.image_record(f"k{i}", buf.getvalue(), caption, label=i % 3))
    lines.append(f"{i}.png\t0\t{caption}")
    labels.append(f"{i}.png\t{i % 3}")
  (tmp_path / "shards").mkdir()
  records.write_shard(str(tmp_path / "shards" / records.shard_name(records.IMAGES, 0, 1)), recs)
  (tmp_path / "caps.tsv").write_text("\n".join(lines) + "\n")
  (tmp_path / "labels.tsv").write_text("\n".join(labels) + "\n")
  (tmp_path / "names.txt").write_text("zero\none\ntwo\n")
  (tmp_path / "t.txt").write_text("a {}\nthe {}\n")
  common = {"classnames": str(tmp_path / "names.txt"), "templates": str(tmp_path / "t.txt"),
            "type": "zeroshot", "top_k": [1, 2]}
  runner = lift_runner(tmp_path, {
      "ret_shards": {"type": "retrieval", "shards": str(tmp_path / "shards")},
      "ret_files": {"type": "retrieval", "captions": str(tmp_path / "caps.tsv"),
                    "image_dir": str(tmp_path / "files")},
      "cls_shards": dict(common, shards=str(tmp_path / "shards")),
      "cls_files": dict(common, labels=str(tmp_path / "labels.tsv"),
                        image_dir=str(tmp_path / "files"))}, batch_size=8)
  out = runner.run()
  for a, b in (("ret_shards", "ret_files"), ("cls_shards", "cls_files")):
    ours = {k.split("/")[1]: v for k, v in out.items() if k.startswith(a + "/")}
    assert ours == pytest.approx({k.split("/")[1]: v for k, v in out.items()
                                  if k.startswith(b + "/")})
  assert out["ret_shards/num_images"] == 13 and out["cls_shards/num_images"] == 13


@pytest.mark.slow
def test_tfds_imagenet_source_with_mock_data(tmp_path):
  tfds = require("tensorflow_datasets")
  bench = dict(imagenet_benchmark("lift"), tfds_data_dir=str(tmp_path / "tfds"), limit=20)
  del bench["labels"], bench["image_dir"]
  cfg = config(lift_model_config(), {"imagenet": bench}, text_bank=str(tmp_path / "bank"))
  write_bank(cfg.evals.text_bank, required_texts(cfg.evals))
  runner = EvalRunner(cfg, tiny_model("lift"))
  from eval.benchmarks import BenchmarkConfigError

  with pytest.raises(BenchmarkConfigError, match="not prepared in .*tfds"):
    runner.run()
  with tfds.testing.mock_data(num_examples=30):
    out = runner.run()
  assert out["imagenet/num_images"] == 20 and 0 <= out["imagenet/top5"] <= 1


@pytest.mark.slow
def test_imagenet_openai_protocol_clip(minilm_path):
  """OpenAI's protocol: 1000 curated names x 80 templates through the text tower."""
  bench = dict(imagenet_benchmark("lift"), protocol="openai",
               classnames=shared_data("imagenet", "classnames.txt"),
               templates=shared_data("imagenet", "templates.txt"))
  cfg = config(clip_model_config(), {"imagenet_openai": bench}, tokenizer=minilm_path,
               batch_size=512)
  runner = EvalRunner(cfg, tiny_model("clip"))
  out = runner.run()
  assert out["imagenet_openai/num_images"] == 1000 and out["imagenet_openai/top1"] <= 0.02
  print("openai protocol seconds", runner.timings)
