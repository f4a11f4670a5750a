"""Plain numpy versions of every metric in :mod:`eval.metrics`, written the slow, obvious way.

The tests check the jnp metrics against these on random inputs. They share no code with the jnp
versions: ranks come from sorting each query's candidates (negatives before positives among equal
scores, NaN first), class embeddings from a loop over classes.
"""

from __future__ import annotations

import math

import numpy as np


def pair_accuracy(image_emb, text_emb, image_idx, pos_idx, neg_idx, mask=None) -> float:
  correct = total = 0
  for n in range(len(image_idx)):
    if mask is not None and not mask[n]:
      continue
    img = np.asarray(image_emb[image_idx[n]], np.float64)
    s_pos = float(np.dot(img, np.asarray(text_emb[pos_idx[n]], np.float64)))
    s_neg = float(np.dot(img, np.asarray(text_emb[neg_idx[n]], np.float64)))
    correct += int(s_pos > s_neg)  # NaN compares False: wrong
    total += 1
  return correct / total if total else math.nan


def class_embeddings(prompt_emb, prompt_mask=None) -> np.ndarray:
  prompt_emb = np.asarray(prompt_emb, np.float64)
  out = []
  for c in range(prompt_emb.shape[0]):
    acc = np.zeros(prompt_emb.shape[2])
    count = 0
    for t in range(prompt_emb.shape[1]):
      if prompt_mask is not None and not prompt_mask[c][t]:
        continue
      v = prompt_emb[c, t]
      acc += v / max(np.sqrt(np.sum(v * v)), 1e-12)
      count += 1
    mean = acc / max(count, 1)
    out.append(mean / max(np.sqrt(np.sum(mean * mean)), 1e-12))
  return np.stack(out).astype(np.float32)


def ranks(queries, candidates, positives, query_mask=None, candidate_mask=None) -> np.ndarray:
  queries = np.asarray(queries, np.float32)
  candidates = np.asarray(candidates, np.float32)
  n_cand = len(candidates)
  out = []
  for i, q in enumerate(queries):
    pos = {int(p) for p in np.atleast_1d(positives[i]) if p >= 0}
    valid = [j for j in range(n_cand) if candidate_mask is None or candidate_mask[j]]
    pos &= set(valid)
    scores = candidates @ q
    if (query_mask is not None and not query_mask[i]) or not pos or any(
        np.isnan(scores[j]) for j in pos):
      out.append(n_cand)
      continue

    def order_key(j):
      s = scores[j]
      # NaN first; then higher score first; among equal scores negatives before positives.
      return (0 if np.isnan(s) else 1, 0.0 if np.isnan(s) else -float(s), j in pos)

    ordered = sorted(valid, key=order_key)
    out.append(next(n for n, j in enumerate(ordered) if j in pos))
  return np.asarray(out, np.int64)


def recall_at_k(rank, ks, mask=None) -> dict[int, float]:
  out = {}
  for k in ks:
    hits = [r < k for n, r in enumerate(rank) if mask is None or mask[n]]
    out[int(k)] = sum(hits) / len(hits) if hits else math.nan
  return out
