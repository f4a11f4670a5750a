"""Encoders against independent references: sentence-transformers' own encode() for `mean`, plain
transformers forwards of unpadded texts for `cls` and `last_token` (NV-Embed:
test_embed_nvembed.py)."""

import numpy as np
import pytest
import torch

from embed import encoders, job
from embed.errors import EmbedError
from test_embed_support import captions, minilm_config

CPU = torch.device("cpu")
TEXTS = captions(24, seed=1) + [
    "A",
    "Two dogs; one cat — and a café in Zürich!",
    "word " * 300,  # longer than max_length: truncated
    "  leading and trailing spaces  ",
]


def build(kind, model, max_length=256, padding_side="", instruction="", append_eos=False):
  ref = encoders.resolve_model(model)
  return encoders.build_encoder(kind, ref, "", "float32", CPU, instruction, max_length,
                                append_eos, padding_side, False)


def embed_all(encoder, texts, normalize=True, batch_tokens=600):
  from embed.inputs import Item

  cfg = minilm_config("unused", normalize=normalize, batch_tokens=batch_tokens)
  items = [Item(str(i), t) for i, t in enumerate(texts)]
  return job.embed_items(encoder, items, cfg, "test").vectors


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mean_matches_sentence_transformers(minilm_path, padding_side):
  from sentence_transformers import SentenceTransformer

  st = SentenceTransformer(minilm_path, device="cpu")
  assert st.max_seq_length == 256
  want = st.encode(TEXTS, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
  got = embed_all(build("mean", minilm_path, 256, padding_side), TEXTS)
  diff = float(np.abs(got - want).max())
  print(f"mean ({padding_side} padding) vs sentence-transformers: max abs diff {diff:.2e}")
  assert diff < 1e-5


def test_cls_matches_direct_forward(minilm_path):
  from transformers import AutoModel, AutoTokenizer

  model = AutoModel.from_pretrained(minilm_path).eval()
  tok = AutoTokenizer.from_pretrained(minilm_path)
  with torch.no_grad():
    want = np.stack([model(**tok(t, return_tensors="pt", truncation=True, max_length=64))
                     .last_hidden_state[0, 0].numpy() for t in TEXTS])
  for side in ("right", "left"):
    got = embed_all(build("cls", minilm_path, 64, side), TEXTS, normalize=False)
    diff = float(np.abs(got - want).max())
    print(f"cls ({side} padding) vs unpadded forward: max abs diff {diff:.2e}")
    assert diff < 1e-5, side


def tiny_decoder(tmp_path, minilm_path, arch):
  """A 2-layer decoder with random weights and the MiniLM tokenizer, saved to a folder."""
  import transformers
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(minilm_path)
  common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id)
  if arch == "gpt2":  # absolute position embeddings: left padding needs the position ids
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    cls = transformers.GPT2Model
  else:
    config_cls, cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaModel),
        "mistral": (transformers.MistralConfig, transformers.MistralModel),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2Model),
    }[arch]
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, **common)
  torch.manual_seed(0)
  model = cls(config).eval()
  folder = tmp_path / arch
  model.save_pretrained(folder)
  tok.save_pretrained(folder)
  # The reference reads the folder as transformers does (for qwen2, transformers 5 picks its own
  # tokenizer class whatever tokenizer_config.json says).
  return str(folder), model, AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_last_token_matches_unpadded_forward(tmp_path, minilm_path, arch):
  folder, model, tok = tiny_decoder(tmp_path, minilm_path, arch)
  texts = TEXTS[:12] + TEXTS[-4:]
  with torch.no_grad():
    want = np.stack([model(**tok(t, return_tensors="pt", truncation=True, max_length=48,
                                 return_token_type_ids=False))
                     .last_hidden_state[0, -1].numpy() for t in texts])
  for side in ("right", "left"):
    got = embed_all(build("last_token", folder, 48, side), texts, normalize=False)
    diff = float(np.abs(got - want).max())
    print(f"last_token {arch} ({side} padding) vs unpadded forward: max abs diff {diff:.2e}")
    assert diff < 1e-5, (arch, side)


def test_last_token_matches_padded_transformers_forward(tmp_path, minilm_path):
  """The same batch through transformers directly, read at the last non-pad position."""
  folder, model, tok = tiny_decoder(tmp_path, minilm_path, "llama")
  texts = TEXTS[:10]
  for side in ("right", "left"):
    tok.padding_side = side
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=48,
                return_token_type_ids=False)
    with torch.no_grad():
      hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"]
    last = [int(np.flatnonzero(m.numpy())[-1]) for m in mask]
    want = torch.stack([hidden[i, j] for i, j in enumerate(last)]).numpy()
    got = embed_all(build("last_token", folder, 48, side), texts, normalize=False,
                    batch_tokens=10_000)
    assert np.abs(got - want).max() < 1e-5, side


def test_prepare_truncates_and_counts(minilm_path):
  enc = build("mean", minilm_path, max_length=8)
  p = enc.prepare(["a b", "one two three four five six seven eight nine ten"])
  assert p.truncated == [False, True]
  assert p.lengths == [4, 8]
  assert p.inputs[1][-1] == enc.tokenizer.sep_token_id  # truncation keeps the closing token


def test_append_eos_and_instruction(tmp_path, minilm_path):
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(minilm_path)
  tok.eos_token = "[SEP]"
  folder = tmp_path / "with_eos"
  tok.save_pretrained(folder)
  # The model files come from MiniLM; only the tokenizer differs.
  import shutil
  for name in ("config.json", "model.safetensors"):
    shutil.copy(f"{minilm_path}/{name}", folder / name)
  enc = build("last_token", str(folder), max_length=6, append_eos=True, instruction="query: ")
  p = enc.prepare(["x", "one two three four five six"])
  sep = tok.sep_token_id
  assert [ids[-1] for ids in p.inputs] == [sep, sep]
  assert p.lengths[1] == 6 and p.truncated == [False, True]
  assert p.inputs[0][:3] == tok("query: x")["input_ids"][:3]


def test_resolve_model(tmp_path, minilm_path):
  ref = encoders.resolve_model("NVIDIA/nv-embed-V2")
  assert (ref.source, ref.default_encoder) == ("nvidia/NV-Embed-v2", "nv_embed")
  assert not ref.is_local
  assert encoders.resolve_model("salesforce/SFR-EMBEDDING-MISTRAL").default_encoder == "last_token"
  assert encoders.resolve_model("someone/unknown").source == "someone/unknown"
  local = encoders.resolve_model(minilm_path)
  assert local.is_local and local.source == minilm_path
  with pytest.raises(EmbedError, match="does not exist"):
    encoders.resolve_model(str(tmp_path / "nope"))
  snap = tmp_path / "models--nvidia--NV-Embed-v2" / "snapshots" / ("a" * 40)
  snap.mkdir(parents=True)
  ref = encoders.resolve_model(str(snap))
  assert ref.default_encoder == "nv_embed" and encoders.snapshot_revision(ref.source) == "a" * 40


def test_rank_info():
  assert job.rank_info({}) == (0, 1, 0)
  assert job.rank_info({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == (3, 8, 3)
  slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1"}
  assert job.rank_info(slurm) == (5, 6, 1)
  with pytest.raises(EmbedError, match="not a valid task"):
    job.rank_info({"RANK": "2", "WORLD_SIZE": "2"})
  with pytest.raises(EmbedError, match="integers"):
    job.rank_info({"RANK": "x", "WORLD_SIZE": "2"})
