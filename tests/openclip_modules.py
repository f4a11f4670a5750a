"""OpenCLIP's model classes for the tests, without torchvision.

``import open_clip`` runs the package's ``__init__``, which imports torchvision (its transforms;
and ``open_clip/utils.py`` imports ``torchvision.ops.misc.FrozenBatchNorm2d``); torchvision does
not import beside the CPU torch these tests run with. The model classes need none of it, so
:func:`model_module` imports ``open_clip.model`` with the package ``__init__`` skipped and, only
while that import runs, a stand-in for the one torchvision name ``utils.py`` takes (it freezes
batch norms, which a ViT does not have). The real ``open_clip.create_model('local-dir:...')``
reads the same two files (open_clip_config.json's ``model_cfg`` -> ``CLIP(**model_cfg)``, then
a strict ``load_state_dict``), which is what :func:`load_exported` does.

Installed without its dependencies: ``pip install --no-deps open_clip_torch==3.3.0`` (as
scripts/env.sh does).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import types

from conftest import unavailable


@contextlib.contextmanager
def _torchvision_stand_in():
  names = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
  saved = {n: sys.modules[n] for n in names if n in sys.modules}
  modules = {n: types.ModuleType(n) for n in names}
  modules["torchvision.ops.misc"].FrozenBatchNorm2d = None
  sys.modules.update(modules)
  try:
    yield
  finally:
    for n in names:
      sys.modules.pop(n, None)
    sys.modules.update(saved)


def model_module():
  """``open_clip.model`` (CLIP, its towers, the config dataclasses)."""
  if "open_clip.model" in sys.modules:
    return sys.modules["open_clip.model"]
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    unavailable("open_clip is not installed; pip install --no-deps open_clip_torch==3.3.0")
  import transformers  # noqa: F401 - first: it probes for torchvision when imported

  package = types.ModuleType("open_clip")
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules["open_clip"] = package
  with _torchvision_stand_in():
    import open_clip.model  # noqa: E402 - the package's __init__ is skipped on purpose
  return open_clip.model


def load_exported(folder: str):
  """(OpenCLIP CLIP model in eval mode, its open_clip_config.json) for an OpenCLIP folder,
  loaded strictly as ``create_model('local-dir:FOLDER')`` does."""
  from safetensors.torch import load_file

  m = model_module()
  with open(os.path.join(folder, "open_clip_config.json"), encoding="utf-8") as f:
    config = json.load(f)
  model = m.CLIP(**config["model_cfg"])
  model.load_state_dict(load_file(os.path.join(folder, "open_clip_model.safetensors")),
                        strict=True)
  return model.eval(), config
