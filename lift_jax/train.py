"""The training loop: LIFT (fixed text embeddings) or the CLIP baseline (trainable text tower).

Read top to bottom: set-up, mesh, data, model and optimizer (built abstractly, then created directly
into their shardings), the jitted step, resume, evaluators, the loop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Callable, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from lift_jax import cli
from lift_jax import checkpoint as ckpt
from lift_jax import config_lib, losses, optim, sharding
from lift_jax.data import pipeline, transforms
from lift_jax.metrics import MetricWriter, peak_flops
from lift_jax.models.two_tower import LOGIT_SCALE_MAX, TwoTower

# Model fields that do not change the parameters: a resumed run may change them.
NON_SHAPE_MODEL_FIELDS = ("dtype", "remat", "attention_impl", "init_from", "init_from_params")


@cli.user_error
class TrainingError(RuntimeError):
  """The run cannot go on (non-finite loss, too many bad records, incompatible workdir)."""


# ==============================================================================================
# The step
# ==============================================================================================


def make_train_step(graphdef, config, tx, schedule):
  """Returns step(state, batch) -> (state, metrics), a pure function for jax.jit."""
  model_cfg, data_cfg = config.model, config.data
  kind = model_cfg.get("loss", "softmax")
  accum = int(config.optim.get("grad_accum_steps", 1))
  mean, std = tuple(data_cfg.mean), tuple(data_cfg.std)

  def towers(params, images, text):
    model = nnx.merge(graphdef, params)
    return model(transforms.normalize(images, mean, std), text)

  def loss_of_features(zimg, ztxt, params, valid):
    return losses.contrastive_loss(kind, zimg, ztxt, params.get("logit_scale"),
                                   params.get("logit_bias"), valid)

  def simple_grads(params, batch):
    def loss_fn(p):
      zimg, ztxt = towers(p, batch["image"], batch["text"])
      return loss_of_features(zimg, ztxt, p, batch["valid"])

    return jax.value_and_grad(loss_fn)(params)

  def accumulated_grads(params, batch):
    """Exact gradient of the global-batch loss in ``accum`` micro-batches: embed everything
    without gradients, differentiate the loss w.r.t. the embeddings, then back-propagate each
    micro-batch's share through the towers (one extra forward pass, memory of one micro-batch)."""
    split = lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:])
    micro = {k: split(batch[k]) for k in ("image", "text")}
    zimg, ztxt = jax.lax.map(lambda mb: towers(params, mb["image"], mb["text"]), micro)
    flat = lambda z: z.reshape((-1,) + z.shape[2:])

    def loss_fn(zi, zt, p):
      return loss_of_features(zi, zt, p, batch["valid"])

    loss, (gzi, gzt, gp) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(
        flat(zimg), flat(ztxt), params)

    def body(acc, xs):
      mb, gi, gt = xs
      _, vjp = jax.vjp(lambda p: towers(p, mb["image"], mb["text"]), params)
      (g,) = vjp((gi, gt))
      return jax.tree.map(jnp.add, acc, g), None

    grads, _ = jax.lax.scan(body, gp, (micro, split(gzi), split(gzt)))
    return loss, grads

  def step(state, batch):
    params = state["params"]
    loss, grads = (accumulated_grads if accum > 1 else simple_grads)(params, batch)
    grads = optim.freeze_grads(grads, config.optim)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    if "logit_scale" in new_params:
      new_params["logit_scale"] = jnp.clip(new_params["logit_scale"], 0.0, LOGIT_SCALE_MAX)
    # A non-finite loss or gradient leaves the state as it was (and freezes it from then on);
    # the host sees `nonfinite_step` and stops with the last good checkpoint intact.
    healthy = state["nonfinite_step"] < 0
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & healthy
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    invalid = jnp.sum(~batch["valid"]).astype(jnp.int32)
    new_state = {
        "params": keep(new_params, params),
        "opt_state": keep(opt_state, state["opt_state"]),
        "step": state["step"] + 1,
        "rng": state["rng"],
        "skipped": state["skipped"] + invalid,
        "nonfinite_step": jnp.where(healthy & ~ok, state["step"], state["nonfinite_step"]),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "skipped": new_state["skipped"], "skipped_in_batch": invalid}
    if "logit_scale" in params:
      metrics["logit_scale"] = jnp.exp(new_state["params"]["logit_scale"])
    return new_state, metrics

  return step


# ==============================================================================================
# Helpers
# ==============================================================================================


def check_compatible(saved: dict[str, Any], config) -> None:
  """Refuses to resume a workdir whose checkpoints were made for another model or batch shape."""
  current = ckpt.config_to_dict(config)
  diffs = []

  def compare(a, b, path):
    if isinstance(a, dict) and isinstance(b, dict):
      for k in sorted(set(a) | set(b)):
        if path == "model" and k in NON_SHAPE_MODEL_FIELDS:
          continue
        compare(a.get(k), b.get(k), f"{path}.{k}")
    elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))
                         and list(a) == list(b)):
      diffs.append(f"  {path}: checkpoint {a!r}, config {b!r}")

  compare(saved.get("model", {}), current.get("model", {}), "model")
  for key in ("batch_size",):
    compare(saved.get(key), current.get(key), key)
  for key in ("frozen",):  # decides which parameters have optimizer state
    compare(list(saved.get("optim", {}).get(key) or ()),
            list(current.get("optim", {}).get(key) or ()), f"optim.{key}")
  if diffs:
    raise TrainingError("the workdir's checkpoints were made with a different model or data "
                        "shape; use a new --workdir or restore the config. Differences:\n" +
                        "\n".join(diffs))


class Preemption:
  """SIGTERM -> save and stop. Multi-process runs agree through jax's preemption sync point."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread (e.g. called from a test runner thread)
        self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint, then stopping")
    self.requested = True

  def check(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils

    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except Exception:  # no preemption service (e.g. local CPU processes)
      return False

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ==============================================================================================
# Building blocks shared with the benchmark tool
# ==============================================================================================


def make_mesh(config) -> jax.sharding.Mesh:
  devices = jax.devices()
  if config.mesh.get("num_devices"):
    devices = devices[: config.mesh.num_devices]
  mesh = sharding.make_mesh(config.mesh.get("data", -1), config.mesh.get("fsdp", 1), devices)
  if config.batch_size % mesh.devices.size:
    raise TrainingError(f"batch_size {config.batch_size} does not divide by the "
                        f"{mesh.devices.size} devices")
  return mesh


class Setup(NamedTuple):
  graphdef: Any
  init: Callable  # rng -> train state (jit it with out_shardings=state_shardings)
  abstract_state: Any
  state_shardings: Any
  batch_sharding: Any
  step: Callable  # jitted, donating: (state, batch) -> (state, metrics)


def build(config, mesh) -> Setup:
  """The model, optimizer and jitted train step of a config, over ``mesh``."""
  model_cfg = config.model.to_dict()
  tx, schedule = optim.make_optimizer(config.optim, int(config.total_steps))

  def init(rng):
    model = TwoTower(model_cfg, rngs=nnx.Rngs(params=rng))
    params = nnx.to_pure_dict(nnx.split(model)[1])
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": rng, "skipped": jnp.zeros((), jnp.int32),
            "nonfinite_step": jnp.full((), -1, jnp.int32)}

  abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
  state_shardings = sharding.param_shardings(abstract_state, mesh,
                                             list(config.get("sharding_rules", ())))
  graphdef = nnx.split(nnx.eval_shape(lambda: TwoTower(model_cfg, rngs=nnx.Rngs(0))))[0]
  batch_sharding = sharding.batch_sharding(mesh)
  step = jax.jit(make_train_step(graphdef, config, tx, schedule),
                 in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))
  return Setup(graphdef, init, abstract_state, state_shardings, batch_sharding, step)


def abstract_batch(config, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one global batch (what the pipeline yields)."""
  b, s = config.batch_size, config.model.image_size
  if config.model.mode == "lift":
    text = jax.ShapeDtypeStruct((b, config.model.embed_dim), jnp.float32, sharding=batch_sharding)
  else:
    text = jax.ShapeDtypeStruct((b, config.model.text.context_length), jnp.int32,
                                sharding=batch_sharding)
  return {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8, sharding=batch_sharding),
          "text": text,
          "valid": jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=batch_sharding),
          "reason": jax.ShapeDtypeStruct((b,), jnp.int8, sharding=batch_sharding)}


def flops_per_step(compiled) -> float | None:
  """FLOPs of one step per device, from XLA's cost analysis of the compiled program."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


# ==============================================================================================
# train_and_evaluate
# ==============================================================================================


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from ``workdir`` if it holds checkpoints); returns the last metrics."""
  # ---------------------------------------------------------------- set-up
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  primary = jax.process_index() == 0
  total_steps = int(config.total_steps)
  config_file = os.path.join(workdir, "config.json")
  if os.path.exists(config_file) and os.path.isdir(os.path.join(workdir, ckpt.CHECKPOINTS)):
    with open(config_file, encoding="utf-8") as f:
      check_compatible(json.load(f), config)

  from lift_jax import prepare  # makes the synthetic data / embeddings tiny configs ask for

  config = prepare.prepare_data(config, workdir)
  if primary:
    with open(config_file, "w", encoding="utf-8") as f:
      json.dump(ckpt.config_to_dict(config), f, indent=1)

  # ---------------------------------------------------------------- mesh
  mesh = make_mesh(config)
  n_dev = mesh.devices.size
  logging.info("mesh %s over %d devices (%s), %d processes", dict(mesh.shape), n_dev,
               jax.devices()[0].device_kind, jax.process_count())

  # ---------------------------------------------------------------- data
  dataset = pipeline.train_dataset(config, jax.process_index(), jax.process_count())
  batches = pipeline.Batches(dataset, sharding.batch_sharding(mesh),
                             prefetch=config.data.get("prefetch", 2))

  # ---------------------------------------------------------------- model, optimizer, step
  setup = build(config, mesh)
  graphdef, state_shardings, train_step = setup.graphdef, setup.state_shardings, setup.step
  rng = jax.random.PRNGKey(config.seed)

  # ---------------------------------------------------------------- resume
  mngr = ckpt.manager(os.path.join(workdir, ckpt.CHECKPOINTS),
                      keep=config.get("keep_checkpoints", 3),
                      keep_period=config.get("keep_checkpoint_every_steps"),
                      async_save=config.get("async_checkpoints", True))
  with jax.set_mesh(mesh):
    state = jax.jit(setup.init, out_shardings=state_shardings)(rng)
  latest = mngr.latest_step()
  if latest is None and config.model.get("init_from"):
    from lift_jax import pretrained

    state = dict(state, params=pretrained.load_into(state["params"], config.model))
  if latest is not None:
    step_dir = os.path.join(workdir, ckpt.CHECKPOINTS, str(latest))
    saved_cfg = ckpt.read_config(step_dir)
    check_compatible(saved_cfg.to_dict(), config)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    if os.path.isdir(os.path.join(step_dir, ckpt.TRAIN)):
      restored = mngr.restore(latest, args=ckpt.ocp.args.Composite(**{
          ckpt.PARAMS: ckpt.ocp.args.StandardRestore(target["params"]),
          ckpt.TRAIN: ckpt.ocp.args.StandardRestore(
              {k: v for k, v in target.items() if k != "params"}),
          ckpt.DATA: grain.checkpoint.CheckpointRestore(batches)}))
      state = {"params": restored[ckpt.PARAMS], **restored[ckpt.TRAIN]}
      logging.info("resumed from step %d (%s)", int(state["step"]), step_dir)
    else:  # params-only checkpoint (e.g. imported from PyTorch): fresh optimizer and data
      params, _ = ckpt.restore_params(step_dir, target["params"])
      state = dict(state, params=params)
      logging.info("initialised parameters from %s; optimizer starts fresh", step_dir)
  start_step = int(jax.device_get(state["step"]))

  # ---------------------------------------------------------------- evaluators
  runner = None
  eval_config, dropped = config_lib.resolve_eval_paths(config)
  if dropped:
    logging.warning("evaluation of %s skipped: their paths are relative and "
                    "--config.evals.data_root is not set", ", ".join(dropped))
  if eval_config.evals.get("benchmarks"):
    from eval.evaluators import EvalRunner

    runner = EvalRunner(eval_config, nnx.merge(graphdef, state["params"]), mesh)

  writer = MetricWriter(workdir, primary, tensorboard=config.get("tensorboard", True))
  preemption = Preemption()

  def save(step: int, force: bool = False):
    health = int(jax.device_get(state["nonfinite_step"]))
    if health >= 0:
      return  # never save a state that saw a non-finite update
    mngr.save(step, args=ckpt.ocp.args.Composite(**{
        ckpt.PARAMS: ckpt.ocp.args.StandardSave(state["params"]),
        ckpt.TRAIN: ckpt.ocp.args.StandardSave(
            {k: v for k, v in state.items() if k != "params"}),
        ckpt.DATA: grain.checkpoint.CheckpointSave(batches),
        ckpt.CONFIG: ckpt.ocp.args.JsonSave(ckpt.config_to_dict(config))}), force=force)

  def evaluate(step: int) -> dict[str, float]:
    if runner is None:
      return {}
    t0 = time.time()
    results = runner.run(state["params"])
    results = {f"eval/{k}": v for k, v in results.items()}
    results["eval/seconds"] = time.time() - t0
    writer.write(step, results)
    logging.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
    return results

  def check_health(step: int):
    bad = int(jax.device_get(state["nonfinite_step"]))
    if bad >= 0:
      good = mngr.latest_step()
      raise TrainingError(f"non-finite loss or gradient at step {bad + 1}; the run stops. The "
                          f"last good checkpoint is step {good} in {workdir}/checkpoints "
                          "(lower the learning rate or check the data, then re-run to resume)")

  # ---------------------------------------------------------------- loop
  flops = None
  peak = peak_flops(jax.devices()[0].device_kind)
  max_skipped = config.data.get("max_skipped")
  last = {}
  t_log, steps_since_log = time.time(), 0
  t_start = time.time()
  step = start_step
  logging.info("training from step %d to %d, global batch %d", start_step, total_steps,
               config.batch_size)
  try:
    with jax.set_mesh(mesh):
      while step < total_steps:
        batch, _ = next(batches)
        if flops is None:
          compiled = train_step.lower(state, batch).compile()
          flops = flops_per_step(compiled) or 0.0
          logging.info("compiled the step: %.3g FLOPs per step per device (XLA cost analysis)",
                       flops)
          t_log = time.time()  # throughput excludes compilation
        with jax.transfer_guard("disallow"):
          state, metrics = train_step(state, batch)
        step += 1
        steps_since_log += 1

        if step % config.log_every_steps == 0 or step == total_steps:
          check_health(step)
          m = jax.device_get(metrics)
          dt = time.time() - t_log
          rate = steps_since_log * config.batch_size / dt
          scalars = {k: float(v) for k, v in m.items()}
          scalars.update({"img_per_s": rate, "img_per_s_per_device": rate / n_dev,
                          "step_time_s": dt / steps_since_log,
                          "flops_per_step_per_device": flops})
          if flops and peak:
            scalars["mfu"] = flops * steps_since_log / dt / peak
          writer.write(step, scalars)
          last = scalars
          elapsed = time.time() - t_start
          eta = elapsed / max(step - start_step, 1) * (total_steps - step)
          logging.info("step %d/%d loss %.4f lr %.2e %.1f img/s ETA %s", step, total_steps,
                       scalars["loss"], scalars["lr"], rate, _eta(eta))
          t_log, steps_since_log = time.time(), 0
          if max_skipped is not None and scalars["skipped"] > max_skipped:
            raise TrainingError(
                f"{int(scalars['skipped'])} training examples were unusable (undecodable image, "
                f"NaN or flagged embedding, missing caption) by step {step}, more than "
                f"config.data.max_skipped={max_skipped}; see metrics.jsonl and the data report")

        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
          check_health(step)
          save(step)
        if config.get("eval_every_steps") and step % config.eval_every_steps == 0 \
            and step != total_steps:
          last.update(evaluate(step))
        if preemption.check(step):
          check_health(step)
          save(step, force=True)
          mngr.wait_until_finished()
          logging.warning("stopped at step %d after preemption; re-run to resume", step)
          return last

      check_health(step)
      if mngr.latest_step() != step:
        save(step, force=True)
      mngr.wait_until_finished()
      if runner is not None and (step > start_step or not last):
        last.update(evaluate(step))
  finally:
    preemption.restore()
    mngr.wait_until_finished()
    mngr.close()
    batches.close()
    writer.close()
  return last
