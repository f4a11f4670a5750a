"""``python -m eval.main`` end to end on a checkpoint written by lift_jax.checkpoint.save_params."""

import json
import os
import subprocess
import sys

import pytest
from flax import nnx

from conftest import REPO, shared_data
from eval import main as eval_main
from eval.runner import EvalRunner
from eval.predictor import TextBankError
from eval.benchmarks import required_texts
from eval_fixtures import config, lift_model_config, tiny_model, write_bank
from lift_jax import checkpoint
from lift_jax.checkpoint import CheckpointError


def benchmarks(limit=40):
  return {
      "flickr8k": {"type": "retrieval", "protocol": "lift", "limit": limit,
                   "captions": shared_data("flickr8k_subset", "captions.tsv"),
                   "image_dir": shared_data("flickr8k_subset", "images")},
      "imagenet": {"type": "zeroshot", "protocol": "lift", "limit": limit,
                   "labels": shared_data("imagenet_samples", "labels.tsv"),
                   "image_dir": shared_data("imagenet_samples", "images"),
                   "classnames": shared_data("imagenet", "classnames_keras.txt"),
                   "templates": shared_data("imagenet", "templates_lift.txt")}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_main")
  cfg = config(lift_model_config(), benchmarks(), text_bank=str(root / "bank"))
  write_bank(cfg.evals.text_bank, required_texts(cfg.evals))
  model = tiny_model("lift")
  checkpoint.save_params(str(root / "wd"), 3, nnx.to_pure_dict(nnx.state(model)), cfg)
  expected = EvalRunner(cfg, model).run()
  return root, cfg, expected


def run_main(*args):
  return subprocess.run([sys.executable, "-m", "eval.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_eval_main_on_a_saved_checkpoint(workdir):
  root, _, expected = workdir
  proc = run_main(f"--checkpoint={root / 'wd'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.load(open(root / "wd" / "eval" / "metrics-3.json"))
  assert report["step"] == 3 and report["mode"] == "lift"
  assert report["metrics"] == pytest.approx(expected)  # restored weights, same numbers
  assert report["metrics"]["flickr8k/num_images"] == 40
  assert report["benchmarks"]["imagenet"]["protocol"] == "lift"
  assert set(report["seconds"]) == {"flickr8k", "imagenet"}
  out = proc.stdout
  assert "flickr8k/i2t_r1" in out and "imagenet/top1" in out and "wall time per benchmark" in out


def test_eval_main_with_a_config_file_and_overrides(workdir, tmp_path):
  root, cfg, _ = workdir
  config_file = tmp_path / "cfg.py"
  config_file.write_text(
      "import json, ml_collections\n"
      f"CONFIG = json.loads({json.dumps(json.dumps(cfg.to_dict()))})\n"
      "def get_config():\n"
      "  return ml_collections.ConfigDict(CONFIG)\n")
  output = tmp_path / "m.json"
  step_dir = root / "wd" / "checkpoints" / "3"
  proc = run_main(f"--checkpoint={step_dir}", f"--config={config_file}",
                  "--config.evals.benchmarks.flickr8k.limit=12", "--only=flickr8k",
                  f"--output={output}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.load(open(output))
  assert report["metrics"]["flickr8k/num_images"] == 12
  assert not any(k.startswith("imagenet/") for k in report["metrics"])

  texts = tmp_path / "texts.txt"
  proc = run_main(f"--config={config_file}", f"--write_texts={texts}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert texts.read_text().splitlines() == required_texts(cfg.evals)


def test_eval_main_errors(workdir, tmp_path):
  root, cfg, _ = workdir
  with pytest.raises(CheckpointError, match="no such checkpoint"):
    eval_main.evaluate(str(tmp_path / "nothing"))
  broken = cfg.copy_and_resolve_references()
  broken.evals.text_bank = str(tmp_path / "no_bank")
  with pytest.raises(TextBankError, match=r"no_bank does not exist.*python -m embed\.main"):
    eval_main.evaluate(str(root / "wd"), broken, output=str(tmp_path / "x.json"))
  proc = run_main(f"--workdir={tmp_path / 'nothing'}")
  assert proc.returncode == 1 and "eval.main: error:" in proc.stderr
  assert "no such checkpoint" in proc.stderr and "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "x.json")


@pytest.mark.slow
def test_bank_written_by_embed_main_serves_the_evaluators(tmp_path, minilm_path):
  """The real chain: eval.main --write_texts -> embed.main (MiniLM, 384-d) -> EvalRunner."""
  from lift_jax.models.two_tower import build_model

  model_cfg = dict(lift_model_config(), embed_dim=384)
  cfg = config(model_cfg, benchmarks(limit=30), text_bank=str(tmp_path / "bank"))
  config_file = tmp_path / "cfg.py"
  config_file.write_text(
      "import json, ml_collections\n"
      f"CONFIG = json.loads({json.dumps(json.dumps(cfg.to_dict()))})\n"
      "def get_config():\n"
      "  return ml_collections.ConfigDict(CONFIG)\n")
  texts = tmp_path / "texts.txt"
  assert run_main(f"--config={config_file}", f"--write_texts={texts}").returncode == 0
  proc = subprocess.run(
      [sys.executable, "-m", "embed.main", "--config=embed/configs/minilm.py",
       f"--config.texts={texts}", f"--config.output={tmp_path / 'bank'}",
       "--config.progress=False"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  runner = EvalRunner(cfg, build_model(model_cfg, seed=0))
  assert len(runner.predictor.text_bank.index) == len(texts.read_text().splitlines())
  out = runner.run()
  assert out["flickr8k/num_images"] == 30 and out["imagenet/num_images"] == 30
