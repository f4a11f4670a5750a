"""Checkpoints and the workdir: the one module that knows their layout.

Layout of a workdir::

    DIR/config.json                  the resolved config of the run (+ "run": the data it read)
    DIR/lock.json                    the trainer that holds the workdir (lift_jax.lock)
    DIR/checkpoints/<step>/params    model parameters (a plain nested dict of arrays)
    DIR/checkpoints/<step>/train     optimizer state, step, RNG key
    DIR/checkpoints/<step>/position  where the data stream is: batches handed out, the counts of
                                     unusable examples, the examples digest, the topology and the
                                     data it read (JSON; independent of the process count)
    DIR/checkpoints/<step>/config    the config again, so that a step folder stands alone
    DIR/checkpoints/<step>.damaged   a step found damaged at start, moved aside (never deleted)

Steps written before the ``position`` item hold ``data`` instead (grain's per-process iterator
files); they resume through :func:`read_position`. A params-only step (``params`` + ``config``,
written by :func:`save_params`: ``lift_jax.tools.import_torch``) starts a run with a fresh
optimizer at step 0.

The trainer's side: :func:`open_workdir` (writability, compatibility, the data a run read,
``config.json``), :func:`manager`, :func:`save_state`, :func:`resume` (the newest intact step,
damaged ones moved aside) and :func:`restore_state`. Readers: :func:`load_model`,
:func:`restore_params`, :func:`read_config`, :func:`steps`, :func:`resolve`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from lift_jax import cli, common
from lift_jax.data import records
from lift_jax.models.two_tower import TwoTower
from lift_jax.sharding import path_str

PARAMS, TRAIN, POSITION, CONFIG = "params", "train", "position", "config"
LEGACY_DATA = "data"  # grain's iterator files, in steps written before the position item
TRAINING_ITEMS = (PARAMS, TRAIN, POSITION, CONFIG)
# The orbax handler of each item (an item is one of these plus its save and restore arguments
# in save_state / restore_state; see the README's "Extending").
HANDLERS = {PARAMS: ocp.StandardCheckpointHandler, TRAIN: ocp.StandardCheckpointHandler,
            POSITION: ocp.JsonCheckpointHandler, CONFIG: ocp.JsonCheckpointHandler}
CHECKPOINTS = "checkpoints"
CONFIG_JSON = "config.json"
DAMAGED = ".damaged"
IMPORTED = "_imported_from"  # key of a params-only step's stored config
# Model fields that do not change the parameters: a resumed run may change them.
NON_SHAPE_MODEL_FIELDS = ("dtype", "remat", "attention_impl", "init_from",
                          "init_from_params", "tower_shape")


@cli.user_error
class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete or does not fit the config; the message says which."""


class DamagedStep(CheckpointError):
  """A step folder that cannot be read as written: an item missing, unreadable metadata, arrays
  that do not read back."""


def manager(directory: str, *, keep: int | None = 3, keep_period: int | None = None,
            async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
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
                               item_handlers={k: h() for k, h in HANDLERS.items()})


def config_to_dict(config) -> dict[str, Any]:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


# --------------------------------------------------------------------------------------------
# The trainer's workdir
# --------------------------------------------------------------------------------------------


def check_writable(folder: str, create: bool = True) -> None:
  """Creates ``folder`` and a file in it (``create=False``, for the preflight: writes nothing,
  asks the filesystem instead); a failure names the folder and the cause."""
  folder = os.path.abspath(folder)
  existing = folder
  while not os.path.exists(existing):  # the nearest existing parent (/ always exists)
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise CheckpointError(f"{existing} is a file, so {folder} cannot be a folder; choose "
                          "another --workdir")
  if not create:
    if not os.access(existing, os.W_OK | os.X_OK):
      raise CheckpointError(f"{existing} is not writable (permission denied): fix its "
                            "permissions or choose another --workdir")
    return
  probe = os.path.join(folder, f".write-test-{os.getpid()}")
  try:
    os.makedirs(folder, exist_ok=True)
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f"{folder} is not writable ({e.strerror or e}): free space, fix its "
                          "permissions or choose another --workdir") from None


def compatibility_problems(saved: dict[str, Any], config) -> list[str]:
  """How a config differs from the one a workdir's checkpoints were made with, in what decides
  the shapes of the saved state (model, batch, frozen parameters); [] when it may resume."""
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
      diffs.append(f"{path}: checkpoint {a!r}, config {b!r}")

  compare(saved.get("model", {}), current.get("model", {}), "model")
  compare(saved.get("batch_size"), current.get("batch_size"), "batch_size")
  # optim.frozen decides which parameters have optimizer state.
  compare(list(saved.get("optim", {}).get("frozen") or ()),
          list(current.get("optim", {}).get("frozen") or ()), "optim.frozen")
  return diffs


def check_compatible(saved: dict[str, Any], config) -> None:
  """Refuses to resume a workdir whose checkpoints were made for another model or batch shape."""
  diffs = compatibility_problems(saved, config)
  if diffs:
    raise CheckpointError("the workdir's checkpoints were made with a different model or data "
                          "shape; use a new --workdir or restore the config. Differences:\n" +
                          "\n".join(f"  {d}" for d in diffs))


def data_digests(config) -> dict[str, str | None]:
  """A digest of each data folder a config reads (from its manifest: shard names, counts and
  SHA-256s; None for a folder without one), recorded with every checkpoint."""
  out = {}
  for name in ("images", "embeddings"):
    folder = config.data.get(name)
    if name == "embeddings" and config.model.mode != "lift":
      continue
    digest = None
    if folder and os.path.exists(os.path.join(folder, records.MANIFEST)):
      shards = records.read_manifest(folder)["shards"]
      listed = [[e.get("file"), e.get("count"), e.get("sha256")] for e in shards
                if isinstance(e, dict)]
      digest = hashlib.sha256(json.dumps(listed).encode()).hexdigest()[:16]
    out[name] = digest
  return out


def check_same_data(recorded: dict[str, Any] | None, config, where: str) -> None:
  """Refuses to resume on other data than a checkpoint was trained on, unless
  ``data.allow_new_data``."""
  if not recorded or config.data.get("allow_new_data"):
    return
  now = data_digests(config)
  changed = [name for name, digest in recorded.items()
             if digest and now.get(name) and digest != now[name]]
  if changed:
    folders = ", ".join(f"data.{n}={config.data.get(n)}" for n in changed)
    raise CheckpointError(
        f"{where} was trained on other data than {folders} holds now (the manifests differ): "
        "point data.* at the data the run started with, use a new --workdir, or set "
        "--config.data.allow_new_data=True to go on with this data")


def open_workdir(workdir: str, config, primary: bool = True, write: bool = True) -> str:
  """Checks that ``workdir`` (and its checkpoints folder) can be written and that its
  checkpoints fit ``config``; writes ``config.json`` (``write=False``, the preflight: checks
  only, writes nothing). Returns the absolute workdir."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  check_writable(workdir, create=write)
  check_writable(checkpoints_dir(workdir), create=write)
  config_file = os.path.join(workdir, CONFIG_JSON)
  if steps(checkpoints_dir(workdir)) and os.path.exists(config_file):
    check_compatible(workdir_config(workdir), config)
  if primary and write:
    saved = config_to_dict(config)
    saved["run"] = {"data_digests": data_digests(config)}
    common.write_json_atomic(config_file, saved, sort_keys=False)
  return workdir


# --------------------------------------------------------------------------------------------
# Steps: listing, checking, moving aside
# --------------------------------------------------------------------------------------------


def steps(directory: str) -> list[int]:
  """The steps (a step folder holding ``params``) of a checkpoints folder, ascending."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d, PARAMS)))


def checkpoints_dir(workdir: str) -> str:
  """The checkpoints folder of a workdir."""
  return os.path.join(workdir, CHECKPOINTS)


def step_dir(directory: str, step: int) -> str:
  return os.path.join(directory, str(step))


def latest_step(workdir: str) -> int | None:
  """The newest step of a workdir, or None."""
  found = steps(checkpoints_dir(workdir))
  return found[-1] if found else None


def damaged_steps(directory: str) -> list[str]:
  """The step folders moved aside as damaged."""
  return sorted(glob.glob(os.path.join(glob.escape(directory), f"*{DAMAGED}*")))


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


def _read_json_item(folder: str, item: str) -> Any:
  """The value orbax's JSON handler wrote for ``item`` in a step folder."""
  path = os.path.join(folder, item, "metadata")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise DamagedStep(f"{folder}: its {item} item is missing ({path})") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DamagedStep(f"{folder}: its {item} item is not readable ({path}: {e})") from None


def is_params_only(folder: str) -> bool:
  """A params-only step (an import): it says so, or (written before it said so) it is step 0
  with neither train state nor data position."""
  if os.path.isdir(os.path.join(folder, TRAIN)):
    return False
  config = _read_json_item(folder, CONFIG)
  if isinstance(config, dict) and IMPORTED in config:
    return True
  return os.path.basename(folder) == "0" and not any(
      os.path.isdir(os.path.join(folder, i)) for i in (POSITION, LEGACY_DATA))


def step_problem(folder: str) -> str | None:
  """Why a step folder cannot be resumed from (an item missing, metadata unreadable), or None.
  Cheap: reads metadata, not arrays."""
  try:
    _read_json_item(folder, CONFIG)
    for item in (PARAMS,):
      if not os.path.isdir(os.path.join(folder, item)):
        return f"its {item} item is missing"
    if is_params_only(folder):
      return None
    if not os.path.isdir(os.path.join(folder, TRAIN)):
      return "its train item (optimizer state) is missing"
    read_position(folder)
    for item in (PARAMS, TRAIN):
      if not os.path.isfile(os.path.join(folder, item, "_METADATA")):
        return f"its {item} item has no metadata"
  except DamagedStep as e:
    return str(e).split(": ", 1)[-1]
  return None


def move_aside(folder: str, cause: str) -> str:
  """Renames a damaged step folder to ``<step>.damaged`` (never deleted) and says so."""
  target = folder + DAMAGED
  n = 2
  while os.path.exists(target):
    target, n = f"{folder}{DAMAGED}-{n}", n + 1
  os.rename(folder, target)
  logging.warning("checkpoint %s is damaged (%s): moved to %s; resuming from the step before it",
                  folder, cause, target)
  return target


# --------------------------------------------------------------------------------------------
# Position: where the data stream is, independent of the process count
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Position:
  """The data stream after ``batches`` global batches: counts of unusable examples by reason
  (summed over every process), the examples digest, the topology it was saved on, and the
  digests of the data folders."""
  batches: int = 0
  reasons: list[int] = dataclasses.field(default_factory=list)
  digest: int = 0
  processes: int | None = None
  devices: int | None = None
  data: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "digest": f"{self.digest:x}"}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "Position":
    d = dict(d)
    digest = d.get("digest", 0)
    d["digest"] = int(digest, 16) if isinstance(digest, str) else int(digest or 0)
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def read_position(folder: str) -> Position:
  """The data position of a step: its position item, or (older steps) grain's per-process files
  (batches handed out are the same in every file; the counts are summed)."""
  if os.path.isdir(os.path.join(folder, POSITION)):
    value = _read_json_item(folder, POSITION)
    if not isinstance(value, dict) or not isinstance(value.get("batches"), int):
      raise DamagedStep(f"{folder}: its position item holds no batch count")
    return Position.from_json(value)
  files = sorted(glob.glob(os.path.join(glob.escape(folder), LEGACY_DATA, "process_*-of-*.json")))
  if not files:
    raise DamagedStep(f"{folder}: its position item is missing (neither position/ nor data/)")
  counts = {int(m[1]) for f in files if (m := re.search(r"-of-(\d+)\.json$", f))}
  if len(counts) != 1 or len(files) != counts.pop():
    raise DamagedStep(f"{folder}: its data item lacks some processes' files ({len(files)} found)")
  states = []
  for path in files:
    try:
      with open(path, encoding="utf-8") as f:
        states.append(json.load(f))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DamagedStep(f"{folder}: {path} is not readable ({e})") from None
  reasons = [sum(col) for col in zip(*(s.get("reasons", []) for s in states))]
  return Position(batches=int(states[0]["batches"]), reasons=reasons, processes=len(files))


# --------------------------------------------------------------------------------------------
# Saving and resuming a train state
# --------------------------------------------------------------------------------------------


def save_state(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any],
               position: Position, config, force: bool = False) -> None:
  """Saves a train state (params, the rest of the state, the data position, the config) as one
  step. A write that fails (read-only folder, disk full) raises a CheckpointError naming the
  folder and the cause; the steps already written stay as they are."""
  args = ocp.args.Composite(**{
      PARAMS: ocp.args.StandardSave(state["params"]),
      TRAIN: ocp.args.StandardSave({k: v for k, v in state.items() if k != "params"}),
      POSITION: ocp.args.JsonSave(position.to_json()),
      CONFIG: ocp.args.JsonSave(config_to_dict(config))})
  with _save_errors(mngr, step):
    mngr.save(step, args=args, force=force)


def wait_for_saves(mngr: ocp.CheckpointManager) -> None:
  """Waits for background saves; a failed one raises a CheckpointError naming the folder."""
  with _save_errors(mngr, None):
    mngr.wait_until_finished()


# tensorstore words an OSError inside its own message; pinned by tests/test_checkpoints.py.
TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='?(\d+)")


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
    code = TENSORSTORE_OS_ERROR.search(str(e))
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


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def restore_state(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any]
                  ) -> dict[str, Any]:
  """The train state of ``step``, restored into the shardings of ``state`` (any topology: orbax
  reshards). A params-only step gives its parameters and keeps the rest of ``state`` (a fresh
  optimizer at step 0). Arrays that do not read back raise :class:`DamagedStep`."""
  folder = step_dir(str(mngr.directory), step)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
  if is_params_only(folder):
    params, _ = restore_params(folder, target["params"])
    logging.info("initialised parameters from %s; optimizer and data start fresh", folder)
    return dict(state, params=params)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(target["params"]),
        TRAIN: ocp.args.StandardRestore({k: v for k, v in target.items() if k != "params"})}))
  except Exception as e:  # noqa: BLE001 - whatever tensorstore raises, the step is unreadable
    raise DamagedStep(f"{folder}: its arrays do not read back ({_first_line(e)})") from None
  return {"params": restored[PARAMS], **restored[TRAIN]}


def resume_candidates(directory: str, config, move: bool = True) -> list[tuple[int, Position]]:
  """The steps a run could resume from, newest first, each with its data position; the newest
  steps that fail the cheap checks (:func:`step_problem`) are moved aside (``move``) or left
  out. A step made with another model or on other data is an error, not damage."""
  out = []
  for step in reversed(steps(directory)):
    folder = step_dir(directory, step)
    problem = step_problem(folder)
    if problem is not None:
      if move:
        move_aside(folder, problem)
      continue
    check_compatible(dict(_read_json_item(folder, CONFIG)), config)
    position = Position() if is_params_only(folder) else read_position(folder)
    check_same_data(position.data, config, folder)
    out.append((step, position))
  return out


def read_back(directory: str, step: int) -> None:
  """Reads every array of a step (the full check: ``--check=full``); DamagedStep if any fails."""
  folder = step_dir(directory, step)
  items = [PARAMS] if is_params_only(folder) else [PARAMS, TRAIN]
  mngr = manager(directory, read_only=True, async_save=False)
  try:
    mngr.restore(step, args=ocp.args.Composite(**{i: ocp.args.StandardRestore() for i in items}))
  except Exception as e:  # noqa: BLE001 - whatever tensorstore raises, the step is unreadable
    raise DamagedStep(f"{folder}: its arrays do not read back ({_first_line(e)})") from None
  finally:
    mngr.close()


def no_intact_step(directory: str) -> CheckpointError:
  moved = damaged_steps(directory)
  return CheckpointError(
      f"{directory} holds no intact checkpoint (damaged, moved aside: "
      f"{', '.join(os.path.basename(m) for m in moved) or 'none'}); the run does not start over "
      "from step 0 on its own: use a new --workdir, or set --config.fresh_start_if_damaged=True")


# --------------------------------------------------------------------------------------------
# Reading checkpoints (eval, lift_jax.load, init_from)
# --------------------------------------------------------------------------------------------


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
  config = _read_json_item(step_dir(directory, step), CONFIG)
  if not isinstance(config, dict):
    raise DamagedStep(f"{step_dir(directory, step)}: its config item is not a config")
  config.pop(IMPORTED, None)
  return ml_collections.ConfigDict(config)


def restore_params(path: str, abstract_params=None):
  """(params, step) of a checkpoint; with ``abstract_params`` (ShapeDtypeStructs with shardings)
  the arrays are restored into those shardings, and shapes are checked."""
  directory, step = resolve(path)
  folder = step_dir(directory, step)
  mngr = manager(directory, read_only=True, async_save=False)
  try:
    try:
      meta = mngr.item_metadata(step)[PARAMS]
    except Exception as e:  # noqa: BLE001 - unreadable metadata: the step is damaged
      raise DamagedStep(f"{folder}/params is damaged: its metadata does not read back "
                        f"({_first_line(e)}); use an earlier step") from None
    if abstract_params is None:  # as saved, onto this process's first device
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract_params = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    else:
      flat_meta = {path_str(p): tuple(m.shape)
                   for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
      flat_want = {path_str(p): tuple(a.shape)
                   for p, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
      bad = [f"{k}: checkpoint {flat_meta.get(k)}, model {v}" for k, v in flat_want.items()
             if flat_meta.get(k) != v]
      bad += [f"{k}: checkpoint {v}, not in the model" for k, v in flat_meta.items()
              if k not in flat_want]
      if bad:
        raise CheckpointError(f"{folder}/params does not fit the model ({len(bad)} parameters "
                              f"differ, e.g. {'; '.join(bad[:3])})")
    try:
      restored = mngr.restore(
          step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(abstract_params)}))
    except Exception as e:  # noqa: BLE001 - shapes matched: the arrays themselves are damaged
      raise DamagedStep(f"{folder}/params is damaged: its arrays do not read back "
                        f"({_first_line(e)}); use an earlier step") from None
  finally:
    mngr.close()
  return restored[PARAMS], step


def save_params(workdir: str, step: int, params, config, source: str | None = None) -> str:
  """Writes a params-only checkpoint step (plus config.json) that eval loads and training
  starts from; ``source`` names where the parameters came from. Returns the step folder."""
  os.makedirs(workdir, exist_ok=True)
  cfg = config_to_dict(config)
  common.write_json_atomic(os.path.join(workdir, CONFIG_JSON), cfg, sort_keys=False)
  mngr = manager(checkpoints_dir(workdir), async_save=False, keep=None)
  try:
    mngr.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params),
        CONFIG: ocp.args.JsonSave({**cfg, IMPORTED: source or "unknown"})}), force=True)
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return step_dir(checkpoints_dir(workdir), step)


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
