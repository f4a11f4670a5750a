"""How every command reports a failure the user can fix: one line, no stack trace.

Each module keeps its own error type (``RecordError``, ``TrainingError``, ``EmbedError``...),
written so that its message names the file, record or key and what to do. A command's ``main`` is
wrapped by :func:`run`, which prints those errors as ``<command>: error: <message>`` and exits with
status 1.
Anything else is a bug and keeps its traceback. ``LIFT_VERBOSE=1`` (or ``--verbose`` for commands
that define it) shows the traceback of user errors too.

This module imports nothing heavy: the PyTorch embedding job uses it without JAX.
"""

from __future__ import annotations

import os
import re
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


class Interrupted(Exception):
  """A command stopped by a signal after finishing what it had to (a checkpoint, a child's
  save): :func:`run` prints the message and exits with 128 + the signal (130 Ctrl-C, 143
  SIGTERM), without a stack trace."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum, self.exit_code = signum, 128 + int(signum)


def run(command: str, main: Callable[..., Any], *args, **kwargs) -> int:
  """Calls ``main``; a user error becomes one line on stderr and exit status 1, an
  :class:`Interrupted` one line and 128 + the signal. The exit status is what ``main`` returns
  when that is an int, else 0 (a command may return its result)."""
  try:
    status = main(*args, **kwargs)
    return status if isinstance(status, int) else 0
  except Interrupted as e:
    print(f"{command}: {e}", file=sys.stderr, flush=True)
    return e.exit_code
  except KeyboardInterrupt:  # a second Ctrl-C: stop now, without the stack
    print(f"{command}: interrupted", file=sys.stderr, flush=True)
    return 130
  except Exception as e:  # noqa: BLE001 - re-raised unless it is a user error
    message = describe(e)
    if message is None or verbose():
      raise
    print(f"{command}: error: {message}", file=sys.stderr, flush=True)
    return 1


@user_error
class UsageError(ValueError):
  """A command line flag is unknown, missing or malformed."""


@user_error
class ConfigError(ValueError):
  """A config value is wrong (unknown name, impossible shape, out of range); the message names the
  key (``model.loss``, ``mesh.fsdp``...) and what it accepts."""


def require_flags(flag_values, required: dict[str, str]) -> None:
  """A UsageError naming the first flag of ``required`` ({name: what it is}) left unset."""
  for name, what in required.items():
    if flag_values[name].value is None:
      raise UsageError(f"--{name} is required: {what}")


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


def saved_config_path() -> str:
  """The config file that loads a saved config (:mod:`lift_jax.saved_config`)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_config.py")


def _rewrite(argv: list[str], aliases: dict[str, str] | None) -> list[str]:
  """Aliases (whole arguments), then a saved config (``--config=...json``) loaded through
  :mod:`lift_jax.saved_config`."""
  out = []
  for a in argv:
    a = (aliases or {}).get(a, a)
    if a.startswith("--config=") and a.endswith(".json") and ":" not in a[len("--config="):]:
      a = f"--config={saved_config_path()}:{a[len('--config='):]}"
    out.append(a)
  return out


def flags_parser(command: str, aliases: dict[str, str] | None = None,
                 rewrite: Callable[[list[str]], list[str]] | None = None):
  """An ``app.run(flags_parser=...)`` that reports bad flags and unknown ``--config.KEY``
  overrides in one line (exit status 1) instead of absl's usage text or a traceback.

  ``aliases`` rewrites whole arguments first (e.g. ``{"--check": "--check=quick"}``),
  ``rewrite`` the argument list; ``--config=FILE.json`` loads a saved config
  (:mod:`lift_jax.saved_config`).
  """

  def parse(argv: list[str]) -> list[str]:
    from absl import flags

    argv = _rewrite(rewrite(argv) if rewrite else argv, aliases)
    try:
      check_config_argument(argv)
      return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - re-raised when verbose
      if verbose():
        raise
      message = config_error_message(e, argv)
      if message is None:  # e.g. a config file that raises: its traceback is what helps
        raise
      print(f"{command}: error: {message}", file=sys.stderr, flush=True)
      sys.exit(1)

  return parse


def config_error_message(e: BaseException, argv: list[str]) -> str | None:
  """The one line for an error parsing the flags: a user error raised while loading the config
  (ml_collections wraps it), absl's own errors, a ``--config.KEY`` that names no field or that
  comes without ``--config``; None for an error in a config file's own code (its traceback is
  what helps)."""
  from absl import flags

  cause, seen = e, set()
  while cause is not None and id(cause) not in seen:  # ml_collections re-raises inside except,
    seen.add(id(cause))  # as the same type with the traceback in its text: look past those
    if describe(cause) is not None and \
        not str(cause).startswith("Error whilst parsing config file"):
      return describe(cause)
    cause = cause.__cause__ or cause.__context__
  text = str(e).strip()
  overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  for override in overrides:  # ml_collections: KeyError/AttributeError naming the missing field
    parts = override[len("--config."):].split(".")
    if isinstance(e, (KeyError, AttributeError)) and any(
        f"'{p}'" in text or f"\\'{p}\\'" in text for p in parts):
      hint = re.search(r'Did you mean "([^"]+)"', text)
      return (f"{override}: no such config key" +
              (f" (did you mean --config.{'.'.join(parts[:-1] + [hint[1]])}?)" if hint else "") +
              "; the README's configuration reference lists every field")
  if isinstance(e, AttributeError) and "has no attribute 'get_config'" in text:  # Python's words
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?")
    return (f"--config={path.split(':')[0]} defines no get_config(): a config file returns its "
            "ConfigDict from get_config() (see configs/*.py)")
  if not isinstance(e, flags.Error):
    return None
  if "Error whilst parsing config file" in text:
    return None
  unknown = re.search(r"Unknown command line flag '(config\.[\w.]+)", text)
  if unknown:
    return (f"--{unknown[1]} needs --config=FILE before it: overrides change a config file's "
            "fields")
  return text.splitlines()[0] + " (--help lists the flags)"


def check_config_argument(argv: list[str]) -> None:
  """``--config=PATH``: PATH exists and is a config (a .py file, or a saved .json)."""
  for a in argv:
    if a.startswith("--config="):
      path = a[len("--config="):].split(":", 1)[0]
      if not os.path.exists(path):
        raise UsageError(f"--config={path}: no such file")
      if os.path.isdir(path) or not path.endswith((".py", ".json")):
        raise UsageError(f"--config={path} is not a config file: give a configs/*.py file (or a "
                         "workdir's saved config.json)")
