"""Every command answers a wrong invocation in at most three lines that name the bad key, flag or
path and the fix, without a traceback; every command a message suggests parses as written."""

import ast
import concurrent.futures
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

TINY = os.path.join(REPO, "configs", "tiny_synthetic.py")
MINILM = os.path.join(REPO, "embed", "configs", "minilm.py")

# (command module, arguments; {t} = a scratch folder), a regex the error line must match.
WRONG = [
    ("lift_jax.main", "--config={tiny} --workdir={t}/w --config.total_step=10",
     r"--config.total_step: no such config key \(did you mean --config.total_steps\?\)"),
    ("lift_jax.main", "--config={tiny} --workdir={t}/w --config.data.bogus=1",
     r"--config.data.bogus: no such config key"),
    ("lift_jax.main", "--config={tiny} --workdir={t}/w --config.batch_size=abc",
     r"--config.batch_size=abc: invalid literal for int"),
    ("lift_jax.main", "--workdir={t}/w", r"--config must have a value"),
    ("lift_jax.main", "--config={t}/notconfig.py --workdir={t}/w",
     r"--config={t}/notconfig.py defines no get_config\(\)"),
    ("lift_jax.main", "--config={t}/afile.txt --workdir={t}/w",
     r"--config={t}/afile.txt is not a config file"),
    ("lift_jax.main", "--config={t}/missing.py --workdir={t}/w",
     r"--config={t}/missing.py: no such file"),
    ("lift_jax.main", "--config={t}/notconfig.json --workdir={t}/w",
     r"--config={t}/notconfig.json is not a saved lift_jax config"),
    ("lift_jax.main", "--config={tiny} --workdir={t}/w --bogus_flag",
     r"Unknown command line flag 'bogus_flag' \(--help"),
    ("lift_jax.main", f"--config={REPO}/configs/vitb16_datacomp.py --workdir={{t}}/w",
     r"config.data.images is not set: .*`python -m lift_jax.data.convert --output=DIR"),
    ("lift_jax.main", "--config={tiny} --workdir={t}/afile.txt --prepare_only",
     r"{t}/afile.txt is a file, so {t}/afile.txt cannot be a folder; choose another --workdir"),
    ("eval.main", "--workdir={t}/empty", r"{t}/empty: holds no finished checkpoint step"),
    ("eval.main", "", r"give --workdir=DIR \(a training run\) or --checkpoint=PATH"),
    ("eval.main", "--workdir={t}/empty --config.evals.text_bank=X",
     r"{t}/empty: holds no finished checkpoint step"),
    ("eval.main", "--write_texts={t}/t.txt", r"--write_texts needs --config=CONFIG"),
    ("embed.main", "--config.images={t}/empty",
     r"--config.images needs --config=FILE before it"),
    ("embed.main", f"--config={MINILM} --config.images={{t}}/empty --config.output={{t}}/o",
     r"no 'images-\*-of-\*.array_record' shards in {t}/empty"),
    ("embed.main", f"--config={MINILM}", r"set exactly one of config.images .* and config.texts"),
    ("embed.main", f"--config={MINILM} --config.bogus=1", r"--config.bogus: no such config key"),
    ("embed.banks", "", r"--out=FILE is required"),
    ("embed.banks", "--out={t}/t.json --imagenet={t}/empty",
     r"classnames {t}/empty/classnames_keras.txt does not exist"),
    ("embed.probe", "", r"--config=embed/configs/<model>.py is required"),
    ("lift_jax.data.convert", "", r"--output=DIR is required"),
    ("lift_jax.data.convert", "--output={t}/o --tars={t}/empty",
     r"--tars={t}/empty is a folder; give the files or a quoted glob"),
    ("lift_jax.data.convert", "--output={t}/o --images={t}/empty",
     r"an image folder needs --captions"),
    ("lift_jax.data.convert", "--output={t}/o --images={t}/afile.txt --captions={t}/afile.txt",
     r"--images={t}/afile.txt is not a folder"),
    ("lift_jax.data.synthetic", "", r"--output=DIR is required"),
    ("lift_jax.data.synthetic", "--output={t}/s --image_size=8", r"image_size=8: at least 16 px"),
    ("lift_jax.tools.import_torch",
     f"--checkpoint={{t}}/missing.pt --config={TINY} --output={{t}}/imp",
     r"{t}/missing.pt: no such file"),
    ("lift_jax.tools.import_torch", f"--config={TINY}", r"--checkpoint is required"),
    ("lift_jax.tools.bench", "--mode=embed", r"--mode=embed needs --texts=FILE"),
    ("lift_jax.tools.bench", "--mode=bogus", r"--mode=bogus: value should be one of"),
    ("lift_jax.tools.demo", "--bogus", r"Unknown command line flag 'bogus'"),
    ("lift_jax.tools.demo", "--steps=abc", r"--steps=abc: invalid literal for int"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
  t = tmp_path_factory.mktemp("wrong")
  (t / "empty").mkdir()
  (t / "afile.txt").write_text("hi\n")
  (t / "notconfig.py").write_text("x = 1\n")
  (t / "notconfig.json").write_text('{"not": "a config"}\n')
  return str(t)


def run(module, args, cwd):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("LIFT_VERBOSE", None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_wrong_invocations_are_answered_in_a_few_lines(scratch):
  assert len(WRONG) >= 25 and len({m for m, _, _ in WRONG}) == 10
  fill = lambda text: text.replace("{tiny}", TINY).replace("{t}", scratch)
  cases = [(m, fill(a).split(), fill(want)) for m, a, want in WRONG]
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = list(pool.map(lambda c: run(c[0], c[1], scratch), cases))
  problems = []
  for (module, args, want), r in zip(cases, results):
    said = [line for line in r.stderr.splitlines() if not re.match(r"^[IWE]\d{4} ", line)]
    said = [line for line in said if line.strip()]
    command = f"python -m {module} {' '.join(args)}"
    if r.returncode == 0 or "Traceback" in r.stderr or len(said) > 3 or \
        not any(re.search(want, line) for line in said):
      problems.append(f"{command}\n  exit {r.returncode}: " + "\n  ".join(said[-6:]))
    print(f"{command}\n  -> {said[-1] if said else ''}")
  assert not problems, "\n".join(problems)


def suggested_commands() -> list[str]:
  """Every `python -m ...` that a string of the code (a message) puts between backticks."""
  found = set()
  for root in ("lift_jax", "eval", "embed"):
    for dirpath, _, files in os.walk(os.path.join(REPO, root)):
      for name in files:
        if not name.endswith(".py"):
          continue
        tree = ast.parse(open(os.path.join(dirpath, name), encoding="utf-8").read())
        for node in ast.walk(tree):
          if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{VALUE}"
                           for v in node.values)
          elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
          else:
            continue
          found.update(re.findall(r"(?<!`)`(python -m [^`]+)`(?!`)", text))
  return sorted(found)


# Parses argument lists with one command's flags (no command runs); prints one verdict each.
PARSE_ONLY = r"""
import importlib, json, sys
module, cases = sys.argv[1], json.loads(sys.argv[2])
m = importlib.import_module(module)
from absl import flags
from lift_jax import cli
values = getattr(m, "FLAGS", flags.FLAGS)
for args in cases:
  try:
    for name in [n for n in values if n.startswith("config.")]:
      delattr(values, name)  # the overrides of the previous case
    values.unparse_flags()
    argv = cli._rewrite(["x", *args], getattr(m, "ALIASES", None))
    cli.check_config_argument(argv)
    sys.argv = argv  # ml_collections finds the --config.KEY overrides in sys.argv
    values(argv)
    print(json.dumps("parsed"))
  except Exception as e:
    print(json.dumps(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
"""


def test_every_suggested_command_parses_as_written(scratch, tmp_path):
  commands = suggested_commands()
  assert len(commands) >= 8, commands
  (tmp_path / "FILE").write_text("a text\n")
  places = {"CONFIG": TINY, "EMBED_CONFIG": MINILM, "FILE": str(tmp_path / "FILE")}
  by_module: dict[str, list] = {}
  for command in commands:
    words = command.split()[2:]
    args = []
    for word in words[1:]:
      for key, value in places.items():
        word = re.sub(rf"=(\S*/)?{key}\b", f"={value}", word)
      word = re.sub(r"=(IMAGES_DIR|DIR|WORKDIR|FOLDER)\b", f"={tmp_path}/dir", word)
      args.append(word.replace("{VALUE}", str(tmp_path / "value")))
    by_module.setdefault(words[0], []).append((command, args))
  problems = []
  for module, cases in by_module.items():
    r = subprocess.run([sys.executable, "-c", PARSE_ONLY, module,
                        json.dumps([a for _, a in cases])], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    verdicts = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('"')]
    assert len(verdicts) == len(cases), r.stderr[-2000:]
    problems += [f"{c}: {v}" for (c, _), v in zip(cases, verdicts) if v != "parsed"]
  assert not problems, "\n".join(problems)
