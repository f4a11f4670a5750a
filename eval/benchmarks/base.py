"""What every benchmark type shares: field declarations, errors, file checks and the evaluator
base class. No JAX here (see :class:`Evaluator`).

A benchmark type is one module of this package (its file name is the ``type`` a config names):
a frozen dataclass ``Spec`` whose fields are the type's config fields, declared with
:func:`field` (a one-line doc, and ``path=True`` for file and folder fields, which
``evals.data_root`` resolves), and a class ``Evaluator(spec)`` with ``name``, ``texts()``,
``scored_texts()`` and ``run(predictor) -> {"<name>/<metric>": value}``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

from lift_jax import cli
from lift_jax.data import records


@cli.user_error
class BenchmarkConfigError(ValueError):
  """A benchmark entry of the config is wrong; the message names the benchmark and field."""


@cli.user_error
class MissingImagesError(FileNotFoundError):
  """Images a benchmark needs are not in its image folder; the message names them."""


def field(default: Any = None, doc: str = "", *, path: bool = False) -> Any:
  """A config field of a benchmark type: its default, a one-line doc (the README's benchmark
  reference is generated from it) and whether it names a file or folder."""
  return dataclasses.field(default=default, metadata={"doc": doc, "path": path})


def as_tuple(value) -> tuple:
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  return tuple(value)


def require_file(name: str, field_name: str, path: str | None) -> str:
  if not path:
    raise BenchmarkConfigError(f"benchmark {name!r}: field {field_name!r} is required")
  if not os.path.exists(path):
    raise BenchmarkConfigError(f"benchmark {name!r}: {field_name} {path} does not exist")
  return path


def shard_records(folder: str, fields: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
  """(key, {field: value}) of every record in a folder of image shards, in shard order."""
  for path in records.list_shards(folder, records.IMAGES):
    for n, record in enumerate(records.iter_records(path)):
      missing = [f for f in fields if f not in record]
      if missing:
        raise BenchmarkConfigError(f"{path} record {n} (key {record['key']!r}) has no field "
                                   f"{missing[0]!r}")
      yield record["key"], {f: record[f] for f in fields}


def shard_images(folder: str, keys: list[str]) -> Iterator[bytes]:
  """The image bytes of ``keys`` (in the shards' order, which is the keys' order)."""
  wanted = set(keys)
  n = 0
  for key, r in shard_records(folder, ("image",)):
    if key in wanted:
      yield r["image"]
      n += 1
      if n == len(keys):
        return
  raise BenchmarkConfigError(f"{folder}: {len(keys) - n} images vanished while reading")


def present(spec, paths: list[str]) -> tuple[list[str], list[str]]:
  """(present, missing) image paths; missing ones are an error unless ``spec.skip_missing``."""
  folder = spec.image_dir
  if not os.path.isdir(folder):
    raise MissingImagesError(f"benchmark {spec.name!r}: image folder {folder} does not exist")
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing and not spec.skip_missing:
    names = ", ".join(os.path.relpath(p, folder) for p in missing[:5])
    raise MissingImagesError(
        f"benchmark {spec.name!r}: {len(missing)} of {len(paths)} images are missing from "
        f"{folder} (first: {names}). Put them there, or set skip_missing=True in the benchmark's "
        "config to score without them (they are counted as skipped_images).")
  gone = set(missing)
  return [p for p in paths if p not in gone], missing


def spec_type(spec) -> str:
  """The type of a spec: the name of the module that defines it."""
  return type(spec).__module__.rsplit(".", 1)[-1]


class Evaluator:
  """Base of the benchmark types' evaluators: built once from a spec (files are read and image
  paths checked then, so a training run fails at start, not at its first evaluation)."""

  def __init__(self, spec):
    self.spec, self.name = spec, spec.name

  def texts(self) -> list[str]:
    """Every text the benchmark scores."""
    return self.spec.texts()

  def scored_texts(self) -> list[str]:
    """The texts :meth:`run` looks up (without those of images skipped as missing)."""
    return self.texts()

  @property
  def metrics(self):
    """:mod:`eval.metrics` (jnp). Imported on first scoring, so that reading the specs and
    listing their texts (the PyTorch embedding job does) never loads JAX."""
    from eval import metrics  # here: listing texts (the embed job) must not load JAX
    return metrics

  def run(self, predictor) -> dict[str, float]:
    raise NotImplementedError
