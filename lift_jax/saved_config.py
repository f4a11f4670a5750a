"""A saved config as a config file: ``--config=WORKDIR/config.json`` (or a workdir, checkpoints
folder or step folder, or an export's ``lift_jax_export.json``, which records its run's config)
runs, evaluates, imports or checks with the config a run wrote, and
``--config.KEY=VALUE`` overrides apply to it as to a ``configs/*.py`` file.

Every command's flag parser (:func:`lift_jax.cli.flags_parser`) turns ``--config=PATH.json`` into
``--config=<this file>:PATH.json``, which ml_collections loads by calling :func:`get_config`.
Values read from JSON keep their types (tuples come back as lists, which every reader of a config
accepts); a field saved as None takes any type when overridden.
"""

from __future__ import annotations

import json
import os

import ml_collections

from lift_jax import checkpoint as ckpt
from lift_jax import cli

FILE = os.path.abspath(__file__)


def load(path: str) -> ml_collections.ConfigDict:
  """The config saved at ``path``: a config.json, or the config of a workdir / checkpoint."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    workdir_json = os.path.join(ckpt.workdir_of(path), ckpt.CONFIG_JSON)
    if os.path.isfile(workdir_json) and not os.path.basename(path).isdigit():
      path = workdir_json
    else:
      return ckpt.read_config(path)
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise cli.UsageError(f"--config={path}: no such file") from None
  except json.JSONDecodeError as e:
    raise cli.UsageError(f"--config={path} is not valid JSON ({e})") from None
  if isinstance(data, dict) and isinstance(data.get("run"), dict):
    if "config" in data["run"]:
      data = data["run"]["config"]  # a lift_jax export's manifest: its run's config
    else:
      data = {k: v for k, v in data.items() if k != "run"}  # a workdir's record of its data
  if not isinstance(data, dict) or "model" not in data:
    raise cli.UsageError(f"--config={path} is not a saved lift_jax config (no 'model' section); "
                         "give a configs/*.py file, a workdir's config.json or an export's "
                         "lift_jax_export.json")
  return ml_collections.ConfigDict(data)


def get_config(path: str) -> ml_collections.ConfigDict:
  return load(path)
