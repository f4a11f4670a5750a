"""The text lists of evaluation banks: every text an evaluator will look up, nothing else.

Each list is built by the readers in :mod:`eval.texts`, the same functions the evaluators score
with, so a bank and its evaluator agree on every string byte for byte. Write a list with this
command, then embed it in text-bank mode:

  python -m embed.banks --imagenet=../shared/data/imagenet --protocol=both \
      --captions=../shared/data/coco/annotations/captions_val2017.json \
      --sugarcrepe=../shared/data/sugarcrepe --out=/tmp/eval_texts.json
  python -m embed.main --config=embed/configs/nvembed_v2.py --config.texts=/tmp/eval_texts.json \
      --config.output=DIR

ImageNet protocols: ``lift`` = Keras-style class names x "It is a photo of a {}" (the LIFT paper's
numbers), ``openai`` = OpenAI's curated names x 80 templates. Retrieval banks hold every caption,
so one bank serves both the first-caption (LIFT) and the all-captions protocol.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Iterable, Sequence

from eval import texts as eval_texts

IMAGENET_PROTOCOLS = {
    "lift": ("classnames_keras.txt", "templates_lift.txt"),
    "openai": ("classnames.txt", "templates.txt"),
}


def class_prompts(classnames_file: str, templates_file: str) -> list[str]:
  """Every class name in every template, as the zero-shot classifier builds them."""
  for path in (classnames_file, templates_file):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found")
  return eval_texts.prompt_texts(classnames_file, templates_file)


def imagenet_prompts(imagenet_dir: str, protocol: str = "lift") -> list[str]:
  """ImageNet prompts of one protocol (``lift`` | ``openai``) or of ``both``."""
  names = list(IMAGENET_PROTOCOLS) if protocol == "both" else [protocol]
  lists = []
  for name in names:
    if name not in IMAGENET_PROTOCOLS:
      raise ValueError(f"unknown ImageNet protocol {protocol!r}; expected lift, openai or both")
    classnames, templates = IMAGENET_PROTOCOLS[name]
    lists.append(class_prompts(os.path.join(imagenet_dir, classnames),
                               os.path.join(imagenet_dir, templates)))
  return combine(*lists)


def retrieval_captions(path: str, first_only: bool = False, split: str | None = None
                       ) -> list[str]:
  """Captions of a COCO json, Flickr30K csv, or TSV/CSV/JSONL captions file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"captions file {path} not found")
  return eval_texts.caption_texts(path, first_only=first_only, split=split)


def sugarcrepe_subsets(folder: str) -> list[str]:
  """The seven SugarCrepe subsets if all are there, else every ``*.json`` in the folder."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"SugarCrepe folder {folder} not found")
  present = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json"))
  if all(s in present for s in eval_texts.SUGARCREPE_SUBSETS):
    return list(eval_texts.SUGARCREPE_SUBSETS)
  if not present:
    raise FileNotFoundError(f"{folder} holds no SugarCrepe-style *.json files")
  return present


def sugarcrepe_texts(folder: str) -> list[str]:
  """Positive and negative captions of every subset in the folder."""
  return eval_texts.sugarcrepe_texts(folder, sugarcrepe_subsets(folder))


def eval_dir_texts(root: str, first_only: bool = False) -> list[str]:
  """The texts of an evaluation folder laid out as the project's synthetic set:
  ``compositional/*.json`` (SugarCrepe schema), ``classification/{classnames,templates}.txt``,
  ``retrieval/captions.tsv``; whichever parts exist."""
  lists = []
  compositional = os.path.join(root, "compositional")
  if os.path.isdir(compositional):
    lists.append(sugarcrepe_texts(compositional))
  classification = os.path.join(root, "classification")
  if os.path.isfile(os.path.join(classification, "classnames.txt")):
    lists.append(class_prompts(os.path.join(classification, "classnames.txt"),
                               os.path.join(classification, "templates.txt")))
  captions = os.path.join(root, "retrieval", "captions.tsv")
  if os.path.isfile(captions):
    lists.append(retrieval_captions(captions, first_only=first_only))
  if not lists:
    raise FileNotFoundError(f"{root} has none of compositional/, classification/classnames.txt, "
                            "retrieval/captions.tsv")
  return combine(*lists)


def combine(*lists: Iterable[str]) -> list[str]:
  """Distinct texts of several lists, in first-seen order."""
  return eval_texts.unique(itertools.chain(*lists))


def write_texts(path: str, texts: Sequence[str]) -> None:
  """A JSON list (``.json``) or one text per line (other names; texts must not hold newlines)."""
  if not path.lower().endswith(".json"):
    for i, t in enumerate(texts):
      if "\n" in t or "\r" in t:
        raise ValueError(f"text {i} ({t[:40]!r}...) holds a line break; write a .json list instead")
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    if path.lower().endswith(".json"):
      json.dump(list(texts), f, ensure_ascii=False, indent=0)
      f.write("\n")
    else:
      f.writelines(t + "\n" for t in texts)
  os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m embed.banks",
      description="Write the texts of evaluation banks to a file for embed.main's text-bank mode.")
  p.add_argument("--out", required=True, help="texts file to write: .json list or one per line")
  p.add_argument("--imagenet", help="folder with classnames*.txt and templates*.txt")
  p.add_argument("--protocol", default="lift", choices=["lift", "openai", "both"],
                 help="ImageNet prompts: lift (Keras names x 1 template), openai (80 templates)")
  p.add_argument("--classnames", help="class names file (one per line), with --templates")
  p.add_argument("--templates", help="templates file ({} marks the class name)")
  p.add_argument("--captions", action="append", default=[],
                 help="captions file (COCO json, Flickr30K csv, TSV/CSV/JSONL); repeatable")
  p.add_argument("--split", help="keep this split of a Flickr30K csv (e.g. test)")
  p.add_argument("--first_caption_only", action="store_true",
                 help="only the first caption per image (the LIFT retrieval protocol)")
  p.add_argument("--sugarcrepe", help="SugarCrepe folder (*.json: caption, negative_caption)")
  p.add_argument("--eval_dir", help="folder laid out as compositional/, classification/, "
                 "retrieval/captions.tsv")
  args = p.parse_args(argv)
  if bool(args.classnames) != bool(args.templates):
    p.error("--classnames and --templates go together")
  if not (args.imagenet or args.classnames or args.captions or args.sugarcrepe or args.eval_dir):
    p.error("name at least one source: --imagenet, --classnames/--templates, --captions, "
            "--sugarcrepe or --eval_dir")
  return args


def collect(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
  """(source description, texts) for every source the arguments name."""
  parts = []
  if args.imagenet:
    parts.append((f"ImageNet prompts ({args.protocol})",
                  imagenet_prompts(args.imagenet, args.protocol)))
  if args.classnames:
    parts.append((f"prompts {args.classnames} x {args.templates}",
                  class_prompts(args.classnames, args.templates)))
  for path in args.captions:
    parts.append((f"captions {path}",
                  retrieval_captions(path, first_only=args.first_caption_only, split=args.split)))
  if args.sugarcrepe:
    parts.append((f"SugarCrepe {args.sugarcrepe}", sugarcrepe_texts(args.sugarcrepe)))
  if args.eval_dir:
    parts.append((f"evaluation folder {args.eval_dir}",
                  eval_dir_texts(args.eval_dir, first_only=args.first_caption_only)))
  return parts


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    parts = collect(args)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"embed.banks: error: {e}", file=sys.stderr)
    return 1
  texts = combine(*(t for _, t in parts))
  for what, t in parts:
    print(f"{len(t):7d} texts  {what}")
  print(f"{len(texts):7d} distinct texts -> {args.out}")
  write_texts(args.out, texts)
  return 0


if __name__ == "__main__":
  sys.exit(main())
