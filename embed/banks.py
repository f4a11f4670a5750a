r"""Writes the texts of evaluation benchmarks to a file, for embed.main's text-bank mode.

  python -m embed.banks --config=configs/vitb16_datacomp.py --config.evals.data_root=DATA \
      --out=/tmp/eval_texts.json
  python -m embed.banks --imagenet=../shared/data/imagenet --protocol=both \
      --captions=../shared/data/coco/annotations/captions_val2017.json \
      --sugarcrepe=../shared/data/sugarcrepe --out=/tmp/eval_texts.json
  python -m embed.main --config=embed/configs/nvembed_v2.py --config.texts=/tmp/eval_texts.json \
      --config.output=DIR

The texts are listed by the benchmark specs of :mod:`eval.benchmarks` (``required_texts``), the
same code the evaluators score with, so a bank and its evaluator agree on every string byte for
byte. ``--config`` takes a training config's benchmarks (as ``python -m eval.main
--write_texts`` does); the other flags each make one benchmark entry: ``--imagenet`` (prompts of
the ``lift`` protocol, Keras names x "It is a photo of a {}", the ``openai`` one, or ``both``),
``--classnames`` with ``--templates``, ``--captions`` (every caption, or the first per image with
``--first_caption_only``), ``--sugarcrepe`` (the seven subsets) and ``--eval_dir`` (the ``eval/``
folder of the built-in synthetic set).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from absl import flags
from ml_collections import config_flags

from eval import benchmarks
from eval.benchmarks import zeroshot
from eval.texts import unique, write_texts
from lift_jax import cli
from lift_jax.data import synthetic

FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "texts file to write: a .json list, or one text per line",
                    flag_values=FLAGS)
config_flags.DEFINE_config_file("config", None, "a training config: the texts of its "
                                "config.evals.benchmarks", flag_values=FLAGS, lock_config=False)
flags.DEFINE_string("imagenet", None, "folder with classnames*.txt and templates*.txt",
                    flag_values=FLAGS)
flags.DEFINE_enum("protocol", "lift", ["lift", "openai", "both"],
                  "ImageNet prompts: lift (Keras names x 1 template), openai (80 templates)",
                  flag_values=FLAGS)
flags.DEFINE_string("classnames", None, "class names file (one per line), with --templates",
                    flag_values=FLAGS)
flags.DEFINE_string("templates", None, "templates file ({} marks the class name)",
                    flag_values=FLAGS)
flags.DEFINE_multi_string("captions", [], "captions file (COCO json, Flickr30K csv, "
                          "TSV/CSV/JSONL); repeatable", flag_values=FLAGS)
flags.DEFINE_string("split", None, "keep this split of a Flickr30K csv (e.g. test)",
                    flag_values=FLAGS)
flags.DEFINE_bool("first_caption_only", False,
                  "only the first caption per image (the LIFT retrieval protocol)",
                  flag_values=FLAGS)
flags.DEFINE_string("sugarcrepe", None, "SugarCrepe folder ({add_obj,...}.json)",
                    flag_values=FLAGS)
flags.DEFINE_string("eval_dir", None, "the eval/ folder of a synthetic set "
                    "(python -m lift_jax.data.synthetic)", flag_values=FLAGS)


def requested_benchmarks() -> dict[str, dict[str, Any]]:
  """{name: benchmark entry} for every source the flags name, in the order of the flags."""
  out: dict[str, dict[str, Any]] = {}
  if FLAGS.config is not None:
    config, dropped = benchmarks.resolve_paths(FLAGS.config)
    if dropped:
      raise cli.UsageError(f"benchmarks {', '.join(dropped)} of --config have relative paths: "
                           "set --config.evals.data_root=DIR")
    for name, entry in (config.evals.get("benchmarks") or {}).items():
      out[name] = dict(entry)
  if FLAGS.imagenet:
    protocols = ["lift", "openai"] if FLAGS.protocol == "both" else [FLAGS.protocol]
    for p in protocols:
      out[f"imagenet_{p}"] = zeroshot.imagenet_benchmark(FLAGS.imagenet, p)
  if FLAGS.classnames:
    out["prompts"] = {"type": "zeroshot", "classnames": FLAGS.classnames,
                      "templates": FLAGS.templates}
  protocol = "lift" if FLAGS.first_caption_only else "standard"
  for i, path in enumerate(FLAGS.captions):
    out[f"captions_{i}"] = {"type": "retrieval", "captions": path, "protocol": protocol,
                            "split": FLAGS.split or ""}
  if FLAGS.sugarcrepe:
    out["sugarcrepe"] = {"type": "sugarcrepe", "data_dir": FLAGS.sugarcrepe}
  if FLAGS.eval_dir:
    for name, entry in synthetic.eval_benchmarks(FLAGS.eval_dir).items():
      if entry["type"] == "retrieval":
        entry = {**entry, "protocol": protocol}
      out[f"synthetic_{name}"] = entry
  return out


def main(argv: Sequence[str] | None = None) -> int:
  """Write the texts of evaluation benchmarks to a file for embed.main's text-bank mode."""
  cli.parse_flags(FLAGS, sys.argv[1:] if argv is None else argv,
                  "python -m embed.banks --out=FILE [--config=CONFIG] [--imagenet=DIR] "
                  "[--captions=FILE] [--sugarcrepe=DIR] [--eval_dir=DIR]\n" + __doc__)
  if not FLAGS.out:
    raise cli.UsageError("--out=FILE is required: the texts file to write")
  if bool(FLAGS.classnames) != bool(FLAGS.templates):
    raise cli.UsageError("--classnames and --templates go together")
  entries = requested_benchmarks()
  if not entries:
    raise cli.UsageError("name at least one source: --config, --imagenet, "
                         "--classnames/--templates, --captions, --sugarcrepe or --eval_dir")
  specs = benchmarks.parse_all(entries, texts_only=True)
  per = [(spec.name, spec.texts()) for spec in specs]
  texts = unique(t for _, ts in per for t in ts)  # = benchmarks.required_texts of the entries
  for name, t in per:
    print(f"{len(t):7d} texts  {name}")
  print(f"{len(texts):7d} distinct texts -> {FLAGS.out}")
  write_texts(FLAGS.out, texts)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run("python -m embed.banks", main))
