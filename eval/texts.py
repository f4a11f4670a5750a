"""Readers for the evaluation benchmarks' files and the exact texts each one scores.

No JAX here, and no other module of ``eval``: the benchmark specs (:mod:`eval.benchmarks`) read
their files through these functions, and the specs are the one list of the texts a LIFT text
bank must hold (:func:`eval.benchmarks.required_texts`).

File layouts
------------
* SugarCrepe: a folder with ``{add_obj,add_att,replace_obj,replace_att,replace_rel,swap_obj,
  swap_att}.json``, each ``{id: {"filename", "caption", "negative_caption"}}``.
* Labels: a TSV whose first two columns are ``filename`` and ``class_index`` (header optional),
  e.g. ``imagenet_samples/labels.tsv``; or an ImageFolder (``root/<wnid>/*``) with a wnid list.
* Captions: a TSV ``filename<TAB>caption_index<TAB>caption`` (header optional), a CSV with
  ``filename`` and ``caption`` columns, or Flickr30K's ``flickr_annotations_30k.csv``
  (``raw`` = JSON list of 5 captions, ``filename``, ``split``), a JSONL of
  ``{"filename"|"image", "caption"|"captions"}``, or COCO's ``captions_*.json``.
* Class names and templates: one per line; a template marks the class name with ``{}``.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Iterable, Sequence

from lift_jax import cli, common
from lift_jax.data.captions import read_captions  # noqa: F401  (part of this module's readers)

SUGARCREPE_SUBSETS = ("add_obj", "add_att", "replace_obj", "replace_att", "replace_rel",
                      "swap_obj", "swap_att")


def read_lines(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\n").rstrip("\r") for line in f]
  while lines and not lines[-1]:
    lines.pop()
  return lines


def read_sugarcrepe(folder: str, subsets: Iterable[str] = SUGARCREPE_SUBSETS
                    ) -> dict[str, list[tuple[str, str, str]]]:
  """{subset: [(image filename, positive caption, negative caption)]} in id order."""
  out = {}
  for subset in subsets:
    path = os.path.join(folder, f"{subset}.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"SugarCrepe subset file {path} not found")
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    rows = []
    for key in sorted(data, key=lambda k: (len(k), k)):
      r = data[key]
      try:
        rows.append((r["filename"], r["caption"], r["negative_caption"]))
      except KeyError as e:
        raise ValueError(f"{path} record {key!r} lacks field {e}") from None
    out[subset] = rows
  return out


def read_labels(path: str) -> list[tuple[str, int]]:
  """[(filename, class_index)] from a labels TSV."""
  rows = []
  with open(path, encoding="utf-8", newline="") as f:
    for n, row in enumerate(csv.reader(f, delimiter="\t")):
      if not row:
        continue
      if n == 0 and not row[1].strip().lstrip("-").isdigit():
        continue  # header
      rows.append((row[0], int(row[1])))
  return rows


def image_folder_labels(root: str, wnids: list[str] | None = None) -> list[tuple[str, int]]:
  """[(relative path, class_index)] of an ImageFolder; class order = ``wnids`` or sorted dirs."""
  classes = wnids or sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  index = {c: i for i, c in enumerate(classes)}
  rows = []
  for c in sorted(index):
    folder = os.path.join(root, c)
    if not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      rows.append((os.path.join(c, name), index[c]))
  return rows


def class_prompts(classnames: list[str], templates: list[str]) -> list[list[str]]:
  """[[template.format(name) for template] for name]."""
  return [[t.replace("{}", name) for t in templates] for name in classnames]


def unique(texts: Iterable[str]) -> list[str]:
  """Distinct texts in first-seen order."""
  return list(dict.fromkeys(texts))


def write_texts(path: str, texts: Sequence[str]) -> None:
  """Writes a texts file for ``python -m embed.main --config.texts=FILE``, atomically: a JSON list
  when ``path`` ends in ``.json``, else one text per line (then no text may hold a line break)."""
  texts = list(texts)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  if path.lower().endswith(".json"):
    common.write_json_atomic(path, texts, sort_keys=False, indent=0)
    return
  for i, t in enumerate(texts):
    if "\n" in t or "\r" in t:
      raise cli.UsageError(f"{path}: text {i} ({t[:40]!r}...) holds a line break, which one text "
                           "per line cannot hold; name a .json file instead")
  common.write_text_atomic(path, "".join(t + "\n" for t in texts))
