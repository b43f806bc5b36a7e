"""img2dataset layouts built here — webdataset .tar shards and parquet+files — read correctly,
with corrupt members counted and reported instead of failing the run."""

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from memscan import InputError, load_training_set
from memscan.data.training import list_source
from memscan.data.webdataset import detect_layout, list_webdataset
from memscan.index.faiss_index import build_index
from memscan.synthetic import training_image


def _encode(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _add(tf, name, data):
    data = data.encode() if isinstance(data, str) else data
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _shard(path, samples):
    """samples: list of (key, {ext: bytes|str})"""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                _add(tf, f"{key}.{ext}", data)


def test_webdataset_shards_with_corrupt_members(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    imgs = {k: training_image(k, 16) for k in ("000000000", "000000001", "000000002", "000010000", "000010001")}
    _shard(
        root / "00000.tar",
        [
            (
                "000000000",
                {
                    "jpg": _encode(imgs["000000000"], "JPEG"),
                    "txt": "a red fox",
                    "json": json.dumps({"caption": "json cap"}),
                },
            ),
            ("000000001", {"png": _encode(imgs["000000001"], "PNG"), "json": json.dumps({"caption": "from json"})}),
            ("000000002", {"png": _encode(imgs["000000002"], "PNG"), "txt": "kept", "json": "{not json"}),
            ("000000003", {"jpg": b"\xff\xd8\xff\xe0 this is not a jpeg", "txt": "corrupt image"}),
            ("000000004", {"txt": "a caption without an image"}),
        ],
    )
    _shard(root / "00001.tar", [("000010000", {"png": _encode(imgs["000010000"], "PNG"), "txt": "second shard"})])
    # a truncated shard: the last member's data is cut off
    _shard(
        root / "00002.tar",
        [("000010001", {"txt": "cut", "png": _encode(imgs["000010001"], "PNG") + b"\0" * 4000})],
    )
    raw = (root / "00002.tar").read_bytes()
    (root / "00002.tar").write_bytes(raw[:2000])
    (root / "notes.txt").write_text("not a shard")
    (root / "00003.tar").write_bytes(b"this is no tar archive " * 40)  # a shard that is garbage

    assert detect_layout(root) == "webdataset" and detect_layout(root / "00000.tar") == "webdataset"
    ts = load_training_set(root, size=(16, 16))
    assert ts.ids == ["000000000", "000000001", "000000002", "000010000"]
    assert ts.captions == ["a red fox", "from json", "kept", "second shard"]
    # lossless members decode to the exact pixels; the JPEG one to a close copy
    np.testing.assert_array_equal(ts.images[1], imgs["000000001"])
    np.testing.assert_array_equal(ts.images[3], imgs["000010000"])
    assert np.abs(ts.images[0].astype(int) - imgs["000000000"]).mean() < 4
    reasons = {s["id"]: s["reason"] for s in ts.skipped}
    assert set(reasons) == {"000000003", "000000004", "000010001", "00003.tar"}
    assert "unreadable shard" in reasons["00003.tar"]
    assert "no image member" in reasons["000000004"]
    assert "cut off" in reasons["000010001"]
    assert "00000.tar" in next(s["path"] for s in ts.skipped if s["id"] == "000000003")
    assert [w["id"] for w in ts.warnings] == ["000000002"] and "not valid JSON" in ts.warnings[0]["reason"]
    summary = ts.summary()
    assert summary["skipped"] == 4 and summary["warnings"] == 1
    # one shard alone, and the lazy listing (nothing decoded)
    assert load_training_set(root / "00001.tar").ids == ["000010000"]
    samples, _ = list_webdataset(root / "00000.tar")
    assert [s.member for s in samples][:2] == ["000000000.jpg", "000000001.png"]


def test_duplicate_keys_across_shards_are_an_error(tmp_path):
    png = _encode(training_image("x", 8), "PNG")
    _shard(tmp_path / "a.tar", [("k1", {"png": png})])
    _shard(tmp_path / "b.tar", [("k1", {"png": png})])
    with pytest.raises(InputError, match="share the key"):
        load_training_set(tmp_path)


def test_img2dataset_parquet_and_files_layout(tmp_path):
    root = tmp_path / "out"
    for shard, keys in (("00000", ["000000000", "000000001", "000000002", "000000003"]), ("00001", ["000010000"])):
        folder = root / shard
        folder.mkdir(parents=True)
        rows = []
        for k in keys:
            status = "failed_to_download" if k == "000000002" else "success"
            rows.append(
                {
                    "key": k,
                    "url": f"http://x/{k}",
                    "caption": f"caption {k}",
                    "status": status,
                    "error_message": "HTTP 404" if status != "success" else None,
                    "width": 16,
                    "height": 16,
                }
            )
            if status == "success":
                if k == "000000003":
                    (folder / f"{k}.jpg").write_bytes(b"\xff\xd8 truncated")  # corrupt file
                else:
                    Image.fromarray(training_image(k, 16)).save(folder / f"{k}.png")
                (folder / f"{k}.txt").write_text(f"txt {k}")
                (folder / f"{k}.json").write_text(json.dumps({"key": k}))
        pd.DataFrame(rows).to_parquet(root / f"{shard}.parquet")
        (root / f"{shard}_stats.json").write_text("{}")
    assert detect_layout(root) == "img2dataset"
    ts = load_training_set(root, size=(16, 16))
    assert ts.ids == ["000000000", "000000001", "000010000"]
    assert ts.captions == ["caption 000000000", "caption 000000001", "caption 000010000"]
    np.testing.assert_array_equal(ts.images[2], training_image("000010000", 16))
    reasons = {s["id"]: s["reason"] for s in ts.skipped}
    assert set(reasons) == {"000000002", "000000003"}
    assert "not downloaded" in reasons["000000002"] and "HTTP 404" in reasons["000000002"]
    # the streaming reader (used by `memscan index`) lists the same images and reports the same way
    listing = list_source(root)
    assert listing.ids == ["000000000", "000000001", "000000003", "000010000"]  # 000000003 fails at decode
    index = build_index(root, None, embedder="pixel:8", progress=False)
    assert index.ids == ts.ids and index.meta["skipped"] == 2


def test_a_second_image_and_linked_images_are_reported_not_dropped_silently(tmp_path):
    """A sample's second image member is not read, and a link member is never followed (its
    target may lie outside the shard): both are named in the listing's warnings (the sample
    kept) or skips (a sample whose only image is a link)."""
    a, b = training_image("a", 16), training_image("b", 16)
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tf:
        _add(tf, "k1.png", _encode(a, "PNG"))
        _add(tf, "k1.jpg", _encode(b, "JPEG"))  # a second image of k1
        _add(tf, "k1.txt", "one")
        _add(tf, "k2.png", _encode(b, "PNG"))
        link = tarfile.TarInfo("k2.webp")  # k2's second "image": a link
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        only = tarfile.TarInfo("k3.png")  # k3's only image is a link
        only.type, only.linkname = tarfile.LNKTYPE, "k2.png"
        tf.addfile(only)
        _add(tf, "k3.txt", "three")
    listing = list_source(shard)
    assert listing.ids == ["k1", "k2"]
    warned = {w["id"]: w["reason"] for w in listing.warnings}
    assert set(warned) == {"k1", "k2"}
    assert "k1.jpg is a second image of sample k1" in warned["k1"] and "k1.png, is" in warned["k1"]
    assert "k2.webp is a link" in warned["k2"]
    assert [(s["id"], "k3.png is a link" in s["reason"]) for s in listing.skipped] == [("k3", True)]
    ts = load_training_set(shard, size=(16, 16))
    assert ts.ids == ["k1", "k2"] and np.array_equal(ts.images[0], a)  # the first image, not the second
    assert ts.summary()["warnings"] == 2 and ts.summary()["skipped"] == 1
