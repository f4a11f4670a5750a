"""``--mode=input``: the grain pipeline of a config (read, decode, random resized crop, batch) at
several worker counts, and the bare one-core decode + crop (+ normalise) rate."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from lift_jax import cli
from lift_jax.data import pipeline, records, transforms
from lift_jax.tools.bench import fake_data
from lift_jax.tools.bench.common import FLAGS, device_info, print_table


def host_transform_rate(config, seconds: float) -> dict[str, float]:
  """Images/s of decode + crop (+ numpy normalise) on one core, outside grain."""
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
  if not config.data.images:
    raise cli.UsageError("--mode=input needs --config.data.images=DIR of image shards")
  if config.model.mode == "lift" and not config.data.embeddings:
    config.data.embeddings = fake_data.embeddings(config.data.images, config.model.embed_dim)
  if FLAGS.per_device_batch:
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
