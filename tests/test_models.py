"""Models against independent references: Hugging Face's CLIP (PyTorch) with the same weights,
the import tool's round trip, parameter counts and the initialisation SPEC.md prescribes."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import require
from lift_jax.models.two_tower import TwoTower, count_params
from lift_jax.models.vit import parse_variant
from lift_jax.models import weights

torch = require("torch")
transformers = require("transformers")

WIDTH, LAYERS, HEADS, PATCH, IMAGE = 64, 2, 4, 8, 32
TEXT_WIDTH, VOCAB, CONTEXT = 48, 100, 16


def hf_vision(seed=0):
  torch.manual_seed(seed)
  cfg = transformers.CLIPVisionConfig(
      hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH, hidden_act="gelu",
      projection_dim=24)
  model = transformers.CLIPVisionModelWithProjection(cfg).eval()
  with torch.no_grad():  # make every parameter non-trivial (HF inits LayerNorms to 1/0)
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def hf_text(seed=1):
  torch.manual_seed(seed)
  cfg = transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
      num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=CONTEXT,
      hidden_act="gelu", projection_dim=24, eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2,
      pad_token_id=0)
  model = transformers.CLIPTextModelWithProjection(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _blocks_to_openclip(prefix, layers, n):
  out = {}
  for i in range(n):
    layer = layers[i]
    a = layer.self_attn
    p = f"{prefix}transformer.resblocks.{i}."
    out[p + "attn.in_proj_weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight,
                                                a.v_proj.weight])
    out[p + "attn.in_proj_bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
    out[p + "attn.out_proj.weight"] = a.out_proj.weight
    out[p + "attn.out_proj.bias"] = a.out_proj.bias
    out[p + "ln_1.weight"], out[p + "ln_1.bias"] = layer.layer_norm1.weight, layer.layer_norm1.bias
    out[p + "ln_2.weight"], out[p + "ln_2.bias"] = layer.layer_norm2.weight, layer.layer_norm2.bias
    out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = layer.mlp.fc1.weight, layer.mlp.fc1.bias
    out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = (layer.mlp.fc2.weight,
                                                                layer.mlp.fc2.bias)
  return out


def openclip_state_dict(vision, text=None, head=None, logit_scale=2.0):
  """The OpenCLIP-named state dict of HF modules (what the authors' checkpoints hold)."""
  v = vision.vision_model
  sd = {
      "visual.conv1.weight": v.embeddings.patch_embedding.weight,
      "visual.class_embedding": v.embeddings.class_embedding,
      "visual.positional_embedding": v.embeddings.position_embedding.weight,
      "visual.ln_pre.weight": v.pre_layrnorm.weight, "visual.ln_pre.bias": v.pre_layrnorm.bias,
      "visual.ln_post.weight": v.post_layernorm.weight,
      "visual.ln_post.bias": v.post_layernorm.bias,
      "logit_scale": torch.tensor(logit_scale),
  }
  sd.update(_blocks_to_openclip("visual.", v.encoder.layers, LAYERS))
  if head is not None:
    sd.update({f"mlp_projector.projector.{k}": t for k, t in head.state_dict().items()})
  else:
    sd["visual.proj"] = vision.visual_projection.weight.T
  if text is not None:
    t = text.text_model
    sd.update({
        "token_embedding.weight": t.embeddings.token_embedding.weight,
        "positional_embedding": t.embeddings.position_embedding.weight,
        "ln_final.weight": t.final_layer_norm.weight, "ln_final.bias": t.final_layer_norm.bias,
        "text_projection": text.text_projection.weight.T,
        "attn_mask": torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1),
    })
    sd.update(_blocks_to_openclip("", t.encoder.layers, LAYERS))
  return {k: v.detach().clone() for k, v in sd.items()}


def model_cfg(mode, **kw):
  cfg = dict(mode=mode, variant=f"B/{PATCH}", image_size=IMAGE,
             vit=dict(width=WIDTH, depth=LAYERS, num_heads=HEADS, mlp_dim=4 * WIDTH),
             embed_dim=24 if mode == "clip" else 40, head_hidden=(32,) if mode == "lift" else (),
             dtype="float32")
  if mode == "clip":
    cfg["text"] = dict(vocab_size=VOCAB, context_length=CONTEXT, width=TEXT_WIDTH, depth=LAYERS,
                       num_heads=HEADS)
  cfg.update(kw)
  return cfg


def build_from_state_dict(cfg, sd):
  params = weights.convert({k: v.float().numpy() for k, v in sd.items()},
                                weights.abstract_params(cfg))
  graphdef = nnx.split(nnx.eval_shape(lambda: TwoTower(cfg, rngs=nnx.Rngs(0))))[0]
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def images(n=3, seed=0):
  return np.random.default_rng(seed).normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)


def torch_images(x):
  return torch.from_numpy(x).permute(0, 3, 1, 2)


def test_vit_avg_pool_and_lift_head_match_hf():
  vision = hf_vision()
  torch.manual_seed(5)
  head = torch.nn.Sequential(torch.nn.Linear(WIDTH, 32), torch.nn.GELU(), torch.nn.Linear(32, 40))
  model = build_from_state_dict(model_cfg("lift"), openclip_state_dict(vision, head=head))
  x = images()
  with torch.no_grad():
    hidden = vision.vision_model(pixel_values=torch_images(x)).last_hidden_state
    tokens = vision.vision_model.post_layernorm(hidden)  # ln_post over all tokens
    pooled = tokens[:, 1:].mean(1)  # patch tokens only
    ref = head(pooled).numpy()
  ours = np.asarray(model.image_features(jnp.asarray(x)))
  diff = np.abs(ours - ref).max()
  print(f"ViT(avg)+head vs HF: max abs diff {diff:.2e}")
  assert diff < 1e-4
  # The normalised embedding is what the loss compares.
  ref_n = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
  assert np.abs(np.asarray(model.encode_image(jnp.asarray(x))) - ref_n).max() < 1e-5


def test_vit_tok_pool_and_projection_match_hf():
  vision = hf_vision(seed=3)
  model = build_from_state_dict(model_cfg("clip"), openclip_state_dict(vision, text=hf_text()))
  x = images(seed=1)
  with torch.no_grad():
    ref = vision(pixel_values=torch_images(x)).image_embeds.numpy()
  diff = np.abs(np.asarray(model.image_features(jnp.asarray(x))) - ref).max()
  print(f"ViT(tok)+proj vs HF: max abs diff {diff:.2e}")
  assert diff < 1e-4


def _token_batch():
  rng = np.random.default_rng(0)
  ids = np.zeros((4, CONTEXT), np.int64)
  for row, length in enumerate([3, 7, CONTEXT, 10]):
    ids[row, 0] = VOCAB - 2  # start of text
    ids[row, 1:length - 1] = rng.integers(1, VOCAB - 2, size=length - 2)
    ids[row, length - 1] = VOCAB - 1  # end of text: the largest id, as in CLIP's BPE
  return ids


@pytest.mark.parametrize("eot", [None, VOCAB - 1])
def test_text_tower_matches_hf(eot):
  vision, text = hf_vision(), hf_text()
  cfg = model_cfg("clip")
  cfg["text"]["eot_token_id"] = eot
  model = build_from_state_dict(cfg, openclip_state_dict(vision, text=text))
  ids = _token_batch()
  with torch.no_grad():
    ref = text(input_ids=torch.from_numpy(ids)).text_embeds.numpy()
  ours = np.asarray(model.text(jnp.asarray(ids, jnp.int32)))
  diff = np.abs(ours - ref).max()
  print(f"text tower (eot={eot}) vs HF: max abs diff {diff:.2e}")
  assert diff < 1e-4


def test_import_tool_round_trip(tmp_path):
  """torch.save of a wrapped DDP state dict -> CLI -> lift_jax.load -> HF's outputs."""
  vision, text = hf_vision(), hf_text()
  sd = openclip_state_dict(vision, text=text, logit_scale=3.0)
  ckpt = tmp_path / "epoch_1.pt"
  torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, ckpt)
  config = tmp_path / "cfg.py"
  config.write_text(
      "import ml_collections\n"
      "def get_config():\n"
      f"  return ml_collections.ConfigDict({{'model': {model_cfg('clip')!r}}})\n")
  out = tmp_path / "imported"
  subprocess.run([sys.executable, "-m", "lift_jax.tools.import_torch", f"--checkpoint={ckpt}",
                  f"--config={config}", f"--output={out}"], check=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True)
  import lift_jax

  model = lift_jax.load(str(out))
  x, ids = images(seed=2), _token_batch()
  with torch.no_grad():
    ref_img = vision(pixel_values=torch_images(x)).image_embeds
    ref_txt = text(input_ids=torch.from_numpy(ids)).text_embeds
    ref_img = (ref_img / ref_img.norm(dim=-1, keepdim=True)).numpy()
    ref_txt = (ref_txt / ref_txt.norm(dim=-1, keepdim=True)).numpy()
  assert np.abs(np.asarray(model.encode_image(jnp.asarray(x))) - ref_img).max() < 1e-5
  assert np.abs(np.asarray(model.encode_text(jnp.asarray(ids, jnp.int32))) - ref_txt).max() < 1e-5
  assert float(model.logit_scale[...]) == pytest.approx(3.0)


def test_import_names_missing_unexpected_and_misshaped_keys():
  sd = openclip_state_dict(hf_vision(), text=hf_text())
  sd = {k: v.numpy() for k, v in sd.items()}
  del sd["visual.ln_pre.bias"]
  sd["visual.extra.weight"] = np.zeros(3, np.float32)
  sd["text_projection"] = np.zeros((5, 5), np.float32)
  with pytest.raises(weights.StateDictError) as err:
    weights.convert(sd, weights.abstract_params(model_cfg("clip")))
  msg = str(err.value)
  assert "visual/ln_pre/bias" in msg and "visual.extra.weight" in msg
  assert "text_projection: checkpoint (5, 5)" in msg


def test_import_cli_reports_bad_file_clearly(tmp_path):
  bad = tmp_path / "bad.pt"
  bad.write_bytes(b"not a checkpoint")
  config = tmp_path / "cfg.py"
  config.write_text("import ml_collections\ndef get_config():\n"
                    f"  return ml_collections.ConfigDict({{'model': {model_cfg('lift')!r}}})\n")
  r = subprocess.run([sys.executable, "-m", "lift_jax.tools.import_torch", f"--checkpoint={bad}",
                      f"--config={config}", f"--output={tmp_path / 'o'}"], capture_output=True,
                     text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode != 0
  assert "bad.pt: not a readable PyTorch checkpoint" in r.stderr
  assert "Traceback" not in r.stderr


def test_b16_parameter_counts():
  lift = nnx.eval_shape(lambda: TwoTower(
      dict(mode="lift", variant="B/16", image_size=224, embed_dim=4096, head_hidden=(4096,)),
      rngs=nnx.Rngs(0)))
  clip = nnx.eval_shape(lambda: TwoTower(
      dict(mode="clip", variant="B/16", image_size=224, embed_dim=512,
           text=dict(vocab_size=49408, context_length=77)), rngs=nnx.Rngs(0)))
  lp, cp = nnx.split(lift)[1], nnx.split(clip)[1]
  vit, head = count_params(lp["visual"]), count_params(lp["head"])
  print(f"B/16: ViT {vit:,}  LIFT head {head:,}  CLIP proj {count_params(cp['head']):,}  "
        f"CLIP text {count_params(cp['text']):,}")
  # Independent arithmetic: patch conv, cls, pos, ln_pre, 12 blocks, ln_post.
  w, m = 768, 3072
  block = 2 * 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + (w * m + m) + (m * w + w)
  assert vit == 16 * 16 * 3 * w + w + 197 * w + 2 * w + 12 * block + 2 * w
  assert head == 768 * 4096 + 4096 + 4096 * 4096 + 4096
  assert 85e6 < vit < 87e6 and 19.8e6 < head < 20e6
  assert count_params(cp["head"]) == 768 * 512


def test_initialisation_follows_pytorch_defaults():
  cfg = dict(mode="lift", variant="B/16", image_size=64, embed_dim=256, head_hidden=(512,),
             vit=dict(depth=1))
  m = TwoTower(cfg, rngs=nnx.Rngs(0))
  w = 768

  def within_bound(x, bound):
    x = np.asarray(x)
    return np.abs(x).max() <= bound and np.abs(x).max() > 0.95 * bound

  blk = m.visual.transformer.resblocks[0]
  assert within_bound(blk.attn.in_proj.kernel[...], math.sqrt(6 / (w + 3 * w)))  # xavier, fused
  assert not np.any(np.asarray(blk.attn.in_proj.bias[...]))
  assert not np.any(np.asarray(blk.attn.out_proj.bias[...]))
  assert within_bound(blk.attn.out_proj.kernel[...], 1 / math.sqrt(w))
  assert within_bound(blk.mlp.c_fc.kernel[...], 1 / math.sqrt(w))
  assert within_bound(blk.mlp.c_fc.bias[...], 1 / math.sqrt(w))
  assert within_bound(blk.mlp.c_proj.kernel[...], 1 / math.sqrt(3072))
  assert within_bound(m.visual.conv1[...], 1 / math.sqrt(3 * 16 * 16))
  assert within_bound(m.head.layers[1].kernel[...], 1 / math.sqrt(512))
  assert np.all(np.asarray(blk.ln_1.scale[...]) == 1) and not np.any(np.asarray(blk.ln_1.bias[...]))
  std = np.std(np.asarray(m.visual.positional_embedding[...]))
  assert std == pytest.approx(w ** -0.5, rel=0.05)
  assert np.std(np.asarray(m.visual.class_embedding[...])) == pytest.approx(w ** -0.5, rel=0.15)
  assert float(m.logit_scale[...]) == pytest.approx(math.log(1 / 0.07))


def test_text_tower_initialisation():
  cfg = dict(mode="clip", variant="Ti/16", image_size=32, embed_dim=512, vit=dict(depth=1),
             text=dict(vocab_size=5000, context_length=77, width=512, depth=12))
  t = TwoTower(cfg, rngs=nnx.Rngs(0)).text
  std = lambda x: float(np.std(np.asarray(x[...])))
  assert std(t.token_embedding) == pytest.approx(0.02, rel=0.05)
  assert std(t.positional_embedding) == pytest.approx(0.01, rel=0.05)
  blk = t.transformer.resblocks[0]
  assert std(blk.attn.in_proj.kernel) == pytest.approx(512 ** -0.5, rel=0.05)
  assert std(blk.attn.out_proj.kernel) == pytest.approx(512 ** -0.5 * 24 ** -0.5, rel=0.05)
  assert std(blk.mlp.c_fc.kernel) == pytest.approx(1024 ** -0.5, rel=0.05)
  assert std(blk.mlp.c_proj.kernel) == pytest.approx(512 ** -0.5 * 24 ** -0.5, rel=0.05)
  assert std(t.text_projection) == pytest.approx(512 ** -0.5, rel=0.05)


def test_bfloat16_compute_and_remat_agree_with_float32():
  cfg = model_cfg("lift")
  ref = TwoTower(cfg, rngs=nnx.Rngs(0))
  x = jnp.asarray(images())
  want = np.asarray(ref.encode_image(x))
  graphdef, state = nnx.split(ref)
  for kw in (dict(dtype="bfloat16"), dict(remat=True)):
    other_def = nnx.split(nnx.eval_shape(lambda: TwoTower({**cfg, **kw}, rngs=nnx.Rngs(0))))[0]
    other = nnx.merge(other_def, state)
    got = np.asarray(other.encode_image(x))
    tol = 3e-2 if kw.get("dtype") else 1e-6
    assert np.abs(got - want).max() < tol, kw

  def loss(params, g):
    return jnp.sum(nnx.merge(g, params).encode_image(x) ** 2 * jnp.arange(40))

  remat_def = nnx.split(nnx.eval_shape(lambda: TwoTower({**cfg, "remat": True},
                                                         rngs=nnx.Rngs(0))))[0]
  g1 = jax.grad(loss)(state, graphdef)
  g2 = jax.grad(loss)(state, remat_def)
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g1, g2))) < 1e-5


def test_variants():
  assert parse_variant("L/14") == parse_variant("L/14", width=None)
  s = parse_variant("So400m/14")
  assert (s.width, s.depth, s.mlp_dim, s.num_heads, s.patch_size) == (1152, 27, 4304, 16, 14)
  assert parse_variant("g/14").width == 1408 and parse_variant("H/14").depth == 32
  assert parse_variant("Ti/16", depth=2).depth == 2
  with pytest.raises(ValueError, match="unknown ViT variant"):
    parse_variant("XL/16")


def test_imported_checkpoint_evaluates_through_eval_main(tmp_path):
  """An OpenCLIP-named LIFT state dict -> import_torch -> eval.main, with numbers equal to the
  HF reference model's own retrieval ranks."""
  from conftest import shared_data
  from eval.texts import read_captions
  from eval_fixtures import write_bank

  vision = hf_vision(seed=7)
  torch.manual_seed(8)
  head = torch.nn.Sequential(torch.nn.Linear(WIDTH, 32), torch.nn.GELU(), torch.nn.Linear(32, 40))
  ckpt = tmp_path / "lift.pt"
  torch.save({"state_dict": {f"module.{k}": v
                             for k, v in openclip_state_dict(vision, head=head).items()}}, ckpt)
  images = shared_data("flickr8k_subset", "images")
  captions = read_captions(shared_data("flickr8k_subset", "captions.tsv"))
  names = sorted(captions)[:12]
  tsv = tmp_path / "captions.tsv"
  tsv.write_text("".join(f"{n}\t0\t{captions[n][0]}\n" for n in names))
  texts = [captions[n][0] for n in names]
  bank = write_bank(str(tmp_path / "bank"), texts, dim=40, seed=3)
  cfg = tmp_path / "cfg.py"
  cfg.write_text(
      "import ml_collections\n"
      "def get_config():\n"
      f"  return ml_collections.ConfigDict({{'model': {model_cfg('lift')!r}, 'data': {{}}, "
      f"'evals': {{'batch_size': 8, 'text_bank': {bank!r}, 'workers': 2, "
      f"'benchmarks': {{'f8k': {{'type': 'retrieval', 'protocol': 'lift', "
      f"'captions': {str(tsv)!r}, 'image_dir': {images!r}}}}}}}}})\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-m", "lift_jax.tools.import_torch", f"--checkpoint={ckpt}",
                  f"--config={cfg}", f"--output={tmp_path / 'wd'}"], check=True, env=env,
                 capture_output=True)
  out = tmp_path / "m.json"
  r = subprocess.run([sys.executable, "-m", "eval.main", f"--workdir={tmp_path / 'wd'}",
                      f"--config={cfg}", f"--output={out}"], env=env, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = json.loads(out.read_text())["metrics"]
  assert metrics["f8k/num_images"] == 12

  # Reference: the HF model on the same eval transform, scored in numpy.
  from eval.predictor import Predictor
  from lift_jax.data import records

  pred = Predictor(lift_jax_load(tmp_path / "wd"), batch_size=8, workers=2)
  pix = np.stack([pred.load_image(os.path.join(images, n)) for n in names]).astype(np.float32)
  from lift_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

  x = normalize(pix, IMAGENET_MEAN, IMAGENET_STD)
  with torch.no_grad():
    hidden = vision.vision_model(pixel_values=torch_images(x)).last_hidden_state
    zi = head(vision.vision_model.post_layernorm(hidden)[:, 1:].mean(1)).numpy()
  zi /= np.linalg.norm(zi, axis=-1, keepdims=True)
  index, bank_vectors, _ = records.load_text_bank(bank)
  zt = bank_vectors[[index[t] for t in texts]]
  zt /= np.linalg.norm(zt, axis=-1, keepdims=True)
  sims = zi @ zt.T
  i2t = np.mean(np.argmax(sims, axis=1) == np.arange(12))
  t2i = np.mean(np.argmax(sims, axis=0) == np.arange(12))
  assert metrics["f8k/i2t_r1"] == pytest.approx(i2t)
  assert metrics["f8k/t2i_r1"] == pytest.approx(t2i)


def lift_jax_load(path):
  import lift_jax

  return lift_jax.load(str(path))
