"""Benchmark configs, checked and typed, and what each one scores; no JAX here.

``config.evals.benchmarks`` maps a name to a mapping with a ``type`` and that type's fields.
:func:`parse` turns one entry into a spec (an unknown or missing field is an error naming the
benchmark); a spec lists its images and the exact texts it scores. The evaluators
(:mod:`eval.evaluators`) run the specs; :func:`required_texts` lists, without JAX, the texts a
LIFT text bank must hold. It is the one way the texts of evaluation are listed: ``eval.main
--write_texts``, data preparation and ``embed.banks`` all call it.

Types and fields (None = default)
---------------------------------
``sugarcrepe``  SugarCrepe, or any suite in its schema (the synthetic compositional set).
    data_dir      folder of ``<subset>.json`` files                                   (required)
    image_dir     folder the records' ``filename`` is relative to (COCO val2017)     (required)
    subsets       which files, default the seven SugarCrepe subsets
    limit         score only the first N records of each subset
    skip_missing  False: a missing image is an error; True: its records are skipped and counted
``zeroshot``  classification by text prompts; one image source of:
    labels + image_dir   a TSV ``filename<TAB>class_index`` (header optional) and its image folder
    image_dir            an ImageFolder ``image_dir/<wnid>/*``; classes = ``wnids`` file order, or
                         the sorted sub-folders (their count must equal the class names')
    shards               a folder of ``images-*.array_record`` whose records hold ``label_field``
    tfds_data_dir        tensorflow-datasets ``tfds_name`` (imagenet2012) ``tfds_split``
                         (validation), prepared in that local folder; nothing is downloaded
    classnames, templates  files, one per line; ``{}`` in a template marks the name    (required)
    protocol      "lift" (exactly one template, e.g. "It is a photo of a {}" + Keras names),
                  "openai" (the 80 templates, averaged) or "custom" (default); a label that is
                  checked, the files decide the prompts
    top_k         default (1, 5);  limit, skip_missing as above
``retrieval``  image <-> text retrieval; one source of:
    captions + image_dir  COCO ``captions_*.json``, Flickr30K ``flickr_annotations_30k.csv``,
                          or a TSV/CSV/JSONL captions file (see :mod:`eval.texts`)
    shards                image shards whose records hold ``caption_field`` (str or list)
    split         rows of this split when the captions file has a split column (default "test";
                  Flickr30K's 1k test set; "" = all rows); ignored by files without one
    protocol      "lift" (first caption per image, R@1) or "standard" (all captions, R@1/5/10)
    ks            recall cut-offs, default by protocol;  limit (first N images), skip_missing
``long_retrieval``  long-caption image <-> text retrieval, one caption per image, each benchmark
    in its released layout (:class:`LongRetrievalSpec` cites where each layout is defined):
    format        "urban1k", "docci" or "sharegpt4v"                                   (required)
    data_dir      the benchmark's folder (urban1k: holds image/ and caption/; docci: holds
                  docci_descriptions.jsonlines and images/; sharegpt4v: the folder the JSON's
                  image paths are relative to)                                         (required)
    captions      docci: the descriptions file (default data_dir/docci_descriptions.jsonlines);
                  sharegpt4v: the caption JSON (default data_dir/
                  share-captioner_coco_lcs_sam_1246k_1107.json)
    image_dir     default by format (data_dir/image, data_dir/images, data_dir)
    split         docci: rows of this split (default "test", 5,000 images)
    first         sharegpt4v: the first N records form the benchmark (default 1000)
    max_length    tokens a LIFT text bank should embed these captions at (default 512); a bank
                  made shorter is reported. CLIP reports how many captions its context cut.
    ks            default (1, 5);  limit, skip_missing as above
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping

from eval import texts as T
from lift_jax import cli

ZEROSHOT_PROTOCOLS = ("lift", "openai", "custom")
# The prompt files of each ImageNet protocol, in a folder such as ../shared/data/imagenet.
IMAGENET_PROMPT_FILES = {"lift": ("classnames_keras.txt", "templates_lift.txt"),
                         "openai": ("classnames.txt", "templates.txt")}
RETRIEVAL_PROTOCOLS = ("lift", "standard")


@cli.user_error
class BenchmarkConfigError(ValueError):
  """A benchmark entry of the config is wrong; the message names the benchmark and field."""


def _as_dict(cfg: Any) -> dict[str, Any]:
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  return dict(cfg)


def _tuple(value) -> tuple:
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  return tuple(value)


def _require_file(name: str, field: str, path: str | None) -> str:
  if not path:
    raise BenchmarkConfigError(f"benchmark {name!r}: field {field!r} is required")
  if not os.path.exists(path):
    raise BenchmarkConfigError(f"benchmark {name!r}: {field} {path} does not exist")
  return path


def shard_records(folder: str, fields: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
  """(key, {field: value}) of every record in a folder of image shards, in shard order."""
  from lift_jax.data import records  # JAX-free

  for path in records.list_shards(folder, records.IMAGES):
    for n, record in enumerate(records.iter_records(path)):
      missing = [f for f in fields if f not in record]
      if missing:
        raise BenchmarkConfigError(f"{path} record {n} (key {record['key']!r}) has no field "
                                   f"{missing[0]!r}")
      yield record["key"], {f: record[f] for f in fields}


@dataclasses.dataclass(frozen=True)
class SugarCrepeSpec:
  name: str
  data_dir: str | None = None
  image_dir: str | None = None
  subsets: tuple[str, ...] = T.SUGARCREPE_SUBSETS
  limit: int | None = None
  skip_missing: bool = False
  type: str = "sugarcrepe"

  def __post_init__(self):
    object.__setattr__(self, "subsets", _tuple(self.subsets))
    _require_file(self.name, "data_dir", self.data_dir)

  def rows(self) -> dict[str, list[tuple[str, str, str]]]:
    """{subset: [(image filename, positive caption, negative caption)]}, limited."""
    rows = T.read_sugarcrepe(self.data_dir, self.subsets)
    return {s: r[:self.limit] if self.limit else r for s, r in rows.items()}

  def texts(self) -> list[str]:
    return T.unique(t for rows in self.rows().values() for _, pos, neg in rows for t in (pos, neg))


@dataclasses.dataclass(frozen=True)
class ZeroShotSpec:
  name: str
  classnames: str | None = None
  templates: str | None = None
  protocol: str = "custom"
  image_dir: str | None = None
  labels: str | None = None
  wnids: str | None = None
  shards: str | None = None
  label_field: str = "label"
  tfds_data_dir: str | None = None
  tfds_name: str = "imagenet2012"
  tfds_split: str = "validation"
  top_k: tuple[int, ...] = (1, 5)
  limit: int | None = None
  skip_missing: bool = False
  texts_only: bool = False  # parse(..., texts_only=True): listing texts needs no image source
  type: str = "zeroshot"

  def __post_init__(self):
    object.__setattr__(self, "top_k", tuple(int(k) for k in _tuple(self.top_k)))
    if self.protocol not in ZEROSHOT_PROTOCOLS:
      raise BenchmarkConfigError(f"benchmark {self.name!r}: protocol must be one of "
                                 f"{ZEROSHOT_PROTOCOLS}, got {self.protocol!r}")
    _require_file(self.name, "classnames", self.classnames)
    _require_file(self.name, "templates", self.templates)
    templates = T.read_lines(self.templates)
    if not templates or any("{}" not in t for t in templates):
      raise BenchmarkConfigError(f"benchmark {self.name!r}: every template in {self.templates} "
                                 "needs a '{}' for the class name")
    if self.protocol == "lift" and len(templates) != 1:
      raise BenchmarkConfigError(
          f"benchmark {self.name!r}: the LIFT protocol uses one template, {self.templates} has "
          f"{len(templates)} (use protocol='openai' or 'custom' for ensembles)")
    if not self.texts_only:
      self.source  # checks that exactly one image source is given

  @property
  def source(self) -> str:
    given = [s for s, on in (("tfds", self.tfds_data_dir), ("shards", self.shards),
                             ("labels", self.labels)) if on]
    if len(given) > 1:
      raise BenchmarkConfigError(f"benchmark {self.name!r}: give one image source, not {given}")
    if given:
      return given[0]
    if self.image_dir:
      return "folder"
    raise BenchmarkConfigError(f"benchmark {self.name!r}: needs an image source: labels + "
                               "image_dir, image_dir (ImageFolder), shards or tfds_data_dir")

  def classnames_list(self) -> list[str]:
    return T.read_lines(self.classnames)

  def prompts(self) -> list[list[str]]:
    """[[prompt per template] per class]."""
    return T.class_prompts(self.classnames_list(), T.read_lines(self.templates))

  def texts(self) -> list[str]:
    return T.unique(p for ps in self.prompts() for p in ps)

  def file_examples(self) -> list[tuple[str, int]]:
    """[(image path, class index)] for the labels and ImageFolder sources."""
    n_classes = len(self.classnames_list())
    if self.source == "labels":
      if not self.image_dir:
        raise BenchmarkConfigError(f"benchmark {self.name!r}: labels needs image_dir")
      rows = T.read_labels(_require_file(self.name, "labels", self.labels))
    elif self.source == "folder":
      root = _require_file(self.name, "image_dir", self.image_dir)
      dirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
      wnids = T.read_lines(_require_file(self.name, "wnids", self.wnids)) if self.wnids else None
      if wnids is None and len(dirs) != n_classes:
        raise BenchmarkConfigError(
            f"benchmark {self.name!r}: {root} has {len(dirs)} class folders but {self.classnames} "
            f"has {n_classes} names; give `wnids` (one folder name per class, in class order)")
      if wnids is not None:
        if len(wnids) != n_classes:
          raise BenchmarkConfigError(f"benchmark {self.name!r}: {self.wnids} has {len(wnids)} "
                                     f"lines but {self.classnames} has {n_classes}")
        unknown = sorted(set(dirs) - set(wnids))
        if unknown:
          raise BenchmarkConfigError(f"benchmark {self.name!r}: folders {unknown[:5]} of {root} "
                                     f"are not in {self.wnids}")
      rows = T.image_folder_labels(root, wnids)
    else:
      raise BenchmarkConfigError(f"benchmark {self.name!r}: source {self.source} has no files")
    bad = [(f, c) for f, c in rows if not 0 <= c < n_classes]
    if bad:
      raise BenchmarkConfigError(f"benchmark {self.name!r}: class index {bad[0][1]} of "
                                 f"{bad[0][0]} is outside the {n_classes} class names")
    rows = rows[:self.limit] if self.limit else rows
    return [(os.path.join(self.image_dir, f), c) for f, c in rows]


@dataclasses.dataclass(frozen=True)
class RetrievalSpec:
  name: str
  captions: str | None = None
  image_dir: str | None = None
  shards: str | None = None
  caption_field: str = "caption"
  split: str | None = "test"
  protocol: str = "standard"
  ks: tuple[int, ...] | None = None
  limit: int | None = None
  skip_missing: bool = False
  texts_only: bool = False
  type: str = "retrieval"

  def __post_init__(self):
    if self.protocol not in RETRIEVAL_PROTOCOLS:
      raise BenchmarkConfigError(f"benchmark {self.name!r}: protocol must be one of "
                                 f"{RETRIEVAL_PROTOCOLS}, got {self.protocol!r}")
    ks = self.ks if self.ks is not None else ((1,) if self.protocol == "lift" else (1, 5, 10))
    object.__setattr__(self, "ks", tuple(int(k) for k in _tuple(ks)))
    if bool(self.captions) == bool(self.shards):
      raise BenchmarkConfigError(f"benchmark {self.name!r}: give either captions + image_dir "
                                 "or shards")
    if self.captions:
      _require_file(self.name, "captions", self.captions)
      if not self.image_dir and not self.texts_only:
        raise BenchmarkConfigError(f"benchmark {self.name!r}: captions needs image_dir")

  def _select(self, caps: list[str]) -> list[str]:
    return caps[:1] if self.protocol == "lift" else list(caps)

  def image_captions(self) -> list[tuple[str, list[str]]]:
    """[(image path or shard key, [captions scored])] in file order, limited; images without
    captions are left out (they could never be retrieved)."""
    if self.captions:
      pairs = [(os.path.join(self.image_dir or "", f), self._select(c))
               for f, c in T.read_captions(self.captions, self.split or None).items()]
    else:
      pairs = []
      for key, r in shard_records(self.shards, (self.caption_field,)):
        value = r[self.caption_field]
        pairs.append((key, self._select([value] if isinstance(value, str) else list(value))))
    pairs = [(k, c) for k, c in pairs if c]
    return pairs[:self.limit] if self.limit else pairs

  def texts(self) -> list[str]:
    return T.unique(c for _, caps in self.image_captions() for c in caps)


SPECS = {"sugarcrepe": SugarCrepeSpec, "zeroshot": ZeroShotSpec, "retrieval": RetrievalSpec}


# --------------------------------------------------------------------------------------------
# Long-caption retrieval (Urban1k, DOCCI, ShareGPT4V-1k)
# --------------------------------------------------------------------------------------------

LONG_FORMATS = ("urban1k", "docci", "sharegpt4v")
DOCCI_FILE = "docci_descriptions.jsonlines"
SHAREGPT4V_FILE = "share-captioner_coco_lcs_sam_1246k_1107.json"


def _urban1k_pairs(name: str, caption_dir: str, image_dir: str) -> list[tuple[str, list[str]]]:
  pairs = []
  for file in sorted(f for f in os.listdir(caption_dir) if f.endswith(".txt")):
    path = os.path.join(caption_dir, file)
    with open(path, encoding="utf-8") as f:
      first = f.readline().rstrip("\n").rstrip("\r").strip()
    if not first:
      raise BenchmarkConfigError(f"benchmark {name!r}: {path} has no caption on its first line")
    pairs.append((os.path.join(image_dir, file[:-len(".txt")] + ".jpg"), [first]))
  if not pairs:
    raise BenchmarkConfigError(f"benchmark {name!r}: {caption_dir} holds no <image>.txt captions")
  return pairs


def _docci_pairs(name: str, path: str, image_dir: str, split: str) -> list[tuple[str, list[str]]]:
  import json

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
  import json

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
class LongRetrievalSpec:
  """One caption per image, retrieved both ways, in each benchmark's released layout.

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

  name: str
  format: str | None = None
  data_dir: str | None = None
  captions: str | None = None
  image_dir: str | None = None
  split: str = "test"
  first: int = 1000
  max_length: int = 512
  ks: tuple[int, ...] = (1, 5)
  limit: int | None = None
  skip_missing: bool = False
  type: str = "long_retrieval"
  shards = None  # images come from files (the retrieval evaluator's other source)

  def __post_init__(self):
    if self.format not in LONG_FORMATS:
      raise BenchmarkConfigError(f"benchmark {self.name!r}: format must be one of {LONG_FORMATS}, "
                                 f"got {self.format!r}")
    object.__setattr__(self, "ks", tuple(int(k) for k in _tuple(self.ks)))
    root = _require_file(self.name, "data_dir", self.data_dir)
    if self.format == "urban1k":
      captions, images = os.path.join(root, "caption"), os.path.join(root, "image")
    elif self.format == "docci":
      captions, images = os.path.join(root, DOCCI_FILE), os.path.join(root, "images")
    else:
      captions, images = os.path.join(root, SHAREGPT4V_FILE), root
    object.__setattr__(self, "captions", _require_file(self.name, "captions",
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


SPECS["long_retrieval"] = LongRetrievalSpec


def parse(name: str, cfg: Mapping[str, Any], texts_only: bool = False):
  """The spec of one ``config.evals.benchmarks`` entry; ``texts_only`` specs serve to list
  texts and need no image source."""
  d = _as_dict(cfg)
  d.pop("if_present", None)  # read by lift_jax.config_lib.resolve_eval_paths
  kind = d.pop("type", None)
  if kind not in SPECS:
    raise BenchmarkConfigError(f"benchmark {name!r}: type must be one of {sorted(SPECS)}, "
                               f"got {kind!r}")
  cls = SPECS[kind]
  fields = {f.name for f in dataclasses.fields(cls)}
  known = fields - {"name", "type", "texts_only"}
  unknown = sorted(set(d) - known)
  if unknown:
    raise BenchmarkConfigError(f"benchmark {name!r} (type {kind}): unknown field(s) {unknown}; "
                               f"known: {sorted(known)}")
  extra = {"texts_only": True} if texts_only and "texts_only" in fields else {}
  return cls(name=name, **{k: v for k, v in d.items() if v is not None}, **extra)


def parse_all(benchmarks: Mapping[str, Any] | None, texts_only: bool = False) -> list:
  """Specs of every entry of ``config.evals.benchmarks``, in the config's order."""
  return [parse(name, cfg, texts_only) for name, cfg in _as_dict(benchmarks or {}).items()]


def required_texts(evals_config) -> list[str]:
  """Every text the benchmarks of ``config.evals`` (or of a whole config) score, each once, in
  benchmark order.

  A LIFT text bank built from this list serves all of them: ``python -m eval.main
  --config=CONFIG --write_texts=FILE`` (or ``python -m embed.banks``) writes it, and
  ``python -m embed.main --config=embed/configs/<encoder>.py --config.texts=FILE
  --config.output=DIR`` embeds it.
  """
  if hasattr(evals_config, "to_dict"):
    evals_config = evals_config.to_dict()
  if "benchmarks" not in evals_config and "evals" in evals_config:
    evals_config = evals_config["evals"]
  specs = parse_all(evals_config.get("benchmarks"))
  return T.unique(t for spec in specs for t in spec.texts())


def imagenet_benchmark(folder: str, protocol: str) -> dict[str, Any]:
  """The texts-only entry of ImageNet's prompts under ``protocol`` (lift | openai), read from a
  folder holding :data:`IMAGENET_PROMPT_FILES`."""
  if protocol not in IMAGENET_PROMPT_FILES:
    raise BenchmarkConfigError(f"unknown ImageNet protocol {protocol!r}; expected one of "
                               f"{sorted(IMAGENET_PROMPT_FILES)}")
  classnames, templates = IMAGENET_PROMPT_FILES[protocol]
  return {"type": "zeroshot", "protocol": protocol,
          "classnames": os.path.join(folder, classnames),
          "templates": os.path.join(folder, templates)}
