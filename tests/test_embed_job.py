"""The embedding job end to end on the real MiniLM (in this process): alignment, manifest, bad
input, resume after a crash, damaged shards, verify, changed inputs, storage dtypes."""

import csv
import json
import os

import msgpack
import numpy as np
import pytest

from conftest import shared_data
from embed import encoders, job, writer
from embed.errors import EmbedError
from lift_jax.data import records
from test_embed_support import (captions, minilm_config, shard_bytes, vectors,
                                write_image_shards)

SHARDS = [captions(14, seed=s) for s in range(3)]


def direct_vectors(minilm_path, texts, max_length=77):
  """float32 vectors from the encoder alone, one text at a time (no batching, no writer)."""
  enc = encoders.build_encoder("mean", encoders.resolve_model(minilm_path), "", "float32",
                               encoders.resolve_device("cpu", 0), "", max_length, False, "", False)
  out = np.concatenate([enc.encode(enc.prepare([t]).inputs) for t in texts])
  return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  folder = tmp_path_factory.mktemp("images")
  write_image_shards(str(folder), SHARDS)
  return str(folder)


@pytest.fixture(scope="module")
def clean_run(images, minilm_path, tmp_path_factory):
  """An uninterrupted run: the reference for every resume test."""
  out = str(tmp_path_factory.mktemp("clean"))
  summary = job.run(minilm_config(minilm_path, images=images, output=out))
  return out, summary


def test_end_to_end(images, clean_run, minilm_path):
  out, summary = clean_run
  assert summary["written"] == 3 and summary["skipped"] == 0 and summary["texts"] == 42
  records.check_aligned(images, out, check_keys=True)
  m = records.read_manifest(out)
  assert m["kind"] == "embeddings" and m["complete"] and m["num_shards"] == 3
  assert (m["model"], m["encoder"], m["pooling"]) == (minilm_path, "mean", "mean")
  assert (m["instruction"], m["max_length"], m["dim"]) == ("", 77, 384)
  assert (m["storage_dtype"], m["normalized"], m["caption_field"]) == ("float16", True, "caption")
  assert m["created"] and m["code_version"] and m["format_version"] == records.FORMAT_VERSION
  assert "revision" in m and m["images"] == images
  for i, e in enumerate(m["shards"]):
    assert e["file"] == records.shard_name("embeddings", i, 3)
    assert e["image_shard"] == records.shard_name("images", i, 3)
    assert e["count"] == 14 and e["sha256"] == records.sha256_file(os.path.join(out, e["file"]))
    assert all(e[k] == 0 for k in ("truncated", "empty", "undecodable", "missing", "nan", "failed"))
  assert m["totals"]["records"] == 42
  assert 0 <= m["summary"]["padding_waste"] < 1 and m["summary"]["captions_per_second"] > 0
  # The stored vectors are the encoder's, in the image records' order.
  keys, got, flags = vectors(os.path.join(out, "embeddings-00001-of-00003.array_record"))
  assert keys == [f"img1_{j}" for j in range(14)] and flags == [""] * 14
  np.testing.assert_allclose(got, direct_vectors(minilm_path, SHARDS[1]), atol=2e-3)


def test_bad_captions_are_flagged_and_counted(tmp_path, minilm_path):
  invalid_utf8_str = msgpack.packb({"key": "bad_str", "image": b"x", "caption": "ok"},
                                   use_bin_type=True).replace(b"\xa2ok", b"\xa2\xff\xfe")
  shard = [
      "A dog.",
      "",
      "   \t ",
      {"caption": b"\xff\xfe not utf-8"},
      {"caption": "caf\u00e9 au lait".encode()},  # bytes, but valid UTF-8: embedded
      {"recaption": "no caption field here"},
      {"caption": 17},
      invalid_utf8_str,
      "word " * 100,  # truncated at max_length
  ]
  images = str(tmp_path / "images")
  write_image_shards(images, [shard])
  out = str(tmp_path / "out")
  summary = job.run(minilm_config(minilm_path, images=images, output=out))
  keys, got, flags = vectors(os.path.join(out, "embeddings-00000-of-00001.array_record"))
  assert keys[:7] == [f"img0_{j}" for j in range(7)] and keys[7] == "bad_str"
  assert flags == ["", "empty", "empty", "undecodable", "", "missing", "undecodable",
                   "undecodable", ""]
  assert not got[[1, 2, 3, 5, 6, 7]].any()  # placeholders are zeros
  np.testing.assert_allclose(got[4], direct_vectors(minilm_path, ["caf\u00e9 au lait"])[0],
                             atol=2e-3)
  entry = records.read_manifest(out)["shards"][0]
  assert (entry["empty"], entry["undecodable"], entry["missing"], entry["failed"]) == (2, 3, 1, 6)
  assert entry["truncated"] == 1 and summary["failed"] == 6

  with pytest.raises(EmbedError, match=r"images-00000-of-00001.array_record record 1 .*empty"):
    job.run(minilm_config(minilm_path, images=images, output=str(tmp_path / "strict"),
                          empty_policy="fail"))


def test_empty_shard_and_shard_without_text(tmp_path, minilm_path):
  images = str(tmp_path / "images")
  write_image_shards(images, [[], ["", " "], ["A cat."]])
  out = str(tmp_path / "out")
  summary = job.run(minilm_config(minilm_path, images=images, output=out))
  assert summary["written"] == 3 and summary["empty"] == 2
  records.check_aligned(images, out, check_keys=True)
  assert [e["count"] for e in records.read_manifest(out)["shards"]] == [0, 2, 1]
  assert job.run(minilm_config(minilm_path, images=images, output=out))["skipped"] == 3


def test_wrong_caption_field_is_a_clear_error(images, tmp_path, minilm_path):
  with pytest.raises(EmbedError, match=r"the caption field 'recaption' is in no record "
                                       r"\(fields: caption, key\)"):
    job.run(minilm_config(minilm_path, images=images, output=str(tmp_path / "o"),
                          caption_field="recaption"))
  lists = str(tmp_path / "lists")
  write_image_shards(lists, [[{"caption": "a", "captions": ["a", "b"]}]])
  with pytest.raises(EmbedError, match=r"the caption field 'captions' holds list values, not "
                                       r"text \(fields: caption, captions, key\)"):
    job.run(minilm_config(minilm_path, images=lists, output=str(tmp_path / "o2"),
                          caption_field="captions"))


def test_nan_outputs_are_flagged_or_fail(minilm_path):
  from embed.inputs import Item

  class NaNOnDogs(encoders.Encoder):
    dim = 4

    def prepare(self, texts):
      return encoders.Prepared(list(texts), [len(t.split()) for t in texts], [False] * len(texts))

    def encode(self, inputs):
      return np.array([[np.nan if "dog" in t else 1.0] * 4 for t in inputs], np.float32)

  items = [Item("a", "a cat"), Item("b", "a dog"), Item("c", "two cats")]
  result = job.embed_items(NaNOnDogs(), items, minilm_config(minilm_path), "shard X")
  assert result.flags == ["", "nan", ""]
  np.testing.assert_allclose(result.vectors[[0, 2]], 0.5)
  assert not result.vectors[1].any()
  with pytest.raises(EmbedError, match=r"shard X record 1 \(key 'b'\).*NaN"):
    job.embed_items(NaNOnDogs(), items, minilm_config(minilm_path, nan_policy="fail"), "shard X")


def test_resume_after_crash_is_byte_identical(images, clean_run, tmp_path, minilm_path,
                                              monkeypatch):
  out = str(tmp_path / "out")
  cfg = minilm_config(minilm_path, images=images, output=out)
  real_write = job.write_output
  calls = []

  def crash_on_second_shard(path, *args):
    calls.append(path)
    if len(calls) == 2:  # die half-way through writing the second shard
      with open(path + ".tmp-99999", "wb") as f:
        f.write(b"partial")
      raise KeyboardInterrupt("simulated crash")
    return real_write(path, *args)

  monkeypatch.setattr(job, "write_output", crash_on_second_shard)
  with pytest.raises(KeyboardInterrupt):
    job.run(cfg)
  monkeypatch.setattr(job, "write_output", real_write)
  assert sorted(shard_bytes(out)) == ["embeddings-00000-of-00003.array_record"]
  assert not records.read_manifest(out)["complete"]

  summary = job.run(cfg)
  assert (summary["skipped"], summary["written"]) == (1, 2)
  assert shard_bytes(out) == shard_bytes(clean_run[0])
  assert not [f for f in os.listdir(out) if ".tmp-" in f]
  m = records.read_manifest(out)
  assert m["complete"] and [e["sha256"] for e in m["shards"]] == \
      [e["sha256"] for e in records.read_manifest(clean_run[0])["shards"]]


def test_damaged_or_missing_shard_is_redone(images, clean_run, tmp_path, minilm_path):
  import shutil

  out = str(tmp_path / "out")
  shutil.copytree(clean_run[0], out)
  target = os.path.join(out, "embeddings-00001-of-00003.array_record")
  data = bytearray(open(target, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(target, "wb").write(bytes(data))
  os.remove(os.path.join(out, "embeddings-00002-of-00003.array_record"))
  untouched = os.path.join(out, "embeddings-00000-of-00003.array_record")
  before = os.stat(untouched).st_mtime_ns

  cfg = minilm_config(minilm_path, images=images, output=out)
  with pytest.raises(EmbedError, match="embeddings-00001-of-00003.array_record: SHA-256 differs"):
    job.run(minilm_config(minilm_path, images=images, output=out, verify=True))
  summary = job.run(cfg)
  assert (summary["skipped"], summary["written"]) == (1, 2)
  assert os.stat(untouched).st_mtime_ns == before
  assert shard_bytes(out) == shard_bytes(clean_run[0])
  verified = job.run(minilm_config(minilm_path, images=images, output=out, verify=True))
  assert verified["problems"] == 0


def test_manifest_rebuilt_from_parts_and_parts_from_manifest(images, clean_run, tmp_path,
                                                             minilm_path):
  import shutil

  out = str(tmp_path / "out")
  shutil.copytree(clean_run[0], out)
  os.remove(os.path.join(out, records.MANIFEST))  # e.g. killed between a shard and the manifest
  summary = job.run(minilm_config(minilm_path, images=images, output=out))
  assert summary["written"] == 0 and records.read_manifest(out)["complete"]
  shutil.rmtree(os.path.join(out, writer.PARTS))  # a copy of the folder without its parts
  summary = job.run(minilm_config(minilm_path, images=images, output=out))
  assert summary["written"] == 0 and records.read_manifest(out)["complete"]
  assert len(writer.read_entries(out)) == 3


def image_manifest(folder):
  """manifest.json of an image folder, as convert writes it: file, count and SHA-256 per shard."""
  entries = [{"file": os.path.basename(p), "count": records.count_records(p),
              "sha256": records.sha256_file(p)}
             for p in records.list_shards(folder, records.IMAGES)]
  records.write_manifest(folder, {"kind": "images", "shards": entries})
  return {e["file"]: e["sha256"] for e in entries}


def test_reconverted_image_shards_are_embedded_again(clean_run, tmp_path, minilm_path):
  """Captions corrected under the same keys: verify names the stale shard, a re-run redoes it
  (and only it) with the new captions; the manifest records what each shard embedded."""
  import shutil

  out = str(tmp_path / "out")
  shutil.copytree(clean_run[0], out)
  images = str(tmp_path / "images")
  write_image_shards(images, SHARDS)
  digests = image_manifest(images)
  assert job.run(minilm_config(minilm_path, images=images, output=out, verify=True))[
      "problems"] == 0
  corrected = [c.upper() for c in SHARDS[1]]
  write_image_shards(images, [SHARDS[0], corrected, SHARDS[2]])
  digests = image_manifest(images)
  with pytest.raises(EmbedError, match=r"embeddings-00001-of-00003.array_record: embedded from "
                                       r"another version of its image shard .*re-run"):
    job.run(minilm_config(minilm_path, images=images, output=out, verify=True))
  summary = job.run(minilm_config(minilm_path, images=images, output=out))
  assert (summary["written"], summary["skipped"]) == (1, 2)
  keys, got, _ = vectors(os.path.join(out, "embeddings-00001-of-00003.array_record"))
  assert keys == [f"img1_{j}" for j in range(14)]
  np.testing.assert_allclose(got, direct_vectors(minilm_path, corrected), atol=2e-3)
  manifest = records.read_manifest(out)
  assert {e["image_shard"]: e["image_sha256"] for e in manifest["shards"]} == digests
  assert job.run(minilm_config(minilm_path, images=images, output=out, verify=True))[
      "problems"] == 0
  # A shard that gained a record is redone too, and stays aligned.
  write_image_shards(images, [SHARDS[0], corrected, SHARDS[2] + ["extra"]])
  image_manifest(images)
  summary = job.run(minilm_config(minilm_path, images=images, output=out))
  assert (summary["written"], summary["skipped"]) == (1, 2)
  records.check_aligned(images, out, check_keys=True)


def test_entries_without_image_digests_are_still_checked(clean_run, tmp_path, minilm_path):
  """Output written before image digests were recorded: counts and end keys must agree."""
  import shutil

  out = str(tmp_path / "out")
  shutil.copytree(clean_run[0], out)
  for path in [os.path.join(out, records.MANIFEST)] + [
      writer.entry_path(out, e) for e in writer.read_entries(out)]:
    data = json.load(open(path, encoding="utf-8"))
    for e in data.get("shards", [data]):
      e.pop("image_sha256", None)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(data, f)
  images = str(tmp_path / "images")
  write_image_shards(images, [SHARDS[0], SHARDS[1] + ["extra"], SHARDS[2]])
  with pytest.raises(EmbedError, match=r"embeddings-00001-of-00003.array_record holds 14 records "
                                       r"but its image shard .*images-00001-of-00003.array_record "
                                       r"holds 15"):
    job.run(minilm_config(minilm_path, images=images, output=out))
  write_image_shards(images, SHARDS)
  renamed = [records.image_record(("first_renamed" if j == 0 else f"img2_{j}"), b"x", c)
             for j, c in enumerate(SHARDS[2])]
  records.write_shard(os.path.join(images, "images-00002-of-00003.array_record"), renamed)
  with pytest.raises(EmbedError, match=r"record 0 has key 'img2_0' but its image shard"):
    job.run(minilm_config(minilm_path, images=images, output=out))


def test_other_settings_or_shard_count_are_refused(images, clean_run, tmp_path, minilm_path):
  import shutil

  out = str(tmp_path / "out")
  shutil.copytree(clean_run[0], out)
  with pytest.raises(EmbedError, match=r"max_length: 77 -> 32.*new output folder"):
    job.run(minilm_config(minilm_path, images=images, output=out, max_length=32))
  other = str(tmp_path / "other")
  write_image_shards(other, SHARDS[:2])
  with pytest.raises(EmbedError, match=r"num_shards: 3 -> 2"):
    job.run(minilm_config(minilm_path, images=other, output=out))
  # Shards without any manifest (copied by hand) are refused too.
  shutil.rmtree(os.path.join(out, writer.PARTS))
  os.remove(os.path.join(out, records.MANIFEST))
  with pytest.raises(EmbedError, match=r"embeddings-00000-of-00003.array_record belongs to a set "
                                       r"of a different size"):
    job.run(minilm_config(minilm_path, images=other, output=out))


@pytest.mark.parametrize("bad, message", [
    (dict(images="", texts=""), "exactly one of"),
    (dict(output=""), "config.output is empty"),
    (dict(encoder="max"), "config.encoder='max'"),
    (dict(storage_dtype="float8"), "storage_dtype='float8'"),
    (dict(nan_policy="skip"), "nan_policy='skip'"),
    (dict(batch_tokens=0), "batch_tokens=0"),
])
def test_bad_config_is_a_clear_error(images, minilm_path, tmp_path, bad, message):
  cfg = minilm_config(minilm_path, images=images, output=str(tmp_path / "o"))
  for k, v in bad.items():
    cfg[k] = v
  with pytest.raises(EmbedError, match=message.replace("(", r"\(").replace(".", r"\.")):
    job.run(cfg)


def test_empty_images_folder_is_a_clear_error(tmp_path, minilm_path):
  (tmp_path / "none").mkdir()
  with pytest.raises(records.RecordError, match=r"no 'images-\*-of-\*.array_record' shards in"):
    job.run(minilm_config(minilm_path, images=str(tmp_path / "none"), output=str(tmp_path / "o")))


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-6), ("bfloat16", 8e-3), ("int8", 8e-3)])
def test_storage_dtypes(tmp_path, minilm_path, dtype, atol):
  texts = SHARDS[0][:6]
  path = tmp_path / "texts.txt"
  path.write_text("\n".join(texts) + "\n")
  out = str(tmp_path / dtype)
  job.run(minilm_config(minilm_path, texts=str(path), output=out, storage_dtype=dtype))
  index, matrix, manifest = records.load_text_bank(out)
  assert manifest["storage_dtype"] == dtype
  want = direct_vectors(minilm_path, texts)
  np.testing.assert_allclose(matrix[[index[t] for t in texts]], want, atol=atol)


def flickr_shards(folder, limit=None):
  """The Flickr8k subset's captions as image shards of 1000 records (5 captions per image)."""
  path = shared_data("flickr8k_subset", "captions.tsv")
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t"))[1:limit and limit + 1]
  per = 1000
  shards = [[{"caption": r[2], "image_file": r[0]} for r in rows[i:i + per]]
            for i in range(0, len(rows), per)]
  write_image_shards(folder, shards, prefix="flickr")
  return rows


def check_flickr_run(images, out, rows, summary, max_waste):
  records.check_aligned(images, out, check_keys=True)
  m = records.read_manifest(out)
  assert m["complete"] and m["totals"]["records"] == len(rows) and m["totals"]["failed"] == 0
  assert summary["padding_waste"] < max_waste
  print(f"\nFlickr8k captions ({len(rows)}): {summary['captions_per_second']:.1f} captions/s, "
        f"{summary['tokens_per_second']:.0f} tokens/s, padding waste "
        f"{summary['padding_waste']:.2%}")


def test_flickr8k_captions_end_to_end(tmp_path, minilm_path):
  images = str(tmp_path / "images")
  rows = flickr_shards(images, limit=300)
  out = str(tmp_path / "out")
  summary = job.run(minilm_config(minilm_path, images=images, output=out))
  # One small shard: few texts per length, so the per-batch cost outweighs some padding.
  check_flickr_run(images, out, rows, summary, max_waste=0.2)
  keys, got, _ = vectors(os.path.join(out, "embeddings-00000-of-00001.array_record"))
  np.testing.assert_allclose(got[:5], direct_vectors(minilm_path, [r[2] for r in rows[:5]]),
                             atol=2e-3)


@pytest.mark.slow
def test_flickr8k_all_captions(tmp_path, minilm_path):
  """All 5000 captions with the shipped minilm config's batching (the numbers in the docs)."""
  images = str(tmp_path / "images")
  rows = flickr_shards(images)
  out = str(tmp_path / "out")
  from embed.configs import minilm

  cfg = minilm.get_config()
  cfg.images, cfg.output, cfg.progress = images, out, False
  summary = job.run(cfg)
  check_flickr_run(images, out, rows, summary, max_waste=0.10)
  json.dumps(summary)
