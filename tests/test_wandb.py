"""Weights & Biases logging, in W&B's offline mode (no network), checked in the files W&B writes:
a tiny training run's scalars (the values metrics.jsonl holds), its config, a resumed run
continuing the same W&B run, eval results as a table; the trainer without wandb installed."""

import json
import os
import subprocess
import sys

import pytest

import fakedata
import wandb_records
from conftest import REPO, require
from lift_jax import train
from lift_jax.metrics import WANDB_RUN, MetricWriter, read_jsonl

require("wandb")


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path, monkeypatch):
  """W&B's own settings, cache and staging folders in the test's temporary folder."""
  for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
    monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.delenv("WANDB_MODE", raising=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return fakedata.write_dataset(str(tmp_path_factory.mktemp("data")), n=64, shards=2, dim=16)


def test_tiny_run_logs_its_scalars_and_config_and_resumes_the_same_run(data, tmp_path):
  w = str(tmp_path / "w")
  c = fakedata.tiny_config(*data, steps=4)
  c.wandb.project, c.wandb.mode, c.wandb.tags = "lift-tests", "offline", ("tiny",)
  train.train_and_evaluate(c, w)
  c.total_steps = 6  # the same workdir again: resumes from step 4
  train.train_and_evaluate(c, w)

  first, second = (wandb_records.read_run(d) for d in wandb_records.offline_runs(w))
  with open(os.path.join(w, WANDB_RUN), encoding="utf-8") as f:
    run_id = json.load(f)["id"]
  assert first["id"] == second["id"] == run_id
  rows = {r["step"]: r for r in read_jsonl(os.path.join(w, "metrics.jsonl"))}
  assert sorted(first["history"]) == [1, 2, 3, 4] and sorted(second["history"]) == [5, 6]
  for step, logged in {**first["history"], **second["history"]}.items():
    for key in ("loss", "lr", "grad_norm", "logit_scale"):
      assert logged[key] == rows[step][key], (step, key)
  assert first["config"]["total_steps"] == 4 and second["config"]["total_steps"] == 6
  assert first["config"]["model"]["mode"] == "lift"
  assert first["config"]["wandb"]["project"] == "lift-tests"


def test_eval_results_are_logged_as_scalars_and_a_table(tmp_path):
  w = str(tmp_path / "w")
  os.makedirs(w)
  writer = MetricWriter(w, tensorboard=False, wandb={"project": "lift-tests", "mode": "offline"},
                        run_config={"seed": 3})
  writer.write(2, {"loss": 1.5})
  results = {"eval/compositional/add_att": 0.5, "eval/classification/top1": 0.25,
             "eval/seconds": 3.0}
  writer.write(2, results)
  writer.close()
  (run_dir,) = wandb_records.offline_runs(w)
  run = wandb_records.read_run(run_dir)
  row = run["history"][2]
  assert {k: row[k] for k in results} == results and row["loss"] == 1.5
  table = wandb_records.table(run_dir, row, "eval/results")
  assert table["columns"] == ["step", "benchmark", "metric", "value"]
  assert table["data"] == [[2, "classification", "top1", 0.25],
                           [2, "compositional", "add_att", 0.5]]
  assert run["config"]["seed"] == 3


_WITHOUT_WANDB = r"""
import sys, tempfile
sys.modules["wandb"] = None  # as if not installed: `import wandb` raises ImportError
from lift_jax import cli, metrics, train
workdir = tempfile.mkdtemp()
metrics.MetricWriter(workdir, tensorboard=False, wandb={"project": None}).close()
# Only process 0 logs: the others never start W&B, installed or not.
metrics.MetricWriter(workdir, primary=False, tensorboard=False, wandb={"project": "p"}).close()
try:
  metrics.MetricWriter(workdir, tensorboard=False, wandb={"project": "p"})
except cli.ConfigError as e:
  print("ERROR:", e)
"""


def test_the_trainer_works_without_wandb_installed():
  r = subprocess.run([sys.executable, "-c", _WITHOUT_WANDB], cwd=REPO, capture_output=True,
                     text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
  assert r.returncode == 0, r.stderr[-3000:]
  (error,) = [line for line in r.stdout.splitlines() if line.startswith("ERROR:")]
  assert "wandb.project='p'" in error and "pip install -e '.[wandb]'" in error
