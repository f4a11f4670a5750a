"""``--mode=suite``: what an accelerator run should measure, in order of value, within a time
budget: the train step of LIFT and CLIP, the input pipeline, end to end, the embedding job. Each
row runs in its own process (a crash or an out-of-memory error costs one row, each row's peak
memory is its own, and the budget can stop a row); ``suite.json`` and ``suite.md`` are rewritten
after every row, and a re-run keeps the rows that finished."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
from typing import Any

from ml_collections import config_flags

from lift_jax import checkpoint as ckpt
from lift_jax import cli, common
from lift_jax.data import records
from lift_jax.tools import children
from lift_jax.tools.bench import fake_data
from lift_jax.tools.bench.common import FLAGS
from lift_jax.tools.bench.suite_report import e2e_breakdown, last_error, suite_markdown

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SUITE_CONFIGS = {"lift": os.path.join(REPO_ROOT, "configs", "vitb16_datacomp.py"),
                 "clip": os.path.join(REPO_ROOT, "configs", "clip_vitb16_datacomp.py")}


@dataclasses.dataclass
class SuiteRow:
  """One row of the suite; ``attention`` may be 'best' / 'other' (decided by the LIFT rows)."""
  kind: str  # step | input | e2e | embed
  model: str = "lift"  # step rows: lift | clip
  length: int | None = None  # CLIP caption length
  attention: str = "xla"
  remat: bool = False

  def resolve(self, best: str) -> "SuiteRow":
    other = {"xla": "cudnn", "cudnn": "xla"}[best]
    return dataclasses.replace(self, attention={"best": best, "other": other}.get(
        self.attention, self.attention))

  @property
  def name(self) -> str:
    if self.kind != "step":
      return self.kind
    model = "LIFT" if self.model == "lift" else f"CLIP-{self.length}"
    return f"step {model} attention={self.attention} remat={'on' if self.remat else 'off'}"


def suite_plan(lengths: list[int]) -> list[SuiteRow]:
  """Rows in order of value: the LIFT step with each attention, CLIP at each length with the
  faster one; input; end to end; embedding; then LIFT with remat and the remaining variants."""
  rows = [SuiteRow("step", "lift", attention="xla"), SuiteRow("step", "lift", attention="cudnn")]
  rows += [SuiteRow("step", "clip", n, attention="best") for n in lengths]
  rows += [SuiteRow("input"), SuiteRow("e2e"), SuiteRow("embed"),
           SuiteRow("step", "lift", attention="best", remat=True)]
  rows += [SuiteRow("step", "clip", n, attention="other") for n in lengths]
  rows += [SuiteRow("step", "clip", n, attention="best", remat=True) for n in lengths]
  return rows


def worker_counts(spec: str) -> list[int]:
  if spec != "auto":
    return [int(x) for x in spec.split(",") if x.strip()]
  cores = os.cpu_count() or 1
  counts, w = [], 1
  while w < cores:
    counts.append(w)
    w *= 2
  return counts + [cores]


def e2e_config(path: str, base: str, data: dict[str, str], *, global_batch: int, steps: int,
               workers: int, overrides: dict[str, Any]) -> str:
  """A config file (JSON: ``lift_jax.main`` runs a saved config) of ``base`` trained on the
  generated data for ``steps`` steps, with an async checkpoint half way and at the end, and a
  retrieval eval over the generated eval shard."""
  config = common.load_config_file(base)
  settings = {
      "batch_size": global_batch, "total_steps": steps, "log_every_steps": max(1, steps // 6),
      "checkpoint_every_steps": max(1, steps // 2), "async_checkpoints": True,
      "tensorboard": False, "eval_every_steps": 0, "optim.warmup_steps": max(1, steps // 6),
      "data.images": data["images"], "data.embeddings": data["embeddings"],
      "data.workers": workers, "data.prepare": None, "evals.text_bank": data["bank"],
      "evals.data_root": None, "evals.synthetic_suite": False,
      "evals.batch_size": global_batch, **overrides}
  for key, value in settings.items():
    *parents, name = key.split(".")
    section = config
    for parent in parents:
      section = section[parent]
    section[name] = value
  config.evals.benchmarks = {"generated": {"type": "retrieval", "shards": data["eval_images"],
                                           "protocol": "lift"}}
  common.write_json_atomic(path, ckpt.config_to_dict(config), sort_keys=False)
  return path


def dotted_overrides(args: list[str]) -> dict[str, Any]:
  """'--config.a.b=V' flags as {'a.b': V} (V parsed as a Python literal where it is one)."""
  out = {}
  for arg in args:
    key, _, value = arg[len("--config."):].partition("=")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


class Suite:
  """Runs the rows, each in its own process (a crash or an out-of-memory error costs one row, each
  row's peak memory is its own, and the budget can stop a row), and rewrites suite.json and
  suite.md after every row."""

  def __init__(self, out: str, budget_s: float, lift_config: str, clip_config: str,
               lift_overrides: list[str]):
    self.out = os.path.abspath(out)
    self.start = time.time()
    self.deadline = self.start + budget_s
    self.budget_s = budget_s
    self.configs = {"lift": lift_config, "clip": clip_config}
    self.lift_overrides = lift_overrides
    self.rows: list[dict[str, Any]] = []
    self.device: dict[str, Any] = {}
    self._data: dict[str, str] | None = None
    os.makedirs(os.path.join(self.out, "rows"), exist_ok=True)
    os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
    self.previous: dict[str, dict[str, Any]] = {}
    path = os.path.join(self.out, "suite.json")
    if os.path.exists(path) and not FLAGS.fresh:
      with open(path, encoding="utf-8") as f:
        self.previous = {r["name"]: r for r in json.load(f).get("rows", [])
                         if r.get("status") == "ok"}

  # -- running children ---------------------------------------------------------------------------
  def remaining(self) -> float:
    return self.deadline - time.time()

  def child(self, slug: str, argv: list[str], timeout: float) -> tuple[int | None, float, str]:
    """Runs ``argv`` as a child (:mod:`lift_jax.tools.children`: its process group, grain
    workers included, is stopped on timeout, and a SIGTERM or Ctrl-C to the suite reaches it and
    is waited for); (exit status or None on timeout, seconds, log)."""
    log = os.path.join(self.out, "logs", f"{slug}.log")
    with open(log, "w", encoding="utf-8") as f:
      f.write("$ " + " ".join(argv) + "\n")
      f.flush()
      result = children.run(argv, stdout=f, cwd=REPO_ROOT, timeout=max(timeout, 1))
    return result.code, result.seconds, log

  def child_row(self, slug: str, argv: list[str]) -> tuple[bool, dict[str, Any]]:
    """:meth:`child` within the budget left; (whether it exited 0, the row's status fields)."""
    code, seconds, log = self.child(slug, argv, self.remaining())
    status = {"seconds": seconds, "log": os.path.relpath(log, self.out)}
    if code is None:
      return False, {**status, "status": "stopped: budget spent while it ran"}
    if code != 0:
      return False, {**status, "status": "failed", "error": last_error(log)}
    return True, {**status, "status": "ok"}

  def bench_child(self, slug: str, args: list[str]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Runs this tool in a child; (its JSON or None, status fields for the row)."""
    out = os.path.join(self.out, "rows", f"{slug}.json")
    if os.path.exists(out):
      os.remove(out)
    ok, status = self.child_row(
        slug, [sys.executable, "-m", "lift_jax.tools.bench", f"--output={out}", *args])
    if not ok:
      return None, status
    with open(out, encoding="utf-8") as f:
      return json.load(f), status

  # -- the rows -----------------------------------------------------------------------------------
  def step_args(self, row: SuiteRow) -> list[str]:
    args = ["--mode=step", f"--config={self.configs[row.model]}",
            f"--config.model.attention_impl={row.attention}", f"--config.model.remat={row.remat}",
            f"--per_device_batches={FLAGS.suite_batches}", f"--warmup={FLAGS.warmup}",
            f"--steps={FLAGS.steps}"]
    if row.model == "lift":
      args += self.lift_overrides
    if row.length:
      args.append(f"--config.model.text.context_length={row.length}")
    if FLAGS.memory_limit_bytes:
      args.append(f"--memory_limit_bytes={FLAGS.memory_limit_bytes}")
    return args

  def lift_step(self) -> dict[str, Any] | None:
    """The fastest finished LIFT step row without remat (of either attention)."""
    done = [r["result"] for r in self.rows if r["status"] == "ok" and r["kind"] == "step"
            and r["result"]["mode"] == "lift" and not r["result"]["remat"]]
    return max(done, key=lambda r: r["img_per_s"]) if done else None

  def per_device_batch(self) -> int:
    first = self.lift_step()
    return first["per_device_batch"] if first else int(FLAGS.suite_batches.split(",")[-1])

  def device_count(self) -> int:
    return int(self.device.get("device_count", 1))

  def data(self) -> dict[str, str]:
    """The generated shards of the input and end-to-end rows (made on first use)."""
    if self._data is None:
      dim = int(dotted_overrides(self.lift_overrides).get(
          "model.embed_dim", common.load_config_file(self.configs["lift"]).model.embed_dim))
      self._data = fake_data.suite_data(os.path.join(self.out, "data"), FLAGS.suite_records, dim)
    return self._data

  def run_row(self, row: SuiteRow) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    slug = row.name.replace(" ", "_").replace("=", "-")
    if row.kind == "step":
      return self.bench_child(slug, self.step_args(row))
    if row.kind == "input":
      data = self.data()
      workers = ",".join(str(w) for w in worker_counts(FLAGS.suite_workers))
      return self.bench_child(slug, [
          "--mode=input", f"--config={self.configs['lift']}", *self.lift_overrides,
          f"--config.data.images={data['images']}",
          f"--config.data.embeddings={data['embeddings']}",
          f"--per_device_batch={self.per_device_batch()}", f"--workers={workers}",
          "--batches=10", "--warmup=2", "--host_seconds=2"])
    if row.kind == "e2e":
      return self.run_e2e(slug)
    return self.run_embed(slug)

  def run_e2e(self, slug: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    data = self.data()
    best = self.lift_step()
    workers = min(os.cpu_count() or 1, 16)
    overrides = {}
    if best:
      overrides = {"model.attention_impl": best["attention_impl"]}
    overrides.update(dotted_overrides(self.lift_overrides))
    global_batch = self.per_device_batch() * self.device_count()
    workdir = os.path.join(self.out, "e2e_workdir")
    if os.path.isdir(workdir):
      shutil.rmtree(workdir)
    config = e2e_config(os.path.join(self.out, "e2e_config.json"), self.configs["lift"], data,
                        global_batch=global_batch, steps=FLAGS.suite_e2e_steps, workers=workers,
                        overrides=overrides)
    started = time.time()
    ok, status = self.child_row(slug, [sys.executable, "-m", "lift_jax.main",
                                       f"--config={config}", f"--workdir={workdir}"])
    if not ok:
      return None, status
    seconds, log = status["seconds"], os.path.join(self.out, status["log"])
    result = {"what": f"python -m lift_jax.main on the generated JPEG shards: "
                      f"{FLAGS.suite_e2e_steps} steps, {workers} grain workers, prefetch, async "
                      "checkpoints, a retrieval eval at the end",
              "global_batch": global_batch, "steps": FLAGS.suite_e2e_steps, "workers": workers,
              "wall_s": seconds, **overrides,
              **e2e_breakdown(log, os.path.join(workdir, "metrics.jsonl"), started, seconds)}
    if best and result.get("steady_img_per_s"):
      result["step_only_img_per_s"] = best["img_per_s"]
      result["e2e_over_step"] = result["steady_img_per_s"] / best["img_per_s"]
    for r in self.rows:  # the input row's rate with as many workers: can the host keep up?
      if r["kind"] == "input" and r["status"] == "ok":
        for w in r["result"]["rows"]:
          if w["workers"] == workers:
            result["input_only_img_per_s"] = w["img_per_s"]
    return result, status

  def run_embed(self, slug: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    if importlib.util.find_spec("torch") is None:
      return None, {"status": "not available: PyTorch is not installed"}
    arch = FLAGS.suite_embed_arch
    if arch == "auto":
      arch = "7b" if self.device.get("platform") == "gpu" else "tiny"
    n = FLAGS.suite_captions or (8192 if arch == "7b" else 256)
    texts = fake_data.captions_file(os.path.join(self.out, "data", f"captions-{n}.txt"), n)
    folder = os.path.join(self.out, "data", f"nvembed-{arch}")
    ok, status = self.child_row(f"{slug}_checkpoint", [
        sys.executable, "-m", "lift_jax.tools.bench.nvembed_checkpoint", folder, arch])
    if not ok:
      return None, status
    seconds_ckpt = status["seconds"]
    output = os.path.join(self.out, "embed_output")
    if os.path.isdir(output):
      shutil.rmtree(output)
    ok, status = self.child_row(slug, [
        sys.executable, "-m", "embed.main",
        f"--config={os.path.join(REPO_ROOT, 'embed', 'configs', 'nvembed_v2.py')}",
        f"--config.model={folder}", "--config.random_init=True", f"--config.texts={texts}",
        f"--config.output={output}", "--config.max_length=77", "--config.progress=False"])
    seconds = status["seconds"]
    status["seconds"] += seconds_ckpt
    if not ok:
      return None, status
    summary = records.read_manifest(output).get("summary", {})
    with open(os.path.join(self.out, "logs", f"{slug}_checkpoint.log"), encoding="utf-8") as f:
      sizes = json.loads(f.read().strip().splitlines()[-1])
    return {"what": f"python -m embed.main, randomly initialised NV-Embed-v2 architecture "
                    f"({arch}), {n} generated captions, max_length 77, the checkpoint's small "
                    "generated tokenizer (more tokens per word than the real one: tokens/s is the "
                    "comparable rate); rates exclude model loading",
            "arch": arch, **sizes, "captions": n, "wall_s": seconds, **summary}, status

  # -- the loop -----------------------------------------------------------------------------------
  def run(self, plan: list[SuiteRow]) -> dict[str, Any]:
    for planned in plan:
      faster = self.lift_step()  # of the two attentions
      row = planned.resolve(faster["attention_impl"] if faster else "xla")
      entry: dict[str, Any] = {"name": row.name, "kind": row.kind}
      if row.name in self.previous:
        entry = dict(self.previous[row.name], kept_from_earlier_run=True)
        print(f"[suite] {row.name}: kept from the earlier run in {self.out}", flush=True)
      elif any(r["name"] == row.name for r in self.rows):
        continue  # 'best' and 'other' made it the same as a row already run
      elif FLAGS.suite_rows and not re.search(FLAGS.suite_rows, row.name):
        entry["status"] = "skipped: not selected (--suite_rows)"
      elif row.kind == "step" and row.attention == "cudnn" and self.device and \
          self.device.get("platform") != "gpu":
        entry["status"] = (f"skipped: cuDNN attention needs an NVIDIA GPU "
                           f"(this is {self.device.get('platform')})")
      elif self.remaining() < FLAGS.row_min_s:
        entry["status"] = "skipped: budget spent"
      else:
        print(f"[suite] {row.name} ({self.remaining():.0f} s of the budget left)", flush=True)
        try:
          result, status = self.run_row(row)
        except (cli.Interrupted, KeyboardInterrupt):
          entry["status"] = "stopped: the suite was told to stop"
          self.rows.append(entry)
          self.write()
          raise
        except Exception as e:  # noqa: BLE001 - preparing one row must not end the others
          traceback.print_exc()
          result, status = None, {"status": "failed",
                                  "error": f"in the suite: {type(e).__name__}: {e}"}
        entry.update(status)
        entry["result"] = result
      if entry.get("result") and not self.device and "device_kind" in entry["result"]:
        self.device = {k: entry["result"].get(k) for k in
                       ("platform", "device_kind", "device_count", "process_count", "jax")}
      if entry.get("result"):  # every measured row says where it ran
        entry.setdefault("device_kind", entry["result"].get("device_kind",
                                                            self.device.get("device_kind")))
        entry.setdefault("jax", entry["result"].get("jax", self.device.get("jax")))
      print(f"[suite] {row.name}: {entry['status']}" +
            (f" ({entry['error']})" if entry.get("error") else ""), flush=True)
      self.rows.append(entry)
      self.write()
    return self.write()

  def summary(self) -> dict[str, Any]:
    out: dict[str, Any] = {}
    steps = {r["name"]: r["result"] for r in self.rows if r["status"] == "ok"
             and r["kind"] == "step"}
    lift = self.lift_step()
    if lift:
      out["lift_img_per_s"] = lift["img_per_s"]
      for name, r in steps.items():
        if r["mode"] == "clip" and not r["remat"] and \
            r["attention_impl"] == lift["attention_impl"]:
          out[f"lift_over_clip{r['context_length']}_img_per_s"] = \
              lift["img_per_s"] / r["img_per_s"]
    for r in self.rows:
      if r["status"] == "ok" and r["kind"] == "e2e" and r["result"].get("e2e_over_step"):
        out["e2e_over_step"] = r["result"]["e2e_over_step"]
    return out

  def write(self) -> dict[str, Any]:
    result = {"device": self.device, "budget_s": self.budget_s,
              "elapsed_s": time.time() - self.start, "command": " ".join(sys.argv),
              "configs": self.configs, "rows": self.rows, "summary": self.summary()}
    for name, text in (("suite.json", json.dumps(result, indent=1)),
                       ("suite.md", suite_markdown(result))):
      common.write_text_atomic(os.path.join(self.out, name), text)
    return result


def run_suite() -> dict[str, Any]:
  """``--mode=suite``: see the README's "Measuring cost". This process never touches the
  accelerator; every row runs in a child."""
  lift = config_flags.get_config_filename(FLAGS["config"]) if FLAGS.config is not None \
      else SUITE_CONFIGS["lift"]
  clip = FLAGS.compare_config or SUITE_CONFIGS["clip"]
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  lengths = [int(x) for x in FLAGS.suite_lengths.split(",") if x.strip()]
  suite = Suite(FLAGS.output or "bench-suite", FLAGS.budget_s, os.path.abspath(lift),
                os.path.abspath(clip), overrides)

  def stopped(signum, frame):  # between rows (during one, the child gets it: children.run)
    del frame
    raise cli.Interrupted(f"stopped by {signal.Signals(signum).name}; the finished rows are in "
                          f"{suite.out}/suite.json", signum)

  previous = {s: signal.signal(s, stopped) for s in children.SIGNALS}
  try:
    result = suite.run(suite_plan(lengths))
  except cli.Interrupted as e:  # during a row: the child's message, then the suite's
    raise cli.Interrupted(f"stopped by {signal.Signals(e.signum).name}; the finished rows are "
                          f"in {suite.out}/suite.json", e.signum) from None
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  with open(os.path.join(suite.out, "suite.md"), encoding="utf-8") as f:
    print(f.read())
  print(f"wrote {suite.out}/suite.json and suite.md")
  return result
