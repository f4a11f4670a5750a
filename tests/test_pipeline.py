"""The grain input pipeline: global sharded batches, per-process slices, exact resume with worker
processes, per-epoch reshuffle, crops independent of the worker layout."""

import os

import numpy as np
import pytest

import fakedata
from lift_jax import sharding
from lift_jax.data import pipeline, records


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return fakedata.write_dataset(str(tmp_path_factory.mktemp("d")), n=40, shards=3, dim=16)


def host_batches(config, n, process_index=0, process_count=1, state=None):
  it = iter(pipeline.train_dataset(config, process_index, process_count))
  if state is not None:
    it.set_state(state)
  out = [next(it) for _ in range(n)]
  return out, it


def test_global_batches_are_sharded_over_the_mesh(data):
  c = fakedata.tiny_config(*data, batch=16)
  mesh = sharding.make_mesh()
  batches = pipeline.Batches(pipeline.train_dataset(c), sharding.batch_sharding(mesh))
  batch, reasons = next(batches)
  batches.close()
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["text"].shape == (16, 16) and batch["text"].dtype == np.float32
  assert batch["valid"].dtype == bool and bool(np.all(batch["valid"]))
  assert len(batch["image"].sharding.device_set) == 8
  assert batch["image"].addressable_shards[0].data.shape == (2, 32, 32, 3)
  assert reasons[0] == 16 and reasons[1:].sum() == 0


def test_process_slices_make_up_the_global_batch(data):
  c = fakedata.tiny_config(*data, batch=16)
  whole, _ = host_batches(c, 4)
  parts = [host_batches(c, 4, p, 2)[0] for p in range(2)]
  for step in range(4):
    for key in ("image", "text"):
      joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
      np.testing.assert_array_equal(joined, whole[step][key])


def test_resume_with_worker_processes_is_exact(data):
  c = fakedata.tiny_config(*data, batch=8)
  c.data.workers = 2
  reference, it = host_batches(c, 9)
  it.close()
  first, it = host_batches(c, 4)
  state = it.get_state()
  it.close()
  rest, it = host_batches(c, 5, state=state)
  it.close()
  for a, b in zip(first + rest, reference):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"], b["text"])
  # ... and the worker count does not change what a batch holds.
  c.data.workers = 0
  plain, _ = host_batches(c, 9)
  for a, b in zip(plain, reference):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_batches_state_counts_what_was_handed_out(data):
  """The saved position is that of consumed batches, not of the prefetch queue: a pipeline
  started at that batch yields what the first would have yielded next, and the counts and the
  examples digest go on as if uninterrupted."""
  c = fakedata.tiny_config(*data, batch=8)
  mesh = sharding.make_mesh()
  b1 = pipeline.Batches(pipeline.train_dataset(c), sharding.batch_sharding(mesh), prefetch=3)
  got = [np.asarray(next(b1)[0]["text"]) for _ in range(3)]
  saved = (b1.batches_served, list(b1.reason_counts.values()), b1.digest)
  more = [np.asarray(next(b1)[0]["text"]) for _ in range(2)]
  b1.close()
  assert saved[0] == 3 and sum(saved[1]) == 24
  b2 = pipeline.Batches(pipeline.train_dataset(c, start_batch=3), sharding.batch_sharding(mesh),
                        prefetch=3, start=saved)
  again = [np.asarray(next(b2)[0]["text"]) for _ in range(2)]
  b2.close()
  for a, b in zip(more, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(got[0], again[0])
  assert b2.batches_served == b1.batches_served == 5
  assert b2.reason_counts == b1.reason_counts and b2.digest == b1.digest


def test_position_does_not_depend_on_processes_or_workers(data):
  """Global batch t is the same examples for 1 process or 2, 0 workers or 2: the per-process
  digests add up to the one-process digest, and a start in the middle agrees."""
  c = fakedata.tiny_config(*data, batch=8)
  mesh = sharding.make_mesh()

  def digests(process_count, workers, start=0, n=4):
    c.data.workers = workers
    out = []
    for p in range(process_count):
      ds = pipeline.train_dataset(c, p, process_count, start_batch=start)
      rows = []
      for batch, _ in zip(ds, range(n)):
        rows.append(np.asarray(batch["record"]))
      out.append(sum(pipeline.record_digest(r, start + t) for t, r in enumerate(rows))
                 % 2**64)
    return sum(out) % 2**64

  one = digests(1, 0)
  assert digests(2, 0) == one
  assert digests(1, 2) == one
  assert (digests(1, 0, n=2) + digests(2, 2, start=2, n=2)) % 2**64 == one
  assert digests(1, 0, start=1) != one  # the digest does tell batches apart
  b = pipeline.Batches(pipeline.train_dataset(c), sharding.batch_sharding(mesh), prefetch=0)
  for _ in range(4):
    next(b)
  b.close()
  assert b.digest == one


def test_record_digest_against_a_hand_computed_mix():
  """splitmix64's finaliser of record * golden ratio xor batch, summed mod 2**64."""
  def mix(x):
    m = 2**64
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 % m
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB % m
    return x ^ (x >> 31)

  records, batch = [0, 7, 2**33 + 5], 3
  want = sum(mix((r * 0x9E3779B97F4A7C15 % 2**64) ^ batch) for r in records) % 2**64
  assert pipeline.record_digest(np.asarray(records), batch) == want


def test_every_epoch_is_a_new_permutation(data):
  c = fakedata.tiny_config(*data, batch=8)  # 40 examples = 5 batches per epoch
  batches, _ = host_batches(c, 10)
  epoch = lambda bs: np.concatenate([b["text"] for b in bs])
  e1, e2 = epoch(batches[:5]), epoch(batches[5:])
  key = lambda rows: sorted(map(tuple, rows.round(3)))
  assert key(e1) == key(e2)  # each epoch sees every example once
  assert len({tuple(r) for r in e1.round(3)}) == 40
  assert not np.array_equal(e1, e2)  # in another order
  expected = []
  for path in records.list_shards(data[1], "embeddings"):
    expected += [records.decode_embedding(r) for r in records.iter_records(path)]
  assert key(np.stack(expected)) == key(e1)


def test_crops_follow_spec_ranges(data):
  """RandomResizedCrop(scale 0.9-1, ratio 3/4-4/3) as torchvision draws it."""
  from lift_jax.data import transforms

  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = transforms.crop_params(48, 40, rng)
    assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 48
    assert 0.9 * 48 * 40 * 0.97 <= h * w <= 48 * 40
  # Impossible requests fall back to the central crop of the allowed aspect ratio.
  assert transforms.crop_params(400, 10, rng) == (0, 193, 10, 13)


def test_clip_batches_carry_token_ids(data, minilm_path):
  c = fakedata.tiny_config(data[0], None, mode="clip", tokenizer=minilm_path)
  (batch,), _ = host_batches(c, 1)
  assert batch["text"].shape == (16, 16) and batch["text"].dtype == np.int32
  assert np.all(batch["text"][:, 0] == 101)  # [CLS]
  assert np.all((batch["text"] == 102).sum(axis=1) == 1)  # exactly one [SEP]: the pooling token


def _aligned_random_embeddings(image_dir, out_dir, dim=16):
  rng = np.random.default_rng(0)
  shards = records.list_shards(image_dir, records.IMAGES)
  entries = []
  os.makedirs(out_dir, exist_ok=True)
  for i, path in enumerate(shards):
    recs = [records.embedding_record(k, rng.normal(size=dim)) for k in records.read_keys(path)]
    entries.append(records.write_shard(
        os.path.join(out_dir, records.shard_name(records.EMBEDDINGS, i, len(shards))), recs))
  records.write_manifest(out_dir, {"kind": "embeddings", "dim": dim, "shards": entries})
  return out_dir


@pytest.mark.parametrize("source", ["flickr8k", "synthetic"])
def test_real_sets_convert_load_and_batch_on_eight_devices(tmp_path, source, minilm_path):
  """The Flickr8k subset (converter, 256-px resize) and the synthetic set, through the pipeline
  of LIFT (aligned embeddings) and of CLIP (tokenised captions), as global 8-device batches."""
  from conftest import shared_data
  from lift_jax.data import convert, synthetic

  if source == "flickr8k":
    folder = shared_data("flickr8k_subset")
    images = str(tmp_path / "images")
    convert.convert(images, images=f"{folder}/images", captions=f"{folder}/captions.tsv",
                    options=convert.Options(num_shards=2, resize=256, limit=64), workers=1,
                    progress=False, log=lambda *_: None)
  else:
    synthetic.generate(str(tmp_path / "syn"), num_train=64, num_eval=8, num_shards=2, workers=1)
    images = str(tmp_path / "syn" / "train")
  emb = _aligned_random_embeddings(images, str(tmp_path / "emb"))
  mesh = sharding.make_mesh()
  for mode in ("lift", "clip"):
    c = fakedata.tiny_config(images, emb if mode == "lift" else None, mode=mode,
                             tokenizer=minilm_path, batch=32)
    batches = pipeline.Batches(pipeline.train_dataset(c), sharding.batch_sharding(mesh))
    for _ in range(3):  # more than one epoch of 64
      batch, reasons = next(batches)
      assert batch["image"].shape == (32, 32, 32, 3)
      assert len(batch["image"].sharding.device_set) == 8
      assert bool(np.all(batch["valid"])) and reasons[0] == 32
      assert float(np.asarray(batch["image"]).std()) > 5  # real pixels, not blanks
    batches.close()


def test_clip_batches_tokenise_without_importing_the_models(data, minilm_path):
  """The tokenizer lives with the data: tokenising CLIP captions in the pipeline pulls in neither
  lift_jax.models nor flax (the models use the data formats, never the reverse)."""
  import subprocess
  import sys

  code = ("import sys; sys.path.insert(0, sys.argv[1]); import fakedata; "
          "from lift_jax.data import pipeline; "
          "c = fakedata.tiny_config(sys.argv[2], None, mode='clip', tokenizer=sys.argv[3]); "
          "batch = next(iter(pipeline.train_dataset(c))); assert batch['text'].shape == (16, 16); "
          "bad = sorted(m for m in sys.modules if m.startswith(('lift_jax.models', 'flax'))); "
          "print(bad); sys.exit(1 if bad else 0)")
  proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), data[0],
                         minilm_path], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
