"""import_torch --output on a folder that already holds a run: refused in one line (eval would
otherwise read the run's later step instead of the imported weights), replaced with --overwrite."""

import os
import subprocess
import sys

import pytest
from flax import nnx

from conftest import REPO
from eval_fixtures import config, lift_model_config, tiny_model
from lift_jax import checkpoint as ckpt


def training_workdir(path, step):
  """A workdir as training leaves it: config.json, checkpoints/<step>, metrics beside them."""
  params = nnx.to_pure_dict(nnx.split(tiny_model("lift"))[1])
  cfg = config(lift_model_config(), {})
  ckpt.save_params(path, step, params, cfg)
  with open(os.path.join(path, "metrics.jsonl"), "w", encoding="utf-8") as f:
    f.write('{"step": 40}\n')
  return params, cfg


def test_import_into_a_training_workdir_is_refused_in_one_line(tmp_path):
  workdir = str(tmp_path / "run")
  params, cfg = training_workdir(workdir, 40)
  with pytest.raises(ckpt.OutputFolderError, match=r"not empty .*checkpoint steps \['40'\]"
                     r".*--overwrite"):
    ckpt.prepare_import_output(workdir)
  model_config = tmp_path / "cfg.py"
  model_config.write_text("import ml_collections\ndef get_config():\n"
                          f"  return ml_collections.ConfigDict({{'model': "
                          f"{lift_model_config()!r}}})\n")
  run = subprocess.run(
      [sys.executable, "-m", "lift_jax.tools.import_torch", f"--checkpoint={tmp_path}/x.pt",
       f"--config={model_config}", f"--output={workdir}"],
      capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = run.stderr.strip().splitlines()
  assert run.returncode == 1 and len(lines) == 1, run.stderr
  assert lines[0].startswith("python -m lift_jax.tools.import_torch: error: --output=")
  assert "not empty" in lines[0]
  assert ckpt.resolve(workdir)[1] == 40  # nothing was written

  # --overwrite replaces the run's checkpoints and config.json; other files stay.
  ckpt.prepare_import_output(workdir, overwrite=True)
  assert sorted(os.listdir(workdir)) == ["metrics.jsonl"]
  ckpt.save_params(workdir, 0, params, cfg)  # what the import writes next
  assert ckpt.resolve(workdir)[1] == 0  # eval now reads the imported step


def test_new_or_empty_output_is_accepted(tmp_path):
  ckpt.prepare_import_output(str(tmp_path / "new"))
  (tmp_path / "empty").mkdir()
  ckpt.prepare_import_output(str(tmp_path / "empty"))
  (tmp_path / "file").write_text("x")
  with pytest.raises(ckpt.OutputFolderError, match="is a file"):
    ckpt.prepare_import_output(str(tmp_path / "file"))
