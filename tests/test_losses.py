"""Objectives against a numpy re-derivation, and 1 device == 8 devices for value and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import dot_precisions
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


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "cos"])
@pytest.mark.parametrize("valid_rows", [[0, 2, 3, 5, 6], [4]], ids=["five", "one"])
def test_masked_loss_equals_the_loss_of_the_valid_rows(kind, valid_rows):
  """Through contrastive_loss (the train step's entry): invalid rows are neither positives nor
  negatives, and the mean is over the valid rows, down to a single one."""
  zi, zt = embeddings(n=8, seed=5)
  valid = np.zeros(8, bool)
  valid[valid_rows] = True
  s, b = 1.7, -3.0
  got = float(losses.contrastive_loss(kind, zi, zt, {"logit_scale": jnp.float32(s),
                                                     "logit_bias": jnp.float32(b)},
                                      jnp.asarray(valid)))
  zi, zt = zi[valid].astype(np.float64), zt[valid].astype(np.float64)
  want = {"softmax": lambda: np_softmax_loss(zi, zt, s),
          "sigmoid": lambda: np_sigmoid_loss(zi, zt, s, b),
          "cos": lambda: np.mean(1 - np.sum(zi * zt, axis=-1))}[kind]()
  assert got == pytest.approx(want, rel=1e-5)
  assert float(losses.contrastive_loss(kind, zi, zt, {"logit_scale": jnp.float32(s),
                                                      "logit_bias": jnp.float32(b)},
                                       jnp.zeros(len(zi), bool))) == 0.0  # nothing to learn from


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "cos"])
def test_losses_compute_in_float32_from_bfloat16_inputs(kind):
  """A bfloat16 model hands over bfloat16 embeddings and parameters: the loss upcasts them
  first (a bfloat16 exp(logit_scale) alone is off by ~0.3%)."""
  zi, zt = (jnp.asarray(z, jnp.bfloat16) for z in embeddings(n=8, seed=6))
  s, b = jnp.bfloat16(math.log(1 / 0.07)), jnp.bfloat16(-10.0)
  got = losses.contrastive_loss(kind, zi, zt, {"logit_scale": s, "logit_bias": b})
  assert got.dtype == jnp.float32
  zi, zt = np.asarray(zi, np.float64), np.asarray(zt, np.float64)  # the same (rounded) values
  want = {"softmax": lambda: np_softmax_loss(zi, zt, float(s)),
          "sigmoid": lambda: np_sigmoid_loss(zi, zt, float(s), float(b)),
          "cos": lambda: np.mean(1 - np.sum(zi * zt, axis=-1))}[kind]()
  assert float(got) == pytest.approx(want, rel=2e-6)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_similarities_ask_for_full_float32_precision(kind):
  """A default-precision float32 matmul rounds through TF32 or bfloat16 passes on GPUs and
  TPUs: the losses ask for HIGHEST."""
  zi, zt = embeddings(n=4, seed=7)
  precisions = dot_precisions(lambda a, b: losses.contrastive_loss(
      kind, a, b, {"logit_scale": jnp.float32(1.0), "logit_bias": jnp.float32(0.0)}), zi, zt)
  assert precisions and all(p == (jax.lax.Precision.HIGHEST,) * 2 for p in precisions)


def test_l2_normalize_matches_numpy_and_leaves_zero_vectors_at_zero():
  x = np.random.default_rng(8).normal(size=(5, 7))
  x[3] = 0.0  # a zero vector stays zero instead of NaN
  got = losses.l2_normalize(jnp.asarray(x, jnp.bfloat16))
  assert got.dtype == jnp.float32
  ref = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
  norms = np.linalg.norm(ref, axis=-1, keepdims=True)
  want = np.divide(ref, norms, out=np.zeros_like(ref), where=norms > 0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
  prompts = np.random.default_rng(9).normal(size=(3, 2, 5))  # [class, template, dim]: last axis
  np.testing.assert_allclose(np.asarray(losses.l2_normalize(prompts)),
                             prompts / np.linalg.norm(prompts, axis=2, keepdims=True), rtol=1e-6)
  tiny = np.full((1, 4), 1e-20)  # below eps: divided by eps, not by its own norm
  np.testing.assert_allclose(np.asarray(losses.l2_normalize(tiny)), tiny / 1e-12, rtol=1e-6)


def test_initial_parameters_and_their_overrides():
  assert losses.initial_params({"loss": "softmax"}) == {"logit_scale": math.log(1 / 0.07)}
  assert losses.initial_params({"loss": "sigmoid"}) == {"logit_scale": math.log(10.0),
                                                        "logit_bias": -10.0}
  assert losses.initial_params({"loss": "cos", "logit_scale_init": None}) == {}
  assert losses.initial_params({"loss": "sigmoid", "logit_scale_init": 2, "logit_bias_init": -1,
                                "head_init": 5.0}) == {"logit_scale": 2.0, "logit_bias": -1.0}
  with pytest.raises(losses.cli.ConfigError) as err:
    losses.initial_params({"loss": "softmax", "logit_bias_init": -5.0})
  assert str(err.value) == ("model.logit_bias_init=-5.0, but loss 'softmax' has no logit_bias "
                            "(its parameters: ['logit_scale'])")
  with pytest.raises(losses.cli.ConfigError, match=r"its parameters: none"):
    losses.initial_params({"loss": "cos", "logit_scale_init": 1.0})
  with pytest.raises(losses.cli.ConfigError) as err:
    losses.get("siglip")
  assert str(err.value) == "model.loss='siglip': expected one of ['cos', 'sigmoid', 'softmax']"


def test_constrain_clips_the_logit_scale_to_zero_and_ln_100():
  for kind in ("softmax", "sigmoid"):
    for value, want in ((-0.5, 0.0), (1.5, 1.5), (7.0, math.log(100.0))):
      params = {"logit_scale": jnp.float32(value), "logit_bias": jnp.float32(-50.0), "w": 9.0}
      out = losses.constrain(kind, params)
      assert float(out["logit_scale"]) == pytest.approx(want, rel=1e-7)
      assert float(out["logit_bias"]) == -50.0 and out["w"] == 9.0  # no bounds on these
  assert losses.constrain("cos", {"w": 9.0}) == {"w": 9.0}
