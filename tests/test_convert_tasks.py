"""Conversion on many machines: task arrays (SLURM, Kubernetes, flags) and Apache Beam write the
same shard files and manifest as one process, whatever the order of the tasks, a task killed
mid-shard and re-run included; readers refuse a half-made set, naming the missing shards."""

import glob
import hashlib
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from conftest import REPO, require
from lift_jax import cli
from lift_jax import common
from lift_jax import config_lib
from lift_jax.data import convert
from lift_jax.data import pipeline
from lift_jax.data import records
from test_convert import _add, _pixels, encode, rgb_jpeg

OPTIONS = convert.Options(num_shards=5, resize=48)
# Variables of schedulers that the test's own environment must not leak into its subprocesses.
SCHEDULER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                  "SLURM_LOCALID", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                  "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP",
                  "JOB_COMPLETION_INDEX", common.TASK_COUNT_VAR)


def make_input(root):
  """Three tars of small photos with bad samples of several kinds, one tar cut off
  mid-download, and a file that is not a tar."""
  root.mkdir()
  cmyk = encode(Image.fromarray(_pixels(64, 64, 2, channels=4), "CMYK"), "JPEG")
  rgba = encode(Image.fromarray(_pixels(64, 56, 4, channels=4), "RGBA"), "PNG")
  seed = 0
  for t, good in enumerate((12, 12, 10)):
    with tarfile.open(root / f"{t:05d}.tar", "w") as tar:
      for j in range(good):
        seed += 1
        key = f"{t}{j:03d}"
        size = (64, 40)[j % 2]  # half are resized, half kept as found
        _add(tar, f"{key}.jpg", rgb_jpeg(size, size + 8, seed=seed))
        _add(tar, f"{key}.txt", f"photo {seed}".encode())
      if t == 0:
        _add(tar, "0zero.jpg", b"")
        _add(tar, "0zero.txt", b"zero bytes")
        _add(tar, "0nocap.jpg", rgb_jpeg(seed=1))
        _add(tar, "0latin.jpg", rgb_jpeg(seed=2))
        _add(tar, "0latin.txt", b"caf\xe9")
        _add(tar, "0tiny.jpg", rgb_jpeg(16, 16))
        _add(tar, "0tiny.txt", b"too small")
        _add(tar, "0cmyk.jpg", cmyk)
        _add(tar, "0cmyk.txt", b"cmyk")
      if t == 1:
        _add(tar, "0000.jpg", rgb_jpeg(seed=3))  # a key of the first tar
        _add(tar, "0000.txt", b"again")
        _add(tar, "1ghost.txt", b"no image")
        _add(tar, "1rgba.png", rgba)
        _add(tar, "1rgba.txt", b"alpha")
        _add(tar, "1cut.txt", b"cut off")
        _add(tar, "1cut.jpg", rgb_jpeg(64, 64, seed=4))
  path = root / "00001.tar"
  with tarfile.open(path) as tar:
    member = tar.getmember("1cut.jpg")
  data = path.read_bytes()
  path.write_bytes(data[:member.offset_data + member.size // 2])
  (root / "00003.tar").write_text("<html>502 Bad Gateway</html>")
  return str(root / "*.tar")


def sha256s(folder):
  return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
          for name in sorted(os.listdir(folder)) if name.endswith(".array_record")}


def timeless(manifest):
  return {k: v for k, v in manifest.items() if k != "created"}


def run_convert(tars, out, extra=None):
  return convert.convert(out, tars=[tars], options=OPTIONS, workers=1, progress=False,
                         log=lambda line: None, **(extra or {}))


def cli_args(tars, out):
  return [sys.executable, "-m", "lift_jax.data.convert", f"--output={out}", f"--tars={tars}",
          f"--num_shards={OPTIONS.num_shards}", f"--resize={OPTIONS.resize}", "--workers=1",
          "--no_progress"]


def environment(**extra):
  env = {k: v for k, v in os.environ.items() if k not in SCHEDULER_VARS}
  env.update(extra)
  return env


# A task that dies by SIGKILL while writing the 3rd record of its 2nd shard: what a preempted or
# OOM-killed host leaves behind (a temporary file, no entry for that shard).
KILLED_TASK = """
import os, signal, sys
from lift_jax.data import convert, records
real = records.write_shard
calls = []
def dying(path, recs, options):
  calls.append(path)
  if len(calls) == 2:
    def stream():
      for i, r in enumerate(recs):
        if i == 3:
          os.kill(os.getpid(), signal.SIGKILL)
        yield r
    return real(path, stream(), options)
  return real(path, recs, options)
records.write_shard = dying
sys.exit(convert.cli.run("convert", convert.main, sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
  """The input and the conversion on one machine (the command line, --workers=2) that every
  other way is compared with."""
  root = tmp_path_factory.mktemp("tasks")
  tars = make_input(root / "in")
  out = str(root / "one")
  run = subprocess.run(cli_args(tars, out)[:-2] + ["--workers=2", "--no_progress"], cwd=REPO,
                       capture_output=True, text=True, env=environment(), timeout=300)
  assert run.returncode == 0, run.stderr
  return tars, out, records.read_manifest(out)


def test_reference_run_reports_every_kind_of_bad_input(one_host):
  _, out, manifest = one_host
  counts = manifest["report"]["counts"]
  # 34 good photos + cmyk + rgba written; resized: the 17 photos of 64 px, cmyk and rgba.
  assert counts == {
      "written": 36, "resized": 19, "converted/cmyk": 1, "converted/alpha": 1,
      "skipped/zero_byte": 1, "skipped/missing_caption": 1, "skipped/undecodable_caption": 1,
      "skipped/too_small": 1, "skipped/duplicate_key": 1, "skipped/missing_image": 1,
      "skipped/truncated_tar": 1, "tars/truncated": 1, "tars/not_a_tar": 1}
  assert sorted(os.path.basename(p) for p in manifest["source"]["bad_tars"]) == [
      "00001.tar", "00003.tar"]
  # 38 items listed (the zero-byte and the tiny image are judged while converting, in shard 1):
  # shard i takes items [i*38//5, (i+1)*38//5).
  assert [e["items"] for e in manifest["shards"]] == [7, 8, 7, 8, 8]
  assert [e["count"] for e in manifest["shards"]] == [7, 6, 7, 8, 8]


def test_two_tasks_of_a_slurm_array_give_the_same_bytes(one_host, tmp_path):
  """Two real processes at once, told apart only by SLURM's array variables (--array=1-2), then
  --finalize re-checks every shard."""
  tars, reference, ref_manifest = one_host
  out = str(tmp_path / "two")
  procs = [subprocess.Popen(cli_args(tars, out), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=environment(
                                SLURM_ARRAY_TASK_ID=str(i), SLURM_ARRAY_TASK_MIN="1",
                                SLURM_ARRAY_TASK_MAX="2", SLURM_ARRAY_TASK_STEP="1",
                                SLURM_ARRAY_TASK_COUNT="2"))
           for i in (2, 1)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  assert "task 1 of 2 (from the SLURM array): shards 2 to 4 of 5" in logs[0]
  assert "task 0 of 2 (from the SLURM array): shards 0 to 1 of 5" in logs[1]
  assert sha256s(out) == sha256s(reference)
  assert timeless(records.read_manifest(out)) == timeless(ref_manifest)
  run = subprocess.run([sys.executable, "-m", "lift_jax.data.convert", f"--output={out}",
                        "--finalize"], cwd=REPO, capture_output=True, text=True,
                       env=environment(), timeout=300)
  assert run.returncode == 0 and "5 shards, 36 records, all verified" in run.stdout, run.stderr


def test_three_tasks_in_any_order_with_one_killed_mid_shard(one_host, tmp_path):
  tars, reference, ref_manifest = one_host
  out = str(tmp_path / "three")
  run_convert(tars, out, {"task": common.Task(2, 3)})
  killed = subprocess.run([sys.executable, "-c", KILLED_TASK, *cli_args(tars, out)[3:],
                           "--task_index=1", "--task_count=3"], cwd=REPO, capture_output=True,
                          text=True, env=environment(), timeout=300)
  assert killed.returncode == -9, killed.stderr
  names = [records.shard_name("images", i, 5) for i in range(5)]
  assert [n for n in os.listdir(out) if ".tmp-" in n][0].startswith(names[2])
  temporary = [n for n in os.listdir(out) if ".tmp-" in n]
  run_convert(tars, out, {"task": common.Task(0, 3)})
  assert not os.path.exists(os.path.join(out, records.MANIFEST))  # shard 2 is not finished
  # A task touches no other task's files: that temporary could be a live task's.
  assert [n for n in os.listdir(out) if ".tmp-" in n] == temporary

  # Half-made: the trainer's reader and embed.main refuse it in one line naming the shard.
  config = config_lib.base("clip")
  config.data.images = out
  with pytest.raises(records.RecordError) as refused:
    pipeline.train_dataset(config)
  message = cli.describe(refused.value)
  assert "half-made set" in message and "1 of 5 shards are not finished: " + names[2] in message
  assert "\n" not in message
  embed = subprocess.run([sys.executable, "-m", "embed.main",
                          f"--config={REPO}/embed/configs/minilm.py", f"--config.images={out}",
                          f"--config.output={tmp_path / 'emb'}"], cwd=REPO, capture_output=True,
                         text=True, env=environment(HF_HUB_OFFLINE="1"), timeout=300)
  lines = embed.stderr.strip().splitlines()
  assert embed.returncode == 1 and len(lines) == 1, embed.stderr
  assert lines[0].startswith("python -m embed.main: error: ") and names[2] in lines[0]
  assert "half-made set" in lines[0]

  # The killed task re-run as a Kubernetes indexed Job's pod redoes only its unfinished shard.
  rerun = subprocess.run(cli_args(tars, out), cwd=REPO, capture_output=True, text=True,
                         env=environment(JOB_COMPLETION_INDEX="1", LIFT_TASK_COUNT="3"),
                         timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  assert "resuming; 1 of 2 shards verified and kept, 1 to write" in rerun.stdout
  assert "wrote 1 of 5 shards" in rerun.stdout and "the set is complete" not in rerun.stdout
  assert not [n for n in os.listdir(out) if ".tmp-" in n]
  assert sha256s(out) == sha256s(reference)
  assert timeless(records.read_manifest(out)) == timeless(ref_manifest)


def test_readers_refuse_a_set_whose_tasks_have_not_all_finished(one_host, tmp_path):
  tars, _, _ = one_host
  out = str(tmp_path / "half")
  run_convert(tars, out, {"task": common.Task(0, 2)})
  names = [records.shard_name("images", i, 5) for i in range(5)]
  with pytest.raises(records.RecordError, match="3 of 5 shards are not finished: " +
                     ", ".join(names[2:])):
    records.shard_counts(out, records.IMAGES)
  with pytest.raises(convert.ConvertError, match=f"{names[2]}: not finished"):
    convert.finalize(out, log=lambda line: None)
  run_convert(tars, out, {"task": common.Task(1, 2)})
  # --finalize hashes every shard: a shard damaged after it was written is named.
  shard = os.path.join(out, names[0])
  data = bytearray(open(shard, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(shard, "wb").write(bytes(data))
  with pytest.raises(convert.ConvertError, match=f"{names[0]}: SHA-256 differs"):
    convert.finalize(out, log=lambda line: None)
  # A task killed after its shard was renamed into place but before its entry was written.
  os.remove(records.part_path(out, names[3]))
  os.remove(os.path.join(out, records.MANIFEST))
  with pytest.raises(records.RecordError, match=f"1 of 5 shards are not finished: {names[3]}"):
    records.shard_counts(out, records.IMAGES)
  # An interrupted single-process run: its manifest says it is not complete.
  solo = str(tmp_path / "solo")
  run_convert(tars, solo)
  assert convert.finalize(solo, log=lambda line: None)["total"] == 36  # checked, left as it is
  manifest = records.read_manifest(solo)
  records.write_manifest(solo, dict(manifest, complete=False, shards=manifest["shards"][:4]))
  with pytest.raises(records.RecordError, match=f"not complete.*1 of 5 .*{names[4]}"):
    records.shard_counts(solo, records.IMAGES)


def test_other_options_and_overwrite_are_refused_to_a_task(one_host, tmp_path):
  tars, _, _ = one_host
  out = str(tmp_path / "out")
  run_convert(tars, out, {"task": common.Task(0, 2)})
  with pytest.raises(convert.ConvertError, match="resize: 48 -> 32"):
    convert.convert(out, tars=[tars], options=convert.Options(num_shards=5, resize=32),
                    workers=1, progress=False, log=lambda line: None, task=common.Task(1, 2))
  with pytest.raises(convert.ConvertError, match="--overwrite with 2 tasks"):
    convert.convert(out, tars=[tars], options=OPTIONS, workers=1, progress=False,
                    log=lambda line: None, task=common.Task(1, 2), overwrite=True)


def test_apache_beam_direct_runner_gives_the_same_bytes(one_host, tmp_path):
  require("apache_beam")
  tars, reference, ref_manifest = one_host
  out = str(tmp_path / "beam")
  # A finished shard is kept; a temporary a killed worker left is removed.
  run_convert(tars, out, {"task": common.Task(0, 5)})
  open(os.path.join(out, records.shard_name("images", 3, 5) + ".tmp-host-1"), "wb").close()
  manifest = convert.convert(out, tars=[tars], options=OPTIONS, progress=False,
                             log=lambda line: None, beam_runner="DirectRunner")
  assert sha256s(out) == sha256s(reference)
  assert timeless(manifest) == timeless(ref_manifest)
  assert sorted(os.listdir(os.path.join(out, records.PARTS))) == sorted(
      ["settings.json"] + [records.shard_name("images", i, 5) + ".json" for i in range(5)])
  cli_out = str(tmp_path / "beam_cli")
  run = subprocess.run(cli_args(tars, cli_out) + [
      "--beam_runner=DirectRunner",
      "--beam_options=--direct_num_workers=2 --direct_running_mode=multi_processing"],
      cwd=REPO, capture_output=True, text=True, env=environment(), timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Beam wrote 5 of 5 shards" in run.stdout
  assert sha256s(cli_out) == sha256s(reference)
  assert timeless(records.read_manifest(cli_out)) == timeless(ref_manifest)


def test_listing_does_not_depend_on_workers(one_host):
  """Tars are read by a pool of processes; duplicates across tars, the cut tar and the bad
  members are still decided in tar order."""
  tars, _, _ = one_host
  paths = sorted(glob.glob(tars))
  one = convert.list_tars({"tars": paths}, OPTIONS, lambda line: None, 1)
  two = convert.list_tars({"tars": paths}, OPTIONS, lambda line: None, 2)
  assert one.items == two.items and one.fingerprint == two.fingerprint
  assert one.report.to_dict() == two.report.to_dict() and one.source == two.source
  assert len(one.items) == 38


def test_task_of_reads_every_scheduler():
  """The rule convert and embed.main share; SLURM's arrays checked against sbatch's documented
  ids (--array=1-7:2 is 1, 3, 5, 7)."""
  def array(ident, low, high, step, count, **more):
    return {"SLURM_ARRAY_TASK_ID": str(ident), "SLURM_ARRAY_TASK_MIN": str(low),
            "SLURM_ARRAY_TASK_MAX": str(high), "SLURM_ARRAY_TASK_STEP": str(step),
            "SLURM_ARRAY_TASK_COUNT": str(count), **more}

  def pair(task):
    return task.index, task.count

  assert pair(common.task_of({})) == (0, 1)
  assert [pair(common.task_of(array(i, 1, 7, 2, 4))) for i in (1, 3, 5, 7)] == [
      (0, 4), (1, 4), (2, 4), (3, 4)]
  # Two srun tasks in each of 3 array elements: 6 tasks.
  both = array(12, 10, 12, 1, 3, SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1")
  assert common.task_of(both) == common.Task(5, 6, 1, "the SLURM array x SLURM_NTASKS")
  assert pair(common.task_of({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"})) == (2, 4)
  torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", **array(1, 1, 7, 2, 4)}
  assert common.task_of(torchrun) == common.Task(3, 8, 3, "RANK/WORLD_SIZE")
  assert pair(common.task_of({"JOB_COMPLETION_INDEX": "4", "LIFT_TASK_COUNT": "6"})) == (4, 6)
  assert pair(common.task_of({"JOB_COMPLETION_INDEX": "4"}, count=5)) == (4, 5)
  assert pair(common.task_of({"RANK": "3", "WORLD_SIZE": "8"}, index=0, count=2)) == (0, 2)
  for env, kwargs, message in (
      (array(20, 1, 20, 1, 3), {}, "not an evenly spaced range"),  # --array=1,3,20
      ({"JOB_COMPLETION_INDEX": "4"}, {}, "set LIFT_TASK_COUNT"),
      ({"RANK": "1"}, {}, "must be set together"),
      ({"RANK": "2", "WORLD_SIZE": "2"}, {}, "not a valid task"),
      ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, {}, "must be integers"),
      ({}, {"index": 1}, "needs --task_count"),
      ({}, {"count": 3}, "pass --task_index too"),
      ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, {"count": 3}, "says 2 tasks")):
    with pytest.raises(common.TaskError, match=message):
      common.task_of(env, **kwargs)


def test_cli_task_errors_are_one_line(one_host, tmp_path):
  tars, _, _ = one_host
  run = subprocess.run(cli_args(tars, str(tmp_path / "x")), cwd=REPO, capture_output=True,
                       text=True, env=environment(JOB_COMPLETION_INDEX="0"), timeout=300)
  lines = run.stderr.strip().splitlines()
  assert run.returncode == 1 and len(lines) == 1, run.stderr
  assert lines[0].startswith("python -m lift_jax.data.convert: error: JOB_COMPLETION_INDEX=0")
  assert not os.path.exists(tmp_path / "x")
