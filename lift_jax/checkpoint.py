"""Checkpoints: orbax CheckpointManager steps holding everything a run needs to resume exactly.

Layout of a workdir::

    DIR/config.json                  the resolved config of the run
    DIR/checkpoints/<step>/params    model parameters (a plain nested dict of arrays)
    DIR/checkpoints/<step>/train     optimizer state, step, RNG key
    DIR/checkpoints/<step>/data      the input iterator's state (grain; one file per process)
    DIR/checkpoints/<step>/config    the config again, so that a step folder stands alone

``load_model(path)`` takes a workdir (its latest step), a ``checkpoints`` folder or one step folder,
and returns the model with its config; only ``params`` and ``config`` are read. Checkpoints written
by ``lift_jax.tools.import_torch`` hold only those two items; training started on such a workdir
takes the parameters and starts a fresh optimizer.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from lift_jax import cli

PARAMS, TRAIN, DATA, CONFIG = "params", "train", "data", "config"
CHECKPOINTS = "checkpoints"


@cli.user_error
class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete or does not fit the config; the message says which."""


def _handlers(with_data: bool):
  handlers = {PARAMS: ocp.StandardCheckpointHandler(), TRAIN: ocp.StandardCheckpointHandler(),
              CONFIG: ocp.JsonCheckpointHandler()}
  if with_data:
    import grain

    handlers[DATA] = grain.checkpoint.CheckpointHandler()
  return handlers


def manager(directory: str, *, keep: int | None = 3, keep_period: int | None = None,
            async_save: bool = True, with_data: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over ``directory`` (the ``checkpoints`` folder of a workdir).

  ``keep``: how many of the latest steps to keep (None: all); ``keep_period``: also keep every
  step divisible by it.
  """
  policies = []
  if keep is not None:
    policies.append(ocp.checkpoint_managers.LatestN(keep))
  if keep_period:
    policies.append(ocp.checkpoint_managers.EveryNSteps(keep_period))
  policy = ocp.checkpoint_managers.AnyPreservationPolicy(policies) if policies else None
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=async_save, preservation_policy=policy, create=not read_only,
      read_only=read_only)
  return ocp.CheckpointManager(epath.Path(directory), options=options,
                               item_handlers=_handlers(with_data))


def config_to_dict(config) -> dict[str, Any]:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def resolve(path: str) -> tuple[str, int]:
  """A workdir, checkpoints folder or step folder -> (checkpoints folder, step)."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such checkpoint or workdir")
  if os.path.isdir(os.path.join(path, CHECKPOINTS)):
    path = os.path.join(path, CHECKPOINTS)
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, PARAMS)):
    return os.path.dirname(path), int(base)
  steps = sorted(int(d) for d in os.listdir(path)
                 if d.isdigit() and os.path.isdir(os.path.join(path, d, PARAMS)))
  if not steps:
    raise CheckpointError(f"{path}: holds no finished checkpoint step")
  return path, steps[-1]


def read_config(path: str) -> ml_collections.ConfigDict:
  """The config stored with a checkpoint (workdir, checkpoints folder or step folder)."""
  directory, step = resolve(path)
  mngr = manager(directory, with_data=False, read_only=True, async_save=False)
  try:
    cfg = mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
  finally:
    mngr.close()
  return ml_collections.ConfigDict(cfg)


def restore_params(path: str, abstract_params=None):
  """(params, step) of a checkpoint; with ``abstract_params`` (ShapeDtypeStructs with shardings)
  the arrays are restored into those shardings, and shapes are checked."""
  directory, step = resolve(path)
  mngr = manager(directory, with_data=False, read_only=True, async_save=False)
  try:
    if abstract_params is None:  # as saved, onto this process's first device
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      meta = mngr.item_metadata(step)[PARAMS]
      abstract_params = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    try:
      restored = mngr.restore(
          step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(abstract_params)}))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{directory}/{step}/params does not fit the model: {e}") from None
  finally:
    mngr.close()
  return restored[PARAMS], step


def save_params(workdir: str, step: int, params, config) -> str:
  """Writes a params-only checkpoint step (plus config.json) that eval loads and training
  starts from. Returns the step folder."""
  os.makedirs(workdir, exist_ok=True)
  cfg = config_to_dict(config)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(cfg, f, indent=1)
  mngr = manager(os.path.join(workdir, CHECKPOINTS), with_data=False, async_save=False, keep=None)
  try:
    mngr.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params),
                                               CONFIG: ocp.args.JsonSave(cfg)}), force=True)
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return os.path.join(workdir, CHECKPOINTS, str(step))


def load_model(path: str, dtype: str | None = None):
  """(model, config) from a workdir, checkpoints folder or step folder.

  ``dtype`` overrides the compute dtype stored in the config (e.g. "float32" for exact eval).
  """
  from flax import nnx

  from lift_jax.models.two_tower import TwoTower

  config = read_config(path)
  model_cfg = config.model.to_dict()
  if dtype:
    model_cfg["dtype"] = dtype
  abstract = nnx.eval_shape(lambda: TwoTower(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nnx.to_pure_dict(abstract_state))
  params, _ = restore_params(path, target)
  return nnx.merge(graphdef, params), config
