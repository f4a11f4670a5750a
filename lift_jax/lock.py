"""One trainer per workdir: a lock file that names its holder and is refreshed while it trains.

``WORKDIR/lock.json`` holds the holder's host, pid, start time, a random token and the time of
its last refresh. It is created with ``O_CREAT | O_EXCL`` (atomic on local and network
filesystems), refreshed every ``stale_seconds / 4`` by a thread, and removed when the run ends.
A second trainer finds it and stops at once, naming the workdir and the holder. A lock is stale,
and taken over with a warning, when its holder is on this host and its pid is gone, or when it
has not been refreshed for ``stale_seconds`` (a holder on another host that crashed): a requeued
job never needs a hand-deleted file. A takeover writes a new token, waits a moment and reads it
back, so that of two jobs taking over at once only one goes on.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from lift_jax import cli, common

LOCK_FILE = "lock.json"
DEFAULT_STALE_SECONDS = 600.0


@cli.user_error
class WorkdirLocked(RuntimeError):
  """Another trainer holds the workdir; the message names it."""


def _alive_here(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """``with WorkdirLock(workdir): ...`` (see the module docstring)."""

  def __init__(self, workdir: str, stale_seconds: float = DEFAULT_STALE_SECONDS,
               settle_seconds: float = 0.5):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.stale_seconds = float(stale_seconds)
    self.settle_seconds = settle_seconds
    self.token = secrets.token_hex(8)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._started = time.time()

  def _record(self) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
            "started": self._started, "refreshed": time.time()}

  def _read(self) -> dict[str, Any] | None:
    try:
      with open(self.path, encoding="utf-8") as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (json.JSONDecodeError, OSError):
      return {}  # half-written or unreadable: judged by its age below

  def _stale_reason(self, holder: dict[str, Any]) -> str | None:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and \
        not _alive_here(holder["pid"]):
      return f"its process {holder['pid']} on this host is gone"
    refreshed = holder.get("refreshed")
    if not isinstance(refreshed, (int, float)):
      refreshed = os.path.getmtime(self.path) if os.path.exists(self.path) else 0.0
    age = time.time() - refreshed
    if age > self.stale_seconds:
      return f"not refreshed for {age:.0f} s (more than {self.stale_seconds:g})"
    return None

  def holder(self) -> tuple[dict[str, Any] | None, str | None]:
    """(who holds the lock, or None; why that lock is stale, or None when it is live)."""
    holder = self._read()
    return holder, (None if holder is None else self._stale_reason(holder))

  def refuse(self, holder: dict[str, Any]) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    raise WorkdirLocked(
        f"{os.path.dirname(self.path)} is in use by another trainer (host {holder.get('host')}, "
        f"pid {holder.get('pid')}, started {started}); stop it first, or use another --workdir. "
        f"A lock not refreshed for {self.stale_seconds:g} s (config.lock_stale_seconds) is "
        f"taken over; {self.path} says who holds it")

  def acquire(self) -> "WorkdirLock":
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = self._read()
      if holder is None:  # removed meanwhile: try once more
        return self.acquire()
      reason = self._stale_reason(holder)
      if reason is None:
        self.refuse(holder)
      logging.warning("taking over the stale lock %s of host %s pid %s: %s", self.path,
                      holder.get("host"), holder.get("pid"), reason)
      common.write_json_atomic(self.path, self._record())
      time.sleep(self.settle_seconds)
      if (self._read() or {}).get("token") != self.token:
        raise WorkdirLocked(f"{os.path.dirname(self.path)}: another trainer took over the stale "
                            "lock at the same moment; it goes on, this one stops") from None
    else:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(self._record(), f)
    self._thread = threading.Thread(target=self._refresh, daemon=True, name="workdir-lock")
    self._thread.start()
    return self

  def _refresh(self) -> None:
    while not self._stop.wait(max(self.stale_seconds / 4, 0.05)):
      holder = self._read() or {}
      if holder.get("token") != self.token:
        logging.error("%s was taken by host %s pid %s while this run held it", self.path,
                      holder.get("host"), holder.get("pid"))
        return
      try:
        common.write_json_atomic(self.path, self._record())
      except OSError as e:  # a full disk must not end the run; the lock just ages
        logging.warning("could not refresh %s: %s", self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    if (self._read() or {}).get("token") == self.token:
      os.remove(self.path)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
