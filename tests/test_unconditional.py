"""Unconditional extraction: every generation's calibrated distance against a brute-force
recomputation, de-duplication by training image, resume, and the index path."""

import numpy as np
import pandas as pd
import pytest

from memscan import MemscanError
from memscan.extraction.unconditional import UnconditionalConfig, extract_unconditional
from memscan.generators.seeds import derive_seed
from memscan.index.faiss_index import build_index
from memscan.synthetic import SyntheticGenerator, keyed_rng, training_image, write_training_set

SIZE = 16
MEMORIZED = "t0007"


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    root = tmp_path_factory.mktemp("uncond") / "train"
    write_training_set(root, 150, size=SIZE)
    return root


def _gen():
    return SyntheticGenerator({"": MEMORIZED}, size=SIZE, copy_rate=0.3, noise=0.01)


def _brute_force(samples: int, metric: str = "l2", n: int = 50, seed: int = 0):
    """Regenerate every image from its seed; calibrated distance straight from the definition."""
    ids = [f"t{i:04d}" for i in range(150)]
    train = np.stack([training_image(t, SIZE) for t in ids]).astype(np.float64) / 255
    seeds = [derive_seed(seed, "unconditional", i) for i in range(samples)]
    gens = _gen().generate("", seeds).astype(np.float64) / 255
    diff2 = (gens[:, None] - train[None]) ** 2
    if metric == "l2":
        d = np.sqrt(diff2.mean(axis=(2, 3, 4)))
    else:
        t = diff2.reshape(samples, 150, 4, SIZE // 4, 4, SIZE // 4, 3).mean(axis=(3, 5, 6))
        d = np.sqrt(t.reshape(samples, 150, -1).max(axis=2))
    order = np.argsort(d, axis=1, kind="stable")[:, :n]
    dn = np.take_along_axis(d, order, 1)
    cal = dn[:, 0] / (0.5 * dn.mean(axis=1))
    copies = [i for i, s in enumerate(seeds) if keyed_rng("sample", s).uniform() < 0.3]
    return seeds, [ids[j] for j in order[:, 0]], dn[:, 0], cal, copies


@pytest.mark.parametrize("metric", ["l2", "tiled_l2"])
def test_calibrated_decisions_match_brute_force(train, tmp_path, metric):
    cfg = UnconditionalConfig(samples=80, shard_size=32, batch_size=16, metric=metric)
    res = extract_unconditional(_gen(), train, tmp_path / "run", cfg, progress=False)
    seeds, nearest_id, nearest_d, cal, copies = _brute_force(80, metric)
    g = res.generations.sort_values("sample_index").reset_index(drop=True)
    assert g["sample_index"].tolist() == list(range(80)) and g["seed"].tolist() == seeds
    assert g["nearest_train_id"].tolist() == nearest_id
    np.testing.assert_allclose(g["nearest_distance"], nearest_d, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g["calibrated"], cal, rtol=1e-5)
    assert g["extracted"].tolist() == (cal < 1).tolist()
    assert (g["n_nearest"] == 50).all()
    # every planted copy is extracted, and they collapse into one row for the memorized image
    assert len(copies) >= 10 and g.loc[copies, "extracted"].all()
    ext = res.extractions.set_index("train_id")
    assert ext.loc[MEMORIZED, "hits"] == int((g["extracted"] & (g["nearest_train_id"] == MEMORIZED)).sum())
    assert set(copies) <= set(ext.loc[MEMORIZED, "sample_indices"])
    assert ext.index.is_unique and ext["hits"].sum() == g["extracted"].sum()
    best = g[g["nearest_train_id"] == MEMORIZED]["calibrated"].min()
    assert ext.loc[MEMORIZED, "calibrated"] == pytest.approx(best)
    # the run directory: manifest, tables, images of what was extracted
    m = res.manifest
    assert m["status"] == "complete" and m["calibrated"]["alpha_c"] == 0.5 and m["calibrated"]["n"] == 50
    assert m["counts"]["extracted_training_images"] == len(ext)
    assert (tmp_path / "run" / ext.loc[MEMORIZED, "candidate_image"]).exists()
    assert (tmp_path / "run" / ext.loc[MEMORIZED, "train_image"]).exists()
    assert len(pd.read_parquet(tmp_path / "run" / "generations.parquet")) == 80


def test_resume_gives_the_same_tables(train, tmp_path):
    cfg = UnconditionalConfig(samples=60, shard_size=20, batch_size=8, n_nearest=20)
    full = extract_unconditional(_gen(), train, tmp_path / "full", cfg, progress=False)
    with pytest.raises(MemscanError, match="stopped before"):
        extract_unconditional(_gen(), train, tmp_path / "part", cfg, progress=False, stop_after_shards=1)
    with pytest.raises(MemscanError, match="already holds a run"):
        extract_unconditional(_gen(), train, tmp_path / "part", cfg, progress=False)
    done = extract_unconditional(_gen(), train, tmp_path / "part", cfg, progress=False, resume=True)
    pd.testing.assert_frame_equal(done.generations, full.generations)
    pd.testing.assert_frame_equal(done.extractions, full.extractions)
    with pytest.raises(MemscanError, match="differs"):
        extract_unconditional(
            _gen(),
            train,
            tmp_path / "part",
            UnconditionalConfig(samples=61, shard_size=20),
            progress=False,
            resume=True,
        )


def test_index_path_re_ranks_on_pixels(train, tmp_path):
    build_index(train, tmp_path / "idx", progress=False)
    exact = extract_unconditional(_gen(), train, tmp_path / "exact", UnconditionalConfig(samples=40), progress=False)
    # candidates = the whole training set: the exact pixel re-rank must give the exact answer
    cfg = UnconditionalConfig(samples=40, n_candidates=150)
    via = extract_unconditional(_gen(), train, tmp_path / "via", cfg, index=tmp_path / "idx", progress=False)
    cols = ["nearest_train_id", "nearest_distance", "calibrated", "extracted"]
    pd.testing.assert_frame_equal(via.generations[cols], exact.generations[cols], rtol=1e-6)
    assert via.manifest["search"]["search"] == "index"
    # fewer candidates than training images: still finds the memorized image for every copy
    few = extract_unconditional(
        _gen(),
        train,
        tmp_path / "few",
        UnconditionalConfig(samples=40, n_candidates=60),
        index=tmp_path / "idx",
        progress=False,
    )
    g, e = few.generations, exact.generations
    hit = e["nearest_train_id"] == MEMORIZED
    assert (g.loc[hit, "nearest_train_id"] == MEMORIZED).all() and g.loc[hit, "extracted"].all()
    assert few.manifest["retrieval"]["fewer_than_k"] == 0  # a flat index returns every one asked for


def test_an_ivf_index_that_returns_fewer_candidates_is_counted(train, tmp_path):
    """IVF, nprobe 1 of 8 cells: each generation gets only its nearest cell's images (fewer than
    the 100 asked); the manifest counts those generations — here by brute force over the cells."""
    import faiss

    from memscan.index.embedders import load_embedder
    from memscan.index.faiss_index import IndexParams, TrainingIndex

    idx = tmp_path / "ivf"
    build_index(train, idx, embedder="pixel:8", index_type=IndexParams("ivf", nlist=8, nprobe=1), progress=False)
    cfg = UnconditionalConfig(samples=24, n_candidates=100, n_nearest=20)
    res = extract_unconditional(_gen(), train, tmp_path / "run", cfg, index=idx, progress=False)
    index = TrainingIndex.load(idx)
    ivf = faiss.extract_index_ivf(index.index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    cell_of = np.argmax(np.asarray(index.embeddings) @ centroids.T, axis=1)
    seeds = [derive_seed(0, "unconditional", i) for i in range(24)]
    q = load_embedder(index.meta["embedder"]).embed(_gen().generate("", seeds))
    sizes = np.array([int((cell_of == c).sum()) for c in np.argmax(q @ centroids.T, axis=1)])
    assert sizes.max() < 100
    assert res.manifest["retrieval"]["fewer_than_k"] == int((sizes < 100).sum()) == 24


def test_cli_extract_unconditional(synth_train, tmp_path):
    from typer.testing import CliRunner

    from memscan.cli import app

    args = [
        "extract-unconditional",
        "--model",
        "py:gen_support:planted",
        "--train",
        str(synth_train),
        "--samples",
        "48",
        "--out",
        str(tmp_path / "run"),
        "--prompt",
        "copy t0003",
        "--quiet",
        "--shard-size",
        "16",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "48 generations" in r.output
    ext = pd.read_parquet(tmp_path / "run" / "extractions.parquet")
    assert "t0003" in ext["train_id"].tolist()
    bad = CliRunner().invoke(app, [*args[:8], str(tmp_path / "run2"), "--metric", "cosine"])
    assert bad.exit_code == 2 and "metric" in bad.output


def test_report_of_an_unconditional_run(synth_train, tmp_path):
    """`memscan report` on an extract-unconditional run: the extracted training image beside its
    generation, counts equal to the tables, every generation's calibrated distance plotted."""
    import base64
    import re

    from typer.testing import CliRunner

    from memscan.cli import app

    out = tmp_path / "run"
    args = ["extract-unconditional", "--model", "py:gen_support:planted", "--train", str(synth_train)]
    args += ["--samples", "40", "--out", str(out), "--prompt", "copy t0003", "--quiet"]
    assert CliRunner().invoke(app, args).exit_code == 0
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    html = (out / "report.html").read_text()
    gen, ext = pd.read_parquet(out / "generations.parquet"), pd.read_parquet(out / "extractions.parquet")
    assert ext["train_id"].tolist() == ["t0003"]
    assert f"Extracted training images ({len(ext)})" in html
    assert "<code>t0003</code>" in html
    assert f'<td class="num">{len(gen)}</td>' in html
    assert f'<td class="num">{int(gen["extracted"].sum())}</td>' in html
    assert "script-src" not in html and "default-src 'none'" in html
    # the card's two images are the run's own PNGs, embedded
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    embedded = {base64.b64decode(u) for u in uris}
    assert (out / ext["candidate_image"][0]).read_bytes() in embedded
    assert (out / ext["train_image"][0]).read_bytes() in embedded
    # closest non-extracted generations, sorted by calibrated distance
    rest = gen[~gen["extracted"]].nsmallest(20, "calibrated")
    shown = [
        float(v)
        for v in re.findall(
            r"<tr><td class=\"num\">\d+</td><td><code>[^<]*</code></td><td class=\"num\">([\d.]+)</td>", html
        )
    ]
    np.testing.assert_allclose(shown, rest["calibrated"].round(3).to_numpy(), atol=1e-9)


def test_ray_runner_tables_equal_the_local_runner(ray_address, train, tmp_path):
    """``--runner ray``: the same stage over the same shards on Ray workers (each loads the model
    from its spec) writes the local runner's tables, and records the model and the runner."""
    from typer.testing import CliRunner

    from memscan.cli import app

    address, _ = ray_address
    args = ["extract-unconditional", "--model", "py:gen_support:unconditional16", "--train", str(train)]
    args += ["--samples", "24", "--shard-size", "8", "--batch-size", "4", "--n-nearest", "10", "--quiet"]
    local, ray_run = tmp_path / "local", tmp_path / "ray"
    res = CliRunner().invoke(app, [*args, "--out", str(local)])
    assert res.exit_code == 0, res.output
    ray_args = ["--runner", "ray", "--ray-address", address, "--num-workers", "2"]
    res = CliRunner().invoke(app, [*args, "--out", str(ray_run), *ray_args])
    assert res.exit_code == 0, res.output
    for t in ("generations", "extractions"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(local / f"{t}.parquet"), pd.read_parquet(ray_run / f"{t}.parquet")
        )
    import json

    m = json.loads((ray_run / "manifest.json").read_text())
    assert m["runner"]["name"] == "ray" and m["model"]["id"] == "py:gen_support:unconditional16"
    workers = {json.loads(p.read_text())["worker"] for p in (ray_run / "shards").glob("*.done.json")}
    assert workers and all(w.startswith("ray:w") for w in workers)
    assert json.loads((local / "manifest.json").read_text())["runner"]["name"] == "local"


def test_generations_do_not_depend_on_the_shard_size(tmp_path):
    """Shards are whole batches, so every model call holds the same samples: a tiny UNet2DModel
    with DDIM (whose float rounding moves a pixel by a grey level when a sample's batch changes)
    gives bit-identical tables with shards of 16 and of 10 (rounded up to 16), equal to a
    brute force over the generations made in whole batches of 16 from sample 0."""
    from dataclasses import replace

    from diffusers import DDIMScheduler
    from gen_support import tiny_unet

    from memscan.generators.diffusers_unet import DiffusersUNetGenerator

    gen = DiffusersUNetGenerator(
        tiny_unet(size=16), DDIMScheduler(num_train_timesteps=1000), num_inference_steps=10, batch_size=16
    )
    write_training_set(tmp_path / "train", 30, size=16)
    cfg = UnconditionalConfig(samples=48, batch_size=16, n_nearest=5, save_images=False)
    a = extract_unconditional(gen, tmp_path / "train", tmp_path / "a", replace(cfg, shard_size=16), progress=False)
    b = extract_unconditional(gen, tmp_path / "train", tmp_path / "b", replace(cfg, shard_size=10), progress=False)
    assert b.manifest["shard_samples"] == 16 and b.manifest["n_shards"] == 3
    pd.testing.assert_frame_equal(a.generations, b.generations, check_exact=True)
    seeds = [derive_seed(0, "unconditional", i) for i in range(48)]
    imgs = np.concatenate([gen.generate("", seeds[s : s + 16]) for s in range(0, 48, 16)]).astype(np.float64) / 255
    train = np.stack([training_image(f"t{i:04d}", 16) for i in range(30)]).astype(np.float64) / 255
    d = np.sqrt(((imgs[:, None] - train[None]) ** 2).mean(axis=(2, 3, 4)))
    g = b.generations.sort_values("sample_index")
    np.testing.assert_allclose(g["nearest_distance"], d.min(axis=1), rtol=1e-6, atol=1e-7)


def test_a_training_set_smaller_than_n_is_recorded_and_warned_about(tmp_path):
    """n = 50 over 3 training images: ℓ averages over all 3 (n_effective), in the manifest and
    run.log; with one image every generation gets ℓ = 1/α_c = 2 (never extracted), said so."""
    write_training_set(tmp_path / "train3", 3, size=SIZE)
    res = extract_unconditional(
        _gen(), tmp_path / "train3", tmp_path / "r3", UnconditionalConfig(samples=8), progress=False
    )
    cal = res.manifest["calibrated"]
    assert cal["n_requested"] == 50 and cal["n_effective"] == 3 and cal["n"] == 3
    log = (tmp_path / "r3" / "run.log").read_text()
    assert "fewer than n_nearest=50" in log and "n_effective=3" in log
    # the calibrated distance over the 3 images, by hand
    train = np.stack([training_image(f"t{i:04d}", SIZE) for i in range(3)]).astype(np.float64) / 255
    seeds = [derive_seed(0, "unconditional", i) for i in range(8)]
    gens = _gen().generate("", seeds).astype(np.float64) / 255
    d = np.sort(np.sqrt(((gens[:, None] - train[None]) ** 2).mean(axis=(2, 3, 4))), axis=1)
    np.testing.assert_allclose(res.generations["calibrated"], d[:, 0] / (0.5 * d.mean(axis=1)), rtol=1e-5)
    write_training_set(tmp_path / "train1", 1, size=SIZE)
    one = extract_unconditional(
        _gen(), tmp_path / "train1", tmp_path / "r1", UnconditionalConfig(samples=4), progress=False
    )
    assert one.manifest["calibrated"]["n_effective"] == 1 and not one.generations["extracted"].any()
    np.testing.assert_allclose(one.generations["calibrated"], 2.0)
    assert "none is extracted" in (tmp_path / "r1" / "run.log").read_text()


def test_calibrated_rows_equal_the_library_calibrated_distance_on_float32_distances():
    """The run's ℓ (over each row's finite distances) equals :func:`calibrated_from_neighbours`
    bit for bit on the float32 distances the searches return; it summed them in float32 and
    differed in most rows by up to 1.5e-7, enough to decide a near-tie at 1 the other way."""
    from memscan.extraction.calibrated import calibrated_from_neighbours
    from memscan.extraction.unconditional import _calibrated_rows

    d = np.sort(np.random.default_rng(4).uniform(0.05, 0.5, (2000, 50)).astype(np.float32), axis=1)
    cal, nearest, mean, n_used = _calibrated_rows(d, 0.5)
    want_cal, want_nearest, want_mean = calibrated_from_neighbours(d, 0.5)
    np.testing.assert_array_equal(cal, want_cal)
    np.testing.assert_array_equal(mean, want_mean)
    np.testing.assert_array_equal(nearest, want_nearest)
    assert (n_used == 50).all()
    # a row with fewer finite neighbours (an index returned fewer): ℓ over those only
    short = d[:1].copy()
    short[0, 10:] = np.inf
    np.testing.assert_array_equal(_calibrated_rows(short, 0.5)[0], calibrated_from_neighbours(d[:1, :10], 0.5)[0])
