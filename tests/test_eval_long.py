"""Long-caption retrieval (Urban1k, DOCCI, ShareGPT4V-1k) on tiny fixtures written in each
benchmark's released layout: hand-computed recall, the subset each benchmark defines, clear
errors, the sharded runner with LIFT (text bank length reported) and CLIP (captions cut by the
context counted), and the configs' if-present rule."""

import json
import logging
import os
import types

import numpy as np
import pytest

from eval import benchmarks
from eval.benchmarks import MissingImagesError, long_retrieval, make_evaluator, required_texts
from eval.runner import EvalRunner
from eval_fixtures import (FakePredictor, clip_model_config, config, lift_model_config,
                           stand_in_image, tiny_model, write_bank)

E = np.eye(4, dtype=np.float32)
# Three images and their long captions; the embeddings make the answer computable by hand.
CAPTIONS = {"a": "A long description of the first picture. It has a red square on the left.",
            "b": "The second picture shows a blue circle above a green triangle, small.",
            "c": "A third scene: nothing but a grey background with no objects at all."}
IMAGE_EMB = {"a": E[0], "b": 0.8 * E[0] + 0.6 * E[2], "c": E[1]}
TEXT_EMB = {"a": E[0], "b": E[2], "c": E[3]}


def write_urban1k(root, ids=("a", "b", "c")):
  os.makedirs(root / "image")
  os.makedirs(root / "caption")
  for i, k in enumerate(ids):
    stand_in_image(str(root / "image" / f"{k}.jpg"), i, size=(8, 8))
    # Only the first line is the caption (Long-CLIP reads readlines()[0]).
    (root / "caption" / f"{k}.txt").write_text(CAPTIONS[k] + "\nsecond line, not read\n")
  return root


def write_docci(root, ids=("a", "b", "c")):
  os.makedirs(root / "images")
  rows = [{"example_id": "train_00001", "split": "train", "image_file": "train_00001.jpg",
           "description": "a training description that is not scored"}]
  for i, k in enumerate(ids):
    stand_in_image(str(root / "images" / f"test_{k}.jpg"), i, size=(8, 8))
    rows.append({"example_id": f"test_{k}", "split": "test", "image_file": f"test_{k}.jpg",
                 "description": CAPTIONS[k]})
  rows.append({"example_id": "qual_dev_00001", "split": "qual_dev",
               "image_file": "qual_dev_00001.jpg", "description": "not scored either"})
  (root / long_retrieval.DOCCI_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
  return root


def write_sharegpt4v(root, ids=("a", "b", "c"), extra=2):
  os.makedirs(root / "coco" / "train2017")
  records = []
  for i, k in enumerate(ids):
    stand_in_image(str(root / "coco" / "train2017" / f"{k}.jpg"), i, size=(8, 8))
    first, rest = CAPTIONS[k].split(" ", 1)
    records.append({"id": k, "image": f"coco/train2017/{k}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in this image?"},
        {"from": "gpt", "value": f"{first}\n{rest}"}]})  # the newline becomes a space
  for j in range(extra):  # after the benchmark's records: not part of it
    records.append({"id": f"x{j}", "image": f"sam/images/x{j}.jpg", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"unused {j}"}]})
  (root / long_retrieval.SHAREGPT4V_FILE).write_text(json.dumps(records))
  return root


WRITERS = {"urban1k": write_urban1k, "docci": write_docci, "sharegpt4v": write_sharegpt4v}


def spec_for(tmp_path, fmt, **kw):
  root = WRITERS[fmt](tmp_path / fmt)
  extra = {"first": 3} if fmt == "sharegpt4v" else {}
  return benchmarks.parse(fmt, {"type": "long_retrieval", "format": fmt, "data_dir": str(root),
                                **extra, **kw})


def fake_predictor(spec):
  by_caption = {CAPTIONS[k]: k for k in CAPTIONS}
  pairs = spec.image_captions()
  images = {os.path.basename(p): IMAGE_EMB[by_caption[c[0]]] for p, c in pairs}
  return FakePredictor(images, {CAPTIONS[k]: TEXT_EMB[k] for k in CAPTIONS})


@pytest.mark.parametrize("fmt", ["urban1k", "docci", "sharegpt4v"])
def test_known_answer_in_each_released_layout(tmp_path, fmt):
  spec = spec_for(tmp_path, fmt)
  assert sorted(c for _, (c,) in spec.image_captions()) == sorted(CAPTIONS.values())
  assert spec.texts() == [c for _, (c,) in spec.image_captions()]
  ev = make_evaluator(spec)
  out = ev.run(fake_predictor(spec))
  # i2t: a -> its caption (1.0) hit; b -> a's caption 0.8 above its own 0.6: rank 2; c scores 0
  #      against every caption: a tie, counted as a miss.  R@1 1/3, R@5 3/3.
  # t2i: a's caption -> a (1.0) hit; b's caption -> b (0.6) hit; c's -> all 0: miss. R@1 2/3.
  assert out == pytest.approx({f"{fmt}/i2t_r1": 1 / 3, f"{fmt}/i2t_r5": 1.0,
                               f"{fmt}/t2i_r1": 2 / 3, f"{fmt}/t2i_r5": 1.0,
                               f"{fmt}/num_images": 3, f"{fmt}/num_texts": 3})


def test_subsets_each_benchmark_defines(tmp_path):
  docci = spec_for(tmp_path, "docci")
  assert [os.path.basename(p) for p, _ in docci.image_captions()] == [
      "test_a.jpg", "test_b.jpg", "test_c.jpg"]  # the test split only, in file order
  share = spec_for(tmp_path, "sharegpt4v")
  pairs = share.image_captions()
  assert len(pairs) == 3 and "unused 0" not in share.texts()  # the first N records only
  assert pairs[0] == (str(tmp_path / "sharegpt4v" / "coco" / "train2017" / "a.jpg"),
                      [CAPTIONS["a"]])
  more = benchmarks.parse("s", {"type": "long_retrieval", "format": "sharegpt4v",
                                "data_dir": str(tmp_path / "sharegpt4v"), "first": 4})
  assert more.texts()[-1] == "unused 0"
  urban = spec_for(tmp_path, "urban1k", limit=2)
  assert [c for _, (c,) in urban.image_captions()] == [CAPTIONS["a"], CAPTIONS["b"]]


def test_bad_files_are_named(tmp_path):
  spec = spec_for(tmp_path, "docci")
  with open(spec.captions, "a", encoding="utf-8") as f:
    f.write(json.dumps({"split": "test", "image_file": "x.jpg"}) + "\n")
  with pytest.raises(benchmarks.BenchmarkConfigError, match=r"line 6 .*'description'"):
    spec.image_captions()
  with pytest.raises(benchmarks.BenchmarkConfigError, match="at least first=1000"):
    benchmarks.parse("s", {"type": "long_retrieval", "format": "sharegpt4v",
                           "data_dir": str(write_sharegpt4v(tmp_path / "s"))}).image_captions()
  with pytest.raises(benchmarks.BenchmarkConfigError, match="format must be one of"):
    benchmarks.parse("u", {"type": "long_retrieval", "format": "urban", "data_dir": "x"})
  urban = spec_for(tmp_path, "urban1k")
  os.remove(os.path.join(urban.image_dir, "b.jpg"))
  with pytest.raises(MissingImagesError, match="1 of 3 images are missing .*b.jpg"):
    make_evaluator(urban)
  skipped = make_evaluator(benchmarks.parse("u", {"type": "long_retrieval", "format": "urban1k",
                                                  "data_dir": str(tmp_path / "urban1k"),
                                                  "skip_missing": True}))
  assert len(skipped.images) == 2 and skipped.skipped_images == 1


def test_sharded_runner_lift_reports_the_bank_length(tmp_path, caplog):
  benches = {f: {"type": "long_retrieval", "format": f, "data_dir": str(WRITERS[f](tmp_path / f)),
                 **({"first": 3} if f == "sharegpt4v" else {})} for f in WRITERS}
  cfg = config(lift_model_config(), benches, text_bank=str(tmp_path / "bank"), batch_size=16)
  write_bank(cfg.evals.text_bank, required_texts(cfg.evals))
  manifest = json.loads((tmp_path / "bank" / "manifest.json").read_text())
  manifest["max_length"] = 77  # embedded at the short length
  (tmp_path / "bank" / "manifest.json").write_text(json.dumps(manifest))
  runner = EvalRunner(cfg, tiny_model("lift"))
  with caplog.at_level(logging.WARNING):
    out = runner.run()
  for f in WRITERS:
    assert out[f"{f}/num_images"] == 3 and out[f"{f}/num_bank_max_tokens"] == 77
    assert 0 <= out[f"{f}/i2t_r1"] <= 1
  assert "re-embed them with --config.max_length=512" in caplog.text
  # Same images, same captions: the three benchmarks score identically.
  assert out["urban1k/t2i_r1"] == out["docci/t2i_r1"] == out["sharegpt4v/t2i_r1"]


def test_sharded_runner_clip_counts_captions_cut_by_the_context(tmp_path, minilm_path):
  root = write_urban1k(tmp_path / "urban1k")
  # MiniLM's WordPiece: "red" is one token; [CLS] + 30 words + [SEP] = 32 > the context of 24.
  (root / "caption" / "a.txt").write_text(" ".join(["red"] * 30) + "\n")
  (root / "caption" / "b.txt").write_text(" ".join(["red"] * 22) + "\n")  # 24 tokens: fits
  cfg = config(clip_model_config(), {"urban1k": {"type": "long_retrieval", "format": "urban1k",
                                                 "data_dir": str(root)}},
               tokenizer=minilm_path, batch_size=16)
  out = EvalRunner(cfg, tiny_model("clip")).run()
  assert out["urban1k/num_texts_truncated"] == 1 and out["urban1k/num_context_tokens"] == 24
  assert out["urban1k/num_images"] == 3


def test_configs_evaluate_long_captions_when_present(tmp_path):
  from lift_jax.tools.config_reference import load

  for name in ("vitb16_recap", "clip_vitb16_recap"):
    assert {"urban1k", "docci", "sharegpt4v"} <= set(load(name).evals.benchmarks)
  c = load("vitb16_recap")
  write_urban1k(tmp_path / "urban1k")
  c.evals.data_root = str(tmp_path)
  resolved, dropped = benchmarks.resolve_paths(c)
  assert dropped == []
  # Only Urban1k is under data_root; the others (and the short-caption suites, not optional)...
  assert "urban1k" in resolved.evals.benchmarks
  assert "docci" not in resolved.evals.benchmarks and "sharegpt4v" not in resolved.evals.benchmarks
  assert "coco" in resolved.evals.benchmarks
  spec = benchmarks.parse("urban1k", resolved.evals.benchmarks["urban1k"])
  assert spec.image_dir == str(tmp_path / "urban1k" / "image") and len(spec.texts()) == 3


# ------------------------------------------------------------------------------------------------
# Each released layout with every public variant beside the benchmark's rows, read into
# hand-written (image, caption) pairs.


def test_urban1k_reads_the_first_line_of_each_txt_only(tmp_path):
  root = tmp_path / "Urban1k"
  os.makedirs(root / "caption")
  files = {"10.txt": "A tram in the rain.\nThe second line is not part of it.\n",
           "2.txt": "  Two bikes by a wall, one red.  \r\nsecond line\r\n",
           "3.txt": "A bridge at dusk",  # no newline at the end of the file
           "notes.md": "not a caption\n", "2.txt.orig": "a backup, not a caption\n"}
  for name, text in files.items():
    with open(root / "caption" / name, "w", encoding="utf-8", newline="") as f:
      f.write(text)
  image = str(root / "image")
  spec = benchmarks.parse("u", {"type": "long_retrieval", "format": "urban1k",
                                "data_dir": str(root)})
  assert spec.image_captions() == [  # in file-name order
      (f"{image}/10.jpg", ["A tram in the rain."]),
      (f"{image}/2.jpg", ["Two bikes by a wall, one red."]),
      (f"{image}/3.jpg", ["A bridge at dusk"])]
  (root / "caption" / "5.txt").write_text("\nthe caption is on the second line\n")
  with pytest.raises(benchmarks.BenchmarkConfigError,
                     match=r"^benchmark 'u': .*5\.txt has no caption on its first line$"):
    spec.image_captions()
  for name in os.listdir(root / "caption"):
    os.remove(root / "caption" / name)
  with pytest.raises(benchmarks.BenchmarkConfigError) as err:
    spec.image_captions()
  assert str(err.value) == f"benchmark 'u': {root / 'caption'} holds no <image>.txt captions"


def test_docci_takes_exactly_the_named_split(tmp_path):
  """DOCCI's public splits are train, test, qual_dev and qual_test: "test" is inside
  "qual_test", so only an exact comparison keeps the two apart."""
  root = tmp_path / "docci"
  os.makedirs(root)
  rows = [("train_00001", "train", "A kitchen."), ("qual_test_00001", "qual_test", "Q test 1."),
          ("test_00001", "test", 'A "quoted" sign\u2014caf\u00e9.'),
          ("qual_dev_00001", "qual_dev", "Q dev 1."), ("test_00002", "test", "Two cats."),
          ("qual_test_00002", "qual_test", "Q test 2."), ("train_00002", "train", "A road.")]
  lines = [json.dumps({"example_id": i, "split": s, "image_file": f"{i}.jpg", "description": d})
           for i, s, d in rows]
  lines.insert(3, "")  # a blank line between rows is skipped
  (root / long_retrieval.DOCCI_FILE).write_text("\n".join(lines) + "\n\n", encoding="utf-8")
  images = str(root / "images")

  def pairs(split):
    return benchmarks.parse("d", {"type": "long_retrieval", "format": "docci",
                                  "data_dir": str(root), "split": split}).image_captions()

  assert pairs("test") == [(f"{images}/test_00001.jpg", ['A "quoted" sign\u2014caf\u00e9.']),
                           (f"{images}/test_00002.jpg", ["Two cats."])]
  assert pairs("qual_test") == [(f"{images}/qual_test_00001.jpg", ["Q test 1."]),
                                (f"{images}/qual_test_00002.jpg", ["Q test 2."])]
  assert pairs("train") == [(f"{images}/train_00001.jpg", ["A kitchen."]),
                            (f"{images}/train_00002.jpg", ["A road."])]
  with pytest.raises(benchmarks.BenchmarkConfigError, match="^benchmark 'd': .* no rows with "
                     "split 'dev'$"):
    pairs("dev")
  with open(root / long_retrieval.DOCCI_FILE, "a", encoding="utf-8") as f:
    f.write(json.dumps({"split": "test", "image_file": "x.jpg"}) + "\n")
  with pytest.raises(benchmarks.BenchmarkConfigError) as err:
    pairs("test")
  assert str(err.value) == (
      f"benchmark 'd': {root / long_retrieval.DOCCI_FILE} line 10 is not a DOCCI record with "
      "'split', 'image_file' and 'description' (KeyError: 'description')")


def test_sharegpt4v_takes_the_first_records_and_the_first_answer(tmp_path):
  root = tmp_path / "sharegpt4v"
  os.makedirs(root)

  def record(i, image, answer, *more):
    return {"id": i, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat do you see happening in this image?"},
        {"from": "gpt", "value": answer}, *more]}

  data = [record("a", "coco/train2017/000000000009.jpg", "A plate.\nIt holds bread.\n\nEnd."),
          record("b", "sam/images/sa_1.jpg", "A street.",
                 {"from": "human", "value": "And the sky?"}, {"from": "gpt", "value": "Blue."}),
          record("c", "llava/llava_pretrain/images/00000/1.jpg", "A dog\nrunning."),
          record("d", "wikiart/images/e.jpg", "Decoy after the benchmark's records."),
          record("e", "share_textvqa/images/f.jpg", "Another decoy.")]
  (root / long_retrieval.SHAREGPT4V_FILE).write_text(json.dumps(data), encoding="utf-8")

  def pairs(first):
    return benchmarks.parse("s", {"type": "long_retrieval", "format": "sharegpt4v",
                                  "data_dir": str(root), "first": first}).image_captions()

  assert pairs(3) == [  # each newline becomes one space
      (f"{root}/coco/train2017/000000000009.jpg", ["A plate. It holds bread.  End."]),
      (f"{root}/sam/images/sa_1.jpg", ["A street."]),
      (f"{root}/llava/llava_pretrain/images/00000/1.jpg", ["A dog running."])]
  assert [c for _, (c,) in pairs(5)][3:] == ["Decoy after the benchmark's records.",
                                            "Another decoy."]  # first == all records: allowed
  path = root / long_retrieval.SHAREGPT4V_FILE
  with pytest.raises(benchmarks.BenchmarkConfigError) as err:
    pairs(6)
  assert str(err.value) == (f"benchmark 's': {path} must be a JSON list of at least first=6 "
                            "records, it has 5")
  path.write_text(json.dumps(data[:1] + [{"image": "x.jpg", "conversations": [{"value": "q"}]}]))
  with pytest.raises(benchmarks.BenchmarkConfigError) as err:
    pairs(2)
  assert str(err.value) == (f"benchmark 's': {path} record 1 lacks 'image' or the caption at "
                            "conversations[1].value")
  path.write_text(json.dumps({"records": data}))
  with pytest.raises(benchmarks.BenchmarkConfigError) as err:
    pairs(2)
  assert str(err.value).endswith("must be a JSON list of at least first=2 records, it has dict")
  path.write_text(json.dumps(data)[:-1])  # cut short
  with pytest.raises(benchmarks.BenchmarkConfigError,
                     match=f"^benchmark 's': {path} is not valid JSON \\(Expecting"):
    pairs(2)


def test_spec_fields_and_their_errors(tmp_path):
  root = write_urban1k(tmp_path / "urban1k")
  base = {"type": "long_retrieval", "format": "urban1k", "data_dir": str(root)}
  for ks in ("1, 10", [1, 10], ("1", "10")):
    assert benchmarks.parse("u", {**base, "ks": ks}).ks == (1, 10)
  # limit: the first N images; 0 or None: all of them.
  assert len(benchmarks.parse("u", {**base, "limit": 0}).image_captions()) == 3
  assert len(benchmarks.parse("u", {**base, "limit": 1}).image_captions()) == 1
  with pytest.raises(benchmarks.BenchmarkConfigError) as err:
    benchmarks.parse("u", {**base, "data_dir": None})
  assert str(err.value) == "benchmark 'u': field 'data_dir' is required"
  with pytest.raises(benchmarks.BenchmarkConfigError) as err:
    benchmarks.parse("d", {**base, "format": "docci"})
  assert str(err.value) == (f"benchmark 'd': captions {root / long_retrieval.DOCCI_FILE} does "
                            "not exist")


class ModePredictor(FakePredictor):
  """The fixtures' embeddings, with the attributes the evaluator reads of a real Predictor."""

  def __init__(self, spec, mode, tokenizer=None, context_length=None, text_bank=None):
    base = fake_predictor(spec)
    super().__init__(base.images, base.texts)
    self.mode, self.tokenizer, self.context_length = mode, tokenizer, context_length
    self.text_bank = text_bank


class WordCounter:
  """A tokenizer whose length of a text is its number of words."""

  def __init__(self):
    self.calls = 0

  def lengths(self, texts):
    self.calls += 1
    return [len(t.split()) for t in texts]


def test_long_captions_cut_by_the_context_are_counted_once_and_logged(tmp_path, caplog):
  spec = spec_for(tmp_path, "urban1k")
  ev = make_evaluator(spec)
  words = sorted(len(c.split()) for c in CAPTIONS.values())  # 12, 13, 15
  tokenizer = WordCounter()
  predictor = ModePredictor(spec, "clip", tokenizer, context_length=words[1])
  with caplog.at_level(logging.INFO, logger=long_retrieval.__name__):
    for _ in range(2):
      out = ev.run(predictor)
      assert out["urban1k/num_texts_truncated"] == 1 and out["urban1k/num_context_tokens"] == 13
  assert tokenizer.calls == 1  # the captions and the tokenizer never change
  assert ("urban1k: 1 of 3 captions are longer than the text tower's context (13 tokens) and "
          "were cut") in caplog.messages
  # A tokenizer that cannot count tokens: nothing reported, the recall still is.
  out = ev.run(ModePredictor(spec, "clip", object(), context_length=13))
  assert "urban1k/num_texts_truncated" not in out and out["urban1k/num_images"] == 3


@pytest.mark.parametrize("made_at, warned", [(511, True), (512, False), (None, False)])
def test_a_bank_embedded_shorter_than_the_captions_need_is_reported(tmp_path, caplog, made_at,
                                                                    warned):
  spec = spec_for(tmp_path, "docci")
  assert spec.max_length == 512
  manifest = {} if made_at is None else {"max_length": made_at}
  bank = types.SimpleNamespace(manifest=manifest, folder="/banks/docci")
  with caplog.at_level(logging.WARNING, logger=long_retrieval.__name__):
    out = make_evaluator(spec).run(ModePredictor(spec, "lift", text_bank=bank))
  assert out.get("docci/num_bank_max_tokens") == made_at
  warning = ("docci: the text bank /banks/docci embedded texts at max_length 511, shorter than "
             "the 512 this benchmark's captions call for; re-embed them with "
             "--config.max_length=512")
  assert caplog.messages == ([warning] if warned else [])
  # No text bank (a LIFT model scoring texts some other way): nothing about one.
  out = make_evaluator(spec).run(ModePredictor(spec, "lift", text_bank=None))
  assert "docci/num_bank_max_tokens" not in out and out["docci/num_images"] == 3
