"""How every command reports a failure the user can fix: one line, no stack trace.

Each module keeps its own error type (``RecordError``, ``TrainingError``, ``EmbedError``...), written
so that its message names the file, record or key and what to do. A command's ``main`` is wrapped by
:func:`run`, which prints those errors as ``<command>: error: <message>`` and exits with status 1.
Anything else is a bug and keeps its traceback. ``LIFT_VERBOSE=1`` (or ``--verbose`` for commands
that define it) shows the traceback of user errors too.

This module imports nothing heavy: the PyTorch embedding job uses it without JAX.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

# Registered error types: subclasses of these are printed as one line.
_USER_ERRORS: list[type[BaseException]] = []


def user_error(cls: type[BaseException]) -> type[BaseException]:
  """Class decorator: errors of this type carry a message meant for the user."""
  if cls not in _USER_ERRORS:
    _USER_ERRORS.append(cls)
  return cls


def verbose() -> bool:
  return os.environ.get("LIFT_VERBOSE", "").lower() not in ("", "0", "false", "no")


def describe(e: BaseException) -> str | None:
  """The one-line message for a user error, or None when ``e`` is a bug (keep its traceback).

  OS errors (permission denied, disk full, missing file) are the user's to fix too; their message
  is rebuilt so that it always names the path.
  """
  if isinstance(e, tuple(_USER_ERRORS)):
    return str(e).strip()
  if isinstance(e, OSError):
    what = e.strerror or str(e)
    paths = [p for p in (e.filename, e.filename2) if p]
    return f"{what}: {' -> '.join(map(str, paths))}" if paths else what
  return None


def run(command: str, main: Callable[..., Any], *args, **kwargs) -> int:
  """Calls ``main``; a user error becomes one line on stderr and exit status 1. The exit status
  is what ``main`` returns when that is an int, else 0 (a command may return its result)."""
  try:
    status = main(*args, **kwargs)
    return status if isinstance(status, int) else 0
  except Exception as e:  # noqa: BLE001 - re-raised unless it is a user error
    message = describe(e)
    if message is None or verbose():
      raise
    print(f"{command}: error: {message}", file=sys.stderr, flush=True)
    return 1


@user_error
class UsageError(ValueError):
  """A command line flag is unknown, missing or malformed."""


def parse_flags(flag_values, argv, usage: str) -> None:
  """Parses ``argv`` (without the program name) into an absl ``FlagValues`` of one command.

  Each command keeps its own ``FlagValues`` so that commands can be called from one process (tests,
  the demo) without their flags colliding; every call starts from the defaults. ``--help`` prints
  ``usage`` and the flags, then exits 0; a bad flag is a :class:`UsageError`.
  """
  from absl import flags

  argv = list(argv)
  if any(a in ("-h", "--help", "--helpfull", "-?") for a in argv):
    print(usage.strip() + "\n\nflags:\n" + flag_values.get_help(include_special_flags=False))
    raise SystemExit(0)
  flag_values.unparse_flags()
  try:
    rest = flag_values(["command", *argv])
  except flags.Error as e:
    raise UsageError(f"{e} (--help lists the flags)") from None
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments {rest[1:]}; every setting is a --flag=value")


def flags_parser(command: str, aliases: dict[str, str] | None = None):
  """An ``app.run(flags_parser=...)`` that reports bad flags and unknown ``--config.KEY``
  overrides in one line (exit status 1) instead of absl's usage text or a traceback.

  ``aliases`` rewrites whole arguments first (e.g. ``{"--check": "--check=quick"}``).
  """

  def parse(argv: list[str]) -> list[str]:
    from absl import flags

    argv = [(aliases or {}).get(a, a) for a in argv]
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - re-raised when verbose
      if verbose():
        raise
      message = str(e).strip().strip("\"'")
      if not isinstance(e, flags.Error):  # ml_collections: a --config.KEY that does not exist
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        named = [o for o in overrides if message in o[len("--config."):].split(".")]
        if not named:  # e.g. a config file that raises: its traceback is what helps
          raise
        message = (f"{named[0]}: no such config key ({message!r}); the fields of every config "
                   "are listed in the README's configuration reference")
      print(f"{command}: error: {message}", file=sys.stderr, flush=True)
      sys.exit(1)

  return parse
