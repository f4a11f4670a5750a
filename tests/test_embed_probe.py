"""The encoder probe: its measures on hand-made vectors, and on real data (a small subset of the
COCO captions and SugarCrepe in ../shared/data) against the same measures recomputed here by
brute force from sentence-transformers' own MiniLM embeddings."""

import numpy as np
import pytest

from conftest import shared_data
from embed import encoders as enc_lib
from embed import probe
from embed.errors import EmbedError
from test_embed_support import minilm_config


def unit(*rows):
  v = np.array(rows, dtype=np.float32)
  return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_caption_retrieval_by_hand():
  caps = {"a.jpg": ["a0", "a1"], "b.jpg": ["b0", "b1", "b2"], "c.jpg": ["c0", "c1"],
          "lonely.jpg": ["x"]}  # one caption: neither a query nor in the gallery
  texts = ["a0", "a1", "b0", "b1", "b2", "c0", "c1", "x"]
  index = {t: i for i, t in enumerate(texts)}
  vectors = unit([1, 0], [1, 0.02],  # a0: a1 (cos .9998) beats b1 (.9988): hit at 1
                 [0, 1], [1, 0.05], [0.2, 1],  # b0: b2 (.98) beats c1 (.71): hit at 1
                 [1, 0.01], [-1, 1],  # c0: a1, b1, b2 come first, c1 (-.70) last: miss
                 [1, 1])
  got = probe.caption_retrieval(caps, index, vectors, ks=(1, 2))
  # By hand: gallery = a1, b1, b2, c1; a0 and b0 hit at rank 1, c0 misses even at rank 2.
  assert got == {"queries": 3, "gallery": 4, "r1": 2 / 3, "r2": 2 / 3}


def test_sugarcrepe_text_by_hand():
  caps = {"i.jpg": ["pos one", "anchor one"], "j.jpg": ["pos two", "anchor two"],
          "k.jpg": ["pos three"]}  # no other caption: skipped and counted
  rows = {"swap_att": [("i.jpg", "pos one", "neg one"), ("j.jpg", "pos two", "neg two"),
                       ("k.jpg", "pos three", "neg three")]}
  texts = ["pos one", "anchor one", "neg one", "pos two", "anchor two", "neg two", "pos three",
           "neg three"]
  index = {t: i for i, t in enumerate(texts)}
  vectors = unit([1, 0], [1, 0.1], [0, 1],  # anchor nearer the positive: correct
                 [1, 0], [0, 1], [0.6, 0.8],  # anchor nearer the negative: wrong
                 [1, 0], [0, 1])
  got = probe.sugarcrepe_text(rows, caps, index, vectors)
  cat = got["per_category"]["swap_att"]
  assert cat["n"] == 2 and cat["accuracy"] == 0.5 and got["skipped_no_anchor"] == 1
  assert cat["mean_cos_pos_neg"] == pytest.approx((0.0 + 0.6) / 2, abs=1e-6)
  assert probe.anchor_caption(["same ", "other"], "same") == "other"


def test_bytes_per_caption():
  assert probe.bytes_per_caption(4096) == {"float16": 8192, "bfloat16": 8192, "float32": 16384,
                                           "int8": 4096 + 8}


def test_probe_on_real_data_matches_sentence_transformers(minilm_path):
  from sentence_transformers import SentenceTransformer

  root = shared_data()
  shared_data("sugarcrepe", "add_obj.json")
  cfg = minilm_config(minilm_path, progress=False)
  report = probe.run(cfg, root, limit_images=30, limit_sugarcrepe=5)
  coco, rows = probe.load_data(root, 30, 5)

  st = SentenceTransformer(minilm_path, device="cpu")
  texts = sorted({c for caps in coco.values() for c in caps}
                 | {t for items in rows.values() for _, p, n in items for t in (p, n)})
  table = dict(zip(texts, st.encode(texts, batch_size=64, normalize_embeddings=True)))
  vec = table.__getitem__

  # Retrieval by brute force over the first 40 images of the captions file.
  images = [caps for caps in coco.values() if len(caps) >= 2][:30]
  gallery = [(n, c) for n, caps in enumerate(images) for c in caps[1:]]
  hits1 = hits5 = 0
  for n, caps in enumerate(images):
    q = vec(caps[0])
    ranked = sorted(gallery, key=lambda g: -float(q @ vec(g[1])))
    hits1 += ranked[0][0] == n
    hits5 += any(g[0] == n for g in ranked[:5])
  ret = report["caption_retrieval"]
  assert ret["queries"] == 30 and ret["gallery"] == len(gallery)
  assert ret["r1"] == hits1 / 30 and ret["r5"] == hits5 / 30
  assert 0.3 < ret["r1"] < 1.0  # MiniLM does find same-image captions; not all of them

  for subset, items in rows.items():
    right, cos = 0, []
    for filename, pos, neg in items:
      anchor = next(c for c in coco[filename] if c.strip() != pos.strip())
      right += float(vec(anchor) @ vec(pos)) > float(vec(anchor) @ vec(neg))
      cos.append(float(vec(pos) @ vec(neg)))
    got = report["sugarcrepe_text"]["per_category"][subset]
    assert got["n"] == len(items) == 5
    assert got["accuracy"] == right / 5, subset
    assert got["mean_cos_pos_neg"] == pytest.approx(np.mean(cos), abs=1e-5)
  cost = report["cost"]
  assert cost["dim"] == 384 and cost["texts"] > 150 and cost["captions_per_second"] > 0
  header = probe.table(report).splitlines()[0]
  assert "swap_att" in probe.table(report)
  # The header names the model (its model card's title), not the folder it was installed in.
  assert header.startswith("encoder probe: all-MiniLM-L6-v2 (mean, 384-d"), header
  assert "site-packages" not in header and cost["model"].endswith("model")


def test_model_labels(tmp_path):
  """A hub id as given; a hub cache snapshot as its model; a folder by its card's title, or by
  its last two path parts without one."""
  assert enc_lib.model_label(enc_lib.resolve_model("Qwen/Qwen3-Embedding-0.6B")) == \
      "Qwen/Qwen3-Embedding-0.6B"
  snap = tmp_path / "models--nvidia--NV-Embed-v2" / "snapshots" / ("a" * 40)
  snap.mkdir(parents=True)
  assert enc_lib.model_label(enc_lib.resolve_model(str(snap))) == "nvidia/NV-Embed-v2"
  card = tmp_path / "runs" / "my-encoder"
  card.mkdir(parents=True)
  assert enc_lib.model_label(enc_lib.resolve_model(str(card))) == "runs/my-encoder"
  (card / "README.md").write_text("---\ntags: [x]\n---\n\n# My Encoder v3\n\ntext\n")
  assert enc_lib.model_label(enc_lib.resolve_model(str(card))) == "My Encoder v3"


def test_missing_data_is_named(tmp_path):
  with pytest.raises(EmbedError, match=f"{tmp_path}/sugarcrepe not found"):
    probe.data_paths(str(tmp_path))
