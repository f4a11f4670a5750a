"""Stored embeddings against hand-written references: int8 rounding within scale/2, half
precisions within their rounding bounds, the exact little-endian byte layout, and the error cases
of shard listing, manifests and image/embedding alignment."""

import json
import os
import struct

import numpy as np
import pytest

from lift_jax import cli
from lift_jax.data import records


def roundtrip(vector, dtype):
  """What the trainer reads back after the embedding job stored ``vector`` as ``dtype``."""
  record = records.unpack(records.embedding_record("k", vector, dtype))
  return record, records.decode_embedding(record)


def vectors(seed=0):
  rng = np.random.default_rng(seed)
  # Normal vectors (as an L2-normalised 4096-d embedding has) plus some wide dynamic range.
  yield rng.normal(size=4096).astype(np.float32) / 64.0
  yield (rng.normal(size=512) * np.exp(rng.uniform(-6, 6, size=512))).astype(np.float32)


@pytest.mark.parametrize("vector", list(vectors()), ids=["unit", "wide"])
def test_int8_error_is_at_most_half_a_step(vector):
  record, back = roundtrip(vector, "int8")
  scale = record["scale"]
  assert scale == pytest.approx(np.abs(vector).max() / 127.0, rel=1e-6)
  err = np.abs(back.astype(np.float64) - vector.astype(np.float64))
  # Round to nearest: at most half a quantisation step (float32 slack for the product q*scale).
  assert err.max() <= scale / 2 * (1 + 1e-5)
  # The largest element lands exactly on +-127.
  q = np.frombuffer(record["embedding"], "<i1")
  assert np.abs(q).max() == 127
  assert np.array_equal(q, np.clip(np.floor(vector / np.float32(scale) + 0.5), -127, 127))


@pytest.mark.parametrize("dtype,mantissa_bits", [("float16", 10), ("bfloat16", 7)])
def test_half_precisions_round_to_nearest(dtype, mantissa_bits):
  rng = np.random.default_rng(1)
  # Inside float16's normal range, so the relative bound holds for both formats.
  vector = (rng.choice([-1, 1], 2048) * np.exp(rng.uniform(-9, 9, 2048))).astype(np.float32)
  _, back = roundtrip(vector, dtype)
  rel = np.abs(back.astype(np.float64) - vector) / np.abs(vector.astype(np.float64))
  bound = 2.0 ** -(mantissa_bits + 1)  # half a unit in the last place, relative
  assert rel.max() <= bound
  # Truncation would give errors up to twice that bound on about half the elements.
  assert rel.max() > bound / 2


def test_float32_is_exact():
  vector = next(vectors())
  record, back = roundtrip(vector, "float32")
  assert np.array_equal(back, vector) and "scale" not in record


def test_byte_layout_is_little_endian():
  values = [1.5, -2.0, 0.15625, 3.0]  # exactly representable in every storage dtype
  v = np.asarray(values, np.float32)
  assert roundtrip(v, "float32")[0]["embedding"] == struct.pack("<4f", *values)
  assert roundtrip(v, "float16")[0]["embedding"] == struct.pack("<4e", *values)
  # bfloat16 is the upper half of the float32 bit pattern.
  assert roundtrip(v, "bfloat16")[0]["embedding"] == b"".join(
      struct.pack("<f", x)[2:] for x in values)
  record = roundtrip(np.asarray([-127.0, 1.0, 64.0, 127.0], np.float32), "int8")[0]
  assert record["embedding"] == struct.pack("<4b", -127, 1, 64, 127) and record["scale"] == 1.0
  # ... and hand-made little-endian bytes decode to the values they hold.
  for dtype, fmt in (("float32", "<4f"), ("float16", "<4e")):
    got = records.decode_embedding({"key": "k", "dtype": dtype,
                                    "embedding": struct.pack(fmt, *values)})
    assert got.tolist() == values
  got = records.decode_embedding({"key": "k", "dtype": "int8", "scale": 0.5,
                                  "embedding": struct.pack("<3b", -3, 0, 100)})
  assert got.tolist() == [-1.5, 0.0, 50.0]


def test_unknown_dtype_is_refused():
  with pytest.raises(records.RecordError, match="unknown storage dtype 'float8'"):
    records.decode_embedding({"key": "k", "dtype": "float8", "embedding": b"\0"})


# ------------------------------------------------------------------------------------------------
# Shard listing and manifests
# ------------------------------------------------------------------------------------------------


def write_folder(folder, prefix, counts, total=None, vectors=False):
  """Shards ``prefix-i-of-total`` holding counts[i] records (None: leave shard i out)."""
  os.makedirs(folder, exist_ok=True)
  total = total or len(counts)
  entries = []
  for i, n in enumerate(counts):
    if n is None:
      continue
    recs = [records.embedding_record(f"{i}-{j}", np.ones(4, np.float32)) if vectors
            else records.image_record(f"{i}-{j}", b"img") for j in range(n)]
    entries.append(records.write_shard(
        os.path.join(folder, records.shard_name(prefix, i, total)), recs))
  records.write_manifest(folder, {"shards": entries})
  return entries


def test_list_shards_complete_set_in_order(tmp_path):
  write_folder(str(tmp_path), "images", [2, 3, 1])
  names = [os.path.basename(p) for p in records.list_shards(str(tmp_path), "images")]
  assert names == [f"images-0000{i}-of-00003.array_record" for i in range(3)]


def test_list_shards_names_a_missing_shard(tmp_path):
  write_folder(str(tmp_path), "images", [2, None, 1, None])
  with pytest.raises(records.RecordError,
                     match=r"missing 2 of 4 shards: images-00001-of-00004\.array_record, "
                           r"images-00003-of-00004\.array_record"):
    records.list_shards(str(tmp_path), "images")


def test_list_shards_refuses_shards_disagreeing_on_their_count(tmp_path):
  write_folder(str(tmp_path), "images", [2, 2])
  write_folder(str(tmp_path), "images", [None, None, 2])  # adds images-00002-of-00003
  with pytest.raises(records.RecordError, match=r"disagree on the shard count: \[2, 3\]"):
    records.list_shards(str(tmp_path), "images")


def test_list_shards_in_an_empty_folder(tmp_path):
  with pytest.raises(records.RecordError, match=r"no 'embeddings-\*-of-\*\.array_record' shards"):
    records.list_shards(str(tmp_path), "embeddings")


def test_manifest_errors_name_the_file(tmp_path):
  path = str(tmp_path / "manifest.json")
  with pytest.raises(records.RecordError, match=f"{path}: no manifest"):
    records.read_manifest(str(tmp_path))
  (tmp_path / "manifest.json").write_text(json.dumps({"dim": 4}))
  with pytest.raises(records.RecordError, match=f"{path}: a manifest needs a 'shards' list"):
    records.read_manifest(str(tmp_path))
  (tmp_path / "manifest.json").write_text("{not json")
  with pytest.raises(records.RecordError, match=f"{path}: not valid JSON"):
    records.read_manifest(str(tmp_path))
  entries = write_folder(str(tmp_path), "images", [3])
  assert records.read_manifest(str(tmp_path))["shards"] == entries


def test_a_shard_disagreeing_with_its_manifest_count(tmp_path):
  (entry,) = write_folder(str(tmp_path), "embeddings", [3], vectors=True)
  assert records.verify_shard(str(tmp_path), entry) is None
  assert records.verify_shard(str(tmp_path), dict(entry, count=4)) == \
      "holds 3 records, the manifest says 4"
  assert records.verify_shard(str(tmp_path), dict(entry, sha256="0" * 64)) == \
      "SHA-256 differs from the manifest"


def test_embedding_shards_disagreeing_with_their_image_shards(tmp_path):
  images, embeddings = str(tmp_path / "images"), str(tmp_path / "embeddings")
  write_folder(images, "images", [3, 4])
  write_folder(embeddings, "embeddings", [3, 3], vectors=True)
  with pytest.raises(Exception) as e:
    records.check_aligned(images, embeddings)
  message = cli.describe(e.value)
  assert message is not None, f"not a one-line user error: {e.value!r}"
  assert "embeddings-00001-of-00002" in message
  write_folder(embeddings, "embeddings", [3, 4], vectors=True)
  records.check_aligned(images, embeddings)
