"""The small shared helpers: tables, settings differences, atomic writes, configs by path."""

import json
import os

import ml_collections
import pytest

from lift_jax import common


def test_format_table_pads_columns_and_aligns_numbers_right():
  text = common.format_table([("coco/i2t_r1", "31.00"), ("imagenet/top1", "5.25")],
                             header=("benchmark/metric", "value (%)"), right=[1])
  assert text.splitlines() == [
      "benchmark/metric  value (%)",
      "---------------------------",
      "coco/i2t_r1           31.00",
      "imagenet/top1          5.25",
  ]
  assert common.format_table([("a", 1), ("bcd", 22)]) == "a    1\nbcd  22"


def test_differences_of_nested_settings():
  old = {"options": {"jpeg_quality": 95, "resize": 0}, "items": 10, "gone": 1}
  new = ml_collections.ConfigDict({"options": {"jpeg_quality": 80, "resize": 0}, "items": 10,
                                   "added": "x"})
  assert common.differences(old, new) == [
      "added: None -> 'x'", "gone: 1 -> None", "options.jpeg_quality: 95 -> 80"]
  assert common.differences(old, old) == []
  assert common.differences(old, new, keys=["items", "gone"]) == ["gone: 1 -> None"]
  assert common.differences({"t": "a" * 300}, {"t": "b"})[0].endswith("...")


def test_atomic_writes_leave_no_temporary(tmp_path):
  path = str(tmp_path / "x.json")
  common.write_json_atomic(path, {"b": 1, "a": "caf\u00e9"})
  assert open(path, encoding="utf-8").read() == '{\n "a": "caf\u00e9",\n "b": 1\n}\n'
  common.write_json_atomic(path, [1, 2], indent=0, sort_keys=False)
  assert json.load(open(path, encoding="utf-8")) == [1, 2]
  with pytest.raises(TypeError):
    common.write_json_atomic(path, {"x": object()})  # not JSON: the old file stays whole
  assert json.load(open(path, encoding="utf-8")) == [1, 2]
  assert os.listdir(tmp_path) == ["x.json"]


def test_load_config_file(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text("import ml_collections\n"
                  "def get_config(arg=None):\n"
                  "  return ml_collections.ConfigDict({'total_steps': 7, 'arg': arg})\n")
  assert common.load_config_file(str(path)).total_steps == 7
  assert common.load_config_file(str(path), "cos").arg == "cos"
  with pytest.raises(FileNotFoundError, match="no such config file"):
    common.load_config_file(str(tmp_path / "missing.py"))
