"""Readers for the evaluation benchmarks' files and the exact texts each one scores.

No JAX here: the embedding job imports this module to build the text banks that LIFT's evaluators
look texts up in, so the bank and the evaluator agree on every string byte for byte.

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

import ast
import csv
import json
import os
from typing import Iterable

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


def read_captions(path: str, split: str | None = None) -> dict[str, list[str]]:
  """{image filename: [captions in file order]}, images in file order (COCO: sorted image id)."""
  lower = path.lower()
  out: dict[str, list[str]] = {}
  if lower.endswith(".json"):
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO
      names = {im["id"]: im["file_name"] for im in data["images"]}
      for image_id in sorted(names):
        out[names[image_id]] = []
      for ann in data["annotations"]:
        out[names[ann["image_id"]]].append(ann["caption"].strip())
      return out
    raise ValueError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
  if lower.endswith(".jsonl"):
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f):
        if not line.strip():
          continue
        r = json.loads(line)
        name = r.get("filename", r.get("image"))
        caps = r.get("captions", r.get("caption"))
        if name is None or caps is None:
          raise ValueError(f"{path} line {n + 1}: needs 'filename' (or 'image') and 'caption'")
        out.setdefault(name, []).extend([caps] if isinstance(caps, str) else caps)
    return out
  delimiter = "\t" if lower.endswith((".tsv", ".txt")) else ","
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f, delimiter=delimiter))
  if not rows:
    return out
  header = [h.strip().lower() for h in rows[0]]
  if "raw" in header and "filename" in header:  # Flickr30K annotations CSV
    fi, ri = header.index("filename"), header.index("raw")
    si = header.index("split") if "split" in header else None
    for row in rows[1:]:
      if split is None or si is None or row[si] == split:
        out[row[fi]] = [str(c) for c in _parse_list(row[ri])]
    return out
  if "filename" in header and "caption" in header:
    fi, ci = header.index("filename"), header.index("caption")
    body = rows[1:]
  elif "image" in header and "caption" in header:
    fi, ci = header.index("image"), header.index("caption")
    body = rows[1:]
  else:  # headerless filename, index, caption
    fi, ci, body = 0, len(rows[0]) - 1, rows
  for row in body:
    if row:
      out.setdefault(row[fi], []).append(row[ci])
  return out


def _parse_list(text: str) -> list:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return ast.literal_eval(text)  # Python-style list literal


def class_prompts(classnames: list[str], templates: list[str]) -> list[list[str]]:
  """[[template.format(name) for template] for name]."""
  return [[t.replace("{}", name) for t in templates] for name in classnames]


def sugarcrepe_texts(folder: str, subsets: Iterable[str] = SUGARCREPE_SUBSETS) -> list[str]:
  rows = read_sugarcrepe(folder, subsets)
  return unique(t for subset in rows.values() for _, pos, neg in subset for t in (pos, neg))


def caption_texts(path: str, first_only: bool = False, split: str | None = None) -> list[str]:
  caps = read_captions(path, split)
  return unique(c for cs in caps.values() for c in (cs[:1] if first_only else cs))


def prompt_texts(classnames_file: str, templates_file: str) -> list[str]:
  prompts = class_prompts(read_lines(classnames_file), read_lines(templates_file))
  return unique(p for ps in prompts for p in ps)


def unique(texts: Iterable[str]) -> list[str]:
  """Distinct texts in first-seen order."""
  return list(dict.fromkeys(texts))


def required_texts(evals_config) -> list[str]:
  """Every text the benchmarks of ``config.evals`` (or of a whole config) score, each once.

  A LIFT text bank built from this list serves all of them: write it to a file (one text per
  line, or ``python -m eval.main --config=CONFIG --write_texts=FILE``) and embed it with
  ``python -m embed.main --config=embed/configs/<encoder>.py --config.texts=FILE
  --config.output=DIR``.
  """
  from eval import benchmarks  # imports no JAX either

  if "benchmarks" not in evals_config and "evals" in evals_config:
    evals_config = evals_config["evals"]
  specs = benchmarks.parse_all(evals_config.get("benchmarks"))
  return unique(t for spec in specs for t in spec.texts())
