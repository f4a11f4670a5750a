"""The training loop: LIFT (fixed text embeddings) or the CLIP baseline (trainable text tower).

Read top to bottom: the jitted step, the building blocks the benchmark tool shares (mesh, model
and optimizer built abstractly then created directly into their shardings), then
:func:`train_and_evaluate`: set-up, mesh, data, model and optimizer, resume, evaluators, the loop.
Its collaborators each own one job: :mod:`lift_jax.checkpoint` the workdir and orbax,
:mod:`lift_jax.data.pipeline` the batches (and the per-reason counts of unusable examples),
:mod:`lift_jax.metrics` the metric files, throughput/MFU/ETA and ``data_report.json``,
the evaluators the caller hands in (:class:`Evaluators`). Data preparation (``data.prepare``) is a
step of its own (:mod:`lift_jax.prepare`), run by ``lift_jax.main`` before this module is entered.

A run stopped by SIGTERM or Ctrl-C saves a checkpoint and raises :class:`Preempted`;
``lift_jax.main`` exits with its ``exit_code`` (128 + the signal: 143, 130).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lift_jax import checkpoint as ckpt
from lift_jax import cli, losses, optim, pretrained, sharding
from lift_jax.data import pipeline, transforms
from lift_jax.metrics import MetricWriter
from lift_jax.skip_report import SkipReport
from lift_jax import throughput
from lift_jax.throughput import Throughput
from lift_jax.models.two_tower import TwoTower


@cli.user_error
class TrainingError(RuntimeError):
  """The run cannot go on (non-finite loss, too many bad records, incompatible workdir)."""


class Preempted(Exception):
  """Raised after a run stopped by a signal saved its checkpoint; re-running resumes it."""

  def __init__(self, step: int, signum: int):
    name = signal.Signals(signum).name
    super().__init__(f"stopped at step {step} by {name} after saving a checkpoint; re-run the "
                     "same command to resume")
    self.step, self.exit_code = step, 128 + int(signum)


# ==============================================================================================
# The step
# ==============================================================================================


def make_train_step(graphdef, config, tx, schedule):
  """Returns step(state, batch) -> (state, metrics), a pure function for jax.jit."""
  loss_name, data_cfg = config.model.loss, config.data
  loss_params = tuple(losses.get(loss_name).params)  # the model parameters the loss reads
  accum = int(config.optim.grad_accum_steps)
  mean, std = tuple(data_cfg.mean), tuple(data_cfg.std)

  def towers(params, images, text):
    model = nnx.merge(graphdef, params)
    return model(transforms.normalize(images, mean, std), text)

  def loss_of_features(zimg, ztxt, params, valid):
    return losses.contrastive_loss(loss_name, zimg, ztxt, {k: params[k] for k in loss_params},
                                   valid)

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
    new_params = losses.constrain(loss_name, optax.apply_updates(params, updates))
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
# Preemption
# ==============================================================================================


class Preemption:
  """SIGTERM or Ctrl-C -> save and stop (a second Ctrl-C interrupts at once). Multi-process runs
  agree through jax's preemption sync point."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}
    if jax.process_count() == 1:
      for sig in self.SIGNALS:
        try:
          self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. called from a test runner thread)
          pass

  def _handle(self, signum, frame):
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning("%s received: saving a checkpoint, then stopping",
                    signal.Signals(signum).name)
    self.signum = signum

  def check(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signum is not None
    from jax.experimental import multihost_utils

    try:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        return True
    except Exception:  # no preemption service (e.g. local CPU processes)
      pass
    return False

  def restore(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def reason_counts(batches: pipeline.Batches) -> dict[str, int]:
  """The unusable-example counts by reason, summed over every process."""
  local = batches.reason_counts
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  total = multihost_utils.process_allgather(np.asarray(list(local.values()), np.int64))
  return dict(zip(local, np.asarray(total).reshape(jax.process_count(), -1).sum(0).tolist()))


# ==============================================================================================
# Building blocks shared with the benchmark tool
# ==============================================================================================


def make_mesh(config) -> jax.sharding.Mesh:
  devices = jax.devices()
  if config.mesh.num_devices:
    devices = devices[: config.mesh.num_devices]
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
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
          "valid": jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=batch_sharding)}


# ==============================================================================================
# train_and_evaluate
# ==============================================================================================


class Evaluators(Protocol):
  """What the loop evaluates with (``eval.runner.EvalRunner`` is one): ``run(params,
  keep_going=True)`` -> {"<benchmark>/<metric>": value}, and the seconds each benchmark took."""
  timings: dict[str, float]

  def run(self, params, keep_going: bool = False) -> dict[str, float]:
    ...


# (config, model, mesh) -> Evaluators, or None when the config names no benchmark.
MakeEvaluators = Callable[[ml_collections.ConfigDict, nnx.Module, jax.sharding.Mesh],
                          "Evaluators | None"]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluators: MakeEvaluators | None = None) -> dict[str, Any]:
  """Trains (resuming from ``workdir`` if it holds checkpoints); returns the last metrics.

  ``evaluators`` builds what the run evaluates with (``lift_jax.main`` passes
  ``eval.runner.training_runner``); None trains without evaluating."""
  # ---------------------------------------------------------------- set-up
  primary = jax.process_index() == 0
  pipeline.require_paths(config)
  workdir = ckpt.open_workdir(workdir, config, primary)
  total_steps = int(config.total_steps)

  # ---------------------------------------------------------------- mesh
  mesh = make_mesh(config)
  logging.info("mesh %s over %d devices (%s), %d processes", dict(mesh.shape), mesh.devices.size,
               jax.devices()[0].device_kind, jax.process_count())

  # ---------------------------------------------------------------- data
  dataset = pipeline.train_dataset(config, jax.process_index(), jax.process_count(),
                                   warn=logging.warning)
  batches = pipeline.Batches(dataset, sharding.batch_sharding(mesh), prefetch=config.data.prefetch)

  # ---------------------------------------------------------------- model, optimizer, step
  setup = build(config, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(setup.init, out_shardings=setup.state_shardings)(
        jax.random.PRNGKey(config.seed))

  # ---------------------------------------------------------------- resume
  mngr = ckpt.manager(os.path.join(workdir, ckpt.CHECKPOINTS), keep=config.keep_checkpoints,
                      keep_period=config.keep_checkpoint_every_steps,
                      async_save=config.async_checkpoints)
  if mngr.latest_step() is not None:
    state = ckpt.restore_state(mngr, mngr.latest_step(), state, batches, config)
    logging.info("resumed from step %d of %s", mngr.latest_step(), mngr.directory)
  elif config.model.get("init_from"):  # a pretrained tower, on a fresh run only
    state = dict(state, params=pretrained.load_into(state["params"], config.model))
  start_step = step = int(jax.device_get(state["step"]))

  # ---------------------------------------------------------------- evaluators
  runner = evaluators(config, nnx.merge(setup.graphdef, state["params"]), mesh) \
      if evaluators else None

  # ---------------------------------------------------------------- loop
  writer = MetricWriter(workdir, primary, tensorboard=config.tensorboard, resume_step=start_step,
                        wandb=config.get("wandb"), run_config=ckpt.config_to_dict(config))
  skips = SkipReport(workdir, primary, max_skipped=config.data.max_skipped,
                     max_fraction=config.data.max_skipped_fraction,
                     sources={"images": config.data.images, "embeddings": config.data.embeddings})
  speed = Throughput(start_step=start_step, total_steps=total_steps,
                     batch_size=config.batch_size, num_devices=mesh.devices.size,
                     device_kind=jax.devices()[0].device_kind)
  preemption = Preemption()
  last: dict[str, float] = {}

  def check(step: int) -> dict[str, int]:
    """Stops a run that went non-finite or learns from unusable data; the counts by reason."""
    bad = int(jax.device_get(state["nonfinite_step"]))
    if bad >= 0:
      raise TrainingError(f"non-finite loss or gradient at step {bad + 1}; the run stops. The "
                          f"last good checkpoint is step {mngr.latest_step()} in "
                          f"{mngr.directory} (lower the learning rate or check the data, then "
                          "re-run to resume)")
    counts = reason_counts(batches)
    problem = skips.update(step, counts)
    if problem:
      raise TrainingError(problem)
    return counts

  def save(step: int, force: bool = False):
    check(step)  # never save a state that saw a non-finite update or learned from nothing
    ckpt.save_state(mngr, step, state, batches, config, force=force)

  def evaluate(step: int) -> dict[str, float]:
    if runner is None:
      return {}
    results = {f"eval/{k}": v for k, v in runner.run(state["params"], keep_going=True).items()}
    results["eval/seconds"] = sum(runner.timings.values())
    writer.write(step, results)
    logging.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
    return results

  logging.info("training from step %d to %d, global batch %d", start_step, total_steps,
               config.batch_size)
  try:
    with jax.set_mesh(mesh):
      while step < total_steps:
        batch, _ = next(batches)
        if speed.flops is None:
          speed.compiled(throughput.flops_per_step(setup.step.lower(state, batch).compile()))
          logging.info("compiled the step: %.3g FLOPs per step per device (XLA cost analysis)",
                       speed.flops)
        with jax.transfer_guard("disallow"):
          state, metrics = setup.step(state, batch)
        step += 1
        speed.step()

        if step % config.log_every_steps == 0 or step == total_steps:
          counts = check(step)
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          scalars.update(speed.report())
          scalars.update({f"skipped/{k}": v for k, v in skips.skipped(counts).items()})
          writer.write(step, scalars)
          last = scalars
          logging.info("step %d/%d loss %.4f lr %.2e %.1f img/s ETA %s, %s", step, total_steps,
                       scalars["loss"], scalars["lr"], scalars["img_per_s"], speed.eta(step),
                       skips.summary(counts))
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
          save(step)
        if config.eval_every_steps and step % config.eval_every_steps == 0 \
            and step != total_steps:
          last.update(evaluate(step))
        if preemption.check(step):
          save(step, force=True)
          ckpt.wait_for_saves(mngr)
          raise Preempted(step, preemption.signum)

      if mngr.latest_step() != step:
        save(step, force=True)
      ckpt.wait_for_saves(mngr)
      if runner is not None and (step > start_step or not last):
        last.update(evaluate(step))
  finally:
    preemption.restore()
    try:
      mngr.close()
    finally:
      batches.close()
      writer.close()
  return last
