"""Training images whose file name is not valid UTF-8 (an undecodable byte): refused at listing
with one error naming the file and the fix (rename it), before any run writes anything — never a
UnicodeEncodeError from the listing's hash, the run's log or its tables."""

import io
import os
import tarfile

import pytest
from PIL import Image
from typer.testing import CliRunner

from memscan import InputError, load_training_set
from memscan.cli import app
from memscan.data.training import list_source, training_set_sha256
from memscan.synthetic import training_image, write_training_set

BAD = b"t\xff01.png"  # a valid PNG under a Latin-1 name: not UTF-8


def _train_with_bad_name(root):
    write_training_set(str(root), 3, size=16)
    os.rename(os.path.join(os.fsencode(root), b"t0001.png"), os.path.join(os.fsencode(root), BAD))
    return root


def test_a_folder_image_named_in_another_encoding_is_refused_naming_it(tmp_path):
    train = _train_with_bad_name(tmp_path / "train")
    for read in (list_source, load_training_set, training_set_sha256):
        with pytest.raises(InputError) as err:
            read(train)
        # shown as the bytes on disk, with the fix; the message itself is printable UTF-8
        assert "t\\xff01.png" in err.value.message and "not valid UTF-8" in err.value.message
        assert "rename" in err.value.hint
        str(err.value).encode("utf-8")


def test_a_training_folder_named_in_another_encoding_is_refused(tmp_path):
    root = os.path.join(os.fsencode(tmp_path), b"tr\xe9ning")
    os.mkdir(root)
    write_training_set(os.fsdecode(root), 2, size=8)
    with pytest.raises(InputError, match=r"tr\\xe9ning.* not valid UTF-8 \(and 1 more"):
        list_source(os.fsdecode(root))


def test_a_webdataset_member_named_in_another_encoding_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(training_image("a", 8)).save(buf, "PNG")
    data = buf.getvalue()
    with tarfile.open(tmp_path / "00000.tar", "w", encoding="utf-8", errors="surrogateescape") as tf:
        for name in ("ok.png", os.fsdecode(b"b\xff.png")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(InputError, match=r"00000\.tar:b\\xff\.png .*not valid UTF-8"):
        list_source(tmp_path / "00000.tar")


@pytest.mark.parametrize("command", ["index", "candidates"])
def test_the_cli_gives_one_clear_error_and_writes_no_run(tmp_path, command):
    """The reviewer's repro: `memscan index` / `memscan candidates` crashed with a traceback."""
    train = _train_with_bad_name(tmp_path / "train")
    out = tmp_path / ("idx" if command == "index" else "c.csv")
    argv = [command, str(train), "--out", str(out)] + (["--top", "2"] if command == "candidates" else [])
    res = CliRunner().invoke(app, argv)
    assert res.exception is None or isinstance(res.exception, SystemExit), f"crashed: {res.exception!r}"
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert "t\\xff01.png" in lines[0] and "rename" in lines[0]
    if command == "index":
        assert not (out / "manifest.json").exists() and not (out / "run.log").exists()
        # renamed, the same --out builds the index
        os.rename(os.path.join(os.fsencode(train), BAD), os.path.join(os.fsencode(train), b"t0001.png"))
        res = CliRunner().invoke(app, argv)
        assert res.exit_code == 0, res.output
        assert (out / "index.json").exists()
    else:
        assert not out.exists()
