"""``python -m lift_jax.tools.bench --mode=...``: see the package docstring."""

from __future__ import annotations

import sys

from absl import app

from lift_jax import cli
from lift_jax.tools.bench import efficiency, embedding, evaluation, inputs, step, suite
from lift_jax.tools.bench.common import FLAGS, write_json

COMMAND = "python -m lift_jax.tools.bench"
MODES = {"efficiency": lambda config: efficiency.bench_efficiency(),
         "step": step.bench_steps, "input": inputs.bench_input,
         "embed": embedding.bench_embed, "eval": evaluation.bench_eval}


def run(argv) -> int:
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag=value")
  mode, config = FLAGS.mode, FLAGS.config
  if mode == "suite":
    suite.run_suite()
    return 0
  if mode not in ("efficiency", "embed") and config is None:
    raise cli.UsageError(f"--mode={mode} needs --config=CONFIG (e.g. configs/tiny_synthetic.py)")
  result = MODES[mode](config)
  result["command"] = " ".join(sys.argv)
  write_json(result, mode)
  return 0


def main(argv) -> int:
  return cli.run(COMMAND, run, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(COMMAND))
