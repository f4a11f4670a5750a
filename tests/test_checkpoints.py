"""Checkpoints that lie, one trainer per workdir, config values checked before anything starts,
the data a run trained on, full disks.

A run (6 steps, checkpoints at 2, 4, 6) is trained once; each case copies its workdir, damages
the newest step the way a network filesystem or a killed writer does, and runs again: the run
moves the damaged step aside, resumes from the step before it, trains the lost steps again and
ends with the parameters of the undamaged run, logging every step once.
"""

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fakedata
import lift_jax
from lift_jax import checkpoint as ckpt
from lift_jax import cli, lock, preflight, train
from lift_jax.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return fakedata.write_dataset(str(tmp_path_factory.mktemp("data")), n=64, shards=2, dim=16)


def cfg(data, steps=6):
  c = fakedata.tiny_config(*data, steps=steps)
  c.checkpoint_every_steps = 2
  return c


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
  w = str(tmp_path_factory.mktemp("trained") / "w")
  train.train_and_evaluate(cfg(data), w)
  return w


def params(workdir):
  p, step = ckpt.restore_params(workdir)
  return jax.tree.map(np.asarray, p), step


def bitwise_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def truncate_params(step_dir):
  files = sorted(glob.glob(os.path.join(step_dir, "params", "d", "*")), key=os.path.getsize)
  with open(files[-1], "r+b") as f:
    f.truncate(os.path.getsize(files[-1]) // 2)


DAMAGES = {
    "params file cut": truncate_params,
    "empty config metadata": lambda d: open(os.path.join(d, "config", "metadata"), "w").close(),
    "no position item": lambda d: shutil.rmtree(os.path.join(d, "position")),
    "no optimizer state": lambda d: shutil.rmtree(os.path.join(d, "train")),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_step_is_moved_aside_and_the_run_goes_on(data, trained, tmp_path,
                                                                damage, caplog):
  w = str(tmp_path / "w")
  shutil.copytree(trained, w)
  DAMAGES[damage](os.path.join(w, "checkpoints", "6"))
  rows = read_jsonl(os.path.join(w, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  # --check names the damage and where the run would resume, and moves nothing (a cut array
  # file shows only when the arrays are read: --check=full).
  table = preflight.check(cfg(data), w, full=damage == "params file cut")
  row = {r[0]: r for r in table.rows}["resume"]
  assert row[1] == "OK" and "resumes from step 4" in row[2] and "[6]" in row[2], table.format()
  assert os.path.isdir(os.path.join(w, "checkpoints", "6"))
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(cfg(data), w)
  warned = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warned) == 1 and "checkpoints/6 is damaged" in warned[0] and "6.damaged" in warned[0]
  assert os.path.isdir(os.path.join(w, "checkpoints", "6.damaged"))  # never deleted
  a, step_a = params(trained)
  b, step_b = params(w)
  assert step_a == step_b == 6 and bitwise_equal(a, b)
  assert [r["step"] for r in read_jsonl(os.path.join(w, "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]


def test_no_intact_step_stops_in_one_line_unless_asked_to_start_over(data, trained, tmp_path):
  w = str(tmp_path / "w")
  shutil.copytree(trained, w)
  for step in (2, 4, 6):
    shutil.rmtree(os.path.join(w, "checkpoints", str(step), "train"))
  with pytest.raises(ckpt.CheckpointError, match=r"holds no intact checkpoint \(damaged, moved "
                     r"aside: 2.damaged, 4.damaged, 6.damaged\).*fresh_start_if_damaged"):
    train.train_and_evaluate(cfg(data), w)
  c = cfg(data, steps=2)
  c.fresh_start_if_damaged = True
  train.train_and_evaluate(c, w)
  assert params(w)[1] == 2
  assert [r["step"] for r in read_jsonl(os.path.join(w, "metrics.jsonl"))] == [1, 2]


def test_loading_a_damaged_step_names_it(trained, tmp_path):
  w = str(tmp_path / "w")
  shutil.copytree(trained, w)
  truncate_params(os.path.join(w, "checkpoints", "6"))
  with pytest.raises(ckpt.DamagedStep, match=r"checkpoints/6/params is damaged: its"):
    lift_jax.load(w)
  open(os.path.join(w, "checkpoints", "6", "config", "metadata"), "w").close()
  r = subprocess.run([sys.executable, "-m", "eval.main", f"--workdir={w}"], cwd=REPO,
                     capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = [line for line in r.stderr.splitlines() if "error" in line]
  assert r.returncode == 1 and lines == [
      f"python -m eval.main: error: {w}/checkpoints/6: its config item is not readable "
      f"({w}/checkpoints/6/config/metadata: Expecting value: line 1 column 1 (char 0))"], r.stderr


def test_a_second_trainer_on_the_same_workdir_stops_at_once(data, tmp_path):
  """The same command started twice (a requeued job whose first copy still runs)."""
  c = tmp_path / "cfg.py"
  c.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(fakedata.__file__)!r})\n"
               "import fakedata\n"
               f"def get_config():\n  return fakedata.tiny_config({data[0]!r}, {data[1]!r}, "
               "steps=2000)\n")
  w = str(tmp_path / "w")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  first = subprocess.Popen([sys.executable, "-m", "lift_jax.main", f"--config={c}",
                            f"--workdir={w}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(w, "metrics.jsonl")) and time.time() < deadline:
      assert first.poll() is None, first.stdout.read()
      time.sleep(0.1)
    t0 = time.time()
    second = subprocess.run([sys.executable, "-m", "lift_jax.main", f"--config={c}",
                             f"--workdir={w}"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 1
    errors = [line for line in second.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"{w} is in use by another trainer (host " in errors[0] and \
        f"pid {first.pid}" in errors[0], second.stderr[-2000:]
    assert time.time() - t0 < 60
    assert first.poll() is None  # the first goes on
  finally:
    first.kill()
    first.wait()


def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path, caplog):
  w = str(tmp_path)
  path = os.path.join(w, lock.LOCK_FILE)
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    live = {"host": __import__("socket").gethostname(), "pid": sleeper.pid, "token": "x",
            "started": time.time(), "refreshed": time.time()}
    with open(path, "w") as f:
      json.dump(live, f)
    with pytest.raises(lock.WorkdirLocked, match=f"pid {sleeper.pid}"):
      lock.WorkdirLock(w, stale_seconds=600).acquire()
  finally:
    sleeper.kill()
    sleeper.wait()
  with caplog.at_level(logging.WARNING):  # its process is gone
    held = lock.WorkdirLock(w, stale_seconds=600, settle_seconds=0.01).acquire()
  assert any("is gone" in r.getMessage() for r in caplog.records)
  held.release()
  assert not os.path.exists(path)
  # Another host (a shared filesystem): judged by its last refresh only.
  other = dict(live, host="another-host", pid=1, refreshed=time.time() - 30)
  with open(path, "w") as f:
    json.dump(other, f)
  with pytest.raises(lock.WorkdirLocked, match="host another-host"):
    lock.WorkdirLock(w, stale_seconds=600).acquire()
  held = lock.WorkdirLock(w, stale_seconds=10, settle_seconds=0.01).acquire()  # 30 s old > 10
  time.sleep(2.7)  # refreshed every stale_seconds / 4
  with open(path) as f:
    assert time.time() - json.load(f)["refreshed"] < 2.6
  held.release()


BAD_VALUES = [
    ("log_every_steps", -1, "log_every_steps=-1 must be an integer >= 0 (0 = off)"),
    ("batch_size", 0, "batch_size=0 must be an integer > 0"),
    ("total_steps", -3, "total_steps=-3 must be an integer >= 0"),
    ("optim.grad_accum_steps", 3, "optim.grad_accum_steps=3 does not divide batch_size=16"),
    ("model.loss", "hinge", "model.loss='hinge': expected one of"),
    ("data.max_skipped_fraction", 1.5, "data.max_skipped_fraction=1.5 must be None or within"),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_refused_by_the_run_and_the_check(data, tmp_path, key, value, message):
  c = cfg(data)
  *parents, name = key.split(".")
  section = c
  for p in parents:
    section = section[p]
  section[name] = value
  with pytest.raises(cli.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # refused before anything was written
  table = preflight.check(c, str(tmp_path / "w"))
  row = {r[0]: r for r in table.rows}["config values"]
  assert table.failed and row[1] == "FAIL" and message in row[2]
  assert not os.path.exists(tmp_path / "w")  # --check writes nothing


def test_log_every_steps_zero_is_off(data, tmp_path):
  c = cfg(data, steps=3)
  c.log_every_steps = 0
  train.train_and_evaluate(c, str(tmp_path / "w"))
  assert [r["step"] for r in read_jsonl(str(tmp_path / "w" / "metrics.jsonl"))] == [3]


def test_resume_on_other_data_is_refused_unless_allowed(data, trained, tmp_path):
  w = str(tmp_path / "w")
  shutil.copytree(trained, w)
  other = fakedata.write_dataset(str(tmp_path / "other"), n=64, shards=2, dim=16, seed=7)
  c = cfg(other, steps=8)
  with pytest.raises(ckpt.CheckpointError, match=r"trained on other data than data.images="
                     f"{other[0]}, data.embeddings={other[1]} holds now"):
    train.train_and_evaluate(c, w)
  row = {r[0]: r for r in preflight.check(c, w).rows}["resume"]
  assert row[1] == "FAIL" and "trained on other data" in row[2]
  c.data.allow_new_data = True
  train.train_and_evaluate(c, w)
  assert params(w)[1] == 8


def test_tensorstore_words_an_os_error_as_the_save_error_parser_expects(tmp_path):
  """checkpoint.TENSORSTORE_OS_ERROR reads the errno out of tensorstore's message: pinned on a
  real one (a write into a folder that is not one)."""
  import tensorstore as ts

  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(Exception) as err:
    ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(blocker / "x")}},
            create=True, dtype=ts.float32, shape=[4]).result()
  code = ckpt.TENSORSTORE_OS_ERROR.search(str(err.value))
  assert code is not None, str(err.value)
  assert int(code[1]) == 20  # ENOTDIR


def test_full_disk_in_convert_is_one_line_and_a_rerun_finishes(full_disk, tmp_path):
  from PIL import Image

  from lift_jax.data import records

  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for i in range(12):  # ~43 kB of noise each, 4 per shard
    Image.fromarray(rng.integers(0, 256, (120, 120, 3), np.uint8)).save(images / f"{i}.png")
  (tmp_path / "captions.tsv").write_text("".join(f"{i}.png\t0\tnoise {i}\n" for i in range(12)))
  filler = full_disk / "filler"
  filler.write_bytes(b"\0" * 700_000)  # leaves room for about one shard
  out = full_disk / "shards"
  args = [sys.executable, "-m", "lift_jax.data.convert", f"--output={out}",
          f"--images={images}", f"--captions={tmp_path / 'captions.tsv'}", "--num_shards=3",
          "--workers=1", "--no_progress"]
  r = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
  errors = [line for line in r.stderr.splitlines() if "error:" in line]
  assert r.returncode == 1 and len(errors) == 1, r.stderr[-2000:]
  assert "could not write" in errors[0] and "No space left on device" in errors[0] and \
      str(out) in errors[0]
  assert not [f for f in os.listdir(out) if ".tmp" in f]  # no temporary file left
  kept = sorted(f for f in os.listdir(out) if f.endswith(".array_record"))
  assert kept  # the shards that fitted are finished and listed
  os.remove(filler)  # free space
  r = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"{len(kept)} of 3 shards verified and kept" in r.stdout + r.stderr
  keys = [k for p in records.list_shards(str(out), records.IMAGES) for k in records.read_keys(p)]
  assert len(keys) == 12 and not [f for f in os.listdir(out) if ".tmp" in f]


def test_full_disk_while_writing_metrics_is_one_line(full_disk):
  from lift_jax import metrics

  w = metrics.MetricWriter(str(full_disk), tensorboard=False)
  with pytest.raises(metrics.MetricsError, match=rf"could not write {full_disk}/metrics.jsonl "
                     r"\(No space left on device\)"):
    for step in range(100_000):
      w.write(step, {"loss": 1.0, "padding": "x" * 200})


def test_writability_of_a_relative_workdir_is_checked_without_creating_it(tmp_path,
                                                                          monkeypatch):
  monkeypatch.chdir(tmp_path)
  ckpt.check_writable("runs/new", create=False)  # (looped forever on a relative path once)
  assert not os.path.exists(tmp_path / "runs")
  (tmp_path / "runs").write_text("a file in the way")
  with pytest.raises(ckpt.CheckpointError, match=f"{tmp_path}/runs is a file"):
    ckpt.check_writable("runs/new", create=False)
