"""Training-set and prompt readers: formats, skips that are counted, errors that name the fix."""

import json

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
    np.testing.assert_array_equal(deep, rgb[:, :, 0])  # 16-bit v·257 scaled back to v exactly


def test_a_dark_16_bit_image_stays_dark_and_alpha_goes_to_black(tmp_path):
    """16-bit pixels scale by 255/65535 whatever the image holds (a near-black 16-bit image, all
    values ≤ 255, is not read as near-white 8-bit), rounded; half-transparent RGBA is composited
    over black (hand-worked: 200 at alpha 128 → round(200·128/255) = 100)."""
    from memscan.data.images import read_image

    dark = np.array([[0, 128, 255], [129, 250, 3]], np.uint16)  # all ≤ 255: still 16-bit values
    Image.fromarray(dark).save(tmp_path / "dark.png")
    with Image.open(tmp_path / "dark.png") as im:
        assert im.mode.startswith("I")  # what Pillow gives a 16-bit PNG
    got = read_image(tmp_path / "dark.png", channels=1)[:, :, 0]
    np.testing.assert_array_equal(got, np.rint(dark / 257.0).astype(np.uint8))
    assert got.tolist() == [[0, 0, 1], [1, 1, 0]]
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    np.testing.assert_array_equal(read_image(tmp_path / "half.png")[..., 0], np.full((2, 2), 100))


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
    ts = load_training_set(root)
    assert ts.ids == ["ok"]
    # not followed, and said: the manifest's training_set names it among the warnings
    assert [(w["id"], w["path"]) for w in ts.warnings] == [("link", str(root / "link.png"))]
    assert ts.summary()["warnings"] == 1 and "symlink out of" in ts.summary()["warning_files"][0]["reason"]


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


def test_prompt_lines_are_the_files_own_lines_and_a_bom_is_dropped(tmp_path):
    """Only \n (or \r\n) ends a line: a caption holding U+2028, U+0085 or a form feed stays one
    prompt and the ids are the file's line numbers; a UTF-8 byte-order mark is not part of the
    first prompt (nor of a caption file's caption)."""
    (tmp_path / "p.txt").write_bytes("\ufeffa cat\u2028on a mat\r\nsecond\x85part\x0cthird\n\nlast".encode())
    df, info = load_prompts(tmp_path / "p.txt")
    assert df["prompt"].tolist() == ["a cat\u2028on a mat", "second\x85part\x0cthird", "last"]
    assert df["prompt_id"].tolist() == ["line-1", "line-2", "line-4"] and info["blank_lines_skipped"] == 1
    (tmp_path / "imgs").mkdir()
    Image.fromarray(training_image("a", 8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a.txt").write_bytes("\ufeffa caption".encode())
    assert load_training_set(tmp_path / "imgs").captions == ["a caption"]


def test_canary_jsonl_with_a_line_separator_inside_a_string(tmp_path):
    """A JSON string may hold a raw U+2028: the canaries file is still one object a line."""
    from memscan.lm.exposure_run import read_canaries

    row = {"canary": "my PIN is 123\u2028", "format": "my PIN is {d3}\u2028", "copies": 2}
    (tmp_path / "c.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    got = read_canaries(tmp_path / "c.jsonl")
    assert got["canary"].tolist() == [row["canary"]] and got["copies"].tolist() == [2]


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


def test_generations_are_checked_and_brought_into_the_training_images_space(tmp_path):
    """A generator's output: uint8 kept; floats in [0, 1] quantised; RGBA composited over black
    exactly as an RGBA training image is decoded (the same PNG read back); wrong shapes, channel
    counts, dtypes and NaN are one clear error naming the prompt."""
    from memscan.data.images import read_image
    from memscan.errors import InputError
    from memscan.generators.base import check_generations

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (2, 6, 5, 4), dtype=np.uint8)
    got = check_generations(rgba, 2, "p")
    for i in range(2):
        Image.fromarray(rgba[i], "RGBA").save(tmp_path / f"g{i}.png")
        np.testing.assert_array_equal(got[i], read_image(tmp_path / f"g{i}.png"))
    rgb = rgba[..., :3]
    assert check_generations(rgb, 2, "p") is rgb
    np.testing.assert_array_equal(check_generations(rgb / 255.0, 2, "p"), rgb)
    for bad, msg in (
        (rgb[:1], "one image per seed"),
        (rng.integers(0, 256, (2, 6, 5, 2), dtype=np.uint8), "2 channels"),
        (rgb.astype(np.int32), "dtype int32"),
        (np.full((2, 6, 5, 3), np.nan), "NaN"),
        (rgb * 2.0, "outside"),
    ):
        with pytest.raises(InputError, match=msg) as err:
            check_generations(bad, 2, "a red square")
        assert "a red square" in str(err.value)


def test_a_callable_generator_is_named_the_same_in_every_process():
    """The recorded name of a sampling function (part of a run's identity) never holds a memory
    address: a function, a functools.partial and a callable object are named by what they are."""
    import functools

    from memscan.generators.base import CallableGenerator

    def sample(prompt, seeds, scale=1):
        return np.zeros((len(seeds), 4, 4, 1), np.uint8)

    class Sampler:
        def __call__(self, prompt, seeds):
            return sample(prompt, seeds)

    names = [CallableGenerator(f).config["name"] for f in (sample, functools.partial(sample, scale=2), Sampler())]
    assert names[0] == names[1] and names[0].endswith("sample") and names[2].endswith("Sampler")
    assert not any("0x" in n for n in names)


@pytest.mark.parametrize(
    "table, needle",
    [
        (pd.DataFrame({"prompt_id": ["x", "x"], "prompt": ["a", "b"]}), "repeats prompt ids: x"),
        (pd.DataFrame({"prompt_id": ["x", None], "prompt": ["a", "b"]}), "prompt_id is missing .null. in row 1"),
        (pd.DataFrame({"prompt_id": ["x"], "prompt": ["a" * 10_001]}), "longer than"),
        (pd.DataFrame({"id": ["x"], "text": ["a"]}), "lacks column"),
        (["a" * 10_001], "longer than"),
    ],
)
def test_extract_checks_a_prompts_dataframe_or_list_as_it_checks_a_file(tmp_path, table, needle):
    """Repeated ids would share seeds and overwrite each other's files: a DataFrame or list given
    to extract is refused as the same table in a CSV is, before the run directory is written."""
    from memscan import ExtractConfig, extract
    from memscan.synthetic import SyntheticGenerator, write_training_set

    write_training_set(tmp_path / "train", 4, size=8)
    if isinstance(table, pd.DataFrame):
        table.to_parquet(tmp_path / "p.parquet")
        with pytest.raises(InputError, match=needle):
            load_prompts(tmp_path / "p.parquet")
    with pytest.raises(InputError, match=needle):
        extract(SyntheticGenerator({}, size=8), table, tmp_path / "train", tmp_path / "run",
                ExtractConfig(samples_per_prompt=4, min_clique=2), progress=False)  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["abc", "12 copies", "2.5", 2.5])
def test_a_duplicate_count_that_is_not_an_integer_is_an_error_naming_the_prompt(tmp_path, value):
    """Not silently NA (the prompt would drop out of the rate-by-duplicate-count table), nor a raw
    TypeError: one error naming the row, the prompt and the value; an empty cell stays NA."""
    from memscan.data.prompts import validate_prompt_table

    t = pd.DataFrame({"prompt_id": ["a", "b", "c"], "prompt": ["x", "y", "z"], "duplicate_count": ["3", value, ""]})
    t.to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(InputError, match=f"duplicate_count '{value}' of row 1 .prompt 'b'. is not an integer"):
        load_prompts(tmp_path / "p.csv")
    with pytest.raises(InputError, match=f"prompts DataFrame: duplicate_count {value!r} of row 1 .prompt 'b'."):
        validate_prompt_table(t, "prompts DataFrame")
    t["duplicate_count"] = ["3", "4.0", ""]
    t.to_csv(tmp_path / "p.csv", index=False)
    got = load_prompts(tmp_path / "p.csv")[0]["duplicate_count"]
    assert got.dtype == "Int64" and got.tolist()[:2] == [3, 4] and pd.isna(got.tolist()[2])
    got = validate_prompt_table(t.assign(duplicate_count=[3, 4.0, None]))["duplicate_count"]
    assert got.tolist()[:2] == [3, 4] and pd.isna(got.tolist()[2])
