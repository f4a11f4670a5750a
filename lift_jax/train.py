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
import signal
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jax.experimental import multihost_utils

from lift_jax import checkpoint as ckpt
from lift_jax import cli, losses, optim, pretrained, sharding, startup, throughput
from lift_jax.data import pipeline, transforms
from lift_jax.lock import WorkdirLock
from lift_jax.metrics import MetricWriter, logged_evaluation
from lift_jax.models.two_tower import TwoTower
from lift_jax.skip_report import SkipReport
from lift_jax.throughput import Throughput


@cli.user_error
class TrainingError(RuntimeError):
  """The run cannot go on (non-finite loss, too many bad records, incompatible workdir)."""


class Preempted(cli.Interrupted):
  """Raised after a run stopped by a signal saved its checkpoint; re-running resumes it."""

  def __init__(self, step: int, signum: int):
    name = signal.Signals(signum).name
    super().__init__(f"stopped at step {step} by {name} after saving a checkpoint; re-run the "
                     "same command to resume", signum)
    self.step = step


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
  """SIGTERM or Ctrl-C -> save at the end of the current step, then stop (a second Ctrl-C
  interrupts at once). Several processes agree through JAX's preemption sync point, which
  catches SIGTERM itself (a Python handler there would silence it)."""

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
    logging.warning("%s received: saving a checkpoint at the end of this step, then stopping",
                    signal.Signals(signum).name)
    self.signum = signum

  def check(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signum is not None
    if multihost_utils.reached_preemption_sync_point(step):
      self.signum = self.signum or signal.SIGTERM
      return True
    return False

  def restore(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def global_counts(batches: pipeline.Batches) -> tuple[dict[str, int], int]:
  """The unusable-example counts by reason and the examples digest, over every process."""
  local = list(batches.reason_counts.values())
  digest = batches.digest
  if jax.process_count() == 1:
    return dict(zip(pipeline.REASONS, local)), digest
  # JAX gathers 32-bit integers (x64 is off): the 64-bit digest travels as four 16-bit pieces.
  pieces = [(digest >> (16 * i)) & 0xFFFF for i in range(4)]
  rows = np.asarray(multihost_utils.process_allgather(np.asarray(local + pieces, np.int64)))
  total = [int(x) for x in rows.reshape(jax.process_count(), -1).sum(0)]
  merged = sum(piece << (16 * i) for i, piece in enumerate(total[-4:])) & (2**64 - 1)
  return dict(zip(pipeline.REASONS, total[:-4])), merged


def position(batches: pipeline.Batches, config, mesh) -> ckpt.Position:
  """What the next checkpoint records of the data stream (the same on every process)."""
  counts, digest = global_counts(batches)
  return ckpt.Position(batches=batches.batches_served, reasons=list(counts.values()),
                       digest=digest, processes=jax.process_count(),
                       devices=int(mesh.devices.size), data=ckpt.data_digests(config))


# ==============================================================================================
# Building blocks shared with the benchmark tool
# ==============================================================================================


def make_mesh(config) -> jax.sharding.Mesh:
  startup.check_topology(config)  # the batch divides over the devices, the mesh fits them
  devices = jax.devices()
  if config.mesh.num_devices:
    devices = devices[: config.mesh.num_devices]
  return sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)


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
                                             list(config.sharding_rules))
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


def _on_every_process(fn: Callable[[], Any]) -> Any:
  """Runs ``fn`` on process 0 and gives its result, or its user error, to every process."""
  if jax.process_count() == 1:
    return fn()
  result, error = None, ""
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # noqa: BLE001 - passed on to every process, then re-raised
      if cli.describe(e) is None:
        raise
      error = cli.describe(e)
  message = multihost_utils.broadcast_one_to_all(
      np.frombuffer(error.encode().ljust(2048)[:2048], np.uint8))
  text = bytes(np.asarray(message)).decode(errors="replace").strip()
  if text:
    raise TrainingError(text)
  return result


def resume(mngr, state: dict[str, Any], config, mesh) -> tuple[dict[str, Any], ckpt.Position]:
  """The state and data position to start from: the newest intact step (a damaged one is moved
  aside, see :func:`lift_jax.checkpoint.resume_candidates`, and the one before it is tried),
  a pretrained tower on a fresh run, or the initial state."""
  directory = str(mngr.directory)
  while True:
    found = _on_every_process(lambda: [s for s, _ in ckpt.resume_candidates(directory, config)])
    mngr.reload()  # steps the checks moved aside
    step = int(multihost_utils.broadcast_one_to_all(np.int64(found[0] if found else -1))) \
        if jax.process_count() > 1 else (found[0] if found else -1)
    if step < 0:
      break
    position = ckpt.Position() if ckpt.is_params_only(ckpt.step_dir(directory, step)) \
        else ckpt.read_position(ckpt.step_dir(directory, step))
    try:
      restored, problem = ckpt.restore_state(mngr, step, state), ""
    except ckpt.DamagedStep as e:
      restored, problem = None, str(e)
    if jax.process_count() > 1:  # every process must agree that its part read back
      problem = problem or ("" if int(np.asarray(multihost_utils.process_allgather(
          np.int32(restored is None))).sum()) == 0 else "arrays of another process")
    if not problem:
      if position.processes and (position.processes, position.devices) != (
          jax.process_count(), mesh.devices.size):
        logging.info("resuming step %d, saved by %d processes x %d devices, on %d x %d: the data "
                     "stream goes on at global batch %d", step, position.processes,
                     position.devices // position.processes, jax.process_count(),
                     mesh.devices.size // jax.process_count(), position.batches)
      logging.info("resumed from step %d of %s", step, directory)
      return restored, position
    _on_every_process(lambda: ckpt.move_aside(ckpt.step_dir(directory, step), problem))
    mngr.reload()  # the manager forgets the step moved aside
  if ckpt.damaged_steps(directory) and not config.fresh_start_if_damaged:
    raise ckpt.no_intact_step(directory)
  if config.model.get("init_from"):  # a pretrained tower, on a fresh run only
    state = dict(state, params=pretrained.load_into(state["params"], config.model, config.optim))
  return state, ckpt.Position()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluators: MakeEvaluators | None = None) -> dict[str, Any]:
  """Trains (resuming from ``workdir`` if it holds checkpoints); returns the last metrics.

  ``evaluators`` builds what the run evaluates with (``lift_jax.main`` passes
  ``eval.runner.training_runner``); None trains without evaluating."""
  # ---------------------------------------------------------------- set-up (lift_jax.startup)
  primary = jax.process_index() == 0
  config = pretrained.resolve_shape(config)
  startup.check_config(config)
  startup.check_topology(config)
  startup.check_init_from(config)
  startup.check_data(config, warn=logging.warning)
  workdir = ckpt.open_workdir(workdir, config, primary)
  lock = WorkdirLock(workdir, config.lock_stale_seconds)
  _on_every_process(lock.acquire)
  try:
    # -------------------------------------------------------------- mesh
    mesh = make_mesh(config)
    logging.info("mesh %s over %d devices (%s), %d processes", dict(mesh.shape),
                 mesh.devices.size, jax.devices()[0].device_kind, jax.process_count())
    # -------------------------------------------------------------- model, optimizer, step
    setup = build(config, mesh)
    with jax.set_mesh(mesh):
      state = jax.jit(setup.init, out_shardings=setup.state_shardings)(
          jax.random.PRNGKey(config.seed))
    # -------------------------------------------------------------- resume
    mngr = ckpt.manager(ckpt.checkpoints_dir(workdir), keep=config.keep_checkpoints,
                        keep_period=config.keep_checkpoint_every_steps,
                        async_save=config.async_checkpoints)
    state, start = resume(mngr, state, config, mesh)
    start_step = int(jax.device_get(state["step"]))
    # -------------------------------------------------------------- evaluators
    runner = evaluators(config, nnx.merge(setup.graphdef, state["params"]), mesh) \
        if evaluators else None
    # -------------------------------------------------------------- data
    dataset = pipeline.train_dataset(config, jax.process_index(), jax.process_count(),
                                     warn=logging.warning, start_batch=start.batches)
    batches = pipeline.Batches(dataset, setup.batch_sharding, prefetch=config.data.prefetch,
                               start=(start.batches, start.reasons if primary else (),
                                      start.digest if primary else 0))
    return _loop(config, workdir, mngr, setup, state, batches, runner, mesh, start_step)
  finally:
    if primary:
      lock.release()


def _loop(config, workdir, mngr, setup, state, batches, runner, mesh, start_step):
  """Steps from ``start_step`` to ``config.total_steps``: logging, checkpoints, evaluations, the
  checks that stop a run, preemption."""
  primary, total_steps, step = jax.process_index() == 0, int(config.total_steps), start_step
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
    counts, digest = global_counts(batches)
    problem = skips.update(step, counts, digest)
    if problem:
      raise TrainingError(problem)
    return counts

  def save(step: int, force: bool = False):
    check(step)  # never save a state that saw a non-finite update or learned from nothing
    ckpt.save_state(mngr, step, state, position(batches, config, mesh), config, force=force)

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

        if (config.log_every_steps and step % config.log_every_steps == 0) or \
            step == total_steps:
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
          logging.warning("saving at step %d (%s), then stopping", step,
                          signal.Signals(preemption.signum).name)
          save(step, force=True)
          ckpt.wait_for_saves(mngr)
          raise Preempted(step, preemption.signum)

      if mngr.latest_step() != step:
        save(step, force=True)
      ckpt.wait_for_saves(mngr)
      earlier = logged_evaluation(workdir, step) if step == start_step else {}
      if earlier:  # a finished run started again: its evaluation is not logged twice
        logging.info("step %d was evaluated when the run finished (metrics.jsonl); "
                     "`python -m eval.main --workdir=%s` evaluates it again", step, workdir)
        last.update(earlier)
      elif runner is not None and (step > start_step or not last):
        last.update(evaluate(step))
  finally:
    preemption.restore()
    try:
      mngr.close()
    finally:
      batches.close()
      writer.close()
  return last
