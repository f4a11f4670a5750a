"""Text lists for evaluation banks (the same strings eval.texts scores) and the text-bank mode
of the job (keyed by exact text, readable by records.load_text_bank)."""

import json
import os

import numpy as np
import pytest

from conftest import shared_data
from embed import banks, encoders, job
from embed.errors import EmbedError
from eval import texts as eval_texts
from lift_jax.data import records
from test_embed_support import minilm_config


def test_imagenet_prompts_both_protocols():
  folder = shared_data("imagenet")
  lift = banks.imagenet_prompts(folder, "lift")
  assert lift[:2] == ["It is a photo of a tench", "It is a photo of a goldfish"]
  assert len(lift) == 998  # "crane" and "maillot" each name two classes: one text each
  assert lift == eval_texts.prompt_texts(f"{folder}/classnames_keras.txt",
                                         f"{folder}/templates_lift.txt")
  openai = banks.imagenet_prompts(folder, "openai")
  assert openai == eval_texts.prompt_texts(f"{folder}/classnames.txt", f"{folder}/templates.txt")
  assert "a bad photo of a tench." in openai and len(openai) == 998 * 80
  both = banks.imagenet_prompts(folder, "both")
  assert both == eval_texts.unique(lift + openai)
  with pytest.raises(ValueError, match="unknown ImageNet protocol"):
    banks.imagenet_prompts(folder, "simple")


def test_coco_flickr_and_sugarcrepe_texts():
  coco = shared_data("coco", "annotations", "captions_val2017.json")
  first = banks.retrieval_captions(coco, first_only=True)
  every = banks.retrieval_captions(coco)
  assert first == eval_texts.caption_texts(coco, first_only=True) and len(first) <= 5000
  assert set(first) <= set(every) and len(every) > 24000
  flickr = shared_data("flickr8k_subset", "captions.tsv")
  assert banks.retrieval_captions(flickr) == eval_texts.caption_texts(flickr)
  sugar = shared_data("sugarcrepe")
  texts = banks.sugarcrepe_texts(sugar)
  assert texts == eval_texts.sugarcrepe_texts(sugar)
  assert set(texts) >= {r["negative_caption"] for r in
                        json.load(open(f"{sugar}/swap_obj.json", encoding="utf-8")).values()}


def test_flickr30k_csv_and_jsonl_layouts(tmp_path):
  csv_path = tmp_path / "flickr_annotations_30k.csv"
  csv_path.write_text('raw,sentids,split,filename,img_id\n'
                      '"[""A man ."", ""A tall man .""]","[0, 1]",test,1.jpg,0\n'
                      '"[""A dog .""]","[2]",train,2.jpg,1\n', encoding="utf-8")
  assert banks.retrieval_captions(str(csv_path), split="test") == ["A man .", "A tall man ."]
  assert banks.retrieval_captions(str(csv_path), first_only=True) == ["A man .", "A dog ."]
  jsonl = tmp_path / "caps.jsonl"
  jsonl.write_text('{"image": "a.jpg", "captions": ["x", "y"]}\n{"filename": "b.jpg", '
                   '"caption": "z"}\n', encoding="utf-8")
  assert banks.retrieval_captions(str(jsonl)) == ["x", "y", "z"]


def synthetic_eval_dir(root):
  """The layout of the project's synthetic evaluation set, in miniature."""
  comp = root / "compositional"
  comp.mkdir(parents=True)
  (comp / "swap_color.json").write_text(json.dumps({
      "0": {"filename": "0.png", "caption": "a red circle left of a blue square",
            "negative_caption": "a blue circle left of a red square"},
      "1": {"filename": "1.png", "caption": "a green triangle",
            "negative_caption": "a red circle left of a blue square"}}), encoding="utf-8")
  cls = root / "classification"
  cls.mkdir()
  (cls / "classnames.txt").write_text("circle\nsquare\n", encoding="utf-8")
  (cls / "templates.txt").write_text("a photo of a {}.\na drawing of a {}\n", encoding="utf-8")
  ret = root / "retrieval"
  ret.mkdir()
  (ret / "captions.tsv").write_text("filename\tcaption_index\tcaption\n0.png\t0\ta green "
                                    "triangle\n0.png\t1\tone green shape\n", encoding="utf-8")


def test_eval_dir_texts_and_cli(tmp_path):
  synthetic_eval_dir(tmp_path / "eval")
  texts = banks.eval_dir_texts(str(tmp_path / "eval"))
  assert texts == [
      "a red circle left of a blue square", "a blue circle left of a red square",
      "a green triangle", "a photo of a circle.", "a drawing of a circle",
      "a photo of a square.", "a drawing of a square", "one green shape"]
  out = tmp_path / "texts.json"
  assert banks.main(["--eval_dir", str(tmp_path / "eval"), "--out", str(out)]) == 0
  assert json.loads(out.read_text(encoding="utf-8")) == texts
  lines = tmp_path / "texts.txt"
  assert banks.main(["--classnames", str(tmp_path / "eval/classification/classnames.txt"),
                     "--templates", str(tmp_path / "eval/classification/templates.txt"),
                     "--captions", str(tmp_path / "eval/retrieval/captions.tsv"),
                     "--first_caption_only", "--out", str(lines)]) == 0
  assert lines.read_text(encoding="utf-8").splitlines() == texts[3:7] + ["a green triangle"]
  assert banks.main(["--sugarcrepe", str(tmp_path / "missing"), "--out", str(out)]) == 1
  with pytest.raises(ValueError, match="line break"):
    banks.write_texts(str(tmp_path / "x.txt"), ["two\nlines"])


def test_text_bank_mode(tmp_path, minilm_path):
  texts = ["a photo of a dog", "a photo of a cat", "a photo of a dog", "",
           "two lines:\nsecond", "caf\u00e9 \u2014 Zürich", "  padded  "]
  path = tmp_path / "texts.json"
  banks.write_texts(str(path), texts)
  out = str(tmp_path / "bank")
  summary = job.run(minilm_config(minilm_path, texts=str(path), output=out, bank_shard_size=2))
  assert summary["written"] == 3 and summary["empty"] == 1
  assert sorted(os.listdir(out)) == ["bank-00000-of-00003.array_record",
                                     "bank-00001-of-00003.array_record",
                                     "bank-00002-of-00003.array_record", "manifest.d",
                                     "manifest.json"]
  index, matrix, manifest = records.load_text_bank(out)
  assert manifest["kind"] == "text_bank" and manifest["num_texts"] == 6
  assert manifest["duplicates_dropped"] == 1 and manifest["totals"]["empty"] == 1
  assert sorted(index) == sorted(set(texts) - {""})  # exact texts; the flagged one is left out
  enc = encoders.build_encoder("mean", encoders.resolve_model(minilm_path), "", "float32",
                               encoders.resolve_device("cpu", 0), "", 77, False, "", False)
  for t in index:
    v = enc.encode(enc.prepare([t]).inputs)[0]
    np.testing.assert_allclose(matrix[index[t]], v / np.linalg.norm(v), atol=2e-3)

  again = job.run(minilm_config(minilm_path, texts=str(path), output=out, bank_shard_size=2))
  assert (again["written"], again["skipped"]) == (0, 3)
  assert job.run(minilm_config(minilm_path, texts=str(path), output=out, bank_shard_size=2,
                               verify=True))["problems"] == 0
  banks.write_texts(str(path), texts + ["one more"])
  with pytest.raises(EmbedError, match="texts_sha256: .* new output folder"):
    job.run(minilm_config(minilm_path, texts=str(path), output=out, bank_shard_size=2))


def test_texts_file_errors(tmp_path, minilm_path):
  bad = tmp_path / "bad.json"
  bad.write_text('["a", 3]', encoding="utf-8")
  with pytest.raises(EmbedError, match=r"bad.json: item 1 is int"):
    job.run(minilm_config(minilm_path, texts=str(bad), output=str(tmp_path / "o")))
  with pytest.raises(EmbedError, match=r"texts file .*nope.txt not found"):
    job.run(minilm_config(minilm_path, texts=str(tmp_path / "nope.txt"),
                          output=str(tmp_path / "o")))
