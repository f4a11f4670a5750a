"""The trainer: learning, 1 device == 8 devices (data and FSDP), exact resume after kill -9,
SIGTERM and Ctrl-C, non-finite stop, config refusal, bad records, two real processes == one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fakedata
from lift_jax import checkpoint as ckpt
from lift_jax import train
from lift_jax.metrics import read_jsonl

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return fakedata.write_dataset(str(root), n=96, shards=3, dim=16)


def final_params(workdir):
  params, step = ckpt.restore_params(workdir)
  return jax.tree.map(np.asarray, params), step


def max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))


def bitwise_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def config_file(tmp_path, name, body):
  path = tmp_path / f"{name}.py"
  path.write_text(
      "import sys\n"
      f"sys.path.insert(0, {TESTS!r})\n"
      "import fakedata\n"
      "def get_config():\n"
      f"  c = {body}\n"
      "  return c\n")
  return str(path)


def run_main(cfg, workdir, *extra, devices=8, env=None, **kw):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(env or {})}
  return subprocess.Popen([sys.executable, "-m", "lift_jax.main", f"--config={cfg}",
                           f"--workdir={workdir}", *extra], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


# ------------------------------------------------------------------------------------------------


def test_lift_learns_and_logs(data, tmp_path):
  c = fakedata.tiny_config(*data, steps=24)
  c.optim.lr = 3e-3
  out = train.train_and_evaluate(c, str(tmp_path / "w"))
  rows = read_jsonl(str(tmp_path / "w" / "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, 25))
  first, last = np.mean([r["loss"] for r in rows[:4]]), np.mean([r["loss"] for r in rows[-4:]])
  print(f"LIFT tiny: loss {first:.3f} -> {last:.3f}")
  assert last < first - 0.3
  for key in ("loss", "lr", "logit_scale", "grad_norm", "img_per_s", "img_per_s_per_device",
              "skipped"):
    assert key in rows[-1], key
  assert rows[0]["lr"] == pytest.approx(1.5e-3)  # warmup: lr * (0 + 1) / 2
  assert out["loss"] == rows[-1]["loss"]
  saved = json.load(open(tmp_path / "w" / "config.json"))
  assert saved["model"]["mode"] == "lift" and saved["total_steps"] == 24


def test_clip_learns(data, tmp_path, minilm_path):
  c = fakedata.tiny_config(data[0], None, mode="clip", steps=24, tokenizer=minilm_path)
  c.optim.lr = 3e-3
  train.train_and_evaluate(c, str(tmp_path / "w"))
  rows = read_jsonl(str(tmp_path / "w" / "metrics.jsonl"))
  first, last = np.mean([r["loss"] for r in rows[:4]]), np.mean([r["loss"] for r in rows[-4:]])
  print(f"CLIP tiny: loss {first:.3f} -> {last:.3f}")
  assert last < first - 0.3
  assert "grad_norm" in rows[-1]


@pytest.mark.parametrize("mesh", [dict(data=8, fsdp=1), dict(data=2, fsdp=4)])
def test_eight_devices_equal_one(data, tmp_path, mesh):
  results = {}
  for name, m in (("one", dict(data=1, fsdp=1, num_devices=1)), ("eight", mesh)):
    c = fakedata.tiny_config(*data, steps=4)
    c.mesh.data, c.mesh.fsdp = m["data"], m["fsdp"]
    c.mesh.num_devices = m.get("num_devices")
    if m["fsdp"] > 1:
      c.sharding_rules = ((".*", "fsdp"),)
    train.train_and_evaluate(c, str(tmp_path / name))
    results[name] = (final_params(str(tmp_path / name))[0],
                     [r["loss"] for r in read_jsonl(str(tmp_path / name / "metrics.jsonl"))])
  np.testing.assert_allclose(results["eight"][1], results["one"][1], rtol=2e-5)
  diff = max_diff(results["eight"][0], results["one"][0])
  print(f"{mesh}: max |params_8 - params_1| = {diff:.2e}")
  assert diff < 2e-5


def test_fsdp_shards_parameters(data):
  from flax import nnx

  from lift_jax import sharding
  from lift_jax.models.two_tower import TwoTower

  c = fakedata.tiny_config(*data)
  mesh = sharding.make_mesh(2, 4)
  abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(
      lambda: TwoTower(c.model.to_dict(), rngs=nnx.Rngs(0))))[1])
  sh = sharding.param_shardings(abstract, mesh, [("ln_", "replicated"), (".*", "fsdp")])
  kernel = sh["visual"]["transformer"]["resblocks"][0]["mlp"]["c_fc"]["kernel"]
  assert kernel.spec == jax.sharding.PartitionSpec(None, "fsdp")  # (32, 64): the larger dim
  assert sh["visual"]["ln_pre"]["scale"].spec == jax.sharding.PartitionSpec()


def test_gradient_accumulation_is_exact(data, tmp_path):
  losses = {}
  params = {}
  for accum in (1, 4):
    c = fakedata.tiny_config(*data, steps=3)
    c.optim.grad_accum_steps = accum
    w = str(tmp_path / f"a{accum}")
    train.train_and_evaluate(c, w)
    losses[accum] = [r["loss"] for r in read_jsonl(os.path.join(w, "metrics.jsonl"))]
    params[accum] = final_params(w)[0]
  np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)
  assert max_diff(params[4], params[1]) < 1e-5


def test_kill_9_and_resume_is_bitwise_identical(data, tmp_path):
  body = f"fakedata.tiny_config({data[0]!r}, {data[1]!r}, steps=40)"
  cfg = config_file(tmp_path, "cfg", body + "; c.checkpoint_every_steps = 5; "
                    "c.async_checkpoints = True; c.data.workers = 2")
  ref = run_main(cfg, str(tmp_path / "ref"))
  assert ref.wait(timeout=600) == 0, ref.stdout.read()

  w = str(tmp_path / "killed")
  p = run_main(cfg, w)
  metrics = os.path.join(w, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline:
    if os.path.exists(metrics) and len(read_jsonl(metrics)) >= 17:
      break
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  killed_at = len(read_jsonl(metrics))
  assert killed_at < 40, "the run finished before it could be killed"
  r = run_main(cfg, w)
  out = r.communicate(timeout=600)[0]
  assert r.returncode == 0, out
  a, step_a = final_params(str(tmp_path / "ref"))
  b, step_b = final_params(w)
  print(f"killed after step {killed_at}; resumed run ended at step {step_b}")
  assert step_a == step_b == 40
  assert bitwise_equal(a, b)
  ref_loss = {r["step"]: r["loss"] for r in read_jsonl(str(tmp_path / "ref" / "metrics.jsonl"))}
  rows = read_jsonl(metrics)
  assert [r["step"] for r in rows] == list(range(1, 41))  # no step logged twice
  for row in rows:  # every logged step (before and after the kill) matches
    assert row["loss"] == ref_loss[row["step"]]


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["sigterm", "ctrl-c"])
def test_signal_saves_a_restorable_checkpoint(data, tmp_path, signum, code):
  body = f"fakedata.tiny_config({data[0]!r}, {data[1]!r}, steps=400)"
  cfg = config_file(tmp_path, "cfg", body + "; c.checkpoint_every_steps = 1000")
  w = str(tmp_path / "w")
  p = run_main(cfg, w)
  metrics = os.path.join(w, "metrics.jsonl")
  while not (os.path.exists(metrics) and len(read_jsonl(metrics)) >= 5):
    assert p.poll() is None, p.stdout.read()
    time.sleep(0.05)
  p.send_signal(signum)
  out = p.communicate(timeout=120)[0]
  assert p.returncode == code, out  # 128 + signal: a preempted run is not a finished one
  assert f"{signal.Signals(signum).name} received: saving a checkpoint" in out
  params, step = final_params(w)
  assert 5 <= step < 400
  assert len(read_jsonl(metrics)) == step  # it stopped right after saving


def test_non_finite_stops_and_keeps_last_good_checkpoint(data, tmp_path):
  w = str(tmp_path / "w")
  c = fakedata.tiny_config(*data, steps=4)
  train.train_and_evaluate(c, w)
  good, _ = final_params(w)
  c = fakedata.tiny_config(*data, steps=12)
  c.optim.lr = 1e38  # blows the parameters up within a step or two
  c.optim.warmup_steps = 0
  c.optim.grad_clip_norm = None
  with pytest.raises(train.TrainingError, match=r"non-finite loss or gradient at step \d+.*"
                     r"last good checkpoint is step 4"):
    train.train_and_evaluate(c, w)
  after, step = final_params(w)
  assert step == 4 and bitwise_equal(after, good)


def test_workdir_refuses_a_different_model(data, tmp_path):
  w = str(tmp_path / "w")
  train.train_and_evaluate(fakedata.tiny_config(*data, steps=2), w)
  c = fakedata.tiny_config(*data, steps=4)
  c.model.vit.width = 48
  c.batch_size = 32
  with pytest.raises(ckpt.CheckpointError) as e:
    train.train_and_evaluate(c, w)
  assert "model.vit.width: checkpoint 32, config 48" in str(e.value)
  assert "batch_size: checkpoint 16, config 32" in str(e.value)
  # Compute-only fields may change on resume.
  c = fakedata.tiny_config(*data, steps=4)
  c.model.remat = True
  train.train_and_evaluate(c, w)
  assert final_params(w)[1] == 4


def test_bad_records_are_skipped_counted_and_limited(tmp_path, caplog):
  img, emb = fakedata.write_dataset(str(tmp_path / "d"), n=32, shards=2, dim=16,
                                    bad_images={3, 20}, nan_embeddings={7}, flagged={9})
  c = fakedata.tiny_config(img, emb, steps=2)  # 2 steps x 16 = one pass over the 32 examples
  caplog.set_level("INFO")
  train.train_and_evaluate(c, str(tmp_path / "w"))
  rows = read_jsonl(str(tmp_path / "w" / "metrics.jsonl"))
  assert rows[-1]["skipped"] == 4
  assert sum(r["skipped_in_batch"] for r in rows) == 4
  by_reason = {"bad_image": 2, "nan_embedding": 1, "flagged_embedding": 1}
  assert {k[len("skipped/"):]: v for k, v in rows[-1].items()
          if k.startswith("skipped/")} == by_reason
  assert any(r.getMessage().startswith("step 2/2 ") and r.getMessage().endswith(
      "skipped 4 (bad_image 2, nan_embedding 1, flagged_embedding 1)") for r in caplog.records)
  report = json.loads((tmp_path / "w" / "data_report.json").read_text())
  assert report["examples"] == 32 and report["usable"] == 28
  assert report["skipped_by_reason"] == by_reason and report["stopped"] is None
  assert all(np.isfinite(r["loss"]) for r in rows)
  c = fakedata.tiny_config(img, emb, steps=4)
  c.data.max_skipped = 5
  with pytest.raises(train.TrainingError, match="more than config.data.max_skipped=5.*"
                     "data_report.json"):
    train.train_and_evaluate(c, str(tmp_path / "w2"))


def test_misaligned_embeddings_name_shard_and_record(tmp_path):
  img, emb = fakedata.write_dataset(str(tmp_path / "d"), n=32, shards=2, dim=16,
                                    key_swap=(21, "bogus"))
  c = fakedata.tiny_config(img, emb, steps=2)
  with pytest.raises(Exception, match=r"embeddings-00001-of-00002.array_record record 5 has key "
                     r"'bogus'"):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  c = fakedata.tiny_config(img, emb, dim=8, steps=2)
  with pytest.raises(Exception, match="embeddings have dim 16, but config.model.embed_dim is 8"):
    train.train_and_evaluate(c, str(tmp_path / "w3"))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(data, tmp_path):
  """jax.distributed over gloo: 2 processes x 2 CPU devices == 1 process x 4 devices."""
  body = f"fakedata.tiny_config({data[0]!r}, {data[1]!r}, steps=4)"
  cfg = config_file(tmp_path, "cfg", body + "; c.async_checkpoints = True")
  single = run_main(cfg, str(tmp_path / "single"), devices=4)
  assert single.wait(timeout=600) == 0, single.stdout.read()
  port = _free_port()
  procs = [run_main(cfg, str(tmp_path / "multi"), f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2", f"--process_id={i}", devices=2) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  assert "process 1/2" in outs[1] or "process 1/2" in outs[0]
  a, _ = final_params(str(tmp_path / "single"))
  b, _ = final_params(str(tmp_path / "multi"))
  diff = max_diff(a, b)
  print(f"2 processes vs 1: max param diff {diff:.2e}")
  assert diff < 2e-5
  la = [r["loss"] for r in read_jsonl(str(tmp_path / "single" / "metrics.jsonl"))]
  lb = [r["loss"] for r in read_jsonl(str(tmp_path / "multi" / "metrics.jsonl"))]
  np.testing.assert_allclose(lb, la, rtol=2e-5)


class CountingEvaluators:
  """Stands in for eval.runner.EvalRunner: a made-up score that depends on the parameters."""

  def __init__(self):
    self.calls, self.timings = 0, {"probe": 0.0}

  def run(self, params, keep_going=False):
    self.calls += 1
    norm = sum(float(np.abs(np.asarray(x)).sum()) for x in jax.tree.leaves(params))
    return {"probe/score": norm % 1.0}


def test_a_finished_run_started_again_is_not_evaluated_twice(data, tmp_path):
  made = []

  def evaluators(config, model, mesh):
    made.append(CountingEvaluators())
    return made[-1]

  w = str(tmp_path / "w")
  first = train.train_and_evaluate(fakedata.tiny_config(*data, steps=4), w, evaluators)
  again = train.train_and_evaluate(fakedata.tiny_config(*data, steps=4), w, evaluators)
  assert made[0].calls == 1 and made[1].calls == 0
  assert again["eval/probe/score"] == first["eval/probe/score"]
  rows = [r for r in read_jsonl(os.path.join(w, "metrics.jsonl")) if "eval/probe/score" in r]
  assert [r["step"] for r in rows] == [4]  # one evaluation row for the final step
  # A longer run resumed from there trains on and evaluates its own final step.
  train.train_and_evaluate(fakedata.tiny_config(*data, steps=6), w, evaluators)
  rows = [r for r in read_jsonl(os.path.join(w, "metrics.jsonl")) if "eval/probe/score" in r]
  assert [r["step"] for r in rows] == [4, 6] and made[2].calls == 1
