"""Evaluates a checkpoint on the benchmarks of a config; writes metrics JSON and prints a table.

    python -m eval.main --checkpoint=PATH [--config=configs/x.py] [--output=FILE]
    python -m eval.main --config=configs/x.py --workdir=DIR
    python -m eval.main --config=configs/x.py --write_texts=FILE

PATH is a workdir (its latest step), its ``checkpoints`` folder or one step folder. The model
always comes from the checkpoint (its stored config); the benchmarks come from ``--config`` when
given (``--config.evals.benchmarks.NAME.FIELD=VALUE`` overrides work), else from the config
stored with the checkpoint. ``--only=a,b`` runs a subset. Metrics go to ``--output`` or
``<workdir>/eval/metrics-<step>.json``: fractions in [0, 1], with the seconds each benchmark took
and each benchmark's settings (protocol included).

Images missing from a benchmark's folder are an error unless ``--skip_missing`` (or
``--config.evals.skip_missing=True``); an image that is present but cannot be decoded is scored as
a miss and counted as ``<benchmark>/unusable_images``. Errors print as one line (exit status 1).

``--write_texts=FILE`` writes every text the configured benchmarks score, one per line, and
exits: the input of ``python -m embed.main --config.texts=FILE`` that makes a LIFT text bank.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from eval import benchmarks
from eval.runner import EvalRunner
from eval.texts import write_texts as write_texts_file
from lift_jax import checkpoint as ckpt
from lift_jax import cli, common, sharding
from lift_jax.prepare import prepared_config, wants_preparation

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file whose `evals` to run (default: the checkpoint's).",
    lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, checkpoints folder or step folder.")
_OUTPUT = flags.DEFINE_string("output", None, "Metrics JSON path.")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype override, e.g. float32.")
_ONLY = flags.DEFINE_list("only", None, "Run only these benchmarks (names in the config).")
_WRITE_TEXTS = flags.DEFINE_string("write_texts", None,
                                   "Write the texts the benchmarks score to this file and exit.")
_SKIP_MISSING = flags.DEFINE_bool(
    "skip_missing", False, "Score every benchmark without the images missing from its folder "
    "(counted as skipped_images), as --config.evals.skip_missing=True does.")
COMMAND = "python -m eval.main"


def resolved(config):
  """The config with benchmark paths joined to evals.data_root; relative paths without a root
  are an error here (training merely skips such benchmarks)."""
  config, dropped = benchmarks.resolve_paths(config)
  if dropped:
    raise benchmarks.BenchmarkConfigError(
        f"benchmarks {', '.join(dropped)} have relative paths: set --config.evals.data_root=DIR "
        "(or give absolute paths with --config.evals.benchmarks.NAME.FIELD=PATH)")
  return config


def write_texts(config, path: str) -> int:
  texts = benchmarks.required_texts(resolved(config).evals)
  write_texts_file(path, texts)
  return len(texts)


def format_value(key: str, value: float) -> str:
  last = key.rsplit("/", 1)[-1]
  if last.startswith(("num_", "skipped_")):
    return f"{int(value)}"
  return f"{100 * value:.2f}"


def table(metrics: dict[str, float], seconds: dict[str, float]) -> str:
  rows = [(k, format_value(k, v)) for k, v in metrics.items()]
  lines = [common.format_table(rows, header=("benchmark/metric", "value (%)"), right=[1]), ""]
  lines.append("wall time per benchmark: " + ", ".join(f"{k} {v:.1f} s"
                                                      for k, v in seconds.items()))
  return "\n".join(lines)


def evaluate(path: str, config=None, *, output: str | None = None, dtype: str | None = None,
             only: list[str] | None = None) -> dict:
  """Runs the benchmarks on the checkpoint at ``path``; returns (and writes) the report."""
  directory, step = ckpt.resolve(path)  # the step load_model will read
  model, stored = ckpt.load_model(path, dtype=dtype)
  if config is None:
    config = stored
  else:
    # A training config whose data.prepare builds the data: the paths it builds (benchmarks
    # of the synthetic suite, text bank) are those of the checkpoint's workdir.
    config = prepared_config(config, ckpt.workdir_of(directory)) \
        if config.get("data") is not None and wants_preparation(config) else config
    config = ml_collections.ConfigDict(config.to_dict())
    if config.get("model") is not None and \
        ckpt.config_to_dict(config.model) != ckpt.config_to_dict(stored.model):
      logging.warning("--config's model differs from the checkpoint's; the checkpoint's is used")
    config.model = stored.model
    # The text bank is compared with the embeddings this checkpoint was trained on.
    trained_on = (stored.get("data") or {}).get("embeddings")
    if trained_on and not (config.get("data") or {}).get("embeddings"):
      if config.get("data") is None:
        config.data = ml_collections.ConfigDict()
      config.data.embeddings = trained_on
  if not config.get("evals") or not config.evals.get("benchmarks"):
    raise benchmarks.BenchmarkConfigError(
        "the config names no benchmark (config.evals.benchmarks is empty): give a config with "
        "benchmarks, e.g. --config=configs/tiny_synthetic.py, or add them with "
        "--config.evals.benchmarks.NAME.type=... overrides")
  config = resolved(config)
  mesh = sharding.make_mesh()
  t0 = time.perf_counter()
  runner = EvalRunner(config, model, mesh, only=only)
  setup = time.perf_counter() - t0
  metrics = runner.run()
  step_dir = os.path.join(directory, str(step))
  report = {
      "checkpoint": step_dir, "step": step, "mode": model.mode,
      "metrics": metrics, "seconds": dict(runner.timings), "setup_seconds": setup,
      "devices": f"{mesh.devices.size} x {jax.devices()[0].device_kind}",
      "benchmarks": {s.name: benchmarks.settings(s) for s in runner.specs},
  }
  if output is None:
    output = os.path.join(ckpt.workdir_of(directory), "eval", f"metrics-{step}.json")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
    print(f"checkpoint {step_dir} (step {step}, {model.mode})")
    print(table(metrics, runner.timings))
    print(f"metrics written to {output}")
  report["output"] = output
  return report


def run(argv) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag=value")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  config = _CONFIG.value
  if _WRITE_TEXTS.value:
    if config is None:
      raise cli.UsageError("--write_texts needs --config=CONFIG (the config whose benchmarks' "
                           "texts to write)")
    n = write_texts(config, _WRITE_TEXTS.value)
    print(f"wrote {n} texts to {_WRITE_TEXTS.value}")
    return
  path = _CHECKPOINT.value or _WORKDIR.value
  if not path:
    raise cli.UsageError("give --workdir=DIR (a training run) or --checkpoint=PATH (a workdir, "
                         "its checkpoints folder or a step folder)")
  if _SKIP_MISSING.value:
    config = config if config is not None else ckpt.read_config(path)
    config.evals.skip_missing = True
  evaluate(path, config, output=_OUTPUT.value, dtype=_DTYPE.value, only=_ONLY.value)


def main(argv) -> int:
  return cli.run(COMMAND, run, argv)


def saved_config_for_overrides(argv: list[str]) -> list[str]:
  """``--config.KEY=VALUE`` without ``--config``: the overrides apply to the config stored with
  the checkpoint (``--workdir`` or ``--checkpoint``)."""
  if any(a.startswith("--config=") for a in argv) or \
      not any(a.startswith("--config.") for a in argv):
    return argv
  path = next((a.split("=", 1)[1] for a in argv
               if a.startswith(("--checkpoint=", "--workdir="))), None)
  if path is None:
    return argv  # the parser then says what is missing
  return [argv[0], f"--config={cli.saved_config_path()}:{os.path.abspath(path)}", *argv[1:]]


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(COMMAND, rewrite=saved_config_for_overrides))
