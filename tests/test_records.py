"""The record format's functions at their edges, each against what the format promises written out
by hand: records and their errors, int8 and half-precision storage corner cases, shard reading in
chunks, atomic writes, manifests, counts from manifests, alignment with the image shards and
text banks."""

import datetime
import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata

import msgpack
import numpy as np
import pytest

from lift_jax.data import records

def shard(folder, prefix, raw_records, index=0, count=1, options="group_size:1"):
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, records.shard_name(prefix, index, count))
  return records.write_shard(path, raw_records, options)


def message(fn, *args, error=records.RecordError, **kw):
  with pytest.raises(error) as err:
    fn(*args, **kw)
  return str(err.value)


# ------------------------------------------------------------------------------------------------
# Records


def test_records_keep_their_fields_and_types():
  got = records.unpack(records.image_record("k1", bytearray(b"\x89PNG"), "a cat", recaption="x",
                                            label=3, missing=None))
  assert got == {"key": "k1", "image": b"\x89PNG", "caption": "a cat", "recaption": "x",
                 "label": 3}
  assert records.unpack(records.image_record("k2", b"img")) == {"key": "k2", "image": b"img"}
  got = records.unpack(records.embedding_record("k3", np.array([1.5, -2.0]), "float32"))
  assert got == {"key": "k3", "embedding": np.array([1.5, -2.0], "<f4").tobytes(),
                 "dtype": "float32", "flag": ""}


def test_undecodable_records_are_named():
  assert message(records.unpack, b"\xc1") == "record: not a msgpack record (FormatError: )"
  assert message(records.unpack, msgpack.packb([1, 2]), "shard 7") == \
      "shard 7: record is not a map with a 'key'"
  assert message(records.unpack, msgpack.packb({"caption": "no key"})) == \
      "record: record is not a map with a 'key'"
  bad_text = msgpack.packb({"key": "k", "caption": b"caf\xe9"}, use_bin_type=False)
  assert message(records.unpack, bad_text).startswith(
      "record: not a msgpack record (UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9")
  assert records.unpack(bad_text, unicode_errors="surrogateescape")["caption"] == "caf\udce9"


def test_int8_corner_cases():
  assert records.quantize(np.zeros(0, np.float32), "int8") == (b"", 1.0)
  assert records.quantize(np.zeros(3, np.float32), "int8") == (b"\0\0\0", 1.0)
  data, scale = records.quantize(np.array([[127.0, -63.5], [1.0, 0.0]]), "int8")  # flattened
  assert scale == 1.0 and np.frombuffer(data, "<i1").tolist() == [127, -64, 1, 0]
  # Stored as the float32 vector: 2.5000000001 is 2.5 in float32, which rounds to even (2).
  data, _ = records.quantize(np.array([127.0, 2.5000000001], np.float64), "int8")
  assert np.frombuffer(data, "<i1").tolist() == [127, 2]
  # A NaN leaves the scale at 1 (the job flags such vectors): the codes still stay in +-127.
  with np.errstate(invalid="ignore"):
    data, scale = records.quantize(np.array([np.nan, 300.0, -300.0], np.float32), "int8")
  assert scale == 1.0 and np.frombuffer(data, "<i1")[1:].tolist() == [127, -127]


def test_records_without_a_dtype_are_float16_and_decode_to_float32():
  half = np.array([0.5, -1.25, 3.0], "<f2")
  got = records.decode_embedding({"key": "k", "embedding": half.tobytes()})
  assert got.dtype == np.float32 and got.tolist() == [0.5, -1.25, 3.0]


def test_bfloat16_decodes_without_jax():
  """The embedding job reads and writes bfloat16 without importing JAX (which registers the
  dtype with numpy)."""
  code = ("import sys, numpy as np\n"
          "from lift_jax.data import records\n"
          "r = records.unpack(records.embedding_record('k', np.array([1.5, -2.0]), 'bfloat16'))\n"
          "assert records.decode_embedding(r).tolist() == [1.5, -2.0], r\n"
          "assert 'jax' not in sys.modules\n")
  record = records.unpack(records.embedding_record("k", np.array([1.5, -2.0]), "bfloat16"))
  assert records.decode_embedding(record).tolist() == [1.5, -2.0]  # here, JAX may be imported
  here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(records.__file__))))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        cwd=here, env={**os.environ, "PYTHONPATH": here})  # this lift_jax
  assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------------
# Shards


def test_reading_in_chunks_and_naming_the_bad_record(tmp_path):
  raw = [records.image_record(f"k{i}", b"x") for i in range(5)]
  entry = shard(str(tmp_path), "images", raw)
  path = str(tmp_path / entry["file"])
  assert [r["key"] for r in records.iter_records(path, chunk=2)] == [f"k{i}" for i in range(5)]
  assert records.read_keys(path) == [f"k{i}" for i in range(5)]
  assert records.read_raw(path) == raw and records.read_raw(path, [4, 1]) == [raw[4], raw[1]]
  assert records.count_records(path) == 5
  bad = str(tmp_path / "bad")
  path = str(tmp_path / "bad" / shard(bad, "images", raw[:3] + [b"\xc1"] + raw[4:])["file"])
  assert message(lambda: list(records.iter_records(path, chunk=2))) == \
      f"{path} record 3: not a msgpack record (FormatError: )"
  text = str(tmp_path / "text")
  foreign = msgpack.packb({"key": "k", "caption": b"caf\xe9"}, use_bin_type=False)
  path = str(tmp_path / "text" / shard(text, "images", [foreign])["file"])
  assert "(UnicodeDecodeError:" in message(lambda: list(records.iter_records(path)))
  (record,) = records.iter_records(path, unicode_errors="surrogateescape")
  assert record["caption"] == "caf\udce9"


def test_unreadable_shards_are_named(tmp_path):
  missing = str(tmp_path / "images-00000-of-00001.array_record")
  assert message(records.count_records, missing) == f"{missing}: no such shard"
  (tmp_path / "images-00000-of-00001.array_record").write_bytes(b"not an array record file")
  for read in (records.count_records, records.read_raw, records.iter_records):
    assert message(lambda: list(read(missing)) if read is records.iter_records else read(missing)
                   ) == (f"{missing}: not a readable ArrayRecord file (ArrayRecord file should "
                         "be at least 64KB big)")


def test_damaged_shards_are_named(tmp_path):
  raw = [records.image_record(f"k{i}", np.random.default_rng(i).bytes(2000)) for i in range(100)]
  path = str(tmp_path / shard(str(tmp_path), "images", raw, options=records.UNCOMPRESSED)["file"])
  with open(path, "r+b") as f:  # 256 bytes of noise in record 48 or so, as a bad copy would
    f.seek(int(os.path.getsize(path) * 0.3))
    f.write(np.random.default_rng(0).bytes(256))
  assert records.count_records(path) == 100  # the index is intact
  assert message(records.read_raw, path).startswith(
      f"{path}: damaged shard (Corrupted Riegeli/records file")
  assert message(lambda: list(records.iter_records(path, chunk=10))).startswith(
      f"{path}: damaged shard near record 40 (Corrupted Riegeli/records file")
  folder = tmp_path / "d" / "images-00000-of-00001.array_record"
  os.makedirs(folder)
  assert message(records.count_records, str(folder)).startswith(
      f"{folder}: not a readable ArrayRecord file (read() failed: Is a directory")


def test_sha256_of_a_file_longer_than_one_block(tmp_path):
  data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)
  (tmp_path / "f").write_bytes(data)
  assert records.sha256_file(str(tmp_path / "f")) == hashlib.sha256(data).hexdigest()


def test_write_shard_is_atomic_and_cleans_up(tmp_path):
  target = tmp_path / records.shard_name("images", 0, 1)
  seen = []

  def produce():
    for i in range(3):
      seen.append(sorted(os.listdir(tmp_path)))
      yield records.image_record(f"k{i}", b"x")
    raise ValueError("the source failed")

  with pytest.raises(ValueError, match="the source failed"):
    records.write_shard(str(target), produce())
  # Written under a temporary name beside the target (so the rename is atomic), then removed.
  assert len(seen[0]) == 1 and seen[0][0].startswith(target.name) and seen[0][0] != target.name
  assert os.listdir(tmp_path) == []
  entry = records.write_shard(str(target), (records.image_record(f"k{i}", b"x") for i in range(3)))
  assert entry == {"file": target.name, "count": 3,
                   "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
  assert os.listdir(tmp_path) == [target.name]


def test_writer_options_are_used(tmp_path):
  raw = [records.image_record(f"k{i}", b"a" * 4000) for i in range(100)]  # very compressible
  plain = shard(str(tmp_path / "plain"), "images", raw, options=records.UNCOMPRESSED)
  packed = shard(str(tmp_path / "packed"), "images", raw)
  assert os.path.getsize(tmp_path / "plain" / plain["file"]) > 100 * 4000
  assert os.path.getsize(tmp_path / "packed" / packed["file"]) < 100 * 4000 / 2


def test_verify_shard_reports(tmp_path):
  entry = shard(str(tmp_path), "images", [records.image_record("k", b"x")])
  assert records.verify_shard(str(tmp_path), dict(entry, file="images-00009-of-00010")) == \
      "missing"
  junk = tmp_path / "junk.array_record"
  junk.write_bytes(b"not an array record file")
  got = records.verify_shard(str(tmp_path), {"file": junk.name, "count": 1,
                                             "sha256": records.sha256_file(str(junk))})
  assert got.startswith(f"{junk}: not a readable ArrayRecord file (")


def test_list_shards_names_foreign_files_and_at_most_five_missing(tmp_path):
  shard(str(tmp_path / "a"), "images", [], index=0, count=8)
  shard(str(tmp_path / "a"), "images", [], index=7, count=8)
  got = message(records.list_shards, str(tmp_path / "a"), "images")
  names = ", ".join(records.shard_name("images", i, 8) for i in range(1, 6))
  assert got == f"{tmp_path / 'a'} is missing 6 of 8 shards: {names}"
  foreign = tmp_path / "b" / "images-extra-00000-of-00001.array_record"
  os.makedirs(foreign.parent)
  foreign.write_bytes(b"")
  assert message(records.list_shards, str(foreign.parent), "images") == \
      f"unexpected shard file name {foreign}"


# ------------------------------------------------------------------------------------------------
# Manifests and counts


def test_write_manifest_adds_version_and_creation_time(tmp_path):
  before = datetime.datetime.now(datetime.timezone.utc)
  path = records.write_manifest(str(tmp_path), {"shards": [], "dim": 4})
  assert path == str(tmp_path / records.MANIFEST)
  written = json.loads((tmp_path / records.MANIFEST).read_text(encoding="utf-8"))
  assert written["format_version"] == 1 and written["dim"] == 4
  created = datetime.datetime.fromisoformat(written["created"])
  assert created.utcoffset() == datetime.timedelta(0)
  assert before <= created <= datetime.datetime.now(datetime.timezone.utc)
  kept = {"shards": [], "format_version": 7, "created": "then"}
  records.write_manifest(str(tmp_path), kept)
  assert json.loads((tmp_path / records.MANIFEST).read_text()) == kept


def test_code_version(monkeypatch):
  assert records.code_version() == metadata.version("lift_jax")

  def not_installed(name):
    raise metadata.PackageNotFoundError(name)

  monkeypatch.setattr(metadata, "version", not_installed)
  assert records.code_version() == "unknown"


def test_shard_counts_come_from_the_manifest_and_fall_back_to_opening(tmp_path):
  folder = str(tmp_path)
  entries = [shard(folder, "images", [records.image_record("k", b"x")] * n, index=i, count=2)
             for i, n in enumerate((2, 3))]
  said = []
  paths, counts, manifest = records.shard_counts(folder, "images", said.append)
  assert counts == [2, 3] and manifest == {"shards": []}
  assert [os.path.basename(p) for p in paths] == [e["file"] for e in entries]
  assert said == [f"{folder} has no manifest.json: counting records by opening its 2 shards "
                  "(slow on network storage; the converter writes the manifest)"]
  assert records.shard_counts(folder, "images")[1] == [2, 3]  # no one to tell
  # The manifest's counts are taken as they are (no shard opened); an entry without one is
  # counted by opening its shard.
  uncounted = {k: v for k, v in entries[1].items() if k != "count"}
  records.write_manifest(folder, {"shards": [dict(entries[0], count=20), uncounted]})
  assert records.shard_counts(folder, "images", said.append)[1] == [20, 3] and len(said) == 1
  records.write_manifest(folder, {"shards": [entries[0]]})
  assert message(records.shard_counts, folder, "images") == (
      f"{folder}/manifest.json does not list 1 of the 2 shards in the folder (first: "
      f"{entries[1]['file']}); the manifest belongs to another run: re-run the command that "
      "wrote the folder")


def aligned_folders(tmp_path, counts=(2, 3), recorded=True):
  """An image folder and the embedding folder computed from it."""
  images, embeddings = str(tmp_path / "images"), str(tmp_path / "embeddings")
  image_entries, emb_entries = [], []
  for i, n in enumerate(counts):
    keys = [f"{i}-{j}" for j in range(n)]
    image_entries.append(shard(images, "images", [records.image_record(k, b"x") for k in keys],
                               i, len(counts)))
    entry = shard(embeddings, "embeddings",
                  [records.embedding_record(k, np.ones(2)) for k in keys], i, len(counts))
    if recorded:
      entry["image_sha256"] = image_entries[-1]["sha256"]
    emb_entries.append(entry)
  records.write_manifest(images, {"shards": image_entries})
  records.write_manifest(embeddings, {"shards": emb_entries})
  return images, embeddings, image_entries, emb_entries


def test_aligned_embeddings_and_stale_ones(tmp_path):
  images, embeddings, image_entries, emb_entries = aligned_folders(tmp_path)
  said = []
  assert records.check_aligned(images, embeddings, warn=said.append) == [2, 3] and said == []
  assert records.check_aligned(images, embeddings, check_keys=True) == [2, 3]
  # Shard 1 was computed from another version of its image shard.
  records.write_manifest(embeddings, {"shards": [emb_entries[0],
                                                 dict(emb_entries[1], image_sha256="0" * 64)]})
  emb, img = (os.path.join(d, e["file"]) for d, e in ((embeddings, emb_entries[1]),
                                                      (images, image_entries[1])))
  assert message(records.check_aligned, images, embeddings) == (
      f"{emb} was computed from another version of {img} (the image shard's SHA-256 changed "
      "since; e.g. it was re-converted with new captions): its vectors are stale. Re-embed them: "
      f"`python -m embed.main --config=EMBED_CONFIG --config.images={images} "
      f"--config.output={embeddings}` (it redoes only stale shards)")
  # An image manifest that records no digest cannot be compared.
  records.write_manifest(images, {"shards": [{k: v for k, v in e.items() if k != "sha256"}
                                             for e in image_entries]})
  assert records.check_aligned(images, embeddings) == [2, 3]


def test_embeddings_that_do_not_record_their_image_shard_are_reported_once(tmp_path):
  images, embeddings, _, emb_entries = aligned_folders(tmp_path, (2, 3, 1), recorded=False)
  said = []
  assert records.check_aligned(images, embeddings, warn=said.append) == [2, 3, 1]
  assert said == [f"{embeddings}/manifest.json: 3 of 3 shards do not record the image shard "
                  "they were computed from (image_sha256; made by an older embed.main), so "
                  "their freshness cannot be checked"]
  records.write_manifest(embeddings, {"shards": [dict(emb_entries[0], image_sha256="x")]
                                      + emb_entries[1:]})
  said.clear()
  with pytest.raises(records.RecordError, match="another version"):
    records.check_aligned(images, embeddings, warn=said.append)
  os.remove(os.path.join(images, records.MANIFEST))  # counted by opening: said, too
  records.write_manifest(embeddings, {"shards": emb_entries[:1] + [
      dict(e, image_sha256="x") for e in emb_entries[1:]]})
  assert records.check_aligned(images, embeddings, warn=said.append) == [2, 3, 1]
  assert said[0].startswith(f"{images} has no manifest.json") and said[1].startswith(
      f"{embeddings}/manifest.json: 1 of 3 shards do not record")
  os.remove(os.path.join(embeddings, records.MANIFEST))
  said.clear()
  assert records.check_aligned(images, embeddings, warn=said.append) == [2, 3, 1]
  assert [m.split(" has no ")[0] for m in said[:2]] == [images, embeddings]


def test_misaligned_counts_shards_and_keys(tmp_path):
  images, embeddings, image_entries, emb_entries = aligned_folders(tmp_path / "a")
  records.write_manifest(embeddings, {"shards": [emb_entries[0], dict(emb_entries[1], count=4)]})
  emb, img = (os.path.join(d, e["file"]) for d, e in ((embeddings, emb_entries[1]),
                                                      (images, image_entries[1])))
  assert message(records.check_aligned, images, embeddings) == \
      f"{emb} holds 4 records but its image shard {img} holds 3"
  images, embeddings, _, _ = aligned_folders(tmp_path / "b", (2, 3))
  images3, _, _, _ = aligned_folders(tmp_path / "c", (2, 3, 1))
  assert message(records.check_aligned, images3, embeddings) == \
      f"{embeddings} has 2 embedding shards but {images3} has 3 image shards"
  # Same counts, other keys: found only when asked to read the keys.
  images, embeddings, image_entries, emb_entries = aligned_folders(tmp_path / "d", (2,))
  path = os.path.join(embeddings, emb_entries[0]["file"])
  entry = records.write_shard(path, [records.embedding_record(k, np.ones(2)) for k in ("0-0", "x")])
  records.write_manifest(embeddings, {"shards": [dict(entry,
                                                      image_sha256=image_entries[0]["sha256"])]})
  assert records.check_aligned(images, embeddings) == [2]
  img = os.path.join(images, image_entries[0]["file"])
  assert message(records.check_aligned, images, embeddings, check_keys=True) == \
      f"{path} record 1 has key 'x'; image shard {img} has '0-1'"


# ------------------------------------------------------------------------------------------------
# Text banks


def bank(folder, rows, **manifest):
  entry = shard(folder, records.BANK, [records.embedding_record(k, np.asarray(v), "float32", flag)
                                       for k, v, flag in rows])
  records.write_manifest(folder, {"kind": "text_bank", "shards": [entry], **manifest})
  return folder


def test_text_banks_skip_placeholders_and_keep_the_first_vector_of_a_text(tmp_path):
  folder = bank(str(tmp_path / "a"), [("a cat", [1, 0], ""), ("", [0, 0], "empty"),
                                      ("a dog", [0, 1], ""), ("a cat", [5, 5], ""),
                                      ("nan", [0, 0], "nan"), ("a cow", [2, 2], "")], dim=2)
  index, matrix, manifest = records.load_text_bank(folder)
  assert index == {"a cat": 0, "a dog": 1, "a cow": 2} and manifest["dim"] == 2
  assert matrix.dtype == np.float32 and matrix.tolist() == [[1, 0], [0, 1], [2, 2]]
  one = bank(str(tmp_path / "b"), [("a cat", [1, 2, 3], "")])  # no dim in the manifest
  assert records.load_text_bank(one)[1].shape == (1, 3)


@pytest.mark.parametrize("dim, shape", [(16, (0, 16)), (None, (0, 0))])
def test_an_empty_text_bank(tmp_path, dim, shape):
  folder = bank(str(tmp_path), [("", [0, 0], "empty")], **({} if dim is None else {"dim": dim}))
  index, matrix, _ = records.load_text_bank(folder)
  assert index == {} and matrix.shape == shape and matrix.dtype == np.float32
