"""Token-budget batching: a partition of the texts within the budget, little padding on
DataComp-like lengths and on the Flickr8k captions, results written back in the original order."""

import csv

import numpy as np
import pytest

from conftest import shared_data
from embed import encoders, job
from embed.batching import padding_waste, plan_batches
from embed.inputs import Item
from test_embed_support import minilm_config


def datacomp_like_lengths(n, seed=0, median=13.0, sigma=0.5, max_length=77):
  """Token counts of web alt-text captions: log-normal around a dozen tokens, clipped."""
  rng = np.random.default_rng(seed)
  lengths = np.rint(rng.lognormal(np.log(median), sigma, n))
  return np.clip(lengths, 3, max_length).astype(int).tolist()


def check_partition(lengths, batches, batch_tokens, max_batch_size):
  flat = sorted(i for b in batches for i in b)
  assert flat == list(range(len(lengths)))
  for b in batches:
    width = max(lengths[i] for i in b)
    assert len(b) <= max_batch_size
    assert len(b) * width <= batch_tokens or len(b) == 1


@pytest.mark.parametrize("overhead", [0, 256, 10**9])
@pytest.mark.parametrize("seed", [0, 1])
def test_plan_is_a_partition_within_budget(seed, overhead):
  lengths = datacomp_like_lengths(3000, seed) + [500, 1, 77]  # one longer than the budget
  batches = plan_batches(lengths, 400, 64, overhead)
  check_partition(lengths, batches, 400, 64)


def test_overhead_trades_padding_for_batches():
  lengths = datacomp_like_lengths(5000)
  exact = plan_batches(lengths, 16384, 4096, overhead_tokens=0)
  assert padding_waste(lengths, exact) == 0.0  # one length per batch
  full = plan_batches(lengths, 16384, 4096, overhead_tokens=10**9)
  assert len(full) <= len(exact) and padding_waste(lengths, full) > 0.05
  assert len(full) == fewest_batches(lengths, 16384, 4096)


def fewest_batches(lengths, batch_tokens, max_batch_size):
  """Filling each batch to the budget, longest texts first, needs the fewest batches."""
  count, size, width = 0, 0, 0
  for n in sorted(lengths, reverse=True):
    if size and ((size + 1) * width > batch_tokens or size >= max_batch_size):
      size = 0
    if size == 0:
      count, width = count + 1, n
    size += 1
  return count


def test_padding_waste_on_datacomp_like_lengths():
  lengths = datacomp_like_lengths(10000)
  batches = plan_batches(lengths, 16384, 4096)  # the defaults of embed/config.py
  waste = padding_waste(lengths, batches)
  print(f"\nDataComp-like lengths (10k, median 13 tokens): padding waste {waste:.2%} "
        f"in {len(batches)} batches (ideal {sum(lengths) / 16384:.1f})")
  assert waste < 0.10
  assert len(batches) < 4 * sum(lengths) / 16384 + 10


def test_padding_waste_on_flickr_captions(minilm_path):
  path = shared_data("flickr8k_subset", "captions.tsv")
  with open(path, encoding="utf-8", newline="") as f:
    texts = [r[2] for r in list(csv.reader(f, delimiter="\t"))[1:]]
  enc = encoders.build_encoder("mean", encoders.resolve_model(minilm_path), "", "float32",
                               encoders.resolve_device("cpu", 0), "", 77, False, "", False)
  lengths = enc.prepare(texts).lengths
  for per_shard in (1000, 5000):
    shards = [lengths[i:i + per_shard] for i in range(0, len(lengths), per_shard)]
    tokens = padded = 0
    for ls in shards:
      for b in plan_batches(ls, 16384, 4096):
        tokens += sum(ls[i] for i in b)
        padded += len(b) * max(ls[i] for i in b)
    waste = 1 - tokens / padded
    print(f"\nFlickr8k captions, shards of {per_shard}: padding waste {waste:.2%}")
    assert waste < 0.10


class Echo(encoders.Encoder):
  """Returns, for each text, its own number: a wrong order would show."""
  dim = 2

  def prepare(self, texts):
    return encoders.Prepared(list(texts), [int(t.split()[1]) for t in texts], [False] * len(texts))

  def encode(self, inputs):
    return np.array([[float(t.split()[0]), 1.0] for t in inputs], np.float32)


def test_results_come_back_in_the_original_order():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 60, 200)
  items = [Item(str(i), f"{i} {n}") for i, n in enumerate(lengths)]
  items[7] = Item("7", "", "empty")
  cfg = minilm_config("unused", normalize=False, batch_tokens=256)
  result = job.embed_items(Echo(), items, cfg, "test")
  want = np.arange(200, dtype=np.float32)
  want[7] = 0
  np.testing.assert_array_equal(result.vectors[:, 0], want)
  assert result.flags[7] == "empty" and result.flags.count("") == 199
  assert result.stats.tokens == int(lengths.sum() - lengths[7])
