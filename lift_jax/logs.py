"""Log hygiene for the commands: our progress lines and the libraries' warnings, not their
chatter."""

from __future__ import annotations

import logging


class _LibraryNoise(logging.Filter):
  """Drops INFO/DEBUG lines of orbax, grain and jax internals (they log every checkpoint write)."""

  NOISY = ("/orbax/", "/grain/", "/jax/_src/", "/etils/")

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return not any(part in record.pathname for part in self.NOISY)


def quiet_libraries() -> None:
  """Keeps the log readable: our progress lines, the libraries' warnings and errors."""
  noise = _LibraryNoise()
  for handler in logging.getLogger().handlers:
    handler.addFilter(noise)
  logging.getLogger("absl").addFilter(noise)
