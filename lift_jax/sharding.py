"""Device mesh and parameter shardings.

The mesh has axes (``data``, ``fsdp``), both Auto. The batch is split over both axes. Parameters
are placed by regex rules over their path ('visual/transformer/resblocks/3/mlp/c_fc/kernel'), the
first that matches anywhere in the path (``re.search``) wins: ``"replicated"``, ``"fsdp"`` (shard
the largest dimension divisible by the fsdp axis size over ``fsdp``; replicate if none divides),
or an explicit tuple of axis names / None per dimension.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lift_jax import cli

AXES = ("data", "fsdp")
BATCH = P(AXES)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over all devices; -1 means 'whatever is left'."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise cli.ConfigError("at most one of mesh.data and mesh.fsdp may be -1")
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise cli.ConfigError(f"mesh.data={data} x mesh.fsdp={fsdp} does not match the {n} devices "
                          "(set one of them to -1 to use what is left)")
  return jax.make_mesh((data, fsdp), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _spec_for(shape: tuple[int, ...], rule: Any, mesh: Mesh) -> P:
  if rule in (None, "replicated"):
    return P()
  if rule == "fsdp":
    size = mesh.shape["fsdp"]
    if size == 1:
      return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % size == 0:
        spec = [None] * len(shape)
        spec[dim] = "fsdp"
        return P(*spec)
    return P()
  return P(*rule)


def param_shardings(params, mesh: Mesh, rules: Sequence[tuple[str, Any]] = ()):
  """A NamedSharding per leaf of ``params`` (arrays or ShapeDtypeStructs) by the first rule."""
  compiled = [(re.compile(pattern), rule) for pattern, rule in rules]

  def one(path, leaf):
    name = path_str(path)
    for pattern, rule in compiled:
      if pattern.search(name):
        return NamedSharding(mesh, _spec_for(tuple(np.shape(leaf)), rule, mesh))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
