"""Every config builds and documents its fields; the README's configuration reference is current."""

import os

import pytest

from eval import benchmarks
from lift_jax import config_lib
from lift_jax.tools import config_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", config_reference.CONFIGS)
def test_config_builds_and_every_field_is_documented(name):
  c = config_reference.load(name)
  fields = config_reference.flatten(c.to_dict())
  undocumented = [f for f in fields if f not in config_lib.DOCS]
  assert not undocumented
  assert c.batch_size % 8 == 0 and c.total_steps > 0


def test_paper_schedules_and_recipe():
  dc, recap = config_reference.load("vitb16_datacomp"), config_reference.load("vitb16_recap")
  clip = config_reference.load("clip_vitb16_recap")
  assert (dc.total_steps, recap.total_steps) == (78_024, 31_264)
  assert dc.batch_size == 16384 and dc.optim.lr == 1e-3 and dc.optim.warmup_steps == 500
  assert (dc.optim.b1, dc.optim.b2, dc.optim.eps, dc.optim.weight_decay) == (0.9, 0.98, 1e-6, 0.2)
  assert dc.optim.grad_clip_norm == 1.0 and clip.optim.grad_clip_norm is None
  assert dc.model.pool == "avg" and clip.model.pool == "tok"
  assert clip.model.text.context_length == 323 and recap.data.caption_field == "recaption"
  assert dc.model.embed_dim == 4096 and tuple(dc.model.head_hidden) == (4096,)


def test_cos_and_sigmoid_switches():
  import importlib.util

  path = os.path.join(REPO, "configs", "vitb16_datacomp.py")
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.get_config("cos").model.loss == "cos"
  assert module.get_config("sigmoid").model.loss == "sigmoid"
  with pytest.raises(ValueError, match="unknown config argument"):
    module.get_config("bogus")


def test_eval_paths_resolve_against_data_root():
  c = config_reference.load("vitb16_datacomp")
  resolved, dropped = benchmarks.resolve_paths(c)
  assert sorted(dropped) == ["coco", "flickr30k", "imagenet", "sugarcrepe"]
  assert not resolved.evals.benchmarks
  c.evals.data_root = "/data/eval"
  resolved, dropped = benchmarks.resolve_paths(c)
  assert not dropped
  assert resolved.evals.benchmarks.coco.image_dir == "/data/eval/coco/val2017"
  c.evals.benchmarks.coco.image_dir = "/elsewhere/val2017"
  assert benchmarks.resolve_paths(c)[0].evals.benchmarks.coco.image_dir == "/elsewhere/val2017"


def test_readme_configuration_reference_is_current():
  assert config_reference.main(["--check", os.path.join(REPO, "README.md")]) == 0
