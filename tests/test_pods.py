"""Pods with real JAX processes on localhost (gloo): resume on another topology, a lost process
ends the job in bounded time, the SLURM launch path, evaluation on several processes.

Every run trains the same tiny config; the reference is one uninterrupted run on 1 process x 4
devices. "Same examples at every step" is checked through the examples digest that
data_report.json records (an order-sensitive sum over every (step, record) trained on) and the
loss logged at every step; "same training" through the final parameters.
"""

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
from lift_jax.metrics import read_jsonl

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
STEPS = 30


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return fakedata.write_dataset(str(tmp_path_factory.mktemp("pods")), n=96, shards=3, dim=16)


def config_file(path, data, steps=STEPS, extra=""):
  path.write_text(
      f"import sys\nsys.path.insert(0, {TESTS!r})\nimport fakedata\n"
      "def get_config():\n"
      f"  c = fakedata.tiny_config({data[0]!r}, {data[1]!r}, steps={steps})\n"
      "  c.checkpoint_every_steps = 2\n"
      f"{extra}"
      "  return c\n")
  return str(path)


def launch(cfg, workdir, *extra, processes=1, devices=4, slurm=False, env=None):
  """Starts lift_jax.main on ``processes`` processes of ``devices // processes`` CPU devices:
  with --coordinator_address flags, or (slurm) with only SLURM's variables for JAX to detect."""
  port = free_port()
  procs = []
  for i in range(processes):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORD"))}
    e.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS":
              f"--xla_force_host_platform_device_count={devices // processes}", **(env or {})})
    args = [f"--config={cfg}", f"--workdir={workdir}", *extra]
    if processes > 1 and slurm:
      e.update({"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1",
                "SLURM_NTASKS": str(processes), "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
                "JAX_COORDINATOR_PORT": str(port)})
    elif processes > 1:
      args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
               f"--process_id={i}"]
    procs.append(subprocess.Popen([sys.executable, "-m", "lift_jax.main", *args], env=e,
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  return procs


def finish(procs, timeout=600):
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def stop_after(procs, workdir, rows, signum):
  """Sends ``signum`` to every process once metrics.jsonl holds ``rows`` rows; their output."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(metrics) and
                                        len(read_jsonl(metrics)) >= rows):
    assert all(p.poll() is None for p in procs), procs[0].stdout.read()[-3000:]
    time.sleep(0.02)
  for p in procs:
    p.send_signal(signum)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert len(read_jsonl(metrics)) < STEPS, "the run finished before it could be stopped"
  return outs


def params(workdir):
  p, step = ckpt.restore_params(workdir)
  return jax.tree.map(np.asarray, p), step


def max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "loss" in r}


def digest(workdir):
  with open(os.path.join(workdir, "data_report.json"), encoding="utf-8") as f:
    return json.load(f)["examples_digest"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
  """One uninterrupted run on 1 process x 4 devices."""
  root = tmp_path_factory.mktemp("reference")
  cfg = config_file(root / "cfg.py", data)
  finish(launch(cfg, str(root / "w")))
  return str(root / "w"), cfg


def test_resume_on_other_topologies_continues_the_same_run(reference, tmp_path):
  """1 process x 4 devices -> 2 processes x 2 (found through SLURM's variables) -> 1 process x 2
  devices: the same examples at every step, the same losses and final parameters as the run that
  was never stopped."""
  ref, cfg = reference
  w = str(tmp_path / "w")
  stop_after(launch(cfg, w), w, 4, signal.SIGTERM)
  outs = stop_after(launch(cfg, w, processes=2, slurm=True), w, 12, signal.SIGTERM)
  log = "\n".join(outs)
  assert "process 1 of 2 (coordinator detected from the cluster)" in log, log[-3000:]
  assert "saved by 1 processes x 4 devices, on 2 x 2" in log, log[-3000:]
  (out,) = finish(launch(cfg, w, devices=2))
  assert "saved by 2 processes x 2 devices, on 1 x 2" in out, out[-3000:]
  a, step_a = params(ref)
  b, step_b = params(w)
  assert step_a == step_b == STEPS
  print(f"1x4 -> 2x2 -> 1x2 vs 1x4: max param diff {max_diff(a, b):.2e}")
  assert max_diff(a, b) < 3e-5
  la, lb = losses(ref), losses(w)
  assert sorted(lb) == list(range(1, STEPS + 1))  # every step logged exactly once
  np.testing.assert_allclose([lb[s] for s in sorted(la)], [la[s] for s in sorted(la)], rtol=3e-5)
  assert digest(w) == digest(ref)  # the same records at the same steps


def test_a_lost_process_ends_the_job_then_one_process_resumes_it(reference, tmp_path):
  """kill -9 of one of 2 processes mid-run: the other exits non-zero within the bound, naming
  it; the run resumed on 1 process ends like the uninterrupted one."""
  ref, cfg = reference
  w = str(tmp_path / "w")
  bound = 15
  procs = launch(cfg, w, f"--lost_host_timeout={bound}", processes=2)
  metrics = os.path.join(w, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(metrics) and
                                        len(read_jsonl(metrics)) >= 5):
    assert all(p.poll() is None for p in procs), procs[0].stdout.read()[-3000:]
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  t0 = time.time()
  out = procs[0].communicate(timeout=bound * 4)[0]
  waited = time.time() - t0
  procs[1].wait()
  print(f"survivor exited with {procs[0].returncode} after {waited:.1f} s")
  assert procs[0].returncode != 0
  assert waited < bound * 1.5 + 5, out[-3000:]
  assert "process 1 of 2 was lost" in out, out[-3000:]
  assert len(read_jsonl(metrics)) < STEPS, "the run finished before it could be killed"
  finish(launch(cfg, w))
  a, _ = params(ref)
  b, step = params(w)
  assert step == STEPS and max_diff(a, b) < 3e-5
  assert sorted(losses(w)) == list(range(1, STEPS + 1))
  assert digest(w) == digest(ref)


def test_in_training_evaluation_is_the_same_on_two_processes(data, tmp_path):
  """A retrieval benchmark over image shards, evaluated during training: 2 processes x 2
  devices give the numbers of 1 process x 4."""
  from eval.benchmarks import required_texts
  from eval_fixtures import write_bank

  bench = {"type": "retrieval", "shards": data[0], "protocol": "standard", "limit": 24}
  bank = write_bank(str(tmp_path / "bank"), required_texts({"benchmarks": {"r": bench}}))
  cfg = config_file(tmp_path / "cfg.py", data, steps=4, extra=(
      f"  c.evals.benchmarks = {{'r': {bench!r}}}\n"
      f"  c.evals.text_bank = {bank!r}\n  c.evals.batch_size = 16\n"
      "  c.eval_every_steps = 2\n"))
  finish(launch(cfg, str(tmp_path / "one")))
  finish(launch(cfg, str(tmp_path / "two"), processes=2))

  def evals(w):
    return {(r["step"], k): v for r in read_jsonl(str(tmp_path / w / "metrics.jsonl"))
            for k, v in r.items() if k.startswith("eval/r/")}

  one, two = evals("one"), evals("two")
  assert {s for s, _ in one} == {2, 4} and one.keys() == two.keys()
  assert one[(4, "eval/r/num_images")] == 24
  for key in one:
    assert two[key] == pytest.approx(one[key], abs=1e-6), key


def test_topology_that_cannot_hold_the_batch_is_refused_in_one_line(data, tmp_path):
  cfg = config_file(tmp_path / "cfg.py", data)
  (p,) = launch(cfg, str(tmp_path / "w"), devices=3)
  out = p.communicate(timeout=300)[0]
  assert p.returncode == 1
  errors = [line for line in out.splitlines() if "error:" in line]
  assert errors == ["python -m lift_jax.main: error: batch_size=16 does not divide by the 3 "
                    "devices (1 processes): use a multiple of 3"], out[-2000:]
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_data_position_of_an_older_step_is_read_from_its_iterator_files(tmp_path):
  """Steps written before the position item hold grain's per-process files: the batch count is
  read from them and the counts summed, whatever the number of files."""
  step = tmp_path / "6"
  (step / "data").mkdir(parents=True)
  for i, reasons in enumerate(([90, 1, 0, 0, 0, 0], [93, 0, 2, 0, 0, 0])):
    (step / "data" / f"process_{i}-of-2.json").write_text(json.dumps(
        {"grain": {"next_index": 6}, "batches": 6, "reasons": reasons}))
  position = ckpt.read_position(str(step))
  assert position.batches == 6 and position.reasons == [183, 1, 2, 0, 0, 0]
  os.remove(step / "data" / "process_1-of-2.json")
  with pytest.raises(ckpt.DamagedStep, match="lacks some processes' files"):
    ckpt.read_position(str(step))
