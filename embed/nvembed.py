"""NV-Embed (v1 and v2) built from transformers' own Mistral, without the checkpoint's Python files.

NV-Embed is a Mistral-7B backbone run **bidirectionally** (every token attends to every real token;
padding is masked), followed by a latent-attention pooling layer:

    h  = MistralModel(ids, padding-only mask)                     [b, t, d]
    h += to_out(attention(q=to_q(LN(h)), k,v=to_kv(LN'(latents))))   latents [r, d]: keys, values
    h += net.2(GEGLU(net.0(LN''(h))))                             d -> 2*4d -> (x * gelu(gate)) -> d
    e  = mean of h over the pooling mask, then L2 when output_normalize

A checkpoint folder holds ``config.json`` (``model_type: nvembed``, ``text_config`` = the Mistral
backbone, ``latent_attention_config``), ``model.safetensors`` or shards with
``model.safetensors.index.json`` (``embedding_model.*`` = Mistral, ``latent_attention_model.*``)
and a tokenizer. Texts are tokenised as NV-Embed's ``encode()`` does: instruction + text + the EOS
token as text, BOS from the tokenizer, truncation at ``max_length`` (which can cut that EOS), right
padding with EOS; the first ``len(tokenize(instruction))`` positions are left out of the pooling
mask when ``is_mask_instruction``.

:func:`write_checkpoint` writes a folder in this layout with random weights (or none, for
``random_init``): tests and throughput measurements use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from embed.base import Encoder, Prepared, pad_ids
from embed.errors import EmbedError

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# NV-Embed's LatentAttentionConfig defaults: the released config.json sets little more than its
# model_type, so these are what the released checkpoints use.
LATENT_DEFAULTS = {"num_latents_value": 512, "num_cross_heads": 8, "hidden_dim": 4096,
                   "latent_dim": 4096, "cross_dim_head": 4096, "output_normalize": True}
# Top-level fields of NVEmbedConfig and their defaults.
TOP_DEFAULTS = {"padding_side": "right", "is_mask_instruction": True, "add_eos": True,
                "add_pad_token": True}
# Keys of text_config that describe the remote code rather than the Mistral architecture.
_NOT_MISTRAL = ("model_type", "architectures", "auto_map", "_name_or_path", "torch_dtype",
                "dtype", "transformers_version")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NVEmbedSpec:
  """What config.json of an NV-Embed checkpoint says, defaults filled in."""
  text: dict[str, Any]  # MistralConfig fields
  num_latents: int
  num_cross_heads: int
  hidden_dim: int
  latent_dim: int
  cross_dim_head: int
  output_normalize: bool
  padding_side: str
  is_mask_instruction: bool
  add_eos: bool
  add_pad_token: bool

  def mistral_config(self):
    from transformers import MistralConfig

    config = MistralConfig(**self.text)
    # A 4D padding-only mask is passed to every layer (see NVEmbedModel.forward); "sdpa" and
    # "eager" honour it, flash attention would not.
    config._attn_implementation = "sdpa"
    return config


def read_spec(folder: str) -> NVEmbedSpec:
  """The checkpoint's config.json, checked; errors name the file and the field."""
  path = os.path.join(folder, CONFIG)
  if not os.path.isfile(path):
    raise EmbedError(f"{folder} has no {CONFIG}: an NV-Embed checkpoint folder holds config.json, "
                     "the safetensors weights and the tokenizer files")
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise EmbedError(f"cannot read {path}: {e}") from None
  if raw.get("model_type") != "nvembed":
    raise EmbedError(f"{path} has model_type {raw.get('model_type')!r}, not 'nvembed'; "
                     "config.encoder='nv_embed' is for NV-Embed checkpoints (use last_token, mean "
                     "or cls for other models)")
  text = raw.get("text_config") or raw.get("embedding_model_config")
  if not isinstance(text, dict):
    raise EmbedError(f"{path} has no text_config (the Mistral backbone's configuration)")
  latent = {**LATENT_DEFAULTS, **{k: v for k, v in (raw.get("latent_attention_config") or {})
                                  .items() if k in LATENT_DEFAULTS}}
  top = {k: raw.get(k, v) for k, v in TOP_DEFAULTS.items()}
  spec = NVEmbedSpec(text={k: v for k, v in text.items() if k not in _NOT_MISTRAL},
                     num_latents=int(latent["num_latents_value"]),
                     num_cross_heads=int(latent["num_cross_heads"]),
                     hidden_dim=int(latent["hidden_dim"]), latent_dim=int(latent["latent_dim"]),
                     cross_dim_head=int(latent["cross_dim_head"]),
                     output_normalize=bool(latent["output_normalize"]),
                     padding_side=str(top["padding_side"]),
                     is_mask_instruction=bool(top["is_mask_instruction"]),
                     add_eos=bool(top["add_eos"]), add_pad_token=bool(top["add_pad_token"]))
  hidden = int(text.get("hidden_size", 4096))
  if not spec.latent_dim == spec.hidden_dim == hidden:
    raise EmbedError(f"{path}: latent_attention_config has latent_dim={spec.latent_dim} and "
                     f"hidden_dim={spec.hidden_dim} but text_config.hidden_size={hidden}; "
                     "NV-Embed's pooling needs all three equal")
  if spec.padding_side not in ("left", "right"):
    raise EmbedError(f"{path}: padding_side={spec.padding_side!r}; expected left or right")
  return spec


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class _PreNorm(nn.Module):
  """LayerNorm on the input (and on the context, for cross-attention), then ``fn``."""

  def __init__(self, dim: int, fn: nn.Module, context_dim: int | None = None):
    super().__init__()
    self.fn = fn
    self.norm = nn.LayerNorm(dim)
    self.norm_context = nn.LayerNorm(context_dim) if context_dim is not None else None


class _CrossAttention(nn.Module):
  def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
    super().__init__()
    inner = heads * dim_head
    self.heads, self.dim_head = heads, dim_head
    self.to_q = nn.Linear(query_dim, inner, bias=False)
    self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
    self.to_out = nn.Linear(inner, query_dim, bias=False)


class _FeedForward(nn.Module):
  def __init__(self, dim: int, mult: int = 4):
    super().__init__()
    # net.1 is the parameter-free GEGLU; keeping its slot keeps the checkpoint's key names.
    self.net = nn.Sequential(nn.Linear(dim, 2 * mult * dim), nn.Identity(),
                             nn.Linear(mult * dim, dim))


class LatentAttention(nn.Module):
  """NV-Embed's pooling: token states cross-attend to learned latents, GEGLU, masked mean."""

  def __init__(self, spec: NVEmbedSpec):
    super().__init__()
    d = spec.latent_dim
    self.output_normalize = spec.output_normalize
    self.latents = nn.Parameter(torch.empty(spec.num_latents, d))
    self.cross_attend_blocks = nn.ModuleList([
        _PreNorm(d, _CrossAttention(d, spec.hidden_dim, spec.num_cross_heads,
                                    spec.cross_dim_head), context_dim=spec.hidden_dim),
        _PreNorm(d, _FeedForward(d)),
    ])

  def forward(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """[b, t, d] token states, [b, t] 0/1 pooling mask -> float32 [b, d]."""
    attend, feed = self.cross_attend_blocks
    attn = attend.fn
    b, t, _ = hidden.shape
    h, dh = attn.heads, attn.dim_head
    # The latents are the same for every text: their keys and values are computed once, not per
    # batch row (at NV-Embed's size they would be 512 x 32768 x 2 values per text).
    context = attend.norm_context(self.latents)
    k, v = attn.to_kv(context).chunk(2, dim=-1)
    k = k.view(-1, h, dh).transpose(0, 1)  # [h, r, dh]
    v = v.view(-1, h, dh).transpose(0, 1)
    q = attn.to_q(attend.norm(hidden)).view(b, t, h, dh).transpose(1, 2)  # [b, h, t, dh]
    scores = torch.einsum("bhtd,hrd->bhtr", q, k) * (dh ** -0.5)
    weights = scores.float().softmax(dim=-1).to(q.dtype)
    out = torch.einsum("bhtr,hrd->bhtd", weights, v).transpose(1, 2).reshape(b, t, h * dh)
    hidden = attn.to_out(out) + hidden
    proj_in, _, proj_out = feed.fn.net
    x, gate = proj_in(feed.norm(hidden)).chunk(2, dim=-1)
    hidden = proj_out(x * nn.functional.gelu(gate)) + hidden
    m = pool_mask.to(torch.float32).unsqueeze(-1)
    pooled = (hidden.float() * m).sum(1) / m.sum(1)
    if self.output_normalize:
      pooled = nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled


class NVEmbedModel(nn.Module):
  """``embedding_model`` (transformers' MistralModel, run bidirectionally) and
  ``latent_attention_model``; parameter names are the checkpoint's."""

  def __init__(self, spec: NVEmbedSpec):
    super().__init__()
    from transformers import MistralModel

    self.spec = spec
    self.embedding_model = MistralModel(spec.mistral_config())
    for layer in self.embedding_model.layers:
      layer.self_attn.is_causal = False  # no kernel may fall back to a causal mask
    self.latent_attention_model = LatentAttention(spec)

  def backbone(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states [b, t, d] with bidirectional attention over the real tokens."""
    dtype = self.embedding_model.embed_tokens.weight.dtype
    b, t = input_ids.shape
    # Additive mask [b, 1, t, t]: 0 where the key is a real token, the dtype's minimum where it is
    # padding. transformers passes a 4D mask through unchanged, so no causal mask is built.
    keep = attention_mask[:, None, None, :].to(torch.bool)
    mask = torch.zeros(keep.shape, dtype=dtype, device=input_ids.device)
    mask = mask.masked_fill(~keep, torch.finfo(dtype).min).expand(b, 1, t, t)
    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    out = self.embedding_model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                               use_cache=False)  # no key/value cache: one forward per text
    return out.last_hidden_state

  def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              pool_mask: torch.Tensor) -> torch.Tensor:
    return self.latent_attention_model(self.backbone(input_ids, attention_mask), pool_mask)


def _rebuild_rotary(model: NVEmbedModel, device: torch.device) -> None:
  """The rotary frequencies are a computed buffer, not a weight: build them on ``device``."""
  backbone = model.embedding_model
  with torch.device("cpu"):  # float32 frequencies, computed as transformers computes them
    rotary = type(backbone.rotary_emb)(config=backbone.config)
  backbone.rotary_emb = rotary.to(device)


def _random_value(name: str, shape: tuple, gen: torch.Generator, device) -> torch.Tensor:
  """Linear weights N(0, 1/fan_in), embeddings and latents N(0, 1), norm weights 1 + N(0, 0.1)
  with N(0, 0.1) biases (so that a swapped norm changes the output)."""
  noise = torch.randn(shape, generator=gen, device=device)
  parts = name.split(".")
  if parts[-1] == "latents" or name.endswith("embed_tokens.weight"):
    return noise
  if "norm" in parts[-2] or "layernorm" in parts[-2]:
    return (1.0 if parts[-1] == "weight" else 0.0) + 0.1 * noise
  if parts[-1] == "bias":
    return 0.1 * noise
  return noise * shape[-1] ** -0.5


def init_random_(model: nn.Module, seed: int = 0) -> None:
  """Fills every parameter in place, one tensor at a time on its own device (no CPU copy of a
  model on an accelerator); the values depend on the seed and the device type."""
  device = next(model.parameters()).device
  gen = torch.Generator(device=device).manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      p.copy_(_random_value(name, tuple(p.shape), gen, device).to(p.dtype))


def _empty_model(spec: NVEmbedSpec, dtype: torch.dtype) -> NVEmbedModel:
  """The architecture with no storage (meta tensors): weights are assigned afterwards."""
  with torch.device("meta"):
    model = NVEmbedModel(spec)
  return model.to(dtype)


def random_model(spec: NVEmbedSpec, dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> NVEmbedModel:
  """The architecture with random weights (the real one's FLOPs; meaningless vectors)."""
  model = _empty_model(spec, dtype).to_empty(device=device)
  init_random_(model, seed)
  _rebuild_rotary(model, device)
  return model.eval()


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def weight_files(folder: str) -> dict[str, str]:
  """{tensor name: safetensors file} of a checkpoint folder (one file, or shards + index)."""
  index = os.path.join(folder, INDEX_FILE)
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
      raise EmbedError(f"cannot read the weight map of {index}: {e}") from None
    missing = sorted({f for f in weight_map.values()
                      if not os.path.isfile(os.path.join(folder, f))})
    if missing:
      raise EmbedError(f"{index} names shard(s) {missing} that are not in {folder}; download "
                       "the whole checkpoint again")
    return {k: os.path.join(folder, f) for k, f in weight_map.items()}
  single = os.path.join(folder, SINGLE_FILE)
  if os.path.isfile(single):
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
      return {k: single for k in f.keys()}
  raise EmbedError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}: NV-Embed weights are "
                   "read from safetensors only (the checkpoint's Python files are never run)")


def check_weights(folder: str, expected: dict[str, tuple[int, ...]],
                  found: dict[str, tuple[int, ...]]) -> None:
  """One error listing every missing, unexpected and mis-shaped tensor."""
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  misshaped = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
  if not (missing or unexpected or misshaped):
    return

  def some(keys):
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

  problems = []
  if missing:
    problems.append(f"{len(missing)} missing ({some(missing)})")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected ({some(unexpected)})")
  if misshaped:
    problems.append(f"{len(misshaped)} mis-shaped (" + some(
        [f"{k}: {tuple(found[k])} in the file, {tuple(expected[k])} from config.json"
         for k in misshaped]) + ")")
  raise EmbedError(f"the weights in {folder} do not match its {CONFIG}: " + "; ".join(problems)
                   + ". Is it a complete NV-Embed checkpoint with its own config.json?")


def load_model(folder: str, dtype: torch.dtype, device: torch.device) -> NVEmbedModel:
  """The checkpoint's weights in an :class:`NVEmbedModel` on ``device``."""
  from safetensors import safe_open

  spec = read_spec(folder)
  model = _empty_model(spec, dtype)
  expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not k.startswith("embedding_model.rotary_emb.")}
  files = weight_files(folder)
  found = {}
  for path in sorted(set(files.values())):
    with safe_open(path, framework="pt") as f:
      for k in f.keys():
        found[k] = tuple(f.get_slice(k).get_shape())
  check_weights(folder, expected, found)
  state = {}
  for path in sorted(set(files.values())):
    with safe_open(path, framework="pt", device=str(device)) as f:
      for k in f.keys():
        state[k] = f.get_tensor(k).to(dtype)
  model.load_state_dict(state, strict=False, assign=True)
  _rebuild_rotary(model, device)
  stray = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_meta]
  if stray:
    raise EmbedError(f"{folder}: no weights were loaded for {stray[:5]}")
  return model.eval()


def state_dict_layout(spec: NVEmbedSpec) -> dict[str, tuple[int, ...]]:
  """{tensor name: shape} a checkpoint of this configuration holds."""
  model = _empty_model(spec, torch.float32)
  return {k: tuple(v.shape) for k, v in model.state_dict().items()
          if not k.startswith("embedding_model.rotary_emb.")}


# --------------------------------------------------------------------------------------------
# The encoder the embedding job runs
# --------------------------------------------------------------------------------------------


def instruction_length(tokenizer, instruction: str, spec: NVEmbedSpec) -> int:
  """How many leading positions NV-Embed's encode() leaves out of the pooling mask: the
  instruction's token count without special tokens, counted from position 0 (the BOS included),
  with right padding and is_mask_instruction only."""
  if spec.padding_side == "right" and spec.is_mask_instruction and instruction:
    return len(tokenizer.tokenize(instruction))
  return 0


class NVEmbedEncoder(Encoder):
  """The embedding job's encoder for NV-Embed checkpoints (see :mod:`embed.encoders`)."""

  def __init__(self, model: NVEmbedModel, tokenizer, instruction: str, max_length: int,
               device: torch.device):
    self.model, self.tokenizer, self.device = model, tokenizer, device
    self.spec = model.spec
    self.instruction, self.max_length = instruction, max_length
    if tokenizer.eos_token is None:
      raise EmbedError("the NV-Embed tokenizer has no EOS token; its tokenizer_config.json "
                       "should name eos_token")
    self.eos, self.eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    self.masked = instruction_length(tokenizer, instruction, self.spec)
    if self.masked >= max_length:  # every text would pool over nothing
      raise EmbedError(f"config.instruction takes {self.masked} tokens and NV-Embed leaves them "
                       f"out of the pooling; config.max_length={max_length} leaves no room for "
                       "the text: raise max_length or shorten the instruction")
    self.dim = self.spec.latent_dim
    self.revision = None

  def prepare(self, texts: Sequence[str]) -> Prepared:
    full = [self.instruction + t + self.eos for t in texts]
    ids = self.tokenizer(full, add_special_tokens=True, truncation=False,
                         verbose=False)["input_ids"]
    truncated = [len(x) > self.max_length for x in ids]
    long = [i for i, t in enumerate(truncated) if t]
    if long:  # the tokenizer's own truncation, as encode() does (it can cut the appended EOS)
      cut = self.tokenizer([full[i] for i in long], add_special_tokens=True, truncation=True,
                           max_length=self.max_length, verbose=False)["input_ids"]
      for i, x in zip(long, cut):
        ids[i] = x
    ids = [list(x) for x in ids]
    return Prepared(ids, [len(x) for x in ids], truncated)

  def pool_mask(self, mask: torch.Tensor) -> torch.Tensor:
    pool = mask.clone()
    if self.masked:
      pool[:, :self.masked] = 0
    return pool

  @torch.inference_mode()
  def encode(self, inputs: Sequence[list[int]]) -> np.ndarray:
    ids, mask = pad_ids(inputs, self.eos_id, self.spec.padding_side)
    ids, mask = ids.to(self.device), mask.to(self.device)
    return self.model(ids, mask, self.pool_mask(mask)).float().cpu().numpy()
