"""``long_retrieval``: long-caption image <-> text retrieval (Urban1k, DOCCI, ShareGPT4V-1k), one
caption per image, each benchmark read in its released layout:

  * ``urban1k`` (Long-CLIP, arXiv 2403.15378; hub dataset BeichenZhang/Urban1k): ``image/<id>.jpg``
    and ``caption/<id>.txt``; an image's caption is the first line of its text file, as
    Long-CLIP's ``eval/retrieval/Urban1k.py`` reads it (1,000 pairs).
  * ``docci`` (Onoe et al., arXiv 2404.19753; google/docci): ``docci_descriptions.jsonlines``, one
    JSON object per line with ``example_id``, ``split``, ``image_file`` and ``description``, and the
    images (``docci_images.tar.gz``) in ``images/``; retrieval uses the ``test`` split (5,000
    images), as the long-caption results of LLM2CLIP (arXiv 2411.04997) and FLAME
    (arXiv 2411.11927) do.
  * ``sharegpt4v`` (ShareGPT4V, arXiv 2311.12793; hub dataset Lin-Chen/ShareGPT4V): the first 1,000
    records of ``share-captioner_coco_lcs_sam_1246k_1107.json``, caption
    ``conversations[1]["value"]`` with newlines replaced by spaces, image path ``image`` relative
    to the data folder: Long-CLIP's ``share4v_val_dataset`` (``train/sharegpt4v.py``; Long-CLIP
    trains on the records after them), reported as ShareGPT4V-1k by Long-CLIP and LLM2CLIP.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from eval import texts as T
from eval.benchmarks import retrieval
from eval.benchmarks.base import BenchmarkConfigError, as_tuple, field, require_file

logger = logging.getLogger(__name__)

LONG_FORMATS = ("urban1k", "docci", "sharegpt4v")
DOCCI_FILE = "docci_descriptions.jsonlines"
SHAREGPT4V_FILE = "share-captioner_coco_lcs_sam_1246k_1107.json"


def _urban1k_pairs(name: str, caption_dir: str, image_dir: str) -> list[tuple[str, list[str]]]:
  pairs = []
  for file in sorted(f for f in os.listdir(caption_dir) if f.endswith(".txt")):
    path = os.path.join(caption_dir, file)
    with open(path, encoding="utf-8") as f:
      first = f.readline().strip()  # the first line, without its end and edge spaces
    if not first:
      raise BenchmarkConfigError(f"benchmark {name!r}: {path} has no caption on its first line")
    pairs.append((os.path.join(image_dir, file[:-len(".txt")] + ".jpg"), [first]))
  if not pairs:
    raise BenchmarkConfigError(f"benchmark {name!r}: {caption_dir} holds no <image>.txt captions")
  return pairs


def _docci_pairs(name: str, path: str, image_dir: str, split: str) -> list[tuple[str, list[str]]]:
  pairs = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
        if r["split"] == split:
          pairs.append((os.path.join(image_dir, r["image_file"]), [r["description"]]))
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise BenchmarkConfigError(
            f"benchmark {name!r}: {path} line {n + 1} is not a DOCCI record with 'split', "
            f"'image_file' and 'description' ({type(e).__name__}: {e})") from None
  if not pairs:
    raise BenchmarkConfigError(f"benchmark {name!r}: {path} has no rows with split {split!r}")
  return pairs


def _sharegpt4v_pairs(name: str, path: str, image_dir: str, first: int
                      ) -> list[tuple[str, list[str]]]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise BenchmarkConfigError(f"benchmark {name!r}: {path} is not valid JSON ({e})") from None
  if not isinstance(data, list) or len(data) < first:
    raise BenchmarkConfigError(
        f"benchmark {name!r}: {path} must be a JSON list of at least first={first} records, "
        f"it has {len(data) if isinstance(data, list) else type(data).__name__}")
  pairs = []
  for n, r in enumerate(data[:first]):
    try:
      caption = r["conversations"][1]["value"].replace("\n", " ")
      pairs.append((os.path.join(image_dir, r["image"]), [caption]))
    except (KeyError, IndexError, TypeError, AttributeError):
      raise BenchmarkConfigError(
          f"benchmark {name!r}: {path} record {n} lacks 'image' or the caption at "
          "conversations[1].value") from None
  return pairs


@dataclasses.dataclass(frozen=True)
class Spec:
  name: str
  format: str | None = field(None, "'urban1k', 'docci' or 'sharegpt4v' (required)")
  data_dir: str | None = field(None, "the benchmark's folder (urban1k: image/ and caption/; "
                               "docci: docci_descriptions.jsonlines and images/; sharegpt4v: "
                               "the folder the JSON's image paths are relative to) (required)",
                               path=True)
  captions: str | None = field(None, "docci: the descriptions file; sharegpt4v: the caption "
                               "JSON (defaults inside data_dir)", path=True)
  image_dir: str | None = field(None, "default by format: data_dir/image, data_dir/images, "
                                "data_dir", path=True)
  split: str = field("test", "docci: rows of this split (5,000 test images)")
  first: int = field(1000, "sharegpt4v: the first N records form the benchmark")
  max_length: int = field(512, "tokens a LIFT text bank should embed these captions at; a bank "
                          "made shorter is reported")
  ks: tuple[int, ...] = field((1, 5), "recall cut-offs")
  limit: int | None = field(None, "score only the first N images")
  skip_missing: bool = field(False, "True: missing images are skipped and counted; False: error")
  shards = None  # images come from files (the retrieval evaluator's other source)

  def __post_init__(self):
    if self.format not in LONG_FORMATS:
      raise BenchmarkConfigError(f"benchmark {self.name!r}: format must be one of {LONG_FORMATS}, "
                                 f"got {self.format!r}")
    object.__setattr__(self, "ks", tuple(int(k) for k in as_tuple(self.ks)))
    root = require_file(self.name, "data_dir", self.data_dir)
    if self.format == "urban1k":
      captions, images = os.path.join(root, "caption"), os.path.join(root, "image")
    elif self.format == "docci":
      captions, images = os.path.join(root, DOCCI_FILE), os.path.join(root, "images")
    else:
      captions, images = os.path.join(root, SHAREGPT4V_FILE), root
    object.__setattr__(self, "captions", require_file(self.name, "captions",
                                                       self.captions or captions))
    object.__setattr__(self, "image_dir", self.image_dir or images)

  def image_captions(self) -> list[tuple[str, list[str]]]:
    """[(image path, [its caption])] in the benchmark's order, limited."""
    if self.format == "urban1k":
      pairs = _urban1k_pairs(self.name, self.captions, self.image_dir)
    elif self.format == "docci":
      pairs = _docci_pairs(self.name, self.captions, self.image_dir, self.split)
    else:
      pairs = _sharegpt4v_pairs(self.name, self.captions, self.image_dir, int(self.first))
    return pairs[:self.limit] if self.limit else pairs

  def texts(self) -> list[str]:
    return T.unique(c for _, caps in self.image_captions() for c in caps)


class Evaluator(retrieval.Evaluator):
  """Retrieval with long captions (Urban1k, DOCCI, ShareGPT4V-1k), plus what the text side could
  read of them: a CLIP model reports ``num_texts_truncated`` (captions longer than its context,
  counted with its tokenizer) and ``num_context_tokens``; a LIFT model reports its text bank's
  max_length as ``num_bank_max_tokens`` and warns when the bank was embedded shorter than the
  spec's ``max_length``."""

  _truncated: int | None = None  # captions longer than the CLIP context, counted once

  def run(self, predictor) -> dict[str, float]:
    out = super().run(predictor)
    mode = getattr(predictor, "mode", None)
    if mode == "clip":
      lengths = getattr(predictor.tokenizer, "lengths", None)
      if lengths is not None:
        if self._truncated is None:  # the captions and the tokenizer never change
          self._truncated = sum(int(k > predictor.context_length) for k in lengths(self._texts))
        n = self._truncated
        out[f"{self.name}/num_texts_truncated"] = float(n)
        out[f"{self.name}/num_context_tokens"] = float(predictor.context_length)
        if n:
          logger.info("%s: %d of %d captions are longer than the text tower's context (%d "
                      "tokens) and were cut", self.name, n, len(self._texts),
                      predictor.context_length)
    elif mode == "lift":
      bank = predictor.text_bank
      made_at = (bank.manifest.get("max_length") if bank is not None else None)
      if made_at is not None:
        out[f"{self.name}/num_bank_max_tokens"] = float(made_at)
        if int(made_at) < self.spec.max_length:
          logger.warning("%s: the text bank %s embedded texts at max_length %s, shorter than the "
                         "%d this benchmark's captions call for; re-embed them with "
                         "--config.max_length=%d", self.name, bank.folder, made_at,
                         self.spec.max_length, self.spec.max_length)
    return out
