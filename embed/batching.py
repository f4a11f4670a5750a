"""Token-budget batching: group texts of similar length so that little compute goes to padding.

The texts of a shard are sorted by tokenised length, longest first (so that a batch too large for
the device fails at once, not at the end), and cut into contiguous batches whose padded size,
batch size x longest text, stays within ``batch_tokens``. The job writes results back in the
original order.

Where to cut is chosen to minimise ``padded tokens + overhead_tokens x number of batches``: with no
per-batch cost every distinct length would get its own batches (no padding, many small batches);
with a large one, batches fill the budget and mix lengths (few batches, much padding). The search
only considers cuts where the length changes or the budget is full, so it stays linear-ish in the
number of texts (about 10 ms for 10,000 captions).
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
from typing import Sequence


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_batch_size: int,
                 overhead_tokens: int = 256) -> list[list[int]]:
  """Indices into ``lengths``, grouped into batches; every index appears exactly once.

  A text longer than ``batch_tokens`` gets a batch of its own.
  """
  if batch_tokens < 1 or max_batch_size < 1 or overhead_tokens < 0:
    raise ValueError(f"batch_tokens={batch_tokens}, max_batch_size={max_batch_size} must be "
                     f"positive and overhead_tokens={overhead_tokens} not negative")
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  widths = [max(1, int(lengths[i])) for i in order]
  n = len(widths)
  if n == 0:
    return []
  length_changes = [p for p in range(1, n) if widths[p] != widths[p - 1]]
  # Shortest path over cut positions: best[j] = (cost of batching order[:j], previous cut).
  best = {0: (0, -1)}
  frontier = [0]
  while frontier:
    start = heapq.heappop(frontier)
    if start == n:
      break
    cost, width = best[start][0], widths[start]
    stop = min(n, start + min(max_batch_size, max(1, batch_tokens // width)))
    lo = bisect.bisect_right(length_changes, start)
    hi = bisect.bisect_left(length_changes, stop)
    for end in length_changes[lo:hi] + [stop]:
      total = cost + (end - start) * width + overhead_tokens
      if end not in best:
        best[end] = (total, start)
        heapq.heappush(frontier, end)
      elif total < best[end][0]:
        best[end] = (total, start)
  cuts = []
  end = n
  while end > 0:
    start = best[end][1]
    cuts.append((start, end))
    end = start
  return [order[s:e] for s, e in reversed(cuts)]


@dataclasses.dataclass
class PaddingStats:
  tokens: int = 0  # real tokens
  padded: int = 0  # tokens the model ran on: batch size x longest text, summed over batches

  def add_batch(self, lengths: Sequence[int]) -> None:
    if lengths:
      self.tokens += sum(lengths)
      self.padded += len(lengths) * max(lengths)

  @property
  def waste(self) -> float:
    """Fraction of the computed tokens that are padding."""
    return 1.0 - self.tokens / self.padded if self.padded else 0.0


def padding_waste(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
  stats = PaddingStats()
  for b in batches:
    stats.add_batch([lengths[i] for i in b])
  return stats.waste
