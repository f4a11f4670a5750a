"""The demo end to end (--quick), its reuse of finished stages, and its report's numbers."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from lift_jax import checkpoint as ckpt
from lift_jax.tools import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(workdir):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a laptop
  return subprocess.run([sys.executable, "-m", "lift_jax.tools.demo", f"--workdir={workdir}",
                         "--quick"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)


def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
  first = run_demo(tmp_path / "demo")
  w = tmp_path / "demo" / "quick"  # --quick lives beside a full run
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  out = first.stdout
  for stage in ("[1/6]", "[3/6] train LIFT: 20 steps", "[4/6] train CLIP: 20 steps", "[5/6]",
                "[6/6] report"):
    assert stage in out, out
  text = (w / "report.md").read_text()
  assert "| compositional/swap_att |" in text and "| retrieval/t2i_r1 |" in text
  for png in ("loss.png", "accuracy.png"):
    assert (w / png).stat().st_size > 5000
  for name in ("lift", "clip"):  # TensorBoard logs beside the report (tensorflow is installed)
    assert any((w / name / "tensorboard").rglob("events.out.tfevents*"))
  # The report's numbers are the eval JSON's, with intervals that contain them.
  for name in ("lift", "clip"):
    (metrics_file,) = (w / name / "eval").glob("demo-metrics-*.json")
    metrics = json.loads(metrics_file.read_text())["metrics"]
    p = metrics["compositional/swap_att"]
    row = next(line for line in text.splitlines() if line.startswith("| compositional/swap_att"))
    cell = row.split("|")[2 if name == "lift" else 3]
    value, lo, hi = map(float, re.findall(r"[\d.]+", cell))
    assert value == pytest.approx(100 * p, abs=0.051)
    assert lo <= value <= hi
  # Both runs used the same image tower, data, steps and seed.
  cfg = {n: json.loads((w / n / "config.json").read_text()) for n in ("lift", "clip")}
  for key in ("seed", "total_steps", "batch_size"):
    assert cfg["lift"][key] == cfg["clip"][key]
  assert cfg["lift"]["model"]["variant"] == cfg["clip"]["model"]["variant"]
  assert cfg["lift"]["data"]["images"] == cfg["clip"]["data"]["images"]

  again = run_demo(tmp_path / "demo")
  assert again.returncode == 0, again.stdout[-3000:]
  assert "train LIFT: finished earlier" in again.stdout
  assert "train CLIP: finished earlier" in again.stdout
  assert "evaluated earlier" in again.stdout
  assert "skipping the embedding job" in again.stdout or "ready" in again.stdout

  # Ctrl-C in the terminal while LIFT trains, through scripts/demo.sh: the terminal signals the
  # foreground process group (demo.sh's python); the demo forwards it to the trainer, which saves
  # at the next step boundary; the demo then exits 130 in one line, without a traceback.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "LIFT_VENV": sys.prefix}
  env.pop("XLA_FLAGS", None)
  longer = subprocess.Popen(["bash", "scripts/demo.sh", f"--workdir={tmp_path / 'demo'}",
                             "--quick", "--steps=5000"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
  metrics = w / "lift" / "metrics.jsonl"
  logged = lambda: len(metrics.read_text().splitlines())  # noqa: E731
  deadline = time.time() + 600
  while logged() < 6:  # 4 rows from the first 20 steps, then 2 of this run
    assert longer.poll() is None and time.time() < deadline, longer.communicate()[0][-3000:]
    time.sleep(0.2)
  rows_before = logged()
  sent = time.time()
  os.killpg(longer.pid, signal.SIGINT)
  out = longer.communicate(timeout=300)[0]
  waited = time.time() - sent
  assert longer.returncode == 130, out[-3000:]
  assert "Traceback" not in out
  assert out.strip().splitlines()[-1].startswith("python -m lift_jax.tools.demo: stopped by "
                                                 "SIGINT"), out[-2000:]
  log = (w / "logs" / "train_lift.log").read_text()
  saved = int(re.findall(r"saving at step (\d+) \(SIGINT\), then stopping", log)[-1])
  assert ckpt.latest_step(str(w / "lift")) == saved
  assert saved >= 5 * rows_before  # at least the steps logged before the signal (every 5th)
  assert "Traceback" not in log
  print(f"Ctrl-C at {rows_before} logged rows: saved step {saved}, demo exited 130 after "
        f"{waited:.1f} s")
  assert waited < 60


def test_wilson_interval_against_hand_computed_values():
  # p = 0.5, n = 100: centre 0.5, half-width 1.96 * sqrt(0.25/100 + 1.96^2/40000) / (1 + 0.0384)
  lo, hi = report.wilson(0.5, 100)
  assert lo == pytest.approx(0.40383, abs=1e-4) and hi == pytest.approx(0.59617, abs=1e-4)
  lo, hi = report.wilson(1.0, 20)  # a perfect score still has a lower bound below 1
  assert lo == pytest.approx(0.83887, abs=1e-4) and hi == 1.0
