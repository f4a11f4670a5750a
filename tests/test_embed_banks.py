"""Text lists for evaluation banks (the benchmark specs' texts, checked against the files read
by hand) and the text-bank mode of the job (keyed by exact text, readable by
records.load_text_bank)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, shared_data
from embed import banks, encoders, job
from embed.errors import EmbedError
from eval import texts as eval_texts
from lift_jax import cli
from lift_jax.data import records, synthetic
from test_embed_support import minilm_config


def lines(path):
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f if line.strip()]


def distinct(texts):
  return list(dict.fromkeys(texts))


def run_banks(tmp_path, *args, name="texts.json"):
  out = tmp_path / name
  assert banks.main([*args, f"--out={out}"]) == 0
  if name.endswith(".json"):
    return json.loads(out.read_text(encoding="utf-8"))
  return out.read_text(encoding="utf-8").splitlines()


def test_imagenet_prompts_both_protocols(tmp_path):
  folder = shared_data("imagenet")
  # The reference: every class name in every template, read from the files by hand.
  keras, lift_t = lines(f"{folder}/classnames_keras.txt"), lines(f"{folder}/templates_lift.txt")
  names, templates = lines(f"{folder}/classnames.txt"), lines(f"{folder}/templates.txt")
  want_lift = distinct(t.replace("{}", n) for n in keras for t in lift_t)
  want_openai = distinct(t.replace("{}", n) for n in names for t in templates)
  lift = run_banks(tmp_path, f"--imagenet={folder}")
  assert lift[:2] == ["It is a photo of a tench", "It is a photo of a goldfish"]
  assert lift == want_lift and len(lift) == 998  # "crane", "maillot" name two classes each
  openai = run_banks(tmp_path, f"--imagenet={folder}", "--protocol=openai")
  assert openai == want_openai and "a bad photo of a tench." in openai
  assert run_banks(tmp_path, f"--imagenet={folder}", "--protocol=both") == distinct(
      want_lift + want_openai)
  with pytest.raises(cli.UsageError, match="protocol"):
    banks.main([f"--imagenet={folder}", "--protocol=simple", f"--out={tmp_path / 'x.json'}"])


def test_coco_flickr_and_sugarcrepe_texts(tmp_path):
  coco = shared_data("coco", "annotations", "captions_val2017.json")
  data = json.load(open(coco, encoding="utf-8"))
  per_image = {im["id"]: [] for im in data["images"]}
  for ann in data["annotations"]:
    per_image[ann["image_id"]].append(ann["caption"].strip())
  want_first = distinct(per_image[i][0] for i in sorted(per_image) if per_image[i])
  want_every = distinct(c for i in sorted(per_image) for c in per_image[i])
  assert run_banks(tmp_path, f"--captions={coco}", "--first_caption_only") == want_first
  assert run_banks(tmp_path, f"--captions={coco}") == want_every and len(want_every) > 24000
  flickr = shared_data("flickr8k_subset", "captions.tsv")
  rows = [r.split("\t") for r in lines(flickr)[1:]]
  assert run_banks(tmp_path, f"--captions={flickr}") == distinct(r[2] for r in rows)
  sugar = shared_data("sugarcrepe")
  want = []
  for subset in eval_texts.SUGARCREPE_SUBSETS:
    recs = json.load(open(f"{sugar}/{subset}.json", encoding="utf-8"))
    for k in sorted(recs, key=int):
      want += [recs[k]["caption"], recs[k]["negative_caption"]]
  assert run_banks(tmp_path, f"--sugarcrepe={sugar}") == distinct(want)


def test_flickr30k_csv_and_jsonl_layouts(tmp_path):
  csv_path = tmp_path / "flickr_annotations_30k.csv"
  csv_path.write_text('raw,sentids,split,filename,img_id\n'
                      '"[""A man ."", ""A tall man .""]","[0, 1]",test,1.jpg,0\n'
                      '"[""A dog .""]","[2]",train,2.jpg,1\n', encoding="utf-8")
  assert run_banks(tmp_path, f"--captions={csv_path}", "--split=test") == ["A man .",
                                                                          "A tall man ."]
  assert run_banks(tmp_path, f"--captions={csv_path}", "--first_caption_only") == ["A man .",
                                                                                   "A dog ."]
  jsonl = tmp_path / "caps.jsonl"
  jsonl.write_text('{"image": "a.jpg", "captions": ["x", "y"]}\n{"filename": "b.jpg", '
                   '"caption": "z"}\n', encoding="utf-8")
  assert run_banks(tmp_path, f"--captions={jsonl}", name="t.txt") == ["x", "y", "z"]


def test_synthetic_eval_dir_and_training_config(tmp_path):
  """--eval_dir lists a synthetic set's texts through the same specs as training's evaluation;
  --config lists a training config's texts as eval.main --write_texts does."""
  folder = str(tmp_path / "eval")
  synthetic.write_eval(folder, synthetic.Settings(num_eval=6, image_size=32))
  want = []
  for subset in synthetic.SUBSETS:
    recs = json.load(open(f"{folder}/compositional/{subset}.json", encoding="utf-8"))
    want += [t for k in sorted(recs, key=int)
             for t in (recs[k]["caption"], recs[k]["negative_caption"])]
  want += [t.replace("{}", n) for n in lines(f"{folder}/classification/classnames.txt")
           for t in lines(f"{folder}/classification/templates.txt")]
  want += [r.split("\t")[2] for r in lines(f"{folder}/retrieval/captions.tsv")[1:]]
  texts = run_banks(tmp_path, f"--eval_dir={folder}")
  assert texts == distinct(want)
  config = tmp_path / "cfg.py"
  config.write_text("import ml_collections\n"
                    "def get_config():\n"
                    "  return ml_collections.ConfigDict({'evals': {'benchmarks': "
                    f"{synthetic.eval_benchmarks(folder)!r}}}}})\n", encoding="utf-8")
  # (a ConfigDict keeps its benchmarks in sorted order: the same texts, listed in another order)
  assert sorted(run_banks(tmp_path, f"--config={config}")) == sorted(texts)
  assert sorted(run_banks(tmp_path, f"--config={config}", name="t.txt")) == sorted(texts)


def test_cli_errors_are_one_line(tmp_path):
  out = str(tmp_path / "x.json")
  with pytest.raises(cli.UsageError, match="name at least one source"):
    banks.main([f"--out={out}"])
  with pytest.raises(cli.UsageError, match="--out=FILE is required"):
    banks.main([f"--sugarcrepe={tmp_path}"])
  with pytest.raises(FileNotFoundError, match="add_obj.json"):
    banks.main([f"--sugarcrepe={tmp_path}", f"--out={out}"])  # no subset files there
  with pytest.raises(cli.UsageError, match="line break"):
    eval_texts.write_texts(str(tmp_path / "x.txt"), ["two\nlines"])
  run = subprocess.run([sys.executable, "-m", "embed.banks", f"--captions={tmp_path}/none.tsv",
                        f"--out={out}"], capture_output=True, text=True, cwd=REPO)
  lines_ = run.stderr.strip().splitlines()
  assert run.returncode == 1 and len(lines_) == 1, run.stderr
  assert lines_[0].startswith("python -m embed.banks: error: ") and "none.tsv" in lines_[0]


def test_text_bank_mode(tmp_path, minilm_path):
  texts = ["a photo of a dog", "a photo of a cat", "a photo of a dog", "",
           "two lines:\nsecond", "caf\u00e9 \u2014 Zürich", "  padded  "]
  path = tmp_path / "texts.json"
  eval_texts.write_texts(str(path), texts)
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
  eval_texts.write_texts(str(path), texts + ["one more"])
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
