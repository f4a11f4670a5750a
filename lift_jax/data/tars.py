"""Reading webdataset tars by member offset: which members are complete, how members group into
samples, and each sample's caption from its own ``.txt`` or ``.json`` member.

One tar at a time, so that ``convert`` can list tars in parallel processes; everything that
depends on more than one tar (duplicate keys across tars, ``--limit``, extra captions) is decided
by the caller. ``opts`` is ``convert.Options`` (only its caption fields are read here).
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import posixpath
import tarfile
from typing import Any

# File extensions read as a sample's image, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def sample_caption(key: str, group: dict[str, tarfile.TarInfo], tf: tarfile.TarFile,
                    opts: Any, join_in_json: bool
                    ) -> tuple[str | None, Any, dict[str, Any], str | None]:
  """(caption, join value, ``--json_fields`` values, why the sample is skipped or None) of one
  tar sample, from its own members only."""
  json_field = opts.caption_source[5:] if opts.caption_source.startswith("json:") else None
  meta: dict[str, Any] = {}
  if "json" in group and (json_field or opts.json_fields or join_in_json):
    try:
      meta = json.loads(tf.extractfile(group["json"]).read())
    except UnicodeDecodeError:
      return None, None, {}, "undecodable_caption" if json_field else "bad_json"
    except json.JSONDecodeError:
      return None, None, {}, "bad_json"
    if not isinstance(meta, dict):
      return None, None, {}, "bad_json"
  if json_field is None:
    if "txt" not in group:
      return None, None, {}, "missing_caption"
    try:
      caption = tf.extractfile(group["txt"]).read().decode("utf-8").strip()
    except UnicodeDecodeError:
      return None, None, {}, "undecodable_caption"
  else:
    value = meta.get(json_field)
    caption = value.strip() if isinstance(value, str) else ""
  if not caption:
    return None, None, {}, "missing_caption"
  join = key if opts.join_field == "key" else meta.get(opts.join_field)
  return caption, join, {n: meta[n] for n in opts.json_fields if n in meta}, None


PROBLEMS = {
    "not_a_tar": "not a tar file",
    "compressed": "a compressed tar (members are read by offset): decompress it first",
    "unreadable": "cannot be read",
}
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


def sample_key(member_name: str) -> str:
  dirname, base = posixpath.split(member_name)
  dot = base.find(".")
  return posixpath.join(dirname, base[:dot] if dot > 0 else base)


def read_members(path: str
                 ) -> tuple[list[tarfile.TarInfo], list[str], str | None, str | None]:
  """(complete members, names of members cut off, why the tar is cut short or None, why it is
  unusable or None).

  A download cut off mid-way keeps every member whose data lies wholly inside the file; a file
  that is not an uncompressed tar gives no members and a reason (see ``PROBLEMS``).
  """
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(6)
  except OSError:
    return [], [], None, "unreadable"
  if head.startswith(_COMPRESSED_MAGIC):
    return [], [], None, "compressed"
  members: list[tarfile.TarInfo] = []
  cut = None
  try:
    with tarfile.open(path, "r:") as tf:
      try:
        for m in tf:
          members.append(m)
      except (tarfile.ReadError, EOFError, OSError) as e:
        cut = str(e) or type(e).__name__
  except (tarfile.ReadError, EOFError):
    return [], [], None, "not_a_tar"
  except OSError:
    return [], [], None, "unreadable"
  complete = [m for m in members if m.offset_data + m.size <= size]
  lost = [m.name for m in members if m.offset_data + m.size > size]
  if lost:
    cut = cut or "a member's data runs past the end of the file"
  elif cut is None and size % tarfile.BLOCKSIZE:
    cut = "the file ends inside a 512-byte tar block"
  if not complete and cut is None and size > 0 and not _looks_like_empty_tar(path, size):
    return [], [], None, "not_a_tar"
  return complete, lost, cut, None


def _looks_like_empty_tar(path: str, size: int) -> bool:
  """A tar without members is zero blocks only."""
  with open(path, "rb") as f:
    return not f.read(min(size, 1 << 16)).strip(b"\0")


def list_tar(tar_path: str, opts: Any, join_in_json: bool
              ) -> tuple[str | None, str | None, int, list[tuple]]:
  """What listing learns from one tar alone (so that tars are listed in parallel): why it is
  unusable or None, why it is cut short or None, its complete members, and its events in
  order: ``("member_twice", key)`` for a member name seen twice, then per sample
  ``("no_image", key, reason)`` or ``("sample", key, images, reason, caption, join,
  json_values, offset, size)``."""
  members, lost, cut, problem = read_members(tar_path)
  if problem is not None:
    return problem, None, 0, []
  # The samples of members cut off, and the last sample before the cut (it may have lost
  # members that came after it), are counted as truncated_tar when incomplete.
  cut_keys = {sample_key(name) for name in lost}
  if cut is not None and members:
    cut_keys.add(sample_key(members[-1].name))
  events: list[tuple] = []
  with open(tar_path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for m in members:
      if not m.isfile():
        continue
      dirname, base = posixpath.split(m.name)
      dot = base.find(".")
      if dot <= 0:
        continue
      key = posixpath.join(dirname, base[:dot])
      group = groups.setdefault(key, {})
      ext = base[dot + 1:].lower()
      if ext in group:
        events.append(("member_twice", key))  # the same member twice in one tar
      else:
        group[ext] = m
    for name in lost:
      groups.setdefault(sample_key(name), {})  # a sample whose members were all cut off
    for key, group in groups.items():
      images = [e for e in IMAGE_EXTENSIONS if e in group]
      if not images:
        events.append(("no_image", key,
                       "truncated_tar" if key in cut_keys else "missing_image"))
        continue
      caption, join, json_values, reason = sample_caption(key, group, tf, opts, join_in_json)
      if reason == "missing_caption" and key in cut_keys:
        reason = "truncated_tar"
      img = group[images[0]]
      events.append(("sample", key, len(images), reason, caption, join, json_values,
                     img.offset_data, img.size))
  return None, cut, len(members), events


@contextlib.contextmanager
def pool(workers: int):
  """An ordered ``imap`` over ``workers`` processes (the built-in ``map`` for one)."""
  if workers <= 1:
    yield map
    return
  # spawn, not fork: callers (the trainer) may hold JAX threads, which fork would copy broken.
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    yield functools.partial(pool.imap, chunksize=1)
