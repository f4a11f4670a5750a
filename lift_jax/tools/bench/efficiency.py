"""``--mode=efficiency``: the train step of LIFT and of CLIP at several caption lengths, compiled
(not run) at the same per-device batch: FLOPs and memory per step. A CPU is enough."""

from __future__ import annotations

import copy
from typing import Any

import jax

from lift_jax import config_lib, throughput
from lift_jax.tools.bench.common import FLAGS, device_info, memory_of, print_table
from lift_jax.tools.bench.step import compile_step

def efficiency_configs(per_device_batch: int, variant: str, image_size: int,
                       lengths: list[int]):
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
  rows = []
  lengths = [int(x) for x in FLAGS.lengths.split(",") if x]
  pdb = FLAGS.per_device_batch or 64
  for name, length, config in efficiency_configs(pdb, FLAGS.variant, FLAGS.image_size, lengths):
    _, compiled, compile_s, *_ = compile_step(config, abstract=True)
    flops = throughput.flops_per_step(compiled)
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
