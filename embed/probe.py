"""The encoder probe: text-only measures that predict how well LIFT can do with an encoder, in
minutes and before any image training.

  python -m embed.probe --config=embed/configs/minilm.py [--config.model=...] \
      [--data_root=../shared/data] [--output=probe.json]

LIFT trains the image tower to land on the frozen caption embeddings, so what the encoder cannot
tell apart in text, LIFT cannot tell apart in images. Three measures:

* caption-to-caption retrieval on COCO val2017 captions: the first caption of every image is a
  query, the other captions of all images form the gallery; R@1 / R@5 = a caption of the same
  image is among the k nearest (the check LLM2CLIP uses to compare text encoders);
* text-only SugarCrepe: for each item, another COCO caption of the same image is the anchor;
  correct iff cos(anchor, positive) > cos(anchor, negative), strictly; accuracy per category and
  their mean, plus the mean cos(positive, negative) per category (near 1 = the encoder barely
  separates a caption from its hard negative, and LIFT's image tower gets no signal there);
* cost: dimension, bytes per caption in each storage dtype, captions/s and tokens/s on the device.

The data are read where evaluation reads them (``config.evals.data_root`` layout of
``lift_jax/config_lib.py``: ``sugarcrepe/*.json``, ``coco/annotations/captions_val2017.json``),
through the same readers. The texts are embedded by the embedding job's own code (same encoder,
tokenisation, batching and normalisation as ``embed.main``). Writes JSON and prints a table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Sequence

import ml_collections
import numpy as np
import torch
from absl import app, flags
from ml_collections import config_flags

from embed import encoders as enc_lib
from embed import job
from embed.errors import EmbedError
from embed.inputs import Item, judge_text
from eval import texts as T
from eval.benchmarks import resolve_paths, sugarcrepe
from lift_jax import cli, config_lib
from lift_jax.data import records

KS = (1, 5)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def data_paths(data_root: str) -> dict[str, str]:
  """The SugarCrepe folder and COCO captions file under ``data_root``, as evaluation finds them."""
  c = ml_collections.ConfigDict({"evals": {"data_root": data_root, "benchmarks": {}}})
  config_lib.add_paper_benchmarks(c)
  c.evals.data_root = data_root
  resolved, _ = resolve_paths(c)
  bench = resolved.evals.benchmarks
  paths = {"sugarcrepe": bench["sugarcrepe"]["data_dir"], "coco": bench["coco"]["captions"]}
  for name, path in paths.items():
    if not os.path.exists(path):
      raise EmbedError(f"{path} not found: the probe reads {name} from --data_root={data_root} "
                       "(layout: sugarcrepe/*.json, coco/annotations/captions_val2017.json)")
  return paths


def load_data(data_root: str, limit_images: int | None = None,
              limit_sugarcrepe: int | None = None) -> tuple[dict[str, list[str]], dict]:
  """({COCO file name: [captions]}, {SugarCrepe subset: [(file name, positive, negative)]})."""
  paths = data_paths(data_root)
  coco = T.read_captions(paths["coco"])
  spec = sugarcrepe.Spec("sugarcrepe", data_dir=paths["sugarcrepe"], limit=limit_sugarcrepe)
  rows = spec.rows()
  if limit_images:
    keep = dict(list(coco.items())[:limit_images])
    for subset in rows.values():  # the anchors' images stay available
      keep.update({f: coco[f] for f, _, _ in subset if f in coco})
    coco = keep
  return coco, rows


# --------------------------------------------------------------------------------------------
# Measures (vectors are L2-normalised rows; text -> row through `index`)
# --------------------------------------------------------------------------------------------


def caption_retrieval(image_captions: dict[str, list[str]], index: dict[str, int],
                      vectors: np.ndarray, ks: Sequence[int] = KS,
                      limit_images: int | None = None) -> dict[str, Any]:
  """First caption of each image (with at least two) against every other caption of all images."""
  images = [(f, caps) for f, caps in image_captions.items() if len(caps) >= 2]
  if limit_images:
    images = images[:limit_images]
  queries, gallery, owner = [], [], []
  for n, (_, caps) in enumerate(images):
    queries.append(index[caps[0]])
    for c in caps[1:]:
      gallery.append(index[c])
      owner.append(n)
  if not queries:
    raise EmbedError("caption retrieval needs images with at least two captions; none found")
  owner = np.asarray(owner)
  g = vectors[gallery]
  hits = {k: 0 for k in ks}
  for start in range(0, len(queries), 1024):
    sims = vectors[queries[start:start + 1024]] @ g.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :max(ks)]
    same = owner[top] == np.arange(start, start + len(top))[:, None]
    for k in ks:
      hits[k] += int(same[:, :k].any(axis=1).sum())
  out = {"queries": len(queries), "gallery": len(gallery)}
  out.update({f"r{k}": hits[k] / len(queries) for k in ks})
  return out


def anchor_caption(captions: Sequence[str], positive: str) -> str | None:
  """The first caption of the image that is not the positive itself."""
  for c in captions:
    if c.strip() != positive.strip():
      return c
  return None


def sugarcrepe_text(rows: dict[str, list[tuple[str, str, str]]],
                    image_captions: dict[str, list[str]], index: dict[str, int],
                    vectors: np.ndarray) -> dict[str, Any]:
  per, skipped = {}, 0
  for subset, items in rows.items():
    correct, cos_pn, n = 0, [], 0
    for filename, pos, neg in items:
      anchor = anchor_caption(image_captions.get(filename, []), pos)
      if anchor is None:
        skipped += 1
        continue
      a, p, q = vectors[index[anchor]], vectors[index[pos]], vectors[index[neg]]
      correct += int(float(a @ p) > float(a @ q))
      cos_pn.append(float(p @ q))
      n += 1
    per[subset] = {"n": n, "accuracy": correct / n if n else None,
                   "mean_cos_pos_neg": float(np.mean(cos_pn)) if cos_pn else None}
  scored = [v["accuracy"] for v in per.values() if v["accuracy"] is not None]
  return {"per_category": per, "mean_accuracy": float(np.mean(scored)) if scored else None,
          "skipped_no_anchor": skipped}


def bytes_per_caption(dim: int) -> dict[str, int]:
  """Stored bytes of one vector in each storage dtype (int8 adds its float scale)."""
  out = {}
  for dtype in records.STORAGE_DTYPES:
    data, scale = records.quantize(np.ones(dim, np.float32), dtype)
    out[dtype] = len(data) + (8 if scale is not None else 0)
  return out


# --------------------------------------------------------------------------------------------
# Running an encoder over the texts
# --------------------------------------------------------------------------------------------


def embed_texts(cfg, texts: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
  """L2-normalised vectors of ``texts`` (in order) and the cost of computing them."""
  if cfg.threads:
    torch.set_num_threads(cfg.threads)
  device = enc_lib.resolve_device(cfg.device, 0)
  dtype = enc_lib.resolve_dtype(cfg.dtype, device)
  ref = enc_lib.resolve_model(cfg.model)
  kind = cfg.encoder or ref.default_encoder
  if not kind:
    raise EmbedError(f"config.encoder is empty and {cfg.model} has no known encoder")
  start = time.perf_counter()
  encoder = enc_lib.build_encoder(kind, ref, cfg.revision, dtype, device, cfg.instruction,
                                  cfg.max_length, cfg.append_eos, cfg.padding_side,
                                  cfg.trust_remote_code, random_init=cfg.random_init)
  load_seconds = time.perf_counter() - start
  items = [Item(str(i), *judge_text(t)) for i, t in enumerate(texts)]
  start = time.perf_counter()
  result = job.embed_items(encoder, items, cfg, "probe texts")
  if device.type == "cuda":
    torch.cuda.synchronize(device)
  seconds = time.perf_counter() - start
  v = result.vectors
  v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
  live = len(texts) - sum(1 for f in result.flags if f)
  cost = {
      "model": ref.name, "label": enc_lib.model_label(ref), "encoder": kind,
      "pooling": enc_lib.architecture(kind).pooling,
      "dim": int(encoder.dim), "device": str(device), "dtype": dtype,
      "max_length": cfg.max_length, "instruction": cfg.instruction,
      "random_init": bool(cfg.random_init), "load_seconds": round(load_seconds, 2),
      "texts": live, "seconds": round(seconds, 3), "truncated": result.truncated,
      "captions_per_second": live / seconds if seconds else None,
      "tokens_per_second": result.stats.tokens / seconds if seconds else None,
      "tokens_per_caption": result.stats.tokens / live if live else None,
      "padding_waste": result.stats.waste, "flagged": len(texts) - live,
      "bytes_per_caption": bytes_per_caption(int(encoder.dim)),
  }
  return v, cost


def run(cfg, data_root: str, limit_images: int | None = None,
        limit_sugarcrepe: int | None = None) -> dict[str, Any]:
  coco, rows = load_data(data_root, limit_images, limit_sugarcrepe)
  needed = [c for caps in coco.values() for c in caps]
  for items in rows.values():
    for filename, pos, neg in items:
      anchor = anchor_caption(coco.get(filename, []), pos)
      needed += [pos, neg] + ([anchor] if anchor else [])
  texts = T.unique(needed)
  vectors, cost = embed_texts(cfg, texts)
  index = {t: i for i, t in enumerate(texts)}
  return {
      "data_root": os.path.abspath(data_root),
      "limit_images": limit_images, "limit_sugarcrepe": limit_sugarcrepe,
      "caption_retrieval": caption_retrieval(coco, index, vectors, limit_images=limit_images),
      "sugarcrepe_text": sugarcrepe_text(rows, coco, index, vectors),
      "cost": cost,
  }


def table(report: dict[str, Any]) -> str:
  """The probe's results as a Markdown table (percentages)."""
  cost, ret, sc = report["cost"], report["caption_retrieval"], report["sugarcrepe_text"]
  pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
  label = cost.get("label", cost["model"])
  lines = [f"encoder probe: {label} ({cost['encoder']}, {cost['dim']}-d, "
           f"max_length {cost['max_length']}) on {cost['device']} ({cost['dtype']})", "",
           "| measure | value |", "|---|---|",
           f"| COCO caption->caption R@1 ({ret['queries']} queries, {ret['gallery']} gallery) | "
           f"{pct(ret['r1'])} |",
           f"| COCO caption->caption R@5 | {pct(ret['r5'])} |"]
  for subset, v in sc["per_category"].items():
    cos = "-" if v["mean_cos_pos_neg"] is None else f"{v['mean_cos_pos_neg']:.3f}"
    lines.append(f"| SugarCrepe text-only {subset} (n={v['n']}; mean cos(pos, neg) {cos}) | "
                 f"{pct(v['accuracy'])} |")
  lines.append(f"| SugarCrepe text-only mean of categories | {pct(sc['mean_accuracy'])} |")
  sizes = ", ".join(f"{k} {v}" for k, v in cost["bytes_per_caption"].items())
  lines += [f"| bytes per caption | {sizes} |",
            f"| captions/s, tokens/s ({cost['texts']} texts, padding {cost['padding_waste']:.1%}) "
            f"| {cost['captions_per_second']:.1f}, {cost['tokens_per_second']:.0f} |"]
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _default_data_root() -> str:
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.environ.get("LIFT_SHARED_DATA", os.path.join(os.path.dirname(here), "shared", "data"))


def _define_flags() -> None:
  """Defined only when run as a command, so that importing this module defines no flags."""
  config_flags.DEFINE_config_file("config", None, "an embed/configs/*.py file", lock_config=True)
  flags.DEFINE_string("data_root", None, "folder with sugarcrepe/ and coco/annotations/ "
                      "(default: $LIFT_SHARED_DATA or ../shared/data)")
  flags.DEFINE_string("output", "probe.json", "where the JSON report goes")
  flags.DEFINE_integer("limit_images", None, "use the first N COCO images for retrieval")
  flags.DEFINE_integer("limit_sugarcrepe", None, "use the first N items of each SugarCrepe file")


COMMAND = "python -m embed.probe"


def command(argv) -> int:
  FLAGS = flags.FLAGS  # noqa: N806
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.FIELD=VALUE")
  if FLAGS.config is None:
    raise cli.UsageError("--config=embed/configs/<model>.py is required, e.g. "
                         "--config=embed/configs/minilm.py")
  report = run(FLAGS.config, FLAGS.data_root or _default_data_root(), FLAGS.limit_images,
               FLAGS.limit_sugarcrepe)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
  with open(FLAGS.output, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  print(table(report))
  print(f"\nwrote {FLAGS.output}", file=sys.stderr)
  return 0


def main(argv) -> int:
  return cli.run(COMMAND, command, argv)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.flags_parser(COMMAND))
