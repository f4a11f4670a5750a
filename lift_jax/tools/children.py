"""Running the project's commands as child processes, the way every parent command does (the
demo, the benchmark suite, data preparation).

A child runs in its own session, so a Ctrl-C or SIGTERM reaches the parent alone; the parent
forwards it to the child's process group and waits for the child to finish (the trainer saves a
checkpoint at the next step boundary, then exits 130 or 143), then raises
:class:`lift_jax.cli.Interrupted`, which the command turns into one line and the same exit status.
A second Ctrl-C is forwarded too (the trainer then stops at once). A child that outlives its
``timeout`` is sent SIGTERM, then SIGKILL after ``grace`` seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import IO, Sequence

from lift_jax import cli

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Result:
  def __init__(self, code: int | None, seconds: float):
    self.code, self.seconds = code, seconds  # code None: stopped after its timeout


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
  try:
    os.killpg(proc.pid, signum)
  except (ProcessLookupError, PermissionError):
    pass


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
  """SIGTERM to the child's process group, SIGKILL ``grace`` seconds later if still there."""
  for signum in (signal.SIGTERM, signal.SIGKILL):
    _signal_group(proc, signum)
    try:
      proc.wait(timeout=grace)
      return
    except subprocess.TimeoutExpired:
      continue


def run(argv: Sequence[str], *, stdout: IO | int | None = None, cwd: str | None = None,
        env: dict[str, str] | None = None, timeout: float | None = None,
        grace: float = 10.0) -> Result:
  """Runs ``argv`` to its end (see the module docstring); output goes to ``stdout`` (a file, or
  ``subprocess.PIPE``: then read ``Result.output``)."""
  start = time.time()
  received: list[int] = []
  proc = subprocess.Popen(list(argv), stdout=stdout, stderr=subprocess.STDOUT, cwd=cwd,
                          env=env, start_new_session=True,
                          text=True if stdout == subprocess.PIPE else None)

  def forward(signum, frame):
    del frame
    received.append(signum)
    _signal_group(proc, signum)

  main_thread = threading.current_thread() is threading.main_thread()
  previous = {s: signal.signal(s, forward) for s in SIGNALS} if main_thread else {}
  output = None
  try:
    try:
      if stdout == subprocess.PIPE:
        output, _ = proc.communicate(timeout=timeout)
      else:
        proc.wait(timeout=timeout)
      code = proc.returncode
    except subprocess.TimeoutExpired:
      stop(proc, grace)
      code = None
  except BaseException:
    stop(proc, grace)
    raise
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  result = Result(code, time.time() - start)
  result.output = output
  if received:
    name = signal.Signals(received[0]).name
    how = f"exited with status {code}" if code is not None and code >= 0 else "was stopped"
    raise cli.Interrupted(f"stopped by {name}; the child {' '.join(argv[1:3])} {how}",
                          received[0])
  return result
