"""Evaluation metrics in jnp: pair accuracy, prompt-ensembled classifiers, ranks and recall@k.

All inputs are embeddings as the model gives them (L2-normalised, float32); similarity is the dot
product, computed at ``Precision.HIGHEST`` so that GPUs do not round float32 through TF32.

Ties and the rank rule
----------------------
Every ranking metric here uses one rule, the pessimistic one: the rank of a query's answer is the
number of *negative* candidates whose score is greater than **or equal to** the best positive's
score; top-k counts a hit iff that rank < k. A tie therefore never counts for the model: a hit
means the true item is inside the top k however the ties are broken. This is SugarCrepe's strict
``sim(caption) > sim(negative)`` applied to rankings (with one negative the two rules coincide),
and it keeps a collapsed model, whose scores all tie, at zero instead of at 100%. NaN scores count
against the model the same way: a NaN negative beats the positive, a NaN positive loses to all.

Which candidates are positives is the caller's choice (``positives``: candidate indices per query,
-1 for padding). The evaluators make textually identical candidates positives together, so a tie
between two copies of the same text is not a miss (see :mod:`eval.evaluators`).

Memory: ``ranks`` scores the queries in chunks against the whole candidate matrix, so that only a
``chunk x num_candidates`` block of scores exists at a time (``max_scores`` elements); 25k COCO
captions x 5k images never materialise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lift_jax.losses import l2_normalize

HIGHEST = jax.lax.Precision.HIGHEST
MAX_SCORES = 1 << 25  # elements of one query-chunk x candidates score block (128 MiB float32)


# --------------------------------------------------------------------------------------------
# SugarCrepe: one positive and one negative text per image
# --------------------------------------------------------------------------------------------


def pair_correct(image_emb, text_emb, image_idx, pos_idx, neg_idx):
  """bool [N]: sample n is correct iff sim(image, positive) > sim(image, negative), strictly.

  ``image_emb`` [I, D] and ``text_emb`` [T, D] are tables; the index vectors [N] pick the image,
  positive and negative text of each sample. Both similarities come from the same reduction, so
  identical texts tie exactly (and a tie is wrong); NaN is wrong too.
  """
  img = jnp.take(image_emb, image_idx, axis=0)
  s_pos = jnp.einsum("nd,nd->n", img, jnp.take(text_emb, pos_idx, axis=0), precision=HIGHEST)
  s_neg = jnp.einsum("nd,nd->n", img, jnp.take(text_emb, neg_idx, axis=0), precision=HIGHEST)
  return s_pos > s_neg


# jit by assignment rather than as a decorator, here and below: mutmut (scripts/mutation.sh)
# leaves decorated functions alone, and these three are the heart of every metric.
pair_correct = jax.jit(pair_correct)


def masked_mean(values, mask=None) -> float:
  """Mean of ``values`` over ``mask`` (all when None) as a Python float; NaN when empty.

  The sum is taken in jnp; the division in float64, so that 1/1000 reads 0.001.
  """
  values = jnp.asarray(values, jnp.float32)
  mask = jnp.ones(values.shape, bool) if mask is None else jnp.asarray(mask, bool)
  n = int(jnp.sum(mask))
  total = float(jnp.sum(jnp.where(mask, values, 0.0)))
  return total / n if n else float("nan")


def pair_accuracy(image_emb, text_emb, image_idx, pos_idx, neg_idx, mask=None) -> float:
  """Fraction of (unmasked) samples with sim(image, positive) > sim(image, negative)."""
  correct = pair_correct(jnp.asarray(image_emb, jnp.float32), jnp.asarray(text_emb, jnp.float32),
                         jnp.asarray(image_idx, jnp.int32), jnp.asarray(pos_idx, jnp.int32),
                         jnp.asarray(neg_idx, jnp.int32))
  return masked_mean(correct, mask)


# --------------------------------------------------------------------------------------------
# Zero-shot classifier: per-class prompt ensembling
# --------------------------------------------------------------------------------------------


def class_embeddings(prompt_emb, prompt_mask=None):
  """[C, T, D] prompt embeddings (+ [C, T] validity) -> [C, D] class embeddings.

  Each prompt embedding is L2-normalised and the valid ones of a class are averaged; the mean is
  normalised again (OpenAI's prompt ensembling; with one template it is just that prompt). Only
  its direction counts, so the sum stands for the mean.
  """
  z = l2_normalize(prompt_emb)
  if prompt_mask is None:
    prompt_mask = jnp.ones(z.shape[:2], bool)
  w = jnp.asarray(prompt_mask, jnp.float32)[..., None]
  return l2_normalize(jnp.sum(z * w, axis=1))


class_embeddings = jax.jit(class_embeddings)


# --------------------------------------------------------------------------------------------
# Ranks and recall@k
# --------------------------------------------------------------------------------------------


def _ranks(queries, candidates, positives, query_mask, candidate_mask, *, chunk: int):
  n_cand = candidates.shape[0]
  n_chunks = queries.shape[0] // chunk

  def one_chunk(args):
    q, pos, qmask = args  # [Q, D], [Q, P], [Q]
    scores = jnp.matmul(q, candidates.T, precision=HIGHEST)  # [Q, Nc]
    rows = jnp.broadcast_to(jnp.arange(chunk)[:, None], pos.shape)
    cols = jnp.where(pos < 0, n_cand, pos)  # padding (-1) points past the end and is dropped
    is_pos = jnp.zeros(scores.shape, bool).at[rows, cols].set(True, mode="drop")
    is_pos &= candidate_mask[None, :]
    has_pos = jnp.any(is_pos, axis=1)
    best = jnp.max(jnp.where(is_pos, scores, -jnp.inf), axis=1)
    best = jnp.where(jnp.any(is_pos & jnp.isnan(scores), axis=1), jnp.nan, best)
    beats = (scores >= best[:, None]) | jnp.isnan(scores)
    beats &= ~is_pos & candidate_mask[None, :]
    rank = jnp.sum(beats, axis=1, dtype=jnp.int32)
    usable = has_pos & ~jnp.isnan(best) & qmask
    return jnp.where(usable, rank, n_cand)

  out = jax.lax.map(one_chunk, (queries.reshape(n_chunks, chunk, -1),
                                positives.reshape(n_chunks, chunk, -1),
                                query_mask.reshape(n_chunks, chunk)))
  return out.reshape(-1)


_ranks = jax.jit(_ranks, static_argnames=("chunk",))


def ranks(queries, candidates, positives, *, query_mask=None, candidate_mask=None,
          max_scores: int = MAX_SCORES) -> jax.Array:
  """int32 [Nq]: for each query, how many valid negative candidates score >= its best positive.

  ``queries`` [Nq, D], ``candidates`` [Nc, D]; ``positives`` [Nq, P] candidate indices (-1 pads);
  a candidate listed as a positive is never counted as a negative. Masked candidates take no part;
  a masked query, or one without a valid positive or with a NaN positive score, gets rank ``Nc``
  (never a hit).
  """
  queries = np.asarray(queries, np.float32)
  candidates = np.asarray(candidates, np.float32)
  positives = np.asarray(positives, np.int32)
  if positives.ndim == 1:
    positives = positives[:, None]
  nq, nc = queries.shape[0], candidates.shape[0]
  if positives.shape[0] != nq:
    raise ValueError(f"positives has {positives.shape[0]} rows for {nq} queries")
  if positives.size and positives.max() >= nc:
    raise ValueError(f"a positive index {positives.max()} is outside the {nc} candidates")
  query_mask = np.ones(nq, bool) if query_mask is None else np.asarray(query_mask, bool)
  candidate_mask = (np.ones(nc, bool) if candidate_mask is None
                    else np.asarray(candidate_mask, bool))
  if nq == 0:
    return jnp.zeros((0,), jnp.int32)
  chunk = int(max(1, min(nq, max_scores // max(nc, 1))))
  padded = -(-nq // chunk) * chunk
  pad = padded - nq
  if pad:  # the last chunk is padded with masked queries
    queries = np.concatenate([queries, np.zeros((pad, queries.shape[1]), np.float32)])
    positives = np.concatenate([positives, np.full((pad, positives.shape[1]), -1, np.int32)])
    query_mask = np.concatenate([query_mask, np.zeros(pad, bool)])
  if positives.shape[1] == 0:
    positives = np.full((padded, 1), -1, np.int32)
  out = _ranks(jnp.asarray(queries), jnp.asarray(candidates), jnp.asarray(positives),
               jnp.asarray(query_mask), jnp.asarray(candidate_mask), chunk=chunk)
  return out[:nq]


def recall_at_k(rank, ks, mask=None) -> dict[int, float]:
  """{k: fraction of (unmasked) queries with rank < k} (top-k accuracy for classification)."""
  rank = jnp.asarray(rank)
  return {int(k): masked_mean(rank < k, mask) for k in ks}


def padded_positives(groups: list[list[int]]) -> np.ndarray:
  """Ragged lists of candidate indices -> int32 [len(groups), max_len] padded with -1."""
  width = max([len(g) for g in groups] + [1])
  out = np.full((len(groups), width), -1, np.int32)
  for i, g in enumerate(groups):
    out[i, :len(g)] = g
  return out
