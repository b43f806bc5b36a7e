"""Verification through the training index (issue 18): ``memscan extract --index``.

Independent checks: the ``--train`` path (every training image decoded, exact tiled ℓ2 over all of
them) is the reference; with a flat index and K ≥ the training-set size the tables must be equal
(same matches, distances, k-eidetic counts). Recall of approximate indexes is measured against
exact search; sharded indexes against the unsharded one; webdataset reads by counting bytes.
"""

from __future__ import annotations

import io
import json
import tarfile

import faiss
import numpy as np
import pandas as pd
import pytest
from gen_support import MEMORIZED, planted
from PIL import Image

from memscan.data.training import list_source, load_training_set
from memscan.errors import InputError, MemscanError
from memscan.extraction.config import ExtractConfig
from memscan.extraction.pipeline import extract
from memscan.extraction.verify import verify_candidates
from memscan.extraction.verify_index import IndexVerification, IndexVerifier, verify_candidates_indexed
from memscan.index.embedders import l2_normalize
from memscan.index.faiss_index import IndexParams, TrainingIndex, build_index, merge_searches
from memscan.index.locations import SourceReader
from memscan.synthetic import training_image, write_training_set

PROMPTS = list(MEMORIZED) + [f"fresh {i}" for i in range(3)]
CFG = ExtractConfig(samples_per_prompt=40, batch_size=20, shard_size=4, n_nearest=5)


@pytest.fixture(scope="module")
def flat_index(tmp_path_factory, synth_train):
    out = tmp_path_factory.mktemp("vi") / "flat"
    build_index(synth_train, out, embedder="pixel:8", index_type="flat", progress=False)
    return out


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, synth_train):
    return extract(planted(), PROMPTS, synth_train, tmp_path_factory.mktemp("vi") / "train", CFG, progress=False)


def _ext(result):
    """The extractions in a fixed order, without the index path's own column (``retrieved``)."""
    ext = result.extractions.drop(columns="retrieved", errors="ignore")
    return ext.sort_values(["prompt_id", "rank"]).reset_index(drop=True)


def test_flat_index_with_k_at_least_n_equals_the_train_path(tmp_path, synth_train, flat_index, train_run):
    res = extract(planted(), PROMPTS, None, tmp_path / "idx", CFG, progress=False, index=flat_index, retrieve=500)
    a, b = _ext(train_run), _ext(res)
    assert len(a) == len(MEMORIZED) * CFG.n_nearest  # 5 detected prompts × n_nearest rows
    assert (res.extractions["retrieved"] == 120).all()  # K = 500 > the 120 indexed images: all retrieved
    # same matches, same distances (bit for bit), same k-eidetic counts
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    pd.testing.assert_frame_equal(train_run.detections, res.detections)
    top = b[b["rank"] == 1]
    assert top["extracted"].all() and set(top["train_id"]) == set(MEMORIZED.values())
    m = res.manifest
    assert m["verification"]["via"] == "index" and m["verification"]["index_type"] == "flat"
    assert m["verification"]["retrieve"] == 500 and "lower bound" in m["verification"]["eidetic_k"]
    # K is capped by the 120 indexed images: 5 candidates × 120 retrieved; each shard decodes the
    # distinct retrieved images of its candidates once (2 shards hold candidates: 2 × 120)
    assert m["retrieval"]["retrieved"] == 5 * 120 and m["retrieval"]["decoded"] == 2 * 120
    assert m["retrieval"]["skipped_count"] == 0
    assert m["training_set"]["images"] == 120 and m["training_set"]["source"] == str(synth_train)
    # the matched training images saved (read by random access) are the --train path's, byte for byte
    saved = {p.name: p.read_bytes() for p in (res.run_dir / "images" / "train").glob("*.png")}
    assert saved == {p.name: p.read_bytes() for p in (train_run.run_dir / "images" / "train").glob("*.png")}
    assert len(saved) == 5
    # the report says the k-eidetic counts are bounded by the retrieval
    from memscan.report.html import build_extraction_report

    html = build_extraction_report(res.run_dir).read_text()
    assert "retrieved" in html and "lower bound" in html


def test_verify_rerun_goes_through_the_index(tmp_path, flat_index, train_run):
    import shutil

    from memscan.extraction.pipeline import reverify

    res = extract(planted(), PROMPTS, None, tmp_path / "idx", CFG, progress=False, index=flat_index, retrieve=500)
    again = reverify(res.run_dir, delta=0.0155)
    ref_dir = tmp_path / "ref"
    shutil.copytree(train_run.run_dir, ref_dir)
    ref = reverify(ref_dir, delta=0.0155)
    pd.testing.assert_frame_equal(_ext(ref), _ext(again), check_exact=True)
    assert again.manifest["retrieval"]["retrieved"] == 5 * 120
    assert 0 < again.manifest["counts"]["extractions"] < 5  # the tighter delta drops some


def test_eidetic_counts_with_planted_duplicates_and_small_k(tmp_path, synth_train):
    # three exact copies of t0003 in the training set: k-eidetic count 3 with the full path;
    # through the index with K = 2 the count is bounded by the retrieval (2)
    train = tmp_path / "train"
    train.mkdir()
    for f in synth_train.iterdir():
        (train / f.name).write_bytes(f.read_bytes())
    for c in ("copyA", "copyB"):
        (train / f"{c}.png").write_bytes((synth_train / "t0003.png").read_bytes())
    idx = tmp_path / "idx"
    build_index(train, idx, embedder="pixel:8", index_type="flat", progress=False)
    training = load_training_set(train, size=(32, 32))
    cands = pd.DataFrame(
        {"prompt_id": ["p"], "train_id": ["t0003"], "clique_size": [12], "mean_clique_distance": [0.01]}
    )
    img = training_image("t0003")[None]
    full = verify_candidates(cands, img, training, delta=0.15, grid=4, n_nearest=4)
    assert full["eidetic_k"].iloc[0] == 3
    for k, expect in ((2, 2), (10, 3)):
        v = IndexVerifier(IndexVerification(str(idx), k))
        got, stats = verify_candidates_indexed(cands, img, v, delta=0.15, grid=4, n_nearest=4)
        assert got["eidetic_k"].iloc[0] == expect and stats["retrieved"] == k
        assert set(got["train_id"].iloc[: min(k, 3)]) <= {"t0003", "copyA", "copyB"}
        assert got["tiled_l2"].iloc[0] == 0.0


def _flat_images(tmp_path, values):
    """Training images of one grey level each: their tiled ℓ2 is |a − b| / 255 (hand-worked)."""
    train = tmp_path / "flat_train"
    train.mkdir()
    for name, v in values.items():
        Image.fromarray(np.full((32, 32, 3), v, np.uint8)).save(train / f"{name}.png")
    return train


def test_eidetic_count_is_centred_on_the_training_image_not_the_generation(tmp_path):
    """Carlini et al. 2023, Def. 2: the extracted training image x is k-eidetic when at most k
    training images lie within δ of x. Grey images (tiled ℓ2 = |a − b|/255), δ = 0.15: the
    generation 64 is nearest to x = 100 (36/255 = 0.141, extracted); within δ of x are x, y = 113
    (0.051) and w = 130 (0.118) → 3; z = 27 is within δ of the generation (0.145) but 0.286 from
    x, and y, w are beyond δ of the generation (0.192, 0.259): a count centred on the generation
    would be 2 ({x, z}). Through a flat index with K = N, the same count; a candidate (175)
    with nothing within δ counts 0."""
    values = {"x": 100, "y": 113, "w": 130, "z": 27, "far1": 220, "far2": 255}
    train = _flat_images(tmp_path, values)
    training = load_training_set(train, size=(32, 32))
    want = sum(abs(v - values["x"]) / 255 <= 0.15 for v in values.values())  # the hand-worked count
    assert want == 3
    cands = pd.DataFrame({"prompt_id": ["p", "q"], "train_id": [None, None], "clique_size": [12, 12],
                          "mean_clique_distance": [0.01, 0.01]})  # fmt: skip
    imgs = np.stack([np.full((32, 32, 3), 64, np.uint8), np.full((32, 32, 3), 175, np.uint8)])
    full = verify_candidates(cands, imgs, training, delta=0.15, grid=4, n_nearest=3)
    p, q = full[full["prompt_id"] == "p"], full[full["prompt_id"] == "q"]
    assert p["train_id"].iloc[0] == "x" and bool(p["extracted"].iloc[0])
    assert (p["eidetic_k"] == 3).all()
    assert not q["extracted"].any() and (q["eidetic_k"] == 0).all()
    idx = tmp_path / "idx"
    build_index(train, idx, embedder="pixel:8", index_type="flat", progress=False)
    v = IndexVerifier(IndexVerification(str(idx), len(values)))
    got, stats = verify_candidates_indexed(cands, imgs, v, delta=0.15, grid=4, n_nearest=3)
    assert (got.pop("retrieved") == len(values)).all()
    pd.testing.assert_frame_equal(got.reset_index(drop=True), full.reset_index(drop=True), check_exact=True)
    assert stats["unverified_count"] == 0 and stats["fewer_than_k"] == 0


def test_a_candidate_whose_retrieved_images_are_all_unreadable_is_counted_unverified(tmp_path, flat_index):
    """Nothing is silently skipped: a candidate none of whose retrieved images can be read has no
    extraction rows, and is counted (and named) as unverified; the other candidate is verified."""
    v = IndexVerifier(IndexVerification(str(flat_index), 3))
    real = v.reader.read
    _, rows = v.index.search(v.embedder.embed(training_image("t0005")[None]), 3)
    lost = set(rows[0].tolist())

    def read(wanted, size, channels=3):
        kept, imgs, skipped = real([r for r in wanted if r not in lost], size=size, channels=channels)
        return kept, imgs, skipped + [{"id": str(r), "path": "gone", "reason": "missing"} for r in wanted if r in lost]

    v.reader.read = read
    cands = pd.DataFrame({"prompt_id": ["lost", "kept"], "train_id": ["t0005", "t0040"], "clique_size": [12, 12],
                          "mean_clique_distance": [0.0, 0.0]})  # fmt: skip
    imgs = np.stack([training_image("t0005"), training_image("t0040")])
    got, stats = verify_candidates_indexed(cands, imgs, v, delta=0.15, grid=4, n_nearest=3)
    assert set(got["prompt_id"]) == {"kept"} and got["train_id"].iloc[0] == "t0040"
    assert stats["unverified_count"] == 1 and stats["unverified"] == ["lost"] and stats["skipped_count"] == 3


def test_groups_rerank_each_candidate_among_its_own_retrievals(synth_train, flat_index):
    # K = 4 of 120 and 20 distinct candidates: the retrievals barely overlap, so candidates are
    # re-ranked RERANK_GROUP at a time (one cross_tiled_l2 call per group). Reference, per
    # candidate alone: the index's K rows, then nearest_tiled_l2 over exactly those images
    from memscan.distances import nearest_tiled_l2
    from memscan.extraction import verify_index as vi

    training = load_training_set(synth_train, size=(32, 32))
    rng = np.random.default_rng(3)
    pick = rng.choice(len(training.ids), 20, replace=False)
    noisy = training.images[pick].astype(np.int16) + rng.integers(-20, 21, (20, 32, 32, 3))
    imgs = np.clip(noisy, 0, 255).astype(np.uint8)
    imgs[5] = imgs[4]  # two equal candidates: equal rows
    cands = pd.DataFrame({"prompt_id": [f"c{i}" for i in range(20)], "train_id": [training.ids[i] for i in pick],
                          "clique_size": 9, "mean_clique_distance": 0.01})  # fmt: skip
    k = 4
    v = IndexVerifier(IndexVerification(str(flat_index), k))
    got, stats = verify_candidates_indexed(cands, imgs, v, delta=0.15, grid=4, n_nearest=k)
    assert stats["decoded"] > 2 * k and len(cands) > vi.RERANK_GROUP  # the grouped path ran
    _, rows = v.index.search(v.embedder.embed(imgs), k)
    row_of = {tid: i for i, tid in enumerate(training.ids)}
    for c in range(len(cands)):
        mine = np.sort(np.array([row_of[v.index.ids[r]] for r in rows[c]]))
        dist, idx, _ = nearest_tiled_l2(imgs[c : c + 1], training.images[mine], k=k, grid=4)
        # the k-eidetic count: retrieved images within δ of the extracted training image x
        x = training.images[mine[idx[0][0]]][None]
        _, _, within = nearest_tiled_l2(x, training.images[mine], k=1, grid=4, within=0.15)
        g = got[got["prompt_id"] == f"c{c}"]
        assert g["train_id"].tolist() == [training.ids[mine[i]] for i in idx[0]]
        np.testing.assert_allclose(g["tiled_l2"], dist[0], rtol=1e-5, atol=1e-6)
        assert dist[0][0] <= 0.15  # every candidate is a noisy copy: extracted
        assert (g["eidetic_k"] == within[0]).all() and g["rank"].tolist() == list(range(1, k + 1))
    a, b = got[got["prompt_id"] == "c4"], got[got["prompt_id"] == "c5"]
    assert a["train_id"].tolist() == b["train_id"].tolist() and a["tiled_l2"].tolist() == b["tiled_l2"].tolist()


def test_ivfpq_default_k_extracts_planted_copies_and_recall_is_measured(tmp_path):
    # 2,000 training images (t0000…t1999, the planted ones among them): K = 100 is 5% of the set
    train = tmp_path / "train"
    write_training_set(train, 2000, size=32)
    idx = tmp_path / "pq"
    params = IndexParams("ivfpq", nlist=16, nprobe=4, pq_m=16)
    index = build_index(train, idx, embedder="pixel:8", index_type=params, progress=False)
    assert index.params.pq_bits == 5  # 2,000 vectors: 2^5 centroids of ≥ 39 points each
    codes = faiss.extract_index_ivf(index.index).invlists.compute_ntotal() * 16
    assert codes / len(index) == 16  # pq_m bytes per vector code
    res = extract(planted(), PROMPTS, None, tmp_path / "run", CFG, progress=False, index=idx)
    top = _ext(res)[lambda d: d["rank"] == 1].set_index("prompt_id")
    assert set(top.loc[top["extracted"], "train_id"]) == set(MEMORIZED.values())
    # recall@1 of the exact nearest training image (brute force over all 2,000), measured
    training = load_training_set(train, size=(32, 32))
    det = res.detections[res.detections["detected"]].reset_index(drop=True)
    from memscan.data.images import read_image

    imgs = np.stack([read_image(res.run_dir / p, (32, 32), 3) for p in det["candidate_image"]])
    exact = verify_candidates(det, imgs, training, delta=0.15, grid=4, n_nearest=1).set_index("prompt_id")
    recall = float((top["train_id"] == exact["train_id"]).mean())
    assert recall == 1.0
    # same distances up to the float32 rounding of the tiled kernel (other batch shapes here)
    np.testing.assert_allclose(top["tiled_l2"], exact["tiled_l2"], rtol=1e-4)
    assert res.manifest["verification"]["index_type"] == "ivfpq"
    assert 0 < res.manifest["retrieval"]["retrieved"] <= 5 * 100


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_sharded_index_equals_unsharded(tmp_path, kind):
    rng = np.random.default_rng(3)
    x = l2_normalize(rng.normal(size=(3000, 32)) + 3 * rng.normal(size=(20, 32))[rng.integers(0, 20, 3000)])
    ids = [f"v{i}" for i in range(3000)]
    q = l2_normalize(x[rng.integers(0, 3000, 50)] + 0.05 * rng.normal(size=(50, 32)))
    one = TrainingIndex.from_embeddings(x, ids, params=IndexParams(kind, nlist=16, nprobe=4, pq_m=8))
    two = TrainingIndex.from_embeddings(x, ids, params=IndexParams(kind, nlist=16, nprobe=4, pq_m=8, shards=2))
    s1, i1 = one.search(q, 10)
    s2, i2 = two.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-6)
    # saved in two files; reloaded (memory-mapped) it answers the same
    two.save(tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "two").glob("index*.faiss")) == (
        [] if kind == "flat" else ["index-000.faiss", "index-001.faiss"]
    )
    loaded = TrainingIndex.load(tmp_path / "two", mmap=True)
    s3, i3 = loaded.search(q, 10)
    np.testing.assert_array_equal(i1, i3)
    if kind != "flat":  # memory-mapped inverted lists: no prefetch threads started per search
        lists = [faiss.downcast_InvertedLists(faiss.extract_index_ivf(p).invlists) for p in loaded.index.parts]
        assert [type(x).__name__ for x in lists] == ["OnDiskInvertedLists"] * 2
        assert [x.prefetch_nthread for x in lists] == [0, 0]


def test_merge_searches_orders_by_similarity_then_row():
    a = (np.array([[0.9, 0.5]]), np.array([[4, 7]]))
    b = (np.array([[0.9, 0.7]]), np.array([[2, -1]]))
    s, i = merge_searches([a, b], 3)
    assert i.tolist() == [[2, 4, 7]] and s.tolist()[0][:2] == pytest.approx([0.9, 0.9])


def test_mmap_flat_search_equals_faiss_flat(tmp_path, flat_index):
    mem = TrainingIndex.load(flat_index)
    mm = TrainingIndex.load(flat_index, mmap=True)
    q = mem.embeddings[[3, 50, 99]] + 0.01
    np.testing.assert_array_equal(mem.search(q, 7)[1], mm.search(q, 7)[1])


def test_exact_duplicates_are_retrieved_lowest_rows_first_by_every_kind_of_flat_index(tmp_path):
    """151 exact duplicates of one vector among 400 (a memorized image's copies): the k retrieved
    are the k lowest duplicate rows, in row order, whether the index is in memory, memory-mapped
    (searched in chunks smaller than the ties) or built in parts — one answer, as a brute-force
    stable sort gives it."""
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.normal(size=(400, 16)))
    dup = np.sort(rng.choice(np.arange(1, 400), 150, replace=False))
    x[dup] = x[0]
    ids = [f"v{i}" for i in range(400)]
    q = x[:1] + 0.0
    want = np.argsort(-(x @ q[0]), kind="stable")[:5]  # brute force: ties by the lower row
    assert want.tolist() == [0, *dup[:4].tolist()]
    one = TrainingIndex.from_embeddings(x, ids, params=IndexParams("flat"))
    two = TrainingIndex.from_embeddings(x, ids, params=IndexParams("flat", shards=3))
    one.save(tmp_path / "one")
    mm = TrainingIndex.load(tmp_path / "one", mmap=True)
    mm.index.chunk = 64  # ties spread over several chunks
    for index in (one, two, mm, TrainingIndex.load(tmp_path / "one")):
        np.testing.assert_array_equal(index.search(q, 5)[1][0], want)


def _png(img) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def test_webdataset_retrieved_images_read_by_offset_and_corrupt_members_skipped(tmp_path):
    # a 40-sample shard; the index is built, then member t0007's bytes are damaged in place
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(40):
            data = _png(training_image(f"t{i:04d}"))
            info = tarfile.TarInfo(f"t{i:04d}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    idx = tmp_path / "idx"
    index = build_index(shard, idx, embedder="pixel:8", index_type="flat", progress=False)
    loc = TrainingIndex.load(idx).locations
    entries = list_source(shard).entries
    assert loc["offset"].tolist() == [e.offset for e in entries] and loc["size"].tolist() == [e.size for e in entries]
    raw = bytearray(shard.read_bytes())
    e7 = entries[7]
    raw[e7.offset : e7.offset + e7.size] = b"\0" * e7.size
    shard.write_bytes(bytes(raw))
    # 1. reads by offset: exactly the members' bytes, nothing else of the shard
    reader = SourceReader(index.ids, index.captions, loc)
    kept, imgs, skipped = reader.read([3, 7, 20], size=(32, 32))
    assert kept.tolist() == [3, 20] and reader.bytes_read == entries[3].size + entries[20].size
    assert reader.bytes_read < shard.stat().st_size / 10
    np.testing.assert_array_equal(imgs[0], training_image("t0003"))
    assert skipped[0]["id"] == "t0007" and "t0007.png" in skipped[0]["path"]
    # 2. through verification: the corrupt retrieved member is a counted, named skip
    v = IndexVerifier(IndexVerification(str(idx), 5))
    cands = pd.DataFrame(
        {"prompt_id": ["p"], "train_id": ["t0007"], "clique_size": [12], "mean_clique_distance": [0.0]}
    )
    got, stats = verify_candidates_indexed(cands, training_image("t0007")[None], v, delta=0.15, grid=4, n_nearest=3)
    assert stats["skipped_count"] == 1 and stats["skipped"][0]["id"] == "t0007"
    assert stats["decoded"] == 4 and stats["bytes_read"] > 0 and "t0007" not in set(got["train_id"])


def test_bad_index_inputs(tmp_path, synth_train, flat_index):
    with pytest.raises(InputError, match="does not exist"):
        extract(planted(), PROMPTS, None, tmp_path / "a", CFG, progress=False, index=tmp_path / "nope")
    assert not (tmp_path / "a").exists()
    # an index whose recorded source moved away: one clear error naming --train
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(flat_index, moved)
    meta = json.loads((moved / "index.json").read_text())
    meta["source"] = meta["source_resolved"] = str(tmp_path / "gone")
    (moved / "index.json").write_text(json.dumps(meta))
    loc = pd.read_parquet(moved / "locations.parquet")
    loc["path"] = [str(tmp_path / "gone" / f"{i}.png") for i in range(len(loc))]
    loc.to_parquet(moved / "locations.parquet")
    with pytest.raises(InputError, match="--train"):
        extract(planted(), PROMPTS, None, tmp_path / "b", CFG, progress=False, index=moved)
    # ... and --train says where the images are now
    res = extract(planted(), PROMPTS[:2], synth_train, tmp_path / "c", CFG, progress=False, index=moved, retrieve=10)
    assert res.manifest["counts"]["extractions"] == 2
    # a damaged index file
    (moved / "ids.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="cannot be read"):
        extract(planted(), PROMPTS, None, tmp_path / "d", CFG, progress=False, index=moved)


def test_cli_index_ivfpq_in_two_shards_then_extract_through_it(tmp_path, synth_train):
    from conftest import run_cli

    idx = tmp_path / "idx"
    run_cli("index", synth_train, "--out", idx, "--embedder", "pixel:8", "--index-type", "ivfpq", "--pq-m", "16",
            "--nlist", "2", "--nprobe", "2", "--index-shards", "2", "--quiet")  # fmt: skip
    assert sorted(p.name for p in idx.glob("index-*.faiss")) == ["index-000.faiss", "index-001.faiss"]
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    run = tmp_path / "run"
    proc = run_cli("extract", "--model", "py:gen_support:planted", "--prompts", tmp_path / "p.txt", "--index", idx,
                   "--retrieve", 50, "--out", run, "--samples-per-prompt", 60, "--batch-size", 30, "--quiet")  # fmt: skip
    assert "5 extractions" in proc.stdout
    m = json.loads((run / "manifest.json").read_text())
    assert m["verification"]["index_type"] == "ivfpq" and m["verification"]["index_params"]["shards"] == 2
    assert m["verification"]["retrieve"] == 50 and m["retrieval"]["retrieved"] == 5 * 50
    run_cli("report", run)
    assert "lower bound" in (run / "report.html").read_text()


def test_index_run_stopped_then_resumed_equals_uninterrupted(tmp_path, flat_index, train_run):
    run = tmp_path / "run"
    kw = {"progress": False, "index": flat_index, "retrieve": 500}
    with pytest.raises(MemscanError, match="resume"):  # stop_after_shards: the run stops early
        extract(planted(), PROMPTS, None, run, CFG, stop_after_shards=1, **kw)
    # resuming with another K is refused (the verification is part of the run's identity)
    with pytest.raises(MemscanError, match="verification"):
        extract(planted(), PROMPTS, None, run, CFG, resume=True, progress=False, index=flat_index, retrieve=7)
    res = extract(planted(), PROMPTS, None, run, CFG, resume=True, **kw)
    pd.testing.assert_frame_equal(_ext(train_run), _ext(res), check_exact=True)
    assert res.manifest["retrieval"]["candidates"] == 5


def test_the_index_path_never_decodes_the_training_set(tmp_path, flat_index, monkeypatch):
    import memscan.data.training as training_mod
    import memscan.extraction.pipeline as pipeline_mod

    def refuse(*a, **k):
        raise AssertionError("the training set was decoded whole")

    monkeypatch.setattr(pipeline_mod, "load_training_set", refuse)
    monkeypatch.setattr(training_mod, "load_training_set", refuse)  # via training_at_shape
    monkeypatch.setattr(training_mod, "decode_training_set", refuse)
    res = extract(planted(), PROMPTS[:2], None, tmp_path / "run", CFG, progress=False, index=flat_index, retrieve=10)
    assert res.manifest["counts"]["extractions"] == 2
    assert res.manifest["retrieval"]["decoded"] <= 2 * 10  # only the retrieved images were read


def test_retrieval_counts_add_up_over_shards_beyond_the_listed_names():
    """Shard records list every skip (complete); a manifest lists at most LISTED but counts all;
    records already cut (older runs) still add their full counts, and the log says how many
    were not named."""
    from memscan.extraction.verify_index import LISTED, RetrievalStats

    def shard(n_skipped, prompt):
        s = RetrievalStats(candidates=2, retrieved=10)
        s.skipped = [{"id": f"{prompt}-{i}", "path": "p", "reason": "r"} for i in range(n_skipped)]
        s.unverified = [prompt]
        return s.to_dict(limit=None)

    records = [shard(150, "a"), shard(70, "b")]
    assert records[0]["skipped_count"] == 150 and len(records[0]["skipped"]) == 150
    cut = RetrievalStats()
    cut.add(records[0])
    old = cut.to_dict()  # an older shard record: cut to LISTED, with its full count
    assert len(old["skipped"]) == LISTED and old["skipped_count"] == 150
    total = RetrievalStats()
    for r in (old, records[1]):
        total.add(r)
    got = total.to_dict()
    assert got["skipped_count"] == 220 and len(got["skipped"]) == LISTED and got["candidates"] == 4
    assert got["unverified_count"] == 2 and got["unverified"] == ["a", "b"] and got["retrieved"] == 20
    lines = []
    total.log(lines.append)
    assert len(lines) == 170 + 2 + 1 and "50 more skipped not named" in lines[-1]
    assert sum("not verified" in line for line in lines) == 2


def test_the_chunk_selection_keeps_exactly_the_k_best_ties_by_the_lower_column():
    """One chunk's k best (memory-mapped flat search): against a brute-force stable sort, on
    values with many ties — and a row where every value ties (a blank image's zero embedding)."""
    from memscan.index.faiss_index import _at_least_kth

    rng = np.random.default_rng(4)
    sims = rng.integers(0, 5, (6, 300)).astype(np.float32)
    sims[2] = 0.0
    for k in (1, 7, 300):
        got_s, got_r = _at_least_kth(sims, k, offset=1000)
        want = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(np.sort(got_r - 1000, axis=1), np.sort(want, axis=1))
        np.testing.assert_array_equal(np.sort(got_s, axis=1), np.sort(np.take_along_axis(sims, want, 1), axis=1))
    assert (_at_least_kth(sims, 5, 0)[1][2] == np.arange(5)).all()


def test_the_cached_verifier_follows_a_rebuild_in_place_and_the_served_parts(tmp_path):
    """``open_index_verifier`` keeps one verifier per build of the folder and per served parts:
    an index rebuilt in place (``--overwrite``) is opened anew, and a record whose parts are
    served elsewhere never gets back the verifier that opened the parts locally."""
    from dataclasses import replace

    from memscan.extraction.verify_index import open_index_verifier

    write_training_set(tmp_path / "a", 12, size=16)
    write_training_set(tmp_path / "b", 5, size=16, prefix="u")
    idx = tmp_path / "idx"
    build_index(tmp_path / "a", idx, embedder="pixel:4", progress=False)
    spec = IndexVerification(str(idx), retrieve=3)
    first = open_index_verifier(spec)
    assert open_index_verifier(spec) is first and len(first.index) == len(list((tmp_path / "a").glob("*.png")))
    build_index(tmp_path / "b", idx, embedder="pixel:4", overwrite=True, progress=False)
    rebuilt = open_index_verifier(spec)
    assert len(rebuilt.index) == len(list((tmp_path / "b").glob("*.png"))) == 5
    assert rebuilt.index.ids == [f"u{i:04d}" for i in range(5)]

    class Served:
        """Parts searched elsewhere: always answers row 4."""

        key = ("served", "x")
        ntotal = 5

        def search(self, q, k):
            return np.ones((len(q), k), np.float32), np.full((len(q), k), 4, np.int64)

    served = open_index_verifier(replace(spec, served=Served()))
    assert served is not rebuilt and served.index.index.__class__ is Served
    _, rows = served.index.search(np.zeros((2, served.index.dim), np.float32), 1)
    assert rows.tolist() == [[4], [4]]
    # the same served parts (by key), sent again (a new object in a worker): the same verifier
    assert open_index_verifier(replace(spec, served=Served())) is served
    assert open_index_verifier(spec) is rebuilt


def test_an_ivf_search_that_returns_fewer_than_k_says_so_per_candidate(tmp_path, synth_train):
    """IVF with nprobe = 1 of 8 cells returns only the probed cell's images (fewer than K = 100):
    each row's ``retrieved`` is that number — the size of the query's nearest cell, counted here
    by brute force over the centroids — and the record counts the candidates that got fewer."""
    idx = tmp_path / "ivf"
    build_index(synth_train, idx, embedder="pixel:8", index_type=IndexParams("ivf", nlist=8, nprobe=1),
                progress=False)  # fmt: skip
    index = TrainingIndex.load(idx)
    ivf = faiss.extract_index_ivf(index.index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    emb = np.asarray(index.embeddings)
    cell_of = np.argmax(emb @ centroids.T, axis=1)  # each indexed image's cell (brute force)
    ids = [f"t{i:04d}" for i in (3, 40, 77, 101)]
    imgs = np.stack([training_image(t) for t in ids])
    cands = pd.DataFrame({"prompt_id": ids, "train_id": ids, "clique_size": 10, "mean_clique_distance": 0.0})
    verifier = IndexVerifier(IndexVerification(str(idx), 100))
    got, stats = verify_candidates_indexed(cands, imgs, verifier, delta=0.15, grid=4, n_nearest=200)
    q = verifier.embedder.embed(imgs)
    want = [int((cell_of == c).sum()) for c in np.argmax(q @ centroids.T, axis=1)]
    assert max(want) < 100
    by_prompt = got.groupby("prompt_id", sort=False)
    assert [int(by_prompt.get_group(p)["retrieved"].unique().item()) for p in ids] == want
    assert [len(by_prompt.get_group(p)) for p in ids] == want  # every retrieved image has its row
    assert stats["fewer_than_k"] == 4 and stats["retrieved"] == sum(want)
    # the manifest's record sums the shards' (a record without the count, e.g. an older shard's,
    # adds nothing; a total never counted is left out rather than written as 0)
    from memscan.extraction.verify_index import RetrievalStats

    total = RetrievalStats()
    for rec in (stats, stats, {"candidates": 2, "retrieved": 7}):
        total.add(rec)
    assert total.to_dict()["fewer_than_k"] == 8
    assert "fewer_than_k" not in RetrievalStats(candidates=3).to_dict()
    # the k-eidetic count is bounded by what was retrieved, and the record says so
    assert (got["eidetic_k"] <= got["retrieved"]).all()
    assert "fewer where the index returned fewer" in verifier.describe()["eidetic_k"]


def test_the_expected_image_comes_first_among_its_exact_copies(tmp_path, synth_train):
    """Two exact copies of t0003 sort before it (``copyA``, ``copyB``): all three lie at distance
    0 from a perfect copy, ties went to the lowest row, and the rank-1 row read "does not match"
    the prompt's own image. Now the expected image comes first among the ties — listed or not
    (``n_nearest`` 2 lists only the two copies), through the training set and through an index —
    and rows at other distances keep their order."""
    train = tmp_path / "train"
    train.mkdir()
    for f in synth_train.iterdir():
        (train / f.name).write_bytes(f.read_bytes())
    for c in ("copyA", "copyB"):
        (train / f"{c}.png").write_bytes((synth_train / "t0003.png").read_bytes())
    training = load_training_set(train, size=(32, 32))
    assert training.ids.index("copyA") < training.ids.index("t0003")
    cands = pd.DataFrame(
        {"prompt_id": ["p", "q"], "train_id": ["t0003", None], "clique_size": [12, 12],
         "mean_clique_distance": [0.01, 0.01]}
    )  # fmt: skip
    img = np.stack([training_image("t0003"), training_image("t0003")])
    for n in (2, 4):
        full = verify_candidates(cands, img, training, delta=0.15, grid=4, n_nearest=n)
        p, q = full[full["prompt_id"] == "p"], full[full["prompt_id"] == "q"]
        assert p["train_id"].tolist()[:3] == ["t0003", "copyA", "copyB"][:n]
        assert p["matches_expected"].tolist()[0] and (p["tiled_l2"].iloc[: min(n, 3)] == 0).all()
        assert p["eidetic_k"].iloc[0] == 3
        assert q["train_id"].tolist()[:2] == ["copyA", "copyB"]  # no expected image: lowest rows first
        if n == 4:  # the 4th row, at a positive distance, is the same either way
            assert p["train_id"].iloc[3] == q["train_id"].iloc[3] and p["tiled_l2"].iloc[3] > 0
    idx = tmp_path / "idx"
    build_index(train, idx, embedder="pixel:8", index_type="flat", progress=False)
    v = IndexVerifier(IndexVerification(str(idx), 10))
    got, _ = verify_candidates_indexed(cands, img, v, delta=0.15, grid=4, n_nearest=4)
    p = got[got["prompt_id"] == "p"]
    assert p["train_id"].tolist()[:3] == ["t0003", "copyA", "copyB"] and p["matches_expected"].iloc[0]
    assert got[got["prompt_id"] == "q"]["train_id"].tolist()[:2] == ["copyA", "copyB"]
