"""Metric files: ``metrics.jsonl`` always, TensorBoard through clu when it can be imported, and
Weights & Biases when ``config.wandb.project`` is set.

clu's writers import TensorFlow. Where TF is not installed (a lean accelerator image), or
``config.tensorboard`` is False, the writer falls back to log lines plus the JSONL file, which
holds every scalar anyway. When TF is imported on a GPU host it is told to keep off the GPUs.

W&B (the optional ``wandb`` extra; nothing imports it unless a project is set) gets the same
scalars at the same steps, each evaluation's results as a table ``eval/results`` (step,
benchmark, metric, value), and the run's config. Process 0 logs. The run id is kept in
``WORKDIR/wandb_run.json``, so a resumed run continues the same W&B run; W&B's files go to
``WORKDIR/wandb/``. ``wandb.mode='offline'`` needs no network (``wandb sync`` uploads later).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from typing import Any, Mapping

from lift_jax import cli, common

WANDB_RUN = "wandb_run.json"
WANDB_MODES = ("online", "offline", "disabled")


@cli.user_error
class MetricsError(OSError):
  """A metric file cannot be written (a full disk, a read-only folder); the message names it."""


def _clu_writer(logdir: str, primary: bool):
  try:
    import tensorflow as tf  # imported by clu anyway; keep it off the accelerators

    tf.config.set_visible_devices([], "GPU")
    from clu import metric_writers
  except Exception as e:  # TF or clu missing / broken: the JSONL file still has everything
    logging.info("TensorBoard writer unavailable (%s); writing metrics.jsonl and logs only", e)
    return None
  return metric_writers.create_default_writer(logdir, just_logging=not primary)


def _drop_rows_after(path: str, step: int) -> None:
  """Removes rows logged after ``step`` (a run killed after its last checkpoint logged them; the
  resumed run logs those steps again)."""
  if not os.path.exists(path):
    return
  rows = read_jsonl(path)
  keep = [r for r in rows if int(r.get("step", 0)) <= step]
  if len(keep) == len(rows):
    return
  common.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
  logging.info("metrics.jsonl: dropped %d rows after step %d (logged after the last checkpoint)",
               len(rows) - len(keep), step)


class WandbWriter:
  """One W&B run per workdir: its id is read from (or written to) ``WORKDIR/wandb_run.json`` and
  the run is resumed with it. ``settings``: the config's ``wandb`` section."""

  def __init__(self, workdir: str, settings: Mapping[str, Any], run_config: Mapping[str, Any]):
    mode = settings.get("mode")
    if mode not in (None, *WANDB_MODES):
      raise cli.ConfigError(f"wandb.mode={mode!r}: expected one of {WANDB_MODES} or None")
    try:
      import wandb  # the optional extra; a second or two to import, so only when asked for
    except ImportError as e:
      raise cli.ConfigError(
          f"wandb.project={settings['project']!r} asks for Weights & Biases logging, but wandb "
          f"is not installed ({e}): pip install -e '.[wandb]', or leave wandb.project unset"
      ) from None
    self._wandb = wandb
    id_file = os.path.join(workdir, WANDB_RUN)
    if os.path.exists(id_file):
      with open(id_file, encoding="utf-8") as f:
        run_id = json.load(f)["id"]
    else:
      run_id = secrets.token_hex(4)  # W&B run ids: letters and digits
      common.write_json_atomic(id_file, {"id": run_id, "project": settings["project"],
                                         "entity": settings.get("entity")})
    try:
      self.run = wandb.init(
          project=settings["project"], entity=settings.get("entity"),
          name=settings.get("name") or os.path.basename(os.path.normpath(workdir)),
          group=settings.get("group"), tags=list(settings.get("tags") or ()) or None, mode=mode,
          dir=workdir, id=run_id, resume="allow", config=dict(run_config))
    except Exception as e:  # noqa: BLE001 - no login, no network, bad entity...
      raise cli.ConfigError(
          f"wandb.project={settings['project']!r}: W&B could not start the run "
          f"({type(e).__name__}: {e}); run `wandb login`, or set --config.wandb.mode=offline "
          "and upload later with `wandb sync`") from None
    logging.info("W&B run %s (%s), files in %s", run_id, self.run.settings.mode, self.run.dir)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    data: dict[str, Any] = dict(scalars)
    results = sorted((k[len("eval/"):], v) for k, v in scalars.items()
                     if k.startswith("eval/") and k != "eval/seconds")
    if results:
      rows = [[int(step), *(name.split("/", 1) if "/" in name else (name, "")), v]
              for name, v in results]
      data["eval/results"] = self._wandb.Table(
          columns=["step", "benchmark", "metric", "value"], data=rows)
    self.run.log(data, step=int(step))

  def close(self) -> None:
    self.run.finish()


class MetricWriter:
  """Writes scalars to metrics.jsonl (primary process), TensorBoard, W&B and the log.

  ``resume_step``: the step a run resumes from; rows of later steps are dropped first, so the file
  holds each step once however often the run was interrupted. ``wandb``: the config's ``wandb``
  section; with a ``project``, process 0 also logs to W&B, with ``run_config`` as the run's
  config.
  """

  def __init__(self, workdir: str, primary: bool = True, tensorboard: bool = True,
               resume_step: int | None = None, wandb: Mapping[str, Any] | None = None,
               run_config: Mapping[str, Any] | None = None):
    self.primary = primary
    path = os.path.join(workdir, "metrics.jsonl")
    if primary and resume_step is not None:
      _drop_rows_after(path, resume_step)
    self._wandb = WandbWriter(workdir, wandb, run_config or {}) \
        if primary and wandb and wandb.get("project") else None
    self._jsonl = open(path, "a", encoding="utf-8") if primary else None
    self._clu = _clu_writer(os.path.join(workdir, "tensorboard"), primary) if tensorboard else None

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    clean = {}
    for k, v in scalars.items():
      try:
        v = float(v)
      except (TypeError, ValueError):
        continue
      clean[k] = v
    if self._jsonl is not None:
      row = {"step": int(step), "time": time.time()}
      row.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
      try:
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
      except OSError as e:
        raise MetricsError(f"could not write {self._jsonl.name} ({e.strerror or e}); free space "
                           "or fix the folder, then re-run to resume from the last checkpoint"
                           ) from None
    if self._clu is not None:
      self._clu.write_scalars(int(step), clean)
      self._clu.flush()
    if self._wandb is not None:
      self._wandb.write(step, clean)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._clu is not None:
      self._clu.close()
    if self._wandb is not None:
      self._wandb.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def logged_evaluation(workdir: str, step: int) -> dict[str, Any]:
  """The ``eval/`` scalars metrics.jsonl holds for ``step`` (the last such row), or {}."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  rows = [r for r in read_jsonl(path) if r.get("step") == step
          and any(k.startswith("eval/") for k in r)]
  return {k: v for k, v in rows[-1].items() if k.startswith("eval/")} if rows else {}
