"""The built-in synthetic compositional data set: coloured shapes, captions from a small grammar.

    python -m lift_jax.data.synthetic --output=DIR --num_train=100000 --seed=0

or, from Python (the trainer does this for its default config)::

    from lift_jax.data import synthetic
    synthetic.generate(DIR, num_train=100_000, num_eval=500, image_size=64, seed=0)

A re-run with the same settings is a no-op (a half-written set is completed); other settings for
an existing DIR are an error naming the differences.

Scenes
------
A scene holds one object or two. An object has a shape (circle, square, triangle, star, cross,
diamond, hexagon, heart), a colour (red, green, blue, yellow, purple, orange, white, black) and a
size (small, large: about 0.22 and 0.38 of the image side), drawn upright with PIL on a plain
grey background, 2x supersampled for smooth edges. Colours, background, sizes and positions are
jittered. Two objects are separated along one axis by a clear gap and overlap along the other, so
exactly one of the four relations holds between them: ``to the left of``, ``to the right of``,
``above``, ``below`` (and its converse the other way round; see :func:`relation`).

Grammar
-------
    caption  := phrase | phrase " " relation " " phrase
    phrase   := article [size] [colour] shape          ("a small red circle", "an orange star")
    relation := "to the left of" | "to the right of" | "above" | "below"

Training captions name the objects in either order (with the converse relation) and omit each
size or colour word with a small probability (``omit_prob``), so every caption is true.

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
:func:`holds` before it is written; a candidate that fails is redrawn.

Determinism: pair ``i`` of the training set is drawn from ``numpy.random.default_rng([seed, 0,
i])`` alone, so shards are byte-identical for a seed whatever the worker count (PNG bytes depend
on the zlib build). Eval scenes come from other streams of the same seed, so they are not
training images.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import math
import os
import shutil
import sys
import time
from typing import Any, Sequence

import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from lift_jax import cli
from lift_jax import common
from lift_jax.data import records
from lift_jax.data import shards

GENERATOR_VERSION = 1
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart")
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 35),
    "purple": (135, 45, 170),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
RELATIONS = ("to the left of", "to the right of", "above", "below")
CONVERSE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}
SUBSETS = ("add_obj", "add_att", "replace_obj", "replace_att", "replace_rel", "swap_obj",
           "swap_att")
TEMPLATES = ("a {}", "a picture of a {}", "there is a {}")

_SIZE_FRACTION = {"small": 0.22, "large": 0.38}  # object extent / image side
_COLOR_JITTER = 14
_MARGIN = 0.03  # of the image side, kept free at the borders
_GAP = 0.06  # least gap between two objects along their axis, of the image side
_OFFSET = 0.3  # most centre offset across the axis, of the smaller object's extent

# Streams of numpy SeedSequence([seed, stream, ...]); one per purpose so that no two coincide.
_TRAIN, _EVAL_PAIRS, _EVAL_SINGLES, _EVAL_CAPTIONS = 0, 1, 2, 3

log = logging.getLogger(__name__)


@cli.user_error
class SyntheticSetError(ValueError):
  """An existing synthetic set in the output folder was made with other settings."""


# --------------------------------------------------------------------------------------------
# Scenes and their semantics
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  color: str
  size: str
  box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the final image

  def as_list(self) -> list:
    return [self.shape, self.color, self.size, [round(v, 3) for v in self.box]]


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[Obj, ...]
  relation: str | None  # of objects[0] to objects[1]


# A phrase names a shape and optionally a size and a colour: (shape, color | None, size | None).
Phrase = tuple[str, "str | None", "str | None"]
# A caption: (phrase, None, None) or (phrase, relation, phrase).
Caption = tuple[Phrase, "str | None", "Phrase | None"]


def relation(a: Obj, b: Obj) -> str | None:
  """The relation of ``a`` to ``b`` read off their boxes: separated along one axis and
  overlapping along the other. None when neither (never the case for generated scenes)."""
  ax0, ay0, ax1, ay1 = a.box
  bx0, by0, bx1, by1 = b.box
  overlap_x = min(ax1, bx1) > max(ax0, bx0)
  overlap_y = min(ay1, by1) > max(ay0, by0)
  if overlap_y and ax1 < bx0:
    return "to the left of"
  if overlap_y and ax0 > bx1:
    return "to the right of"
  if overlap_x and ay1 < by0:
    return "above"
  if overlap_x and ay0 > by1:
    return "below"
  return None


def matches(obj: Obj, phrase: Phrase) -> bool:
  shape, color, size = phrase
  return obj.shape == shape and color in (None, obj.color) and size in (None, obj.size)


def holds(scene: Scene, caption: Caption) -> bool:
  """Whether a caption is true of a scene: some object fits the first phrase and, for a relation,
  another object fits the second phrase and stands in that relation to it."""
  first, rel, second = caption
  if rel is None:
    return any(matches(o, first) for o in scene.objects)
  return any(matches(a, first) and matches(b, second) and relation(a, b) == rel
             for a in scene.objects for b in scene.objects if a is not b)


def article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def phrase_text(phrase: Phrase) -> str:
  shape, color, size = phrase
  words = [w for w in (size, color, shape) if w]
  return f"{article(words[0])} {' '.join(words)}"


def caption_text(caption: Caption) -> str:
  first, rel, second = caption
  if rel is None:
    return phrase_text(first)
  return f"{phrase_text(first)} {rel} {phrase_text(second)}"


def full_phrase(obj: Obj) -> Phrase:
  return (obj.shape, obj.color, obj.size)


def describe(scene: Scene, converse: bool = False) -> Caption:
  """The full caption of a scene, naming object 0 first (or object 1 first with ``converse``)."""
  if scene.relation is None:
    return (full_phrase(scene.objects[0]), None, None)
  a, b = scene.objects
  if converse:
    return (full_phrase(b), CONVERSE[scene.relation], full_phrase(a))
  return (full_phrase(a), scene.relation, full_phrase(b))


def class_index(color: str, shape: str) -> int:
  return COLOR_NAMES.index(color) * len(SHAPES) + SHAPES.index(shape)


def class_names() -> list[str]:
  return [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]


# --------------------------------------------------------------------------------------------
# Sampling scenes
# --------------------------------------------------------------------------------------------


def _extent(rng: np.random.Generator, size: str, side: int) -> float:
  return _SIZE_FRACTION[size] * side * rng.uniform(0.92, 1.08)


def _single(rng: np.random.Generator, side: int, shape: str, color: str, size: str) -> Scene:
  e = _extent(rng, size, side)
  m = _MARGIN * side
  x0 = rng.uniform(m, side - m - e)
  y0 = rng.uniform(m, side - m - e)
  return Scene((Obj(shape, color, size, (x0, y0, x0 + e, y0 + e)),), None)


def _pair(rng: np.random.Generator, side: int, attrs: Sequence[tuple[str, str, str]],
          rel: str) -> Scene:
  """Two objects with ``rel`` of the first to the second: a clear gap along the relation's axis
  and a small centre offset across it."""
  ea, eb = (_extent(rng, a[2], side) for a in attrs)
  m, gap = _MARGIN * side, _GAP * side
  # Along the axis: [margin] first-in-line [gap] second-in-line [margin], slack split at random.
  a_first = rel in ("to the left of", "above")
  e1, e2 = (ea, eb) if a_first else (eb, ea)
  slack = side - 2 * m - e1 - e2 - gap
  parts = rng.dirichlet((1.0, 1.0, 1.0)) * slack
  p1 = m + parts[0]
  p2 = p1 + e1 + gap + parts[1]
  pa, pb = (p1, p2) if a_first else (p2, p1)
  # Across the axis: centres at most _OFFSET * min extent apart, both inside the image.
  dmax = _OFFSET * min(ea, eb)
  lo = max(m + ea / 2, m + eb / 2 - dmax)
  hi = min(side - m - ea / 2, side - m - eb / 2 + dmax)
  ca = rng.uniform(lo, hi)
  cb = rng.uniform(max(m + eb / 2, ca - dmax), min(side - m - eb / 2, ca + dmax))
  qa, qb = ca - ea / 2, cb - eb / 2
  if rel in ("to the left of", "to the right of"):
    box_a = (pa, qa, pa + ea, qa + ea)
    box_b = (pb, qb, pb + eb, qb + eb)
  else:
    box_a = (qa, pa, qa + ea, pa + ea)
    box_b = (qb, pb, qb + eb, pb + eb)
  a = Obj(*attrs[0], box_a)
  b = Obj(*attrs[1], box_b)
  assert relation(a, b) == rel, (a, b, rel)
  return Scene((a, b), rel)


def _attrs(rng: np.random.Generator) -> tuple[str, str, str]:
  return (SHAPES[rng.integers(len(SHAPES))], COLOR_NAMES[rng.integers(len(COLOR_NAMES))],
          SIZES[rng.integers(len(SIZES))])


def sample_scene(rng: np.random.Generator, side: int, single_fraction: float) -> Scene:
  if rng.random() < single_fraction:
    return _single(rng, side, *_attrs(rng))
  return _pair(rng, side, (_attrs(rng), _attrs(rng)), RELATIONS[rng.integers(len(RELATIONS))])


def sample_caption(rng: np.random.Generator, scene: Scene, omit_prob: float) -> Caption:
  """A true caption: either naming order, each size / colour word left out with omit_prob."""
  first, rel, second = describe(scene, converse=bool(rng.integers(2)))

  def thin(p: Phrase) -> Phrase:
    shape, color, size = p
    return (shape, None if rng.random() < omit_prob else color,
            None if rng.random() < omit_prob else size)

  return (thin(first), rel, thin(second) if second else None)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
  out = []
  for k in range(2 * points):
    r = 1.0 if k % 2 == 0 else inner
    t = math.pi * k / points - math.pi / 2
    out.append((r * math.cos(t), r * math.sin(t)))
  return out


def _heart(n: int = 40) -> list[tuple[float, float]]:
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  x = 16 * np.sin(t) ** 3
  y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
  x = x / np.abs(x).max()
  y = (y - y.min()) / (y.max() - y.min()) * 2 - 1
  return list(zip(x.tolist(), y.tolist()))


_W = 0.36  # half-width of the cross's arms
_POLYGONS = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "hexagon": [(math.cos(math.pi * k / 3), math.sin(math.pi * k / 3) * 0.95) for k in range(6)],
    "star": _star(),
    "cross": [(-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W), (_W, 1), (-_W, 1),
              (-_W, _W), (-1, _W), (-1, -_W), (-_W, -_W)],
    "heart": _heart(),
}


def render(scene: Scene, side: int, rng: np.random.Generator, supersample: int = 2) -> bytes:
  """PNG bytes of a scene; ``rng`` jitters the background and the colours."""
  s = supersample
  grey = int(rng.integers(95, 166))
  img = Image.new("RGB", (side * s, side * s), (grey, grey, grey))
  draw = ImageDraw.Draw(img)
  for obj in scene.objects:
    jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3).tolist()
    fill = tuple(min(255, max(0, c + j)) for c, j in zip(COLORS[obj.color], jitter))
    x0, y0, x1, y1 = (v * s for v in obj.box)
    if obj.shape == "circle":
      draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
      continue
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0 - 1) / 2, (y1 - y0 - 1) / 2
    draw.polygon([(cx + px * hw, cy + py * hh) for px, py in _POLYGONS[obj.shape]], fill=fill)
  if s > 1:
    img = img.reduce(s)
  buf = io.BytesIO()
  img.save(buf, "PNG", compress_level=1)  # flat images: level 1 is 2x faster, ~100 bytes more
  return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Training shards
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the output depends on (recorded in the manifests)."""
  num_train: int = 100_000
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
    a = _attrs(rng)
    b = _attrs(rng)
    if a[0] == b[0] or a[1] == b[1]:
      continue
    scene = _pair(rng, settings.image_size, (a, b), RELATIONS[rng.integers(len(RELATIONS))])
    desc = caption_text(describe(scene))
    if desc in seen:
      continue
    seen.add(desc)
    seen.add(caption_text(describe(scene, converse=True)))
    return scene, rng
  raise SyntheticSetError(f"no new eval pair description after 1000 tries at index {index}; "
                          f"num_eval={settings.num_eval} is too large for the grammar")


def _other(rng: np.random.Generator, values: Sequence[str], *exclude: str) -> str:
  choices = [v for v in values if v not in exclude]
  return choices[rng.integers(len(choices))]


def _with(phrase: Phrase, **change: Any) -> Phrase:
  shape, color, size = phrase
  d = {"shape": shape, "color": color, "size": size, **change}
  return (d["shape"], d["color"], d["size"])


def _candidate(subset: str, scene: Scene, rng: np.random.Generator
               ) -> tuple[Caption, Caption] | None:
  """One (positive, negative) caption pair of a subset for a scene, or None when the subset does
  not apply (e.g. swap_att with nothing to swap)."""
  if subset == "add_obj":
    if scene.relation is not None:
      return None
    obj = scene.objects[0]
    new = (_other(rng, SHAPES, obj.shape), COLOR_NAMES[rng.integers(len(COLOR_NAMES))],
           SIZES[rng.integers(len(SIZES))])
    rel = RELATIONS[rng.integers(len(RELATIONS))]
    pos = (full_phrase(obj), None, None)
    neg = (full_phrase(obj), rel, new) if rng.integers(2) else (new, rel, full_phrase(obj))
    return pos, neg
  if scene.relation is None:
    return None
  first, rel, second = describe(scene, converse=bool(rng.integers(2)))
  phrases = [first, second]
  objs = [o for p in phrases for o in scene.objects if full_phrase(o) == p]
  k = int(rng.integers(2))
  pos = (first, rel, second)
  if subset == "add_att":
    attr = ("color", "size")[rng.integers(2)]
    truth = getattr(objs[k], attr)
    wrong = _other(rng, COLOR_NAMES if attr == "color" else SIZES, truth)
    thin = list(phrases)
    thin[k] = _with(phrases[k], **{attr: None})
    added = list(phrases)
    added[k] = _with(phrases[k], **{attr: wrong})
    return (thin[0], rel, thin[1]), (added[0], rel, added[1])
  if subset == "replace_obj":
    swapped = list(phrases)
    swapped[k] = _with(phrases[k], shape=_other(rng, SHAPES, objs[k].shape))
    return pos, (swapped[0], rel, swapped[1])
  if subset == "replace_att":
    attr = ("color", "size")[rng.integers(2)]
    values = COLOR_NAMES if attr == "color" else SIZES
    changed = list(phrases)
    changed[k] = _with(phrases[k], **{attr: _other(rng, values, getattr(objs[k], attr))})
    return pos, (changed[0], rel, changed[1])
  if subset == "replace_rel":
    return pos, (first, _other(rng, RELATIONS, rel), second)
  if subset == "swap_obj":
    if first[0] == second[0]:
      return None
    return pos, (_with(first, shape=second[0]), rel, _with(second, shape=first[0]))
  if subset == "swap_att":
    attrs = [a for a, i in (("color", 1), ("size", 2)) if first[i] != second[i]]
    if not attrs:
      return None
    attr = attrs[rng.integers(len(attrs))]
    i = 1 if attr == "color" else 2
    return pos, (_with(first, **{attr: second[i]}), rel, _with(second, **{attr: first[i]}))
  raise ValueError(f"unknown subset {subset!r}")


def compositional_sample(subset: str, scene: Scene, rng: np.random.Generator
                         ) -> tuple[str, str] | None:
  """(positive, negative) caption texts whose truth is checked against the scene, or None."""
  for _ in range(100):
    pair = _candidate(subset, scene, rng)
    if pair is None:
      return None
    pos, neg = pair
    if holds(scene, pos) and not holds(scene, neg):
      return caption_text(pos), caption_text(neg)
  raise AssertionError(f"{subset}: no true positive / false negative pair for {scene}")


def _write_text(path: str, text: str) -> None:
  common.write_text_atomic(path, text)


def _eval_complete(folder: str, identity: dict[str, Any]) -> bool:
  path = os.path.join(folder, records.MANIFEST)
  if not os.path.exists(path):
    return False
  old = records.read_manifest(folder)
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
  if _eval_complete(folder, identity):
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
    scene = _single(rng, side, shape, color, SIZES[rng.integers(len(SIZES))])
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
  _write_text(os.path.join(folder, "classification", "labels.tsv"), "\n".join(labels) + "\n")
  _write_text(os.path.join(folder, "classification", "classnames.txt"),
              "\n".join(class_names()) + "\n")
  _write_text(os.path.join(folder, "classification", "templates.txt"),
              "\n".join(TEMPLATES) + "\n")
  files += ["classification/labels.tsv", "classification/classnames.txt",
            "classification/templates.txt"]
  counts["classification"] = {"images": len(singles), "classes": len(class_names()),
                              "templates": len(TEMPLATES)}

  rows = ["filename\tcaption_index\tcaption"]
  for name in pairs:
    for j, converse in enumerate((False, True)):
      rows.append(f"{name}\t{j}\t{caption_text(describe(scenes[name], converse))}")
  _write_text(os.path.join(folder, "retrieval", "captions.tsv"), "\n".join(rows) + "\n")
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


def generate(output_dir: str, num_train: int = 100_000, num_eval: int = 500,
             image_size: int = 64, seed: int = 0, num_shards: int | None = None,
             workers: int | None = None, single_fraction: float = 0.25, omit_prob: float = 0.1,
             supersample: int = 2, progress: bool = False) -> dict[str, Any]:
  """Generates (or completes, or finds complete) the synthetic set in ``output_dir``.

  Returns {"train": train manifest, "eval": eval manifest}. ``num_shards=None`` gives one shard
  per 10,000 pairs. The result does not depend on ``workers``.
  """
  if image_size < 16:
    raise SyntheticSetError(f"image_size={image_size}: at least 16 px are needed to draw two "
                            "objects; use --image_size=16 or more")
  settings = Settings(num_train=num_train, num_eval=num_eval, image_size=image_size, seed=seed,
                      single_fraction=single_fraction, omit_prob=omit_prob,
                      supersample=supersample)
  n = num_shards or max(1, math.ceil(num_train / shards.SAMPLES_PER_SHARD))
  train_dir = os.path.join(output_dir, "train")
  start = time.perf_counter()
  train = shards.build_shards(
      train_dir, shards.split_even(range(num_train), n),
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


FLAGS = flags.FlagValues()
flags.DEFINE_string("output", None, "output folder (train/ and eval/ inside)", flag_values=FLAGS)
flags.DEFINE_integer("num_train", 100_000, "training pairs", flag_values=FLAGS)
flags.DEFINE_integer("num_eval", 500, "eval two-object scenes and eval one-object scenes (each)",
                     flag_values=FLAGS)
flags.DEFINE_integer("image_size", 64, "image side in pixels", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of every random choice", flag_values=FLAGS)
flags.DEFINE_integer("num_shards", 0,
                     f"training shards (0: one per {shards.SAMPLES_PER_SHARD} pairs)",
                     flag_values=FLAGS)
flags.DEFINE_integer("workers", os.cpu_count() or 1,
                     "processes (the output does not depend on it)", flag_values=FLAGS)
flags.DEFINE_float("single_fraction", 0.25, "fraction of one-object training scenes",
                   flag_values=FLAGS)
flags.DEFINE_float("omit_prob", 0.1,
                   "chance that a training caption leaves out each size / colour word",
                   flag_values=FLAGS)
flags.DEFINE_integer("supersample", 2, "drawing supersampling factor", flag_values=FLAGS)
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
  return generate(FLAGS.output, num_train=FLAGS.num_train, num_eval=FLAGS.num_eval,
                  image_size=FLAGS.image_size, seed=FLAGS.seed,
                  num_shards=FLAGS.num_shards or None, workers=FLAGS.workers,
                  single_fraction=FLAGS.single_fraction, omit_prob=FLAGS.omit_prob,
                  supersample=FLAGS.supersample, progress=not FLAGS.no_progress)


if __name__ == "__main__":
  sys.exit(cli.run("python -m lift_jax.data.synthetic", main))
