"""``--mode=step``: the jitted train step on random on-device data (compile time, step time, img/s,
FLOPs from XLA's cost analysis, MFU, memory), at the first per-device batch that fits."""

from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from lift_jax import cli, common, throughput, train
from lift_jax.tools.bench.common import FLAGS, device_info, memory_of, print_table

def random_batch(config, batch_sharding):
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
  """(setup, compiled step, compile seconds, state or None, batch or None, mesh)."""
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
  raise cli.UsageError("--per_device_batches is empty")


def bench_step_once(config) -> dict[str, Any]:
  setup, compiled, compile_s, state, batch, mesh = compile_step(config)
  mem = memory_of(compiled)
  stats = jax.devices()[0].memory_stats() or {}
  limit = FLAGS.memory_limit_bytes or stats.get("bytes_limit")
  if limit and mem["compiled_bytes"] and mem["compiled_bytes"] > limit:
    raise OutOfMemory(f"the compiled step needs {mem['compiled_bytes'] / 2**20:.1f} MiB, the "
                      f"device allows {limit / 2**20:.1f} MiB")
  flops = throughput.flops_per_step(compiled)
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
  peak = throughput.peak_flops(info["device_kind"])
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


def bench_steps(config) -> dict[str, Any]:
  """The step bench of ``config`` and, with --compare_config, of a second config, in one run."""
  first = bench_step(config)
  if not FLAGS.compare_config:
    return first
  second = bench_step(common.load_config_file(FLAGS.compare_config))
  ratio = {"step_time_ratio": first["step_s_median"] / second["step_s_median"],
           "flops_ratio": (first["flops_per_step_per_device"] /
                           second["flops_per_step_per_device"])
           if first["flops_per_step_per_device"] and second["flops_per_step_per_device"]
           else None}
  print_table([ratio], list(ratio), f"{first['mode']} / {second['mode']} (same run, same device)")
  return {"first": first, "second": second, **ratio}
