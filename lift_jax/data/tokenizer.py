"""The CLIP baseline's tokenizer: a Hugging Face tokenizer padded/truncated to a fixed length.

It lives with the data (not the text tower) because the input pipeline and the evaluators both
tokenise captions, and neither should import the models to do so.
"""

from __future__ import annotations

import functools
import os
import threading

import numpy as np

from lift_jax import cli

# Reader threads (grain's, several per worker process) ask for the tokenizer at once on their
# first example; transformers' lazily imported names are not safe to resolve from two threads at
# a time. The first caller loads it under this lock, the others wait and share it.
_LOCK = threading.Lock()


@cli.user_error
class TokenizerError(ValueError):
  """The configured tokenizer cannot be loaded; the message names it."""


class Tokenizer:
  """A Hugging Face tokenizer (hub name or local folder) that pads/truncates to a fixed length.

  Truncation keeps the end-of-text token last, as the text tower pools there. Padding uses id 0
  for CLIP's BPE (as OpenCLIP) and the tokenizer's own pad id otherwise.
  """

  def __init__(self, name_or_path: str, context_length: int):
    from transformers import AutoTokenizer  # tokenizers only: no torch needed

    local = os.path.isdir(os.path.expanduser(name_or_path))
    try:
      self._tok = AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path),
                                                local_files_only=local)
    except Exception as e:  # noqa: BLE001 - any failure to load is the setting's to fix
      raise TokenizerError(f"data.tokenizer={name_or_path!r} cannot be loaded "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           "give a local tokenizer folder or a hub id in the local cache"
                           ) from None
    self.context_length = context_length
    tok = self._tok
    self.eot_token_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    self.is_clip_bpe = type(tok).__name__.startswith("CLIPTokenizer")
    self.pad_token_id = 0 if self.is_clip_bpe else (tok.pad_token_id or 0)
    self.vocab_size = len(tok)

  @property
  def pool_token_id(self) -> int | None:
    """The id the text tower pools at (None: argmax, CLIP's convention)."""
    return None if self.is_clip_bpe else self.eot_token_id

  def lengths(self, texts: list[str]) -> list[int]:
    """Token counts before truncation, special tokens included (> context_length: cut)."""
    return [len(ids) for ids in self._tok(list(texts), add_special_tokens=True,
                                           truncation=False)["input_ids"]]

  def __call__(self, texts: list[str]) -> np.ndarray:
    enc = self._tok(list(texts), add_special_tokens=True, truncation=True,
                    max_length=self.context_length, padding=False)["input_ids"]
    out = np.full((len(enc), self.context_length), self.pad_token_id, np.int32)
    for i, ids in enumerate(enc):
      if self.eot_token_id is not None and ids and ids[-1] != self.eot_token_id:
        ids = ids[: self.context_length - 1] + [self.eot_token_id]
      out[i, : len(ids)] = ids
    return out


@functools.lru_cache(maxsize=8)
def _cached(name_or_path: str, context_length: int) -> Tokenizer:
  return Tokenizer(name_or_path, context_length)


def get_tokenizer(name_or_path: str, context_length: int) -> Tokenizer:
  """The tokenizer of a hub name or local folder, loaded once per process (thread-safe)."""
  with _LOCK:
    return _cached(name_or_path, context_length)
