"""Faults a long run meets, each reproduced: unusable data, damaged or stale shards, undecodable
eval images, unwritable workdirs, bad command lines, start-up cost, preemption."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import fakedata
from conftest import small_disk
from lift_jax import checkpoint as ckpt
from lift_jax import metrics, preflight, skip_report, train
from lift_jax.data import pipeline, records

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return fakedata.write_dataset(str(tmp_path_factory.mktemp("data")), n=32, shards=2, dim=16)


def copy_data(data, dest):
  img, emb = (shutil.copytree(d, os.path.join(dest, os.path.basename(d))) for d in data)
  return img, emb


def damage(path: str) -> None:
  """Overwrites 256 bytes of a shard's records with noise, as a bad disk or copy would."""
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(int(size * 0.3))
    f.write(np.random.default_rng(0).bytes(256))


@contextlib.contextmanager
def read_only(path: str):
  """Makes ``path`` unwritable, also for root (immutable flag); skips where neither works."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    undo = lambda: os.chmod(path, 0o755)
  elif shutil.which("chattr") and subprocess.run(["chattr", "+i", path]).returncode == 0:
    undo = lambda: subprocess.run(["chattr", "-i", path], check=True)
  else:
    pytest.skip("cannot make a folder read-only here (root without chattr)")
  try:
    yield
  finally:
    undo()


def run_cli(*args, env=None, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run([sys.executable, "-m", *args], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def one_line_error(proc, command):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines[-1].startswith(f"{command}: error: "), proc.stderr[-3000:]
  return lines[-1]


# ------------------------------------------------------------------------------------------------
# 1. nothing usable


@pytest.mark.parametrize("log_every,stop", [(1, 1), (100, 2)], ids=["at-log", "at-save"])
def test_nothing_usable_stops_before_any_checkpoint(tmp_path, log_every, stop):
  img, emb = fakedata.write_dataset(str(tmp_path / "d"), n=32, shards=2, dim=16,
                                    bad_images=set(range(32)))
  c = fakedata.tiny_config(img, emb, steps=6)
  c.log_every_steps, c.checkpoint_every_steps = log_every, 2
  w = tmp_path / "w"
  n = 16 * stop
  with pytest.raises(train.TrainingError, match=rf"{n} of the {n} training examples .* unusable "
                     r"\(100%.*max_skipped_fraction=0.5.*data_report.json"):
    train.train_and_evaluate(c, str(w))
  report = json.loads((w / "data_report.json").read_text())
  assert report["step"] == stop and report["examples"] == n and report["usable"] == 0
  assert report["skipped_by_reason"] == {"bad_image": n}
  assert not any(d.isdigit() for d in os.listdir(w / "checkpoints"))  # nothing saved


def test_skip_report_counts_by_reason_and_applies_both_limits(tmp_path):
  r = skip_report.SkipReport(str(tmp_path), True, max_skipped=None, max_fraction=0.5, sources={})
  assert r.update(1, {"ok": 14, "bad_image": 2}) is None
  assert r.summary({"ok": 14, "bad_image": 2, "nan_embedding": 0}) == "skipped 2 (bad_image 2)"
  # next interval: 24 more examples of which 13 unusable (54% > 50%), cumulative 15 of 40
  problem = r.update(2, {"ok": 25, "bad_image": 10, "nan_embedding": 5})
  assert "13 of the 24 training examples" in problem and "54%" in problem
  report = json.loads((tmp_path / "data_report.json").read_text())
  assert report["skipped"] == 15 and report["recent"] == {"examples": 24, "skipped": 13}
  r = skip_report.SkipReport(str(tmp_path), True, max_skipped=2, max_fraction=None, sources={})
  assert r.update(1, {"ok": 14, "bad_image": 2}) is None
  assert "3 training examples were unusable by step 2, more than config.data.max_skipped=2" \
      in r.update(2, {"ok": 29, "bad_image": 3})


# ------------------------------------------------------------------------------------------------
# 2. stale embeddings; 11. start-up counts from manifests


def test_embeddings_of_reconverted_images_are_refused(data, tmp_path):
  img, emb = copy_data(data, str(tmp_path))
  manifest = records.read_manifest(emb)
  image_manifest = records.read_manifest(img)
  for e, i in zip(manifest["shards"], image_manifest["shards"]):
    e["image_sha256"] = i["sha256"]
  records.write_manifest(emb, manifest)
  warnings = []
  assert records.check_aligned(img, emb, warn=warnings.append) == [16, 16] and not warnings
  image_manifest["shards"][1]["sha256"] = "0" * 64  # the image shard was re-converted
  records.write_manifest(img, image_manifest)
  with pytest.raises(records.RecordError, match=r"embeddings-00001-of-00002.array_record was "
                     r"computed from another version of .*images-00001-of-00002.*embed.main"):
    pipeline.train_dataset(fakedata.tiny_config(img, emb))
  # Older embedding manifests (no image_sha256) are accepted with one warning.
  for e in manifest["shards"]:
    del e["image_sha256"]
  records.write_manifest(emb, manifest)
  records.check_aligned(img, emb, warn=warnings.append)
  assert len(warnings) == 1 and "2 of 2 shards do not record" in warnings[0]


def test_start_up_opens_no_shard(data, monkeypatch):
  from array_record.python import array_record_module

  opened = []
  real = array_record_module.ArrayRecordReader

  def counting(path, *a, **kw):
    opened.append(os.path.basename(path))
    return real(path, *a, **kw)

  monkeypatch.setattr(array_record_module, "ArrayRecordReader", counting)
  ds = pipeline.train_dataset(fakedata.tiny_config(*data))
  assert opened == []  # counts, alignment and sizes come from the manifests
  batch = next(iter(ds))
  assert batch["image"].shape[0] == 16 and len(opened) > 0  # workers open what they read
  # The manifest's counts are the shards' real counts (what opening them would say).
  _, counts, _ = records.shard_counts(data[0], records.IMAGES)
  monkeypatch.undo()
  assert counts == [records.count_records(p) for p in records.list_shards(data[0], "images")]


def test_folder_without_manifest_is_counted_by_opening_with_a_warning(data, tmp_path):
  img, emb = copy_data(data, str(tmp_path))
  os.remove(os.path.join(img, "manifest.json"))
  warnings = []
  assert records.check_aligned(img, emb, warn=warnings.append) == [16, 16]
  assert "has no manifest.json: counting records by opening its 2 shards" in warnings[0]
  manifest = records.read_manifest(emb)
  manifest["shards"] = manifest["shards"][:1]  # a manifest of another run
  records.write_manifest(emb, manifest)
  with pytest.raises(records.RecordError, match=r"embeddings/manifest.json does not list 1 of "
                     r"the 2 shards .*embeddings-00001-of-00002.array_record"):
    records.check_aligned(img, emb)


# ------------------------------------------------------------------------------------------------
# 6. damaged shard; 10. preflight


def test_damaged_shard_is_named_with_its_record(data, tmp_path):
  img, emb = copy_data(data, str(tmp_path))
  damage(os.path.join(img, "images-00001-of-00002.array_record"))
  source = pipeline.PairedSource(records.list_shards(img, "images"),
                                 records.list_shards(emb, "embeddings"), [16, 16])
  for i in range(16):  # shard 0 is intact
    source[i]
  with pytest.raises(records.RecordError, match=r"images-00001-of-00002.array_record record "
                     r"\d+: damaged shard .*--check=full"):
    for i in range(16, 32):
      source[i]


def test_check_table_and_full_hashing(data, tmp_path):
  img, emb = copy_data(data, str(tmp_path))
  c = fakedata.tiny_config(img, emb)
  table = preflight.check(c, str(tmp_path / "w"), full=True)
  print(table.format())
  assert not table.failed
  rows = {r[0]: r for r in table.rows}
  assert rows["image manifest"][2].startswith("2 shards, 32 records")
  assert rows["image SHA-256"][1:] == ("OK", "2 shards match their SHA-256")
  assert rows["schedule"][2] == "6 steps x 16 = 96 samples, 3.00 epochs of 32 records"
  damage(os.path.join(emb, "embeddings-00000-of-00002.array_record"))
  assert not preflight.check(c, str(tmp_path / "w")).failed  # quick: manifests only
  table = preflight.check(c, str(tmp_path / "w"), full=True)
  rows = {r[0]: r for r in table.rows}
  assert table.failed and rows["embedding SHA-256"][1] == "FAIL"
  assert "embeddings-00000-of-00002.array_record: SHA-256 differs" in rows["embedding SHA-256"][2]
  # Through the command: the table on stdout, exit 1.
  cfg = tmp_path / "cfg.py"
  cfg.write_text(f"import sys\nsys.path.insert(0, {TESTS!r})\nimport fakedata\n"
                 f"def get_config():\n  return fakedata.tiny_config({img!r}, {emb!r})\n")
  proc = run_cli("lift_jax.main", f"--config={cfg}", f"--workdir={tmp_path / 'w'}",
                 "--check=full")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "embedding SHA-256" in proc.stdout and "FAIL" in proc.stdout


# ------------------------------------------------------------------------------------------------
# 7. evaluation faults


def retrieval_set(root) -> dict:
  """Six captioned images: 2.png is not decodable, 5.png is missing."""
  images = root / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  rows = ["filename\tcaption_index\tcaption"]
  for i in range(6):
    rows.append(f"{i}.png\t0\tcaption of image {i}")
    if i == 2:
      (images / f"{i}.png").write_bytes(b"\x89PNG not really")
    elif i != 5:
      Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(images / f"{i}.png")
  (root / "captions.tsv").write_text("\n".join(rows) + "\n")
  return {"type": "retrieval", "captions": str(root / "captions.tsv"), "image_dir": str(images),
          "protocol": "standard", "ks": (1,)}


def test_check_eval_rows_bank_coverage_and_settings(data, tmp_path):
  from eval_fixtures import write_bank

  c = fakedata.tiny_config(*data)
  c.evals.benchmarks = {"r": retrieval_set(tmp_path)}
  c.evals.text_bank = str(tmp_path / "bank")
  write_bank(c.evals.text_bank, [f"caption of image {i}" for i in range(5)])
  rows = {r[0]: r for r in preflight.check(c, str(tmp_path / "w")).rows}
  assert rows["eval r"][1] == "FAIL" and "1 of 6 images are missing" in rows["eval r"][2]
  c.evals.skip_missing = True
  table = preflight.check(c, str(tmp_path / "w"))
  rows = {r[0]: r for r in table.rows}
  assert not table.failed, table.format()
  assert rows["text bank"][1:] == ("OK", f"5 texts, all in {c.evals.text_bank}")
  shutil.rmtree(c.evals.text_bank)
  write_bank(c.evals.text_bank, [f"caption of image {i}" for i in range(1, 5)])
  rows = {r[0]: r for r in preflight.check(c, str(tmp_path / "w")).rows}
  assert rows["text bank"][1] == "FAIL"
  # The run's own check (Predictor/TextBank) says it, in the run's words.
  assert "1 of 5 texts are missing from the text bank" in rows["text bank"][2] and \
      "'caption of image 0'" in rows["text bank"][2]
  shutil.rmtree(c.evals.text_bank)
  write_bank(c.evals.text_bank, [f"caption of image {i}" for i in range(5)])
  manifest = records.read_manifest(c.evals.text_bank)
  records.write_manifest(c.evals.text_bank, {**manifest, "pooling": "last"})
  train_manifest = records.read_manifest(data[1])
  records.write_manifest(data[1], {**train_manifest, "pooling": "mean"})
  try:
    rows = {r[0]: r for r in preflight.check(c, str(tmp_path / "w")).rows}
  finally:
    records.write_manifest(data[1], train_manifest)
  assert rows["text bank"][1] == "FAIL"
  assert "pooling: 'mean' in the embeddings, 'last' in the bank" in rows["text bank"][2]


def test_undecodable_eval_image_is_a_counted_miss_and_skip_missing_needs_no_skipped_texts(
    tmp_path):
  from eval.runner import EvalRunner
  from eval.benchmarks import required_texts
  from eval_fixtures import config, lift_model_config, tiny_model, write_bank
  from eval import benchmarks

  bench = retrieval_set(tmp_path)
  cfg = config(lift_model_config(), {"r": bench}, text_bank=str(tmp_path / "bank"))
  cfg.evals.skip_missing = False
  texts = [t for t in required_texts(cfg.evals) if t != "caption of image 5"]
  write_bank(cfg.evals.text_bank, texts)  # the missing image's caption is not in the bank
  from eval.benchmarks import MissingImagesError

  with pytest.raises(MissingImagesError, match="set skip_missing=True"):
    EvalRunner(benchmarks.resolve_paths(cfg)[0], tiny_model("lift"))
  cfg.evals.skip_missing = True  # as --config.evals.skip_missing=True sets it
  runner = EvalRunner(benchmarks.resolve_paths(cfg)[0], tiny_model("lift"))
  out = runner.run()
  assert out["r/num_images"] == 5 and out["r/skipped_images"] == 1
  assert out["r/unusable_images"] == 1
  # The undecodable image is never retrieved and never retrieves: its caption is a miss.
  emb = runner.predictor.embed_images(runner.evaluators[0].images)
  assert np.isnan(emb[2]).all() and np.isfinite(np.delete(emb, 2, axis=0)).all()
  assert out["r/i2t_r1"] <= 4 / 5 and out["r/t2i_r1"] <= 4 / 5
  # During training a benchmark that fails is reported and the others still run.
  from eval.benchmarks import BenchmarkConfigError

  class Broken:
    name = "broken"

    def run(self, predictor):
      raise BenchmarkConfigError("benchmark 'broken': its labels file vanished")

  runner.evaluators.insert(0, Broken())
  out = runner.run(keep_going=True)
  assert out["broken/failed"] == 1 and out["r/num_images"] == 5
  with pytest.raises(BenchmarkConfigError, match="labels file vanished"):
    runner.run()  # eval.main: the error, as one line


# ------------------------------------------------------------------------------------------------
# 8. unwritable workdir and failed saves


def test_unwritable_workdir_is_refused_at_start(data, tmp_path):
  w = tmp_path / "w"
  (w / "checkpoints").mkdir(parents=True)
  with read_only(str(w / "checkpoints")):
    with pytest.raises(ckpt.CheckpointError, match=r"w/checkpoints is not writable \(.*\): "
                       "free space, fix its permissions or choose another --workdir"):
      train.train_and_evaluate(fakedata.tiny_config(*data), str(w))


def test_failed_save_stops_in_seconds_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
  w = tmp_path / "w"
  c = fakedata.tiny_config(*data, steps=6)
  c.async_checkpoints = True
  c.checkpoint_every_steps = 2
  real_save = ckpt.save_state
  guard = contextlib.ExitStack()
  times = []

  def save_then_lock(mngr, step, *a, **kw):  # the disk fills up after the first checkpoint
    times.append(time.time())
    real_save(mngr, step, *a, **kw)
    if step == 2:
      ckpt.wait_for_saves(mngr)
      guard.enter_context(read_only(str(w / "checkpoints")))

  monkeypatch.setattr(ckpt, "save_state", save_then_lock)
  with guard, pytest.raises(ckpt.CheckpointError, match=r"could not save .* in .*/checkpoints "
                            r"\(.*\); the run stops. Earlier checkpoints there are intact"):
    train.train_and_evaluate(c, str(w))
  print(f"failed save reported {time.time() - times[-1]:.1f} s after it started")
  assert time.time() - times[-1] < 30
  assert ckpt.resolve(str(w)) == (str(w / "checkpoints"), 2)
  ckpt.restore_params(str(w))  # still readable


def test_full_disk_during_a_background_save_is_one_error_in_seconds(tmp_path):
  import jax

  def state(n):
    return {"params": {"w": jax.random.normal(jax.random.PRNGKey(0), (n,))},
            "step": jax.numpy.zeros((), "int32")}

  with small_disk(tmp_path / "disk", "300k") as disk:
    mngr = ckpt.manager(str(disk / "checkpoints"), async_save=True)
    ckpt.save_state(mngr, 1, state(1000), ckpt.Position(), {"model": {}})
    ckpt.wait_for_saves(mngr)
    t0 = time.time()
    with pytest.raises(ckpt.CheckpointError, match=r"could not save a checkpoint in "
                       r".*/disk/checkpoints \(No space left on device: .*\); the run stops"):
      ckpt.save_state(mngr, 2, state(200_000), ckpt.Position(), {"model": {}})  # 800 kB > 300 kB
      ckpt.wait_for_saves(mngr)
    assert time.time() - t0 < 30
    mngr.close()
    assert ckpt.resolve(str(disk)) == (str(disk / "checkpoints"), 1)


# ------------------------------------------------------------------------------------------------
# 9. one-line errors


def test_command_line_errors_are_one_line(data, tmp_path):
  w = f"--workdir={tmp_path / 'w'}"
  proc = run_cli("lift_jax.main", "--config=configs/tiny_synthetic.py", w,
                 "--config.data.bogus=3")
  line = one_line_error(proc, "python -m lift_jax.main")
  assert "--config.data.bogus: no such config key" in line
  proc = run_cli("lift_jax.main", "--config=configs/vitb16_datacomp.py", w)
  line = one_line_error(proc, "python -m lift_jax.main")
  assert "config.data.images is not set" in line and "lift_jax.data.convert" in line
  proc = run_cli("lift_jax.main", "--config=configs/tiny_synthetic.py", w,
                 "--config.data.prepare=webdataset")
  assert "only preparation is 'synthetic'" in one_line_error(proc, "python -m lift_jax.main")
  proc = run_cli("lift_jax.main", "--config=configs/tiny_synthetic.py", w,
                 "--config.data.prepare=None")
  line = one_line_error(proc, "python -m lift_jax.main")
  assert line.endswith("config.data.images is not set: point it at a folder of image shards "
                       "(--config.data.images=DIR), made with `python -m lift_jax.data.convert "
                       "--output=DIR --images=IMAGES_DIR --captions=FILE`")
  proc = run_cli("lift_jax.main", "--config=configs/vitb16_datacomp.py", w,
                 f"--config.data.images={tmp_path}", f"--config.data.embeddings={data[1]}",
                 "--config.model.embed_dim=16")
  assert "no 'images-*-of-*.array_record' shards in" in one_line_error(
      proc, "python -m lift_jax.main")
  proc = run_cli("lift_jax.main", "--config=configs/vitb16_datacomp.py", w,
                 f"--config.data.images={tmp_path}", env={"LIFT_VERBOSE": "1"})
  assert proc.returncode != 0 and "Traceback" in proc.stderr


# ------------------------------------------------------------------------------------------------
# 12. metrics after a resume


def test_metrics_of_steps_after_the_last_checkpoint_are_not_repeated(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 8)))
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False, resume_step=5)  # killed at 7
  w.write(6, {"loss": 60.0})
  w.close()
  rows = metrics.read_jsonl(str(path))
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["loss"] == 60.0


# A run logging every step, checkpointing every 5 and evaluating every 10, killed after step 17:
# the rows it left. LOGGED[10] is step 10's eval row, after its train row.
LOGGED = ([{"step": s, "loss": float(s)} for s in range(1, 11)] + [{"step": 10, "eval/acc": 0.5}]
          + [{"step": s, "loss": float(s)} for s in range(11, 18)])


@pytest.mark.parametrize("resume, kept", [(0, []), (5, LOGGED[:5]), (10, LOGGED[:11]),
                                          (15, LOGGED[:16])])
def test_metrics_after_a_resume_from_each_checkpoint_step(tmp_path, resume, kept):
  """Step 0 is a resume too (killed before its first checkpoint, the run starts over): every
  row goes. At a checkpoint step the rows up to and including it stay, in their order."""
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in LOGGED))
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False, resume_step=resume)
  w.write(resume + 1, {"loss": -1.0})
  w.close()
  rows = metrics.read_jsonl(str(path))
  assert [{k: v for k, v in r.items() if k != "time"} for r in rows] == kept + [
      {"step": resume + 1, "loss": -1.0}]


def test_metrics_are_left_alone_without_a_resume_and_on_other_processes(tmp_path):
  path = tmp_path / "metrics.jsonl"
  text = "".join(json.dumps(r) + "\n" for r in LOGGED)
  path.write_text(text)
  metrics.MetricWriter(str(tmp_path), tensorboard=False).close()  # no resume step: appends
  assert path.read_text() == text
  for step in (0, 5):  # only the primary process rewrites the shared file
    metrics.MetricWriter(str(tmp_path), primary=False, tensorboard=False, resume_step=step).close()
    assert path.read_text() == text


@pytest.mark.slow
def test_start_up_at_40000_shards(tmp_path, monkeypatch):
  """Start-up at DataComp's shard count: manifests only, no shard opened on the main process."""
  from array_record.python import array_record_module

  n = 40_000
  rng = np.random.default_rng(0)
  image = fakedata.png(rng)
  img, emb = tmp_path / "images", tmp_path / "embeddings"
  img.mkdir()
  emb.mkdir()
  img_entries, emb_entries = [], []
  for i in range(n):
    key = f"{i:06d}"
    img_entries.append(records.write_shard(str(img / records.shard_name("images", i, n)),
                                           [records.image_record(key, image, "a caption")]))
    e = records.write_shard(str(emb / records.shard_name("embeddings", i, n)),
                            [records.embedding_record(key, np.ones(16, np.float32))])
    emb_entries.append({**e, "image_sha256": img_entries[-1]["sha256"]})
  records.write_manifest(str(img), {"kind": "images", "shards": img_entries})
  records.write_manifest(str(emb), {"kind": "embeddings", "dim": 16, "shards": emb_entries})
  opened = []
  real = array_record_module.ArrayRecordReader
  monkeypatch.setattr(array_record_module, "ArrayRecordReader",
                      lambda path, *a, **kw: opened.append(path) or real(path, *a, **kw))
  t0 = time.perf_counter()
  ds = pipeline.train_dataset(fakedata.tiny_config(str(img), str(emb)))
  start_up = time.perf_counter() - t0
  assert not opened  # start-up reads the manifests only
  batch = next(iter(ds))
  first = time.perf_counter() - t0
  time.sleep(1)  # the reader thread reads ahead (grain's bounded prefetch) meanwhile
  print(f"start-up over {n:,} image + {n:,} embedding shards: {start_up:.2f} s "
        f"(first batch after {first:.2f} s; {len(opened)} shards opened 1 s later)")
  # The first batch's 16 records and the next batch read ahead: 2 shards each, never the 40,000.
  assert batch["valid"].all() and len(opened) <= 2 * 2 * 16
  assert start_up < 60
  t0 = time.perf_counter()  # what start-up did before: count every shard by opening it (twice)
  paths = records.list_shards(str(img), "images") + records.list_shards(str(emb), "embeddings")
  assert sum(records.count_records(p) for p in paths) == 2 * n
  print(f"opening each of the {2 * n:,} shards once: {time.perf_counter() - t0:.2f} s")
