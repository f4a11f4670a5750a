"""Start-up races: what reader threads load on their first example is loaded once, safely.

transformers resolves its names lazily and not thread-safely: threads importing
``AutoTokenizer`` at the same moment in a fresh interpreter fail with ImportError. The CLIP
pipeline's reader threads all ask for the tokenizer on their first example, so the tokenizer is
loaded before they start, and behind a lock in each worker process.
"""

import json
import subprocess
import sys

import os

import numpy as np
import pytest

import fakedata
from conftest import REPO
from lift_jax.data import pipeline
from lift_jax.data.tokenizer import TokenizerError

THREADS = r"""
import json, sys, threading
from lift_jax.data.tokenizer import get_tokenizer

n = int(sys.argv[2])
barrier = threading.Barrier(n)
errors, outputs = [], []

def first_example():
  barrier.wait()  # every thread asks at the same moment, as grain's readers do
  try:
    outputs.append(get_tokenizer(sys.argv[1], 16)(["a red circle above a blue square"]).tolist())
  except Exception as e:
    errors.append(f"{type(e).__name__}: {e}")

threads = [threading.Thread(target=first_example) for _ in range(n)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"errors": errors, "distinct": len({json.dumps(o) for o in outputs})}))
"""


def test_threads_loading_the_tokenizer_at_once_never_fail(minilm_path):
  """16 threads of a fresh interpreter ask for it at once (without the lock, most fail)."""
  for _ in range(3):
    out = subprocess.run([sys.executable, "-c", THREADS, minilm_path, "16"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"errors": [], "distinct": 1}, result


def test_clip_pipeline_with_many_reader_threads_starts_every_time(tmp_path, minilm_path):
  """The first batches of a CLIP pipeline read by 4 threads (the issue's failing setting), from
  fresh processes: the same tokens every time."""
  data = fakedata.write_dataset(str(tmp_path), n=32, shards=2, dim=16)
  code = (f"import sys, json; sys.path.insert(0, {REPO + '/tests'!r})\n"
          "import numpy as np, fakedata\n"
          "from lift_jax.data import pipeline\n"
          f"c = fakedata.tiny_config({data[0]!r}, None, mode='clip', tokenizer={minilm_path!r})\n"
          "c.data.read_threads = 4\n"
          "it = iter(pipeline.train_dataset(c))\n"
          "print(json.dumps([next(it)['text'].tolist() for _ in range(2)]))\n")
  runs = []
  for _ in range(3):
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  assert runs[0] == runs[1] == runs[2]
  assert np.asarray(runs[0]).shape == (2, 16, 16) and np.asarray(runs[0]).max() > 102


def test_a_tokenizer_that_cannot_be_loaded_is_one_error_before_any_thread(tmp_path):
  data = fakedata.write_dataset(str(tmp_path), n=16, shards=1, dim=16)
  c = fakedata.tiny_config(data[0], None, mode="clip", tokenizer=str(tmp_path / "no-such"))
  with pytest.raises(TokenizerError, match=f"data.tokenizer='{tmp_path}/no-such' cannot be "
                     "loaded"):
    pipeline.train_dataset(c)
