"""Output folder state: finished shards, their manifest entries, and manifest.json.

Many ranks write into one output folder and none waits for another, so the manifest is assembled
from parts that each rank writes alone:

* ``manifest.d/settings.json`` what the folder holds (model, pooling, max_length, ...); every rank
  writes the same content, and a re-run with different settings is refused;
* ``manifest.d/<shard file>.json`` the entry of one finished shard (count, SHA-256, flag counts),
  written by the rank that wrote the shard, after the shard itself was renamed into place.

``manifest.json`` is a pure function of these parts, rewritten atomically after every shard. A
rank re-reads the parts after each write and writes again if they changed meanwhile; so whichever
rank writes last, its manifest holds every entry that exists (any entry created later belongs to
a rank that writes the manifest after it). Re-running on one process rebuilds it too.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from embed.errors import EmbedError
from lift_jax import common
from lift_jax.data import records
from lift_jax.data import shards

PARTS = records.PARTS
SETTINGS = shards.SETTINGS
COUNTERS = ("truncated", "empty", "undecodable", "missing", "nan", "failed")


def parts_dir(output: str) -> str:
  return shards.parts_dir(output)


def read_json(path: str) -> Any:
  return shards.read_json(path, EmbedError)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def ensure_settings(output: str, settings: dict[str, Any], context: dict[str, Any]) -> None:
  """Records what this folder holds; refuses a folder that holds something else.

  ``settings`` decide the vectors and must match a previous run; ``context`` (paths, code
  version) is informative and may change between runs.
  """
  os.makedirs(parts_dir(output), exist_ok=True)
  path = os.path.join(parts_dir(output), SETTINGS)
  previous = _previous_settings(output)
  if previous is not None:
    shards.check_settings(output, previous, settings, "use a new output folder", EmbedError)
  if not os.path.exists(path) or read_json(path).get("context") != context:
    common.write_json_atomic(path, {"settings": settings, "context": context})


def _previous_settings(output: str) -> dict[str, Any] | None:
  path = os.path.join(parts_dir(output), SETTINGS)
  if os.path.exists(path):
    return read_json(path)["settings"]
  if os.path.exists(os.path.join(output, records.MANIFEST)):
    # A folder whose parts were removed: its manifest still says what it holds.
    manifest = records.read_manifest(output)
    return {k: manifest.get(k) for k in manifest.get("settings_keys", [])} or None
  return None


def read_settings(output: str) -> tuple[dict[str, Any], dict[str, Any]]:
  data = read_json(os.path.join(parts_dir(output), SETTINGS))
  return data["settings"], data.get("context", {})


# --------------------------------------------------------------------------------------------
# Shard entries
# --------------------------------------------------------------------------------------------


def entry_path(output: str, shard_file: str) -> str:
  return records.part_path(output, shard_file)


def write_entry(output: str, entry: dict[str, Any]) -> None:
  shards.write_part(output, entry)


def read_entries(output: str) -> dict[str, dict[str, Any]]:
  """{shard file: entry} of every shard whose part exists."""
  return shards.read_parts(output, EmbedError)


def manifest_entries(output: str) -> dict[str, dict[str, Any]]:
  """{shard file: entry} of an existing manifest.json (a folder copied without its parts)."""
  if not os.path.exists(os.path.join(output, records.MANIFEST)):
    return {}
  return {e["file"]: e for e in records.read_manifest(output)["shards"]}


def remove_stale_temporaries(path: str) -> None:
  """Temporary files a killed writer left for this shard."""
  for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
    try:
      os.remove(tmp)
    except FileNotFoundError:
      pass


# --------------------------------------------------------------------------------------------
# manifest.json
# --------------------------------------------------------------------------------------------


def build_manifest(settings: dict[str, Any], context: dict[str, Any],
                   entries: dict[str, dict[str, Any]], num_shards: int) -> dict[str, Any]:
  shards = [entries[f] for f in sorted(entries)]
  dims = sorted({e["dim"] for e in shards if e.get("dim")})
  manifest = dict(context)
  manifest.update(settings)
  manifest["settings_keys"] = sorted(settings)
  manifest["dim"] = dims[0] if len(dims) == 1 else (dims or None)
  manifest["num_shards"] = num_shards
  manifest["complete"] = len(shards) == num_shards
  manifest["shards"] = shards
  manifest["totals"] = totals(shards)
  manifest["summary"] = summary(shards)
  manifest["code_version"] = records.code_version()
  return manifest


def totals(shards: list[dict[str, Any]]) -> dict[str, int]:
  out = {"records": sum(e["count"] for e in shards)}
  for k in COUNTERS:
    out[k] = sum(e.get(k, 0) for e in shards)
  return out


def summary(shards: list[dict[str, Any]]) -> dict[str, Any]:
  """Throughput of the work recorded in ``shards`` (each shard's own compute time)."""
  texts = sum(e["count"] - e.get("failed", 0) for e in shards)
  tokens = sum(e.get("tokens", 0) for e in shards)
  padded = sum(e.get("padded_tokens", 0) for e in shards)
  seconds = sum(e.get("seconds", 0.0) for e in shards)
  return {
      "embedded": texts,
      "tokens": tokens,
      "padded_tokens": padded,
      "padding_waste": round(1.0 - tokens / padded, 6) if padded else 0.0,
      "seconds": round(seconds, 3),
      "captions_per_second": round(texts / seconds, 2) if seconds else None,
      "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
  }


def assemble_manifest(output: str, num_shards: int, kind: str) -> dict[str, Any]:
  """Rewrites manifest.json from the parts until it holds every part that exists."""
  settings, context = read_settings(output)
  if settings.get("kind") != kind:
    raise EmbedError(f"{output}: settings say kind {settings.get('kind')!r}, expected {kind!r}")
  entries = read_entries(output)
  while True:
    manifest = build_manifest(settings, context, entries, num_shards)
    records.write_manifest(output, manifest)
    again = read_entries(output)
    if again == entries:
      return manifest
    entries = again
