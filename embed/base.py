"""What every text encoder of the embedding job provides: ``prepare`` (tokenise) and ``encode``.

Kept apart from :mod:`embed.encoders` (which builds encoders by kind) so that encoder modules such
as :mod:`embed.nvembed` can subclass it without an import cycle.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch


@dataclasses.dataclass
class Prepared:
  """Tokenised texts: what a batch is built from."""
  inputs: list[Any]  # token ids (pooled encoders) or the texts themselves (nv_embed)
  lengths: list[int]  # tokens after truncation, special tokens included
  truncated: list[bool]


class Encoder:
  """A frozen text encoder; subclasses implement prepare and encode."""

  name: str
  dim: int
  revision: str | None

  def prepare(self, texts: Sequence[str]) -> Prepared:
    raise NotImplementedError

  def encode(self, inputs: Sequence[Any]) -> np.ndarray:
    """float32 [len(inputs), dim]."""
    raise NotImplementedError


def pad_ids(inputs: Sequence[list[int]], pad_id: int, side: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
  """Token id lists -> (ids, 0/1 mask), both long [n, longest], padded on ``side``."""
  width = max(len(x) for x in inputs)
  ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
  mask = torch.zeros((len(inputs), width), dtype=torch.long)
  for row, x in enumerate(inputs):
    cols = slice(width - len(x), width) if side == "left" else slice(0, len(x))
    ids[row, cols] = torch.tensor(x, dtype=torch.long)
    mask[row, cols] = 1
  return ids, mask
