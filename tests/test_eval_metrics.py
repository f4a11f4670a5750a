"""The jnp metrics: known answers (ties, several positives, masks, NaN) and agreement with the
independent numpy implementation in eval/reference.py on random inputs."""

import math

import jax
import numpy as np
import pytest

from conftest import dot_precisions
from eval import metrics, reference


# ------------------------------------------------------------------ known answers


def test_pair_accuracy_known_answers_strict_ties_nan_and_mask():
  image = np.array([[1, 0], [0, 1]], np.float32)
  text = np.array([[1, 0], [0, 1], [0.6, 0.8], [1, 0], [np.nan, 0]], np.float32)
  # (image, positive, negative): right, wrong, tie (identical texts), wrong, right, NaN
  img = [0, 0, 0, 1, 1, 0]
  pos = [0, 1, 0, 2, 1, 4]
  neg = [1, 0, 3, 1, 2, 1]
  correct = np.asarray(metrics.pair_correct(image, text, np.array(img), np.array(pos),
                                            np.array(neg)))
  assert correct.tolist() == [True, False, False, False, True, False]
  assert metrics.pair_accuracy(image, text, img, pos, neg) == pytest.approx(2 / 6)
  mask = np.array([1, 0, 1, 1, 1, 0], bool)
  assert metrics.pair_accuracy(image, text, img, pos, neg, mask) == pytest.approx(2 / 4)
  assert reference.pair_accuracy(image, text, img, pos, neg, mask) == pytest.approx(2 / 4)


def test_class_embeddings_known_answer():
  prompts = np.array([[[2, 0], [0, 3]], [[0, -1], [5, 5]]], np.float32)  # [C=2, T=2, D=2]
  out = np.asarray(metrics.class_embeddings(prompts))
  np.testing.assert_allclose(out[0], [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
  # class 1: mean of (0, -1) and (0.707, 0.707), normalised
  m = np.array([2 ** -0.5, -1 + 2 ** -0.5])
  np.testing.assert_allclose(out[1], m / np.linalg.norm(m), rtol=1e-6)
  masked = np.asarray(metrics.class_embeddings(prompts, np.array([[1, 0], [0, 1]], bool)))
  np.testing.assert_allclose(masked, [[1, 0], [2 ** -0.5, 2 ** -0.5]], rtol=1e-6)


CANDIDATES = np.array([[1, 0], [1, 0], [0, 1], [0.5, 0.5]], np.float32)  # scores for q=(1,0):
Q = np.array([[1, 0]], np.float32)                                        # 1, 1, 0, 0.5


@pytest.mark.parametrize("positives,mask,expected", [
    ([0], None, 1),          # c1 ties the positive: it counts against (pessimistic rule)
    ([1], None, 1),
    ([0, 1], None, 0),       # both tied items are positives: a hit
    ([2], None, 3),          # everything >= 0 beats it
    ([3], None, 2),
    ([0], [1, 0, 1, 1], 0),  # the tying candidate masked out
    ([2], [1, 1, 0, 1], 4),  # a masked positive: no usable positive -> rank = Nc
    ([], None, 4),           # no positive at all -> never a hit
])
def test_ranks_known_answers(positives, mask, expected):
  pos = np.array([positives + [-1]], np.int32)
  r = metrics.ranks(Q, CANDIDATES, pos, candidate_mask=mask)
  assert int(r[0]) == expected
  assert int(reference.ranks(Q, CANDIDATES, pos, candidate_mask=mask)[0]) == expected


def test_ranks_of_no_queries_and_of_queries_without_positives():
  empty = metrics.ranks(np.zeros((0, 2), np.float32), CANDIDATES, np.zeros((0, 1), np.int32))
  assert empty.shape == (0,) and empty.dtype == np.int32
  q = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
  for budget in (4, 8, 100):  # 1, 2 (the last chunk padded) and all queries per chunk
    r = metrics.ranks(q, CANDIDATES, np.zeros((3, 0), np.int32), max_scores=budget)
    assert r.dtype == np.int32 and np.asarray(r).tolist() == [4, 4, 4]  # never a hit


def test_ranks_name_positives_they_cannot_use():
  with pytest.raises(ValueError) as err:
    metrics.ranks(Q, CANDIDATES, [[0], [1]])
  assert str(err.value) == "positives has 2 rows for 1 queries"
  with pytest.raises(ValueError) as err:
    metrics.ranks(Q, CANDIDATES, [[4]])  # candidates are 0..3
  assert str(err.value) == "a positive index 4 is outside the 4 candidates"
  assert int(metrics.ranks(Q, CANDIDATES, [[3]])[0]) == 2  # the last one is fine


def test_padded_positives():
  out = metrics.padded_positives([[0, 2, 5], [1], []])
  assert out.dtype == np.int32 and out.tolist() == [[0, 2, 5], [1, -1, -1], [-1, -1, -1]]
  assert metrics.padded_positives([[3], [4]]).tolist() == [[3], [4]]
  assert metrics.padded_positives([]).shape == (0, 1)
  assert metrics.padded_positives([[]]).tolist() == [[-1]]


def test_ranks_nan_counts_against_the_model():
  cand = np.array([[1, 0], [np.nan, 0], [0, 1]], np.float32)
  assert int(metrics.ranks(Q, cand, [[0]])[0]) == 1  # the NaN negative beats the positive
  assert int(metrics.ranks(Q, cand, [[1]])[0]) == 3  # a NaN positive is never a hit
  q_nan = np.array([[np.nan, 0]], np.float32)
  assert int(metrics.ranks(q_nan, cand, [[0]])[0]) == 3


def test_a_nan_positive_spoils_only_its_own_query():
  cand = np.array([[1, 0], [np.nan, 0], [0, 1]], np.float32)
  q = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
  # One chunk of three queries. Scores: q0 (1, NaN, 0), q1 (0, NaN, 1), q2 as q0. q0: the NaN
  # negative beats its positive (1); q1: its positive is the NaN one (3, never a hit); q2: 1 and
  # NaN beat its 0 (2).
  assert np.asarray(metrics.ranks(q, cand, [[0], [1], [2]])).tolist() == [1, 3, 2]


def test_scores_ask_for_full_float32_precision():
  emb = np.eye(3, dtype=np.float32)
  idx = np.arange(3, dtype=np.int32)
  dots = dot_precisions(metrics.pair_correct, emb, emb, idx, idx, idx)
  dots += dot_precisions(lambda q, c, p, m: metrics._ranks(q, c, p, m, m, chunk=3), emb, emb,
                         idx[:, None], np.ones(3, bool))
  assert len(dots) == 3 and all(p == (jax.lax.Precision.HIGHEST,) * 2 for p in dots)


def test_collapsed_model_scores_zero():
  """All embeddings equal: every score ties, so nothing is a hit at any k < N."""
  emb = np.ones((10, 4), np.float32) / 2
  r = metrics.ranks(emb, emb, np.arange(10)[:, None])
  assert metrics.recall_at_k(r, (1, 5, 9)) == {1: 0.0, 5: 0.0, 9: 0.0}


def test_retrieval_several_captions_per_image():
  """Image->text is a hit when any of the image's captions is in the top k."""
  images = np.eye(3, 4, dtype=np.float32)
  #            img0's    img0's     img1's    img2's
  captions = np.array([[0.2, 0, 0, 1], [0.9, 0.1, 0, 0], [0, 1, 0, 0], [0.95, 0, 0.1, 0]],
                      np.float32)
  positives = [[0, 1], [2, -1], [3, -1]]
  r = np.asarray(metrics.ranks(images, captions, positives))
  # img0: best positive 0.9 (caption 1), only caption 3 (0.95) beats it -> rank 1
  # img1: caption 2 scores 1, nothing else >= 1 -> 0; img2: caption 3 scores 0.1, none beat -> 0
  assert r.tolist() == [1, 0, 0]
  assert metrics.recall_at_k(r, (1, 2)) == {1: pytest.approx(2 / 3), 2: 1.0}
  # text->image: one positive each; caption 3 scores img0 (0.95) above its own img2 (0.1)
  t2i = np.asarray(metrics.ranks(captions, images, [0, 0, 1, 2]))
  assert t2i.tolist() == [0, 0, 0, 1]


def test_query_mask_and_recall_mask():
  r = metrics.ranks(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), [0, 1, 2],
                    query_mask=[1, 0, 1])
  assert np.asarray(r).tolist() == [0, 3, 0]
  assert metrics.recall_at_k(r, (1,), mask=[1, 0, 1]) == {1: 1.0}
  assert metrics.recall_at_k(r, (1,)) == {1: pytest.approx(2 / 3)}
  assert math.isnan(metrics.recall_at_k(r, (1,), mask=[0, 0, 0])[1])


def test_chunking_does_not_change_ranks():
  rng = np.random.default_rng(3)
  q = rng.standard_normal((101, 8)).astype(np.float32)
  c = rng.standard_normal((57, 8)).astype(np.float32)
  pos = rng.integers(-1, 57, (101, 3)).astype(np.int32)
  whole = np.asarray(metrics.ranks(q, c, pos))
  for budget in (57, 57 * 7, 57 * 100 + 3):  # 1, 7 and all queries per chunk (padded)
    np.testing.assert_array_equal(np.asarray(metrics.ranks(q, c, pos, max_scores=budget)), whole)


# ------------------------------------------------------------------ jnp == numpy reference


@pytest.mark.parametrize("seed", range(4))
def test_ranks_agree_with_reference_on_random_float_inputs(seed):
  rng = np.random.default_rng(seed)
  nq, nc, d = 60, 45, 12
  q = rng.standard_normal((nq, d)).astype(np.float32)
  c = rng.standard_normal((nc, d)).astype(np.float32)
  groups = [sorted(set(rng.integers(0, nc, rng.integers(1, 5)).tolist())) for _ in range(nq)]
  pos = metrics.padded_positives(groups)
  qm, cm = rng.random(nq) > 0.15, rng.random(nc) > 0.1
  ours = np.asarray(metrics.ranks(q, c, pos, query_mask=qm, candidate_mask=cm, max_scores=400))
  ref = reference.ranks(q, c, pos, qm, cm)
  np.testing.assert_array_equal(ours, ref)
  ks = (1, 5, 10)
  assert metrics.recall_at_k(ours, ks, qm) == pytest.approx(reference.recall_at_k(ref, ks, qm))


@pytest.mark.parametrize("seed", range(4))
def test_ranks_agree_with_reference_on_many_exact_ties(seed):
  """Small integer vectors: dot products are exact in float32 and ties are everywhere."""
  rng = np.random.default_rng(100 + seed)
  q = rng.integers(-2, 3, (50, 5)).astype(np.float32)
  c = rng.integers(-2, 3, (70, 5)).astype(np.float32)
  c[40:50] = c[:10]  # exact duplicates
  groups = [sorted(set(rng.integers(0, 70, rng.integers(0, 4)).tolist())) for _ in range(50)]
  pos = metrics.padded_positives(groups)
  qm, cm = rng.random(50) > 0.2, rng.random(70) > 0.1
  ours = np.asarray(metrics.ranks(q, c, pos, query_mask=qm, candidate_mask=cm, max_scores=300))
  np.testing.assert_array_equal(ours, reference.ranks(q, c, pos, qm, cm))


@pytest.mark.parametrize("seed", range(3))
def test_pair_accuracy_agrees_with_reference(seed):
  rng = np.random.default_rng(seed)
  image = rng.standard_normal((20, 8)).astype(np.float32)
  text = rng.standard_normal((30, 8)).astype(np.float32)
  text[25:] = text[:5]  # some exact ties
  n = 200
  img, pos, neg = (rng.integers(0, 20, n), rng.integers(0, 30, n), rng.integers(0, 30, n))
  neg[:20] = (pos[:20] + 25) % 30 * (pos[:20] < 5) + neg[:20] * (pos[:20] >= 5)
  mask = rng.random(n) > 0.1
  assert metrics.pair_accuracy(image, text, img, pos, neg, mask) == pytest.approx(
      reference.pair_accuracy(image, text, img, pos, neg, mask), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_class_embeddings_agree_with_reference(seed):
  rng = np.random.default_rng(seed)
  prompts = rng.standard_normal((13, 7, 10)).astype(np.float32) * rng.uniform(0.1, 5, (13, 7, 1))
  mask = rng.random((13, 7)) > 0.3
  mask[:, 0] = True
  np.testing.assert_allclose(np.asarray(metrics.class_embeddings(prompts, mask)),
                             reference.class_embeddings(prompts, mask), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(metrics.class_embeddings(prompts)),
                             reference.class_embeddings(prompts), rtol=1e-5, atol=1e-6)


def test_topk_classification_agrees_with_reference():
  rng = np.random.default_rng(7)
  images = rng.standard_normal((300, 16)).astype(np.float32)
  classifier = rng.standard_normal((40, 16)).astype(np.float32)
  labels = rng.integers(0, 40, 300)
  ours = metrics.recall_at_k(metrics.ranks(images, classifier, labels), (1, 5))
  ref = reference.recall_at_k(reference.ranks(images, classifier, labels[:, None]), (1, 5))
  assert ours == pytest.approx(ref)
  # and the plain argmax / argsort definition on continuous scores (no ties)
  scores = images @ classifier.T
  assert ours[1] == pytest.approx(np.mean(scores.argmax(1) == labels))
  top5 = np.argsort(-scores, axis=1)[:, :5]
  assert ours[5] == pytest.approx(np.mean((top5 == labels[:, None]).any(1)))
