"""The whole method on one command: LIFT vs CLIP on the synthetic compositional set.

    python -m lift_jax.tools.demo --workdir=demo [--quick]

Stages (each runs the project's own command in a subprocess, and is skipped when its output is
already complete, saying so):

  1. data        python -m lift_jax.data.synthetic      shapes, captions and the three eval sets
  2. embed       python -m embed.main (x2)              captions and eval texts -> MiniLM vectors
  3. train LIFT  python -m lift_jax.main --config=configs/tiny_synthetic.py
  4. train CLIP  python -m lift_jax.main --config=configs/clip_tiny_synthetic.py
  5. evaluate    python -m eval.main (x2)
  6. report      WORKDIR/report.md with plots; TensorBoard logs under WORKDIR/{lift,clip}

Both models share the image tower, data, steps and seed; they differ only in the text side (frozen
all-MiniLM-L6-v2 embeddings vs a text transformer trained from scratch) and in LIFT's gradient
clipping, as in the paper. ``--quick`` shrinks every stage so that the whole run takes a few
minutes; the test suite runs it.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from lift_jax import checkpoint as ckpt
from lift_jax import cli, common
from lift_jax.tools import children, report

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "demo_workdir", "Where data, runs and the report go (relative to "
                    "the current folder); --quick runs live in its quick/ folder.")
flags.DEFINE_bool("quick", False, "A few-minute version that still runs every stage.")
flags.DEFINE_integer("steps", None, "Training steps (default: the config's; --quick: 20).")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")

QUICK = {"total_steps": 20, "batch_size": 64, "log_every_steps": 5,
         "checkpoint_every_steps": 10, "data.synthetic.num_train": 768,
         "data.synthetic.num_eval": 40, "data.synthetic.num_shards": 2, "evals.batch_size": 64}


def say(message: str) -> None:
  print(message, flush=True)


def run(args: list[str], log_path: str) -> tuple[float, str]:
  """Runs a command as a child (a Ctrl-C or SIGTERM reaches it and is waited for: the trainer
  saves first), appending its output to ``log_path``; (wall time, this run's output)."""
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"\n$ {' '.join(args)}\n")
    log.flush()
    start = log.tell()
    result = children.run(args, stdout=log, cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
  with open(log_path, encoding="utf-8") as f:
    f.seek(start)
    output = f.read()
  if result.code:
    raise SystemExit(f"demo: command failed ({' '.join(args)}); log {log_path}:\n"
                     f"{output[-3000:]}")
  return result.seconds, output


def overrides(quick: bool, steps: int | None, data_dir: str) -> list[str]:
  out = [f"--config.data.synthetic.dir={data_dir}"]
  values = dict(QUICK) if quick else {}
  if steps:
    values["total_steps"] = steps
  out += [f"--config.{k}={v}" for k, v in values.items()]
  return out


def resolved_total_steps(config: str, extra: list[str]) -> int:
  """total_steps of a config file after the overrides (without building anything)."""
  for arg in extra:
    if arg.startswith("--config.total_steps="):
      return int(arg.split("=", 1)[1])
  return int(common.load_config_file(config).total_steps)


def main(argv):
  del argv
  t_start = time.time()
  root = os.path.abspath(FLAGS.workdir)  # relative to where the command was started
  if FLAGS.quick:  # beside a full run, never in its way
    root = os.path.join(root, "quick")
  os.makedirs(root, exist_ok=True)
  data_dir = os.path.join(root, "data", "synthetic")
  logs = os.path.join(root, "logs")
  os.makedirs(logs, exist_ok=True)
  extra = overrides(FLAGS.quick, FLAGS.steps, data_dir)
  py = sys.executable
  timings: dict[str, float] = {}
  reused: list[str] = []  # stages found complete: the report keeps their earlier wall time
  runs = {"lift": os.path.join(CONFIGS, "tiny_synthetic.py"),
          "clip": os.path.join(CONFIGS, "clip_tiny_synthetic.py")}
  if not all(os.path.exists(p) for p in runs.values()):
    raise SystemExit(f"demo: the configs are not in {CONFIGS}; run from a clone of the repository")
  say(f"LIFT demo in {root}{' (quick)' if FLAGS.quick else ''}; logs in {logs}")

  # 1-2. data and embeddings: the trainer's preparation step, run on its own first so that each
  # stage is visible and timed (it generates the set and calls embed.main twice).
  say("[1/6] synthetic data + [2/6] MiniLM embeddings (captions, eval texts)")
  prep = [py, "-m", "lift_jax.main", f"--config={runs['lift']}",
          f"--workdir={os.path.join(root, 'lift')}", "--prepare_only"] + extra
  timings["data_and_embeddings"], output = run(prep, os.path.join(logs, "prepare.log"))
  for line in output.splitlines():  # what this run did (the log keeps earlier runs too)
    if any(w in line for w in ("ready", "skipping", "texts in", "synthetic set", "captions/s",
                               "shards written", "nothing to do")):
      say("      " + line.split("] ", 1)[-1].strip())
  say(f"      done in {timings['data_and_embeddings']:.0f} s")

  # 3-4. training
  for i, (name, config) in enumerate(runs.items()):
    workdir = os.path.join(root, name)
    total = resolved_total_steps(config, extra)
    done = ckpt.latest_step(workdir)
    label = f"[{3 + i}/6] train {name.upper()}"
    if done is not None and done >= total:
      say(f"{label}: finished earlier (step {done}), reusing {workdir}")
      reused.append(f"train_{name}")
      continue
    say(f"{label}: {total} steps" + (f", resuming from step {done}" if done else ""))
    timings[f"train_{name}"], _ = run([py, "-m", "lift_jax.main", f"--config={config}",
                                       f"--workdir={workdir}"] + extra,
                                      os.path.join(logs, f"train_{name}.log"))
    say(f"      done in {timings[f'train_{name}']:.0f} s")

  # 5. evaluation
  say("[5/6] evaluate both checkpoints with eval.main")
  results = {}
  for name in runs:
    workdir = os.path.join(root, name)
    step = ckpt.latest_step(workdir)
    out = os.path.join(workdir, "eval", f"demo-metrics-{step}.json")
    if os.path.exists(out):
      say(f"      {name}: evaluated earlier ({out})")
      reused.append(f"eval_{name}")
    else:
      timings[f"eval_{name}"], _ = run([py, "-m", "eval.main", f"--workdir={workdir}",
                                        f"--output={out}"], os.path.join(logs, f"eval_{name}.log"))
    with open(out, encoding="utf-8") as f:
      results[name] = json.load(f)

  # 6. report
  path = report.write_report(root, results, timings, quick=FLAGS.quick, reused=reused)
  total_s = time.time() - t_start
  say(f"[6/6] report: {path}")
  say(report.summary_table(results))
  say(f"demo finished in {total_s:.0f} s")


if __name__ == "__main__":
  app.run(lambda argv: cli.run("python -m lift_jax.tools.demo", main, argv),
          flags_parser=cli.flags_parser("python -m lift_jax.tools.demo"))
