"""Export a trained image tower for Hugging Face transformers or OpenCLIP.

    python -m lift_jax.tools.export --workdir=W [--step=N] --format=hf --output=DIR
    python -m lift_jax.tools.export --workdir=W [--step=N] --format=open_clip --output=DIR

``hf``: ``transformers.CLIPVisionModelWithProjection.from_pretrained(DIR)`` for a CLIP run,
``CLIPVisionModel`` plus the head in ``lift_head.safetensors`` for a LIFT run.
``open_clip``: ``open_clip.create_model_and_transforms('local-dir:DIR')``. Every folder holds
``lift_jax_export.json``: the run, step and config, the text encoder and its settings, the
preprocessing, and how to compute lift_jax's features from the files. What each format holds
and why is documented in :mod:`lift_jax.export`; ``lift_jax.tools.import_torch`` reads both
folders back (bit-identical parameters).
"""

from __future__ import annotations

from absl import app, flags

from lift_jax import cli, export

COMMAND = "python -m lift_jax.tools.export"
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir, its checkpoints folder or one step "
                    "folder.")
flags.DEFINE_integer("step", None, "The checkpoint step to export (default: the latest).")
flags.DEFINE_enum("format", None, list(export.FORMATS), "hf (transformers) or open_clip.")
flags.DEFINE_string("output", None, "Output folder; must be new or empty.")
flags.DEFINE_bool("overwrite", False, "Replace a previous export in --output.")


def run(argv) -> int:
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag=value")
  cli.require_flags(FLAGS, {"workdir": "the training run to export",
                           "format": f"one of {', '.join(export.FORMATS)}",
                           "output": "a new folder for the exported files"})
  manifest = export.export(FLAGS.workdir, FLAGS.format, FLAGS.output, step=FLAGS.step,
                           overwrite=FLAGS.overwrite)
  print(f"wrote {FLAGS.output} ({FLAGS.format}, {manifest['model']['mode']} step "
        f"{manifest['run']['step']}): {', '.join(manifest['files'])}")
  for line in manifest["usage"]:
    print(f"  {line}")
  return 0


def main(argv) -> int:
  return cli.run(COMMAND, run, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(COMMAND))
