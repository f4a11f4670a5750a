"""Objectives against a numpy re-derivation, and 1 device == 8 devices for value and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lift_jax import losses
from lift_jax.sharding import make_mesh


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embeddings(n=16, d=12, seed=0):
  rng = np.random.default_rng(seed)
  zi = _unit(rng.normal(size=(n, d)))
  zt = _unit(zi + 0.8 * rng.normal(size=(n, d)))  # correlated pairs, so the loss is not trivial
  return zi.astype(np.float32), zt.astype(np.float32)


def np_softmax_loss(zi, zt, s, valid=None):
  """Cross-entropy written out row by row, in float64."""
  n = len(zi)
  keep = np.ones(n, bool) if valid is None else np.asarray(valid)
  idx = np.flatnonzero(keep)
  logits = math.exp(s) * zi[idx].astype(np.float64) @ zt[idx].astype(np.float64).T
  total_i2t = total_t2i = 0.0
  for r in range(len(idx)):
    total_i2t += -logits[r, r] + math.log(sum(math.exp(v) for v in logits[r]))
    total_t2i += -logits[r, r] + math.log(sum(math.exp(v) for v in logits[:, r]))
  return 0.5 * (total_i2t + total_t2i) / len(idx)


def np_sigmoid_loss(zi, zt, s, b):
  n = len(zi)
  total = 0.0
  for i in range(n):
    for j in range(n):
      z = math.exp(s) * float(zi[i] @ zt[j]) + b
      y = 1.0 if i == j else -1.0
      total += math.log1p(math.exp(-y * z))
  return total / n


def test_softmax_matches_numpy():
  zi, zt = embeddings()
  s = math.log(1 / 0.07)
  got = float(losses.softmax_loss(jnp.asarray(zi), jnp.asarray(zt), jnp.asarray(s)))
  assert got == pytest.approx(np_softmax_loss(zi, zt, s), rel=1e-5)
  # Perfectly aligned, well-separated pairs at a large scale give a loss near 0.
  eye = np.eye(8, dtype=np.float32)
  assert float(losses.softmax_loss(eye, eye, jnp.asarray(math.log(100.0)))) < 1e-30 + 1e-6


def test_softmax_mask_equals_dropping_the_rows():
  zi, zt = embeddings(n=12, seed=3)
  valid = np.ones(12, bool)
  valid[[2, 7, 8]] = False
  s = 2.0
  got = float(losses.softmax_loss(jnp.asarray(zi), jnp.asarray(zt), jnp.asarray(s),
                                  jnp.asarray(valid)))
  assert got == pytest.approx(np_softmax_loss(zi, zt, s, valid), rel=1e-5)
  dropped = float(losses.softmax_loss(jnp.asarray(zi[valid]), jnp.asarray(zt[valid]),
                                      jnp.asarray(s)))
  assert got == pytest.approx(dropped, rel=1e-6)


def test_sigmoid_matches_numpy():
  zi, zt = embeddings(n=10, seed=1)
  got = float(losses.sigmoid_loss(zi, zt, jnp.asarray(math.log(10.0)), jnp.asarray(-10.0)))
  assert got == pytest.approx(np_sigmoid_loss(zi, zt, math.log(10.0), -10.0), rel=1e-5)


def test_cosine_matches_numpy():
  zi, zt = embeddings(seed=2)
  want = np.mean(1 - np.sum(zi.astype(np.float64) * zt, axis=-1))
  assert float(losses.cosine_loss(zi, zt)) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "cos"])
def test_one_device_equals_eight(kind):
  """Same global batch: the value and gradients do not depend on how it is sharded."""
  assert jax.device_count() == 8
  zi, zt = embeddings(n=32, d=16, seed=4)
  valid = np.ones(32, bool)
  valid[5] = False

  def f(zi, zt, s, b):
    return losses.contrastive_loss(kind, zi, zt, {"logit_scale": s, "logit_bias": b},
                                   jnp.asarray(valid))

  grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
  args = (zi, zt, np.float32(2.3), np.float32(-5.0))
  v1, g1 = grad(*(jax.device_put(a, jax.devices()[0]) for a in args))
  mesh = make_mesh()
  shard = NamedSharding(mesh, P(("data", "fsdp")))
  rep = NamedSharding(mesh, P())
  sharded = (jax.device_put(zi, shard), jax.device_put(zt, shard), jax.device_put(args[2], rep),
             jax.device_put(args[3], rep))
  with jax.set_mesh(mesh):
    v8, g8 = grad(*sharded)
  assert len(sharded[0].sharding.device_set) == 8
  np.testing.assert_allclose(float(v8), float(v1), rtol=1e-6)
  for a, b in zip(g8, g1):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
