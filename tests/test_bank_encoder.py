"""A text bank must come from the same encoder settings as the training embeddings: evaluation
refuses a bank made with another pooling or max_length (which silently changes the scores),
unless config.evals.allow_encoder_mismatch says otherwise."""

import logging
import os
import re

import ml_collections
import pytest

from conftest import shared_data
from eval.benchmarks import required_texts
from eval.runner import EvalRunner, check_bank_encoder
from eval_fixtures import config, lift_model_config, tiny_model, write_bank
from lift_jax.data import records

# The fields embed.main writes into both manifests (see embed.job.settings_of).
SETTINGS = dict(model="nvidia/NV-Embed-v2", revision="c50d55f", encoder="nv_embed",
                pooling="latent_attention", instruction="", max_length=77, append_eos=False,
                normalized=True)


def embeddings_folder(path, **change):
  os.makedirs(path, exist_ok=True)
  records.write_manifest(path, {"kind": "embeddings", "shards": [], **SETTINGS, **change})
  return path


def bank_folder(path, texts, **change):
  write_bank(path, texts)
  manifest = records.read_manifest(path)
  records.write_manifest(path, {**manifest, **SETTINGS, **change})
  return path


def runner_config(tmp_path, **bank_change):
  bench = {"flickr8k": {"type": "retrieval", "protocol": "lift", "limit": 8,
                        "captions": shared_data("flickr8k_subset", "captions.tsv"),
                        "image_dir": shared_data("flickr8k_subset", "images")}}
  cfg = config(lift_model_config(), bench, text_bank=str(tmp_path / "bank"), batch_size=8)
  bank_folder(cfg.evals.text_bank, required_texts(cfg.evals), **bank_change)
  cfg.data.embeddings = embeddings_folder(str(tmp_path / "embeddings"))
  return cfg


def test_bank_of_other_pooling_and_max_length_is_refused(tmp_path):
  cfg = runner_config(tmp_path, pooling="last_token", max_length=32)
  with pytest.raises(records.EncoderMismatchError) as err:
    EvalRunner(cfg, tiny_model("lift"))
  message = str(err.value)
  assert str(tmp_path / "bank") in message and str(tmp_path / "embeddings") in message
  assert ("pooling: 'latent_attention' in the embeddings, 'last_token' in the bank; "
          "max_length: 77 in the embeddings, 32 in the bank") in message
  assert "allow_encoder_mismatch=True" in message and "\n" not in message
  # Explicitly allowed: the evaluation runs.
  cfg.evals.allow_encoder_mismatch = True
  out = EvalRunner(cfg, tiny_model("lift")).run()
  assert out["flickr8k/num_images"] == 8


def test_bank_of_the_same_encoder_is_accepted(tmp_path):
  cfg = runner_config(tmp_path)
  assert EvalRunner(cfg, tiny_model("lift")).run()["flickr8k/num_texts"] == 8


@pytest.mark.parametrize("field, value", [
    ("model", "Salesforce/SFR-Embedding-Mistral"), ("revision", "0123abc"),
    ("pooling", "mean"), ("instruction", "Retrieve the caption: "), ("max_length", 323),
    ("normalized", False)])
def test_each_encoder_setting_is_compared(tmp_path, field, value):
  bank = bank_folder(str(tmp_path / "bank"), ["a dog"], **{field: value})
  emb = embeddings_folder(str(tmp_path / "embeddings"))
  with pytest.raises(records.EncoderMismatchError, match=f"{field}: "):
    records.check_same_encoder(bank, emb)
  assert records.check_same_encoder(bank, emb, allow=True) == [
      f"{field}: {SETTINGS[field]!r} in the embeddings, {value!r} in the bank"]
  same = bank_folder(str(tmp_path / "same"), ["a dog"])
  assert records.check_same_encoder(same, emb) == []
  # A bank whose manifest records no encoder settings (written by other code) has nothing to
  # compare.
  bare = write_bank(str(tmp_path / "bare"), ["a dog"])
  assert records.check_same_encoder(bare, emb) == []


# Every field that decides what a vector means: the ones embed.main writes (SETTINGS) and any the
# comparison lists. Generated, so a field added to records.ENCODER_SETTINGS gets its case, and a
# field dropped from it while embed.main still writes it fails its case.
FIELDS = sorted(set(SETTINGS) | set(records.ENCODER_SETTINGS))
# The fields a manifest may leave out, and then cannot be compared on.
OMISSIBLE = [f for f in FIELDS if f not in records.ENCODER_DEFAULTS]


def base_values():
  return {f: SETTINGS.get(f, records.ENCODER_DEFAULTS.get(f, f"the {f} of the embeddings"))
          for f in FIELDS}


def other(value):
  """A value of the same kind that differs from ``value``."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  return f"{value}-other"


def manifests(tmp_path, bank: dict, embeddings: dict):
  """A bank folder and an embeddings folder holding only these manifests."""
  folders = []
  for name, fields in (("bank", bank), ("embeddings", embeddings)):
    folder = str(tmp_path / name)
    os.makedirs(folder)
    records.write_manifest(folder, {"kind": name, "shards": [], **fields})
    folders.append(folder)
  return folders


def eval_config(bank: str, embeddings: str, allow: bool = False):
  return ml_collections.ConfigDict({"evals": {"text_bank": bank, "allow_encoder_mismatch": allow},
                                    "data": {"embeddings": embeddings}})


@pytest.mark.parametrize("field", FIELDS)
def test_a_bank_differing_in_one_setting_is_refused_unless_allowed(tmp_path, field, caplog):
  base = base_values()
  changed = other(base[field])
  bank, emb = manifests(tmp_path, {**base, field: changed}, base)
  expected = f"{field}: {base[field]!r} in the embeddings, {changed!r} in the bank"
  with pytest.raises(records.EncoderMismatchError) as err:
    records.check_same_encoder(bank, emb)
  assert f"({expected}): scores against it are not comparable" in str(err.value)
  assert records.check_same_encoder(bank, emb, allow=True) == [expected]
  # The same verdict where evaluation asks for it (EvalRunner, eval.main).
  with pytest.raises(records.EncoderMismatchError, match=re.escape(expected)):
    check_bank_encoder(eval_config(bank, emb))
  with caplog.at_level(logging.WARNING):
    assert check_bank_encoder(eval_config(bank, emb, allow=True)) == [expected]
  assert f"differs from the training embeddings (allowed): {expected}" in caplog.text


def test_the_refusal_names_both_folders_and_the_fix(tmp_path):
  bank, emb = manifests(tmp_path, {**SETTINGS, "pooling": "mean", "max_length": 32}, SETTINGS)
  with pytest.raises(records.EncoderMismatchError) as err:
    records.check_same_encoder(bank, emb)
  assert str(err.value) == (
      f"text bank {bank} was made with other encoder settings than the training embeddings "
      f"{emb} (pooling: 'latent_attention' in the embeddings, 'mean' in the bank; max_length: 77 "
      "in the embeddings, 32 in the bank): scores against it are not comparable. Re-embed the "
      "bank's texts with the embeddings' encoder config (`python -m embed.main "
      "--config=EMBED_CONFIG --config.texts=FILE --config.output=DIR`), or set "
      "config.evals.allow_encoder_mismatch=True to evaluate anyway")


@pytest.mark.parametrize("side", ["bank", "embeddings"])
@pytest.mark.parametrize("field", OMISSIBLE)
def test_a_setting_one_manifest_does_not_record_is_not_compared(tmp_path, field, side):
  """Documented: a field that one manifest lacks (written by other code) cannot be compared and
  is left out; the fields both record are still compared."""
  base = base_values()
  lacking = {f: v for f, v in base.items() if f != field}
  bank, emb = manifests(tmp_path, lacking if side == "bank" else base,
                        base if side == "bank" else lacking)
  assert records.check_same_encoder(bank, emb) == []
  assert check_bank_encoder(eval_config(bank, emb)) == []
  # Another field that differs is still refused.
  second = next(f for f in OMISSIBLE if f != field)
  bank_fields = {**(lacking if side == "bank" else base), second: other(base[second])}
  bank, emb = manifests(tmp_path / "second", bank_fields, base if side == "bank" else lacking)
  assert records.check_same_encoder(bank, emb, allow=True) == [
      f"{second}: {base[second]!r} in the embeddings, {other(base[second])!r} in the bank"]


def test_eval_main_compares_with_the_embeddings_the_checkpoint_was_trained_on(tmp_path):
  """`eval.main --workdir=W --config=C` where C names no embeddings (the paper configs): the
  bank is compared with the embeddings stored in the checkpoint's config."""
  from flax import nnx

  from eval import main as eval_main
  from lift_jax import checkpoint as ckpt

  cfg = runner_config(tmp_path, max_length=32)
  workdir = str(tmp_path / "run")
  params = nnx.to_pure_dict(nnx.split(tiny_model("lift"))[1])
  ckpt.save_params(workdir, 5, params, cfg)
  given = config(lift_model_config(), cfg.evals.benchmarks.to_dict(),
                 text_bank=cfg.evals.text_bank, batch_size=8)
  assert given.data.get("embeddings") is None
  with pytest.raises(records.EncoderMismatchError, match="max_length: 77 in the embeddings, 32"):
    eval_main.evaluate(workdir, given, output=str(tmp_path / "m.json"))


# random_init named here as well: embed/job.py writes it only when set.
@pytest.mark.parametrize("field", sorted(set(records.ENCODER_DEFAULTS) | {"random_init"}))
@pytest.mark.parametrize("side", ["bank", "embeddings"])
def test_a_setting_recorded_only_when_set_is_compared_when_absent(tmp_path, field, side):
  """embed.main writes random_init only when it is set: a bank of random weights against
  trained embeddings (the field absent there) is refused, and absent == the default."""
  base = {f: v for f, v in base_values().items() if f != field}
  default = records.ENCODER_DEFAULTS.get(field, False)
  with_field = {**base, field: other(default)}
  bank, emb = manifests(tmp_path, with_field if side == "bank" else base,
                        base if side == "bank" else with_field)
  with pytest.raises(records.EncoderMismatchError, match=f"{field}: "):
    records.check_same_encoder(bank, emb)
  bank, emb = manifests(tmp_path / "same", {**base, field: default}, base)
  assert records.check_same_encoder(bank, emb) == []
