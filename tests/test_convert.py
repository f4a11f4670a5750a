"""lift_jax.data.convert: real Flickr8k / COCO captions, webdataset tars, every bad-input case,
resume after a crash, pre-resize and worker-count independence."""

import csv
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, require, shared_data
from lift_jax.data import convert
from lift_jax.data import records


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _pixels(w, h, seed=0, channels=3):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, size=(1, 1, channels))
  ramp = np.linspace(0, 60, w, dtype=np.float64)[None, :, None]
  return np.clip(base + ramp + rng.integers(0, 30, size=(h, w, channels)), 0, 255).astype(np.uint8)


def encode(img, fmt="JPEG", **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def rgb_jpeg(w=64, h=64, seed=0):
  return encode(Image.fromarray(_pixels(w, h, seed)), "JPEG", quality=90)


def png16(w, h, color_type):
  """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB); color_type 0 grey, 2 RGB."""
  channels = 3 if color_type == 2 else 1
  a = (np.random.default_rng(1).random((h, w, channels)) * 65535).astype(">u2")
  raw = b"".join(b"\x00" + a[y].tobytes() for y in range(h))

  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) +
          chunk(b"IEND", b""))


def read_all(folder):
  out = []
  for path in records.list_shards(folder, records.IMAGES):
    out.extend(records.iter_records(path))
  return out


def shard_bytes(folder):
  return {name: open(os.path.join(folder, name), "rb").read()
          for name in sorted(os.listdir(folder)) if name.endswith(".array_record")}


def counts(manifest):
  return manifest["report"]["counts"]


def without_created(manifest):
  return {k: v for k, v in manifest.items() if k != "created"}


def write_captions_tsv(path, rows):
  with open(path, "wb") as f:
    f.write(b"filename\tcaption_index\tcaption\n")
    for name, idx, caption in rows:
      caption = caption if isinstance(caption, bytes) else caption.encode()
      f.write(name.encode() + b"\t" + str(idx).encode() + b"\t" + caption + b"\n")


def small_folder(root, n=40, size=48):
  images = root / "images"
  images.mkdir()
  rows = []
  for i in range(n):
    (images / f"img{i:03d}.jpg").write_bytes(rgb_jpeg(size, size, seed=i))
    rows.append((f"img{i:03d}.jpg", 0, f"picture number {i}"))
  write_captions_tsv(root / "captions.tsv", rows)
  return str(images), str(root / "captions.tsv")


# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------


def _flickr_captions(path):
  caps = {}
  with open(path, encoding="utf-8", newline="") as f:
    for row in list(csv.reader(f, delimiter="\t"))[1:]:
      caps.setdefault(row[0], []).append(row[2].strip())
  return caps


def test_flickr8k_subset_converts(tmp_path):
  root = shared_data("flickr8k_subset")
  images, captions = os.path.join(root, "images"), os.path.join(root, "captions.tsv")
  out = str(tmp_path / "out")
  manifest = convert.convert(out, images=images, captions=captions,
                             options=convert.Options(num_shards=3, limit=100), workers=1,
                             progress=False, log=lambda s: None)
  assert manifest["kind"] == "images" and manifest["complete"] and manifest["total"] == 100
  assert [e["count"] for e in manifest["shards"]] == [33, 33, 34]
  for entry in manifest["shards"]:
    assert records.verify_shard(out, entry) is None
  assert counts(manifest) == {"written": 100}
  expected = _flickr_captions(captions)
  names = sorted(os.listdir(images))[:100]
  recs = read_all(out)
  assert [r["key"] for r in recs] == [n[:-4] for n in names]
  for name, r in zip(names, recs):
    assert r["captions"] == expected[name] and len(r["captions"]) == 5
    assert r["caption"] == expected[name][0]
    assert r["image"] == open(os.path.join(images, name), "rb").read()  # kept as found


@pytest.mark.slow
def test_flickr8k_subset_full_with_resize_and_workers(tmp_path):
  root = shared_data("flickr8k_subset")
  out = str(tmp_path / "out")
  manifest = convert.convert(out, images=os.path.join(root, "images"),
                             captions=os.path.join(root, "captions.tsv"),
                             options=convert.Options(num_shards=4, resize=128), workers=2,
                             progress=False, log=lambda s: None)
  assert manifest["total"] == 1000 and counts(manifest)["resized"] == 1000
  for r in read_all(out):
    img = Image.open(io.BytesIO(r["image"]))
    assert img.format == "JPEG" and min(img.size) == 128 and len(r["captions"]) == 5


def test_coco_captions_file_is_parsed(tmp_path):
  path = shared_data("coco", "annotations", "captions_val2017.json")
  with open(path, encoding="utf-8") as f:
    coco = json.load(f)
  chosen = [im for im in coco["images"][:3]]
  images = tmp_path / "val2017"
  images.mkdir()
  for k, im in enumerate(chosen):
    (images / im["file_name"]).write_bytes(rgb_jpeg(80, 60, seed=k))
  out = str(tmp_path / "out")
  manifest = convert.convert(out, images=str(images), captions=path,
                             options=convert.Options(num_shards=1), workers=1, progress=False,
                             log=lambda s: None)
  assert manifest["total"] == 3
  assert counts(manifest)["skipped/missing_image"] == len(coco["images"]) - 3
  by_key = {r["key"]: r for r in read_all(out)}
  for im in chosen:
    want = [a["caption"].strip() for a in coco["annotations"] if a["image_id"] == im["id"]]
    rec = by_key[im["file_name"][:-4]]
    assert rec["captions"] == want and rec["caption"] == want[0] and len(want) >= 5


# --------------------------------------------------------------------------------------------
# Webdataset tars
# --------------------------------------------------------------------------------------------


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def make_tars(tmp_path):
  rgb = Image.fromarray(_pixels(64, 48, 3))
  jpg, png, webp = encode(rgb, "JPEG"), encode(rgb, "PNG"), encode(rgb, "WEBP", lossless=True)
  t1, t2 = str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")
  with tarfile.open(t1, "w") as tar:
    for key, ext, data in (("000000", "jpg", jpg), ("000001", "png", png),
                           ("000002", "webp", webp)):
      _add(tar, f"{key}.{ext}", data)
      _add(tar, f"{key}.txt", f"web caption {key}".encode())
      _add(tar, f"{key}.json", json.dumps({"key": key, "caption": f"json caption {key}",
                                           "uid": f"uid{key}", "url": f"http://x/{key}"}).encode())
  with tarfile.open(t2, "w") as tar:
    _add(tar, "000003.jpg", jpg)
    _add(tar, "000003.txt", b"  web caption 000003 \n")
    _add(tar, "000003.json", json.dumps({"caption": "json caption 000003",
                                         "uid": "uid000003"}).encode())
    _add(tar, "000004.jpg", jpg)
    _add(tar, "000004.txt", b"caf\xe9 au lait")  # Latin-1, not UTF-8
    _add(tar, "000004.json", b'{"caption": "json caption 000004", "uid": "uid000004"}')
    _add(tar, "000000.jpg", jpg)  # the key of a sample in the first tar
    _add(tar, "000000.txt", b"again")
    _add(tar, "000005.jpg", jpg)  # no .txt
    _add(tar, "000005.json", b'{"caption": "json caption 000005", "uid": "uid000005"}')
    _add(tar, "000006.txt", b"a caption without an image")
  return t1, t2


def make_parquet(path, keys, column="key"):
  pa = require("pyarrow")
  import pyarrow.parquet as pq

  pq.write_table(pa.table({column: keys, "re_caption": [f"long caption of {k}" for k in keys]}),
                 path)
  return path


def test_webdataset_with_txt_captions_and_parquet(tmp_path):
  t1, t2 = make_tars(tmp_path)
  parquet = make_parquet(str(tmp_path / "recap.parquet"),
                         ["000000", "000001", "000002", "000003", "000004", "000005"])
  out = str(tmp_path / "out")
  manifest = convert.convert(
      out, tars=[str(tmp_path / "*.tar")], extra_captions=[parquet],
      options=convert.Options(num_shards=2, json_fields=("uid", "url")), workers=1,
      progress=False, log=lambda s: None)
  recs = read_all(out)
  assert [r["key"] for r in recs] == ["000000", "000001", "000002", "000003"]
  assert recs[0]["caption"] == "web caption 000000"
  assert recs[3]["caption"] == "web caption 000003"  # stripped
  assert all(r["recaption"] == f"long caption of {r['key']}" for r in recs)
  assert recs[0]["uid"] == "uid000000" and recs[0]["url"] == "http://x/000000"
  assert "url" not in recs[3]
  formats = [Image.open(io.BytesIO(r["image"])).format for r in recs[:3]]
  assert formats == ["JPEG", "PNG", "WEBP"]  # RGB sources are kept as found
  assert "captions" not in recs[0]
  assert counts(manifest) == {
      "written": 4, "skipped/undecodable_caption": 1, "skipped/duplicate_key": 1,
      "skipped/missing_caption": 1, "skipped/missing_image": 1}
  assert manifest["report"]["examples"]["skipped/undecodable_caption"] == ["000004"]
  assert manifest["fields"] == ["key", "image", "caption", "recaption", "uid", "url"]


def test_webdataset_with_json_captions_joined_by_uid(tmp_path):
  make_tars(tmp_path)
  parquet = make_parquet(str(tmp_path / "recap.parquet"),
                         ["uid000000", "uid000001", "uid000003", "uid000004", "uid000005"],
                         column="uid")
  out = str(tmp_path / "out")
  manifest = convert.convert(
      out, tars=[str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")],
      extra_captions=[parquet],
      options=convert.Options(num_shards=1, caption_source="json:caption", join_field="uid"),
      workers=1, progress=False, log=lambda s: None)
  recs = read_all(out)
  assert [r["key"] for r in recs] == ["000000", "000001", "000003", "000004", "000005"]
  assert [r["caption"] for r in recs] == [f"json caption {r['key']}" for r in recs]
  assert recs[2]["recaption"] == "long caption of uid000003"
  assert counts(manifest) == {"written": 5, "skipped/missing_extra_caption": 1,
                              "skipped/duplicate_key": 1, "skipped/missing_image": 1}
  assert manifest["report"]["examples"]["skipped/missing_extra_caption"] == ["000002"]


def test_compressed_tar_is_refused_by_name(tmp_path):
  path = str(tmp_path / "x.tar.gz")
  with tarfile.open(path, "w:gz") as tar:
    _add(tar, "a.jpg", rgb_jpeg())
  with pytest.raises(convert.ConvertError, match="x.tar.gz"):
    convert.convert(str(tmp_path / "out"), tars=[path], progress=False, log=lambda s: None)


def _cut_tar(path, keep_bytes):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:keep_bytes])


def test_tar_cut_off_mid_download_keeps_its_complete_samples(tmp_path):
  """A partial download among good tars: its complete samples are kept, the sample the cut
  broke is counted under a reason, the tar is named in the log and the manifest; a file that is
  not a tar at all is skipped and named; only when nothing could be read does the run fail."""
  jpg = rgb_jpeg()
  good, cut = str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")
  with tarfile.open(good, "w") as tar:
    for key in ("a0", "a1"):
      _add(tar, f"{key}.jpg", jpg)
      _add(tar, f"{key}.txt", f"caption {key}".encode())
  with tarfile.open(cut, "w") as tar:
    for key in ("b0", "b1"):
      _add(tar, f"{key}.jpg", jpg)
      _add(tar, f"{key}.txt", f"caption {key}".encode())
    _add(tar, "b2.txt", b"caption b2")  # the caption first: only the image is cut
    _add(tar, "b2.jpg", jpg)
  with tarfile.open(cut) as tar:
    b2_image = tar.getmember("b2.jpg")
  # Cut inside b2.jpg's data: b0 and b1 are whole, b2 lost the end of its image.
  _cut_tar(cut, b2_image.offset_data + b2_image.size // 2)
  (tmp_path / "00002.tar").write_text("<html>503 Service Unavailable</html>")
  lines = []
  manifest = convert.convert(str(tmp_path / "out"), tars=[str(tmp_path / "*.tar")],
                             options=convert.Options(num_shards=1), workers=1, progress=False,
                             log=lines.append)
  assert [r["key"] for r in read_all(str(tmp_path / "out"))] == ["a0", "a1", "b0", "b1"]
  assert counts(manifest) == {"written": 4, "skipped/truncated_tar": 1, "tars/truncated": 1,
                              "tars/not_a_tar": 1}
  assert manifest["report"]["examples"]["skipped/truncated_tar"] == ["b2"]
  assert manifest["report"]["examples"]["tars/truncated"] == [cut]
  bad = {os.path.basename(p): why for p, why in manifest["source"]["bad_tars"].items()}
  assert bad == {"00001.tar": "truncated", "00002.tar": "not_a_tar"}
  log = "\n".join(lines)
  assert f"{cut}: cut short" in log and "00002.tar: skipped, not a tar file" in log
  assert "tars: 2" in log  # the printed summary has a section for them

  # A cut inside a member's header (the tar ends mid-block) is found too.
  cut2 = str(tmp_path / "two" / "x.tar")
  os.makedirs(os.path.dirname(cut2))
  with tarfile.open(cut2, "w") as tar:
    for key in ("c0", "c1"):
      _add(tar, f"{key}.jpg", jpg)
      _add(tar, f"{key}.txt", f"caption {key}".encode())
  with tarfile.open(cut2) as tar:
    c1 = tar.getmember("c1.txt")
  _cut_tar(cut2, c1.offset + 100)
  manifest = convert.convert(str(tmp_path / "out2"), tars=[cut2], workers=1, progress=False,
                             log=lambda s: None)
  assert counts(manifest) == {"written": 1, "skipped/truncated_tar": 1, "tars/truncated": 1}

  # Nothing readable at all: one error that names every file and why.
  with pytest.raises(convert.ConvertError, match=r"nothing to convert.*00002.tar"):
    convert.convert(str(tmp_path / "out3"), tars=[str(tmp_path / "00002.tar")], workers=1,
                    progress=False, log=lambda s: None)
  with pytest.raises(convert.ConvertError, match=r"--tars=.* is a folder.*\*\.tar"):
    convert.convert(str(tmp_path / "out3"), tars=[str(tmp_path)], progress=False,
                    log=lambda s: None)


# --------------------------------------------------------------------------------------------
# Bad input, one case each
# --------------------------------------------------------------------------------------------


def make_bad_folder(root):
  images = root / "images"
  (images / "sub").mkdir(parents=True)
  good = rgb_jpeg(64, 64)
  files = {
      "good.jpg": good,
      "sub/nested.jpg": rgb_jpeg(64, 64, seed=5),
      "zero.jpg": b"",
      "truncated.jpg": rgb_jpeg(256, 256)[:3000],
      "cmyk.jpg": encode(Image.fromarray(_pixels(64, 64, 2, channels=4), "CMYK"), "JPEG"),
      "palette.png": None,
      "gray16.png": png16(64, 48, 0),
      "rgb16.png": png16(64, 48, 2),
      "rgba.png": encode(Image.fromarray(_pixels(64, 64, 4, channels=4), "RGBA"), "PNG"),
      "gray.jpg": encode(Image.fromarray(_pixels(64, 64, 6)[..., 0], "L"), "JPEG"),
      "bitmap.bmp": encode(Image.fromarray(_pixels(64, 64, 7)), "BMP"),
      "tiny.png": encode(Image.fromarray(_pixels(4, 4)), "PNG"),
      "wide.png": encode(Image.fromarray(_pixels(1000, 10)), "PNG"),
      "nocaption.jpg": good,
      "blank.jpg": good,
      "dup.jpg": good,
      "dup.png": encode(Image.fromarray(_pixels(64, 64)), "PNG"),
      "badcaption.jpg": good,
      "mixed.jpg": good,
      "notanimage.jpg": b"this is text, not a JPEG",
  }
  pal = Image.fromarray(_pixels(64, 64, 3)).convert("P", palette=Image.ADAPTIVE, colors=16)
  pal.info["transparency"] = 0
  files["palette.png"] = encode(pal, "PNG", transparency=0)
  for name, data in files.items():
    (images / name).write_bytes(data)
  rows = [(name, 0, f"caption of {name}") for name in files
          if name not in ("nocaption.jpg", "blank.jpg", "badcaption.jpg", "mixed.jpg")]
  rows += [("blank.jpg", 0, "   "), ("badcaption.jpg", 0, b"na\xefve \xff caption"),
           ("mixed.jpg", 0, b"first \xff broken"), ("mixed.jpg", 1, "second fine"),
           ("ghost.jpg", 0, "an image that is not there")]
  write_captions_tsv(root / "captions.tsv", rows)
  return str(images), str(root / "captions.tsv")


def test_every_bad_input_is_counted_by_reason(tmp_path):
  images, captions = make_bad_folder(tmp_path)
  out = str(tmp_path / "out")
  lines = []
  manifest = convert.convert(out, images=images, captions=captions,
                             options=convert.Options(num_shards=2), workers=1, progress=False,
                             log=lines.append)
  assert counts(manifest) == {
      "written": 11,
      "skipped/zero_byte": 1,
      "skipped/unreadable_image": 2,  # truncated.jpg, notanimage.jpg
      "skipped/too_small": 1,
      "skipped/extreme_aspect": 1,
      "skipped/missing_caption": 2,  # nocaption.jpg, blank.jpg
      "skipped/missing_image": 1,
      "skipped/duplicate_key": 1,
      "skipped/undecodable_caption": 1,
      "captions_dropped/undecodable": 2,  # badcaption.jpg's and mixed.jpg's first
      "captions_dropped/empty": 1,
      "converted/cmyk": 1,
      "converted/palette": 1,
      "converted/16bit": 2,
      "converted/alpha": 1,
      "converted/grayscale": 1,
      "converted/format": 1,
  }
  examples = manifest["report"]["examples"]
  assert examples["skipped/zero_byte"] == ["zero"]
  assert sorted(examples["skipped/unreadable_image"]) == ["notanimage", "truncated"]
  assert examples["skipped/too_small"] == ["tiny"]
  assert examples["skipped/extreme_aspect"] == ["wide"]
  assert examples["skipped/missing_image"] == ["ghost"]
  assert examples["skipped/duplicate_key"] == ["dup"]
  assert examples["skipped/undecodable_caption"] == ["badcaption"]
  assert examples["converted/16bit"] == ["gray16", "rgb16"]
  report_text = "\n".join(lines)
  for reason in ("zero_byte", "unreadable_image", "too_small", "extreme_aspect", "cmyk",
                 "palette", "16bit", "alpha", "duplicate_key", "undecodable_caption"):
    assert reason in report_text  # the printed summary names every reason
  recs = {r["key"]: r for r in read_all(out)}
  assert sorted(recs) == sorted(["good", "sub/nested", "cmyk", "palette", "gray16", "rgb16",
                                 "rgba", "gray", "bitmap", "dup", "mixed"])
  assert recs["mixed"]["captions"] == ["second fine"]
  assert Image.open(io.BytesIO(recs["dup"]["image"])).format == "JPEG"  # dup.jpg sorts first
  for key in ("cmyk", "palette", "gray16", "rgb16", "rgba", "gray", "bitmap"):
    img = Image.open(io.BytesIO(recs[key]["image"]))
    assert (img.format, img.mode) == ("JPEG", "RGB"), key
  assert recs["good"]["image"] == open(os.path.join(images, "good.jpg"), "rb").read()
  # transparent palette entries are composited on white
  assert np.asarray(Image.open(io.BytesIO(recs["palette"]["image"]))).max() >= 250


def test_thresholds_are_configurable(tmp_path):
  images, captions = make_bad_folder(tmp_path)
  manifest = convert.convert(
      str(tmp_path / "out"), images=images, captions=captions,
      options=convert.Options(num_shards=1, min_image_size=4, max_aspect_ratio=200),
      workers=1, progress=False, log=lambda s: None)
  c = counts(manifest)
  assert "skipped/too_small" not in c and "skipped/extreme_aspect" not in c
  assert c["written"] == 13


# --------------------------------------------------------------------------------------------
# Resume, determinism, options
# --------------------------------------------------------------------------------------------


def test_resume_after_crash_is_byte_identical(tmp_path, monkeypatch):
  images, captions = small_folder(tmp_path, n=40)
  opts = convert.Options(num_shards=4, resize=32)
  ref = str(tmp_path / "ref")
  ref_manifest = convert.convert(ref, images=images, captions=captions, options=opts,
                                 workers=1, progress=False, log=lambda s: None)

  out = str(tmp_path / "out")
  real_write = records.write_shard
  calls = []

  def crashing(path, recs, options):
    calls.append(path)
    if len(calls) == 3:  # dies in the middle of the third shard
      for i, _ in enumerate(recs):
        if i == 4:
          raise KeyboardInterrupt("simulated crash")
    return real_write(path, recs, options)

  monkeypatch.setattr(records, "write_shard", crashing)
  with pytest.raises(KeyboardInterrupt):
    convert.convert(out, images=images, captions=captions, options=opts, workers=1,
                    progress=False, log=lambda s: None)
  monkeypatch.setattr(records, "write_shard", real_write)
  partial = records.read_manifest(out)
  assert not partial["complete"] and len(partial["shards"]) == 2
  # A kill leaves a temporary behind, and a finished shard may be damaged afterwards.
  with open(os.path.join(out, records.shard_name("images", 2, 4) + ".tmp-999"), "wb") as f:
    f.write(b"half a shard")
  damaged = os.path.join(out, records.shard_name("images", 1, 4))
  data = bytearray(open(damaged, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(damaged, "wb").write(bytes(data))

  lines = []
  manifest = convert.convert(out, images=images, captions=captions, options=opts, workers=2,
                             progress=False, log=lines.append)
  assert any("resuming; 1 of 4 shards verified and kept" in line for line in lines)
  assert shard_bytes(out) == shard_bytes(ref)
  assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
  assert without_created(manifest) == without_created(ref_manifest)


def test_output_does_not_depend_on_workers(tmp_path):
  images, captions = make_bad_folder(tmp_path)
  one = convert.convert(str(tmp_path / "one"), images=images, captions=captions,
                        options=convert.Options(num_shards=3), workers=1, progress=False,
                        log=lambda s: None)
  two = convert.convert(str(tmp_path / "two"), images=images, captions=captions,
                        options=convert.Options(num_shards=3), workers=2, progress=False,
                        log=lambda s: None)
  assert shard_bytes(str(tmp_path / "one")) == shard_bytes(str(tmp_path / "two"))
  assert without_created(one) == without_created(two)


def test_rerun_is_a_noop_and_other_options_are_refused(tmp_path):
  images, captions = small_folder(tmp_path, n=12)
  out = str(tmp_path / "out")
  opts = convert.Options(num_shards=2)
  convert.convert(out, images=images, captions=captions, options=opts, workers=1,
                  progress=False, log=lambda s: None)
  mtimes = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
  lines = []
  convert.convert(out, images=images, captions=captions, options=opts, workers=1,
                  progress=False, log=lines.append)
  assert any("nothing to do" in line for line in lines)
  assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)} == mtimes
  with pytest.raises(convert.ConvertError, match="jpeg_quality: 95 -> 80"):
    convert.convert(out, images=images, captions=captions,
                    options=convert.Options(num_shards=2, jpeg_quality=80), workers=1,
                    progress=False, log=lambda s: None)
  manifest = convert.convert(out, images=images, captions=captions,
                             options=convert.Options(num_shards=3), workers=1, progress=False,
                             log=lambda s: None, overwrite=True)
  assert manifest["num_shards"] == 3
  assert len(records.list_shards(out, "images")) == 3


def test_pre_resize_gives_shorter_side(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  sizes = {"landscape": (300, 200), "portrait": (100, 500), "small": (90, 90),
           "cmyk": (200, 120)}
  for name, (w, h) in sizes.items():
    mode = "CMYK" if name == "cmyk" else "RGB"
    img = Image.fromarray(_pixels(w, h, channels=4 if mode == "CMYK" else 3), mode)
    (images / f"{name}.jpg").write_bytes(encode(img, "JPEG"))
  write_captions_tsv(tmp_path / "c.tsv", [(f"{n}.jpg", 0, n) for n in sizes])
  out = str(tmp_path / "out")
  manifest = convert.convert(out, images=str(images), captions=str(tmp_path / "c.tsv"),
                             options=convert.Options(num_shards=1, resize=96, jpeg_quality=85),
                             workers=1, progress=False, log=lambda s: None)
  assert counts(manifest)["resized"] == 3 and counts(manifest)["converted/cmyk"] == 1
  got = {r["key"]: Image.open(io.BytesIO(r["image"])) for r in read_all(out)}
  assert got["landscape"].size == (144, 96)
  assert got["portrait"].size == (96, 480)
  assert got["cmyk"].size == (160, 96) and got["cmyk"].mode == "RGB"
  assert got["small"].size == (90, 90)  # never enlarged, kept as found
  assert all(img.format == "JPEG" for img in got.values())


def test_cli(tmp_path):
  images, captions = small_folder(tmp_path, n=6)
  out = str(tmp_path / "out")
  manifest = convert.main([f"--output={out}", f"--images={images}", f"--captions={captions}",
                           "--num_shards=2", "--workers=1", "--no_progress", "--resize=40"])
  assert manifest["total"] == 6 and manifest["options"]["resize"] == 40
  help_text = subprocess.run([sys.executable, "-m", "lift_jax.data.convert", "--help"],
                             capture_output=True, text=True, cwd=REPO, check=True).stdout
  for flag in ("--tars", "--images", "--captions", "--num_shards", "--resize", "--workers",
               "--extra_captions", "--caption_source", "--min_image_size"):
    assert flag in help_text
  with pytest.raises(convert.ConvertError, match="not both"):
    convert.main([f"--output={out}", f"--images={images}", "--tars=x.tar"])
  # Known errors reach the user as one line and exit status 1, without a traceback.
  for args, message in (([f"--output={out}", f"--images={images}", "--tars=x.tar"], "not both"),
                        ([f"--output={out}", f"--tars={tmp_path}"], "is a folder"),
                        ([f"--images={images}"], "--output=DIR is required"),
                        (["--output=x", "--no_such_flag=1"], "no_such_flag")):
    run = subprocess.run([sys.executable, "-m", "lift_jax.data.convert", *args],
                         capture_output=True, text=True, cwd=REPO)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1, run.stderr
    assert lines[0].startswith("python -m lift_jax.data.convert: error: ") and message in lines[0]
