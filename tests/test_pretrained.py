"""Starting from a pretrained tower: frozen parameters and lr multipliers (against a numpy AdamW),
their optimizer state, Hugging Face CLIP import parity (transformers with the same random weights,
through the import path), refusal of checkpoints that would compute another function, and a
trainer run that starts from a checkpoint with the tower frozen, then resumes."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import fakedata
from conftest import require
from lift_jax import checkpoint as ckpt
from lift_jax import config_lib, optim, pretrained, train
from lift_jax.models import weights
from lift_jax.models.two_tower import TwoTower

OPTIM = dict(lr=1e-2, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, warmup_steps=2,
             grad_clip_norm=None)


def toy_params():
  rng = np.random.default_rng(0)
  return {"visual": {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                     "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
          "head": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}


def toy_grads(step):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), toy_params())


def numpy_adamw(p, grads, cfg, total, factor=1.0):
  """PyTorch's AdamW written out in numpy, with the warmup-cosine schedule written out too."""
  m, v = np.zeros_like(p), np.zeros_like(p)
  for t, g in enumerate(grads):
    lr = cfg["lr"] * (t + 1) / cfg["warmup_steps"] if t < cfg["warmup_steps"] else \
        0.5 * (1 + np.cos(np.pi * (t - cfg["warmup_steps"]) / (total - cfg["warmup_steps"]))) \
        * cfg["lr"]
    lr *= factor
    m = cfg["b1"] * m + (1 - cfg["b1"]) * g
    v = cfg["b2"] * v + (1 - cfg["b2"]) * g * g
    mhat, vhat = m / (1 - cfg["b1"] ** (t + 1)), v / (1 - cfg["b2"] ** (t + 1))
    wd = cfg["weight_decay"] if p.ndim >= 2 else 0.0
    p = p - lr * (mhat / (np.sqrt(vhat) + cfg["eps"]) + wd * p)
  return p


def run_tx(tx, params, steps):
  state = tx.init(params)
  for t in range(steps):
    updates, state = tx.update(toy_grads(t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_frozen_parameters_stay_bit_identical_and_hold_no_state():
  params = toy_params()
  cfg = dict(OPTIM, frozen=("^visual/",))
  tx, _ = optim.make_optimizer(cfg, total_steps=6)
  out, state = run_tx(tx, params, 4)
  for name in ("w", "b"):
    assert np.array_equal(np.asarray(out["visual"][name]), np.asarray(params["visual"][name]))
  ref = numpy_adamw(np.asarray(params["head"]["kernel"]),
                    [np.asarray(toy_grads(t)["head"]["kernel"]) for t in range(4)], cfg, 6)
  np.testing.assert_allclose(np.asarray(out["head"]["kernel"]), ref, rtol=1e-5, atol=1e-6)
  # State: AdamW's two moments for the head's 10 floats only (+ step counters).
  plain, _ = optim.make_optimizer(OPTIM, total_steps=6)
  counters = lambda s: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s) if x.ndim == 0)
  frozen_bytes = optim.state_bytes(state) - counters(state)
  full_state = plain.init(params)
  full_bytes = optim.state_bytes(full_state) - counters(full_state)
  assert frozen_bytes == 2 * (3 * 4 + 4 + 4 * 2 + 2) * 4 - 2 * (3 * 4 + 4) * 4
  assert full_bytes == 2 * (3 * 4 + 4 + 4 * 2 + 2) * 4


def test_frozen_gradients_do_not_count_in_the_clipped_norm():
  params = toy_params()
  cfg = dict(OPTIM, frozen=("^visual/",), grad_clip_norm=1e-3, warmup_steps=0, weight_decay=0.0)
  tx, _ = optim.make_optimizer(cfg, total_steps=2)
  grads = toy_grads(0)
  big = dict(grads, visual=jax.tree.map(lambda g: g * 1e6, grads["visual"]))
  state = tx.init(params)
  a, _ = tx.update(grads, state, params)
  b, _ = tx.update(big, state, params)
  np.testing.assert_array_equal(np.asarray(a["head"]["kernel"]), np.asarray(b["head"]["kernel"]))


def test_lr_multiplier_matches_a_hand_computed_adamw():
  params = toy_params()
  cfg = dict(OPTIM, lr_multipliers=(("^visual/w$", 0.1), ("^visual/", 0.5)))
  tx, _ = optim.make_optimizer(cfg, total_steps=5)
  out, _ = run_tx(tx, params, 5)
  grads = [toy_grads(t) for t in range(5)]
  for path, factor in ((("visual", "w"), 0.1), (("visual", "b"), 0.5), (("head", "kernel"), 1.0)):
    p0 = np.asarray(params[path[0]][path[1]])
    ref = numpy_adamw(p0, [np.asarray(g[path[0]][path[1]]) for g in grads], cfg, 5, factor)
    np.testing.assert_allclose(np.asarray(out[path[0]][path[1]]), ref, rtol=1e-5, atol=1e-7)
    # ...and the factor made a difference: with lr x1 the result is elsewhere.
    if factor != 1.0:
      assert np.abs(numpy_adamw(p0, [np.asarray(g[path[0]][path[1]]) for g in grads], cfg, 5)
                    - ref).max() > 1e-3


def layered_params():
  """Paths where a rule's text appears in the middle, at the end and at the start."""
  z = lambda *shape: jnp.ones(shape, jnp.float32)  # noqa: E731
  return {"visual": {"ln_pre": {"scale": z(4)},
                     "transformer": {"resblocks": {"0": {"ln_1": {"scale": z(4)},
                                                         "mlp": {"c_fc": {"kernel": z(4, 4)}}}}}},
          "ln_head": {"scale": z(2)}, "head": {"kernel": z(4, 2)}}


@pytest.mark.parametrize("rule,expected", [
    ("ln_", {"visual/ln_pre/scale", "visual/transformer/resblocks/0/ln_1/scale",
             "ln_head/scale"}),  # anywhere in the path (re.search)
    ("^ln_", {"ln_head/scale"}),  # anchored: the start only
    ("resblocks/0/", {"visual/transformer/resblocks/0/ln_1/scale",
                      "visual/transformer/resblocks/0/mlp/c_fc/kernel"}),
    ("kernel$", {"visual/transformer/resblocks/0/mlp/c_fc/kernel", "head/kernel"}),
    ("^visual/ln_pre/scale$", {"visual/ln_pre/scale"}),
])
def test_frozen_and_lr_rules_match_anywhere_in_the_path(rule, expected):
  """The documented semantics (re.search; `^` and `$` anchor), for the frozen rules, the
  learning-rate multipliers and the optimizer built from them."""
  params = layered_params()
  paths = {k: v for k, v in zip(
      ["/".join(str(p.key) for p in path) for path, _ in
       jax.tree_util.tree_flatten_with_path(params)[0]], jax.tree.leaves(params))}
  frozen = {"/".join(str(p.key) for p in path) for path, m in
            jax.tree_util.tree_flatten_with_path(optim.frozen_mask(params, (rule,)))[0] if m}
  assert frozen == expected
  factors = {"/".join(str(p.key) for p in path): f for path, f in
             jax.tree_util.tree_flatten_with_path(optim.lr_factors(params, ((rule, 0.5),)))[0]}
  assert {k for k, f in factors.items() if f == 0.5} == expected
  assert all(f == 1.0 for k, f in factors.items() if k not in expected)
  # Through the optimizer: the matched parameters do not move, the others do.
  tx, _ = optim.make_optimizer(dict(OPTIM, frozen=(rule,), weight_decay=0.0), total_steps=4)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = {"/".join(str(p.key) for p in path) for path, u in
           jax.tree_util.tree_flatten_with_path(updates)[0] if np.any(np.asarray(u) != 0)}
  assert moved == set(paths) - expected


def test_first_lr_rule_that_matches_anywhere_wins():
  factors = optim.lr_factors(layered_params(), (("mlp", 0.1), ("resblocks", 0.5), ("ln", 2.0)))
  block = factors["visual"]["transformer"]["resblocks"]["0"]
  assert block["mlp"]["c_fc"]["kernel"] == 0.1  # "mlp" comes first, though "resblocks" matches
  assert block["ln_1"]["scale"] == 0.5
  assert factors["visual"]["ln_pre"]["scale"] == 2.0 and factors["head"]["kernel"] == 1.0


def test_vitb16_frozen_tower_state_saving():
  """The optimizer-state bytes a frozen ViT-B/16 tower saves = 2 moments x 4 bytes x its
  parameters, counted here from the model's abstract shapes."""
  c = config_lib.base("lift")
  abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(
      lambda: TwoTower(c.model.to_dict(), rngs=nnx.Rngs(0))))[1])
  tower = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["visual"]))
  full, _ = optim.make_optimizer(c.optim, 10)
  frozen, _ = optim.make_optimizer(dict(c.optim.to_dict(), frozen=("^visual/",)), 10)
  full_b = optim.state_bytes(jax.eval_shape(full.init, abstract))
  frozen_b = optim.state_bytes(jax.eval_shape(frozen.init, abstract))
  print(f"ViT-B/16 LIFT optimizer state: {full_b / 2**20:.1f} MiB, tower frozen "
        f"{frozen_b / 2**20:.1f} MiB (tower {tower / 1e6:.2f}M parameters)")
  # OpenCLIP's ViT-B-16 visual has 86,192,640 parameters with its 768x512 projection.
  assert tower == 86_192_640 - 768 * 512
  assert full_b - frozen_b == 2 * 4 * tower


# ------------------------------------------------------------------------------------------------
# Hugging Face CLIP through the import path


torch = require("torch")
transformers = require("transformers")

WIDTH, LAYERS, HEADS, PATCH, IMAGE = 32, 2, 4, 8, 32


def hf_model(kind, seed=0, act="gelu", heads=HEADS):
  torch.manual_seed(seed)
  vision = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
                num_attention_heads=heads, image_size=IMAGE, patch_size=PATCH, hidden_act=act)
  text = dict(vocab_size=60, hidden_size=24, intermediate_size=96, num_hidden_layers=1,
              num_attention_heads=2, max_position_embeddings=12, hidden_act=act,
              eos_token_id=59, bos_token_id=58, pad_token_id=0)
  if kind == "vision":
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision))
  elif kind == "vision_proj":
    model = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(projection_dim=16, **vision))
  else:
    model = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=vision, text_config=text, projection_dim=16))
  model.eval()
  with torch.no_grad():  # every parameter non-trivial (HF inits LayerNorms to 1/0)
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def save_hf(model, folder):
  model.save_pretrained(str(folder), safe_serialization=True)
  return str(folder)


def model_cfg(mode="lift", **kw):
  cfg = dict(mode=mode, variant=f"B/{PATCH}", image_size=IMAGE, pool="tok",
             vit=dict(width=WIDTH, depth=LAYERS, num_heads=HEADS, mlp_dim=2 * WIDTH),
             embed_dim=16, head_hidden=(24,) if mode == "lift" else (), dtype="float32")
  if mode == "clip":
    cfg["text"] = dict(vocab_size=60, context_length=12, width=24, depth=1, num_heads=2)
  cfg.update(kw)
  return cfg


def fresh(cfg, seed=0):
  model = TwoTower(cfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def images(seed=0):
  return np.random.default_rng(seed).normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)


def to_torch(x):
  return torch.from_numpy(x).permute(0, 3, 1, 2)


def test_hf_vision_tower_init_matches_transformers(tmp_path):
  hf = hf_model("vision")
  folder = save_hf(hf, tmp_path / "hf")
  cfg = model_cfg(init_from=folder)
  graphdef, params = fresh(cfg)
  loaded = pretrained.load_into(params, cfg)
  model = nnx.merge(graphdef, loaded)
  x = images()
  with torch.no_grad():
    ref = hf(pixel_values=to_torch(x)).pooler_output.numpy()
  diff = np.abs(np.asarray(model.visual(jnp.asarray(x))) - ref).max()
  print(f"HF CLIPVisionModel pooler_output vs imported tower: max abs diff {diff:.2e}")
  assert diff < 1e-4
  # Only the tower was taken: the head keeps its fresh initialisation.
  np.testing.assert_array_equal(loaded["head"]["layers"][0]["kernel"],
                                params["head"]["layers"][0]["kernel"])


def test_hf_clip_model_imports_both_towers_through_the_cli(tmp_path):
  import subprocess
  import sys

  import lift_jax

  hf = hf_model("clip", seed=2)
  folder = save_hf(hf, tmp_path / "hf")
  config = tmp_path / "cfg.py"
  config.write_text("import ml_collections\ndef get_config():\n"
                    f"  return ml_collections.ConfigDict({{'model': {model_cfg('clip')!r}}})\n")
  out = tmp_path / "imported"
  r = subprocess.run([sys.executable, "-m", "lift_jax.tools.import_torch",
                      f"--checkpoint={folder}", f"--config={config}", f"--output={out}"],
                     env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  model = lift_jax.load(str(out))
  x = images(1)
  ids = np.zeros((2, 12), np.int64)
  ids[0, :4] = [58, 7, 9, 59]
  ids[1, :7] = [58, 3, 30, 4, 11, 12, 59]
  with torch.no_grad():
    o = hf(pixel_values=to_torch(x), input_ids=torch.from_numpy(ids))
    ref_img = (o.image_embeds / o.image_embeds.norm(dim=-1, keepdim=True)).numpy()
    ref_txt = (o.text_embeds / o.text_embeds.norm(dim=-1, keepdim=True)).numpy()
  assert np.abs(np.asarray(model.encode_image(jnp.asarray(x))) - ref_img).max() < 1e-5
  assert np.abs(np.asarray(model.encode_text(jnp.asarray(ids, jnp.int32))) - ref_txt).max() < 1e-5
  assert float(model.logit_scale[...]) == pytest.approx(float(hf.logit_scale.detach()))


def test_hf_projection_goes_to_the_clip_head(tmp_path):
  hf = hf_model("vision_proj", seed=3)
  cfg = model_cfg("clip", init_from=save_hf(hf, tmp_path / "hf"),
                  init_from_params="^(visual|head)/")
  graphdef, params = fresh(cfg)
  model = nnx.merge(graphdef, pretrained.load_into(params, cfg))
  x = images(2)
  with torch.no_grad():
    ref = hf(pixel_values=to_torch(x)).image_embeds.numpy()
  assert np.abs(np.asarray(model.image_features(jnp.asarray(x))) - ref).max() < 1e-4


@pytest.mark.parametrize("change,needle", [
    (dict(act="quick_gelu"), "hidden_act is 'quick_gelu'"),
    (dict(heads=2), "num_attention_heads is 2"),
])
def test_hf_checkpoints_that_would_compute_another_function_are_refused(tmp_path, change, needle):
  cfg = model_cfg(init_from=save_hf(hf_model("vision", **change), tmp_path / "hf"))
  _, params = fresh(cfg)
  with pytest.raises(pretrained.InitFromError, match=needle):
    pretrained.load_into(params, cfg)


def test_hf_names_are_checked(tmp_path):
  from safetensors.numpy import load_file, save_file

  folder = save_hf(hf_model("vision"), tmp_path / "hf")
  (path,) = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")]
  tensors = load_file(path)
  del tensors["encoder.layers.1.self_attn.k_proj.bias"]  # transformers 5 saves it bare
  save_file(tensors, path)
  cfg = model_cfg(init_from=folder)
  _, params = fresh(cfg)
  with pytest.raises(pretrained.InitFromError, match=r"resblocks\.1\..*k_proj\.bias"):
    pretrained.load_into(params, cfg)
  # A model of another size: the mis-shaped tensors are named.
  small = model_cfg(init_from=save_hf(hf_model("vision"), tmp_path / "hf2"),
                    vit=dict(width=16, depth=LAYERS, num_heads=HEADS, mlp_dim=2 * WIDTH))
  _, params = fresh(small)
  with pytest.raises(pretrained.InitFromError, match="visual.class_embedding: checkpoint"):
    pretrained.load_into(params, small)
  # A hub id that is not cached: one clear line, nothing downloaded.
  cfg = model_cfg(init_from="nobody-here/not-a-model")
  with pytest.raises(pretrained.InitFromError, match="not in the Hugging Face cache"):
    pretrained.load_into(params, cfg)


# ------------------------------------------------------------------------------------------------
# config.json fields left out: read as transformers reads them


def test_hf_defaults_are_transformers_defaults():
  vision, text = transformers.CLIPVisionConfig(), transformers.CLIPTextConfig()
  for section, reference in (("vision", vision), ("text", text)):
    for name, value in weights.HF_DEFAULTS[section].items():
      assert getattr(reference, name) == value, (section, name)


# A tower whose patch size and epsilon are transformers' defaults and whose width divides by
# transformers' default head count, so that a file without those fields still fits its tensors.
DEFAULT_FIT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, image_size=64, patch_size=32, hidden_act="gelu",
                   layer_norm_eps=1e-5)
# Fields whose default changes no tensor's shape here: transformers builds and loads the model
# from the file without them (heads: a 12-head model over the same tensors).
FITS_WITHOUT = ("num_attention_heads", "patch_size", "layer_norm_eps")


def without(folder, *path):
  """Removes config.json's field ``path`` (a key, or a section then a key); the value it had."""
  config_path = os.path.join(folder, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  owner = config
  for key in path[:-1]:
    owner = owner[key]
  value = owner.pop(path[-1])
  with open(config_path, "w") as f:
    json.dump(config, f)
  return config, value


@pytest.mark.parametrize("field", sorted(weights.HF_DEFAULTS["vision"]))
def test_vision_config_without_a_field_reads_as_transformers_does(tmp_path, field):
  torch.manual_seed(0)
  hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**DEFAULT_FIT))
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.05 * torch.randn_like(p))
  folder = save_hf(hf, tmp_path / "hf")
  config, _ = without(folder, field)
  theirs = transformers.CLIPVisionConfig.from_pretrained(folder)
  ours = weights.hf_sections(config)["vision"]
  assert ours[field] == getattr(theirs, field)  # absent: both take the same default
  assert weights.hf_vision_shape(config) == {
      "width": theirs.hidden_size, "depth": theirs.num_hidden_layers,
      "mlp_dim": theirs.intermediate_size, "num_heads": theirs.num_attention_heads,
      "patch_size": theirs.patch_size, "image_size": theirs.image_size}
  cfg = model_cfg(init_from=folder, tower_shape="init_from")
  run_cfg = pretrained.resolve_shape(ml_collections.ConfigDict({"model": cfg})).model.to_dict()
  graphdef, params = fresh(run_cfg)
  if field == "hidden_act":  # absent = quick_gelu in transformers: another function, refused
    with pytest.raises(pretrained.InitFromError, match="hidden_act is 'quick_gelu'"):
      pretrained.load_into(params, run_cfg)
  elif field not in FITS_WITHOUT:  # the file describes another tower than its tensors
    with pytest.raises(pretrained.InitFromError, match="checkpoint|missing"):
      pretrained.load_into(params, run_cfg)
  else:  # transformers' model from this file and the import compute the same function
    reloaded = transformers.CLIPVisionModel.from_pretrained(folder).eval()
    model = nnx.merge(graphdef, pretrained.load_into(params, run_cfg))
    x = np.random.default_rng(4).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
      ref = reloaded(pixel_values=to_torch(x)).pooler_output.numpy()
    assert np.abs(np.asarray(model.visual(jnp.asarray(x))) - ref).max() < 1e-4


@pytest.mark.parametrize("field", sorted(weights.HF_DEFAULTS["text"]))
def test_text_config_without_a_field_reads_as_transformers_does(tmp_path, field):
  folder = save_hf(hf_model("clip"), tmp_path / "hf")
  config, had = without(folder, "text_config", field)
  theirs = transformers.CLIPConfig.from_pretrained(folder).text_config
  assert weights.hf_sections(config)["text"][field] == getattr(theirs, field)
  present = weights.hf_sections({"text_config": {field: had}})["text"][field]
  assert present == had  # present: the file's value, whatever the default


# ------------------------------------------------------------------------------------------------
# The trainer: start from a checkpoint with the tower frozen; resume


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return fakedata.write_dataset(str(root), n=64, shards=2, dim=16)


def flat(tree):
  return {"/".join(map(str, k)): np.asarray(v) for k, v in
          ((tuple(getattr(p, "key", p) for p in path), v)
           for path, v in jax.tree_util.tree_flatten_with_path(tree)[0])}


def test_trainer_starts_from_a_checkpoint_with_the_tower_frozen_and_resumes(data, tmp_path):
  source = fakedata.tiny_config(*data)
  _, src = fresh(source.model.to_dict(), seed=7)  # stands for a trained tower
  ckpt.save_params(str(tmp_path / "source"), 0, src, source)
  src = flat(src)

  def cfg():
    c = fakedata.tiny_config(*data, steps=4)
    c.seed = 1
    c.keep_checkpoints = None
    c.model.init_from = str(tmp_path / "source")
    c.optim.frozen = ("^visual/",)
    return c

  train.train_and_evaluate(cfg(), str(tmp_path / "run"))
  out, step = ckpt.restore_params(str(tmp_path / "run"))
  out = flat(out)
  assert step == 4
  tower = [k for k in out if k.startswith("visual/")]
  assert tower and all(np.array_equal(out[k], src[k]) for k in tower)
  head = [k for k in out if k.startswith("head/")]
  assert head and all(not np.array_equal(out[k], src[k]) for k in head)  # trained from fresh init
  # No optimizer state for the tower in the saved train state.
  saved = ckpt.manager(str(tmp_path / "run" / "checkpoints"), read_only=True, async_save=False)
  try:
    meta = saved.item_metadata(4)[ckpt.TRAIN]
  finally:
    saved.close()
  state_paths = [k for k in flat(jax.tree.map(lambda m: np.zeros(()), meta["opt_state"]))]
  assert state_paths and not any("visual" in k for k in state_paths)
  assert any("head" in k for k in state_paths)

  # Resume: drop the last checkpoint and re-run from step 2; the result is the uninterrupted one.
  run2 = tmp_path / "run2"
  shutil.copytree(tmp_path / "run", run2)
  shutil.rmtree(run2 / "checkpoints" / "4")
  train.train_and_evaluate(cfg(), str(run2))
  resumed, step = ckpt.restore_params(str(run2))
  resumed = flat(resumed)
  assert step == 4 and all(np.array_equal(resumed[k], out[k]) for k in out)

  # Changing which parameters are frozen cannot resume silently.
  other = cfg()
  other.optim.frozen = ()
  with pytest.raises(ckpt.CheckpointError, match="optim.frozen"):
    train.train_and_evaluate(other, str(run2))


def test_init_from_errors_are_one_line_and_name_the_fix(data, tmp_path):
  c = fakedata.tiny_config(*data)
  _, params = fresh(c.model.to_dict())
  with pytest.raises(pretrained.InitFromError, match="matches no parameter"):
    pretrained.load_into(params, dict(c.model.to_dict(), init_from=str(tmp_path),
                                      init_from_params="^nothing/"))
  pt = tmp_path / "x.pt"
  pt.write_bytes(b"0")
  with pytest.raises(pretrained.InitFromError, match="import_torch"):
    pretrained.load_into(params, dict(c.model.to_dict(), init_from=str(pt)))
  # A lift_jax checkpoint of another width: named, with the fix.
  other = fakedata.tiny_config(*data)
  other.model.vit.width = 16
  ckpt.save_params(str(tmp_path / "w16"), 0, fresh(other.model.to_dict())[1], other)
  with pytest.raises(pretrained.InitFromError, match="mis-shaped.*visual/class_embedding"):
    pretrained.load_into(params, dict(c.model.to_dict(), init_from=str(tmp_path / "w16")))


def test_lit_configs_lock_or_slow_the_pretrained_tower():
  import importlib.util

  from lift_jax.tools.config_reference import REPO

  spec = importlib.util.spec_from_file_location(
      "lit_config", os.path.join(REPO, "configs", "lit_vitb16_datacomp.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  locked, tuned = module.get_config(), module.get_config("finetune")
  undocumented = [k for k in ("model.init_from", "model.init_from_params", "optim.frozen",
                              "optim.lr_multipliers") if k not in config_lib.DOCS]
  assert not undocumented
  for c in (locked, tuned):
    assert c.model.init_from == "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"
    assert c.model.pool == "tok" and c.model.mode == "lift" and c.total_steps == 7816
  assert tuple(locked.optim.frozen) == ("^visual/",) and not locked.optim.lr_multipliers
  assert not tuned.optim.frozen and tuple(map(tuple, tuned.optim.lr_multipliers)) == (
      ("^visual/", 0.1),)
