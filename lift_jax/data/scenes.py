"""The synthetic compositional world: scenes of coloured shapes, the caption grammar, what a
caption means for a scene, drawing, and the SugarCrepe-style caption pairs of each subset.
:mod:`lift_jax.data.synthetic` writes data sets from it.

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
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

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


def single_scene(rng: np.random.Generator, side: int, shape: str, color: str, size: str) -> Scene:
  e = _extent(rng, size, side)
  m = _MARGIN * side
  x0 = rng.uniform(m, side - m - e)
  y0 = rng.uniform(m, side - m - e)
  return Scene((Obj(shape, color, size, (x0, y0, x0 + e, y0 + e)),), None)


def pair_scene(rng: np.random.Generator, side: int, attrs: Sequence[tuple[str, str, str]],
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


def random_attrs(rng: np.random.Generator) -> tuple[str, str, str]:
  return (SHAPES[rng.integers(len(SHAPES))], COLOR_NAMES[rng.integers(len(COLOR_NAMES))],
          SIZES[rng.integers(len(SIZES))])


def sample_scene(rng: np.random.Generator, side: int, single_fraction: float) -> Scene:
  if rng.random() < single_fraction:
    return single_scene(rng, side, *random_attrs(rng))
  return pair_scene(rng, side, (random_attrs(rng), random_attrs(rng)),
                    RELATIONS[rng.integers(len(RELATIONS))])


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
# Compositional caption pairs (SugarCrepe's subsets)
# --------------------------------------------------------------------------------------------


def other(rng: np.random.Generator, values: Sequence[str], *exclude: str) -> str:
  choices = [v for v in values if v not in exclude]
  return choices[rng.integers(len(choices))]


def with_(phrase: Phrase, **change: Any) -> Phrase:
  shape, color, size = phrase
  d = {"shape": shape, "color": color, "size": size, **change}
  return (d["shape"], d["color"], d["size"])


def candidate(subset: str, scene: Scene, rng: np.random.Generator
               ) -> tuple[Caption, Caption] | None:
  """One (positive, negative) caption pair of a subset for a scene, or None when the subset does
  not apply (e.g. swap_att with nothing to swap)."""
  if subset == "add_obj":
    if scene.relation is not None:
      return None
    obj = scene.objects[0]
    new = (other(rng, SHAPES, obj.shape), COLOR_NAMES[rng.integers(len(COLOR_NAMES))],
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
    wrong = other(rng, COLOR_NAMES if attr == "color" else SIZES, truth)
    thin = list(phrases)
    thin[k] = with_(phrases[k], **{attr: None})
    added = list(phrases)
    added[k] = with_(phrases[k], **{attr: wrong})
    return (thin[0], rel, thin[1]), (added[0], rel, added[1])
  if subset == "replace_obj":
    swapped = list(phrases)
    swapped[k] = with_(phrases[k], shape=other(rng, SHAPES, objs[k].shape))
    return pos, (swapped[0], rel, swapped[1])
  if subset == "replace_att":
    attr = ("color", "size")[rng.integers(2)]
    values = COLOR_NAMES if attr == "color" else SIZES
    changed = list(phrases)
    changed[k] = with_(phrases[k], **{attr: other(rng, values, getattr(objs[k], attr))})
    return pos, (changed[0], rel, changed[1])
  if subset == "replace_rel":
    return pos, (first, other(rng, RELATIONS, rel), second)
  if subset == "swap_obj":
    if first[0] == second[0]:
      return None
    return pos, (with_(first, shape=second[0]), rel, with_(second, shape=first[0]))
  if subset == "swap_att":
    attrs = [a for a, i in (("color", 1), ("size", 2)) if first[i] != second[i]]
    if not attrs:
      return None
    attr = attrs[rng.integers(len(attrs))]
    i = 1 if attr == "color" else 2
    return pos, (with_(first, **{attr: second[i]}), rel, with_(second, **{attr: first[i]}))
  raise KeyError(f"unknown subset {subset!r}")


def compositional_sample(subset: str, scene: Scene, rng: np.random.Generator
                         ) -> tuple[str, str] | None:
  """(positive, negative) caption texts whose truth is checked against the scene, or None."""
  for _ in range(100):
    pair = candidate(subset, scene, rng)
    if pair is None:
      return None
    pos, neg = pair
    if holds(scene, pos) and not holds(scene, neg):
      return caption_text(pos), caption_text(neg)
  raise RuntimeError(f"{subset}: no true positive / false negative pair for {scene} (a bug "
                     "of the grammar)")
