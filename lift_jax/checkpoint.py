"""Checkpoints: orbax CheckpointManager steps holding everything a run needs to resume exactly.

Layout of a workdir::

    DIR/config.json                  the resolved config of the run
    DIR/checkpoints/<step>/params    model parameters (a plain nested dict of arrays)
    DIR/checkpoints/<step>/train     optimizer state, step, RNG key
    DIR/checkpoints/<step>/data      the input iterator's state (grain; one file per process)
    DIR/checkpoints/<step>/config    the config again, so that a step folder stands alone

The trainer's side: :func:`open_workdir` (writability, config compatibility, ``config.json``),
:func:`manager`, :func:`save_state` / :func:`restore_state` (the orbax items of a step).

``load_model(path)`` takes a workdir (its latest step), a ``checkpoints`` folder or one step folder,
and returns the model with its config; only ``params`` and ``config`` are read. Checkpoints written
by ``lift_jax.tools.import_torch`` hold only those two items; training started on such a workdir
takes the parameters and starts a fresh optimizer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from lift_jax import cli, common
from lift_jax.models.two_tower import TwoTower

PARAMS, TRAIN, DATA, CONFIG = "params", "train", "data", "config"
CHECKPOINTS = "checkpoints"
CONFIG_JSON = "config.json"
# Model fields that do not change the parameters: a resumed run may change them.
NON_SHAPE_MODEL_FIELDS = ("dtype", "remat", "attention_impl", "init_from",
                          "init_from_params")


@cli.user_error
class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete or does not fit the config; the message says which."""


def _handlers(with_data: bool):
  handlers = {PARAMS: ocp.StandardCheckpointHandler(), TRAIN: ocp.StandardCheckpointHandler(),
              CONFIG: ocp.JsonCheckpointHandler()}
  if with_data:
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
      read_only=read_only,
      # The step folder is made before save() returns: a folder that cannot be written fails
      # there, at once, instead of after orbax's 300 s wait for a background thread's signal.
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
  return ocp.CheckpointManager(epath.Path(directory), options=options,
                               item_handlers=_handlers(with_data))


def config_to_dict(config) -> dict[str, Any]:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


# --------------------------------------------------------------------------------------------
# The trainer's workdir
# --------------------------------------------------------------------------------------------


def check_writable(folder: str) -> None:
  """Creates ``folder`` and a file in it; a failure names the folder and the cause."""
  probe = os.path.join(folder, f".write-test-{os.getpid()}")
  try:
    os.makedirs(folder, exist_ok=True)
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f"{folder} is not writable ({e.strerror or e}): free space, fix its "
                          "permissions or choose another --workdir") from None


def check_compatible(saved: dict[str, Any], config) -> None:
  """Refuses to resume a workdir whose checkpoints were made for another model or batch shape."""
  current = config_to_dict(config)
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
  compare(saved.get("batch_size"), current.get("batch_size"), "batch_size")
  # optim.frozen decides which parameters have optimizer state.
  compare(list(saved.get("optim", {}).get("frozen") or ()),
          list(current.get("optim", {}).get("frozen") or ()), "optim.frozen")
  if diffs:
    raise CheckpointError("the workdir's checkpoints were made with a different model or data "
                          "shape; use a new --workdir or restore the config. Differences:\n" +
                          "\n".join(diffs))


def open_workdir(workdir: str, config, primary: bool = True) -> str:
  """Checks that ``workdir`` (and its checkpoints folder) can be written and that its
  checkpoints fit ``config``; writes ``config.json``. Returns the absolute workdir."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  check_writable(workdir)
  check_writable(os.path.join(workdir, CHECKPOINTS))
  config_file = os.path.join(workdir, CONFIG_JSON)
  has_steps = bool(steps(checkpoints_dir(workdir)))
  if has_steps and os.path.exists(config_file):
    with open(config_file, encoding="utf-8") as f:
      check_compatible(json.load(f), config)
  if primary:
    common.write_json_atomic(config_file, config_to_dict(config), sort_keys=False)
  return workdir


def save_state(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any], data_iterator,
               config, force: bool = False) -> None:
  """Saves a train state (params, the rest of the state, the data iterator, the config) as one
  step. A write that fails (read-only folder, disk full) raises a CheckpointError naming the
  folder and the cause; the steps already written stay as they are."""
  args = ocp.args.Composite(**{
      PARAMS: ocp.args.StandardSave(state["params"]),
      TRAIN: ocp.args.StandardSave({k: v for k, v in state.items() if k != "params"}),
      DATA: grain.checkpoint.CheckpointSave(data_iterator),
      CONFIG: ocp.args.JsonSave(config_to_dict(config))})
  with _save_errors(mngr, step):
    mngr.save(step, args=args, force=force)


def wait_for_saves(mngr: ocp.CheckpointManager) -> None:
  """Waits for background saves; a failed one raises a CheckpointError naming the folder."""
  with _save_errors(mngr, None):
    mngr.wait_until_finished()


class _save_errors:  # pylint: disable=invalid-name
  """Turns an exception of an orbax save into a one-line CheckpointError."""

  def __init__(self, mngr, step):
    self.directory, self.step = str(mngr.directory), step

  def __enter__(self):
    return self

  def __exit__(self, kind, e, tb):
    if e is None or not isinstance(e, Exception) or isinstance(e, CheckpointError):
      return False
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:
      if isinstance(cause, OSError):
        break
      cause = cause.__cause__ or cause.__context__
    code = re.search(r"os_error_code='(\d+)'", str(e))  # tensorstore's wording of an OSError
    if isinstance(cause, OSError):
      what = cause.strerror or str(cause)
      where = cause.filename or self.directory
    elif code:
      what, where = os.strerror(int(code[1])), self.directory
    else:
      what, where = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", \
          self.directory
    step = f"step {self.step}" if self.step is not None else "a checkpoint"
    raise CheckpointError(f"could not save {step} in {self.directory} ({what}: {where}); the "
                          "run stops. Earlier checkpoints there are intact: free space or fix "
                          "the folder's permissions, then re-run to resume") from None


def restore_state(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any],
                  data_iterator, config) -> dict[str, Any]:
  """The train state of ``step``, restored into the shardings of ``state`` (which it
  replaces); the data iterator's position is restored in place. A params-only step (imported
  from PyTorch) gives its parameters and keeps the rest of ``state`` (fresh optimizer, data)."""
  step_dir = os.path.join(str(mngr.directory), str(step))
  check_compatible(read_config(step_dir).to_dict(), config)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
  if not os.path.isdir(os.path.join(step_dir, TRAIN)):
    params, _ = restore_params(step_dir, target["params"])
    logging.info("initialised parameters from %s; optimizer and data start fresh", step_dir)
    return dict(state, params=params)
  restored = mngr.restore(step, args=ocp.args.Composite(**{
      PARAMS: ocp.args.StandardRestore(target["params"]),
      TRAIN: ocp.args.StandardRestore({k: v for k, v in target.items() if k != "params"}),
      DATA: grain.checkpoint.CheckpointRestore(data_iterator)}))
  return {"params": restored[PARAMS], **restored[TRAIN]}


def steps(directory: str) -> list[int]:
  """The finished steps (a step folder holding ``params``) of a checkpoints folder, ascending."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d, PARAMS)))


def checkpoints_dir(workdir: str) -> str:
  """The checkpoints folder of a workdir."""
  return os.path.join(workdir, CHECKPOINTS)


def latest_step(workdir: str) -> int | None:
  """The newest finished step of a workdir, or None."""
  found = steps(checkpoints_dir(workdir))
  return found[-1] if found else None


def is_checkpoint(path: str) -> bool:
  """Whether ``path`` is a lift_jax workdir, checkpoints folder or step folder."""
  if not os.path.isdir(path):
    return False
  return (os.path.isdir(os.path.join(path, CHECKPOINTS)) or
          os.path.isdir(os.path.join(path, PARAMS)) or bool(steps(path)))


def workdir_of(directory: str) -> str:
  """The workdir of a checkpoints folder (the folder itself when it is not one)."""
  directory = os.path.abspath(directory)
  return os.path.dirname(directory) if os.path.basename(directory) == CHECKPOINTS else directory


def workdir_config(workdir: str) -> dict[str, Any]:
  """The ``config.json`` a run wrote into its workdir."""
  path = os.path.join(workdir, CONFIG_JSON)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e})") from None


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
  found = steps(path)
  if not found:
    raise CheckpointError(f"{path}: holds no finished checkpoint step")
  return path, found[-1]


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
  common.write_json_atomic(os.path.join(workdir, CONFIG_JSON), cfg, sort_keys=False)
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


@cli.user_error
class OutputFolderError(ValueError):
  """The output folder already holds something an import would sit beside."""


def prepare_import_output(output: str, overwrite: bool = False) -> None:
  """Refuses a non-empty ``output`` for a params-only import: step 0 written beside a training
  run's later steps would never be read (eval and training take the latest step). With
  ``overwrite``, the folder's checkpoints and ``config.json`` are removed first; nothing else is
  touched."""
  if os.path.exists(output) and not os.path.isdir(output):
    raise OutputFolderError(f"--output={output} is a file, not a folder")
  if not os.path.isdir(output) or not os.listdir(output):
    return
  held = sorted(os.listdir(output))
  if not overwrite:
    folder = checkpoints_dir(output)
    what = (f"checkpoint steps {sorted(os.listdir(folder))[:5]}" if os.path.isdir(folder)
            else f"{held[:5]}")
    raise OutputFolderError(
        f"--output={output} is not empty (it holds {what}); an import writes step 0 there and "
        "eval or training would read the latest step instead. Give a new folder, or add "
        "--overwrite to replace its checkpoints and config.json")
  for name in (CHECKPOINTS, CONFIG_JSON):
    path = os.path.join(output, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
