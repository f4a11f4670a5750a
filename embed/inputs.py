"""What the job embeds: the captions of an image shard, or the texts of a texts file.

Each input is a keyed text or a reason why there is no usable text (``flag``): an empty or
whitespace-only caption, a caption that is not valid UTF-8, or a record without the caption field.
The job writes a placeholder for a flagged input (or stops, as configured); it never drops one,
so the embedding shard stays aligned with its image shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from embed.errors import EmbedError
from eval import texts as eval_texts
from lift_jax.data import records

EMPTY, UNDECODABLE, MISSING = "empty", "undecodable", "missing"


@dataclasses.dataclass
class Item:
  key: str
  text: str  # "" when flagged
  flag: str = ""


def judge_text(value: Any) -> tuple[str, str]:
  """(text, flag) for the value of a caption field."""
  if value is None:
    return "", MISSING
  if isinstance(value, (bytes, bytearray)):
    try:
      value = bytes(value).decode("utf-8")
    except UnicodeDecodeError:
      return "", UNDECODABLE
  if not isinstance(value, str):
    return "", UNDECODABLE
  try:
    value.encode("utf-8")  # lone surrogates: a str that held invalid UTF-8 on disk
  except UnicodeEncodeError:
    return "", UNDECODABLE
  if not value.strip():
    return "", EMPTY
  return value, ""


def shard_items(path: str, field: str) -> list[Item]:
  """The captions in ``field`` of every record of an image shard, in order."""
  items = []
  fields_seen: set[str] = set()
  kinds: set[str] = set()  # types the field holds across the shard
  for index, record in enumerate(records.iter_records(path, unicode_errors="surrogateescape")):
    key = record["key"]
    if not isinstance(key, str) or judge_text(key)[1] == UNDECODABLE:
      raise EmbedError(f"{path} record {index}: key {key!r} is not a valid UTF-8 string")
    fields_seen.update(record)
    value = record.get(field)
    kinds.add(type(value).__name__)
    items.append(Item(key, *judge_text(value)))
  if items and not kinds & {"str", "bytes"}:
    # No record with text in the field: the field name is wrong, not the data.
    have = ", ".join(sorted(f for f in fields_seen if f != "image"))
    other = sorted(kinds - {"NoneType"})
    holds = f"holds {'/'.join(other)} values, not text" if other else "is in no record"
    raise EmbedError(f"{path}: the caption field {field!r} {holds} (fields: {have}); "
                     "set config.caption_field")
  return items


def read_texts_file(path: str) -> list[str]:
  """Texts from a JSON list (``.json``) or one text per line (anything else), in file order."""
  if not os.path.isfile(path):
    raise EmbedError(f"texts file {path} not found")
  if path.lower().endswith(".json"):
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise EmbedError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, list):
      raise EmbedError(f"{path}: expected a JSON list of strings, found {type(data).__name__}")
    for i, t in enumerate(data):
      if not isinstance(t, str):
        raise EmbedError(f"{path}: item {i} is {type(t).__name__}, not a string")
    return data
  try:
    return eval_texts.read_lines(path)
  except UnicodeDecodeError as e:
    raise EmbedError(f"{path}: not UTF-8 text ({e})") from None


def bank_items(texts: list[str]) -> list[Item]:
  """Distinct texts, keyed by themselves; an empty or blank text is flagged."""
  return [Item(t, *judge_text(t)) for t in eval_texts.unique(texts)]
