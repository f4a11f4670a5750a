"""Several processes: starting ``jax.distributed`` and ending the job in bounded time when one of
them is lost.

Start-up: :func:`initialize` calls ``jax.distributed.initialize``, with the coordinator, process
count and id either given (``--coordinator_address`` ...) or left to JAX's own cluster detection
(TPU pod slices, SLURM under ``srun``; :func:`cluster_detected` says when one is there).

A lost process (kill -9, out of memory, a preempted VM) must not leave the others blocked in a
collective forever. JAX's coordination service already ends every process whose peer stops
sending heartbeats, after ``heartbeat_timeout_seconds``, with an abort and a log line of its
own. On top of that, a watchdog thread (:class:`Watchdog`) publishes a counter per process in
the coordination service's key-value store every ``timeout / 20`` seconds; when a peer's counter
stops moving for ``timeout`` seconds (or the coordinator stops answering), it prints one line
naming the process and ends this one with status 1. JAX's timeout is set to twice the
watchdog's plus 20 s, so the user sees the clean line first; JAX's remains the backstop (a
wedged interpreter).
A process that finishes marks itself done, so peers that finish later are not alarmed.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import jax
from jax._src import distributed as _distributed  # the coordination client (key-value store)

DEFAULT_LOST_HOST_TIMEOUT = 120.0
_PREFIX = "lift_jax/alive/"
_DONE = "lift_jax/done/"
# The SLURM variables jax.distributed's cluster detection reads (all must be present: a batch
# script outside srun has no step node list and is one process).
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                   "SLURM_LOCALID")


def cluster_detected(env: dict[str, str] | None = None) -> bool:
  """Whether this process is one of several in an environment jax.distributed detects: a
  multi-task SLURM step or a multi-worker TPU pod slice."""
  env = os.environ if env is None else env
  if all(k in env for k in SLURM_VARIABLES) and int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  return env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               lost_host_timeout: float = DEFAULT_LOST_HOST_TIMEOUT) -> "Watchdog | None":
  """``jax.distributed.initialize`` (given arguments, or the cluster's), JAX's heartbeat timeout
  set well above ``lost_host_timeout``, then the watchdog. Returns the watchdog (None with
  one process)."""
  kwargs = {}
  if coordinator_address:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU processes talk through gloo
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # JAX's own detection is the backstop: it aborts the process without naming the lost one, and
  # a process's last heartbeat may lie up to half the timeout before it died, so its timeout is
  # twice the watchdog's (and then some), to let the watchdog speak first.
  backstop = int(2 * lost_host_timeout + 20)
  jax.distributed.initialize(heartbeat_timeout_seconds=backstop, **kwargs)
  logging.info("process %d of %d (coordinator %s); a lost process ends the job within %g s",
               jax.process_index(), jax.process_count(),
               coordinator_address or "detected from the cluster", lost_host_timeout)
  if jax.process_count() == 1:
    return None
  return Watchdog(lost_host_timeout).start()


class Watchdog:
  """See the module docstring. ``exit`` is what ends the process (os._exit: no interpreter
  shutdown, which would wait for the lost peer)."""

  def __init__(self, timeout: float, exit=os._exit):  # noqa: A002 - the process's exit
    self.timeout = float(timeout)
    self._exit = exit
    self._client = _distributed.global_state.client
    self._me, self._n = jax.process_index(), jax.process_count()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def start(self) -> "Watchdog":
    self._thread = threading.Thread(target=self._loop, daemon=True, name="lost-host-watchdog")
    self._thread.start()
    return self

  def _fail(self, message: str) -> None:
    print(f"error: {message}; this process (process {self._me} of {self._n}) stops. Re-run every "
          "process to resume from the last checkpoint", file=sys.stderr, flush=True)
    self._exit(1)

  def _loop(self) -> None:
    beat = 0
    last: dict[int, str | None] = {}
    changed: dict[int, float] = {}
    while not self._stop.is_set():
      beat += 1
      try:
        self._client.key_value_set(f"{_PREFIX}{self._me}", str(beat), allow_overwrite=True)
        alive = dict(self._client.key_value_dir_get(_PREFIX))
        done = dict(self._client.key_value_dir_get(_DONE))
      except Exception as e:  # noqa: BLE001 - any failure to reach the coordinator is fatal
        if self._stop.is_set():
          return
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        self._fail(f"lost contact with process 0 of {self._n} (the coordinator): {first}")
        return
      now = time.monotonic()
      for i in range(self._n):
        if f"{_DONE}{i}" in done:
          continue
        value = alive.get(f"{_PREFIX}{i}")
        if i not in changed or value != last.get(i):
          last[i], changed[i] = value, now
        elif now - changed[i] > self.timeout:
          self._fail(f"process {i} of {self._n} was lost (no sign of life for "
                     f"{self.timeout:g} s)")
          return
      self._stop.wait(max(0.2, self.timeout / 20))

  def finish(self) -> None:
    """This process is done: peers stop watching it, and it stops watching them."""
    try:
      self._client.key_value_set(f"{_DONE}{self._me}", "1", allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the job is over; nothing is lost if the mark fails
      logging.debug("could not mark process %d done", self._me)
    self._stop.set()

  def wait_for_verdict(self) -> None:
    """After an error in a collective: give the watchdog the time it needs to name a lost
    process (it then ends this one); returns when none was found."""
    if self._thread is not None and self._thread.is_alive():
      self._thread.join(timeout=self.timeout + max(1.0, self.timeout / 10))
