"""Measure the cost of a config: train step, input pipeline, embedding job, evaluation.

    python -m lift_jax.tools.bench --config=configs/vitb16_datacomp.py --mode=step
    python -m lift_jax.tools.bench --config=configs/tiny_synthetic.py --mode=input --workers=0,1,2
    python -m lift_jax.tools.bench --mode=efficiency            # LIFT vs CLIP FLOPs / memory table
    python -m lift_jax.tools.bench --config=... --mode=embed --texts=captions.txt
    python -m lift_jax.tools.bench --config=... --mode=eval
    python -m lift_jax.tools.bench --mode=suite --budget_s=420 --output=DIR   # all of it, on a GPU

Every mode prints a table and writes JSON (``--output``, default ``bench-<mode>.json``) with the
device it ran on. Times are medians of timed repetitions after warm-up, blocking on the results.

* step: the jitted train step on random on-device data. Compile time, step time, img/s,
  img/s/device, FLOPs per step from XLA's cost analysis of the compiled program, MFU against the
  device's dense bf16 peak, peak device memory (allocator statistics on GPU/TPU; on CPU the
  compiled program's memory analysis: arguments + outputs + temporaries - aliased).
* efficiency: compiles (does not run) the train step of LIFT and of CLIP with caption lengths
  32/77/128/323 at the same per-device batch, and tabulates FLOPs and memory per step. A CPU is
  enough.
* input: the grain pipeline of the config (decode + random resized crop; normalisation runs on the
  accelerator) with several worker counts, and the bare per-core decode + crop + normalise rate.
* suite: the measurements that matter for an accelerator, in order of value, each row in its own
  process, within ``--budget_s``; see :func:`run_suite`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config to measure.", lock_config=False)
flags.DEFINE_enum("mode", "step", ["step", "input", "embed", "eval", "efficiency", "suite"],
                  "What to time.")
flags.DEFINE_string("output", None, "JSON output path (default bench-<mode>.json); suite: a "
                    "folder (default bench-suite).")
flags.DEFINE_integer("warmup", 3, "Untimed repetitions.")
flags.DEFINE_integer("steps", 10, "Timed repetitions.")
flags.DEFINE_integer("per_device_batch", None,
                     "step/efficiency/input: batch per device (overrides the config's).")
flags.DEFINE_string("per_device_batches", None,
                    "step: per-device batches to try in order, the next one after running out of "
                    "memory, e.g. 256,128 (overrides --per_device_batch).")
flags.DEFINE_integer("memory_limit_bytes", None,
                     "step: treat a compiled step needing more device memory than this as out of "
                     "memory (default: the allocator's limit where the device reports one).")
flags.DEFINE_float("host_seconds", 5.0, "input: seconds of the one-core decode + crop timing.")
flags.DEFINE_string("workers", "0,1,2", "input: comma-separated grain worker counts.")
flags.DEFINE_integer("batches", 20, "input: batches timed per worker count.")
flags.DEFINE_string("lengths", "32,77,128,323", "efficiency: CLIP caption lengths.")
flags.DEFINE_string("variant", "B/16", "efficiency: ViT variant.")
flags.DEFINE_integer("image_size", 224, "efficiency: image size.")
flags.DEFINE_bool("remat", False, "efficiency: rematerialise every block (as the original runs).")
flags.DEFINE_string("texts", None, "embed: a text file to embed (one text per line).")
flags.DEFINE_string("embed_config", None, "embed: embed/configs/*.py (default: the config's).")
flags.DEFINE_string("workdir", "bench_workdir",
                    "eval: where a config with data.prepare builds its data.")
flags.DEFINE_string("compare_config", None,
                    "step: a second config (e.g. the CLIP counterpart) timed in the same run; "
                    "the table then shows the step-time and FLOPs ratios.")
flags.DEFINE_float("budget_s", 420, "suite: wall-clock seconds for the whole suite; rows that "
                   "would start later are skipped, a row still running then is stopped.")
flags.DEFINE_float("row_min_s", 20, "suite: do not start a row with fewer seconds than this left.")
flags.DEFINE_string("suite_batches", "256,128", "suite: per-device batches to try, in order, "
                    "the next one after running out of memory.")
flags.DEFINE_string("suite_lengths", "77,323", "suite: CLIP caption lengths.")
flags.DEFINE_integer("suite_records", 4096, "suite: 256-px JPEG records generated for the input "
                     "and end-to-end rows.")
flags.DEFINE_integer("suite_e2e_steps", 60, "suite: training steps of the end-to-end row.")
flags.DEFINE_string("suite_workers", "auto", "suite: grain worker counts of the input row "
                    "(auto: 1, 2, 4, ... up to the CPU cores).")
flags.DEFINE_enum("suite_embed_arch", "auto", ["auto", "7b", "tiny"],
                  "suite: NV-Embed-v2-architecture size of the embedding row (auto: 7b on a GPU, "
                  "tiny elsewhere).")
flags.DEFINE_integer("suite_captions", 0, "suite: captions the embedding row embeds "
                     "(0: 8192 for the 7B model, 256 for the tiny one).")
flags.DEFINE_string("suite_rows", None, "suite: run only the rows whose name matches this "
                    "regular expression (e.g. 'CLIP' or 'input|e2e'); the others are listed as "
                    "not selected.")
flags.DEFINE_bool("fresh", False, "suite: measure every row again instead of keeping the rows "
                  "that finished in an earlier run into the same --output.")


def device_info() -> dict[str, Any]:
  import jax

  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
          "process_count": jax.process_count(), "jax": jax.__version__}


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
  from lift_jax import common

  print(f"\n{title}")
  print(common.format_table([[_fmt(r.get(c)) for c in columns] for r in rows], header=columns))


def write_json(result: dict[str, Any], mode: str) -> str:
  path = FLAGS.output or f"bench-{mode}.json"
  with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"\nwrote {path}")
  return path


# ----------------------------------------------------------------------------------------------
# step
# ----------------------------------------------------------------------------------------------


def memory_of(compiled) -> dict[str, float | None]:
  try:
    m = compiled.memory_analysis()
  except Exception:
    return {"compiled_bytes": None}
  if m is None:
    return {"compiled_bytes": None}
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
           m.alias_size_in_bytes)
  return {"compiled_bytes": float(total), "temp_bytes": float(m.temp_size_in_bytes),
          "argument_bytes": float(m.argument_size_in_bytes)}


def random_batch(config, batch_sharding):
  import jax
  import jax.numpy as jnp

  b, s = config.batch_size, config.model.image_size

  def make(key):
    k1, k2 = jax.random.split(key)
    images = jax.random.randint(k1, (b, s, s, 3), 0, 256, jnp.int32).astype(jnp.uint8)
    if config.model.mode == "lift":
      text = jax.random.normal(k2, (b, config.model.embed_dim), jnp.float32)
    else:
      length = config.model.text.context_length
      text = jax.random.randint(k2, (b, length), 1, config.model.text.vocab_size - 1, jnp.int32)
      eot = config.model.text.get("eot_token_id")
      text = text.at[:, -1].set(config.model.text.vocab_size - 1 if eot is None else eot)
    return {"image": images, "text": text, "valid": jnp.ones((b,), bool),
            "reason": jnp.zeros((b,), jnp.int8)}

  return jax.jit(make, out_shardings=batch_sharding)(jax.random.PRNGKey(1))


def compile_step(config, mesh=None, abstract: bool = False):
  """(setup, compiled step, compile seconds, state or None, batch or None)."""
  import jax

  from lift_jax import train

  mesh = mesh or train.make_mesh(config)
  setup = train.build(config, mesh)
  if abstract:
    state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                         setup.abstract_state, setup.state_shardings)
    batch = train.abstract_batch(config, setup.batch_sharding)
  else:
    with jax.set_mesh(mesh):
      state = jax.jit(setup.init, out_shardings=setup.state_shardings)(
          jax.random.PRNGKey(config.seed))
      batch = random_batch(config, setup.batch_sharding)
  t0 = time.perf_counter()
  compiled = setup.step.lower(state, batch).compile()
  return setup, compiled, time.perf_counter() - t0, (None if abstract else state), (
      None if abstract else batch), mesh


class OutOfMemory(RuntimeError):
  """The step does not fit the device at this batch (detected before running it)."""


def is_out_of_memory(e: BaseException) -> bool:
  text = str(e)
  return isinstance(e, OutOfMemory) or "RESOURCE_EXHAUSTED" in text or \
      "out of memory" in text.lower()


def step_batches() -> list[int | None]:
  """The per-device batches --mode=step tries, in order (None: the config's own)."""
  batches = [int(x) for x in (FLAGS.per_device_batches or "").split(",") if x.strip()]
  return batches or [FLAGS.per_device_batch]


def bench_step(config) -> dict[str, Any]:
  """The step bench at the first per-device batch of ``step_batches()`` that fits in memory."""
  import jax

  choices = step_batches()
  too_big = []
  for i, per_device in enumerate(choices):
    c = copy.deepcopy(config)
    if per_device:
      c.batch_size = per_device * jax.device_count()
    try:
      result = bench_step_once(c)
    except Exception as e:  # noqa: BLE001 - only running out of memory moves on
      if not is_out_of_memory(e) or i == len(choices) - 1:
        raise
      message = str(e).strip().splitlines()[0][:300]
      print(f"per-device batch {per_device} does not fit: {message}", flush=True)
      too_big.append({"per_device_batch": per_device, "error": message})
      continue
    result["batches_out_of_memory"] = too_big
    return result
  raise AssertionError("unreachable")


def bench_step_once(config) -> dict[str, Any]:
  import jax

  from lift_jax import train
  from lift_jax.metrics import peak_flops

  setup, compiled, compile_s, state, batch, mesh = compile_step(config)
  mem = memory_of(compiled)
  stats = jax.devices()[0].memory_stats() or {}
  limit = FLAGS.memory_limit_bytes or stats.get("bytes_limit")
  if limit and mem["compiled_bytes"] and mem["compiled_bytes"] > limit:
    raise OutOfMemory(f"the compiled step needs {mem['compiled_bytes'] / 2**20:.1f} MiB, the "
                      f"device allows {limit / 2**20:.1f} MiB")
  flops = train.flops_per_step(compiled)
  times = []
  with jax.set_mesh(mesh):
    for i in range(FLAGS.warmup + FLAGS.steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      if i >= FLAGS.warmup:
        times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  n = mesh.devices.size
  info = device_info()
  peak = peak_flops(info["device_kind"])
  stats = jax.devices()[0].memory_stats() or {}
  per_device = config.batch_size // n
  result = {
      **info, "mode": config.model.mode, "variant": config.model.variant,
      "image_size": config.model.image_size, "dtype": config.model.dtype,
      "context_length": config.model.text.context_length if config.model.mode == "clip" else None,
      "attention_impl": config.model.get("attention_impl") or "default (xla)",
      "remat": bool(config.model.get("remat")),
      "what": f"jitted train step (forward, backward, optimizer) on random on-device data; "
              f"median of {FLAGS.steps} timed steps after {FLAGS.warmup} warm-up steps",
      "global_batch": config.batch_size, "per_device_batch": per_device,
      "compile_s": compile_s, "step_s_median": step_s, "step_s_all": times,
      "img_per_s": config.batch_size / step_s,
      "img_per_s_per_device": config.batch_size / step_s / n,
      "flops_per_step_per_device": flops,
      "gflops_per_image": flops / per_device / 1e9 if flops else None,
      "peak_flops_per_device": peak,
      "mfu": (flops / step_s / peak) if (flops and peak) else None,
      "peak_bytes_in_use": stats.get("peak_bytes_in_use"), **mem,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "final_loss": float(metrics["loss"]),
  }
  print_table([result], ["device_kind", "mode", "global_batch", "per_device_batch", "compile_s",
                         "step_s_median", "img_per_s", "img_per_s_per_device",
                         "flops_per_step_per_device", "mfu", "peak_bytes_in_use",
                         "compiled_bytes"], "train step")
  return result


def _load_config(path: str):
  from lift_jax import common

  return common.load_config_file(path)


def bench_steps(config) -> dict[str, Any]:
  """The step bench of ``config`` and, with --compare_config, of a second config, in one run."""
  first = bench_step(config)
  if not FLAGS.compare_config:
    return first
  second = bench_step(_load_config(FLAGS.compare_config))
  ratio = {"step_time_ratio": first["step_s_median"] / second["step_s_median"],
           "flops_ratio": (first["flops_per_step_per_device"] /
                           second["flops_per_step_per_device"])
           if first["flops_per_step_per_device"] and second["flops_per_step_per_device"]
           else None}
  print_table([ratio], list(ratio), f"{first['mode']} / {second['mode']} (same run, same device)")
  return {"first": first, "second": second, **ratio}


# ----------------------------------------------------------------------------------------------
# efficiency: LIFT vs CLIP, compiled FLOPs and memory per step
# ----------------------------------------------------------------------------------------------


def efficiency_configs(per_device_batch: int, variant: str, image_size: int,
                       lengths: list[int]):
  import jax

  from lift_jax import config_lib

  n = jax.device_count()
  out = []
  lift = config_lib.base("lift")
  clip = config_lib.base("clip")
  for c in (lift, clip):
    c.batch_size = per_device_batch * n
    c.model.variant, c.model.image_size = variant, image_size
    c.model.remat = FLAGS.remat
  out.append(("LIFT", None, lift))
  for length in lengths:
    c = copy.deepcopy(clip)
    c.model.text.context_length = length
    out.append((f"CLIP-{length}", length, c))
  return out


def bench_efficiency() -> dict[str, Any]:
  from lift_jax import train

  rows = []
  lengths = [int(x) for x in FLAGS.lengths.split(",") if x]
  pdb = FLAGS.per_device_batch or 64
  for name, length, config in efficiency_configs(pdb, FLAGS.variant, FLAGS.image_size, lengths):
    _, compiled, compile_s, *_ = compile_step(config, abstract=True)
    flops = train.flops_per_step(compiled)
    mem = memory_of(compiled)
    rows.append({"model": name, "caption_length": length, "flops_per_step": flops,
                 "gflops_per_image": flops / pdb / 1e9 if flops else None,
                 "memory_bytes": mem["compiled_bytes"], "compile_s": compile_s})
    print(f"compiled {name} in {compile_s:.1f}s", flush=True)
  lift = rows[0]
  for r in rows[1:]:
    r["lift_flops_saving"] = 1 - lift["flops_per_step"] / r["flops_per_step"]
    r["lift_memory_saving"] = 1 - lift["memory_bytes"] / r["memory_bytes"]
  info = device_info()
  print_table(rows, ["model", "caption_length", "gflops_per_image", "flops_per_step",
                     "memory_bytes", "lift_flops_saving", "lift_memory_saving"],
              f"LIFT vs CLIP, {FLAGS.variant} at {FLAGS.image_size}, per-device batch {pdb}, "
              f"remat={FLAGS.remat}, compiled on {info['device_kind']} (not run)")
  return {**info, "per_device_batch": pdb, "variant": FLAGS.variant, "remat": FLAGS.remat,
          "image_size": FLAGS.image_size, "rows": rows}


# ----------------------------------------------------------------------------------------------
# input pipeline
# ----------------------------------------------------------------------------------------------


def _fake_embeddings(image_dir: str, dim: int, out: str | None = None) -> str:
  """Random float16 embedding shards aligned with ``image_dir`` (a bench needs only their bytes),
  with a manifest as the embedding job writes one (dims, per-shard counts, SHA-256s and the
  SHA-256 of the image shard each was computed from)."""
  import numpy as np

  from lift_jax.data import records

  out = out or tempfile.mkdtemp(prefix="bench_embeddings_")
  os.makedirs(out, exist_ok=True)
  image_entries = {e["file"]: e for e in records.read_manifest(image_dir)["shards"]}
  rng = np.random.default_rng(0)
  entries = []
  shards = records.list_shards(image_dir, records.IMAGES)
  for i, path in enumerate(shards):
    keys = records.read_keys(path)
    recs = [records.embedding_record(k, rng.normal(size=dim)) for k in keys]
    entry = records.write_shard(
        os.path.join(out, records.shard_name(records.EMBEDDINGS, i, len(shards))), recs)
    entry["image_sha256"] = image_entries.get(os.path.basename(path), {}).get("sha256")
    entries.append(entry)
  records.write_manifest(out, {"kind": "embeddings", "dim": dim, "storage_dtype": "float16",
                               "normalized": False, "num_shards": len(shards), "complete": True,
                               "shards": entries})
  return out


def host_transform_rate(config, seconds: float) -> dict[str, float]:
  """Images/s of decode + crop (+ numpy normalise) on one core, outside grain."""
  import numpy as np

  from lift_jax.data import records, transforms

  path = records.list_shards(config.data.images, records.IMAGES)[0]
  blobs = [r["image"] for r, _ in zip(records.iter_records(path), range(256))]
  rng = np.random.default_rng(0)
  size = config.model.image_size
  out = {}
  for name, normalise in (("decode_crop", False), ("decode_crop_normalise", True)):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      img = transforms.decode(blobs[n % len(blobs)], min_size=size)
      x = transforms.random_resized_crop(img, size, rng, config.data.crop_scale,
                                         config.data.crop_ratio)
      if normalise:
        transforms.normalize(x[None], config.data.mean, config.data.std)
      n += 1
    out[f"{name}_img_per_s_per_core"] = n / (time.perf_counter() - t0)
  w, h = transforms.decode(blobs[0]).size
  out["source_image_size"] = f"{w}x{h}"
  return out


def bench_input(config) -> dict[str, Any]:
  from lift_jax.data import pipeline

  if not config.data.images:
    raise app.UsageError("--mode=input needs --config.data.images=DIR of image shards")
  if config.model.mode == "lift" and not config.data.embeddings:
    config.data.embeddings = _fake_embeddings(config.data.images, config.model.embed_dim)
  if FLAGS.per_device_batch:
    import jax

    config.batch_size = FLAGS.per_device_batch * jax.device_count()
  rows = []
  for workers in [int(x) for x in FLAGS.workers.split(",")]:
    config.data.workers = workers
    it = iter(pipeline.train_dataset(config))
    for _ in range(max(FLAGS.warmup, 1 + workers)):
      next(it)
    t0 = time.perf_counter()
    for _ in range(FLAGS.batches):
      next(it)
    dt = time.perf_counter() - t0
    rate = FLAGS.batches * config.batch_size / dt
    rows.append({"workers": workers, "img_per_s": rate,
                 "img_per_s_per_worker": rate / max(workers, 1)})
    if hasattr(it, "close"):
      it.close()
  host = host_transform_rate(config, FLAGS.host_seconds)
  print_table(rows, ["workers", "img_per_s", "img_per_s_per_worker"],
              f"input pipeline ({config.data.images}, batch {config.batch_size}, "
              f"{os.cpu_count()} CPU cores)")
  print_table([host], list(host), "one core, no grain")
  return {**device_info(), "cpu_count": os.cpu_count(), "batch": config.batch_size,
          "image_size": config.model.image_size, "rows": rows, "host_transform": host,
          "what": f"grain pipeline of the config (read, decode, random resized crop, batch) "
                  f"over {config.data.images}; {FLAGS.batches} batches timed per worker count "
                  "after warm-up; one core without grain for comparison"}


# ----------------------------------------------------------------------------------------------
# embed and eval
# ----------------------------------------------------------------------------------------------


def bench_embed(config) -> dict[str, Any]:
  """Runs the PyTorch embedding job on a text file in a subprocess (torch stays out of this one)."""
  if not FLAGS.texts:
    raise app.UsageError("--mode=embed needs --texts=FILE (one text per line)")
  embed_config = FLAGS.embed_config or (config.data.get("embed_config") if config else None) or \
      os.path.join(os.path.dirname(__import__("embed").__file__), "configs", "minilm.py")
  out = tempfile.mkdtemp(prefix="bench_embed_")
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "embed.main", f"--config={embed_config}",
                         f"--config.texts={FLAGS.texts}", f"--config.output={out}"],
                        capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"embed.main failed:\n{proc.stderr[-3000:]}")
  from lift_jax.data import records

  manifest = records.read_manifest(out)
  summary = manifest.get("summary", {})
  row = {"texts": FLAGS.texts, "wall_s": wall, **{k: v for k, v in summary.items()
                                                  if not isinstance(v, (dict, list))}}
  print_table([row], list(row), f"embedding job ({embed_config})")
  return {"embed_config": embed_config, "wall_s": wall, "summary": summary,
          "stderr_tail": proc.stderr[-2000:]}


def bench_eval(config) -> dict[str, Any]:
  """Wall time of each configured benchmark for a randomly initialised model of the config
  (after a warm-up run that compiles)."""
  import jax
  from flax import nnx

  from eval.evaluators import EvalRunner
  from lift_jax import config_lib, prepare, train
  from lift_jax.models.two_tower import TwoTower

  config = prepare.prepare_data(config, FLAGS.workdir)
  config, dropped = config_lib.resolve_eval_paths(config)
  if dropped:
    raise app.UsageError(f"benchmarks {dropped} have relative paths: set --config.evals.data_root")
  mesh = train.make_mesh(config)
  model = TwoTower(config.model.to_dict(), rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.split(model)[1])
  runner = EvalRunner(config, model, mesh)
  runner.run(params)  # warm-up: compiles
  metrics = runner.run(params)
  rows = [{"benchmark": name, "seconds": seconds,
           **{k: v for k, v in metrics.items() if k.startswith(f"{name}/")}}
          for name, seconds in runner.timings.items()]
  print_table(rows, ["benchmark", "seconds"], f"evaluation ({jax.devices()[0].device_kind}; "
              "images that several benchmarks share are embedded once, by the first)")
  return {**device_info(), "rows": rows}


# ----------------------------------------------------------------------------------------------
# suite: what an accelerator run should measure, in order of value, within a time budget
# ----------------------------------------------------------------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE_CONFIGS = {"lift": os.path.join(REPO_ROOT, "configs", "vitb16_datacomp.py"),
                 "clip": os.path.join(REPO_ROOT, "configs", "clip_vitb16_datacomp.py")}

# Sizes of the embedding row's NV-Embed-v2-architecture model: "7b" is embed.nvembed.NV_EMBED_V2
# (the released checkpoint's, read in the child: this process does not import torch); "tiny" is
# the same layout at a size a CPU runs in seconds.
NVEMBED_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=32000,
                    num_latents=16, latent_dim=64, num_cross_heads=2, cross_dim_head=32)
_WRITE_NVEMBED = ("import json, sys\n"
                  "from embed import nvembed\n"
                  "sizes = json.loads(sys.argv[2]) or nvembed.NV_EMBED_V2\n"
                  "nvembed.write_checkpoint(sys.argv[1], weights=False, **sizes)\n"
                  "print(json.dumps(sizes))\n")


@dataclasses.dataclass
class SuiteRow:
  """One row of the suite; ``attention`` may be 'best' / 'other' (decided by the LIFT rows)."""
  kind: str  # step | input | e2e | embed
  model: str = "lift"  # step rows: lift | clip
  length: int | None = None  # CLIP caption length
  attention: str = "xla"
  remat: bool = False

  def resolve(self, best: str) -> "SuiteRow":
    other = {"xla": "cudnn", "cudnn": "xla"}[best]
    return dataclasses.replace(self, attention={"best": best, "other": other}.get(
        self.attention, self.attention))

  @property
  def name(self) -> str:
    if self.kind != "step":
      return self.kind
    model = "LIFT" if self.model == "lift" else f"CLIP-{self.length}"
    return f"step {model} attention={self.attention} remat={'on' if self.remat else 'off'}"


def suite_plan(lengths: list[int]) -> list[SuiteRow]:
  """Rows in order of value: the LIFT step with each attention, CLIP at each length with the
  faster one; input; end to end; embedding; then LIFT with remat and the remaining variants."""
  rows = [SuiteRow("step", "lift", attention="xla"), SuiteRow("step", "lift", attention="cudnn")]
  rows += [SuiteRow("step", "clip", n, attention="best") for n in lengths]
  rows += [SuiteRow("input"), SuiteRow("e2e"), SuiteRow("embed"),
           SuiteRow("step", "lift", attention="best", remat=True)]
  rows += [SuiteRow("step", "clip", n, attention="other") for n in lengths]
  rows += [SuiteRow("step", "clip", n, attention="best", remat=True) for n in lengths]
  return rows


def _worker_counts(spec: str) -> list[int]:
  if spec != "auto":
    return [int(x) for x in spec.split(",") if x.strip()]
  cores = os.cpu_count() or 1
  counts, w = [], 1
  while w < cores:
    counts.append(w)
    w *= 2
  return counts + [cores]


# Captions for the generated records and the embedding row: lengths spread like web alt-texts
# and short re-captions (3 to 40 words), from a fixed vocabulary.
_CAPTION_WORDS = ("a photo of the small large red blue green old new wooden metal dog cat man "
                  "woman child car house tree street table on in with near under next to "
                  "standing sitting running white black bright dark city beach field room "
                  "window light water sky building two three people group close view").split()


def bench_caption(rng) -> str:
  n = int(rng.integers(3, 41))
  return " ".join(rng.choice(_CAPTION_WORDS, size=n))


def bench_jpeg_record(seed: int, index: int):
  """Record ``index`` of the generated input set: a 256x341 JPEG (quality 90) of smooth colour
  fields plus noise, about the size and decode cost of a pre-resized web photo, and a caption.
  A ``shards.build_shards`` worker (module level, so it pickles)."""
  import io

  import numpy as np
  from PIL import Image

  from lift_jax.data import records

  rng = np.random.default_rng([seed, index])
  coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(coarse).resize((341, 256), Image.BICUBIC), np.float32)
  img += rng.normal(0, 12, img.shape)
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
  key = f"bench-{index:08d}"
  return key, records.image_record(key, buf.getvalue(), bench_caption(rng)), ()


def suite_data(folder: str, records_n: int, dim: int, eval_n: int = 256) -> dict[str, str]:
  """JPEG image shards + aligned embedding shards (numpy, no embedding job), a small eval shard
  folder and a text bank of its captions; reused when already complete."""
  import functools

  import numpy as np

  from lift_jax.data import records, shards

  out = {"images": os.path.join(folder, "images"), "embeddings": os.path.join(folder, "embeddings"),
         "eval_images": os.path.join(folder, "eval_images"), "bank": os.path.join(folder, "bank"),
         "captions": os.path.join(folder, "captions.txt")}
  cores = os.cpu_count() or 1
  num_shards = max(1, min(16, records_n // 256))
  for part, seed, n, k in (("images", 0, records_n, num_shards), ("eval_images", 1, eval_n, 1)):
    shards.build_shards(out[part], shards.split_even(range(n), k),
                        functools.partial(bench_jpeg_record, seed),
                        identity={"bench_jpeg": 1, "seed": seed, "records": n, "shards": k},
                        workers=min(cores, 16), progress=False, desc=part, log=print)
  manifest = os.path.join(out["embeddings"], records.MANIFEST)
  if not (os.path.exists(manifest) and records.read_manifest(out["embeddings"]).get("dim") == dim):
    _fake_embeddings(out["images"], dim, out["embeddings"])
  if not os.path.exists(os.path.join(out["bank"], records.MANIFEST)) or \
      records.read_manifest(out["bank"]).get("dim") != dim:
    captions = [r["caption"] for p in records.list_shards(out["eval_images"], records.IMAGES)
                for r in records.iter_records(p)]
    texts = list(dict.fromkeys(captions))
    rng = np.random.default_rng(1)
    os.makedirs(out["bank"], exist_ok=True)
    entry = records.write_shard(
        os.path.join(out["bank"], records.shard_name(records.BANK, 0, 1)),
        (records.embedding_record(t, rng.normal(size=dim)) for t in texts))
    records.write_manifest(out["bank"], {"kind": "text_bank", "dim": dim,
                                         "storage_dtype": "float16", "shards": [entry]})
  return out


def _write_captions(path: str, n: int) -> str:
  import numpy as np

  rng = np.random.default_rng(2)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(bench_caption(rng) + "\n" for _ in range(n))
  return path


def e2e_config_file(path: str, base: str, data: dict[str, str], *, global_batch: int, steps: int,
                    workers: int, overrides: dict[str, Any]) -> str:
  """A config file: ``base`` trained on the generated data for ``steps`` steps, with an async
  checkpoint half way and at the end, and a retrieval eval over the generated eval shard."""
  settings = {
      "batch_size": global_batch, "total_steps": steps, "log_every_steps": max(1, steps // 6),
      "checkpoint_every_steps": max(1, steps // 2), "async_checkpoints": True,
      "tensorboard": False, "eval_every_steps": 0, "optim.warmup_steps": max(1, steps // 6),
      "data.images": data["images"], "data.embeddings": data["embeddings"],
      "data.workers": workers, "data.prepare": None, "evals.text_bank": data["bank"],
      "evals.data_root": None, "evals.synthetic_suite": False,
      "evals.batch_size": global_batch, **overrides}
  benchmarks = {"generated": {"type": "retrieval", "shards": data["eval_images"],
                              "protocol": "lift"}}
  lines = ["import importlib.util", "", "", "def get_config():",
           f"  spec = importlib.util.spec_from_file_location('e2e_base', {base!r})",
           "  module = importlib.util.module_from_spec(spec)",
           "  spec.loader.exec_module(module)",
           "  c = module.get_config()",
           f"  c.evals.benchmarks = {benchmarks!r}"]
  for key, value in settings.items():
    lines.append(f"  c.{key} = {value!r}")
  lines.append("  return c")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


def _absl_time(line: str) -> float | None:
  """Seconds since midnight of an absl log line ('I1127 07:55:01.123456 ...')."""
  m = re.match(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d(?:\.\d+)?)", line)
  return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else None


def e2e_breakdown(log_path: str, metrics_path: str, started: float, wall: float
                  ) -> dict[str, Any]:
  """Steady-state img/s and where the wall time of the lift_jax.main run went, from its log
  (absl timestamps) and metrics.jsonl."""
  import datetime

  from lift_jax.metrics import read_jsonl

  rows = read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
  train = [r for r in rows if "img_per_s" in r]
  evals = [r for r in rows if "eval/seconds" in r]
  out: dict[str, Any] = {"logged_intervals": len(train)}
  if len(train) >= 2:
    out["steady_img_per_s"] = statistics.median(r["img_per_s"] for r in train[1:])
    out["first_interval_img_per_s"] = train[0]["img_per_s"]
  elif train:
    out["steady_img_per_s"] = train[0]["img_per_s"]
  marks = {}
  day = datetime.datetime.fromtimestamp(started)
  midnight = day.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
  with open(log_path, encoding="utf-8", errors="replace") as f:
    for line in f:
      t = _absl_time(line)
      if t is None:
        continue
      for mark, text in (("loop", "training from step"), ("compiled", "compiled the step")):
        if text in line and mark not in marks:
          marks[mark] = midnight + t
  end = started + wall
  if "loop" in marks:
    out["startup_s"] = marks["loop"] - started
  if "loop" in marks and "compiled" in marks:
    out["first_batch_and_compile_s"] = marks["compiled"] - marks["loop"]
  if "compiled" in marks and train:
    out["training_s"] = train[-1]["time"] - marks["compiled"]
  if evals:
    out["eval_s"] = evals[-1]["eval/seconds"]
  known = sum(out.get(k, 0.0) for k in ("startup_s", "first_batch_and_compile_s", "training_s",
                                        "eval_s"))
  out["rest_s"] = max(end - started - known, 0.0)  # final checkpoint, shutdown
  return out


class Suite:
  """Runs the rows, each in its own process (a crash or an out-of-memory error costs one row, each
  row's peak memory is its own, and the budget can stop a row), and rewrites suite.json and
  suite.md after every row."""

  def __init__(self, out: str, budget_s: float, lift_config: str, clip_config: str,
               lift_overrides: list[str]):
    self.out = os.path.abspath(out)
    self.start = time.time()
    self.deadline = self.start + budget_s
    self.budget_s = budget_s
    self.configs = {"lift": lift_config, "clip": clip_config}
    self.lift_overrides = lift_overrides
    self.rows: list[dict[str, Any]] = []
    self.device: dict[str, Any] = {}
    self._data: dict[str, str] | None = None
    os.makedirs(os.path.join(self.out, "rows"), exist_ok=True)
    os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
    self.previous: dict[str, dict[str, Any]] = {}
    path = os.path.join(self.out, "suite.json")
    if os.path.exists(path) and not FLAGS.fresh:
      with open(path, encoding="utf-8") as f:
        self.previous = {r["name"]: r for r in json.load(f).get("rows", [])
                         if r.get("status") == "ok"}

  # -- running children ---------------------------------------------------------------------------
  def remaining(self) -> float:
    return self.deadline - time.time()

  def child(self, slug: str, argv: list[str], timeout: float) -> tuple[int | None, float, str]:
    """Runs ``argv`` in its own process group; (exit status or None on timeout, seconds, log).
    The group (grain workers included) is stopped on timeout and when this process is told to
    stop (SIGTERM, Ctrl-C)."""
    log = os.path.join(self.out, "logs", f"{slug}.log")
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
      f.write("$ " + " ".join(argv) + "\n")
      f.flush()
      proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                              start_new_session=True)
      try:
        code = proc.wait(timeout=max(timeout, 1))
      except subprocess.TimeoutExpired:
        _stop_group(proc)
        code = None
      except BaseException:
        _stop_group(proc)
        raise
    return code, time.time() - t0, log

  def child_row(self, slug: str, argv: list[str]) -> tuple[bool, dict[str, Any]]:
    """:meth:`child` within the budget left; (whether it exited 0, the row's status fields)."""
    code, seconds, log = self.child(slug, argv, self.remaining())
    status = {"seconds": seconds, "log": os.path.relpath(log, self.out)}
    if code is None:
      return False, {**status, "status": "stopped: budget spent while it ran"}
    if code != 0:
      return False, {**status, "status": "failed", "error": _last_error(log)}
    return True, {**status, "status": "ok"}

  def bench_child(self, slug: str, args: list[str]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Runs this tool in a child; (its JSON or None, status fields for the row)."""
    out = os.path.join(self.out, "rows", f"{slug}.json")
    if os.path.exists(out):
      os.remove(out)
    ok, status = self.child_row(
        slug, [sys.executable, "-m", "lift_jax.tools.bench", f"--output={out}", *args])
    if not ok:
      return None, status
    with open(out, encoding="utf-8") as f:
      return json.load(f), status

  # -- the rows -----------------------------------------------------------------------------------
  def step_args(self, row: SuiteRow) -> list[str]:
    args = ["--mode=step", f"--config={self.configs[row.model]}",
            f"--config.model.attention_impl={row.attention}", f"--config.model.remat={row.remat}",
            f"--per_device_batches={FLAGS.suite_batches}", f"--warmup={FLAGS.warmup}",
            f"--steps={FLAGS.steps}"]
    if row.model == "lift":
      args += self.lift_overrides
    if row.length:
      args.append(f"--config.model.text.context_length={row.length}")
    if FLAGS.memory_limit_bytes:
      args.append(f"--memory_limit_bytes={FLAGS.memory_limit_bytes}")
    return args

  def lift_step(self) -> dict[str, Any] | None:
    """The fastest finished LIFT step row without remat (of either attention)."""
    done = [r["result"] for r in self.rows if r["status"] == "ok" and r["kind"] == "step"
            and r["result"]["mode"] == "lift" and not r["result"]["remat"]]
    return max(done, key=lambda r: r["img_per_s"]) if done else None

  def per_device_batch(self) -> int:
    first = self.lift_step()
    return first["per_device_batch"] if first else int(FLAGS.suite_batches.split(",")[-1])

  def device_count(self) -> int:
    return int(self.device.get("device_count", 1))

  def data(self) -> dict[str, str]:
    """The generated shards of the input and end-to-end rows (made on first use)."""
    if self._data is None:
      dim = int(_dotted_overrides(self.lift_overrides).get(
          "model.embed_dim", _load_config(self.configs["lift"]).model.embed_dim))
      self._data = suite_data(os.path.join(self.out, "data"), FLAGS.suite_records, dim)
    return self._data

  def run_row(self, row: SuiteRow) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    slug = row.name.replace(" ", "_").replace("=", "-")
    if row.kind == "step":
      return self.bench_child(slug, self.step_args(row))
    if row.kind == "input":
      data = self.data()
      workers = ",".join(str(w) for w in _worker_counts(FLAGS.suite_workers))
      return self.bench_child(slug, [
          "--mode=input", f"--config={self.configs['lift']}", *self.lift_overrides,
          f"--config.data.images={data['images']}",
          f"--config.data.embeddings={data['embeddings']}",
          f"--per_device_batch={self.per_device_batch()}", f"--workers={workers}",
          "--batches=10", "--warmup=2", "--host_seconds=2"])
    if row.kind == "e2e":
      return self.run_e2e(slug)
    return self.run_embed(slug)

  def run_e2e(self, slug: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    data = self.data()
    best = self.lift_step()
    workers = min(os.cpu_count() or 1, 16)
    overrides = {}
    if best:
      overrides = {"model.attention_impl": best["attention_impl"]}
    overrides.update(_dotted_overrides(self.lift_overrides))
    global_batch = self.per_device_batch() * self.device_count()
    workdir = os.path.join(self.out, "e2e_workdir")
    if os.path.isdir(workdir):
      import shutil

      shutil.rmtree(workdir)
    config = e2e_config_file(os.path.join(self.out, "e2e_config.py"), self.configs["lift"], data,
                             global_batch=global_batch, steps=FLAGS.suite_e2e_steps,
                             workers=workers, overrides=overrides)
    started = time.time()
    ok, status = self.child_row(slug, [sys.executable, "-m", "lift_jax.main",
                                       f"--config={config}", f"--workdir={workdir}"])
    if not ok:
      return None, status
    seconds, log = status["seconds"], os.path.join(self.out, status["log"])
    result = {"what": f"python -m lift_jax.main on the generated JPEG shards: "
                      f"{FLAGS.suite_e2e_steps} steps, {workers} grain workers, prefetch, async "
                      "checkpoints, a retrieval eval at the end",
              "global_batch": global_batch, "steps": FLAGS.suite_e2e_steps, "workers": workers,
              "wall_s": seconds, **overrides,
              **e2e_breakdown(log, os.path.join(workdir, "metrics.jsonl"), started, seconds)}
    if best and result.get("steady_img_per_s"):
      result["step_only_img_per_s"] = best["img_per_s"]
      result["e2e_over_step"] = result["steady_img_per_s"] / best["img_per_s"]
    for r in self.rows:  # the input row's rate with as many workers: can the host keep up?
      if r["kind"] == "input" and r["status"] == "ok":
        for w in r["result"]["rows"]:
          if w["workers"] == workers:
            result["input_only_img_per_s"] = w["img_per_s"]
    return result, status

  def run_embed(self, slug: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
      return None, {"status": "not available: PyTorch is not installed"}
    arch = FLAGS.suite_embed_arch
    if arch == "auto":
      arch = "7b" if self.device.get("platform") == "gpu" else "tiny"
    n = FLAGS.suite_captions or (8192 if arch == "7b" else 256)
    texts = _write_captions(os.path.join(self.out, "data", f"captions-{n}.txt"), n)
    folder = os.path.join(self.out, "data", f"nvembed-{arch}")
    ok, status = self.child_row(f"{slug}_checkpoint", [
        sys.executable, "-c", _WRITE_NVEMBED, folder,
        json.dumps(NVEMBED_TINY if arch == "tiny" else {})])
    if not ok:
      return None, status
    seconds_ckpt = status["seconds"]
    output = os.path.join(self.out, "embed_output")
    if os.path.isdir(output):
      import shutil

      shutil.rmtree(output)
    ok, status = self.child_row(slug, [
        sys.executable, "-m", "embed.main",
        f"--config={os.path.join(REPO_ROOT, 'embed', 'configs', 'nvembed_v2.py')}",
        f"--config.model={folder}", "--config.random_init=True", f"--config.texts={texts}",
        f"--config.output={output}", "--config.max_length=77", "--config.progress=False"])
    seconds = status["seconds"]
    status["seconds"] += seconds_ckpt
    if not ok:
      return None, status
    from lift_jax.data import records

    summary = records.read_manifest(output).get("summary", {})
    with open(os.path.join(self.out, "logs", f"{slug}_checkpoint.log"), encoding="utf-8") as f:
      sizes = json.loads(f.read().strip().splitlines()[-1])
    return {"what": f"python -m embed.main, randomly initialised NV-Embed-v2 architecture "
                    f"({arch}), {n} generated captions, max_length 77, the checkpoint's small "
                    "generated tokenizer (more tokens per word than the real one: tokens/s is the "
                    "comparable rate); rates exclude model loading",
            "arch": arch, **sizes, "captions": n, "wall_s": seconds, **summary}, status

  # -- the loop -----------------------------------------------------------------------------------
  def run(self, plan: list[SuiteRow]) -> dict[str, Any]:
    for planned in plan:
      faster = self.lift_step()  # of the two attentions
      row = planned.resolve(faster["attention_impl"] if faster else "xla")
      entry: dict[str, Any] = {"name": row.name, "kind": row.kind}
      if row.name in self.previous:
        entry = dict(self.previous[row.name], kept_from_earlier_run=True)
        print(f"[suite] {row.name}: kept from the earlier run in {self.out}", flush=True)
      elif any(r["name"] == row.name for r in self.rows):
        continue  # 'best' and 'other' made it the same as a row already run
      elif FLAGS.suite_rows and not re.search(FLAGS.suite_rows, row.name):
        entry["status"] = "skipped: not selected (--suite_rows)"
      elif row.kind == "step" and row.attention == "cudnn" and self.device and \
          self.device.get("platform") != "gpu":
        entry["status"] = (f"skipped: cuDNN attention needs an NVIDIA GPU "
                           f"(this is {self.device.get('platform')})")
      elif self.remaining() < FLAGS.row_min_s:
        entry["status"] = "skipped: budget spent"
      else:
        print(f"[suite] {row.name} ({self.remaining():.0f} s of the budget left)", flush=True)
        try:
          result, status = self.run_row(row)
        except (SuiteStopped, KeyboardInterrupt):
          entry["status"] = "stopped: the suite was told to stop"
          self.rows.append(entry)
          self.write()
          raise
        except Exception as e:  # noqa: BLE001 - preparing one row must not end the others
          import traceback

          traceback.print_exc()
          result, status = None, {"status": "failed",
                                  "error": f"in the suite: {type(e).__name__}: {e}"}
        entry.update(status)
        entry["result"] = result
      if entry.get("result") and not self.device and "device_kind" in entry["result"]:
        self.device = {k: entry["result"].get(k) for k in
                       ("platform", "device_kind", "device_count", "process_count", "jax")}
      if entry.get("result"):  # every measured row says where it ran
        entry.setdefault("device_kind", entry["result"].get("device_kind",
                                                            self.device.get("device_kind")))
        entry.setdefault("jax", entry["result"].get("jax", self.device.get("jax")))
      print(f"[suite] {row.name}: {entry['status']}" +
            (f" ({entry['error']})" if entry.get("error") else ""), flush=True)
      self.rows.append(entry)
      self.write()
    return self.write()

  def summary(self) -> dict[str, Any]:
    out: dict[str, Any] = {}
    steps = {r["name"]: r["result"] for r in self.rows if r["status"] == "ok"
             and r["kind"] == "step"}
    lift = self.lift_step()
    if lift:
      out["lift_img_per_s"] = lift["img_per_s"]
      for name, r in steps.items():
        if r["mode"] == "clip" and not r["remat"] and \
            r["attention_impl"] == lift["attention_impl"]:
          out[f"lift_over_clip{r['context_length']}_img_per_s"] = \
              lift["img_per_s"] / r["img_per_s"]
    for r in self.rows:
      if r["status"] == "ok" and r["kind"] == "e2e" and r["result"].get("e2e_over_step"):
        out["e2e_over_step"] = r["result"]["e2e_over_step"]
    return out

  def write(self) -> dict[str, Any]:
    result = {"device": self.device, "budget_s": self.budget_s,
              "elapsed_s": time.time() - self.start, "command": " ".join(sys.argv),
              "configs": self.configs, "rows": self.rows, "summary": self.summary()}
    for name, text in (("suite.json", json.dumps(result, indent=1)),
                       ("suite.md", suite_markdown(result))):
      path = os.path.join(self.out, name)
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
      os.replace(path + ".tmp", path)
    return result


class SuiteStopped(Exception):
  """SIGTERM reached the suite (e.g. an outer ``timeout``)."""


def _raise_stopped(signum, frame):
  del signum, frame
  raise SuiteStopped()


def _stop_group(proc: subprocess.Popen) -> None:
  """SIGTERM to the child's process group, SIGKILL 10 s later if it is still there."""
  import signal

  for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=wait)
      return
    except subprocess.TimeoutExpired:
      continue


def _dotted_overrides(args: list[str]) -> dict[str, Any]:
  """'--config.a.b=V' flags as {'a.b': V} (V parsed as a Python literal where it is one)."""
  import ast

  out = {}
  for arg in args:
    key, _, value = arg[len("--config."):].partition("=")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def _last_error(log: str) -> str:
  """The most telling line of a failed child's log: its last exception or error line."""
  with open(log, encoding="utf-8", errors="replace") as f:
    lines = [line.strip() for line in f if line.strip()]
  for line in reversed(lines):
    if "Error" in line or "error:" in line or "Exception" in line:
      return line[:500]
  return lines[-1][:500] if lines else "no output"


def _fmt(v: Any, digits: int = 4) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.{digits}g}"
  return str(v)


def suite_markdown(result: dict[str, Any]) -> str:
  d = result["device"]
  lines = [f"# Bench suite on {d.get('device_kind', '?')} x{d.get('device_count', '?')} "
           f"(jax {d.get('jax', '?')})", "",
           f"{len(result['rows'])} rows in {result['elapsed_s']:.0f} s of a "
           f"{result['budget_s']:.0f} s budget. Command: `{result['command']}`", "",
           "## Train step (random on-device data)", "",
           "| row | status | per-device batch | img/s | img/s/device | GFLOP/img | MFU | "
           "memory GiB (peak in use; CPU: compiled) | compile s |",
           "|---|---|---|---|---|---|---|---|---|"]
  gib = lambda b: b / 2**30 if b else None
  for r in result["rows"]:
    if r["kind"] != "step":
      continue
    x = r.get("result") or {}
    oom = "".join(f"; {b['per_device_batch']} out of memory"
                  for b in x.get("batches_out_of_memory", []))
    lines.append(f"| {r['name']} | {r['status']}{oom} | {_fmt(x.get('per_device_batch'))} | "
                 f"{_fmt(x.get('img_per_s'))} | {_fmt(x.get('img_per_s_per_device'))} | "
                 f"{_fmt(x.get('gflops_per_image'))} | {_fmt(x.get('mfu'), 3)} | "
                 f"{_fmt(gib(x.get('peak_bytes_in_use') or x.get('compiled_bytes')), 3)} | "
                 f"{_fmt(x.get('compile_s'), 3)} |")
  for r in result["rows"]:
    x = r.get("result") or {}
    if r["kind"] == "input":
      lines += ["", "## Input pipeline (grain, generated 256-px JPEG shards)", ""]
      if x:
        lines += [f"batch {x['batch']}, {x['cpu_count']} CPU cores; one core without grain: "
                  f"{_fmt(x['host_transform'].get('decode_crop_img_per_s_per_core'))} img/s "
                  "(decode + crop)", "", "| workers | img/s | img/s/worker |", "|---|---|---|"]
        lines += [f"| {w['workers']} | {_fmt(w['img_per_s'])} | "
                  f"{_fmt(w['img_per_s_per_worker'])} |" for w in x["rows"]]
      else:
        lines.append(r["status"])
    elif r["kind"] == "e2e":
      lines += ["", "## End to end (python -m lift_jax.main)", ""]
      lines += ([f"- {k}: {_fmt(v)}" for k, v in x.items()] if x else [r["status"]])
    elif r["kind"] == "embed":
      lines += ["", "## Embedding job", ""]
      lines += ([f"- {k}: {_fmt(v)}" for k, v in x.items()] if x else [r["status"]])
  if result["summary"]:
    lines += ["", "## Summary", ""] + [f"- {k}: {_fmt(v)}" for k, v in result["summary"].items()]
  problems = [r for r in result["rows"] if r["status"] != "ok"]
  if problems:
    lines += ["", "## Not measured", ""]
    lines += [f"- {r['name']}: {r['status']}" + (f" ({r['error']})" if r.get("error") else "")
              for r in problems]
  return "\n".join(lines) + "\n"


def run_suite() -> dict[str, Any]:
  """``--mode=suite``: see the README's "Measuring cost". This process never touches the
  accelerator; every row runs in a child."""
  lift = config_flags.get_config_filename(FLAGS["config"]) if FLAGS.config is not None \
      else SUITE_CONFIGS["lift"]
  clip = FLAGS.compare_config or SUITE_CONFIGS["clip"]
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  lengths = [int(x) for x in FLAGS.suite_lengths.split(",") if x.strip()]
  suite = Suite(FLAGS.output or "bench-suite", FLAGS.budget_s, os.path.abspath(lift),
                os.path.abspath(clip), overrides)
  import signal

  signal.signal(signal.SIGTERM, _raise_stopped)
  try:
    result = suite.run(suite_plan(lengths))
  except SuiteStopped:
    sys.exit(f"bench: stopped by SIGTERM; the finished rows are in {suite.out}/suite.json")
  print(open(os.path.join(suite.out, "suite.md"), encoding="utf-8").read())
  print(f"wrote {suite.out}/suite.json and suite.md")
  return result


def main(argv):
  del argv
  mode = FLAGS.mode
  config = FLAGS.config
  if mode == "suite":
    run_suite()
    return
  if mode != "efficiency" and config is None:
    raise app.UsageError(f"--mode={mode} needs --config")
  result = {"efficiency": lambda: bench_efficiency(), "step": lambda: bench_steps(config),
            "input": lambda: bench_input(config), "embed": lambda: bench_embed(config),
            "eval": lambda: bench_eval(config)}[mode]()
  result["command"] = " ".join(sys.argv)
  write_json(result, mode)


if __name__ == "__main__":
  from lift_jax import cli

  app.run(lambda argv: cli.run("python -m lift_jax.tools.bench", main, argv),
          flags_parser=cli.flags_parser("python -m lift_jax.tools.bench"))
