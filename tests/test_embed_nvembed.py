"""Native NV-Embed against an independent re-derivation in plain torch.

The checkpoint is written by the test in the released layout (config.json with model_type nvembed,
safetensors under the real tensor names, a tokenizer). The reference below reads those files
itself (safetensors, json, the `tokenizers` library) and recomputes every step with plain torch
ops: RMSNorm, rotary, grouped-query attention without a causal mask, SiLU MLP, the latent
cross-attention with its LayerNorms, GEGLU, the masked mean and L2. It imports nothing from the
project's model code and nothing from transformers' modeling code.
"""

import glob
import json
import math
import os

import numpy as np
import pytest
import torch

from embed import encoders, fixtures, job, nvembed
from embed.errors import EmbedError
from test_embed_support import captions, minilm_config, vectors, write_image_shards

CPU = torch.device("cpu")
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=700, num_latents=8, latent_dim=32,
            num_cross_heads=2, cross_dim_head=16)
INSTRUCTION = "Instruct: find the photo\nQuery: "
TEXTS = captions(10, seed=3) + ["A", "two dogs and a cat on a red couch", "word " * 60]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("nvembed") / "ckpt")
  # Sharded, with an index, as the released checkpoint is.
  return fixtures.write_checkpoint(folder, seed=1, max_shard_bytes=60_000, **TINY)


# --------------------------------------------------------------------------------------------
# The re-derivation
# --------------------------------------------------------------------------------------------


def read_weights(folder):
  from safetensors.torch import load_file

  out = {}
  for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
    out.update(load_file(path))
  return {k: v.double() for k, v in out.items()}


def rms_norm(x, w, eps):
  return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def layer_norm(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdim=True)
  var = ((x - mu) ** 2).mean(-1, keepdim=True)
  return (x - mu) / torch.sqrt(var + eps) * w + b


def softmax(x):
  e = torch.exp(x - x.max(-1, keepdim=True).values)
  return e / e.sum(-1, keepdim=True)


def rotate(x, cos, sin):
  half = x.shape[-1] // 2
  turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
  return x * cos + turned * sin


def reference_token_states(W, text_cfg, ids):
  """Bidirectional Mistral over one unpadded sequence: [T, d]."""
  d, nh = text_cfg["hidden_size"], text_cfg["num_attention_heads"]
  nkv = text_cfg["num_key_value_heads"]
  hd, eps, T = d // nh, text_cfg["rms_norm_eps"], len(ids)
  inv = 1.0 / (text_cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
  angles = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
  cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
  x = W["embedding_model.embed_tokens.weight"][torch.tensor(ids)]
  for i in range(text_cfg["num_hidden_layers"]):
    p = f"embedding_model.layers.{i}."
    h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
    q = (h @ W[p + "self_attn.q_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
    k = (h @ W[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
    v = (h @ W[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
    attn = softmax(q @ k.transpose(1, 2) / math.sqrt(hd))  # every token sees every token
    x = x + (attn @ v).transpose(0, 1).reshape(T, d) @ W[p + "self_attn.o_proj.weight"].T
    h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
    gate = h @ W[p + "mlp.gate_proj.weight"].T
    x = x + ((gate * torch.sigmoid(gate)) * (h @ W[p + "mlp.up_proj.weight"].T)) \
        @ W[p + "mlp.down_proj.weight"].T
  return rms_norm(x, W["embedding_model.norm.weight"], eps)


def reference_pool(W, lat_cfg, x, pool_mask):
  P = "latent_attention_model.cross_attend_blocks."
  heads, dh = lat_cfg["num_cross_heads"], lat_cfg["cross_dim_head"]
  latents = W["latent_attention_model.latents"]
  xq = layer_norm(x, W[P + "0.norm.weight"], W[P + "0.norm.bias"])
  ctx = layer_norm(latents, W[P + "0.norm_context.weight"], W[P + "0.norm_context.bias"])
  q = (xq @ W[P + "0.fn.to_q.weight"].T).view(len(x), heads, dh).transpose(0, 1)
  kv = ctx @ W[P + "0.fn.to_kv.weight"].T
  k = kv[:, :heads * dh].view(-1, heads, dh).transpose(0, 1)
  v = kv[:, heads * dh:].view(-1, heads, dh).transpose(0, 1)
  attn = softmax(q @ k.transpose(1, 2) / math.sqrt(dh))
  x = x + (attn @ v).transpose(0, 1).reshape(len(x), heads * dh) @ W[P + "0.fn.to_out.weight"].T
  y = layer_norm(x, W[P + "1.norm.weight"], W[P + "1.norm.bias"])
  y = y @ W[P + "1.fn.net.0.weight"].T + W[P + "1.fn.net.0.bias"]
  value, gate = y[:, :y.shape[1] // 2], y[:, y.shape[1] // 2:]
  y = value * (0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))))
  x = x + y @ W[P + "1.fn.net.2.weight"].T + W[P + "1.fn.net.2.bias"]
  m = torch.tensor(pool_mask, dtype=torch.float64)[:, None]
  e = (x * m).sum(0) / m.sum()
  return e / e.norm()


def reference_embed(folder, texts, instruction, max_length):
  """What NV-Embed's encode() computes, from the files alone."""
  from tokenizers import Tokenizer

  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(folder, "tokenizer_config.json")) as f:
    eos = json.load(f)["eos_token"]
  tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
  W = read_weights(folder)
  n_masked = (len(tok.encode(instruction, add_special_tokens=False).ids)
              if instruction and cfg["is_mask_instruction"] else 0)
  out = []
  for text in texts:
    ids = tok.encode(instruction + text + eos).ids[:max_length]  # BOS + tokens, then cut
    x = reference_token_states(W, cfg["text_config"], ids)
    out.append(reference_pool(W, cfg["latent_attention_config"], x,
                              [0] * n_masked + [1] * (len(ids) - n_masked)).numpy())
  return np.stack(out).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def build(folder, instruction="", max_length=24, random_init=False):
  return encoders.build_encoder("nv_embed", encoders.resolve_model(folder), "", "float32", CPU,
                                instruction, max_length, False, "", False, random_init)


def embed_all(encoder, texts, batch_tokens=96):
  from embed.inputs import Item

  cfg = minilm_config("unused", normalize=False, batch_tokens=batch_tokens, encoder="nv_embed")
  return job.embed_items(encoder, [Item(str(i), t) for i, t in enumerate(texts)], cfg,
                         "test").vectors


@pytest.mark.parametrize("instruction", ["", INSTRUCTION])
def test_matches_plain_torch_rederivation(checkpoint, instruction):
  enc = build(checkpoint, instruction)
  got = embed_all(enc, TEXTS)  # several padded batches (token budget 96)
  want = reference_embed(checkpoint, TEXTS, instruction, 24)
  diff = float(np.abs(got - want).max())
  print(f"nv_embed (instruction {instruction!r}) vs plain-torch re-derivation: max abs diff "
        f"{diff:.2e}")
  assert diff < 1e-5
  assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # output_normalize


def test_checkpoint_has_released_layout(checkpoint):
  with open(os.path.join(checkpoint, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["model_type"] == "nvembed" and cfg["text_config"]["model_type"] == "bidir_mistral"
  assert cfg["latent_attention_config"]["model_type"] == "latent_attention"
  with open(os.path.join(checkpoint, "model.safetensors.index.json")) as f:
    index = json.load(f)["weight_map"]
  assert len(set(index.values())) > 1
  # The released checkpoint's tensor names, written out by hand.
  want = {"embedding_model.embed_tokens.weight", "embedding_model.norm.weight",
          "latent_attention_model.latents"}
  for i in range(TINY["num_hidden_layers"]):
    want |= {f"embedding_model.layers.{i}.{n}.weight" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
        "post_attention_layernorm")}
  block = "latent_attention_model.cross_attend_blocks."
  want |= {block + n for n in (
      "0.fn.to_q.weight", "0.fn.to_kv.weight", "0.fn.to_out.weight", "0.norm.weight",
      "0.norm.bias", "0.norm_context.weight", "0.norm_context.bias", "1.fn.net.0.weight",
      "1.fn.net.0.bias", "1.fn.net.2.weight", "1.fn.net.2.bias", "1.norm.weight", "1.norm.bias")}
  assert set(index) == want
  W = read_weights(checkpoint)
  d, inner = TINY["hidden_size"], TINY["num_cross_heads"] * TINY["cross_dim_head"]
  assert W[block + "0.fn.to_q.weight"].shape == (inner, d)
  assert W[block + "0.fn.to_kv.weight"].shape == (2 * inner, d)
  assert W[block + "1.fn.net.0.weight"].shape == (8 * d, d)
  assert W[block + "1.fn.net.2.weight"].shape == (d, 4 * d)
  assert W["latent_attention_model.latents"].shape == (TINY["num_latents"], d)


def test_released_config_gets_nv_embed_defaults(tmp_path):
  """NV-Embed-v2's config.json sets only model_type in latent_attention_config."""

  def spec_with(layers):  # NV-Embed-v2's text_config, with fewer layers
    text = {"model_type": "bidir_mistral", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "sliding_window": 4096, "max_position_embeddings": 32768}
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "nvembed", "text_config": text,
        "latent_attention_config": {"model_type": "latent_attention"}}))
    return nvembed.read_spec(str(tmp_path))

  spec = spec_with(2)
  assert (spec.num_latents, spec.num_cross_heads, spec.hidden_dim, spec.latent_dim,
          spec.cross_dim_head, spec.output_normalize) == (512, 8, 4096, 4096, 4096, True)
  assert (spec.padding_side, spec.is_mask_instruction) == ("right", True)
  layout = nvembed.state_dict_layout(spec)  # no memory: built on the meta device
  block = "latent_attention_model.cross_attend_blocks."
  assert layout[block + "0.fn.to_q.weight"] == (8 * 4096, 4096)
  assert layout[block + "0.fn.to_kv.weight"] == (2 * 8 * 4096, 4096)
  assert layout[block + "1.fn.net.0.weight"] == (8 * 4096, 4096)
  assert layout[block + "1.fn.net.2.weight"] == (4096, 4 * 4096)
  assert layout["embedding_model.layers.1.self_attn.k_proj.weight"] == (1024, 4096)
  two = sum(math.prod(s) for s in layout.values())
  one = sum(math.prod(s) for s in nvembed.state_dict_layout(spec_with(1)).values())
  params = one + 31 * (two - one)  # the released 32 layers
  print(f"NV-Embed-v2 architecture: {params / 1e9:.2f}B parameters")
  assert 7.8e9 < params < 7.9e9  # Mistral-7B without its LM head (7.11B) + pooling (0.74B)
  # The sizes write_checkpoint is given for the 7B throughput measurement are the same.
  folder = fixtures.write_checkpoint(str(tmp_path / "v2"), weights=False, **fixtures.NV_EMBED_V2)
  written = nvembed.state_dict_layout(nvembed.read_spec(folder))
  assert sum(math.prod(s) for s in written.values()) == params
  assert ({k: v for k, v in written.items() if ".layers." not in k}
          == {k: v for k, v in layout.items() if ".layers." not in k})


def test_backbone_is_bidirectional(checkpoint):
  enc = build(checkpoint)
  first = enc.prepare(["a dog on the grass near a tree"]).inputs[0]
  second = list(first)
  second[-2] = first[-2] + 1  # only the last word differs
  width = len(first)
  longer = first + first  # padding in the batch, as in every real batch
  batch, mask = encoders.pad_ids([first, second, longer], enc.eos_id, "right")
  with torch.no_grad():
    hidden = enc.model.backbone(batch, mask)
  early = float((hidden[0, 1] - hidden[1, 1]).abs().max())
  print(f"position 1 moves by {early:.3f} when token {width - 2} of {width} changes")
  assert early > 1e-3  # a later token changed an earlier token's state


def test_instruction_masking(checkpoint, tmp_path):
  enc = build(checkpoint, INSTRUCTION)
  from tokenizers import Tokenizer

  tok = Tokenizer.from_file(os.path.join(checkpoint, "tokenizer.json"))
  n = len(tok.encode(INSTRUCTION, add_special_tokens=False).ids)
  assert enc.masked == n > 3
  mask = torch.ones(2, 30, dtype=torch.long)
  assert enc.pool_mask(mask)[:, :n].sum() == 0 and enc.pool_mask(mask)[:, n:].all()
  # Without masking (is_mask_instruction false in config.json) the vectors differ.
  other = str(tmp_path / "unmasked")
  fixtures.write_checkpoint(other, seed=1, instruction_masking=False, **TINY)
  unmasked = build(other, INSTRUCTION)
  assert unmasked.masked == 0
  texts = TEXTS[:4]
  a, b = embed_all(enc, texts), embed_all(unmasked, texts)
  assert np.abs(a - b).max() > 1e-3
  np.testing.assert_allclose(b, reference_embed(other, texts, INSTRUCTION, 24), atol=1e-5)


def test_eos_appended_and_cut_by_truncation(checkpoint):
  enc = build(checkpoint, max_length=12)
  p = enc.prepare(["a dog", "a dog runs across the green field near two children and a ball"])
  assert p.inputs[0][0] == enc.tokenizer.bos_token_id and p.inputs[0][-1] == enc.eos_id
  assert p.truncated == [False, True] and p.lengths[1] == 12
  assert p.inputs[1][-1] != enc.eos_id  # the appended EOS fell past max_length, as in the paper


def test_bad_folders_name_the_problem(checkpoint, tmp_path):
  from safetensors.torch import load_file, save_file

  state = {}
  for path in sorted(glob.glob(os.path.join(checkpoint, "*.safetensors"))):
    state.update(load_file(path))

  def folder_with(name, tensors):
    path = tmp_path / name
    path.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
      (path / f).write_bytes(open(os.path.join(checkpoint, f), "rb").read())
    save_file(tensors, str(path / "model.safetensors"))
    return str(path)

  gone = "latent_attention_model.cross_attend_blocks.0.fn.to_kv.weight"
  bad = folder_with("missing", {k: v for k, v in state.items() if k != gone})
  with pytest.raises(EmbedError, match=r"1 missing \(" + gone.replace(".", r"\.")):
    build(bad)
  bad = folder_with("unexpected", {**state, "lm_head.weight": torch.zeros(3, 3)})
  with pytest.raises(EmbedError, match=r"unexpected \(lm_head\.weight\)"):
    build(bad)
  shaped = dict(state, **{"latent_attention_model.latents": torch.zeros(5, 32)})
  bad = folder_with("misshaped", shaped)
  with pytest.raises(EmbedError, match=r"latent_attention_model\.latents: \(5, 32\) in the file, "
                                       r"\(8, 32\) from config\.json"):
    build(bad)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(EmbedError, match="has no config.json"):
    build(str(empty))
  (empty / "config.json").write_text(json.dumps({"model_type": "mistral"}))
  with pytest.raises(EmbedError, match="model_type 'mistral', not 'nvembed'"):
    build(str(empty))
  with pytest.raises(EmbedError, match="leaves no room for the text"):
    build(checkpoint, instruction=INSTRUCTION, max_length=5)
  with pytest.raises(EmbedError, match="cannot fetch nvidia/NV-Embed-v2"):  # offline, not cached
    build("nvidia/NV-Embed-v2")
  noweights = tmp_path / "noweights"
  fixtures.write_checkpoint(str(noweights), weights=False, **TINY)
  with pytest.raises(EmbedError, match="neither model.safetensors nor"):
    build(str(noweights))


def test_embed_job_with_the_paper_config(checkpoint, tmp_path):
  """embed.main's job with embed/configs/nvembed_v2.py and a local folder in the real layout."""
  from embed.configs import nvembed_v2

  caps = [captions(9, seed=5), captions(7, seed=6) + [""]]
  images = tmp_path / "images"
  write_image_shards(str(images), caps)
  cfg = nvembed_v2.get_config()
  cfg.model, cfg.images, cfg.output = checkpoint, str(images), str(tmp_path / "emb")
  cfg.device, cfg.dtype, cfg.progress, cfg.threads, cfg.max_length = "cpu", "float32", False, 1, 24
  summary = job.run(cfg)
  assert summary["written"] == 2 and summary["empty"] == 1
  manifest = json.load(open(tmp_path / "emb" / "manifest.json"))
  assert manifest["encoder"] == "nv_embed" and manifest["pooling"] == "latent_attention"
  assert manifest["dim"] == TINY["latent_dim"] and "random_init" not in manifest
  keys, got, flags = vectors(str(tmp_path / "emb" / manifest["shards"][1]["file"]))
  want = reference_embed(checkpoint, caps[1][:7], "", 24)
  np.testing.assert_allclose(got[:7], want, atol=2e-3)  # stored as float16
  assert flags[7] == "empty" and not got[7].any()


def test_random_init_needs_no_weights(tmp_path):
  folder = fixtures.write_checkpoint(str(tmp_path / "arch"), weights=False, **TINY)
  assert not glob.glob(os.path.join(folder, "*.safetensors"))
  enc = build(folder, random_init=True)
  out = embed_all(enc, TEXTS[:5])
  assert out.shape == (5, TINY["latent_dim"]) and np.isfinite(out).all()
  assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
  assert np.abs(out[0] - out[1]).max() > 1e-3  # different texts, different vectors
  # Through the job: the manifest says the vectors come from random weights.
  from embed.configs import nvembed_v2

  texts = tmp_path / "texts.txt"
  texts.write_text("\n".join(TEXTS[:4]))
  cfg = nvembed_v2.get_config()
  cfg.model, cfg.texts, cfg.output, cfg.random_init = folder, str(texts), str(tmp_path / "b"), True
  cfg.device, cfg.dtype, cfg.progress, cfg.threads = "cpu", "float32", False, 1
  job.run(cfg)
  assert json.load(open(tmp_path / "b" / "manifest.json"))["random_init"] is True
