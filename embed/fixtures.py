"""Checkpoint folders in NV-Embed's released layout, with random weights: tiny ones for the tests,
the 7B architecture (without its weights) for measuring the embedding job's cost. Also a small
BPE tokenizer trained here, in Mistral's or Qwen3's style, for the other LLM encoders' tests.

Not used by the embedding job itself (:mod:`embed.nvembed` reads such folders as it reads the
released one).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from embed import nvembed
from embed.errors import EmbedError

# The released NV-Embed-v1/v2 sizes, as write_checkpoint takes them: Mistral-7B (without its LM
# head) and the latent-attention pooling, 7.85B parameters.
NV_EMBED_V2 = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                   num_latents=512, latent_dim=4096, num_cross_heads=8, cross_dim_head=4096)


_WORDS = """a an the of and in on with at by to from for near under over behind beside between
into onto across along around through up down off out is are was were be being been has have
had do does did this that these those it its his her their our your my one two three four five
six seven eight nine ten several many few some all both each other another more most man woman
men women boy girl child children people person player baby family friend dog dogs cat cats
horse horses bird birds cow cows sheep bear bears elephant elephants giraffe giraffes zebra
zebras car cars truck bus train plane boat bike bicycle motorcycle street road sidewalk city
building house room kitchen bathroom bedroom table chair couch bed desk window door wall floor
field grass tree trees park beach water ocean river lake snow mountain hill sky cloud clouds sun
food pizza sandwich cake plate bowl cup glass bottle banana apple orange broccoli hot dog donut
phone laptop computer television clock vase book bag umbrella kite frisbee ball bat skateboard
surfboard skis tennis racket red blue green yellow white black brown gray grey orange pink purple
large small big little tall short long old young new wooden metal plastic open closed empty full
sitting standing walking running riding playing eating holding looking flying laying lying
parked driving carrying wearing watching waiting jumping swimming cutting smiling talking
photo picture image view front back top bottom side left right middle inside outside together
while during next under there here very""".split()


def write_tokenizer(folder: str, *, bos: str | None = "<s>", eos: str = "</s>",
                    unk: str | None = "<unk>", pad: str | None = None, add_bos: bool = True,
                    suffix: str | None = None, byte_level: bool = False,
                    padding_side: str = "right", tokenizer_class: str = "PreTrainedTokenizerFast",
                    vocab_size: int = 600) -> None:
  """A small BPE tokenizer, trained here on a built-in word list, saved as tokenizer.json +
  tokenizer_config.json so that ``AutoTokenizer.from_pretrained(folder)`` loads it.

  Mistral/Llama style by default (Metaspace pieces, BOS prefixed, nothing appended);
  ``byte_level=True, add_bos=False, suffix="<|endoftext|>"`` is Qwen3-Embedding's (byte-level
  pieces, the end-of-text token appended by the tokenizer itself).

  Its vocabulary is small, so its pieces are short: about 2.1 tokens per word on Flickr8k
  captions, more than a real LLM tokenizer gives. Costs measured with it are right per token,
  not per caption.
  """
  specials = list(dict.fromkeys(t for t in (unk, bos, eos, pad, suffix) if t is not None))
  tok = Tokenizer(models.BPE(unk_token=unk))
  if byte_level:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  else:
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = [chr(i) for i in range(32, 127)]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator([" ".join(_WORDS[i:i + 12]) for i in range(0, len(_WORDS), 3)] * 4,
                          trainer)
  head = [bos] if add_bos and bos else []
  tail = [suffix] if suffix else []
  single = " ".join([f"{t}:0" for t in head] + ["$A:0"] + [f"{t}:0" for t in tail])
  pair = " ".join([f"{t}:0" for t in head] + ["$A:0", "$B:1"] + [f"{t}:1" for t in tail])
  tok.post_processor = processors.TemplateProcessing(
      single=single, pair=pair,
      special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(head + tail)])
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  config = {"tokenizer_class": tokenizer_class, "eos_token": eos, "bos_token": bos,
            "unk_token": unk, "pad_token": pad, "padding_side": padding_side,
            "model_max_length": 32768, "clean_up_tokenization_spaces": False}
  with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({k: v for k, v in config.items() if v is not None}, f, indent=2)


def write_checkpoint(folder: str, *, hidden_size: int, intermediate_size: int,
                     num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
                     vocab_size: int, num_latents: int, latent_dim: int, num_cross_heads: int,
                     cross_dim_head: int, weights: bool = True, seed: int = 0,
                     dtype: str = "float32", max_shard_bytes: int | None = None,
                     instruction_masking: bool = True) -> str:
  """Writes an NV-Embed checkpoint folder in the released layout: config.json (model_type nvembed,
  text_config = Mistral, latent_attention_config), a tokenizer, and (``weights``) random weights
  under the real tensor names in model.safetensors, or in shards of at most ``max_shard_bytes``
  with model.safetensors.index.json. ``weights=False`` writes no weights, for
  ``config.random_init`` (the architecture's cost without its 15 GB of weights):

      write_checkpoint(folder, **NV_EMBED_V2, weights=False)
      python -m embed.main --config=embed/configs/nvembed_v2.py --config.model=FOLDER \
          --config.random_init=True --config.dtype=bfloat16 ...
  """
  if latent_dim != hidden_size:
    raise EmbedError(f"latent_dim={latent_dim} must equal hidden_size={hidden_size} (NV-Embed's "
                     "pooling adds the cross-attention output to the token states)")
  os.makedirs(folder, exist_ok=True)
  text = {"model_type": "bidir_mistral", "architectures": ["MistralModel"],
          "hidden_size": hidden_size, "intermediate_size": intermediate_size,
          "num_hidden_layers": num_hidden_layers, "num_attention_heads": num_attention_heads,
          "num_key_value_heads": num_key_value_heads, "vocab_size": vocab_size,
          "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2,
          "tie_word_embeddings": False, "torch_dtype": dtype,
          # Fields the released text_config carries from its transformers 4.x serialisation.
          "_name_or_path": "nvidia/NV-Embed-v2", "add_cross_attention": False,
          "is_decoder": False, "max_length": 20, "num_beams": 1, "output_attentions": False,
          "use_bfloat16": False, "torchscript": False, "id2label": {"0": "LABEL_0"},
          "label2id": {"LABEL_0": 0}}
  latent = {"model_type": "latent_attention", "num_latents_value": num_latents,
            "num_cross_heads": num_cross_heads, "hidden_dim": hidden_size,
            "latent_dim": latent_dim, "cross_dim_head": cross_dim_head, "output_normalize": True}
  config = {"model_type": "nvembed", "architectures": ["NVEmbedModel"], "text_config": text,
            "latent_attention_config": latent, "hidden_size": hidden_size,
            "padding_side": "right", "is_mask_instruction": instruction_masking,
            "add_eos": True, "add_pad_token": True, "mask_type": "b", "torch_dtype": dtype}
  with open(os.path.join(folder, nvembed.CONFIG), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  write_tokenizer(folder, vocab_size=min(vocab_size, 600))
  if weights:
    model = nvembed.NVEmbedModel(nvembed.read_spec(folder))
    nvembed.init_random_(model, seed)
    state = {k: v.detach().to(getattr(torch, dtype)).contiguous()
             for k, v in model.state_dict().items()
             if not k.startswith("embedding_model.rotary_emb.")}
    _save_shards(folder, state, max_shard_bytes)
  return folder


def _save_shards(folder: str, state: dict[str, torch.Tensor],
                 max_shard_bytes: int | None) -> None:
  if max_shard_bytes is None:
    save_file(state, os.path.join(folder, nvembed.SINGLE_FILE), metadata={"format": "pt"})
    return
  shards: list[dict[str, torch.Tensor]] = [{}]
  size = 0
  for k in sorted(state):
    nbytes = state[k].numel() * state[k].element_size()
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = state[k]
    size += nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
  total = sum(v.numel() * v.element_size() for v in state.values())
  with open(os.path.join(folder, nvembed.INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
