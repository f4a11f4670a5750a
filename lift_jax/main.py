"""Entry point: ``python -m lift_jax.main --config=configs/vitb16_datacomp.py --workdir=DIR``.

Flags, multi-process start-up, data preparation (configs with ``data.prepare``; alone with
``--prepare_only``), then :func:`lift_jax.train.train_and_evaluate`. Re-running the same command
resumes from DIR. ``--check`` (``--check=full``: also every shard's SHA-256) checks what the run
needs without training and prints a table (:mod:`lift_jax.preflight`).

Exit status: 0 finished; 1 an error the message names (one line; ``LIFT_VERBOSE=1`` shows the
stack); 143 stopped by SIGTERM (preemption) and 130 by Ctrl-C, after saving a checkpoint:
re-run to resume.

Multi-process runs: on TPU pods and under SLURM (``srun``), ``jax.distributed.initialize()`` finds
its peers by itself (``--distributed=auto`` turns it on when such an environment is detected);
elsewhere pass ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on every
process. When one process is lost, the others stop within ``--lost_host_timeout`` seconds
(:mod:`lift_jax.hosts`); re-running every process resumes.
"""

from __future__ import annotations

import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from eval.runner import training_runner
from lift_jax import checkpoint as ckpt
from lift_jax import cli, hosts, logs, preflight, prepare, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the config go.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Call jax.distributed.initialize(): auto = when a multi-process environment "
                  "(TPU pod, SLURM with several tasks, coordinator flags) is detected.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (explicit multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-process).")
flags.DEFINE_float("lost_host_timeout", hosts.DEFAULT_LOST_HOST_TIMEOUT,
                   "Several processes: when one is lost (killed, out of memory, preempted), the "
                   "others stop within this many seconds, naming it.")
flags.DEFINE_integer("local_device_count", None,
                     "CPU only: how many CPU devices this process exposes (testing).")
flags.DEFINE_bool("prepare_only", False,
                  "Only build the data the config asks for (data.prepare), then exit.")
flags.DEFINE_enum("check", None, ["quick", "full"],
                  "Check data, manifests, eval data, text bank and workdir, print a table, exit "
                  "(0 = ready). --check alone = quick; full also hashes every shard.")
flags.mark_flags_as_required(["config", "workdir"])
COMMAND = "python -m lift_jax.main"
ALIASES = {"--check": "--check=quick"}


def init_distributed() -> hosts.Watchdog | None:
  """jax.distributed for several processes (given by flags, or detected: TPU pod slices, SLURM
  under srun); the lost-host watchdog. Nothing for one process."""
  if FLAGS.local_device_count:
    jax.config.update("jax_num_cpu_devices", FLAGS.local_device_count)
  wanted = FLAGS.distributed == "on" or (FLAGS.distributed == "auto" and (
      FLAGS.coordinator_address or hosts.cluster_detected()))
  if not wanted:
    return None
  return hosts.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                          lost_host_timeout=FLAGS.lost_host_timeout)


def run(argv) -> int:
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag=value")
  logging.getLogger().setLevel(logging.INFO)
  logs.quiet_libraries()
  config = FLAGS.config
  if FLAGS.check:
    table = preflight.check(config, FLAGS.workdir, full=FLAGS.check == "full")
    print(table.format())
    return 1 if table.failed else 0
  ckpt.check_writable(FLAGS.workdir, create=False)  # a file in the way, a read-only parent
  watchdog = init_distributed()
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    config = prepare.prepare_data(config, FLAGS.workdir)
    if not FLAGS.prepare_only:
      train.train_and_evaluate(config, FLAGS.workdir, evaluators=training_runner)
  except Exception:  # noqa: BLE001 - re-raised; a lost peer is named first (then we exit 1)
    if watchdog is not None:
      watchdog.wait_for_verdict()
    raise
  if watchdog is not None:
    watchdog.finish()
  return 0


def main(argv) -> int:
  return cli.run(COMMAND, run, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(COMMAND, ALIASES))
