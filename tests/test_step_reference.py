"""The train step against a reference written out by hand.

A 4-example batch with one invalid row goes through ``train.make_train_step`` on a 4-device mesh.
Its loss must equal a numpy computation that starts from the raw uint8 pixels, normalises them
with OpenAI's mean and std (the values are SPEC.md's, typed here), runs the model's forward pass
on the three valid examples only and evaluates the objective in float64. Its gradient must equal
``jax.grad`` of the same objective over the three valid examples; changing the invalid row's
pixels, embedding or tokens must change neither. LIFT and CLIP modes, softmax, sigmoid and cosine
objectives; and the clamp of the logit scale to [0, ln 100] after the update.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fakedata
from lift_jax import optim, train

OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711])
VALID = np.array([True, False, True, True])
EOT = 63


def tiny(mode, loss):
  c = fakedata.tiny_config("unused", "unused" if mode == "lift" else None, mode=mode, batch=4)
  c.model.loss = loss
  c.model.vit.depth = 1
  if mode == "clip":
    c.model.text.vocab_size, c.model.text.eot_token_id = EOT + 1, EOT
  c.mesh.num_devices = 4
  return c


def capture_gradients():
  """An "optimizer" that leaves the parameters alone and keeps the last gradient as its state,
  so the step's gradient can be read back exactly."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def make_batch(mode, seed):
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  if mode == "lift":
    text = rng.normal(size=(4, 16)).astype(np.float32)
  else:
    text = np.zeros((4, 16), np.int32)
    for row, length in enumerate(rng.integers(3, 15, size=4)):
      text[row, :length] = rng.integers(1, EOT, size=length)
      text[row, length] = EOT
  return {"image": pixels, "text": text, "valid": VALID.copy(),
          "reason": (~VALID).astype(np.int8)}


def reference_loss(xp, kind, zimg, ztxt, scale, bias):
  """The three objectives over already-normalised embeddings of valid pairs only, written with
  ``xp`` = numpy (float64 values) or jax.numpy (for jax.grad)."""
  n = zimg.shape[0]
  if kind == "cos":
    return xp.mean(1.0 - xp.sum(zimg * ztxt, axis=1))
  logits = xp.exp(scale) * (zimg @ ztxt.T)
  if kind == "sigmoid":
    labels = 2.0 * xp.eye(n) - 1.0
    return xp.sum(xp.log1p(xp.exp(-labels * (logits + bias)))) / n

  def logsumexp(a, axis):
    peak = xp.max(a, axis=axis, keepdims=True)
    return xp.log(xp.sum(xp.exp(a - peak), axis=axis)) + xp.squeeze(peak, axis)

  diag = xp.diagonal(logits)
  return 0.5 * (xp.mean(logsumexp(logits, 1) - diag) + xp.mean(logsumexp(logits, 0) - diag))


def unit(x, xp):
  return x / xp.linalg.norm(x, axis=-1, keepdims=True)


def reference(graphdef, mode, kind, batch, params):
  """(numpy float64 loss, jax.grad of the jnp loss) over the valid rows of ``batch``, with the
  model's forward pass run outside the train step."""
  keep = np.flatnonzero(batch["valid"])
  # uint8 -> [0, 1] -> OpenAI statistics, in float64 on the host.
  images = (batch["image"][keep].astype(np.float64) / 255.0 - OPENAI_MEAN) / OPENAI_STD
  text = batch["text"][keep]

  @jax.jit
  def value_and_grad(p):
    def loss(p):
      model = nnx.merge(graphdef, p)
      zimg = model.encode_image(jnp.asarray(images, jnp.float32))
      ztxt = unit(jnp.asarray(text), jnp) if mode == "lift" else model.encode_text(text)
      value = reference_loss(jnp, kind, zimg, ztxt, p.get("logit_scale"), p.get("logit_bias"))
      return value, (zimg, ztxt)

    return jax.value_and_grad(loss, has_aux=True)(p)

  (_, (zimg, ztxt)), grads = value_and_grad(params)
  zimg = np.asarray(zimg, np.float64)
  # LIFT's text side is normalised in float64 here; CLIP's comes from the text tower.
  ztxt = unit(text.astype(np.float64), np) if mode == "lift" else np.asarray(ztxt, np.float64)
  scale = float(params["logit_scale"]) if "logit_scale" in params else None
  bias = float(params["logit_bias"]) if "logit_bias" in params else None
  return reference_loss(np, kind, zimg, ztxt, scale, bias), jax.device_get(grads)


@pytest.mark.parametrize("mode,kind", [("lift", "softmax"), ("clip", "softmax"),
                                       ("lift", "sigmoid"), ("lift", "cos")])
def test_step_equals_hand_written_reference(mode, kind):
  config = tiny(mode, kind)
  assert tuple(config.data.mean) == pytest.approx(tuple(OPENAI_MEAN))  # training statistics
  assert tuple(config.data.std) == pytest.approx(tuple(OPENAI_STD))
  mesh = train.make_mesh(config)
  setup = train.build(config, mesh)
  tx = capture_gradients()
  step = jax.jit(train.make_train_step(setup.graphdef, config, tx, optim.lr_schedule(1e-3, 2, 6)))

  def run(batch, logit_scale=None):
    with jax.set_mesh(mesh):
      state = jax.jit(setup.init, out_shardings=setup.state_shardings)(jax.random.PRNGKey(0))
      state = dict(state, opt_state=tx.init(state["params"]))
      if logit_scale is not None:
        state["params"] = dict(state["params"], logit_scale=jax.device_put(
            jnp.float32(logit_scale), state["params"]["logit_scale"].sharding))
      placed = jax.tree.map(lambda a: jax.device_put(a, setup.batch_sharding), batch)
      new_state, metrics = step(state, placed)
    if logit_scale is not None:
      return float(new_state["params"]["logit_scale"]), float(metrics["logit_scale"])
    return (jax.device_get(state["params"]), float(metrics["loss"]),
            jax.device_get(new_state["opt_state"]), int(metrics["skipped_in_batch"]))

  batch = make_batch(mode, seed=1)
  params, loss, grads, skipped = run(batch)
  assert skipped == 1
  params = jax.tree.map(jnp.asarray, params)
  expected, expected_grads = reference(setup.graphdef, mode, kind, batch, params)
  print(f"{mode}/{kind}: step loss {loss:.7f}, numpy reference {expected:.7f}")
  assert loss == pytest.approx(expected, rel=2e-5, abs=1e-6)

  # The gradient is that of the objective over the three valid pairs, for every parameter.
  assert jax.tree.structure(grads) == jax.tree.structure(expected_grads)
  for (path, g), e in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-6 * max(1.0, float(np.abs(e).max())),
                               err_msg=jax.tree_util.keystr(path))
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4  # not all zero

  # Whatever the invalid row holds, neither the loss nor any gradient moves.
  other = make_batch(mode, seed=2)
  changed = {k: v.copy() for k, v in batch.items()}
  for key in ("image", "text"):
    changed[key][~VALID] = other[key][~VALID]
  assert not np.array_equal(changed["image"], batch["image"])
  assert not np.array_equal(changed["text"], batch["text"])
  _, loss2, grads2, _ = run(changed)
  assert loss2 == pytest.approx(loss, rel=1e-6, abs=1e-7)
  for g2, g in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g2, g, rtol=1e-5, atol=1e-8)

  # The learnable temperature is clipped to [0, ln 100] after the update (the "optimizer" here
  # leaves it where it was).
  if kind != "cos":
    assert run(batch, logit_scale=5.0) == (pytest.approx(math.log(100.0), abs=1e-6),
                                           pytest.approx(100.0, rel=1e-5))
    assert run(batch, logit_scale=-0.5)[0] == 0.0
    assert run(batch, logit_scale=2.5)[0] == pytest.approx(2.5, abs=1e-6)
