"""Skips never hide failures in CI: with LIFT_REQUIRE_ALL=1 (set by .ci/run) a test whose
reference data or package is missing fails; without it, it is skipped and the reason listed."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

CASES = '''
from conftest import require, shared_data

def test_needs_a_package():
  require("lift_jax_no_such_package")

def test_needs_reference_data():
  shared_data("no_such_folder", "file.json")

def test_has_everything():
  assert require("json").dumps([1]) == "[1]"
'''

MODULE_LEVEL = '''
from conftest import require

torch_like = require("lift_jax_no_such_package")

def test_never_runs():
  pass
'''


def run_pytest(folder, require_all, *files):
  env = {k: v for k, v in os.environ.items() if k != "LIFT_REQUIRE_ALL"}
  if require_all:
    env["LIFT_REQUIRE_ALL"] = "1"
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-p", "no:xdist", "-c", os.path.join(REPO, "pytest.ini"),
                         "--rootdir", str(folder), *files],
                        cwd=folder, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = tmp_path_factory.mktemp("ci")
  shutil.copy(os.path.join(REPO, "tests", "conftest.py"), path / "conftest.py")
  (path / "test_cases.py").write_text(CASES)
  (path / "test_module_level.py").write_text(MODULE_LEVEL)
  return path


def test_missing_things_skip_with_reasons_listed(folder):
  result = run_pytest(folder, False, "test_cases.py", "test_module_level.py")
  out = result.stdout + result.stderr
  assert result.returncode == 0, out
  assert "1 passed, 3 skipped" in out
  # -rs (pytest.ini) lists every skip with its reason.
  assert "SKIPPED" in out and "lift_jax_no_such_package is not installed" in out
  assert "no_such_folder/file.json is not present" in out


def test_missing_things_fail_under_lift_require_all(folder):
  result = run_pytest(folder, True, "test_cases.py")
  out = result.stdout + result.stderr
  assert result.returncode == 1, out
  assert "2 failed, 1 passed" in out and "skipped" not in out
  assert out.count("LIFT_REQUIRE_ALL is set, so this is a failure") >= 2
  # A module that needs the package at import time stops the run with a collection error.
  result = run_pytest(folder, True, "test_module_level.py")
  out = result.stdout + result.stderr
  assert result.returncode != 0 and "1 error" in out and "skipped" not in out, out
  assert "lift_jax_no_such_package is not installed" in out


def test_ci_entry_sets_lift_require_all():
  with open(os.path.join(REPO, ".ci", "run")) as f:
    script = f.read()
  assert 'export LIFT_REQUIRE_ALL="${LIFT_REQUIRE_ALL:-1}"' in script
  with open(os.path.join(REPO, "pytest.ini")) as f:
    assert "-rs" in f.read().split("addopts", 1)[1].splitlines()[0]
