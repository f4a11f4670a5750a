"""Every module of lift_jax, embed and eval imports on its own, and dependencies point one way:
``lift_jax.data`` uses neither ``eval`` nor ``embed``; ``embed`` never imports JAX; the
JAX-free modules of ``eval`` (texts, benchmarks) stay JAX-free; no import cycles, counting the
imports inside functions too.
"""

import ast
import json
import os
import subprocess
import sys

from conftest import REPO

PACKAGES = ("lift_jax", "embed", "eval")
JAX = ("jax", "flax", "optax", "orbax")


def modules() -> dict[str, str]:
  """{dotted module name: file} of every module of the three packages."""
  out = {}
  for package in PACKAGES:
    for root, dirs, files in os.walk(os.path.join(REPO, package)):
      dirs[:] = sorted(d for d in dirs if d != "__pycache__")
      for name in sorted(files):
        if name.endswith(".py"):
          rel = os.path.relpath(os.path.join(root, name), REPO)[:-3].replace(os.sep, ".")
          out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
              os.path.join(root, name)
  return out


def imports_of(path: str, module: str, known: set[str]) -> set[str]:
  """Project modules and top-level packages a file imports, anywhere in it (functions too)."""
  package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                        ([base] if base else []))
      for a in node.names:  # `from pkg import mod` names a module when one exists
        found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
  return found


def graph() -> dict[str, set[str]]:
  mods = modules()
  known = set(mods)
  return {m: imports_of(p, m, known) for m, p in mods.items()}


# The layers, top to bottom: entry points -> eval/, embed/ -> the core (the rest of lift_jax).
ENTRY_POINTS = ("lift_jax.main", "lift_jax.preflight", "lift_jax.prepare", "lift_jax.tools",
                "eval.main", "embed.main", "embed.banks", "embed.probe")


def layer(module: str) -> int:
  if module.startswith(ENTRY_POINTS):
    return 2
  return 1 if module.split(".")[0] in ("eval", "embed") else 0


def own_function_level_imports() -> dict[str, list[tuple[int, str]]]:
  """{module: [(line, source line)]} of imports of the project's own modules inside functions."""
  out = {}
  for module, path in modules().items():
    source = open(path, encoding="utf-8").read()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for inner in ast.walk(node):
        if isinstance(inner, ast.Import):
          names = [a.name for a in inner.names]
        elif isinstance(inner, ast.ImportFrom):
          names = [inner.module or ""] if not inner.level else [module]
        else:
          continue
        if any(n.split(".")[0] in PACKAGES for n in names):
          out.setdefault(module, []).append((inner.lineno, lines[inner.lineno - 1]))
  return out


def test_layers_point_down_only():
  """The core never imports eval/, embed/ or an entry point, not even inside a function; eval/
  and embed/ never import an entry point."""
  wrong = []
  for module, deps in graph().items():
    for dep in deps:
      if dep.split(".")[0] in PACKAGES and layer(dep) > layer(module):
        wrong.append(f"{module} (layer {layer(module)}) imports {dep} (layer {layer(dep)})")
  assert not wrong, "\n".join(wrong)


def test_few_function_level_imports_each_with_its_reason():
  """Outside entry points, at most 3 imports of our own modules sit inside functions (a reader
  sees the dependency direction from the top of a file), each with a comment saying why."""
  found = {m: hits for m, hits in own_function_level_imports().items() if layer(m) < 2}
  flat = [(m, line, text) for m, hits in found.items() for line, text in hits]
  assert len(flat) <= 3, flat
  for module, line, text in flat:
    assert "#" in text, f"{module}:{line} imports inside a function without saying why: {text}"


def test_dependencies_point_one_way():
  wrong = []
  for module, deps in graph().items():
    tops = {d.split(".")[0] for d in deps}
    if module.startswith("lift_jax.data") and tops & {"eval", "embed"}:
      upward = sorted(d for d in deps if d.split('.')[0] in ('eval', 'embed'))
      wrong.append(f"{module} imports {upward}")
    if module.startswith("embed") and tops & set(JAX):
      wrong.append(f"{module} imports {sorted(tops & set(JAX))}")
    if module in ("eval.texts", "eval.benchmarks") and tops & set(JAX):
      wrong.append(f"{module} imports {sorted(tops & set(JAX))}")
  assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
  g = graph()
  edges = {m: {d for d in deps if d in g and d != m} for m, deps in g.items()}
  # A package's __init__ is imported by its submodules implicitly; only explicit edges count.
  cycles = []
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(edges[m]):
      if state.get(d) == 1:
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = 2

  for m in sorted(edges):
    if m not in state:
      visit(m)
  assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


# Imports each module given on the command line in a forked child of an interpreter that has
# loaded only the third-party packages named in PRELOAD (so a child costs a fraction of a second
# and no project module is loaded before it); prints {module: error or the packages it loaded}.
_IMPORT_EACH = r"""
import importlib, json, os, sys
for name in filter(None, os.environ["PRELOAD"].split(",")):
  importlib.import_module(name)
results = {}
for name in sys.argv[1:]:
  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(r)
    try:
      import importlib
      importlib.import_module(name)
      tops = sorted({m.split(".")[0] for m in sys.modules} & {"jax", "eval", "embed", "torch"})
      out = {"ok": True, "loaded": tops}
    except BaseException as e:
      out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    os.write(w, json.dumps(out).encode())
    os._exit(0)
  os.close(w)
  data = b""
  while chunk := os.read(r, 65536):
    data += chunk
  os.waitpid(pid, 0)
  results[name] = json.loads(data or b'{"ok": false, "error": "no answer"}')
print(json.dumps(results))
"""


def import_each(names, preload):
  out = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], cwd=REPO,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
                            "PRELOAD": ",".join(preload)})
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  failed = {m: r["error"] for m, r in results.items() if not r["ok"]}
  assert not failed, failed
  assert set(results) == set(names)
  return results


# Modules that must never load JAX, not even through what they import.
JAX_FREE = ("embed", "eval.texts", "eval.benchmarks", "lift_jax.cli", "lift_jax.common",
            "lift_jax.config_lib", "lift_jax.data.records", "lift_jax.data.shards",
            "lift_jax.data.convert", "lift_jax.data.synthetic", "lift_jax.data.captions",
            "lift_jax.data.transforms")


def test_every_module_imports_on_its_own():
  names = sorted(modules())
  jax_free = [m for m in names if m.startswith(JAX_FREE)]
  # First the JAX-free modules, with only torch preloaded: what they load, transitively, is
  # checked at run time (the direction holds beyond the static imports above).
  for m, r in import_each(jax_free, ["torch", "transformers"]).items():
    assert "jax" not in r["loaded"], (m, r["loaded"])
    if m.startswith("lift_jax.data"):
      assert not {"eval", "embed"} & set(r["loaded"]), (m, r["loaded"])
  # Then every module, with the heavy third-party packages preloaded.
  results = import_each(names, ["jax", "flax.nnx", "optax", "orbax.checkpoint", "grain",
                                "torch", "transformers"])
  for m, r in results.items():
    if m.startswith("lift_jax.data"):
      assert not {"eval", "embed"} & set(r["loaded"]), (m, r["loaded"])
