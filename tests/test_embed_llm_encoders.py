"""The LLM embedders' configs (Qwen3-Embedding, e5-mistral) on tiny random models of their
architecture, against a re-derivation of each model card's recipe.

The reference tokenises with the raw `tokenizers` library and applies the card's rules itself
(Qwen3: the tokenizer appends <|endoftext|>, truncation keeps it, last token; e5: BOS, text cut to
max_length - 1, EOS id appended, last token). Hidden states come from transformers' own base
model run on each text alone (no padding); padding, batching and pooling are the project's.
"""

import os

import numpy as np
import pytest
import torch

from embed import encoders, fixtures, job
from embed.configs import e5_mistral, qwen3_embedding
from test_embed_support import captions, minilm_config

TEXTS = captions(14, seed=7) + ["A", "word " * 80, "a dog and a cat, 12 birds!"]  # one cut
QUERY = "Instruct: Retrieve captions of the same image\nQuery:"


def tiny(arch, folder):
  import transformers

  config_cls, model_cls = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3Model),
                           "mistral": (transformers.MistralConfig, transformers.MistralModel)}[arch]
  config = config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=700,
                      max_position_embeddings=512)
  torch.manual_seed(0)
  model = model_cls(config).eval()
  with torch.no_grad():  # norms away from 1 so that every weight matters
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("qwen3"))
  model = tiny("qwen3", folder)
  # Qwen3-Embedding's tokenizer: byte-level BPE, no BOS, <|endoftext|> appended by the tokenizer,
  # eos_token <|im_end|>, pad <|endoftext|>, left padding.
  fixtures.write_tokenizer(folder, bos=None, unk=None, eos="<|im_end|>", pad="<|endoftext|>",
                          add_bos=False, suffix="<|endoftext|>", byte_level=True,
                          padding_side="left", tokenizer_class="Qwen2Tokenizer")
  return folder, model


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("e5"))
  model = tiny("mistral", folder)
  fixtures.write_tokenizer(folder, pad="</s>")  # Mistral's: BOS prefixed, nothing appended
  return folder, model


def run_config(cfg, folder, texts):
  cfg.model, cfg.device, cfg.dtype = folder, "cpu", "float32"
  enc = encoders.build_encoder(cfg.encoder, encoders.resolve_model(folder), "", cfg.dtype,
                               torch.device("cpu"), cfg.instruction, cfg.max_length,
                               cfg.append_eos, cfg.padding_side, False)
  from embed.inputs import Item

  run = minilm_config("unused", normalize=cfg.normalize, batch_tokens=120, encoder=cfg.encoder)
  return job.embed_items(enc, [Item(str(i), t) for i, t in enumerate(texts)], run, "t").vectors


def last_state(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].numpy()


def unit(rows):
  rows = np.stack(rows)
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def raw_tokenizer(folder):
  from tokenizers import Tokenizer

  return Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))


@pytest.mark.parametrize("instruction", ["", QUERY])
def test_qwen3_embedding_config(qwen3, instruction):
  folder, model = qwen3
  cfg = qwen3_embedding.get_config()
  assert (cfg.encoder, cfg.padding_side, cfg.append_eos) == ("last_token", "left", False)
  cfg.instruction, cfg.max_length = instruction, 48
  got = run_config(cfg, folder, TEXTS)
  assert len(np.unique(got.round(5), axis=0)) == len(TEXTS)  # the texts, not just the prefix
  tok = raw_tokenizer(folder)
  eot = tok.token_to_id("<|endoftext|>")
  want = []
  for t in TEXTS:
    ids = tok.encode(instruction + t, add_special_tokens=False).ids[:47] + [eot]
    want.append(last_state(model, ids))
  diff = float(np.abs(got - unit(want)).max())
  print(f"qwen3 config (instruction {bool(instruction)}) vs the card's recipe: {diff:.2e}")
  assert diff < 1e-5


@pytest.mark.parametrize("instruction", ["", "Instruct: Retrieve captions\nQuery: "])
def test_e5_mistral_config(mistral, instruction):
  folder, model = mistral
  cfg = e5_mistral.get_config()
  assert (cfg.encoder, cfg.append_eos) == ("last_token", True)
  cfg.instruction, cfg.max_length = instruction, 48
  got = run_config(cfg, folder, TEXTS)
  assert len(np.unique(got.round(5), axis=0)) == len(TEXTS)
  tok = raw_tokenizer(folder)
  bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
  want = []
  for t in TEXTS:
    body = tok.encode(instruction + t, add_special_tokens=False).ids
    ids = ([bos] + body)[:47] + [eos]  # max_length - 1 tokens, then EOS
    want.append(last_state(model, ids))
  diff = float(np.abs(got - unit(want)).max())
  print(f"e5-mistral config (instruction {bool(instruction)}) vs the card's recipe: {diff:.2e}")
  assert diff < 1e-5


def test_known_hub_ids():
  for size in ("0.6B", "4B", "8B"):
    ref = encoders.resolve_model(f"qwen/qwen3-embedding-{size.lower()}")
    assert ref.source == f"Qwen/Qwen3-Embedding-{size}" and ref.default_encoder == "last_token"
  assert encoders.resolve_model(qwen3_embedding.get_config().model).default_encoder == "last_token"
  assert encoders.resolve_model(e5_mistral.get_config().model).default_encoder == "last_token"


def test_no_key_value_cache(qwen3):
  """One forward per batch: a decoder's key/value cache would only take memory (GBs at 7B)."""
  folder, _ = qwen3
  enc = encoders.build_encoder("last_token", encoders.resolve_model(folder), "", "float32",
                               torch.device("cpu"), "", 32, False, "left", False)
  outputs = []
  hook = enc.model.register_forward_hook(lambda m, args, out: outputs.append(out))
  try:
    enc.encode(enc.prepare(["a dog", "two cats on a red couch"]).inputs)
  finally:
    hook.remove()
  assert outputs and getattr(outputs[0], "past_key_values", None) is None
