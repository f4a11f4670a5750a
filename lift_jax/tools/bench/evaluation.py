"""``--mode=eval``: the wall time of each configured benchmark for a randomly initialised model of
the config, after a warm-up run that compiles."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from eval import benchmarks
from eval.runner import EvalRunner
from lift_jax import cli, prepare, train
from lift_jax.models.two_tower import TwoTower
from lift_jax.tools.bench.common import FLAGS, device_info, print_table


def bench_eval(config) -> dict[str, Any]:
  """Wall time of each configured benchmark for a randomly initialised model of the config
  (after a warm-up run that compiles)."""
  config = prepare.prepare_data(config, FLAGS.workdir)
  config, dropped = benchmarks.resolve_paths(config)
  if dropped:
    raise cli.UsageError(f"benchmarks {dropped} have relative paths: set --config.evals.data_root")
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
