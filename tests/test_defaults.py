"""Each default is written once: what the code falls back to equals the config's default.

The scan finds every place in ``lift_jax/``, ``eval/`` and ``embed/`` that writes a fallback under
the name of a config field: a function parameter's default, a dataclass field's default, and
``<config>.get("key", value)``. Each must be listed here: either as the same setting (its value is
then compared with the default of every config in ``configs/``) or as a different thing that
shares the name, with the reason. A new fallback that is in neither list fails the test, so a
second copy of a default cannot appear unnoticed.
"""

import ast
import dataclasses
import glob
import importlib
import inspect
import os

import pytest

from lift_jax import common, config_lib
from lift_jax.data import convert, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))

# site -> (config key, which configs: None = every config, "lift"/"clip" = configs of that mode,
# "default" = config_lib.base() called without a mode). A site is FILE::QUALNAME.NAME, or
# FILE::QUALNAME.get(NAME) for a ``.get`` on a config.
SAME = {
    "lift_jax/data/pipeline.py::TrainTransform.__init__.crop_scale": ("data.crop_scale", None),
    "lift_jax/data/pipeline.py::TrainTransform.__init__.crop_ratio": ("data.crop_ratio", None),
    "lift_jax/data/pipeline.py::TrainTransform.__init__.caption_field":
        ("data.caption_field", None),
    "lift_jax/data/pipeline.py::Batches.__init__.prefetch": ("data.prefetch", None),
    "eval/benchmarks/retrieval.py::Spec.caption_field": ("data.caption_field", None),
    "eval/predictor.py::Predictor.__init__.mean": ("evals.mean", None),
    "eval/predictor.py::Predictor.__init__.std": ("evals.std", None),
    "eval/benchmarks/sugarcrepe.py::Spec.skip_missing": ("evals.skip_missing", None),
    "eval/benchmarks/zeroshot.py::Spec.skip_missing": ("evals.skip_missing", None),
    "eval/benchmarks/retrieval.py::Spec.skip_missing": ("evals.skip_missing", None),
    "eval/benchmarks/long_retrieval.py::Spec.skip_missing": ("evals.skip_missing", None),
    "lift_jax/data/synthetic.py::Settings.num_train": ("data.synthetic.num_train", None),
    "lift_jax/data/synthetic.py::Settings.num_eval": ("data.synthetic.num_eval", None),
    "lift_jax/data/synthetic.py::Settings.image_size": ("data.synthetic.image_size", None),
    "lift_jax/data/synthetic.py::Settings.seed": ("data.synthetic.seed", None),
    "lift_jax/metrics.py::MetricWriter.__init__.tensorboard": ("tensorboard", None),
    "lift_jax/sharding.py::make_mesh.data": ("mesh.data", None),
    "lift_jax/sharding.py::make_mesh.fsdp": ("mesh.fsdp", None),
    "lift_jax/models/layers.py::Transformer.__init__.remat": ("model.remat", None),
    "lift_jax/models/vit.py::VisionTransformer.__init__.remat": ("model.remat", None),
    "lift_jax/models/vit.py::VisionTransformer.__init__.pool": ("model.pool", "lift"),
    "lift_jax/models/text.py::TextTransformer.__init__.remat": ("model.remat", None),
    "lift_jax/models/text.py::TextTransformer.__init__.width": ("model.text.width", "clip"),
    "lift_jax/models/text.py::TextTransformer.__init__.depth": ("model.text.depth", "clip"),
    "lift_jax/models/text.py::TextTransformer.__init__.num_heads":
        ("model.text.num_heads", "clip"),
    "lift_jax/models/text.py::TextTransformer.__init__.embed_dim": ("model.embed_dim", "clip"),
    "lift_jax/models/two_tower.py::build_model.seed": ("seed", None),
    "lift_jax/tools/bench/suite.py::SuiteRow.remat": ("model.remat", None),
    "lift_jax/config_lib.py::model_config.get(mode)": ("model.mode", "default"),
    "lift_jax/preflight.py::_tower_shape.get(tower_shape)": ("model.tower_shape", None),
    "lift_jax/pretrained.py::resolve_shape.get(tower_shape)": ("model.tower_shape", None),
}

OTHER = {
    "lift_jax/config_lib.py::base.mode": "the mode a config is built for, not a field's default",
    "lift_jax/checkpoint.py::Position.data": "the data position of a checkpoint, not the mesh",
    "lift_jax/data/convert.py::Options.num_shards": "shards of a converted set (0 = by size)",
    "lift_jax/data/synthetic.py::Settings.identity.num_shards": "the train manifest's count",
    "lift_jax/data/convert.py::list_webdataset.workers": "listing processes of convert",
    "lift_jax/data/convert.py::list_tars.workers": "listing processes of convert",
    "lift_jax/data/convert.py::list_image_folder.workers": "listing processes of convert",
    "lift_jax/data/shards.py::build_shards.workers": "encoding processes of a shard writer",
    "lift_jax/tools/bench/fake_data.py::images.workers": "encoding processes of a shard writer",
    "lift_jax/tools/bench/fake_data.py::images.seed": "the fake images' own seed",
    "lift_jax/data/records.py::embedding_record.dtype": "storage dtype of an embedding record",
    "lift_jax/losses.py::l2_normalize.eps": "a norm's guard against zero, not Adam's epsilon",
    "lift_jax/models/layers.py::torch_linear_init.init.dtype": "parameter dtype of an initialiser",
    "lift_jax/models/layers.py::zeros_init.dtype": "parameter dtype of an initialiser",
    "lift_jax/models/layers.py::normal_init.init.dtype": "parameter dtype of an initialiser",
    "lift_jax/models/vit.py::VisionTransformer.__init__.dtype":
        "a tower built by hand computes in float32; the trainer passes model.dtype",
    "lift_jax/models/text.py::TextTransformer.__init__.dtype":
        "a tower built by hand computes in float32; the trainer passes model.dtype",
    "embed/fixtures.py::write_tokenizer.vocab_size": "a tiny test tokenizer's vocabulary",
    "embed/fixtures.py::write_checkpoint.seed": "a random test checkpoint's seed",
    "embed/fixtures.py::write_checkpoint.dtype": "a random test checkpoint's storage dtype",
    "embed/nvembed.py::init_random_.seed": "a random test checkpoint's seed",
    "embed/nvembed.py::random_model.seed": "a random test checkpoint's seed",
}

# Names a ``.get`` is called on when it reads a config (a section or the whole).
CONFIG_RECEIVERS = ("config", "cfg", "model", "model_cfg", "optim", "optim_cfg", "data", "evals")


def _leaves(d, prefix=""):
  out = {}
  for k, v in d.items():
    if hasattr(v, "items"):
      out.update(_leaves(v, prefix + k + "."))
    else:
      out[prefix + k] = v
  return out


FIELD_NAMES = {k.rsplit(".", 1)[-1] for mode in ("lift", "clip")
               for k in _leaves(config_lib.base(mode).to_dict())}


def _value(node):
  """The default written at ``node`` when it is a literal, else ``inspect.Parameter.empty``."""
  try:
    return ast.literal_eval(node)
  except ValueError:
    return inspect.Parameter.empty


class _Sites(ast.NodeVisitor):
  """Fallback sites of one file: {site: literal value or Parameter.empty (ask at run time)}."""

  def __init__(self, path):
    self.path, self.stack, self.sites = path, [], {}

  def _add(self, name, node):
    if name in FIELD_NAMES and not (isinstance(node, ast.Constant) and node.value is None):
      self.sites[f"{self.path}::{'.'.join(self.stack)}.{name}"] = _value(node)

  def visit_ClassDef(self, node):
    self.stack.append(node.name)
    for st in node.body:
      if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and st.value:
        self._add(st.target.id, st.value)
    self.generic_visit(node)
    self.stack.pop()

  def visit_FunctionDef(self, node):
    self.stack.append(node.name)
    a = node.args
    positional = a.posonlyargs + a.args
    for arg, d in zip(positional[len(positional) - len(a.defaults):], a.defaults):
      self._add(arg.arg, d)
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
      if d is not None:
        self._add(arg.arg, d)
    self.generic_visit(node)
    self.stack.pop()

  def visit_Call(self, node):
    f = node.func
    if (isinstance(f, ast.Attribute) and f.attr == "get" and len(node.args) == 2
        and isinstance(node.args[0], ast.Constant) and node.args[0].value in FIELD_NAMES
        and not (isinstance(node.args[1], ast.Dict) and not node.args[1].keys)):  # a section
      receiver = ast.unparse(f.value)
      if any(part in CONFIG_RECEIVERS for part in receiver.replace("(", ".").replace(")", "")
             .split(".")):
        self.sites[f"{self.path}::{'.'.join(self.stack)}.get({node.args[0].value})"] = \
            _value(node.args[1])
    self.generic_visit(node)


def _scan():
  sites = {}
  for package in ("lift_jax", "eval", "embed"):
    for path in sorted(glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True)):
      rel = os.path.relpath(path, REPO)
      visitor = _Sites(rel)
      with open(path) as f:
        visitor.visit(ast.parse(f.read()))
      sites.update(visitor.sites)
  return sites


def _runtime_default(site):
  """The default at ``site`` read from the imported object (for defaults that are names)."""
  path, qualname = site.split("::")
  module = importlib.import_module(path[:-3].replace("/", "."))
  *owner, name = qualname.split(".")
  obj = module
  for part in owner:
    obj = getattr(obj, part)
  if dataclasses.is_dataclass(obj):
    return {f.name: f.default for f in dataclasses.fields(obj)}[name]
  return inspect.signature(obj).parameters[name].default


def _config_value(config, key):
  value = config
  for part in key.split("."):
    value = value[part]
  return value.to_dict() if hasattr(value, "to_dict") else value


def _normalise(value):
  if isinstance(value, (list, tuple)):
    return tuple(_normalise(v) for v in value)
  return value


SITES = _scan()


def test_every_fallback_is_listed():
  """A default under a config field's name is either that field's default or named as another
  thing; a fallback added without either fails here."""
  unlisted = sorted(set(SITES) - set(SAME) - set(OTHER))
  assert not unlisted, ("fallbacks under config field names; add each to SAME (the config's "
                        f"default, compared below) or OTHER (with the reason): {unlisted}")
  gone = sorted((set(SAME) | set(OTHER)) - set(SITES))
  assert not gone, f"listed sites the scan no longer finds (remove them): {gone}"


@pytest.mark.parametrize("config_path", CONFIGS, ids=os.path.basename)
def test_fallbacks_equal_the_config_defaults(config_path):
  config = common.load_config_file(config_path)
  mode = config.model.mode
  defaults = {"lift": config_lib.base("lift"), "clip": config_lib.base("clip"),
              "default": config_lib.base()}
  checked = 0
  for site, (key, which) in SAME.items():
    if which in ("lift", "clip") and which != mode:
      continue
    base = defaults["default" if which == "default" else mode]
    written = SITES[site]
    if written is inspect.Parameter.empty:
      written = _runtime_default(site)
    assert _normalise(written) == _normalise(_config_value(base, key)), (site, key)
    checked += 1
  assert checked >= 20


def test_the_scan_finds_fallbacks_of_each_kind():
  """The scanner itself: a parameter default, a dataclass field and a config ``.get``."""
  source = ("import dataclasses\n"
            "def f(x, *, crop_scale=(0.5, 1.0), seed=None): return config.get('prefetch', 3)\n"
            "@dataclasses.dataclass\nclass S:\n  workers: int = 4\n")
  visitor = _Sites("x.py")
  visitor.visit(ast.parse(source))
  assert visitor.sites == {"x.py::f.crop_scale": (0.5, 1.0), "x.py::f.get(prefetch)": 3,
                           "x.py::S.workers": 4}


def test_commands_take_their_defaults_from_the_owners():
  """The synthetic generator's flags and the config's data.synthetic come from its Settings;
  convert's flags from its Options."""
  settings = synthetic.Settings()
  for field in dataclasses.fields(synthetic.Settings):
    assert synthetic.FLAGS[field.name].default == getattr(settings, field.name), field.name
  section = config_lib.base().data.synthetic
  for name in ("num_train", "num_eval", "image_size", "seed"):
    assert section[name] == getattr(settings, name), name
  options = convert.Options()
  for name in ("caption_source", "join_field", "limit", "num_shards", "resize", "jpeg_quality",
               "min_image_size", "max_aspect_ratio"):
    assert convert.FLAGS[name].default == getattr(options, name), name
  assert convert.FLAGS["extra_fields"].default == ",".join(f"{c}:{f}"
                                                          for c, f in options.extra_fields)
  assert convert.FLAGS["json_fields"].default == ",".join(options.json_fields)
