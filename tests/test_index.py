"""Embedders and the FAISS training index: brute-force agreement, recall, disk round trip, CLI."""

import json
import sys
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli
from pickle_support import Payload

from memscan import InputError
from memscan.index.embedders import (
    OpenCLIPEmbedder,
    PixelEmbedder,
    TorchScriptEmbedder,
    l2_normalize,
    load_embedder,
)
from memscan.index.faiss_index import IndexParams, TrainingIndex, build_index
from memscan.synthetic import training_image, write_training_set

# torch 2.13 deprecates TorchScript and the TorchScript-based ONNX exporter that make the test models
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _clustered(n, d, centres=40, spread=0.7, seed=0, intrinsic=6):
    """Unit vectors in clusters with a low-dimensional spread, like real embeddings (isotropic
    Gaussian noise in all d dimensions would be a worst case no approximate index is built for)."""
    fixed = np.random.default_rng(99)
    c, basis = fixed.normal(size=(centres, d)), fixed.normal(size=(intrinsic, d)) / np.sqrt(intrinsic)
    rng = np.random.default_rng(seed)
    return l2_normalize(c[rng.integers(0, centres, n)] + spread * rng.normal(size=(n, intrinsic)) @ basis)


def _brute_topk(q, x, k):
    sims = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(x.shape[0]), sims.shape), -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, 1), order


# --------------------------------------------------------------------------------------------
# embedders
# --------------------------------------------------------------------------------------------
def test_pixel_embedder_is_a_normalised_correlation():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    x[4] = 77  # a constant image
    e = PixelEmbedder(size=16).embed(x)
    assert e.dtype == np.float32 and e.shape == (5, 768)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-6)
    # at its own size (no resampling) the cosine is exactly the Pearson correlation of the pixels
    flat = x[:4].reshape(4, -1).astype(np.float64)
    np.testing.assert_allclose(e[:4] @ e[:4].T, np.corrcoef(flat), atol=1e-5)
    np.testing.assert_allclose(e[4], np.full(768, 1 / np.sqrt(768)), atol=1e-7)
    # a brightened copy and a larger copy of an image stay at cosine ≈ 1
    img = training_image("a", 64)
    brighter = np.clip(img.astype(int) + 20, 0, 255).astype(np.uint8)
    emb = PixelEmbedder(size=16)
    assert float((emb.embed(img[None]) @ emb.embed(brighter[None]).T)[0, 0]) > 0.99
    with pytest.raises(InputError, match="positive"):
        PixelEmbedder(size=0)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.head = torch.nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        h = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.head(h.flatten(1))


def _reference_embedding(model, images, size, mean, std):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True).clamp(0, 1)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        y = model(x).numpy()
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def test_torchscript_embedder_matches_the_model(tmp_path):
    model = _Tiny().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    (tmp_path / "tiny.json").write_text(json.dumps({"input_size": [24, 24], "mean": [0.5] * 3, "std": [0.25] * 3}))
    images = np.random.default_rng(1).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    emb = load_embedder(str(path), batch_size=3)
    assert isinstance(emb, TorchScriptEmbedder) and emb.dim == 10 and emb.input_size == (24, 24)
    got = emb.embed(images)
    np.testing.assert_allclose(got, _reference_embedding(model, images, (24, 24), [0.5] * 3, [0.25] * 3), atol=1e-5)
    # the recorded spec reloads the same model, and refuses a changed file
    spec = emb.spec()
    np.testing.assert_allclose(load_embedder(spec).embed(images), got, atol=1e-6)
    torch.jit.save(torch.jit.script(_Tiny().eval().half().float()), str(path))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(InputError, match="changed"):
        load_embedder(spec)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="TorchScript"):
        load_embedder(str(tmp_path / "junk.pt"))


class _NaNForBright(torch.nn.Module):
    """Returns NaN for images whose mean input exceeds 0 (bright ones), a feature otherwise."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, torch.where(m > 0, torch.full_like(m, float("nan")), m + 1)], 1)


def test_a_model_embedder_returning_nan_is_refused_with_one_error(tmp_path):
    """A NaN row used to be normalised to zeros: it matched nothing and no one was told."""
    path = tmp_path / "nan.pt"
    torch.jit.save(torch.jit.script(_NaNForBright()), str(path))
    (tmp_path / "nan.json").write_text(json.dumps({"input_size": [8, 8], "mean": [0.5] * 3, "std": [0.25] * 3}))
    emb = load_embedder(str(path))
    dark, bright = np.zeros((3, 8, 8, 3), np.uint8), np.full((2, 8, 8, 3), 255, np.uint8)
    assert np.isfinite(emb.embed(dark)).all()
    with pytest.raises(InputError, match=r"nan\.pt returned non-finite values .* for 2 of 5 images .*image 3") as e:
        emb.embed(np.concatenate([dark, bright]))
    assert "--embedder" in e.value.hint


def test_onnx_embedder_matches_the_model(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = _Tiny().eval()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 20, 20),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
    )
    images = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    emb = load_embedder(str(path), batch_size=2)
    assert emb.input_size == (20, 20) and emb.dim == 10  # fixed H×W read from the model
    ref = _reference_embedding(model, images, (20, 20), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    np.testing.assert_allclose(emb.embed(images), ref, atol=1e-5)


def test_open_clip_embedder_uses_local_weights_only(tmp_path, monkeypatch):
    calls = []

    class FakeClip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = types.SimpleNamespace(image_size=(16, 16))
            self.tiny = _Tiny()

        def encode_image(self, x):
            return self.tiny(x)

    def create_model_and_transforms(name, pretrained=None, device="cpu"):
        calls.append((name, pretrained))
        return FakeClip(), None, None

    monkeypatch.setitem(
        sys.modules, "open_clip", types.SimpleNamespace(create_model_and_transforms=create_model_and_transforms)
    )
    weights = tmp_path / "w.bin"
    torch.save({"visual.proj": torch.zeros(2, 2)}, weights)  # tensors only: passes the safe loader
    emb = load_embedder(f"open_clip:ViT-Tiny:{weights}")
    assert isinstance(emb, OpenCLIPEmbedder) and calls == [("ViT-Tiny", str(weights))]
    assert emb.input_size == (16, 16) and emb.dim == 10 and emb.spec()["model"] == "ViT-Tiny"
    images = np.random.default_rng(3).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    ref = _reference_embedding(emb.model.tiny, images, (16, 16), list(emb.mean), list(emb.std))
    np.testing.assert_allclose(emb.embed(images), ref, atol=1e-5)
    with pytest.raises(InputError, match="local weights"):
        load_embedder(f"open_clip:ViT-Tiny:{tmp_path / 'missing.bin'}")


def test_open_clip_weights_that_hold_code_are_refused_before_open_clip_reads_them(tmp_path, monkeypatch):
    """open_clip may unpickle its weights fully (depending on its version): memscan's own safe
    loader reads them first, so a pickle holding code is refused and never runs — and open_clip
    is never asked to read it."""
    import pickle

    calls = []
    monkeypatch.setitem(
        sys.modules, "open_clip", types.SimpleNamespace(create_model_and_transforms=lambda *a, **k: calls.append(a))
    )
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pt"
    with open(weights, "wb") as f:
        pickle.dump({"visual.proj": Payload(str(marker))}, f)
    with pytest.raises(InputError, match="refused to load evil.pt"):
        load_embedder(f"open_clip:ViT-Tiny:{weights}")
    assert not marker.exists() and calls == []


def test_embedder_spec_errors():
    with pytest.raises(InputError, match="unknown embedder"):
        load_embedder("model.h5")
    with pytest.raises(InputError, match="does not exist"):
        load_embedder("missing.pt")
    with pytest.raises(InputError, match="open_clip:MODEL:WEIGHTS"):
        load_embedder("open_clip:ViT-B-32")


# --------------------------------------------------------------------------------------------
# the FAISS index
# --------------------------------------------------------------------------------------------
def test_flat_index_returns_brute_force_neighbours():
    x = _clustered(3000, 32)
    q = _clustered(200, 32, seed=1)
    index = TrainingIndex.from_embeddings(x, [f"t{i}" for i in range(len(x))])
    assert index.params.index_type == "flat"  # auto below FLAT_MAX
    sims, idx = index.search(q, 10)
    ref_sims, ref_idx = _brute_topk(q, x, 10)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    # same neighbours; a swap is allowed only between (numerically) tied similarities
    swapped = idx != ref_idx
    assert swapped.mean() < 0.01
    assert np.allclose(sims[swapped], ref_sims[swapped], atol=1e-5)
    # k larger than the index pads with -1
    small = TrainingIndex.from_embeddings(x[:3], ["a", "b", "c"])
    s, i = small.search(x[:1], 5)
    assert i[0].tolist()[3:] == [-1, -1] and np.isneginf(s[0, 3:]).all()


def _float64_topk(q, x, k):
    """Independent brute force: float64 similarities of the float32 vectors, rounded to float32,
    sorted descending with ties by the lower row (a stable sort over every row)."""
    key = (np.asarray(q, np.float32).astype(np.float64) @ np.asarray(x, np.float32).astype(np.float64).T).astype(
        np.float32
    )
    order = np.lexsort((np.broadcast_to(np.arange(x.shape[0]), key.shape), -key), axis=1)[:, :k]
    return np.take_along_axis(key, order, 1), order


def _flat_layouts(x, tmp_path, chunk=7):
    """The same flat index in memory, built in 2 and 3 shards, loaded back, and memory-mapped
    (unsharded and in 2 parts, searched in chunks of ``chunk`` rows)."""
    ids = [f"t{i}" for i in range(len(x))]
    out = {
        "memory": TrainingIndex.from_embeddings(x, ids, params=IndexParams("flat")),
        "2 shards": TrainingIndex.from_embeddings(x, ids, params=IndexParams("flat", shards=2)),
        "3 shards": TrainingIndex.from_embeddings(x, ids, params=IndexParams("flat", shards=3)),
    }
    out["memory"].save(tmp_path / "one")
    out["2 shards"].save(tmp_path / "two")
    out["loaded"] = TrainingIndex.load(tmp_path / "one")
    out["mmap"] = TrainingIndex.load(tmp_path / "one", mmap=True)
    out["mmap 2 shards"] = TrainingIndex.load(tmp_path / "two", mmap=True)
    out["mmap"].index.chunk = chunk
    for part in out["mmap 2 shards"].index.parts:
        part.chunk = chunk
    return out


def test_exact_duplicates_tied_at_the_kth_place_give_the_lower_row_in_every_flat_layout(tmp_path):
    """Row 37 is a copy of row 3 and k is chosen so the two tie at the k-th place: every layout
    keeps row 3 with the same similarity, the float64 brute force's answer (float32 search alone
    scores the copies differently by position, and FAISS's heap may keep either)."""
    wrong_rows, wrong_sims = [], []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        x = l2_normalize(rng.normal(size=(40, 7))).astype(np.float32)
        x[37] = x[3]
        q = l2_normalize(rng.normal(size=(1, 7))).astype(np.float32)
        exact = (q.astype(np.float64) @ x.astype(np.float64).T)[0]
        k = int((exact > exact[3]).sum()) + 1
        want_sims, want_rows = _float64_topk(q, x, k)
        assert want_rows[0, -1] == 3
        for name, index in _flat_layouts(x, tmp_path / str(seed)).items():
            sims, rows = index.search(q, k)
            assert sims.dtype == np.float32 and rows.dtype == np.int64
            if rows.tolist() != want_rows.tolist():
                wrong_rows.append((seed, name, int(rows[0, -1])))
            if not np.array_equal(sims, want_sims):
                wrong_sims.append((seed, name))
    assert wrong_rows == []
    assert wrong_sims == []


def test_many_copies_across_the_kth_place_are_scanned_exactly_and_agree_in_every_layout(tmp_path, monkeypatch):
    """40 copies of one vector scattered over 300 rows, the k-th place falling among them (more
    ties than the candidate margin): every layout returns the same lowest copies, in row order,
    with equal similarities; a query without ties is answered by one search of k + margin, a
    tied one by that search and an exact scan of every row."""
    from memscan.index import faiss_index

    rng = np.random.default_rng(7)
    x = l2_normalize(rng.normal(size=(300, 48))).astype(np.float32)
    copies = np.sort(rng.choice(300, 40, replace=False))
    x[copies] = x[copies[0]]
    q = l2_normalize(x[copies[:1]] + 0.6 * rng.normal(size=(3, 48))).astype(np.float32)
    exact = q.astype(np.float64) @ x.astype(np.float64).T
    k = int((exact[0] > exact[0, copies[0]]).sum()) + 5  # 5 of the 40 copies make the k best
    want_sims, want_rows = _float64_topk(q, x, k)
    assert set(want_rows[0, -5:].tolist()) == set(copies[:5].tolist())
    answers = {name: index.search(q, k) for name, index in _flat_layouts(x, tmp_path, chunk=16).items()}
    for name, (sims, rows) in answers.items():
        assert rows.tolist() == want_rows.tolist(), name
        np.testing.assert_array_equal(sims, want_sims, err_msg=name)
    # one float32 search of k + margin; only the tied query is scanned
    index = TrainingIndex.from_embeddings(x, [f"t{i}" for i in range(300)], params=IndexParams("flat"))
    asked, search = [], index.index.search
    monkeypatch.setattr(index.index, "search", lambda qq, m: asked.append(m) or search(qq, m), raising=False)
    scanned, scan = [], faiss_index._exact_scan
    monkeypatch.setattr(faiss_index, "_exact_scan", lambda e, qq, *a: scanned.append(len(qq)) or scan(e, qq, *a))
    index.search(q[:1], k)
    assert asked == [k + faiss_index.EXACT_MARGIN] and scanned == [1]
    asked.clear(), scanned.clear()
    plain = l2_normalize(rng.normal(size=(1, 48))).astype(np.float32)
    sims, rows = index.search(plain, 3)
    assert asked == [3 + faiss_index.EXACT_MARGIN] and scanned == []
    assert rows.tolist() == _float64_topk(plain, x, 3)[1].tolist()


class _PartsServedElsewhere:
    """What :func:`serve_index_on_ray` puts in ``TrainingIndex.index``, without Ray: each part
    opened by its own :class:`IndexPartServer`, their answers merged."""

    def __init__(self, root, shards):
        from memscan.index.faiss_index import open_index_part
        from memscan.runners.ray_runner import IndexPartServer

        self.servers = [IndexPartServer(open_index_part, (str(root), p), threads=0) for p in range(shards)]

    @property
    def ntotal(self):
        return sum(s.ntotal() for s in self.servers)

    def search(self, q, k):
        from memscan.index.faiss_index import merge_searches

        return merge_searches([s.search(q, k) for s in self.servers], k)


def test_ties_wider_than_the_candidates_are_scanned_in_blocks_to_the_brute_force_answer(tmp_path, monkeypatch):
    """Clusters of 60 and 9 identical rows, far more than the candidates fetched (k + margin,
    the margin set to 2), scanned in blocks of 16 rows (copies of a cluster in many blocks):
    every layout — in memory, sharded, memory-mapped, parts served elsewhere (as by Ray) —
    returns the independent float64 brute force's answer, the lowest copies first, with its
    similarities, for k inside, at the end of and past a cluster."""
    from memscan.index import faiss_index

    monkeypatch.setattr(faiss_index, "EXACT_MARGIN", 2)
    monkeypatch.setattr(faiss_index, "_EXACT_CANDIDATES", 2048)  # scan: 16 rows × 128 queries a block
    monkeypatch.setattr(faiss_index, "_EXACT_PRODUCTS", 100)  # re-scoring: 3 pairs a block
    scanned, scan = [], faiss_index._exact_scan
    monkeypatch.setattr(faiss_index, "_exact_scan", lambda e, qq, *a: scanned.append(len(qq)) or scan(e, qq, *a))
    rng = np.random.default_rng(11)
    n, d = 400, 96
    x = l2_normalize(rng.normal(size=(n, d))).astype(np.float32)
    rows = rng.permutation(n)
    big, small = np.sort(rows[:60]), np.sort(rows[60:69])
    x[big], x[small] = x[big[0]], x[small[0]]
    near = l2_normalize(x[big[:1]] + 0.2 * rng.normal(size=(12, d)))  # tied with the 60 copies too
    q = np.concatenate([x[big[:1]], x[small[:1]], near, l2_normalize(rng.normal(size=(2, d)))]).astype(np.float32)
    layouts = _flat_layouts(x, tmp_path, chunk=16)
    served = TrainingIndex.load(tmp_path / "two", mmap=True, open_parts=False)
    served.index = _PartsServedElsewhere(tmp_path / "two", 2)
    layouts["served elsewhere"] = served
    for k in (1, 5, 9, 60, 75, n):
        want_sims, want_rows = _float64_topk(q, x, k)
        assert want_rows[0, : min(k, 60)].tolist() == big[:k].tolist()  # the copies first, in row order
        for name, index in layouts.items():
            scanned.clear()
            sims, got = index.search(q, k)
            assert got.tolist() == want_rows.tolist(), (k, name)
            np.testing.assert_array_equal(sims, want_sims, err_msg=f"k={k} {name}")
            # the queries tied past k + margin are scanned; with every row fetched, none
            assert bool(scanned) == (k in (1, 5, 9)), (k, name, scanned)


@pytest.mark.parametrize("params", [IndexParams("ivf", nlist=4, nprobe=2), IndexParams("hnsw")])
def test_approximate_index_orders_equal_similarities_by_the_lower_row(params):
    """An approximate index promises no exact k best, but what it returns is ordered: similarity
    descending, equal similarities (exact duplicates) by the lower row."""
    rng = np.random.default_rng(1)
    x = l2_normalize(rng.normal(size=(400, 16))).astype(np.float32)
    copies = np.sort(rng.choice(np.arange(1, 400), 20, replace=False))
    x[copies] = x[0]
    index = TrainingIndex.from_embeddings(x, [f"t{i}" for i in range(400)], params=params)
    sims, rows = index.search(x[:1], 10)
    assert (np.diff(sims[0]) <= 0).all()
    same = sims[0, 1:] == sims[0, :-1]
    assert same.sum() >= 5  # the copies tie
    assert (rows[0, 1:][same] > rows[0, :-1][same]).all()


@pytest.mark.parametrize("params", [IndexParams("ivf", nlist=32, nprobe=8), IndexParams("hnsw", ef_search=64)])
def test_approximate_index_recall_at_10(params):
    x = _clustered(4000, 32, centres=60)
    q = _clustered(300, 32, centres=60, seed=1)
    index = TrainingIndex.from_embeddings(x, [f"t{i}" for i in range(len(x))], params=params)
    assert index.params.index_type == params.index_type
    _, idx = index.search(q, 10)
    _, ref = _brute_topk(q, x, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, ref)])
    assert recall >= 0.95, recall


def test_auto_index_type_and_ivf_defaults():
    assert IndexParams("auto").resolve(1_000_000).index_type == "flat"
    big = IndexParams("auto").resolve(4_000_000)
    assert big.index_type == "ivf" and big.nlist == 8000 and big.nprobe == 1000
    assert IndexParams("ivf").resolve(1000).nlist == 25  # at least 39 training points per cell
    with pytest.raises(InputError, match="not one of"):
        IndexParams("lsh").resolve(10)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_save_load_round_trip(tmp_path, kind):
    x = _clustered(1200, 16)
    ids = [f"id-{i}" for i in range(len(x))]
    caps = [f"caption {i}" for i in range(len(x))]
    params = IndexParams(kind, nlist=8 if kind == "ivf" else None)
    index = TrainingIndex.from_embeddings(
        x, ids, caps, params, meta={"embedder": {"type": "pixel", "size": 4, "channels": 1}}
    )
    index.save(tmp_path / "idx")
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert files == (
        ["embeddings.npy", "ids.parquet", "index.json", "rows.arrow"]
        if kind == "flat"
        else ["embeddings.npy", "ids.parquet", "index.faiss", "index.json", "rows.arrow"]
    )
    # no pickle anywhere: the arrays load with allow_pickle=False
    np.testing.assert_array_equal(np.load(tmp_path / "idx" / "embeddings.npy", allow_pickle=False), x)
    back = TrainingIndex.load(tmp_path / "idx", mmap=True)
    assert back.ids == ids and back.captions == caps and back.params == index.params
    q = x[:50]
    np.testing.assert_array_equal(back.search(q, 5)[1], index.search(q, 5)[1])
    with pytest.raises(Exception, match="already holds an index"):
        index.save(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").unlink()
    with pytest.raises(InputError, match="not a memscan index"):
        TrainingIndex.load(tmp_path / "idx")


def test_build_index_streams_a_folder_and_counts_corrupt_files(tmp_path):
    write_training_set(tmp_path / "train", 30, size=16)
    (tmp_path / "train" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    index = build_index(tmp_path / "train", tmp_path / "idx", embedder="pixel:8", batch_size=7, progress=False)
    assert len(index) == 30 and index.dim == 192 and "broken" not in index.ids
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["skipped"] == 1 and meta["skipped_files"][0]["id"] == "broken"
    assert meta["embedder"] == {"type": "pixel", "size": 8, "channels": 3} and meta["count"] == 30
    # the stored embeddings are the embedder's output for the decoded images, row for row
    from memscan import load_training_set

    ts = load_training_set(tmp_path / "train", size=(8, 8))
    emb = np.load(tmp_path / "idx" / "embeddings.npy", allow_pickle=False)
    assert pd.read_parquet(tmp_path / "idx" / "ids.parquet")["id"].tolist() == ts.ids
    np.testing.assert_allclose(emb, PixelEmbedder(8).embed(ts.images), atol=1e-6)
    # querying with images: each training image finds itself first
    _, idx = TrainingIndex.load(tmp_path / "idx").embed_and_search(ts.images[:5], 1)
    assert idx[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_cli_index(tmp_path):
    write_training_set(tmp_path / "train", 12, size=16)
    proc = run_cli("index", tmp_path / "train", "--out", tmp_path / "idx", "--index-type", "hnsw", "--quiet")
    assert "12 images indexed (hnsw" in proc.stdout
    assert TrainingIndex.load(tmp_path / "idx").params.index_type == "hnsw"
    again = invoke("index", tmp_path / "train", "--out", tmp_path / "idx", "--quiet")
    assert again.exit_code == 2 and "already holds an index" in again.output and "Traceback" not in again.output
    bad = invoke("index", tmp_path / "train", "--out", tmp_path / "i2", "--index-type", "lsh")
    assert bad.exit_code == 2 and "not one of" in bad.output


def invoke(*args):
    """The CLI in-process (no interpreter start-up): same app, same error handling."""
    from typer.testing import CliRunner

    from memscan.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_overwrite_removes_only_what_an_index_run_wrote(tmp_path):
    """``--overwrite`` on a folder that held no index deleted the user's ``report.html``,
    ``index.faiss`` and every file in ``shards/``; on an index folder, every file in ``shards/``."""
    write_training_set(tmp_path / "train", 8, size=16)
    site = tmp_path / "site"
    (site / "shards").mkdir(parents=True)
    (site / "report.html").write_text("the user's page")
    (site / "shards" / "notes.txt").write_text("the user's notes")
    res = invoke("index", tmp_path / "train", "--out", site, "--embedder", "pixel:4", "--overwrite", "--quiet")
    assert res.exit_code == 0, res.output
    assert len(TrainingIndex.load(site)) == 8
    assert (site / "report.html").read_text() == "the user's page"
    assert (site / "shards" / "notes.txt").read_text() == "the user's notes"
    # an index folder: its own shards are replaced, the user's file in shards/ stays
    res = invoke("index", tmp_path / "train", "--out", site, "--embedder", "pixel:2", "--overwrite", "--quiet")
    assert res.exit_code == 0, res.output
    assert TrainingIndex.load(site).dim == 12
    assert sorted(p.name for p in (site / "shards").iterdir()) == [
        "00000.done.json",
        "00000.embeddings.parquet",
        "notes.txt",
    ]
    # shard numbers past 99999 have six digits: an old build's are removed too
    for name in ("123456.done.json", "123456.embeddings.parquet"):
        (site / "shards" / name).write_text("{}")
    res = invoke("index", tmp_path / "train", "--out", site, "--embedder", "pixel:4", "--overwrite", "--quiet")
    assert res.exit_code == 0, res.output
    assert not list((site / "shards").glob("123456.*")) and (site / "shards" / "notes.txt").exists()
    # a user's file or folder whose name starts with digits is not a shard of the index
    mine = ["20241130.notes.txt", "123456.jpg", "00001.embeddings.parquet.tmp", "\u0661\u0662\u0663\u0664\u0665.txt"]
    for name in mine:
        (site / "shards" / name).write_text("the user's")
    (site / "shards" / "12345.d").mkdir()
    res = invoke("index", tmp_path / "train", "--out", site, "--embedder", "pixel:4", "--overwrite", "--quiet")
    assert res.exit_code == 0, res.output
    assert all((site / "shards" / name).read_text() == "the user's" for name in mine)
    assert (site / "shards" / "12345.d").is_dir()


def test_index_folder_is_a_run_overwrite_replaces_it_under_the_lock(tmp_path):
    """The index folder has a lifecycle manifest (kind ``index``); ``--overwrite`` replaces the
    index (old manifest, shards and files), refuses while another process holds the folder, and
    never overwrites a run of another kind."""
    import os
    import socket

    write_training_set(tmp_path / "train", 20, size=16)
    write_training_set(tmp_path / "train8", 8, size=16)
    out = tmp_path / "idx"
    build_index(tmp_path / "train", out, embedder="pixel:4", shard_size=8, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "index" and m["memscan_run"] == 2 and m["status"] == "complete"
    assert m["counts"] == {"entries": 20, "indexed": 20, "skipped": 0} and m["n_shards"] == 3
    assert m["config"]["embedder"] == {"type": "pixel", "size": 4, "channels": 3} and "model" not in m
    assert m["index"]["type"] == "flat" and m["index"]["dim"] == 48

    (out / ".lock").write_text(f"pid={os.getpid()} host={socket.gethostname()} since=now")
    busy = invoke("index", tmp_path / "train8", "--out", out, "--embedder", "pixel:4", "--overwrite", "--quiet")
    assert busy.exit_code == 2 and "in use by another memscan process" in busy.output
    assert len(TrainingIndex.load(out)) == 20
    (out / ".lock").unlink()

    res = invoke("index", tmp_path / "train8", "--out", out, "--embedder", "pixel:4", "--overwrite", "--quiet")
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["indexed"] == 8 and m["n_shards"] == 1 and "resumed" not in m
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000.done.json", "00000.embeddings.parquet"]
    assert len(TrainingIndex.load(out)) == 8 and not (out / ".lock").exists()

    run = tmp_path / "not-an-index"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"memscan_run": 2, "kind": "extract", "status": "complete"}))
    res = invoke("index", tmp_path / "train8", "--out", run, "--overwrite", "--quiet")
    assert res.exit_code == 2 and "`memscan extract` run" in res.output
    assert json.loads((run / "manifest.json").read_text())["kind"] == "extract"


def test_index_report_counts_skipped_images_and_near_duplicates(tmp_path):
    write_training_set(tmp_path / "train", 12, size=16)
    (tmp_path / "train" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    from PIL import Image

    Image.fromarray(training_image("t0003", 16)).save(tmp_path / "train" / "zz-copy.png")  # a duplicate
    build_index(tmp_path / "train", tmp_path / "idx", embedder="pixel:8", progress=False)
    res = invoke("report", tmp_path / "idx")
    assert res.exit_code == 0, res.output
    html = (tmp_path / "idx" / "report.html").read_text()
    assert "memscan index report" in html and "broken.png" in html
    assert "2 have a\nnear-duplicate" in html or "2 have a near-duplicate" in html.replace("\n", " ")


def test_resume_with_other_training_data_is_refused_before_anything_is_embedded(tmp_path, monkeypatch):
    """A killed build resumed over another folder of the same size (or the same ids with one image
    changed) would mix the two sets' rows: refused, nothing embedded, the killed build untouched;
    resumed over its own data it equals an uninterrupted build."""
    from memscan.data.images import save_png
    from memscan.errors import MemscanError

    write_training_set(tmp_path / "a", 16, size=16)
    write_training_set(tmp_path / "b", 16, size=16, prefix="u")  # another set of the same size
    edited = tmp_path / "a_edited"
    write_training_set(edited, 16, size=16)
    save_png(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8), edited / "t0011.png")
    out = tmp_path / "idx"
    with pytest.raises(MemscanError, match="stopped before all shards"):
        build_index(tmp_path / "a", out, embedder="pixel:4", shard_size=8, stop_after_shards=1, progress=False)
    files = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    manifest = (out / "manifest.json").read_bytes()

    import memscan.index.faiss_index as fi

    def no_embedding(*a, **k):
        raise AssertionError("an image was embedded")

    with monkeypatch.context() as m:
        m.setattr(fi, "embed_stage", no_embedding)
        for other in (tmp_path / "b", edited):
            with pytest.raises(MemscanError, match="cannot resume .*training_set_sha256 differs"):
                build_index(other, out, embedder="pixel:4", shard_size=8, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == files
    assert (out / "manifest.json").read_bytes() == manifest and not (out / "index.json").exists()

    resumed = build_index(tmp_path / "a", out, embedder="pixel:4", shard_size=8, resume=True, progress=False)
    whole = build_index(tmp_path / "a", None, embedder="pixel:4", progress=False)
    assert resumed.ids == whole.ids == [f"t{i:04d}" for i in range(16)]
    np.testing.assert_array_equal(np.asarray(resumed.embeddings), np.asarray(whole.embeddings))
    assert json.loads((out / "manifest.json").read_text())["training_set_sha256"]


# ---- PixelSearch: exact nearest training images among near-duplicates ------------------------------
def _near_copies(size, seed=0, n_copies=40, n_other=20):
    """A random image, ``n_copies`` near-copies of it (±1 on a few pixels), one exact copy at a
    random position, and unrelated images; returns (references, the image)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(1, 255, (size, size, 3), dtype=np.uint8)
    refs = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n_other)]
    for _ in range(n_copies):
        x = base.astype(np.int16)
        for a, b, c in zip(rng.integers(0, size, 3), rng.integers(0, size, 3), rng.integers(0, 3, 3)):
            x[a, b, c] += rng.choice([-1, 1])
        refs.append(x.astype(np.uint8))
    refs.insert(int(rng.integers(0, len(refs))), base.copy())
    return np.stack(refs), base


def _brute_force(queries, refs, k, grid=None):
    """The k nearest by exact integer sums over every reference (ties: the lower index)."""
    q = queries.astype(np.int64)[:, None]
    diff2 = (q - refs.astype(np.int64)[None]) ** 2  # Q×R×H×W×C
    if grid is None:
        sums, per = diff2.reshape(len(queries), len(refs), -1).sum(-1), 255.0**2 * refs[0].size
    else:
        n, r, h, w, c = diff2.shape
        tiles = diff2.reshape(n, r, grid, h // grid, grid, w // grid, c).sum(axis=(3, 5, 6))
        sums, per = tiles.reshape(n, r, -1).max(-1), 255.0**2 * (h // grid) * (w // grid) * c
    order = np.lexsort((np.broadcast_to(np.arange(len(refs)), sums.shape), sums), axis=1)[:, :k]
    return np.sqrt(np.take_along_axis(sums, order, 1) / per), order


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("metric", ["l2", "tiled_l2"])
def test_pixel_search_finds_the_exact_copy_among_near_duplicates(size, metric):
    """FAISS's float32 distances (BLAS from 20 queries on) cannot tell an exact copy from copies
    ±1 on a few pixels; the search must: its answer equals brute force over integer sums."""
    from memscan.index.nearest import PixelSearch

    refs, base = _near_copies(size)
    rng = np.random.default_rng(1)
    nudged = np.clip(base.astype(np.int16) + rng.integers(-2, 3, base.shape), 0, 255).astype(np.uint8)
    queries = np.stack([base] * 24 + [nudged] * 2 + [refs[3]])
    search = PixelSearch(refs)
    grid = 4 if metric == "tiled_l2" else None
    for k in (1, 5):
        nb = search.search(queries, k=k, metric=metric)
        want_d, want_i = _brute_force(queries, refs, k, grid)
        np.testing.assert_array_equal(nb.indices, want_i)
        np.testing.assert_array_equal(nb.distances, want_d)
        assert nb.exact_rows.all()
    exact_copy = int(np.nonzero((refs == base).all(axis=(1, 2, 3)))[0][0])
    assert (nb.indices[:24, 0] == exact_copy).all() and (nb.distances[:24, 0] == 0).all()


def test_pixel_search_certificate_bound_holds_and_saves_the_exhaustive_search(monkeypatch):
    """The proven float32 error bound covers FAISS's actual error (measured: brute force), and on
    well-separated references the certificate holds: no exhaustive search is run."""
    import faiss

    import memscan.index.nearest as nearest
    from memscan.index.nearest import PixelSearch, faiss_l2_error_bound

    refs, base = _near_copies(64, n_copies=10)
    flat = refs.reshape(len(refs), -1)
    index = faiss.IndexFlatL2(flat.shape[1])
    index.add(flat.astype(np.float32))
    queries = np.concatenate([flat[:30], np.repeat(base.reshape(1, -1), 10, axis=0)])
    f2, ii = index.search(queries.astype(np.float32), len(refs))
    exact = ((queries.astype(np.int64)[:, None] - flat.astype(np.int64)[ii]) ** 2).sum(-1)
    q_sq = (queries.astype(np.int64) ** 2).sum(1)
    bound = faiss_l2_error_bound(q_sq, (flat.astype(np.int64) ** 2).sum(1).max(), flat.shape[1])
    assert (np.abs(f2.astype(np.float64) - exact) <= bound[:, None]).all()

    rng = np.random.default_rng(5)
    separate = rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    monkeypatch.setattr(nearest, "exact_l2_search", lambda *a, **k: pytest.fail("exhaustive search ran"))
    nb = PixelSearch(separate).search(separate[:25], k=3, metric="l2")
    want_d, want_i = _brute_force(separate[:25], separate, 3)
    np.testing.assert_array_equal(nb.indices, want_i)
    np.testing.assert_array_equal(nb.distances, want_d)


def test_a_loaded_index_keeps_its_rows_as_memory_mapped_arrow_not_python_objects(tmp_path):
    """ids, captions and locations of a loaded index come from ``rows.arrow`` memory-mapped (no
    Python object per row); they read like the lists they were; the verifier's row lookup equals
    a dict over ids.parquet; Parquet files changed after the build are what a load reads."""
    import pyarrow as pa

    from memscan.extraction.verify_index import IndexVerification, IndexVerifier
    from memscan.index.columns import StringColumn

    ids = write_training_set(tmp_path / "train", 30, size=16)
    out = tmp_path / "idx"
    build_index(tmp_path / "train", out, embedder="pixel:4", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rows.arrow matches: used, nothing said
        index = TrainingIndex.load(out, mmap=True)
    assert isinstance(index.ids, StringColumn) and isinstance(index.captions, StringColumn)
    assert all(isinstance(index.locations[c].dtype, pd.ArrowDtype) for c in index.locations.columns)
    # the rows are the Parquet files' (read here with pandas, independently)
    want = pd.read_parquet(out / "ids.parquet")
    assert index.ids == want["id"].tolist() == ids and index.captions == want["caption"].tolist()
    assert index.ids[3] == ids[3] and index.ids[-1] == ids[-1] and index.ids[[5, 1]] == [ids[5], ids[1]]
    assert list(index.ids) == ids and index.ids[:2] == ids[:2]
    loc = pd.read_parquet(out / "locations.parquet")
    assert index.locations.astype(object).equals(loc.astype(object))
    # the buffers are the memory map's (nothing read into the process)
    buf = index.ids.array.chunk(0).buffers()[2]
    mapped = pa.memory_map(str(out / "rows.arrow"))
    assert isinstance(buf, pa.Buffer) and not buf.is_mutable and mapped.size() >= buf.size
    verifier = IndexVerifier(IndexVerification(str(out), retrieve=3))
    position = {t: i for i, t in enumerate(want["id"])}
    assert [verifier.row_of(t) for t in reversed(ids)] == [position[t] for t in reversed(ids)]
    assert verifier.row_of("not-an-id") is None
    kept, images, skipped = verifier.reader.read([7, 2], size=(16, 16))
    assert kept.tolist() == [7, 2] and not skipped
    np.testing.assert_array_equal(images, np.stack([training_image(ids[7], 16), training_image(ids[2], 16)]))
    # Parquet rewritten after the build (another caption): the load reads it, not rows.arrow
    want.loc[4, "caption"] = "changed"
    want.to_parquet(out / "ids.parquet")
    with pytest.warns(UserWarning, match=r"rows.arrow is not used, its Parquet files' sizes or modification times"):
        assert TrainingIndex.load(out, mmap=True).captions[4] == "changed"
