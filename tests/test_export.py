"""Export to Hugging Face transformers and OpenCLIP (lift_jax.export): transformers' and OpenCLIP's
forward on the exported files against lift_jax's (float32, a LIFT and a CLIP run), every weight
in place when they load, bit-identical parameters back through the importer, the manifest, and
the refusal of a tower a format cannot express."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import openclip_modules
from conftest import REPO, require
from lift_jax import checkpoint as ckpt
from lift_jax import config_lib, export, pretrained, saved_config
from lift_jax.data import records, transforms
from lift_jax.models import weights
from lift_jax.models.two_tower import TwoTower

torch = require("torch")
transformers = require("transformers")
from safetensors.torch import load_file  # noqa: E402 - after torch's availability check

IMAGE, STEP = 32, 7


def run_config(mode, tmp_path, **model):
  c = config_lib.base(mode)
  c.model.variant, c.model.image_size, c.model.dtype = "B/8", IMAGE, "float32"
  c.model.vit.width, c.model.vit.depth, c.model.vit.num_heads, c.model.vit.mlp_dim = 32, 2, 4, 72
  c.model.embed_dim = 16
  c.evals.resize_size = 37
  if mode == "lift":
    c.model.head_hidden = (24,)
    emb = tmp_path / "embeddings"
    emb.mkdir()
    records.write_manifest(str(emb), {"kind": "embeddings", "model": "org/some-encoder",
                                      "revision": "abc", "pooling": "mean", "max_length": 77,
                                      "dim": 16, "normalized": True, "shards": []})
    c.data.embeddings = str(emb)
  else:
    c.model.loss = "sigmoid"  # a logit bias too
    c.model.text.update(vocab_size=60, context_length=12, width=24, depth=1, num_heads=2)
  for k, v in model.items():
    setattr(c.model, k, v)
  return c


def trained_run(mode, tmp_path, steps=(STEP,), **model):
  """A workdir whose checkpoints hold random, non-trivial parameters (LayerNorms and biases
  too); returns (workdir, config, {step: params})."""
  c = run_config(mode, tmp_path, **model)
  workdir = str(tmp_path / f"run-{mode}")
  saved = {}
  for step in steps:
    params = nnx.to_pure_dict(nnx.split(TwoTower(c.model.to_dict(), rngs=nnx.Rngs(step)))[1])
    rng = np.random.default_rng(step)
    params = jax.tree.map(
        lambda a: np.asarray(a, np.float32) + 0.05 * rng.standard_normal(np.shape(a), np.float32),
        params)
    ckpt.save_params(workdir, step, params, c)
    saved[step] = params
  return workdir, c, saved


def model_of(config, params):
  graphdef, state = nnx.split(TwoTower(config.model.to_dict(), rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def images(seed=0):
  return np.random.default_rng(seed).normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)


def to_torch(x):
  return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def torch_head(folder, pooled):
  """LIFT's head from lift_head.safetensors: Linear -> exact GELU -> Linear."""
  h = load_file(os.path.join(folder, weights.LIFT_EXTRAS))
  x = torch.nn.functional.linear(pooled, h["mlp_projector.projector.0.weight"],
                                 h["mlp_projector.projector.0.bias"])
  return torch.nn.functional.linear(torch.nn.functional.gelu(x),
                                    h["mlp_projector.projector.2.weight"],
                                    h["mlp_projector.projector.2.bias"])


def flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------------------------------
# transformers


@pytest.mark.parametrize("mode", ["lift", "clip"])
def test_hf_export_loads_and_matches_transformers(mode, tmp_path):
  workdir, c, saved = trained_run(mode, tmp_path)
  out = str(tmp_path / "hf")
  manifest = export.export(workdir, "hf", out)
  x = images(1)
  ours = np.asarray(model_of(c, saved[STEP]).image_features(jnp.asarray(x)))
  with torch.no_grad():
    if mode == "clip":
      hf, info = transformers.CLIPVisionModelWithProjection.from_pretrained(
          out, output_loading_info=True)
      theirs = hf(pixel_values=to_torch(x)).image_embeds.numpy()
    else:
      hf, info = transformers.CLIPVisionModel.from_pretrained(out, output_loading_info=True)
      tower = getattr(hf, "vision_model", hf)
      tokens = tower.post_layernorm(hf(pixel_values=to_torch(x)).last_hidden_state)
      theirs = torch_head(out, tokens[:, 1:].mean(1)).numpy()
  assert not any(info.values()), info  # no missing, unexpected or mis-shaped weight
  diff = float(np.abs(ours - theirs).max())
  print(f"{mode} hf export: max |lift_jax - transformers| = {diff:.2e}")
  assert diff <= 1e-4
  processor = transformers.CLIPImageProcessor.from_pretrained(out)
  assert list(processor.image_mean) == pytest.approx(list(c.evals.mean))
  assert processor.size["shortest_edge"] == 37 and processor.crop_size["height"] == IMAGE
  assert manifest["run"]["step"] == STEP and manifest["run"]["config"] == ckpt.config_to_dict(c)
  if mode == "lift":
    enc = manifest["text_encoder"]
    assert (enc["model"], enc["revision"], enc["max_length"]) == ("org/some-encoder", "abc", 77)


def test_hf_refuses_a_pooling_transformers_lacks_in_one_line(tmp_path):
  workdir, _, _ = trained_run("clip", tmp_path, pool="avg")
  r = subprocess.run([sys.executable, "-m", "lift_jax.tools.export", f"--workdir={workdir}",
                      "--format=hf", f"--output={tmp_path / 'out'}"], cwd=REPO,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
  assert r.returncode == 1, r.stderr[-2000:]
  errors = [line for line in r.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1 and "model.pool='avg'" in errors[0], r.stderr[-2000:]
  assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# OpenCLIP


@pytest.mark.parametrize("mode", ["lift", "clip"])
def test_open_clip_export_loads_strictly_and_matches_openclip(mode, tmp_path):
  workdir, c, saved = trained_run(mode, tmp_path)
  out = str(tmp_path / "oc")
  manifest = export.export(workdir, "open_clip", out)
  oc, oc_config = openclip_modules.load_exported(out)
  model = model_of(c, saved[STEP])
  x = images(2)
  ours = np.asarray(model.image_features(jnp.asarray(x)))
  with torch.no_grad():
    theirs = oc.encode_image(to_torch(x))
    if mode == "lift":
      theirs = torch_head(out, theirs)
  diff = float(np.abs(ours - theirs.numpy()).max())
  print(f"{mode} open_clip export: max |lift_jax - OpenCLIP| image features = {diff:.2e}")
  assert diff <= 1e-4
  assert oc_config["preprocess_cfg"]["mean"] == pytest.approx(list(c.evals.mean))
  if mode == "clip":
    ids = np.zeros((2, 12), np.int64)
    ids[0, :4] = [58, 7, 9, 59]
    ids[1, :7] = [58, 3, 30, 4, 11, 12, 59]
    with torch.no_grad():
      text = oc.encode_text(torch.from_numpy(ids)).numpy()
    ours_text = np.asarray(model.text(jnp.asarray(ids, jnp.int32)))
    print(f"clip open_clip export: max |lift_jax - OpenCLIP| text features = "
          f"{np.abs(ours_text - text).max():.2e}")
    assert np.abs(ours_text - text).max() <= 1e-4
    assert float(oc.logit_scale.detach()) == float(saved[STEP]["logit_scale"])
    assert float(oc.logit_bias.detach()) == float(saved[STEP]["logit_bias"])
  else:
    assert "visual.proj" in manifest["placeholder_tensors"]
    assert oc_config["model_cfg"]["vision_cfg"]["pool_type"] == "avg"


# ------------------------------------------------------------------------------------------------
# Round trip: export -> import


@pytest.mark.parametrize("mode,fmt", [("lift", "hf"), ("lift", "open_clip"),
                                      ("clip", "open_clip")])
def test_export_then_import_gives_bit_identical_parameters(mode, fmt, tmp_path):
  workdir, _, saved = trained_run(mode, tmp_path, steps=(3, STEP))
  out = str(tmp_path / "export")
  assert export.export(workdir, fmt, out, step=3)["run"]["step"] == 3
  config = saved_config.load(os.path.join(out, weights.EXPORT_MANIFEST))
  back = str(tmp_path / "imported")
  pretrained.import_checkpoint(out, config, back)
  params, _ = ckpt.restore_params(back)
  got, want = flat(params), flat(saved[3])
  assert got.keys() == want.keys()
  different = [k for k in want if not np.array_equal(got[k], want[k])]
  assert not different, different


def test_clip_hf_export_imports_its_tower_and_projection_bit_identically(tmp_path):
  workdir, c, saved = trained_run("clip", tmp_path)
  out = str(tmp_path / "hf")
  export.export(workdir, "hf", out)
  state, _ = weights.load_hf_clip(out)
  loaded = weights.convert(state, weights.abstract_params(c.model.to_dict()),
                           select="^(visual|head)/")
  got, want = flat(loaded), flat(saved[STEP])
  assert got and all(k.startswith(("visual/", "head/")) for k in got)
  assert all(np.array_equal(got[k], want[k]) for k in got)


def test_import_cli_reads_an_export_with_its_manifest_as_config(tmp_path):
  workdir, _, saved = trained_run("lift", tmp_path)
  out = str(tmp_path / "oc")
  export.export(workdir, "open_clip", out)
  back = tmp_path / "imported"
  r = subprocess.run([sys.executable, "-m", "lift_jax.tools.import_torch", f"--checkpoint={out}",
                      f"--config={out}/{weights.EXPORT_MANIFEST}", f"--output={back}"], cwd=REPO,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  params, _ = ckpt.restore_params(str(back))
  got, want = flat(params), flat(saved[STEP])
  assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------------
# Files and folders


def test_every_tensor_is_written_contiguous_and_read_back(tmp_path):
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  path = str(tmp_path / "t.safetensors")
  export.save_tensors(path, {"t": a.T})  # a transposed view: a non-contiguous buffer
  from safetensors.numpy import load_file as np_load

  np.testing.assert_array_equal(np_load(path)["t"], a.T)


def test_output_must_be_new_or_a_previous_export(tmp_path):
  workdir, _, _ = trained_run("lift", tmp_path)
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  with pytest.raises(export.ExportError, match="not empty"):
    export.export(workdir, "hf", str(other))
  with pytest.raises(export.ExportError, match="no lift_jax export"):
    export.export(workdir, "hf", str(other), overwrite=True)
  assert (other / "notes.txt").read_text() == "mine"
  out = str(tmp_path / "out")
  export.export(workdir, "open_clip", out)
  export.export(workdir, "hf", out, overwrite=True)
  assert not os.path.exists(os.path.join(out, weights.OPEN_CLIP_WEIGHTS))
  with pytest.raises(export.ExportError, match="no finished step 5"):
    export.export(workdir, "hf", str(tmp_path / "x"), step=5)


def test_open_clip_mlp_ratio_gives_every_width_back():
  # OpenCLIP builds int(width * mlp_ratio): 115 / 56 * 56 floors to 114 in float arithmetic.
  assert int(56 * (115 / 56)) == 114
  for width, mlp in ((56, 115), (88, 98), (768, 3072), (1152, 4304)):
    assert int(width * export._mlp_ratio(width, mlp)) == mlp
  assert transforms.eval_resize_size(224) == 256
