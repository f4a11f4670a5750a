"""The command line in real processes: two ranks sharing one output folder, a run killed with
SIGKILL and resumed, clear errors; and JAX never imported by the job."""

import os
import signal
import subprocess
import sys
import time

from conftest import REPO
from embed import job, writer
from embed.configs import minilm
from lift_jax.data import records
from test_embed_support import captions, shard_bytes, write_image_shards

# Runs `python -m embed.main ARGS`, then reports whether JAX was imported along the way.
RUN_AND_REPORT = """
import sys
from absl import app
from embed import main
sys.argv = ["embed.main"] + sys.argv[1:]
code = 0
try:
  app.run(main.command)
except SystemExit as e:
  code = e.code
print("JAX_MODULES=" + ",".join(sorted(m for m in sys.modules if m.split(".")[0] == "jax")))
sys.exit(code)
"""
FIELDS = {"threads": 1, "progress": False, "batch_tokens": 2048}


def command(images, output, **fields):
  args = [f"--config={REPO}/embed/configs/minilm.py", f"--config.images={images}",
          f"--config.output={output}"]
  args += [f"--config.{k}={v}" for k, v in {**FIELDS, **fields}.items()]
  return [sys.executable, "-c", RUN_AND_REPORT] + args


def environment(**extra):
  env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
  for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
    env.pop(name, None)
  env.update(extra)
  return env


def in_process_run(images, output):
  cfg = minilm.get_config()
  cfg.images, cfg.output = images, output
  for k, v in FIELDS.items():
    cfg[k] = v
  return job.run(cfg)


def test_two_ranks_share_the_work_and_never_import_jax(tmp_path):
  images = str(tmp_path / "images")
  write_image_shards(images, [captions(12, seed=s) for s in range(4)])
  out = str(tmp_path / "out")
  procs = [subprocess.Popen(command(images, out), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=environment(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)))
           for r in (0, 1)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (stdout, stderr) in zip(procs, results):
    assert p.returncode == 0, stderr[-3000:]
    assert "JAX_MODULES=\n" in stdout, stdout
    assert "2 shards written, 0 already done" in stdout
  m = records.read_manifest(out)
  assert m["complete"] and [e["rank"] for e in m["shards"]] == [0, 1, 0, 1]
  records.check_aligned(images, out, check_keys=True)
  # The same bytes as one process doing all four shards.
  in_process_run(images, str(tmp_path / "single"))
  assert shard_bytes(out) == shard_bytes(str(tmp_path / "single"))


def test_sigkill_mid_run_then_resume_is_byte_identical(tmp_path):
  images = str(tmp_path / "images")
  write_image_shards(images, [captions(40, seed=s) for s in range(6)])
  out = str(tmp_path / "out")
  proc = subprocess.Popen(command(images, out), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=environment())
  parts = os.path.join(out, writer.PARTS)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(parts) and any(f.endswith(".array_record.json") for f in os.listdir(parts)):
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
  done_before = len(writer.read_entries(out))
  assert 1 <= done_before < 6

  summary = in_process_run(images, out)
  assert summary["skipped"] == done_before and summary["written"] == 6 - done_before
  assert not [f for f in os.listdir(out) if ".tmp-" in f]
  in_process_run(images, str(tmp_path / "clean"))
  assert shard_bytes(out) == shard_bytes(str(tmp_path / "clean"))
  assert records.read_manifest(out)["complete"]


def test_cli_errors_are_one_line(tmp_path):
  (tmp_path / "empty").mkdir()
  proc = subprocess.run(command(str(tmp_path / "empty"), str(tmp_path / "out")), cwd=REPO,
                        capture_output=True, text=True, env=environment(), timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "python -m embed.main: error: no 'images-*-of-*.array_record' shards in")
  assert "Traceback" not in proc.stderr


def test_full_disk_is_one_line_and_a_rerun_finishes(full_disk, tmp_path):
  """A disk that fills while shards are written: one line naming the shard and the cause, exit
  1, no temporary file; after space is freed the same command finishes the set, and its shards
  equal those of a run that never ran out of space."""
  images = str(tmp_path / "images")
  write_image_shards(images, [captions(100, seed=s) for s in range(4)])
  in_process_run(images, str(tmp_path / "single"))  # the reference, on a disk with room
  reference = shard_bytes(str(tmp_path / "single"))
  shard_size = max(os.path.getsize(os.path.join(tmp_path, "single", f)) for f in reference)
  out = full_disk / "embeddings"
  stat = os.statvfs(full_disk)
  filler = full_disk / "filler"  # leaves room for one shard and a half
  filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - int(shard_size * 1.5)))
  r = subprocess.run(command(images, str(out)), cwd=REPO, env=environment(),
                     capture_output=True, text=True, timeout=300)
  errors = [line for line in r.stderr.splitlines() if "error:" in line]
  assert r.returncode == 1 and len(errors) == 1, r.stdout[-2000:] + r.stderr[-3000:]
  assert "could not write" in errors[0] and "No space left on device" in errors[0] and \
      str(out) in errors[0], errors[0]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert not [f for f in os.listdir(out) if ".tmp" in f]  # nothing half-written left
  kept = len(shard_bytes(str(out)))
  assert 1 <= kept < 4, kept  # the shard that fitted is finished and kept
  os.remove(filler)
  r = subprocess.run(command(images, str(out)), cwd=REPO, env=environment(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"{4 - kept} shards written, {kept} already done" in r.stdout, r.stdout[-2000:]
  assert records.read_manifest(str(out))["complete"]
  assert shard_bytes(str(out)) == reference
