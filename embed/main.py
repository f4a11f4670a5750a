"""Command line of the offline embedding job (PyTorch + transformers; never JAX).

Captions of a folder of image shards -> embedding shards aligned 1:1, plus manifest.json:

  python -m embed.main --config=embed/configs/nvembed_v2.py \
      --config.images=DIR --config.output=DIR [--config.caption_field=recaption]

Texts (one per line, or a JSON list) -> a text bank keyed by the exact text, for evaluation:

  python -m embed.banks --imagenet=../shared/data/imagenet --out=texts.json
  python -m embed.main --config=embed/configs/nvembed_v2.py --config.texts=texts.json \
      --config.output=DIR

Many processes: `torchrun --nproc_per_node=8 -m embed.main ...`, `srun python -m embed.main ...`,
a SLURM job array or a Kubernetes indexed Job (the rule of lift_jax.common.task_of: RANK /
WORLD_SIZE, SLURM_ARRAY_TASK_*, SLURM_PROCID / SLURM_NTASKS, JOB_COMPLETION_INDEX +
LIFT_TASK_COUNT); each rank takes every WORLD_SIZE-th shard on its own GPU (LOCAL_RANK or
SLURM_LOCALID). An image folder still being converted is refused. Re-running the same command
resumes; `--config.verify=True` checks finished output. embed/config.py documents the fields.
"""

from absl import app
from ml_collections import config_flags

from embed import job
from lift_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "a config file from embed/configs/, e.g. embed/configs/nvembed_v2.py",
    lock_config=True)


COMMAND = "python -m embed.main"


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.FIELD=VALUE")
  if _CONFIG.value is None:
    raise cli.UsageError("--config=embed/configs/<model>.py is required, e.g. "
                         "--config=embed/configs/minilm.py")
  job.run(_CONFIG.value)  # errors that name the file, shard or key are printed by cli.run
  return 0


def command(argv) -> int:
  """``main`` as the command runs it: known errors become one line and exit status 1."""
  return cli.run(COMMAND, main, argv)


if __name__ == "__main__":
  app.run(command, flags_parser=cli.flags_parser(COMMAND))
