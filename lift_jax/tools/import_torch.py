"""Import an official LIFT, OpenCLIP or Hugging Face CLIP checkpoint as a lift_jax checkpoint.

    python -m lift_jax.tools.import_torch --checkpoint=FILE.pt --config=configs/vitb16_datacomp.py \
        --output=DIR
    python -m lift_jax.tools.import_torch --checkpoint=HF_FOLDER_OR_HUB_ID \
        --config=configs/clip_vitb16_datacomp.py --output=DIR

The config decides the model's shape; every tensor of the state dict must map onto a parameter of
that model with the same shape and every parameter must be covered, otherwise the tool stops and
names the missing, unexpected and mis-shaped keys. The result (``DIR/checkpoints/0``) is read by
``lift_jax.load``, ``eval.main`` and, as initial parameters, by training. ``DIR`` must be new or
empty (``--overwrite`` replaces its ``checkpoints/`` and ``config.json``).

Accepted: an OpenCLIP / official LIFT ``.pt`` (a bare state dict or ``{"state_dict": ...}``, with
or without DDP's ``module.`` prefix), an OpenCLIP folder (``open_clip_config.json`` +
``open_clip_model.safetensors``), or a Hugging Face CLIP folder (``config.json`` +
``*.safetensors``) or a hub id already in the local cache (nothing is downloaded). Folders written
by ``lift_jax.tools.export`` import back bit for bit; their ``lift_jax_export.json`` serves as
``--config``.
The name maps, and what maps exactly and what does not, are documented in
:mod:`lift_jax.models.weights`.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from lift_jax import cli, pretrained

COMMAND = "python -m lift_jax.tools.import_torch"
FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint (.pt/.bin) in OpenCLIP naming, an "
                    "OpenCLIP folder, or a Hugging Face CLIP folder / cached hub id.")
flags.DEFINE_string("output", None, "Output folder (a lift_jax workdir); must be new or empty.")
flags.DEFINE_bool("overwrite", False, "Replace the checkpoints and config.json of a non-empty "
                  "--output.")
config_flags.DEFINE_config_file("config", None, "A lift_jax config describing the model.",
                                lock_config=False)


def run(argv) -> int:
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag=value")
  cli.require_flags(FLAGS, {"checkpoint": "the PyTorch or Hugging Face checkpoint to import",
                           "config": "a config whose model the checkpoint fits, e.g. "
                                     "configs/vitb16_datacomp.py",
                           "output": "a new folder for the lift_jax checkpoint"})
  folder = pretrained.import_checkpoint(FLAGS.checkpoint, FLAGS.config, FLAGS.output,
                                        overwrite=FLAGS.overwrite)
  print(f"wrote {folder}")
  return 0


def main(argv) -> int:
  return cli.run(COMMAND, run, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(COMMAND))
