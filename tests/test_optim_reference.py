"""The optimizer against SPEC.md's recipe written out here: the learning-rate formula, and AdamW
(betas, eps, decoupled weight decay on parameters with ndim >= 2 only, global-norm clipping at 1.0
for LIFT, none for CLIP) re-implemented in numpy and run for a few steps on the real parameter
tree of a tiny model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fakedata
from lift_jax import config_lib, optim
from lift_jax.models.two_tower import TwoTower


def spec_lr(step, base_lr, warmup, total):
  """Linear warm-up lr * (step + 1) / warmup, then cosine to 0 over the remaining steps."""
  if step < warmup:
    return base_lr * (step + 1) / warmup
  return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) * base_lr


@pytest.mark.parametrize("mode", ["lift", "clip"])
def test_config_carries_the_paper_recipe(mode):
  o = config_lib.base(mode).optim
  assert (o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.warmup_steps) == (
      1e-3, 0.9, 0.98, 1e-6, 0.2, 500)
  assert o.grad_clip_norm == (1.0 if mode == "lift" else None)


def test_learning_rate_at_the_points_that_matter():
  total = config_lib.STEPS["128M"]  # 7,816 steps, 500 of them warm-up
  _, schedule = optim.make_optimizer(config_lib.base("lift").optim, total)
  points = {"first step": 0, "last warm-up step": 499, "end of warm-up": 500,
            "mid-cosine": 500 + (total - 500) // 2, "three quarters": 500 + 3 * (total - 500) // 4,
            "near the end": total - 40, "last step": total - 1}
  for name, step in points.items():
    expected = spec_lr(step, 1e-3, 500, total)
    # float32: 1 + cos(x) near x = pi loses digits, hence the absolute slack of 1e-7 * lr.
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-10), name
  assert float(schedule(0)) == pytest.approx(2e-6)
  assert float(schedule(500 + (total - 500) // 2)) == pytest.approx(5e-4, rel=1e-5)
  assert float(schedule(total)) == pytest.approx(0.0, abs=1e-10)


def tiny_params(mode, seed=0):
  """The parameter tree of a tiny TwoTower (shapes from eval_shape, values from numpy)."""
  cfg = fakedata.tiny_config("unused", None, mode=mode).model.to_dict()
  if mode == "clip":
    cfg["text"]["vocab_size"] = 64
  shapes = jax.eval_shape(
      lambda: nnx.to_pure_dict(nnx.split(TwoTower(cfg, rngs=nnx.Rngs(0)))[1]))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def path_name(path):
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


# Never decayed: LayerNorms, biases, the class token, the logit scale (SPEC.md).
NO_DECAY = ("visual/ln_pre/scale", "visual/ln_post/bias", "visual/class_embedding",
            "logit_scale", "visual/transformer/resblocks/0/attn/in_proj/bias")
# Decayed although untouched by the loss here: the positional embedding is a matrix.
DECAY = ("visual/positional_embedding", "visual/conv1")


def gradients(params, steps, seed=1):
  """Random gradients whose global norm goes above and below 1; zero for NO_DECAY and DECAY."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    g = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    g = jax.tree_util.tree_map_with_path(
        lambda path, x: np.zeros_like(x) if path_name(path) in NO_DECAY + DECAY else x, g)
    norm = math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in jax.tree.leaves(g)))
    target = (4.0, 0.3, 25.0, 0.8, 2.0)[t % 5]
    out.append(jax.tree.map(lambda x: (x * (target / norm)).astype(np.float32), g))
  return out


def numpy_adamw(params, grads, *, warmup, total, clip, lr=1e-3, b1=0.9, b2=0.98, eps=1e-6,
                wd=0.2, min_ndim=2):
  """AdamW as PyTorch's (decoupled decay), on ndim >= min_ndim only, in float64."""
  names = [path_name(p) for p, _ in jax.tree.leaves_with_path(params)]
  p = {n: np.asarray(x, np.float64) for n, x in zip(names, jax.tree.leaves(params))}
  m = {n: np.zeros_like(x) for n, x in p.items()}
  v = {n: np.zeros_like(x) for n, x in p.items()}
  for t, step_grads in enumerate(grads):
    g = {n: np.asarray(x, np.float64) for n, x in zip(names, jax.tree.leaves(step_grads))}
    if clip is not None:
      norm = math.sqrt(sum(float(np.sum(x ** 2)) for x in g.values()))
      if norm > clip:
        g = {n: x * (clip / norm) for n, x in g.items()}
    rate = spec_lr(t, lr, warmup, total)
    for n in p:
      m[n] = b1 * m[n] + (1 - b1) * g[n]
      v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
      mhat, vhat = m[n] / (1 - b1 ** (t + 1)), v[n] / (1 - b2 ** (t + 1))
      if p[n].ndim >= min_ndim:
        p[n] = p[n] * (1 - rate * wd)
      p[n] = p[n] - rate * mhat / (np.sqrt(vhat) + eps)
  return p


@pytest.mark.parametrize("mode", ["lift", "clip"])
def test_adamw_equals_numpy_reference(mode):
  config = config_lib.base(mode)
  config.optim.warmup_steps = 2
  total = 6
  tx, _ = optim.make_optimizer(config.optim, total)
  params = tiny_params(mode)
  grads = gradients(params, total)
  got = run(tx, params, grads)

  clip = 1.0 if mode == "lift" else None
  expected = numpy_adamw(params, grads, warmup=2, total=total, clip=clip)
  for name, x in expected.items():
    np.testing.assert_allclose(got[name], x, rtol=2e-5, atol=2e-6, err_msg=name)

  # Clipping must matter for this check to mean anything: with the other setting the numpy
  # reference lands elsewhere.
  other = numpy_adamw(params, grads, warmup=2, total=total, clip=None if clip else 1.0)
  assert max(float(np.abs(other[n] - got[n]).max()) for n in other) > 1e-4

  initial = {path_name(k): x for k, x in jax.tree.leaves_with_path(params)}
  for name in NO_DECAY:  # zero gradient and no decay: exactly where it started
    assert np.array_equal(got[name], initial[name]), name
  decay = np.prod([1 - spec_lr(t, 1e-3, 2, total) * 0.2 for t in range(total)])
  for name in DECAY:  # zero gradient: decay alone shrinks it
    np.testing.assert_allclose(got[name], initial[name] * decay, rtol=1e-6, err_msg=name)


def test_decay_mask_is_ndim_two_and_up():
  params = tiny_params("clip")
  mask = {path_name(k): bool(x) for k, x in jax.tree.leaves_with_path(optim.decay_mask(params))}
  for name, x in ((path_name(k), x) for k, x in jax.tree.leaves_with_path(params)):
    assert mask[name] == (x.ndim >= 2), name
  assert mask["text/token_embedding"] and mask["text/positional_embedding"]
  assert not mask["text/ln_final/scale"] and not mask["logit_scale"]


@pytest.mark.parametrize("warmup,total", [(0, 10), (1, 10), (3, 4)])
def test_learning_rate_without_warm_up_with_one_step_of_it_and_past_the_end(warmup, total):
  """Every step of short schedules against the formula; after the last step the rate stays 0."""
  schedule = optim.lr_schedule(1e-3, warmup, total)
  for step in range(total):
    expected = spec_lr(step, 1e-3, warmup, total)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12), step
  for step in (total, total + 1, 2 * total + 3):
    assert float(schedule(step)) == pytest.approx(0.0, abs=1e-12), step


def test_frozen_rules_of_an_optimizer_config():
  assert optim.frozen_rules({"frozen": "^visual/"}) == ["^visual/"]
  assert optim.frozen_rules({"frozen": ("^visual/", "^head/")}) == ["^visual/", "^head/"]
  assert optim.frozen_rules({"lr": 1.0}) == [] and optim.frozen_rules(None) == []


@pytest.mark.parametrize("rules", ["^visual/", (("^visual/", 0.5, 3),), (("^visual/",),)])
def test_malformed_lr_multipliers_are_refused(rules):
  with pytest.raises(optim.cli.ConfigError, match=r"optim.lr_multipliers entries are \(regex, "
                     r"factor\) pairs, got "):
    optim.lr_factors(tiny_params("lift"), rules)


def run(tx, params, grads):
  @jax.jit
  def update(g, state, p):
    updates, state = tx.update(g, state, p)
    return jax.tree.map(jnp.add, p, updates), state

  p, state = jax.tree.map(jnp.asarray, params), tx.init(params)
  for g in grads:
    p, state = update(g, state, p)
  return {path_name(k): np.asarray(x) for k, x in jax.tree.leaves_with_path(jax.device_get(p))}


def test_adamw_settings_other_than_the_defaults_reach_the_optimizer():
  """b1, the decay's minimum ndim and an lr factor of exactly 2 against numpy: settings whose
  values equal optax's defaults elsewhere cannot show they are passed on."""
  params, total = tiny_params("lift"), 5
  grads = gradients(params, total)
  cfg = dict(config_lib.base("lift").optim.to_dict(), warmup_steps=2, b1=0.8, wd_min_ndim=1,
             grad_clip_norm=None, lr_multipliers=(("^head/", 2.0),))
  got = run(optim.make_optimizer(cfg, total)[0], params, grads)
  head = {k: v for k, v in params.items() if k == "head"}
  rest = {k: v for k, v in params.items() if k != "head"}
  for part, lr in ((head, 2e-3), (rest, 1e-3)):
    expected = numpy_adamw(part, [{k: g[k] for k in part} for g in grads], warmup=2,
                           total=total, clip=None, lr=lr, b1=0.8, min_ndim=1)
    for name, x in expected.items():
      np.testing.assert_allclose(got[name], x, rtol=2e-5, atol=2e-6, err_msg=name)
  # Biases decay with wd_min_ndim=1 (they would not with 2).
  bias = "visual/transformer/resblocks/0/attn/in_proj/bias"
  assert np.abs(got[bias] - numpy_adamw(rest, [{k: g[k] for k in rest} for g in grads], warmup=2,
                                        total=total, clip=None, b1=0.8)[bias]).max() > 1e-6


def test_frozen_tower_with_clipping_clips_the_trained_parameters_alone():
  """With frozen parameters, the global norm is that of the trained parameters' gradients, and
  it is clipped (numpy reference over the trained sub-tree)."""
  params, total = tiny_params("lift"), 4
  grads = gradients(params, total)
  cfg = dict(config_lib.base("lift").optim.to_dict(), warmup_steps=2, frozen=("^visual/",),
             grad_clip_norm=0.05)
  got = run(optim.make_optimizer(cfg, total)[0], params, grads)
  trained = {k: v for k, v in params.items() if k != "visual"}
  expected = numpy_adamw(trained, [{k: g[k] for k in trained} for g in grads], warmup=2,
                         total=total, clip=0.05)
  for name, x in expected.items():
    np.testing.assert_allclose(got[name], x, rtol=2e-5, atol=2e-6, err_msg=name)
  unclipped = numpy_adamw(trained, [{k: g[k] for k in trained} for g in grads], warmup=2,
                          total=total, clip=None)
  assert max(float(np.abs(unclipped[n] - got[n]).max()) for n in unclipped) > 1e-4
  initial = {path_name(k): x for k, x in jax.tree.leaves_with_path(params)}
  assert all(np.array_equal(got[n], initial[n]) for n in got if n.startswith("visual/"))
