"""Benchmark types, one module each, found by their file name; no JAX here.

``config.evals.benchmarks`` maps a name to ``{"type": <module name>, <that type's fields>...}``.
Each module of this package (:mod:`eval.benchmarks.sugarcrepe`, ``zeroshot``, ``retrieval``,
``long_retrieval``; :mod:`~eval.benchmarks.base` is shared code, not a type) holds its ``Spec``
(the type's config fields, each declared with a doc and whether it is a path) and its
``Evaluator``. Everything else is derived from them: :func:`parse` checks an entry against the
Spec's fields, :func:`resolve_paths` joins the path fields to ``evals.data_root``,
:func:`reference` documents the fields (the README's benchmark reference), and
:func:`required_texts` lists, without JAX, the texts a LIFT text bank must hold. It is the one
way the texts of evaluation are listed: ``eval.main --write_texts``, data preparation and
``embed.banks`` all call it. Adding a type is adding a module (see the README's "Extending").
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import pkgutil
from typing import Any, Mapping

import ml_collections

from eval import texts as T
from eval.benchmarks.base import BenchmarkConfigError, MissingImagesError, spec_type  # noqa: F401

_SHARED = ("base",)
# Every module of this package but the shared one is a benchmark type named after its file.
TYPES = {info.name: importlib.import_module(f"{__name__}.{info.name}")
         for info in pkgutil.iter_modules(__path__)
         if not info.name.startswith("_") and info.name not in _SHARED}
_OPTIONS = ("if_present",)  # read by resolve_paths, not by the types
_INTERNAL = ("name", "texts_only")  # Spec fields that are not config fields


def _as_dict(cfg: Any) -> dict[str, Any]:
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  return dict(cfg)


def config_fields(kind: str) -> dict[str, dataclasses.Field]:
  """{field name: dataclass field} of a type's config."""
  return {f.name: f for f in dataclasses.fields(TYPES[kind].Spec) if f.name not in _INTERNAL}


def path_fields() -> tuple[str, ...]:
  """Names of the fields, of any type, that hold a file or folder."""
  return tuple(sorted({name for kind in TYPES for name, f in config_fields(kind).items()
                       if f.metadata.get("path")}))


def parse(name: str, cfg: Mapping[str, Any], texts_only: bool = False):
  """The spec of one ``config.evals.benchmarks`` entry; ``texts_only`` specs serve to list
  texts and need no image source."""
  d = _as_dict(cfg)
  for option in _OPTIONS:
    d.pop(option, None)
  kind = d.pop("type", None)
  if kind not in TYPES:
    raise BenchmarkConfigError(f"benchmark {name!r}: type must be one of {sorted(TYPES)}, "
                               f"got {kind!r}")
  known = set(config_fields(kind))
  unknown = sorted(set(d) - known)
  if unknown:
    raise BenchmarkConfigError(f"benchmark {name!r} (type {kind}): unknown field(s) {unknown}; "
                               f"known: {sorted(known)}")
  spec_cls = TYPES[kind].Spec
  extra = {"texts_only": True} if texts_only and "texts_only" in {
      f.name for f in dataclasses.fields(spec_cls)} else {}
  return spec_cls(name=name, **{k: v for k, v in d.items() if v is not None}, **extra)


def parse_all(benchmarks: Mapping[str, Any] | None, texts_only: bool = False) -> list:
  """Specs of every entry of ``config.evals.benchmarks``, in the config's order."""
  return [parse(name, cfg, texts_only) for name, cfg in _as_dict(benchmarks or {}).items()]


def make_evaluator(spec):
  """The evaluator of a spec (its type module's ``Evaluator``)."""
  return TYPES[spec_type(spec)].Evaluator(spec)


def settings(spec) -> dict[str, Any]:
  """A spec's type and fields, as a metrics report records them."""
  return {"type": spec_type(spec), **dataclasses.asdict(spec)}


def required_texts(evals_config) -> list[str]:
  """Every text the benchmarks of ``config.evals`` (or of a whole config) score, each once, in
  benchmark order.

  A LIFT text bank built from this list serves all of them: ``python -m eval.main
  --config=CONFIG --write_texts=FILE`` (or ``python -m embed.banks``) writes it, and
  ``python -m embed.main --config=embed/configs/<encoder>.py --config.texts=FILE
  --config.output=DIR`` embeds it.
  """
  if hasattr(evals_config, "to_dict"):
    evals_config = evals_config.to_dict()
  if "benchmarks" not in evals_config and "evals" in evals_config:
    evals_config = evals_config["evals"]
  specs = parse_all(evals_config.get("benchmarks"))
  return T.unique(t for spec in specs for t in spec.texts())


def resolve_paths(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict,
                                                              list[str]]:
  """Joins relative benchmark paths to ``evals.data_root`` (and applies ``evals.skip_missing``).

  Returns (config copy, names of benchmarks dropped because they have relative paths and no
  data_root is set: a run whose evaluation data was not given still trains). A benchmark with
  ``if_present=True`` is left out (with a log line) when one of its paths is not there.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  root = config.evals.get("data_root")
  fields = path_fields()
  dropped = []
  benchmarks = {}
  for name, bench in (config.evals.get("benchmarks") or {}).items():
    bench = dict(bench)
    if_present = bench.pop("if_present", False)
    relative = [f for f in fields if isinstance(bench.get(f), str) and bench[f]
                and not os.path.isabs(bench[f])]
    if relative and not root:
      dropped.append(name)
      continue
    for f in relative:
      bench[f] = os.path.join(root, bench[f])
    absent = [bench[f] for f in fields if isinstance(bench.get(f), str) and bench[f]
              and not os.path.exists(bench[f])]
    if if_present and absent:
      logging.info("benchmark %s skipped: %s is not there", name, absent[0])
      continue
    if config.evals.get("skip_missing") and bench.get("skip_missing") is None:
      bench["skip_missing"] = True
    benchmarks[name] = bench
  config.evals.benchmarks = benchmarks
  return config, dropped


def reference() -> str:
  """Markdown: every benchmark type with its fields, defaults and docs (from the modules)."""
  lines = []
  for kind, module in sorted(TYPES.items()):
    summary = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ").replace("``", "`")
    lines += [f"**{summary}**", "", "| field | default | meaning |", "|---|---|---|"]
    for name, f in config_fields(kind).items():
      default = f.default if f.default is not dataclasses.MISSING else None
      doc = f.metadata.get("doc", "") + (" (a path; relative = under `evals.data_root`)"
                                         if f.metadata.get("path") else "")
      lines.append(f"| `{name}` | {default!r} | {doc} |")
    lines.append("")
  lines.append("Every entry also takes `if_present` (True: skipped, with a log line, when its "
               "files are not there).")
  return "\n".join(lines)
