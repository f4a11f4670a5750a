"""Measure the cost of a config: train step, input pipeline, embedding job, evaluation.

    python -m lift_jax.tools.bench --config=configs/vitb16_datacomp.py --mode=step
    python -m lift_jax.tools.bench --config=configs/tiny_synthetic.py --mode=input --workers=0,1,2
    python -m lift_jax.tools.bench --mode=efficiency            # LIFT vs CLIP FLOPs / memory table
    python -m lift_jax.tools.bench --config=... --mode=embed --texts=captions.txt
    python -m lift_jax.tools.bench --config=... --mode=eval

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
"""

from __future__ import annotations

import copy
import json
import os
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
flags.DEFINE_enum("mode", "step", ["step", "input", "embed", "eval", "efficiency"], "What to time.")
flags.DEFINE_string("output", None, "JSON output path (default bench-<mode>.json).")
flags.DEFINE_integer("warmup", 3, "Untimed repetitions.")
flags.DEFINE_integer("steps", 10, "Timed repetitions.")
flags.DEFINE_integer("per_device_batch", None, "step/efficiency: batch per device (overrides).")
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


def device_info() -> dict[str, Any]:
  import jax

  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
          "process_count": jax.process_count(), "jax": jax.__version__}


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return "" if v is None else str(v)

  widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns]
  print(f"\n{title}")
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  print("  ".join("-" * w for w in widths))
  for r in rows:
    print("  ".join(fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


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


def bench_step(config) -> dict[str, Any]:
  import jax

  from lift_jax import train
  from lift_jax.metrics import peak_flops

  if FLAGS.per_device_batch:
    config.batch_size = FLAGS.per_device_batch * jax.device_count()
  setup, compiled, compile_s, state, batch, mesh = compile_step(config)
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
  mem = memory_of(compiled)
  stats = jax.devices()[0].memory_stats() or {}
  result = {
      **info, "mode": config.model.mode, "variant": config.model.variant,
      "image_size": config.model.image_size, "dtype": config.model.dtype,
      "context_length": config.model.text.context_length if config.model.mode == "clip" else None,
      "global_batch": config.batch_size, "per_device_batch": config.batch_size // n,
      "compile_s": compile_s, "step_s_median": step_s, "step_s_all": times,
      "img_per_s": config.batch_size / step_s, "img_per_s_per_device": config.batch_size / step_s / n,
      "flops_per_step_per_device": flops,
      "mfu": (flops / step_s / peak) if (flops and peak) else None,
      "peak_bytes_in_use": stats.get("peak_bytes_in_use"), **mem,
      "final_loss": float(metrics["loss"]),
  }
  print_table([result], ["device_kind", "mode", "global_batch", "per_device_batch", "compile_s",
                         "step_s_median", "img_per_s", "img_per_s_per_device",
                         "flops_per_step_per_device", "mfu", "peak_bytes_in_use",
                         "compiled_bytes"], "train step")
  return result


def _load_config(path: str):
  import importlib.util

  spec = importlib.util.spec_from_file_location("bench_compare_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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


def _fake_embeddings(image_dir: str, dim: int) -> str:
  """Random embedding shards aligned with ``image_dir`` (the input bench needs only their bytes)."""
  import numpy as np

  from lift_jax.data import records

  out = tempfile.mkdtemp(prefix="bench_embeddings_")
  rng = np.random.default_rng(0)
  entries = []
  shards = records.list_shards(image_dir, records.IMAGES)
  for i, path in enumerate(shards):
    keys = records.read_keys(path)
    recs = [records.embedding_record(k, rng.normal(size=dim)) for k in keys]
    entries.append(records.write_shard(
        os.path.join(out, records.shard_name(records.EMBEDDINGS, i, len(shards))), recs))
  records.write_manifest(out, {"kind": "embeddings", "dim": dim, "storage_dtype": "float16",
                               "shards": entries})
  return out


def host_transform_rate(config, seconds: float = 5.0) -> dict[str, float]:
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
  host = host_transform_rate(config)
  print_table(rows, ["workers", "img_per_s", "img_per_s_per_worker"],
              f"input pipeline ({config.data.images}, batch {config.batch_size}, "
              f"{os.cpu_count()} CPU cores)")
  print_table([host], list(host), "one core, no grain")
  return {**device_info(), "cpu_count": os.cpu_count(), "batch": config.batch_size,
          "image_size": config.model.image_size, "rows": rows, "host_transform": host}


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


def main(argv):
  del argv
  mode = FLAGS.mode
  config = FLAGS.config
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
