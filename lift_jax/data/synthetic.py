"""The built-in synthetic compositional data set: coloured shapes, captions from a small grammar.

    python -m lift_jax.data.synthetic --output=DIR [--num_train=20000 --seed=0 ...]

or, from Python (data preparation does this for the tiny configs)::

    from lift_jax.data import synthetic
    synthetic.generate(DIR, num_train=20_000, num_eval=500, image_size=64, seed=0)

The scenes, the grammar and the caption pairs are :mod:`lift_jax.data.scenes`; this module writes
them out. :class:`Settings` holds every setting's default (the command's flags and
``config.data.synthetic`` read them from there).

A re-run with the same settings is a no-op (a half-written set is completed); other settings for
an existing DIR are an error naming the differences.

Layout (a fixed contract; the demo config and eval read it)
-----------------------------------------------------------
    DIR/train/images-XXXXX-of-YYYYY.array_record, DIR/train/manifest.json
        records: key, image (PNG), caption, label (class index of a one-object scene, -1 for
        two objects), objects ([shape, colour, size, [x0, y0, x1, y1]] per object, pixels),
        relation (the relation of object 0 to object 1, "" for one object)
    DIR/eval/images/<name>.png          every eval image (pair_XXXXX.png, single_XXXXX.png)
    DIR/eval/scenes.json                {name: {"objects": [...], "relation": ...}}
    DIR/eval/compositional/<subset>.json   SugarCrepe's schema, for the seven subsets
    DIR/eval/classification/labels.tsv, classnames.txt, templates.txt
    DIR/eval/retrieval/captions.tsv     two captions per image: "A rel B" and "B rel' A"
    DIR/eval/manifest.json              settings and counts per set

Classification labels are colour+shape (64 classes, ``class = colour_index * 8 + shape_index``,
names like "red circle"), on one-object images with balanced classes: shape alone would be solved
by a shape detector, colour+shape asks the model to bind an attribute to its object, which is
what the compositional sets probe too. Size is not part of the label.

Compositional eval (SugarCrepe-style; one sample per eval image and subset)
---------------------------------------------------------------------------
Eval two-object scenes have different shapes and different colours, and no two of them share a
description. ``add_obj`` uses one-object scenes: the positive names the object, the negative adds
a second object with a shape not in the image. On two-object scenes: ``add_att`` (the positive
leaves one size or colour out, the negative puts a wrong one in), ``replace_obj`` (one shape
replaced), ``replace_att`` (one colour or size replaced), ``replace_rel`` (the relation replaced),
``swap_obj`` (the two shapes swapped), ``swap_att`` (the colours, or the sizes where they differ,
swapped). Every positive is checked true and every negative false against the scene by
:func:`lift_jax.data.scenes.holds` before it is written; a candidate that fails is redrawn.

Determinism: pair ``i`` of the training set is drawn from ``numpy.random.default_rng([seed, 0,
i])`` alone, so shards are byte-identical for a seed whatever the worker count (PNG bytes depend
on the zlib build). Eval scenes come from other streams of the same seed, so they are not
training images.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import shutil
import sys
import time
from typing import Any, Sequence

import numpy as np
from absl import flags

from lift_jax import cli
from lift_jax import common
from lift_jax.data import records, shards
from lift_jax.data.scenes import (COLOR_NAMES, COLORS, RELATIONS, SHAPES, SIZES, SUBSETS,
                                  TEMPLATES, Scene, caption_text, class_index, class_names,
                                  compositional_sample, describe, pair_scene, random_attrs,
                                  render, sample_caption, sample_scene, single_scene)

GENERATOR_VERSION = 1
# Streams of numpy SeedSequence([seed, stream, ...]); one per purpose so that no two coincide.
_TRAIN, _EVAL_PAIRS, _EVAL_SINGLES, _EVAL_CAPTIONS = 0, 1, 2, 3

log = logging.getLogger(__name__)


@cli.user_error
class SyntheticSetError(ValueError):
  """An existing synthetic set in the output folder was made with other settings."""


# --------------------------------------------------------------------------------------------
# Training shards
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the output depends on (recorded in the manifests), with the defaults."""
  num_train: int = 20_000
  num_eval: int = 500
  image_size: int = 64
  seed: int = 0
  single_fraction: float = 0.25
  omit_prob: float = 0.1
  supersample: int = 2

  def identity(self, part: str, num_shards: int = 0) -> dict[str, Any]:
    shared = {"generator_version": GENERATOR_VERSION, "image_size": self.image_size,
              "seed": self.seed, "supersample": self.supersample, "shapes": list(SHAPES),
              "colors": {k: list(v) for k, v in COLORS.items()}}
    if part == "train":
      return {**shared, "num_train": self.num_train, "num_shards": num_shards,
              "single_fraction": self.single_fraction, "omit_prob": self.omit_prob}
    return {**shared, "num_eval": self.num_eval}


def train_pair(settings: Settings, index: int) -> shards.Outcome:
  """Record ``index`` of the training set (a pure function of the settings and the index)."""
  rng = np.random.default_rng([settings.seed, _TRAIN, index])
  scene = sample_scene(rng, settings.image_size, settings.single_fraction)
  caption = caption_text(sample_caption(rng, scene, settings.omit_prob))
  png = render(scene, settings.image_size, rng, settings.supersample)
  label = (class_index(scene.objects[0].color, scene.objects[0].shape)
           if scene.relation is None else -1)
  key = f"train-{index:08d}"
  record = records.image_record(key, png, caption, label=label,
                                objects=[o.as_list() for o in scene.objects],
                                relation=scene.relation or "")
  return key, record, ()


# --------------------------------------------------------------------------------------------
# Eval sets
# --------------------------------------------------------------------------------------------


def _eval_pair(settings: Settings, index: int, seen: set) -> tuple[Scene, np.random.Generator]:
  """Eval pair ``index``: shapes and colours differ, and no earlier eval pair has the same
  description (in either naming order)."""
  for attempt in range(1000):
    rng = np.random.default_rng([settings.seed, _EVAL_PAIRS, index, attempt])
    a = random_attrs(rng)
    b = random_attrs(rng)
    if a[0] == b[0] or a[1] == b[1]:
      continue
    scene = pair_scene(rng, settings.image_size, (a, b), RELATIONS[rng.integers(len(RELATIONS))])
    desc = caption_text(describe(scene))
    if desc in seen:
      continue
    seen.add(desc)
    seen.add(caption_text(describe(scene, converse=True)))
    return scene, rng
  raise SyntheticSetError(f"no new eval pair description after 1000 tries at index {index}; "
                          f"num_eval={settings.num_eval} is too large for the grammar")


def eval_complete(folder: str, identity: dict[str, Any] | None = None) -> bool:
  """Whether ``folder`` holds finished eval sets (made with ``identity``, when given: other
  settings are a SyntheticSetError naming the differences)."""
  path = os.path.join(folder, records.MANIFEST)
  if not os.path.exists(path):
    return False
  old = records.read_manifest(folder)
  if identity is not None:
    shards.check_settings(path, old.get("identity") or {}, identity,
                          f"use another output folder or delete {folder}", SyntheticSetError)
  return all(os.path.exists(os.path.join(folder, f)) for f in old.get("files", []))


def eval_benchmarks(eval_dir: str) -> dict[str, dict[str, Any]]:
  """The three evaluation suites of a synthetic set's ``eval/`` folder, as
  ``config.evals.benchmarks`` entries (see :mod:`eval.benchmarks`)."""
  images = os.path.join(eval_dir, "images")
  return {
      "compositional": {"type": "sugarcrepe", "data_dir": os.path.join(eval_dir, "compositional"),
                        "image_dir": images},
      "classification": {"type": "zeroshot", "image_dir": images,
                         "labels": os.path.join(eval_dir, "classification", "labels.tsv"),
                         "classnames": os.path.join(eval_dir, "classification", "classnames.txt"),
                         "templates": os.path.join(eval_dir, "classification", "templates.txt")},
      "retrieval": {"type": "retrieval", "image_dir": images,
                    "captions": os.path.join(eval_dir, "retrieval", "captions.tsv"),
                    "protocol": "standard"},
  }


def write_eval(folder: str, settings: Settings) -> dict[str, Any]:
  """Writes the eval images, the seven compositional sets, classification and retrieval files."""
  identity = shards.normalise(settings.identity("eval"))
  if eval_complete(folder, identity):
    log.info("%s: eval sets are complete and match; nothing to do", folder)
    return records.read_manifest(folder)
  # A partial or stale eval folder is rebuilt whole: it is small and quick to make.
  for sub in ("images", "compositional", "classification", "retrieval"):
    shutil.rmtree(os.path.join(folder, sub), ignore_errors=True)
  for sub in ("images", "compositional", "classification", "retrieval"):
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
  side, n = settings.image_size, settings.num_eval
  scenes: dict[str, Scene] = {}

  seen: set[str] = set()
  pairs = []
  for i in range(n):
    scene, rng = _eval_pair(settings, i, seen)
    name = f"pair_{i:05d}.png"
    _write_bytes(os.path.join(folder, "images", name), render(scene, side, rng,
                                                              settings.supersample))
    scenes[name] = scene
    pairs.append(name)
  singles = []
  for i in range(n):
    rng = np.random.default_rng([settings.seed, _EVAL_SINGLES, i])
    c = i % (len(COLOR_NAMES) * len(SHAPES))  # balanced classes
    color, shape = COLOR_NAMES[c // len(SHAPES)], SHAPES[c % len(SHAPES)]
    scene = single_scene(rng, side, shape, color, SIZES[rng.integers(len(SIZES))])
    name = f"single_{i:05d}.png"
    _write_bytes(os.path.join(folder, "images", name), render(scene, side, rng,
                                                              settings.supersample))
    scenes[name] = scene
    singles.append(name)

  counts: dict[str, Any] = {"images": len(scenes), "compositional": {}}
  files = []
  for s, subset in enumerate(SUBSETS):
    out = {}
    for i, name in enumerate(singles if subset == "add_obj" else pairs):
      rng = np.random.default_rng([settings.seed, _EVAL_CAPTIONS, s, i])
      sample = compositional_sample(subset, scenes[name], rng)
      if sample is not None:
        out[str(len(out))] = {"filename": name, "caption": sample[0],
                              "negative_caption": sample[1]}
    rel = f"compositional/{subset}.json"
    common.write_json_atomic(os.path.join(folder, rel), out, sort_keys=False)
    files.append(rel)
    counts["compositional"][subset] = len(out)

  labels = ["filename\tclass_index"] + [
      f"{name}\t{class_index(scenes[name].objects[0].color, scenes[name].objects[0].shape)}"
      for name in singles]
  common.write_text_atomic(os.path.join(folder, "classification", "labels.tsv"),
                           "\n".join(labels) + "\n")
  common.write_text_atomic(os.path.join(folder, "classification", "classnames.txt"),
              "\n".join(class_names()) + "\n")
  common.write_text_atomic(os.path.join(folder, "classification", "templates.txt"),
              "\n".join(TEMPLATES) + "\n")
  files += ["classification/labels.tsv", "classification/classnames.txt",
            "classification/templates.txt"]
  counts["classification"] = {"images": len(singles), "classes": len(class_names()),
                              "templates": len(TEMPLATES)}

  rows = ["filename\tcaption_index\tcaption"]
  for name in pairs:
    for j, converse in enumerate((False, True)):
      rows.append(f"{name}\t{j}\t{caption_text(describe(scenes[name], converse))}")
  common.write_text_atomic(os.path.join(folder, "retrieval", "captions.tsv"),
                           "\n".join(rows) + "\n")
  files.append("retrieval/captions.tsv")
  counts["retrieval"] = {"images": len(pairs), "captions": len(rows) - 1}

  common.write_json_atomic(os.path.join(folder, "scenes.json"), {
      name: {"objects": [o.as_list() for o in sc.objects], "relation": sc.relation}
      for name, sc in scenes.items()}, sort_keys=False)
  files.append("scenes.json")
  files += [f"images/{name}" for name in scenes]
  manifest = {"kind": "synthetic_eval", "identity": identity, "counts": counts, "files": files,
              "shards": [], "code_version": records.code_version()}
  records.write_manifest(folder, manifest)  # last: its presence marks the eval set complete
  return records.read_manifest(folder)


def _write_bytes(path: str, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def generate(output_dir: str, settings: Settings | None = None, *, num_shards: int | None = None,
             workers: int | None = None, progress: bool = False, **fields) -> dict[str, Any]:
  """Generates (or completes, or finds complete) the synthetic set in ``output_dir``.

  ``settings`` (or its fields as keywords, e.g. ``num_train=1200``) default to
  :class:`Settings`'s. Returns {"train": train manifest, "eval": eval manifest}.
  ``num_shards=None`` gives one shard per 10,000 pairs. The result does not depend on
  ``workers``.
  """
  settings = dataclasses.replace(settings or Settings(), **fields)
  if settings.image_size < 16:
    raise SyntheticSetError(f"image_size={settings.image_size}: at least 16 px are needed to "
                            "draw two objects; use --image_size=16 or more")
  n = num_shards or max(1, math.ceil(settings.num_train / shards.SAMPLES_PER_SHARD))
  train_dir = os.path.join(output_dir, "train")
  start = time.perf_counter()
  train = shards.build_shards(
      train_dir, shards.split_even(range(settings.num_train), n),
      functools.partial(train_pair, settings), identity=settings.identity("train", n),
      info={"source": {"type": "synthetic"}, "fields": ["key", "image", "caption", "label",
                                                        "objects", "relation"]},
      workers=workers if workers is not None else (os.cpu_count() or 1), chunksize=256,
      progress=progress, desc="synthetic", unit="pairs", log=log.info,
      mismatch_hint=f"use another output folder or delete {output_dir}",
      error=SyntheticSetError)
  evals = write_eval(os.path.join(output_dir, "eval"), settings)
  log.info("%s: synthetic set ready (%d train pairs in %d shards, %d eval images) in %.1f s",
           output_dir, train["total"], n, evals["counts"]["images"],
           time.perf_counter() - start)
  return {"train": train, "eval": evals}


_DEFAULTS = Settings()
_HELP = {"num_train": "training pairs",
         "num_eval": "eval two-object scenes and eval one-object scenes (each)",
         "image_size": "image side in pixels", "seed": "seed of every random choice",
         "single_fraction": "fraction of one-object training scenes",
         "omit_prob": "chance that a training caption leaves out each size / colour word",
         "supersample": "drawing supersampling factor"}
FLAGS = flags.FlagValues()
flags.DEFINE_string("output", None, "output folder (train/ and eval/ inside)", flag_values=FLAGS)
for _field in dataclasses.fields(Settings):  # every setting is a flag, with its one default
  (flags.DEFINE_float if _field.type == "float" else flags.DEFINE_integer)(
      _field.name, getattr(_DEFAULTS, _field.name), _HELP[_field.name], flag_values=FLAGS)
flags.DEFINE_integer("num_shards", 0,
                     f"training shards (0: one per {shards.SAMPLES_PER_SHARD} pairs)",
                     flag_values=FLAGS)
flags.DEFINE_integer("workers", os.cpu_count() or 1,
                     "processes (the output does not depend on it)", flag_values=FLAGS)
flags.DEFINE_bool("no_progress", False, "no progress bar", flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Generate the synthetic compositional data set (train shards + eval sets); re-running with
  the same settings is a no-op."""
  cli.parse_flags(FLAGS, sys.argv[1:] if argv is None else argv,
                  "python -m lift_jax.data.synthetic --output=DIR [--num_train=N ...]\n"
                  + (main.__doc__ or ""))
  if not FLAGS.output:
    raise cli.UsageError("--output=DIR is required: the folder to write train/ and eval/ into")
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  settings = Settings(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Settings)})
  return generate(FLAGS.output, settings, num_shards=FLAGS.num_shards or None,
                  workers=FLAGS.workers, progress=not FLAGS.no_progress)


if __name__ == "__main__":
  sys.exit(cli.run("python -m lift_jax.data.synthetic", main))
