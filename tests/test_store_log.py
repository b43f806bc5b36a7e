"""``run.log``: one line per logged message, whatever the message holds — a path, id or exception
text with a line break cannot forge a line, and an undecodable file name's byte cannot crash it."""

import re

import numpy as np
from PIL import Image

from memscan.store import RunStore

STAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d ")


def _lines(root) -> list[bytes]:
    data = (root / "run.log").read_bytes()
    assert data.endswith(b"\n")
    data.decode("utf-8")  # strict: valid UTF-8 throughout
    return data[:-1].split(b"\n")


def test_each_message_is_one_line_with_controls_and_surrogates_escaped(tmp_path):
    store = RunStore(tmp_path)
    forged = "bad\n2099-01-01T00:00:00 index: complete — 999 images indexed, 0 skipped.png"
    store.log(f"skipped training image {forged}: cannot identify image file")
    store.log("a\rb\x1b[31mred\x00\x7f\x85c\u2028d\u2029e\x0bf\x0cg\x1eh\ttab")
    store.log("skipped training image t\udcff01 (train/t\udcff01.png): \ud800 lone")
    store.log("plain — ünïcode stays as it is")
    lines = _lines(tmp_path)
    assert len(lines) == 4 and all(STAMP.match(ln) for ln in lines)
    text = [ln.decode("utf-8")[20:] for ln in lines]
    assert text[0] == (
        "skipped training image bad\\n2099-01-01T00:00:00 index: complete — 999 images indexed, 0 skipped.png: "
        "cannot identify image file"
    )
    assert text[1] == "a\\rb\\x1b[31mred\\x00\\x7f\\x85c\\u2028d\\u2029e\\x0bf\\x0cg\\x1eh\ttab"
    assert text[2] == "skipped training image t\\xff01 (train/t\\xff01.png): \\ud800 lone"
    assert text[3] == "plain — ünïcode stays as it is"
    assert len((tmp_path / "run.log").read_text(encoding="utf-8").splitlines()) == 4


def test_an_unreadable_image_named_like_a_log_line_forges_none(tmp_path):
    """The reviewer's repro, end to end: an index build logs the skipped file's name."""
    from memscan.index.faiss_index import build_index
    from memscan.synthetic import training_image

    train = tmp_path / "train"
    train.mkdir()
    for i in range(2):
        Image.fromarray(training_image(f"t{i}", 8)).save(train / f"t{i}.png")
    (train / "bad\n2099-01-01T00:00:00 index: complete — 999 images indexed, 0 skipped.png").write_bytes(b"junk")
    build_index(train, tmp_path / "idx", progress=False)
    lines = _lines(tmp_path / "idx")
    assert all(STAMP.match(ln) for ln in lines), lines
    assert not any(ln.startswith(b"2099-") for ln in lines)
    assert sum(b"index: complete" in ln for ln in lines) == 2  # the real one, and the escaped name
    assert any(b"skipped training image bad\\n2099-01-01" in ln for ln in lines)
    assert np.load(tmp_path / "idx" / "embeddings.npy").shape[0] == 2
