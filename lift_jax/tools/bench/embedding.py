"""``--mode=embed``: the PyTorch embedding job on a text file, in a subprocess (torch stays out of
this process)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from typing import Any

import embed.configs
from lift_jax import cli, prepare
from lift_jax.data import records
from lift_jax.tools.bench.common import FLAGS, print_table


@cli.user_error
class BenchError(RuntimeError):
  """A command the benchmark runs failed; the message holds the end of its output."""


def bench_embed(config) -> dict[str, Any]:
  """Runs the PyTorch embedding job on a text file in a subprocess (torch stays out of this one)."""
  if not FLAGS.texts:
    raise cli.UsageError("--mode=embed needs --texts=FILE (one text per line)")
  embed_config = FLAGS.embed_config or (prepare.embed_config_path(config) if config
                                        else embed.configs.DEFAULT)
  out = tempfile.mkdtemp(prefix="bench_embed_")
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "embed.main", f"--config={embed_config}",
                         f"--config.texts={FLAGS.texts}", f"--config.output={out}"],
                        capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise BenchError(f"embed.main failed:\n{proc.stderr[-3000:]}")
  manifest = records.read_manifest(out)
  summary = manifest.get("summary", {})
  row = {"texts": FLAGS.texts, "wall_s": wall, **{k: v for k, v in summary.items()
                                                  if not isinstance(v, (dict, list))}}
  print_table([row], list(row), f"embedding job ({embed_config})")
  return {"embed_config": embed_config, "wall_s": wall, "summary": summary,
          "stderr_tail": proc.stderr[-2000:]}
