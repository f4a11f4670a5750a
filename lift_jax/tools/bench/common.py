"""The benchmark tool's flags (every mode's, one absl namespace) and what the modes share: the
device description every result carries, tables, JSON output, memory figures."""

from __future__ import annotations

import json
from typing import Any

import jax
from absl import flags
from ml_collections import config_flags

from lift_jax import common

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
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
          "process_count": jax.process_count(), "jax": jax.__version__}


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
  print(f"\n{title}")
  print(common.format_table([[fmt(r.get(c)) for c in columns] for r in rows], header=columns))


def write_json(result: dict[str, Any], mode: str) -> str:
  path = FLAGS.output or f"bench-{mode}.json"
  with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"\nwrote {path}")
  return path


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


def fmt(v: Any, digits: int = 4) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.{digits}g}"
  return str(v)
