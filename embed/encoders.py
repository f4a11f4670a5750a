"""Frozen text encoders: turn a batch of texts into float32 vectors, one per text.

Four kinds, chosen by ``config.encoder``:

* ``nv_embed``   NV-Embed v1/v2 (:mod:`embed.nvembed`): transformers' Mistral run bidirectionally
                 plus NV-Embed's latent-attention pooling, built natively from the checkpoint's
                 config.json and safetensors (its own Python files are never run). Tokenised as
                 NV-Embed's ``encode()``: instruction + text + EOS, truncated at ``max_length``.
* ``last_token`` decoder LLMs (Qwen3-Embedding, e5-mistral, SFR-/Linq-Embed-Mistral, gte-Qwen, raw
                 Mistral or Vicuna): the final hidden state at the last non-pad position, whichever
                 side the padding is on.
* ``mean``       encoder models (sentence-transformers): the mask-weighted mean of the final states.
* ``cls``        the final hidden state at the first non-pad position.

An encoder works in two steps so that the job can batch by tokens: :meth:`Encoder.prepare`
tokenises a list of texts (lengths, truncation) and :meth:`Encoder.encode` runs one batch of
prepared inputs. Normalisation and storage are the job's business, not the encoder's.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Callable, Sequence

import numpy as np
import torch

from embed import nvembed
from embed.base import Encoder, Prepared, pad_ids  # noqa: F401  (the encoders' interface)
from embed.errors import EmbedError

# Models whose hub id is recognised whatever its case, with the encoder they need.
KNOWN_MODELS = {
    "nvidia/nv-embed-v2": ("nvidia/NV-Embed-v2", "nv_embed"),
    "nvidia/nv-embed-v1": ("nvidia/NV-Embed-v1", "nv_embed"),
    "salesforce/sfr-embedding-mistral": ("Salesforce/SFR-Embedding-Mistral", "last_token"),
    "linq-ai-research/linq-embed-mistral": ("Linq-AI-Research/Linq-Embed-Mistral", "last_token"),
    "alibaba-nlp/gte-qwen2-7b-instruct": ("Alibaba-NLP/gte-Qwen2-7B-instruct", "last_token"),
    "alibaba-nlp/gte-qwen2-1.5b-instruct": ("Alibaba-NLP/gte-Qwen2-1.5B-instruct", "last_token"),
    "intfloat/e5-mistral-7b-instruct": ("intfloat/e5-mistral-7b-instruct", "last_token"),
    "qwen/qwen3-embedding-0.6b": ("Qwen/Qwen3-Embedding-0.6B", "last_token"),
    "qwen/qwen3-embedding-4b": ("Qwen/Qwen3-Embedding-4B", "last_token"),
    "qwen/qwen3-embedding-8b": ("Qwen/Qwen3-Embedding-8B", "last_token"),
    "mistralai/mistral-7b-v0.1": ("mistralai/Mistral-7B-v0.1", "last_token"),
    "lmsys/vicuna-7b-v1.5": ("lmsys/vicuna-7b-v1.5", "last_token"),
    "sentence-transformers/all-minilm-l6-v2": ("sentence-transformers/all-MiniLM-L6-v2", "mean"),
}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Which model, where, in what precision
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelRef:
  source: str  # what from_pretrained is given: an absolute folder or a hub id
  name: str  # what the manifest records: the canonical hub id, or the folder
  default_encoder: str | None
  is_local: bool


def resolve_model(model: str) -> ModelRef:
  """A local folder if one exists at ``model``; otherwise a hub id, canonical if it is known."""
  if not model:
    raise EmbedError("config.model is empty: give a hub id or a local model folder")
  path = os.path.expanduser(model)
  if os.path.isdir(path):
    path = os.path.abspath(path)
    known = _known_by_folder(path)
    return ModelRef(path, path, known[1] if known else None, True)
  if os.path.sep in model and model.startswith((".", os.path.sep, "~")):
    raise EmbedError(f"model folder {model} does not exist")
  known = KNOWN_MODELS.get(model.lower())
  if known:
    return ModelRef(known[0], known[0], known[1], False)
  return ModelRef(model, model, None, False)


def _known_by_folder(path: str) -> tuple[str, str] | None:
  """A hub snapshot folder (``models--org--name/snapshots/<rev>``) names its model."""
  parts = path.split(os.sep)
  for part in parts:
    if part.startswith("models--"):
      return KNOWN_MODELS.get(part[len("models--"):].replace("--", "/").lower())
  return None


def model_label(ref: ModelRef) -> str:
  """A short name of the model for reports: the hub id; for a folder, the model it is a hub
  snapshot of, else the title of its model card (README.md), else the folder's last two parts."""
  if not ref.is_local:
    return ref.name
  known = _known_by_folder(ref.source)
  if known:
    return known[0]
  try:
    with open(os.path.join(ref.source, "README.md"), encoding="utf-8") as f:
      for line in f:
        if line.startswith("# ") and line[2:].strip():
          return line[2:].strip()
  except (OSError, UnicodeDecodeError):
    pass
  parent, base = os.path.split(os.path.normpath(ref.source))
  return os.path.join(os.path.basename(parent), base)


def snapshot_revision(path: str) -> str | None:
  """The commit of a hub cache snapshot folder, if ``path`` is one."""
  parts = os.path.normpath(path).split(os.sep)
  if len(parts) >= 2 and parts[-2] == "snapshots" and len(parts[-1]) == 40:
    return parts[-1]
  return None


def resolve_device(device: str, local_rank: int) -> torch.device:
  if device == "auto":
    if torch.cuda.is_available():
      n = torch.cuda.device_count()
      if local_rank >= n:
        raise EmbedError(f"LOCAL_RANK={local_rank} but this host has {n} CUDA devices")
      return torch.device("cuda", local_rank)
    return torch.device("cpu")
  try:
    dev = torch.device(device)
  except RuntimeError:
    raise EmbedError(f"config.device={device!r} is not a torch device") from None
  if dev.type == "cuda" and not torch.cuda.is_available():
    raise EmbedError(f"config.device={device!r} but CUDA is not available")
  return dev


def resolve_dtype(dtype: str, device: torch.device) -> str:
  if dtype == "auto":
    return "float16" if device.type == "cuda" else "float32"
  if dtype not in TORCH_DTYPES:
    raise EmbedError(f"config.dtype={dtype!r}; expected auto or one of {sorted(TORCH_DTYPES)}")
  return dtype


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------


class PooledEncoder(Encoder):
  """A transformers AutoModel whose final hidden states are pooled (mean, cls or last_token)."""

  def __init__(self, model, tokenizer, pooling: str, instruction: str, max_length: int,
               append_eos: bool, padding_side: str, device: torch.device):
    if pooling not in ("mean", "cls", "last_token"):
      raise EmbedError(f"unknown pooling {pooling!r}")
    self.model, self.tokenizer, self.pooling = model, tokenizer, pooling
    self.instruction, self.max_length, self.append_eos = instruction, max_length, append_eos
    self.device = device
    self.padding_side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    if self.padding_side not in ("left", "right"):
      raise EmbedError(f"config.padding_side={padding_side!r}; expected left or right")
    self.eos_id = tokenizer.eos_token_id
    if append_eos and self.eos_id is None:
      raise EmbedError("config.append_eos=True but the tokenizer has no EOS token")
    self.pad_id = next((i for i in (tokenizer.pad_token_id, self.eos_id, tokenizer.unk_token_id)
                        if i is not None), 0)
    self.limit = max_length - (1 if append_eos else 0)
    if self.limit < 1:
      raise EmbedError(f"config.max_length={max_length} leaves no room for text")
    # Positions counted from the first real token make left padding give the same result as
    # right padding, also for models with absolute position embeddings.
    params = inspect.signature(model.forward).parameters
    self.takes_positions = "position_ids" in params
    # Decoders keep a key/value cache by default (GBs at 7B on long batches); one forward needs
    # none.
    self.takes_use_cache = "use_cache" in params
    self.dim = int(model.config.hidden_size)
    self.revision = getattr(model.config, "_commit_hash", None)

  def prepare(self, texts: Sequence[str]) -> Prepared:
    full = [self.instruction + t for t in texts]
    ids = self.tokenizer(full, add_special_tokens=True, truncation=False,
                         verbose=False)["input_ids"]
    truncated = [len(x) > self.limit for x in ids]
    long = [i for i, t in enumerate(truncated) if t]
    if long:
      cut = self.tokenizer([full[i] for i in long], add_special_tokens=True, truncation=True,
                           max_length=self.limit)["input_ids"]
      for i, x in zip(long, cut):
        ids[i] = x
    if self.append_eos:
      ids = [list(x) + [self.eos_id] for x in ids]
    return Prepared([list(x) for x in ids], [len(x) for x in ids], truncated)

  def pad(self, inputs: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_ids(inputs, self.pad_id, self.padding_side)

  @torch.inference_mode()
  def encode(self, inputs: Sequence[list[int]]) -> np.ndarray:
    ids, mask = self.pad(inputs)
    kwargs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
    if self.takes_positions:
      kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0).to(self.device)
    if self.takes_use_cache:
      kwargs["use_cache"] = False
    out = self.model(**kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return pool(hidden.float(), kwargs["attention_mask"], self.pooling).cpu().numpy()


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
  """[b, t, d] hidden states, [b, t] 0/1 mask -> [b, d]."""
  if pooling == "mean":
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
  rows = torch.arange(hidden.shape[0], device=hidden.device)
  if pooling == "cls":
    first = mask.argmax(1)  # first maximal entry = first real token
    return hidden[rows, first]
  if pooling == "last_token":
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    return hidden[rows, last]
  raise EmbedError(f"unknown pooling {pooling!r}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_tokenizer(source: str, revision: str | None, trust_remote_code: bool):
  from transformers import AutoTokenizer

  try:
    return AutoTokenizer.from_pretrained(source, revision=revision,
                                         trust_remote_code=trust_remote_code)
  except (OSError, ValueError) as e:
    raise EmbedError(f"cannot load the tokenizer of {source}: {e}") from None


def load_model(source: str, revision: str | None, dtype: str, trust_remote_code: bool,
               device: torch.device, random_init: bool = False):
  from transformers import AutoConfig, AutoModel

  try:
    if random_init:  # the architecture of config.json, random weights: for measuring cost
      config = AutoConfig.from_pretrained(source, revision=revision,
                                          trust_remote_code=trust_remote_code)
      torch.manual_seed(0)
      model = AutoModel.from_config(config, dtype=TORCH_DTYPES[dtype],
                                    trust_remote_code=trust_remote_code)
    else:
      model = AutoModel.from_pretrained(source, revision=revision, dtype=TORCH_DTYPES[dtype],
                                        trust_remote_code=trust_remote_code)
  except (OSError, ValueError) as e:
    raise EmbedError(f"cannot load the model {source}: {e}") from None
  return model.to(device).eval()


def checkpoint_folder(ref: ModelRef, revision: str | None, weights: bool = True) -> str:
  """A local folder holding the checkpoint's config, tokenizer and (``weights``) safetensors; a hub
  id is downloaded (or found in the cache), without the checkpoint's Python files."""
  if ref.is_local:
    return ref.source
  from huggingface_hub import snapshot_download

  patterns = ["*.json", "tokenizer*", "*.model"] + (["*.safetensors"] if weights else [])
  try:
    return snapshot_download(ref.source, revision=revision, allow_patterns=patterns)
  except Exception as e:  # noqa: BLE001 - hub errors have many types; each is the user's to fix
    raise EmbedError(f"cannot fetch {ref.source} from the Hugging Face hub ({type(e).__name__}: "
                     f"{e}); download it and set config.model to its folder") from None


def load_nv_embed(ref: ModelRef, revision: str | None, dtype: str, device: torch.device,
                  settings: "Settings") -> Encoder:
  instruction, max_length, random_init = (settings.instruction, settings.max_length,
                                          settings.random_init)
  folder = checkpoint_folder(ref, revision, weights=not random_init)
  spec = nvembed.read_spec(folder)
  if random_init:
    model = nvembed.random_model(spec, TORCH_DTYPES[dtype], device)
  else:
    model = nvembed.load_model(folder, TORCH_DTYPES[dtype], device)
  from transformers.utils import logging as hf_logging

  level = hf_logging.get_verbosity()
  hf_logging.set_verbosity_error()  # AutoTokenizer notes that config.json is not a tokenizer's
  try:
    tokenizer = load_tokenizer(folder, None, False)
  finally:
    hf_logging.set_verbosity(level)
  encoder = nvembed.NVEmbedEncoder(model, tokenizer, instruction, max_length, device)
  encoder.revision = snapshot_revision(folder)
  return encoder


def load_pooled(ref: ModelRef, revision: str | None, dtype: str, device: torch.device,
                settings: "Settings") -> Encoder:
  model = load_model(ref.source, revision, dtype, settings.trust_remote_code, device,
                     settings.random_init)
  tokenizer = load_tokenizer(ref.source, revision, settings.trust_remote_code)
  return PooledEncoder(model, tokenizer, settings.kind, settings.instruction,
                       settings.max_length, settings.append_eos, settings.padding_side, device)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What an encoder is built with besides the model and device (the job's config fields)."""
  kind: str
  instruction: str = ""
  max_length: int = 77
  append_eos: bool = False
  padding_side: str = ""
  trust_remote_code: bool = False
  random_init: bool = False


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A kind of encoder (``config.encoder``): how to load it, and the pooling its manifest
  records."""
  load: Callable[[ModelRef, str | None, str, torch.device, Settings], Encoder]
  pooling: str


# The encoder kinds, by config.encoder (see the README's "Extending" for adding one).
ARCHITECTURES = {
    "nv_embed": Architecture(load_nv_embed, "latent_attention"),
    "last_token": Architecture(load_pooled, "last_token"),
    "mean": Architecture(load_pooled, "mean"),
    "cls": Architecture(load_pooled, "cls"),
}


def architecture(kind: str) -> Architecture:
  if kind not in ARCHITECTURES:
    raise EmbedError(f"config.encoder={kind!r}; expected one of {sorted(ARCHITECTURES)}")
  return ARCHITECTURES[kind]


_CACHE: dict[tuple, Encoder] = {}


def build_encoder(kind: str, ref: ModelRef, revision: str, dtype: str, device: torch.device,
                  instruction: str, max_length: int, append_eos: bool, padding_side: str,
                  trust_remote_code: bool, random_init: bool = False) -> Encoder:
  """Loads (once per process) the encoder these settings describe. ``random_init`` builds the
  architecture of the checkpoint's config.json with random weights (no weights are read)."""
  settings = Settings(kind, instruction, max_length, append_eos, padding_side, trust_remote_code,
                      random_init)
  key = (ref.source, revision, dtype, str(device), settings)
  if key not in _CACHE:
    enc = _CACHE[key] = architecture(settings.kind).load(ref, revision or None, dtype, device,
                                                         settings)
    enc.name = ref.name
    enc.revision = revision or enc.revision or (snapshot_revision(ref.source)
                                                if ref.is_local else None)
  return _CACHE[key]
