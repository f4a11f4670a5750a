"""Reads what W&B wrote for an offline run, for the tests (wandb has no public reader of it).

An offline run is ``DIR/wandb/offline-run-<time>-<id>/run-<id>.wandb``: a 7-byte header (b":W&B",
uint16 0xBEE1 little-endian, version byte 0), then records framed as in LevelDB's log format --
32 KiB blocks, each record fragment a 7-byte header (crc32, uint16 length, type: 1 full, 2 first,
3 middle, 4 last) and its bytes, a block's last < 7 bytes zero padding. Each assembled record is a
``wandb.proto.wandb_internal_pb2.Record``. Media such as tables are files under the run's
``files/`` folder; a history row names the file (``<key>/path``).
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
import zlib

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
FRAGMENT = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str):
  """The protobuf records of a .wandb file, in order; a CRC mismatch is an error."""
  from wandb.proto import wandb_internal_pb2

  with open(path, "rb") as f:
    data = f.read()
  magic, signature, version = HEADER.unpack_from(data)
  assert (magic, signature, version) == (b":W&B", 0xBEE1, 0), (magic, signature, version)
  pos, parts = HEADER.size, []
  while pos + FRAGMENT.size <= len(data):
    room = BLOCK - pos % BLOCK
    if room < FRAGMENT.size:  # the block's zero-padded tail
      pos += room
      continue
    crc, length, kind = FRAGMENT.unpack_from(data, pos)
    if kind == 0 and length == 0:  # not written yet (preallocated zeros)
      pos += room
      continue
    body = data[pos + FRAGMENT.size: pos + FRAGMENT.size + length]
    assert zlib.crc32(body, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad CRC at {pos}"
    parts.append(body)
    pos += FRAGMENT.size + length
    if kind in (FULL, LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b"".join(parts))
      parts = []
      yield record


def _items(items) -> dict:
  return {("/".join(i.nested_key) if i.nested_key else i.key): json.loads(i.value_json)
          for i in items}


def offline_runs(workdir: str) -> list[str]:
  """The offline run folders W&B made under ``workdir``, oldest first."""
  return sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))


def read_run(run_dir: str, timeout: float = 30.0) -> dict:
  """{"id", "config", "history": {step: {key: value}}} of one finished offline run folder.

  ``run.finish()`` can return before W&B's service process has written the last records: the
  file is read again until it holds the run's exit record (``timeout`` seconds at most)."""
  (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
  deadline = time.monotonic() + timeout
  while True:
    found = list(records(path))
    if any(r.WhichOneof("record_type") == "exit" for r in found):
      break
    assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
    time.sleep(0.2)
  out = {"id": None, "config": {}, "history": {}}
  for r in found:
    kind = r.WhichOneof("record_type")
    if kind == "run":
      out["id"] = r.run.run_id
      out["config"].update(_items(r.run.config.update))
    elif kind == "config":
      out["config"].update(_items(r.config.update))
    elif kind == "history":
      row = _items(r.history.item)
      out["history"].setdefault(row.get("_step", r.history.step.num), {}).update(row)
  return out


def table(run_dir: str, row: dict, key: str) -> dict:
  """The JSON of the table logged as ``key`` in a history row (its file lies in the run's
  ``files/`` folder; the row holds its fields flattened, ``<key>/path`` among them)."""
  with open(os.path.join(run_dir, "files", row[f"{key}/path"]), encoding="utf-8") as f:
    return json.load(f)
