"""Reading a captions file: the one reader that image conversion and the retrieval benchmarks
share, so both see the same captions.

Layouts: a TSV ``filename<TAB>caption_index<TAB>caption`` (header optional), a CSV with
``filename`` (or ``image``) and ``caption`` columns, Flickr30K's ``flickr_annotations_30k.csv``
(``raw`` = JSON list of 5 captions, ``filename``, ``split``), a JSONL of
``{"filename"|"image", "caption"|"captions"}``, or COCO's ``captions_*.json``.
"""

from __future__ import annotations

import ast
import csv
import json


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
