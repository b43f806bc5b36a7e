"""Duplicate counting recovers planted duplicates (resized and JPEG-recompressed copies included)
with exact counts; unique images count 1; the prompts file is what `memscan extract` reads."""

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from memscan import ExtractConfig, InputError, extract, load_prompts
from memscan.data.duplicates import DuplicateConfig, count_duplicates, select_candidates
from memscan.index.faiss_index import IndexParams, build_index
from memscan.synthetic import SyntheticGenerator, keyed_rng, smooth_image

#: planted groups: name → how each copy is made from the 64×64 original
GROUPS = {
    "a": ["orig", "resize40", "jpeg60", "resize48+jpeg50"],
    "b": ["orig", "jpeg75", "jpeg40"],
    "c": ["orig", "resize48"],
}
UNIQUE = 24


def _copy(img: np.ndarray, how: str) -> Image.Image:
    im = Image.fromarray(img)
    for step in how.split("+"):
        if step.startswith("resize"):
            side = int(step[6:])
            im = im.resize((side, side), Image.BICUBIC)
        elif step.startswith("jpeg"):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=int(step[4:]))
            buf.seek(0)
            im = Image.open(buf)
            im.load()
    return im


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A training folder with known duplicate groups, an embedding-only look-alike, and uniques."""
    root = tmp_path_factory.mktemp("dups") / "train"
    root.mkdir()
    expected = {}
    for g, copies in GROUPS.items():
        base = smooth_image(keyed_rng("planted", g), 64)
        for k, how in enumerate(copies):
            tid = f"{g}{k}"
            _copy(base, how).save(root / f"{tid}.{'jpg' if 'jpeg' in how else 'png'}")
            (root / f"{tid}.txt").write_text(f"caption of {g}")
            expected[tid] = len(copies)
    # a low-contrast version of an image: correlation 1 (the pixel embedder cannot tell), but
    # far in pixels — the pixel check must reject the pair
    look = smooth_image(keyed_rng("planted", "look"), 64)
    Image.fromarray(look).save(root / "look.png")
    Image.fromarray((look.astype(np.float64) * 0.4 + 90).round().astype(np.uint8)).save(root / "look_faded.png")
    expected["look"] = expected["look_faded"] = 1
    for i in range(UNIQUE):
        tid = f"u{i:02d}"
        Image.fromarray(smooth_image(keyed_rng("unique", i), 64)).save(root / f"{tid}.png")
        (root / f"{tid}.txt").write_text(f"unique {i}")
        expected[tid] = 1
    return root, expected


def _check_counts(table: pd.DataFrame, expected: dict):
    got = dict(zip(table["train_id"], table["duplicate_count"]))
    assert got == expected
    # clusters: exactly the planted groups
    clusters = table.groupby("cluster_id")["train_id"].apply(lambda s: "".join(sorted(x[0] for x in s)))
    multi = sorted(v for v in clusters if len(v) > 1)
    assert multi == ["aaaa", "bbb", "cc"]
    assert (table["cluster_size"] == table["duplicate_count"]).all()


def test_planted_duplicates_are_counted_exactly(planted):
    root, expected = planted
    counts = count_duplicates(root, DuplicateConfig(), progress=False)
    _check_counts(counts.table, expected)
    s = counts.summary
    assert s["config"]["tau"] == 0.9 and s["config"]["pixel_delta"] == 0.1
    assert s["confirmed_pairs"] == 6 + 3 + 1  # C(4,2) + C(3,2) + C(2,2)
    assert s["rejected_by_pixel_check"] >= 1  # the faded look-alike
    assert s["duplicate_count_histogram"] == {1: UNIQUE + 2, 2: 2, 3: 3, 4: 4}
    assert not counts.table["capped"].any()
    # every confirmed pair is within the pixel threshold and above τ
    assert (counts.pairs["tiled_l2"] <= 0.1).all() and (counts.pairs["cosine"] >= 0.9).all()
    # without the pixel check the look-alike pair is (wrongly) counted: the check is what stops it
    loose = count_duplicates(root, DuplicateConfig(pixel_delta=None), progress=False).table
    assert dict(zip(loose["train_id"], loose["duplicate_count"]))["look_faded"] == 2


def test_counts_agree_through_a_prebuilt_index_and_a_second_decoding_pass(planted, tmp_path):
    root, expected = planted
    build_index(root, tmp_path / "flat", progress=False)
    _check_counts(count_duplicates(root, index=tmp_path / "flat", progress=False).table, expected)
    build_index(root, tmp_path / "hnsw", index_type=IndexParams("hnsw"), progress=False)
    _check_counts(count_duplicates(root, index=tmp_path / "hnsw", progress=False).table, expected)
    # pixel-check images decoded again for the involved rows only (no room to keep them all)
    _check_counts(count_duplicates(root, max_check_bytes=0, progress=False).table, expected)


def test_neighbour_cap_is_flagged(planted):
    root, _ = planted
    t = count_duplicates(root, DuplicateConfig(max_neighbors=2), progress=False).table
    a = t[t["train_id"].str.match(r"a\d")]
    # each image keeps its 2 most similar candidates; pairs are symmetric, so a count is a lower
    # bound between cap + 1 and the truth
    assert a["capped"].all() and a["duplicate_count"].between(3, 4).all()
    assert not t[t["train_id"].str.startswith("u")]["capped"].any()


def test_prompts_file_is_read_by_extract(planted, tmp_path):
    root, _ = planted
    out = tmp_path / "prompts.csv"
    res = select_candidates(root, out, top=4, progress=False)
    df, _ = load_prompts(out)
    assert df["duplicate_count"].tolist() == [4, 3, 2, 1]
    assert df["prompt"].tolist()[:3] == ["caption of a", "caption of b", "caption of c"]
    assert df["train_id"].str[0].tolist()[:3] == ["a", "b", "c"] and df["prompt_id"].is_unique
    summary = json.loads((tmp_path / "prompts.candidates.json").read_text())
    assert summary["config"]["tau"] == 0.9 and summary["prompts_written"] == 4
    dup = pd.read_parquet(tmp_path / "prompts.duplicates.parquet")
    assert len(dup) == len(res.counts.table) and dup["duplicate_count"].max() == 4
    with pytest.raises(InputError, match="already exists"):
        select_candidates(root, out, top=4, progress=False)
    with pytest.raises(InputError, match=".csv or .parquet"):
        select_candidates(root, tmp_path / "prompts.txt", top=4, progress=False)
    # `memscan extract` takes the file as is: train_id and duplicate_count travel into the run
    rep = df["train_id"][0]
    gen = SyntheticGenerator({"caption of a": rep}, size=64, copy_rate=0.6, noise=0.0)
    cfg = ExtractConfig(samples_per_prompt=12, min_clique=4, shard_size=2)
    run = extract(gen, out, root, tmp_path / "run", cfg, progress=False)
    assert (
        run.prompts[["train_id", "duplicate_count"]].astype(str).values.tolist()
        == df[["train_id", "duplicate_count"]].astype(str).values.tolist()
    )
    det = run.detections.set_index("prompt_id")
    assert bool(det.loc[rep, "detected"]) and int(det.loc[rep, "duplicate_count"]) == 4


def test_cli_candidates(planted, tmp_path):
    from typer.testing import CliRunner

    from memscan.cli import app

    root, _ = planted
    out = tmp_path / "p.parquet"
    r = CliRunner().invoke(app, ["candidates", str(root), "--top", "2", "--out", str(out), "--quiet", "--tau", "0.95"])
    assert r.exit_code == 0, r.output
    assert "3 clusters" in r.output and "2 prompts" in r.output
    assert pd.read_parquet(out)["duplicate_count"].tolist() == [4, 3]
    bad = CliRunner().invoke(
        app, ["candidates", str(root), "--top", "2", "--out", str(tmp_path / "x.csv"), "--tau", "2"]
    )
    assert bad.exit_code == 2 and "tau" in bad.output


def test_an_image_the_index_could_not_decode_is_skipped_not_missing_from_the_index(tmp_path):
    """TRAIN + --index: a corrupt file the index build skipped is a skipped file here too (not
    "not in the index": rebuilding would not help); an image added after the build is not in
    the index."""
    root = tmp_path / "train"
    root.mkdir()
    for i in range(6):
        Image.fromarray(smooth_image(keyed_rng(f"i{i}"), 16)).save(root / f"i{i}.png")
    (root / "broken.png").write_bytes(b"not an image")
    build_index(root, tmp_path / "idx", progress=False)
    s = count_duplicates(root, index=tmp_path / "idx", progress=False).summary
    assert (s["skipped"], s["not_in_index"]) == (1, 0)
    assert [f["id"] for f in s["skipped_files"]] == ["broken"]
    # past the first 100 named failures the index still knows every failed id
    from memscan.index.faiss_index import TrainingIndex

    idx = TrainingIndex.load(tmp_path / "idx")
    idx.meta["skipped_files"] = []  # as if "broken" were the 101st failure
    s = count_duplicates(root, index=idx, progress=False).summary
    assert (s["skipped"], s["not_in_index"]) == (1, 0) and s["skipped_files"][0]["id"] == "broken"
    Image.fromarray(smooth_image(keyed_rng("new"), 16)).save(root / "new.png")
    s = count_duplicates(root, index=tmp_path / "idx", progress=False).summary
    assert (s["skipped"], s["not_in_index"]) == (1, 1)


def test_a_pair_at_exactly_the_pixel_delta_is_confirmed_whatever_its_type():
    """``--pixel-delta`` confirms a pair when tiled ℓ2 ≤ δ. By hand: 8×8×1 images, grid 4 (tiles
    of 2×2), one pixel per tile raised by 51 → sqrt(51² / 4) / 255 = 0.1 exactly, the default δ.
    A float64 δ compared the float32 distance 0.10000000149 in float64 and lost the tie."""

    from memscan.data.duplicates import count_duplicates_arrays
    from memscan.index.embedders import PixelEmbedder

    a = np.random.default_rng(3).integers(0, 200, (8, 8, 1), dtype=np.uint8)
    b = a.copy()
    b[::2, ::2] += 51
    x = np.stack([a, b])
    for delta in (0.1, np.float64(0.1), np.float32(0.1)):
        cfg = DuplicateConfig(tau=-1.0, pixel_delta=delta, check_size=8)
        r = count_duplicates_arrays(PixelEmbedder(size=8, channels=1).embed(x), x, ["a", "b"], config=cfg)
        assert r.table["duplicate_count"].tolist() == [2, 2], type(delta)
    below = DuplicateConfig(tau=-1.0, pixel_delta=float(np.nextafter(np.float32(0.1), np.float32(0))), check_size=8)
    r = count_duplicates_arrays(PixelEmbedder(size=8, channels=1).embed(x), x, ["a", "b"], config=below)
    assert r.table["duplicate_count"].tolist() == [1, 1]


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_range_search_keeps_exactly_the_rows_whose_exact_cosine_reaches_the_threshold(kind):
    """Against float64 brute force, with thresholds set on pairs' exact cosines (the float32
    value rounded up past the threshold used to be lost: 42 of 300 such pairs on a flat index).
    Flat: exactly the brute-force set. Every index: each returned similarity is the exact cosine
    (ivfpq's used to be its compressed approximation: 0.87 for a byte-identical copy) and every
    returned row reaches the threshold."""
    from memscan.index.embedders import l2_normalize
    from memscan.index.faiss_index import TrainingIndex

    rng = np.random.default_rng(0)
    n, d = 400, 64
    emb = l2_normalize(rng.normal(size=(20, d))[rng.integers(0, 20, n)] + rng.normal(0, 0.15, (n, d)))
    emb = emb.astype(np.float32)
    params = IndexParams(kind, nlist=4, nprobe=4, pq_m=8) if kind != "flat" else IndexParams("flat")
    index = TrainingIndex.from_embeddings(emb, [str(i) for i in range(n)], None, params)
    exact = emb.astype(np.float64) @ emb.astype(np.float64).T
    checked = returned = 0
    for i in range(0, n, 8):
        lims, sims, rows = index.range_search(emb[i : i + 1], 0.5)  # far below: the compressed index finds some
        np.testing.assert_allclose(sims, exact[i, rows], rtol=0, atol=1e-6)
        assert (exact[i, rows] >= 0.5).all() and len(rows) > 0
        returned += len(rows)
        for j in np.argsort(-exact[i])[1:4]:
            # the pair sits on the threshold (1e-12 above it: float64 sums in another order differ
            # by ~1e-16; float32 similarities by up to ~1e-7, which used to lose it)
            tau = float(exact[i, j]) - 1e-12
            lims, sims, rows = index.range_search(emb[i : i + 1], tau)
            assert lims.tolist() == [0, len(rows)]
            np.testing.assert_allclose(sims, exact[i, rows], rtol=0, atol=1e-6)
            assert (exact[i, rows] >= tau - 1e-12).all()
            if kind == "flat":
                assert j in rows
                assert set(np.flatnonzero(exact[i] >= tau + 1e-12)) <= set(rows.tolist())
                assert set(rows.tolist()) <= set(np.flatnonzero(exact[i] >= tau - 1e-12))
            checked += 1
    assert checked == 150 and returned > 50
