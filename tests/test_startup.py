"""The preflight predicts the run: every start-up failure fails both `--check` and the run
(before step 0, writing nothing), because both call the same checks (lift_jax.startup); and a
pretrained Hugging Face tower whose shape the config leaves to it starts a run, frozen."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fakedata
from conftest import REPO, require
from eval.runner import training_runner
from lift_jax import checkpoint as ckpt
from lift_jax import cli, preflight, train
from lift_jax.lock import LOCK_FILE


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return fakedata.write_dataset(str(tmp_path_factory.mktemp("data")), n=48, shards=2, dim=16)


def tiny_hf_tower(folder, width=32, layers=2, heads=2, patch=8, image=32, act="gelu"):
  """A Hugging Face CLIP vision tower with random weights, as save_pretrained writes it."""
  require("torch")
  transformers = require("transformers")
  config = transformers.CLIPVisionConfig(
      hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
      num_attention_heads=heads, image_size=image, patch_size=patch, hidden_act=act)
  transformers.CLIPVisionModel(config).save_pretrained(str(folder))
  return str(folder)


def base(data, steps=2):
  c = fakedata.tiny_config(*data, steps=steps)
  c.checkpoint_every_steps = 1
  return c


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
  """A workdir holding 2 steps of the base config."""
  w = str(tmp_path_factory.mktemp("trained") / "w")
  train.train_and_evaluate(base(data), w)
  return w


def _set(c, key, value):
  *parents, name = key.split(".")
  for p in parents:
    c = c[p]
  c[name] = value


def case_init_from_missing(c, w, tmp):
  c.model.init_from = str(tmp / "no-such-tower")


def case_lit_without_tower(c, w, tmp):
  c.optim.frozen = ("^visual/",)


def case_lit_hub_tower_not_cached(c, w, tmp):
  c.model.init_from = "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"
  c.optim.frozen = ("^visual/",)


def case_init_from_other_shape(c, w, tmp):
  c.model.init_from = tiny_hf_tower(tmp / "hf", width=48, heads=3, layers=1)


def case_embedding_width(c, w, tmp):
  c.model.embed_dim = 24


def case_missing_images(c, w, tmp):
  c.data.images = str(tmp / "no-images")


def case_eval_files_missing(c, w, tmp):
  c.evals.benchmarks = {"r": {"type": "retrieval", "captions": str(tmp / "none.tsv"),
                              "image_dir": str(tmp)}}


def case_text_bank_lacks_texts(c, w, tmp):
  from eval_fixtures import write_bank

  c.evals.benchmarks = {"r": {"type": "retrieval", "shards": c.data.images, "limit": 8}}
  c.evals.text_bank = write_bank(str(tmp / "bank"), ["only this text"])


def case_batch_over_devices(c, w, tmp):
  c.batch_size = 12  # 8 devices


def case_workdir_other_model(c, w, tmp):
  shutil.copytree(w, tmp / "w")
  c.model.vit.width = 64


def case_workdir_other_data(c, w, tmp):
  shutil.copytree(w, tmp / "w")
  other = fakedata.write_dataset(str(tmp / "other"), n=48, shards=2, dim=16, seed=3)
  c.data.images, c.data.embeddings = other


def case_workdir_locked(c, w, tmp):
  (tmp / "w").mkdir()
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  (tmp / "w" / LOCK_FILE).write_text(json.dumps({
      "host": socket.gethostname(), "pid": sleeper.pid, "token": "t", "started": time.time(),
      "refreshed": time.time()}))
  return sleeper


def case_no_intact_step(c, w, tmp):
  shutil.copytree(w, tmp / "w")
  for step in ckpt.steps(str(tmp / "w" / "checkpoints")):
    shutil.rmtree(tmp / "w" / "checkpoints" / str(step) / "train")


def case_workdir_is_a_file(c, w, tmp):
  (tmp / "w").write_text("not a folder")


CASES = [case_init_from_missing, case_lit_without_tower, case_lit_hub_tower_not_cached,
         case_init_from_other_shape, case_embedding_width, case_missing_images,
         case_eval_files_missing, case_text_bank_lacks_texts, case_batch_over_devices,
         case_workdir_other_model, case_workdir_other_data, case_workdir_locked,
         case_no_intact_step, case_workdir_is_a_file]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_every_start_up_failure_fails_the_check_and_the_run(data, trained, tmp_path, case,
                                                            monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  c = base(data)
  keep = case(c, trained, tmp_path)
  w = str(tmp_path / "w")
  before = sorted(os.listdir(tmp_path))
  snapshot = {p: os.path.getmtime(p) for p in _files(tmp_path)}
  try:
    table = preflight.check(c, w)
    failed = [r for r in table.rows if r[1] == "FAIL"]
    assert failed, table.format()
    assert sorted(os.listdir(tmp_path)) == before  # --check writes nothing ...
    assert {p: os.path.getmtime(p) for p in _files(tmp_path)} == snapshot  # ... anywhere
    steps_before = ckpt.steps(os.path.join(w, "checkpoints")) if os.path.isdir(w) else []
    with pytest.raises(Exception) as err:
      train.train_and_evaluate(c, w, evaluators=training_runner)
    message = cli.describe(err.value)
    assert message is not None, f"not a one-line error: {err.value!r}"
    print(f"{case.__name__}: check: {failed[0][0]}: {failed[0][2][:150]}\n  run: {message[:150]}")
    # Stopped before step 0: no step was trained or saved (damaged ones may be moved aside).
    if os.path.isdir(w):
      assert set(ckpt.steps(os.path.join(w, "checkpoints"))) <= set(steps_before)
    metrics = os.path.join(w, "metrics.jsonl")
    rows_before = 2 if case in (case_workdir_other_model, case_workdir_other_data,
                                case_no_intact_step) else 0
    assert not os.path.exists(metrics) or len(open(metrics).readlines()) == rows_before
  finally:
    if keep is not None:
      keep.kill()
      keep.wait()


# Workdirs holding the 2 steps of ``trained``, resumed with a change: (change, may it resume?).
# The preflight and the run must agree on each: the preflight fails exactly where the run stops
# before its first step, and passes where the run trains on.
def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def _lock(w, pid, refreshed):
  (w / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "token": "t",
                                         "started": refreshed, "refreshed": refreshed}))


def _damage_newest(c, w, tmp):
  shutil.rmtree(w / "checkpoints" / "2" / "train")  # step 1 is intact


def _other_data(c, w, tmp, allow):
  other = fakedata.write_dataset(str(tmp / "other"), n=48, shards=2, dim=16, seed=3)
  c.data.images, c.data.embeddings = other
  c.data.allow_new_data = allow


WORKDIRS = {
    "remat": (lambda c, w, t: setattr(c.model, "remat", True), True),
    "longer_run_and_other_lr": (lambda c, w, t: setattr(c.optim, "lr", 5e-4), True),
    "other_logging": (lambda c, w, t: setattr(c, "log_every_steps", 3), True),
    "damaged_newest_step": (_damage_newest, True),
    "stale_lock": (lambda c, w, t: _lock(w, _dead_pid(), time.time()), True),
    "other_data_allowed": (lambda c, w, t: _other_data(c, w, t, True), True),
    "other_data": (lambda c, w, t: _other_data(c, w, t, False), False),
    "other_batch": (lambda c, w, t: setattr(c, "batch_size", 24), False),
    "other_frozen_rules": (lambda c, w, t: setattr(c.optim, "frozen", ("^head/",)), False),
    "other_loss": (lambda c, w, t: setattr(c.model, "loss", "sigmoid"), False),
    "other_head": (lambda c, w, t: setattr(c.model, "head_hidden", (16,)), False),
    "other_patch": (lambda c, w, t: setattr(c.model.vit, "patch_size", 16), False),
}


@pytest.mark.parametrize("name", sorted(WORKDIRS))
def test_preflight_and_run_agree_on_each_workdir(data, trained, tmp_path, name):
  change, may_resume = WORKDIRS[name]
  w = tmp_path / "w"
  shutil.copytree(trained, w)
  c = base(data, steps=3)
  change(c, w, tmp_path)
  table = preflight.check(c, str(w))
  failed = [r for r in table.rows if r[1] == "FAIL"]
  try:
    train.train_and_evaluate(c, str(w))
    ran = True
  except Exception as e:  # noqa: BLE001 - the verdict is compared, the message checked below
    assert cli.describe(e) is not None, f"not a one-line error: {e!r}"
    ran = False
  assert (not failed) == ran == may_resume, (table.format(), ran)
  if ran:
    assert ckpt.latest_step(str(w)) == 3


def _files(root):
  return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def test_a_tiny_hugging_face_tower_gives_its_shape_and_stays_frozen(data, tmp_path, caplog):
  """model.tower_shape='init_from': the ViT takes the tower's width, depth, heads, MLP width,
  patch and image size; optim.frozen keeps it bit-identical; one log line says what was loaded
  and what is frozen. With tower_shape='config', every mismatch is listed with its key."""
  tower = tiny_hf_tower(tmp_path / "tower", width=48, layers=1, heads=3, patch=16, image=32)
  c = base(data)
  c.model.init_from = tower
  with pytest.raises(Exception, match=r"set --config.model.vit.width=48 \(the config has 32\); "
                     r"--config.model.vit.depth=1 .*--config.model.vit.num_heads=3 .*"
                     r"--config.model.vit.patch_size=16 \(the config has 8\)") as err:
    train.train_and_evaluate(c, str(tmp_path / "refused"))
  assert cli.describe(err.value) is not None
  c.model.tower_shape = "init_from"
  c.optim.frozen = ("^visual/",)
  with caplog.at_level("INFO"):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  line = [r.getMessage() for r in caplog.records if "model.init_from: loaded" in r.getMessage()]
  assert len(line) == 1 and "frozen by optim.frozen=['^visual/']" in line[0], line
  saved = ckpt.workdir_config(str(tmp_path / "w"))["model"]
  assert (saved["vit"]["width"], saved["vit"]["depth"], saved["vit"]["num_heads"],
          saved["vit"]["patch_size"], saved["image_size"]) == (48, 1, 3, 16, 32)
  from safetensors.numpy import load_file

  hf = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v  # either layout
        for f in os.listdir(tower) if f.endswith(".safetensors")
        for k, v in load_file(os.path.join(tower, f)).items()}
  params, _ = ckpt.restore_params(str(tmp_path / "w"))
  ln = np.asarray(params["visual"]["ln_pre"]["scale"])
  np.testing.assert_array_equal(ln, hf["pre_layrnorm.weight"])  # frozen, as loaded
  conv = np.asarray(params["visual"]["conv1"])
  np.testing.assert_array_equal(conv, hf["embeddings.patch_embedding.weight"]
                                .transpose(2, 3, 1, 0))
  assert jax.tree.leaves(params["head"])  # the head trained


@pytest.mark.slow
def test_readme_pretrained_tower_walkthrough_runs_as_written(tmp_path):
  """The README's "Starting from a pretrained tower" commands, in a fresh folder: make a tiny
  Hugging Face tower, prepare the data, train LIFT on it frozen (fewer steps and a smaller data
  set than the README's, appended as overrides)."""
  readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  section = readme.split("### A tiny tower, end to end", 1)[1].split("\n## ", 1)[0]
  blocks = [b.split("\n", 1)[1] for b in section.split("```")[1::2]]
  quick = ("--config.total_steps=4 --config.data.synthetic.num_train=256 "
           "--config.data.synthetic.num_eval=16 --config.data.synthetic.num_shards=1 "
           "--config.batch_size=32 --config.evals.batch_size=32")
  for block in blocks:
    script = block.replace("configs/", f"{REPO}/configs/")
    script = "\n".join(sys.executable + line[len("python"):] if line.startswith("python ")
                       else line for line in script.splitlines()) + "\n"
    if "lift_jax.main" in script:
      script = script.rstrip() + " " + quick + "\n"
    r = subprocess.run(["bash", "-c", f"set -e\n{script}"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=1800,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable})
    assert r.returncode == 0, script + r.stdout[-2000:] + r.stderr[-3000:]
  assert ckpt.latest_step(str(tmp_path / "runs" / "lit_tiny")) == 4
