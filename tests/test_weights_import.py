"""Reading a Hugging Face CLIP checkpoint, piece by piece: where the folder comes from (a path or
the local hub cache), what is a checkpoint, the config.json's sections and the problems named in
it, and the renaming of transformers' tensors to OpenCLIP's, checked against the tensors of a
transformers model (its own names and values)."""

import json
import os
import random

import numpy as np
import pytest

from conftest import require
from lift_jax.models import weights

torch = require("torch")
transformers = require("transformers")


def clip_state(seed=0):
  """A tiny transformers CLIPModel's state dict as numpy (2 vision layers, 1 text layer)."""
  torch.manual_seed(seed)
  model = transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, image_size=16, patch_size=8, hidden_act="gelu"),
      text_config=dict(vocab_size=30, hidden_size=12, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=8, hidden_act="gelu"),
      projection_dim=8))
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# the renaming


def test_tensors_are_renamed_whatever_order_the_file_lists_them_in():
  state = clip_state()
  state["text_model.embeddings.position_ids"] = np.arange(8)[None]  # a buffer some files hold
  names = sorted(state)
  orders = [names, names[::-1]] + [random.Random(s).sample(names, len(names)) for s in range(3)]
  results = [weights.hf_clip_to_openclip({k: state[k] for k in order}) for order in orders]
  for out in results[1:]:
    assert sorted(out) == sorted(results[0])
    for k in out:
      np.testing.assert_array_equal(out[k], results[0][k])
  out = results[0]
  assert not [k for k in out if "position_ids" in k]
  # Each tower's attention: q, k and v of transformers' own tensors, stacked in that order.
  for tower, prefix, depth in (("vision", "visual.", 2), ("text", "", 1)):
    for i in range(depth):
      for kind in ("weight", "bias"):
        parts = [state[f"{tower}_model.encoder.layers.{i}.self_attn.{x}_proj.{kind}"]
                 for x in "qkv"]
        np.testing.assert_array_equal(
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"], np.concatenate(parts))
      np.testing.assert_array_equal(out[f"{prefix}transformer.resblocks.{i}.mlp.c_fc.weight"],
                                    state[f"{tower}_model.encoder.layers.{i}.mlp.fc1.weight"])
  assert not [k for k in out if k.startswith("visual.transformer.resblocks.2")]
  np.testing.assert_array_equal(out["visual.proj"], state["visual_projection.weight"].T)
  np.testing.assert_array_equal(out["text_projection"], state["text_projection.weight"].T)
  np.testing.assert_array_equal(out["token_embedding.weight"],
                                state["text_model.embeddings.token_embedding.weight"])


def test_names_no_map_knows_are_kept_for_convert_to_report():
  value = np.ones((2, 3), np.float32)
  out = weights.hf_clip_to_openclip({"some.other.tensor": value,
                                     "vision_model.encoder.layers.0.self_attn.new.weight": value})
  assert set(out) == {"some.other.tensor", "vision_model.encoder.layers.0.self_attn.new.weight"}
  assert all(v is value for v in out.values())


def test_a_layer_without_one_of_q_k_v_is_named():
  state = clip_state()
  del state["text_model.encoder.layers.0.self_attn.k_proj.bias"]
  with pytest.raises(weights.StateDictError) as e:
    weights.hf_clip_to_openclip(state)
  assert str(e.value) == ("transformer.resblocks.0.attn: the checkpoint has no "
                          "self_attn.k_proj.bias for this layer (q, k and v are all needed)")


def test_training_wrappers_are_taken_off():
  """A PyTorch checkpoint may wrap its state dict ({"state_dict": ...}) and prefix its names with
  DataParallel's "module."; both come off, nothing else does."""
  a, b = np.zeros(2), np.ones(3)
  assert weights.strip_wrappers({"state_dict": {"module.visual.proj": a, "logit_scale": b},
                                 "epoch": 3}) == {"visual.proj": a, "logit_scale": b}
  assert weights.strip_wrappers({"visual.module.x": a, "module.module.y": b}) == {
      "visual.module.x": a, "module.y": b}
  kept = {"state_dict": "a note, not tensors", "proj": a}
  assert weights.strip_wrappers(kept) == kept
  with pytest.raises(weights.StateDictError) as e:
    weights.strip_wrappers([a, b])
  assert str(e.value) == ("expected a state dict (mapping of names to tensors), got "
                          "<class 'list'>")


# ------------------------------------------------------------------------------------------------
# what is a checkpoint, and where its folder is


def test_what_counts_as_a_hugging_face_checkpoint(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "with").mkdir()
  (tmp_path / "with" / "config.json").write_text("{}")
  (tmp_path / "without").mkdir()
  (tmp_path / "org").mkdir()
  (tmp_path / "org" / "name").write_text("a file, not a hub id")
  assert weights.is_hf_checkpoint("with")
  assert not weights.is_hf_checkpoint("without")
  assert not weights.is_hf_checkpoint("org/name")  # exists: a path, not a hub id
  assert weights.is_hf_checkpoint("openai/clip-vit-base-patch16")  # not a path: a hub id
  assert not weights.is_hf_checkpoint("not/a/hub/id")
  assert not weights.is_hf_checkpoint("plain-name")


def fake_cache(root, repo_id, files):
  """The hub cache's layout for one model: refs/main naming a snapshot that holds ``files``."""
  folder = root / ("models--" + repo_id.replace("/", "--"))
  commit = "0123456789abcdef0123456789abcdef01234567"
  (folder / "refs").mkdir(parents=True)
  (folder / "refs" / "main").write_text(commit)
  snapshot = folder / "snapshots" / commit
  snapshot.mkdir(parents=True)
  for name, text in files.items():
    (snapshot / name).write_text(text)
  return snapshot


def test_a_hub_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
  import huggingface_hub.constants

  cache = tmp_path / "hub"
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  snapshot = fake_cache(cache, "someone/tiny-clip", {"config.json": json.dumps(
      {"model_type": "clip_vision_model", "hidden_size": 64})})
  assert os.path.realpath(weights.hf_folder("someone/tiny-clip")) == os.path.realpath(snapshot)
  assert weights.hf_config_file("someone/tiny-clip")["hidden_size"] == 64
  assert weights.hf_folder(str(tmp_path)) == str(tmp_path)  # a folder is itself
  with pytest.raises(weights.StateDictError) as e:
    weights.hf_folder("someone/not-cached")
  assert str(e.value) == (
      "someone/not-cached: not a local folder and not in the Hugging Face cache "
      f"({type(e.value.__context__).__name__}). Download it where there is network "
      "(`hf download someone/not-cached`) and pass the cached snapshot or a copy of the folder")


def test_the_hub_is_never_asked(tmp_path, monkeypatch):
  """Even with the hub reachable, a cached model is read from the cache: no look-up is made."""
  import huggingface_hub.constants
  import huggingface_hub.hf_api

  def no_network(*args, **kwargs):
    raise RuntimeError("the hub was asked")

  cache = tmp_path / "hub"
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  for name in ("repo_info", "model_info", "list_repo_tree"):
    monkeypatch.setattr(huggingface_hub.hf_api.HfApi, name, no_network)
  snapshot = fake_cache(cache, "someone/tiny-clip", {"config.json": "{}"})
  assert os.path.realpath(weights.hf_folder("someone/tiny-clip")) == os.path.realpath(snapshot)


def test_config_json_is_read_as_utf8_whatever_the_locale(tmp_path, monkeypatch):
  """JSON is UTF-8: a Latin-1 locale (simulated: open() defaulting to it) reads the same."""
  import builtins

  real_open = builtins.open

  def latin1_locale_open(path, mode="r", *args, encoding=None, **kwargs):
    if "b" not in mode:
      encoding = encoding or "latin-1"
    return real_open(path, mode, *args, encoding=encoding, **kwargs)

  (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "模型 ü"},
                                                   ensure_ascii=False), encoding="utf-8")
  monkeypatch.setattr(builtins, "open", latin1_locale_open)
  assert weights.hf_config_file(str(tmp_path))["_name_or_path"] == "模型 ü"


def test_config_json_errors_name_the_file(tmp_path):
  with pytest.raises(weights.StateDictError) as e:
    weights.hf_config_file(str(tmp_path))
  assert str(e.value) == (f"{tmp_path}: no config.json; a Hugging Face checkpoint folder holds "
                          "config.json and *.safetensors")
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(weights.StateDictError) as e:
    weights.hf_config_file(str(tmp_path))
  assert str(e.value).startswith(f"{tmp_path}/config.json: not valid JSON (Expecting property "
                                 "name enclosed in double quotes")


def test_tensor_file_errors_name_the_file(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
  with pytest.raises(weights.StateDictError) as e:
    weights.load_hf_clip(str(tmp_path))
  assert str(e.value) == (
      f"{tmp_path}: no *.safetensors file (only safetensors are read; re-save the model with "
      "`model.save_pretrained(folder, safe_serialization=True)`)")
  (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
  with pytest.raises(weights.StateDictError) as e:
    weights.load_hf_clip(str(tmp_path))
  assert str(e.value).startswith(f"{tmp_path}/model.safetensors: not a readable safetensors "
                                 "file (")


def test_tensors_are_read_as_float32_from_every_file(tmp_path):
  from safetensors.numpy import save_file

  (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
  save_file({"logit_scale": np.array(2.5, np.float16)}, str(tmp_path / "a.safetensors"))
  save_file({"text_projection.weight": np.arange(6, dtype=np.float16).reshape(2, 3)},
            str(tmp_path / "b.safetensors"))
  state, config = weights.load_hf_clip(str(tmp_path))
  assert config == {"model_type": "clip"}
  assert sorted(state) == ["logit_scale", "text_projection"]
  assert state["logit_scale"].dtype == np.float32 and state["logit_scale"] == 2.5
  np.testing.assert_array_equal(state["text_projection"],
                                np.arange(6, dtype=np.float32).reshape(2, 3).T)


# ------------------------------------------------------------------------------------------------
# config.json: sections and problems


def test_sections_of_each_kind_of_config():
  defaults = weights.HF_DEFAULTS
  vision_only = weights.hf_sections({"model_type": "clip_vision_model", "hidden_size": 64})
  assert vision_only == {"vision": {**defaults["vision"], "model_type": "clip_vision_model",
                                    "hidden_size": 64}}
  text_only = weights.hf_sections({"model_type": "clip_text_model", "hidden_size": 40})
  assert text_only == {"text": {**defaults["text"], "model_type": "clip_text_model",
                                "hidden_size": 40}}
  both = weights.hf_sections({"model_type": "clip", "vision_config": {"patch_size": 16},
                              "text_config": None})
  assert both == {"vision": {**defaults["vision"], "patch_size": 16}, "text": defaults["text"]}
  with pytest.raises(weights.StateDictError) as e:
    weights.hf_vision_shape({"model_type": "clip_text_model"})
  assert str(e.value) == "the checkpoint's config.json describes no image tower"


def problems_of(vision=None, text=None, mode="clip", **kw):
  config = {"model_type": "clip",
            "vision_config": {"hidden_act": "gelu", "num_attention_heads": 12, **(vision or {})},
            "text_config": {"hidden_act": "gelu", "num_attention_heads": 8, **(text or {})}}
  model_cfg = {"mode": mode, "variant": "B/16", "text": {"num_heads": 8}}
  return weights.hf_config_problems(config, model_cfg, **kw)


GELU = ("but this project's transformer MLPs use exact GELU ('gelu'); the imported tower would "
        "compute a different function. Use a checkpoint trained with exact GELU (e.g. the "
        "LAION/DataComp OpenCLIP releases)")


def test_each_problem_of_a_config_is_named_with_its_key():
  assert problems_of() == []
  assert problems_of(vision={"hidden_act": "quick_gelu"}) == [
      f"vision_config.hidden_act is 'quick_gelu', {GELU}"]
  assert problems_of(text={"hidden_act": "relu"}) == [f"text_config.hidden_act is 'relu', {GELU}"]
  assert problems_of(vision={"num_attention_heads": 6}) == [
      "vision_config.num_attention_heads is 6, the config's model has 12 heads: set "
      "--config.model.vit.num_heads=6"]
  assert problems_of(text={"num_attention_heads": 4}) == [
      "text_config.num_attention_heads is 4, the config's model has 8 heads: set "
      "--config.model.text.num_heads=4"]
  assert problems_of(vision={"layer_norm_eps": 1e-6}, text={"layer_norm_eps": 1e-12}) == [
      "vision_config.layer_norm_eps is 1e-06; this project's LayerNorms use 1e-5",
      "text_config.layer_norm_eps is 1e-12; this project's LayerNorms use 1e-5"]


def test_which_towers_are_checked():
  bad = dict(vision={"num_attention_heads": 6, "layer_norm_eps": 1e-6},
             text={"hidden_act": "relu", "num_attention_heads": 4})
  everything = problems_of(**bad)
  assert [p.split(".")[0] for p in everything] == ["vision_config"] * 2 + ["text_config"] * 2
  assert problems_of(**bad, towers=("vision",)) == everything[:2]
  assert problems_of(**bad, towers=("text",)) == everything[2:]
  assert problems_of(**bad, mode="lift") == everything[:2]  # LIFT has no text tower to fill
  # The image tower's head count left to a shape check; the text tower's still checked.
  assert problems_of(**bad, vision_heads=False) == everything[1:]


# ------------------------------------------------------------------------------------------------
# mapping OpenCLIP names onto the model


def tiny_lift():
  """A tiny LIFT model's parameters (random) and their shapes."""
  from flax import nnx

  from lift_jax.models.two_tower import TwoTower

  cfg = dict(mode="lift", variant="B/8", image_size=16, pool="tok", embed_dim=8,
             vit=dict(width=16, depth=1, num_heads=2, mlp_dim=32), head_hidden=(12,),
             dtype="float32")
  params = nnx.to_pure_dict(nnx.split(TwoTower(cfg, rngs=nnx.Rngs(3)))[1])
  return jax_numpy(params), weights.abstract_params(cfg)


def jax_numpy(tree):
  import jax

  return jax.tree.map(np.asarray, tree)


def test_every_tensor_lands_in_its_place_as_float32_whatever_the_order():
  params, abstract = tiny_lift()
  state = weights.to_openclip(params)
  half = {k: v.astype(np.float16) for k, v in reversed(list(state.items()))}
  got = weights.convert(half, abstract)
  import jax

  flat_got = dict(jax.tree.leaves_with_path(got))
  for path, want in jax.tree.leaves_with_path(params):
    assert flat_got[path].dtype == np.float32, path
    np.testing.assert_array_equal(flat_got[path], want.astype(np.float16).astype(np.float32))


def test_tensors_the_model_has_no_place_for_are_all_listed(tmp_path):
  params, abstract = tiny_lift()
  state = weights.to_openclip(params)
  # First in the file: a CLIP text tensor (a known name; LIFT has no text tower) and an unknown.
  extra = {"token_embedding.weight": np.zeros((5, 4), np.float32),
           "something.else": np.zeros(3, np.float32)}
  with pytest.raises(weights.StateDictError) as e:
    weights.convert({**extra, **state}, abstract)
  assert str(e.value) == ("the checkpoint does not fit the config's model.\n2 unexpected "
                          "(tensors the model has no place for):\n  token_embedding.weight\n"
                          "  something.else")
  wrong = dict(state, **{"visual.ln_pre.weight": np.zeros(5, np.float32)})
  with pytest.raises(weights.StateDictError) as e:
    weights.convert(wrong, abstract)
  assert str(e.value).endswith("1 mis-shaped:\n  visual.ln_pre.weight: checkpoint (5,) -> (5,), "
                               "model visual/ln_pre/scale expects (16,)")


def test_a_selection_imports_only_its_parameters_and_names_the_rest():
  params, abstract = tiny_lift()
  state = weights.to_openclip(params)
  head_first = dict(sorted(state.items(), key=lambda kv: not kv[0].startswith("mlp_projector")))
  skipped = []
  got = weights.convert(head_first, abstract, select="^visual/", skipped=skipped)
  assert set(got) == {"visual"}
  assert skipped == [k for k in head_first if not k.startswith("visual.")] and skipped
  assert weights.convert(head_first, abstract, select="^visual/")["visual"].keys() == \
      got["visual"].keys()  # no list to fill: the same import
