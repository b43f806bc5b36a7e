"""``extract-unconditional`` and ``candidates`` through the training index (issue 18).

The reference of each is its path that decodes the whole training set: ``--train`` (exact
search, or the index re-ranked over the decoded set). Through an index folder nothing but the
retrieved images is decoded; with a flat index and K ≥ the training-set size the tables equal
the decoding path's, and with K < N they equal the index-over-decoded-set path's exactly (the
same retrieval, the same integer-exact pixel distances).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from memscan.errors import InputError
from memscan.extraction.unconditional import UnconditionalConfig, extract_unconditional
from memscan.index.faiss_index import TrainingIndex, build_index
from memscan.synthetic import SyntheticGenerator, write_training_set

SIZE = 16
MEMORIZED = "t0007"
N_TRAIN = 120


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    root = tmp_path_factory.mktemp("nbr") / "train"
    write_training_set(root, N_TRAIN, size=SIZE)
    return root


@pytest.fixture(scope="module")
def index(train, tmp_path_factory):
    out = tmp_path_factory.mktemp("nbr") / "idx"
    build_index(train, out, embedder="pixel:8", index_type="flat", progress=False)
    return out


def _gen():
    return SyntheticGenerator({"": MEMORIZED}, size=SIZE, copy_rate=0.3, noise=0.01)


def _refuse_decoding(monkeypatch):
    import memscan.data.training as training_mod

    def refuse(*a, **k):
        raise AssertionError("the training set was decoded whole")

    # every path loads a training set through memscan.data.training (training_at_shape)
    monkeypatch.setattr(training_mod, "load_training_set", refuse)
    monkeypatch.setattr(training_mod, "decode_training_set", refuse)


GEN_COLS = ["nearest_train_id", "nearest_distance", "calibrated", "extracted", "n_nearest"]


@pytest.mark.parametrize("metric", ["l2", "tiled_l2"])
def test_unconditional_through_the_index_equals_the_decoding_paths(train, index, tmp_path, monkeypatch, metric):
    cfg = UnconditionalConfig(samples=40, shard_size=16, batch_size=8, n_nearest=20, metric=metric)
    exact = extract_unconditional(_gen(), train, tmp_path / "exact", cfg, progress=False)
    # the index over the decoded training set (a loaded TrainingIndex: the decoding path)
    loaded = TrainingIndex.load(index)
    few = UnconditionalConfig(**{**cfg.to_dict(), "n_candidates": 30})
    decoded_few = extract_unconditional(_gen(), train, tmp_path / "dec", few, index=loaded, progress=False)
    _refuse_decoding(monkeypatch)
    # K ≥ N: the exact answer (distances exact integers on both sides; exact search's are
    # float32 except the nearest, so compared to 1e-6)
    all_k = UnconditionalConfig(**{**cfg.to_dict(), "n_candidates": N_TRAIN})
    via = extract_unconditional(_gen(), None, tmp_path / "via", all_k, index=index, progress=False)
    pd.testing.assert_frame_equal(via.generations[GEN_COLS], exact.generations[GEN_COLS], rtol=1e-6)
    assert via.extractions["train_id"].tolist() == exact.extractions["train_id"].tolist() == [MEMORIZED]
    assert via.extractions["hits"].tolist() == exact.extractions["hits"].tolist()
    # K < N: the very tables of the index re-ranked over the decoded set
    via_few = extract_unconditional(_gen(), None, tmp_path / "via_few", few, index=index, progress=False)
    cols = [c for c in via_few.generations.columns if c != "candidate_image"]
    pd.testing.assert_frame_equal(via_few.generations[cols], decoded_few.generations[cols], check_exact=True)
    pd.testing.assert_frame_equal(
        via_few.extractions.drop(columns=["candidate_image"]),
        decoded_few.extractions.drop(columns=["candidate_image"]),
        check_exact=True,
    )
    # the manifest says how: index, its type, K; what was read; nothing else decoded
    m = via_few.manifest
    assert m["search"]["search"] == "index" and m["search"]["training_decoded"] is False
    assert m["search"]["index_type"] == "flat" and m["search"]["retrieve"] == 30
    assert m["training_set"]["via_index"] == str(index.resolve()) and m["training_set"]["images"] == N_TRAIN
    r = m["retrieval"]
    assert r["candidates"] == 40 and r["retrieved"] == 40 * 30 and r["skipped_count"] == 0
    assert 30 <= r["decoded"] <= 40 * 30 and r["bytes_read"] > 0
    assert (tmp_path / "via_few" / via_few.extractions["train_image"].iloc[0]).exists()


def test_unconditional_index_inputs(train, index, tmp_path):
    cfg = UnconditionalConfig(samples=8, n_nearest=5, n_candidates=10)
    with pytest.raises(InputError, match="does not exist"):
        extract_unconditional(_gen(), None, tmp_path / "a", cfg, index=tmp_path / "missing", progress=False)
    with pytest.raises(InputError, match="needs the training set"):
        extract_unconditional(_gen(), None, tmp_path / "b", cfg, progress=False)
    # an index of another training set: none of its ids is in the source given
    other = tmp_path / "other"
    write_training_set(other, 5, size=SIZE, prefix="o")
    with pytest.raises(InputError, match="no id of the index"):
        extract_unconditional(_gen(), other, tmp_path / "c", cfg, index=index, progress=False)
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing written before the error


def test_cli_extract_unconditional_with_index_only(index, tmp_path):
    from typer.testing import CliRunner

    from memscan.cli import app

    args = ["extract-unconditional", "--model", "py:gen_support:unconditional16", "--index", str(index),
            "--n-candidates", "20", "--n-nearest", "10", "--samples", "24", "--shard-size", "12",
            "--out", str(tmp_path / "run"), "--quiet"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    g = pd.read_parquet(tmp_path / "run" / "generations.parquet")
    assert len(g) == 24 and (g["n_nearest"] == 10).all() and np.isfinite(g["calibrated"]).all()
    # the report says that the neighbourhood is taken among the retrieved images
    res = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "the n nearest among the 20 retrieved training images" in (tmp_path / "run" / "report.html").read_text()


# ---- memscan candidates --index without TRAIN ------------------------------------------------
@pytest.fixture(scope="module")
def planted_dups(tmp_path_factory):
    from test_candidates import planted

    return planted.__wrapped__(tmp_path_factory)


def test_candidates_through_the_index_equal_the_listing_path(planted_dups, tmp_path, monkeypatch):
    from test_candidates import _check_counts

    from memscan.data.duplicates import DuplicateConfig, count_duplicates, select_candidates

    root, expected = planted_dups
    build_index(root, tmp_path / "idx", progress=False)
    listed = count_duplicates(root, DuplicateConfig(), index=tmp_path / "idx", progress=False)
    import memscan.data.duplicates as dup_mod

    def refuse(*a, **k):
        raise AssertionError("the training set was listed or decoded")

    monkeypatch.setattr(dup_mod, "list_source", refuse)
    monkeypatch.setattr(dup_mod, "iter_batches", refuse)
    via = count_duplicates(None, DuplicateConfig(), index=tmp_path / "idx", progress=False)
    _check_counts(via.table, expected)  # the planted groups, counted exactly
    pd.testing.assert_frame_equal(via.table, listed.table, check_exact=True)
    pd.testing.assert_frame_equal(via.pairs, listed.pairs, check_exact=True)
    v = via.summary["via_index"]
    assert v["training_decoded"] is False and v["index_type"] == "flat"
    # only the images in candidate pairs were read: the 9 planted copies and the look-alike pair
    assert v["decoded"] == 11 and v["bytes_read"] > 0
    res = select_candidates(None, tmp_path / "p.csv", 3, index=tmp_path / "idx", progress=False)
    assert res.prompts["duplicate_count"].tolist() == [4, 3, 2]


def test_cli_candidates_with_index_only(planted_dups, tmp_path):
    import json

    from typer.testing import CliRunner

    from memscan.cli import app

    root, _ = planted_dups
    build_index(root, tmp_path / "idx", progress=False)
    res = CliRunner().invoke(app, ["candidates", "--index", str(tmp_path / "idx"), "--top", "2",
                                   "--out", str(tmp_path / "p.csv"), "--quiet"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert pd.read_csv(tmp_path / "p.csv")["duplicate_count"].tolist() == [4, 3]
    summary = json.loads((tmp_path / "p.candidates.json").read_text())
    assert summary["via_index"]["index"] == str(tmp_path / "idx")
    # no TRAIN and no index: one clear error
    res = CliRunner().invoke(app, ["candidates", "--top", "2", "--out", str(tmp_path / "q.csv")])
    assert res.exit_code != 0 and "--index" in res.output and not (tmp_path / "q.csv").exists()


# ---- a sharded index served by Ray actors, one per part ----------------------------------------
@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_sharded_index_served_by_ray_actors_equals_the_unsharded_index(ray_address, train, tmp_path, kind):
    from memscan.extraction.verify_index import IndexVerification, IndexVerifier, verify_candidates_indexed
    from memscan.index.faiss_index import IndexParams, serve_index_on_ray
    from memscan.runners.ray_runner import RayIndexParts
    from memscan.synthetic import training_image

    params = dict(index_type=kind) if kind == "flat" else dict(index_type=kind, nlist=4, nprobe=4, pq_m=8)
    build_index(train, tmp_path / "one", embedder="pixel:8", index_type=IndexParams(**params), progress=False)
    build_index(train, tmp_path / "two", embedder="pixel:8", index_type=IndexParams(**params, shards=2),
                progress=False)  # fmt: skip
    one = TrainingIndex.load(tmp_path / "one", mmap=True)
    served = serve_index_on_ray(tmp_path / "two")
    try:
        assert isinstance(served.index, RayIndexParts) and len(served.index.servers) == 2
        assert served.index.ntotal == N_TRAIN and served.index.sizes == [N_TRAIN // 2] * 2
        q = np.asarray(one.embeddings[::7])
        local = TrainingIndex.load(tmp_path / "two", mmap=True)  # the same parts, searched here
        for k in (1, 10, N_TRAIN):  # the parts' answers merged = the unsharded index's answer
            s1, i1 = one.search(q, k)
            s2, i2 = served.search(q, k)
            np.testing.assert_allclose(s2, s1, rtol=0, atol=1e-6)  # BLAS blocks differ with the part sizes
            if kind == "flat":  # (PQ codes tie for near-equal images: their order may differ)
                np.testing.assert_array_equal(i2, i1)
            s3, i3 = local.search(q, k)
            np.testing.assert_array_equal(i2, i3)
            np.testing.assert_array_equal(s2, s3)
        # verification through the served index: the tables of the unsharded one
        ids = [f"t{i:04d}" for i in (3, 7, 50)]
        imgs = np.stack([training_image(t, SIZE) for t in ids])
        cands = pd.DataFrame({"prompt_id": ids, "train_id": ids, "clique_size": 10, "mean_clique_distance": 0.0})
        kw = dict(delta=0.15, grid=4, n_nearest=3)
        spec = IndexVerification(str(tmp_path / "two"), 20)
        a, _ = verify_candidates_indexed(cands, imgs, IndexVerifier(spec), **kw)
        b, _ = verify_candidates_indexed(cands, imgs, IndexVerifier(spec, index=served), **kw)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
        if kind == "flat":
            c, _ = verify_candidates_indexed(
                cands, imgs, IndexVerifier(IndexVerification(str(tmp_path / "one"), 20)), **kw
            )
            pd.testing.assert_frame_equal(a, c, check_exact=True)
        assert a.loc[a["rank"] == 1, "train_id"].tolist() == ids and (a.loc[a["rank"] == 1, "tiled_l2"] == 0).all()
    finally:
        served.index.close()


def test_many_candidates_are_verified_in_chunks_with_the_same_tables(index, monkeypatch):
    """``memscan verify RUN`` passes all candidates at once: verified in bounded chunks, the
    tables are those of one piece (each candidate's retrieval and re-rank is its own)."""
    import memscan.extraction.verify_index as vi
    from memscan.synthetic import training_image

    ids = [f"t{i:04d}" for i in range(0, N_TRAIN, 9)]  # 14 candidates
    imgs = np.stack([training_image(t, SIZE) for t in ids])
    cands = pd.DataFrame({"prompt_id": ids, "train_id": ids, "clique_size": 10, "mean_clique_distance": 0.0})
    verifier = vi.IndexVerifier(vi.IndexVerification(str(index), 12))
    kw = dict(delta=0.15, grid=4, n_nearest=2)
    whole, s1 = vi.verify_candidates_indexed(cands, imgs, verifier, **kw)
    monkeypatch.setattr(vi, "VERIFY_CHUNK", 4)
    assert vi.verification_chunk(12, imgs.shape[1:]) == 4
    chunked, s2 = vi.verify_candidates_indexed(cands, imgs, verifier, **kw)
    # the same rows; distances of far pairs in float32 may differ in the last bit with the images
    # re-ranked together (near pairs are recomputed exactly: the rank-1 copies are exactly 0)
    pd.testing.assert_frame_equal(chunked.drop(columns="tiled_l2"), whole.drop(columns="tiled_l2"), check_exact=True)
    np.testing.assert_allclose(chunked["tiled_l2"], whole["tiled_l2"], rtol=1e-6, atol=0)
    assert s2["candidates"] == s1["candidates"] == 14 and s2["retrieved"] == s1["retrieved"] == 14 * 12
    assert s2["decoded"] >= s1["decoded"]  # an image retrieved by two chunks is read by each
    top = whole[whole["rank"] == 1]
    assert top["train_id"].tolist() == ids and (top["tiled_l2"] == 0).all()
    # the byte bound: 512×512×3 images, K = 100 → 3 candidates a chunk
    assert vi.verification_chunk(100, (512, 512, 3)) == (256 << 20) // (100 * 512 * 512 * 3)


def test_unconditional_through_the_index_in_chunks_gives_the_same_tables(index, tmp_path, monkeypatch):
    import memscan.extraction.unconditional as unc_mod

    cfg = UnconditionalConfig(samples=24, shard_size=24, batch_size=12, n_nearest=10, n_candidates=20)
    whole = extract_unconditional(_gen(), None, tmp_path / "whole", cfg, index=index, progress=False)
    # 5 generations' retrieved images per chunk (20 × 16×16×3 bytes each)
    monkeypatch.setattr(unc_mod, "VERIFY_CHUNK_BYTES", 5 * 20 * SIZE * SIZE * 3)
    chunked = extract_unconditional(_gen(), None, tmp_path / "chunked", cfg, index=index, progress=False)
    cols = [c for c in whole.generations.columns if c != "candidate_image"]
    pd.testing.assert_frame_equal(chunked.generations[cols], whole.generations[cols], check_exact=True)
    a, b = whole.manifest["retrieval"], chunked.manifest["retrieval"]
    assert a["candidates"] == b["candidates"] == 24 and a["retrieved"] == b["retrieved"] == 24 * 20
    assert b["decoded"] >= a["decoded"]
