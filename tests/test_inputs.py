"""Training-set and prompt readers: formats, skips that are counted, errors that name the fix."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from memscan import InputError, load_prompts, load_training_set
from memscan.synthetic import training_image


def _png(path, arr):
    Image.fromarray(arr).save(path)


def test_folder_with_captions_and_a_corrupt_file(tmp_path):
    for i in range(3):
        _png(tmp_path / f"a{i}.png", training_image(f"a{i}", 16))
    (tmp_path / "a1.txt").write_text("a caption\n")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.md").write_text("not an image")
    ts = load_training_set(tmp_path, size=(16, 16), channels=3)
    assert ts.ids == ["a0", "a1", "a2"]
    assert ts.captions == ["", "a caption", ""]
    assert ts.images.shape == (3, 16, 16, 3) and ts.images.dtype == np.uint8
    np.testing.assert_array_equal(ts.images[2], training_image("a2", 16))
    assert sorted(s["id"] for s in ts.skipped) == ["broken", "empty"]
    assert ts.summary()["skipped"] == 2


def test_modes_and_sizes_are_converted(tmp_path):
    rgb = training_image("x", 32)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(rgb).resize((48, 40)).save(tmp_path / "big.png")
    ts = load_training_set(tmp_path, size=(32, 32), channels=3)
    assert ts.images.shape == (4, 32, 32, 3)
    gray = load_training_set(tmp_path, size=(32, 32), channels=1)
    assert gray.images.shape == (4, 32, 32, 1)
    deep = gray.images[gray.ids.index("deep")][:, :, 0]
    assert np.abs(deep.astype(int) - rgb[:, :, 0]).max() <= 1  # 16-bit scaled back to 8-bit


def test_manifest_csv_and_parquet_and_escape_refused(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(2):
        _png(tmp_path / "img" / f"{i}.png", training_image(str(i), 8))
    df = pd.DataFrame({"id": ["x0", "x1"], "path": ["img/0.png", "img/1.png"], "caption": ["c0", "c1"]})
    df.to_csv(tmp_path / "m.csv", index=False)
    df.to_parquet(tmp_path / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        ts = load_training_set(tmp_path / name, size=(8, 8))
        assert ts.ids == ["x0", "x1"] and ts.captions == ["c0", "c1"]
    bad = pd.DataFrame({"id": ["e"], "path": ["../../etc/passwd"]})
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match="outside"):
        load_training_set(tmp_path / "bad.csv")
    pd.DataFrame({"id": ["e"]}).to_csv(tmp_path / "nopath.csv", index=False)
    with pytest.raises(InputError, match="lacks column"):
        load_training_set(tmp_path / "nopath.csv")


def test_symlink_out_of_folder_is_not_followed(tmp_path):
    outside = tmp_path / "secret.png"
    _png(outside, training_image("s", 8))
    root = tmp_path / "train"
    root.mkdir()
    _png(root / "ok.png", training_image("ok", 8))
    (root / "link.png").symlink_to(outside)
    assert load_training_set(root).ids == ["ok"]


def test_empty_training_set_is_an_error(tmp_path):
    with pytest.raises(InputError, match="holds no images"):
        load_training_set(tmp_path)
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(InputError, match="could be read"):
        load_training_set(tmp_path)


def test_prompts_text_and_tables(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  \nsecond\n")
    df, info = load_prompts(tmp_path / "p.txt")
    assert df["prompt_id"].tolist() == ["line-1", "line-4"] and df["prompt"].tolist() == ["first", "second"]
    assert info["blank_lines_skipped"] == 2
    t = pd.DataFrame(
        {"prompt_id": ["a", "b"], "prompt": ["x", "y"], "train_id": ["t1", ""], "duplicate_count": [3, None]}
    )
    t.to_csv(tmp_path / "p.csv", index=False)
    df, _ = load_prompts(tmp_path / "p.csv")
    assert df["train_id"].tolist() == ["t1", None]
    assert df["duplicate_count"].tolist()[0] == 3 and pd.isna(df["duplicate_count"].tolist()[1])


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"a\n\xff\xfe\n", "not UTF-8"),
        (b"\n\n", "no prompts"),
        ("x" * 100_001 + "\n", "longer than"),
    ],
)
def test_bad_prompt_files(tmp_path, content, needle):
    p = tmp_path / "p.txt"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match=needle):
        load_prompts(p)


def test_duplicate_prompt_ids_and_missing_columns(tmp_path):
    pd.DataFrame({"prompt_id": ["a", "a"], "prompt": ["x", "y"]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(InputError, match="repeats prompt ids"):
        load_prompts(tmp_path / "d.csv")
    pd.DataFrame({"id": ["a"], "text": ["x"]}).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(InputError, match="prompt_id"):
        load_prompts(tmp_path / "m.parquet")
