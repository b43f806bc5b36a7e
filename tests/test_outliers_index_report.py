"""Memorization vs outliers beyond ``memscan compare``: the k-NN outlier score in a training
index's embedding space (against a brute-force k-NN there), and the outlier section of the
memscore / MIA report (``memscan report RUN --outliers``: Spearman against scipy, the most
disagreeing examples against a hand computation, captions escaped)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from memscan.cli import app
from memscan.compare.outliers import embedding_knn_distance, index_knn_distance
from memscan.index.embedders import PixelEmbedder, l2_normalize
from memscan.index.faiss_index import TrainingIndex

runner = CliRunner()


def _brute_cosine_knn(q, ref, self_rows, k):
    """k-th smallest 1 − cos to the reference rows, row self_rows[i] excluded (float64 loops)."""
    q, ref = np.asarray(q, np.float64), np.asarray(ref, np.float64)
    out = np.full(len(q), np.nan)
    for i in range(len(q)):
        d = sorted(1.0 - float(ref[j] @ q[i]) for j in range(len(ref)) if j != self_rows[i])
        if len(d) >= k:
            out[i] = round(max(d[k - 1], 0.0), 12)
    return out


def test_embedding_knn_distance_against_brute_force():
    rng = np.random.default_rng(3)
    ref = l2_normalize(rng.normal(size=(60, 10)))
    ref[7] = ref[8] = ref[9]  # exact duplicates: distance 0 to each other
    q = np.concatenate([ref[[0, 7, 20]], l2_normalize(rng.normal(size=(4, 10)))])
    self_rows = np.array([0, 7, 20, -1, -1, -1, -1])
    for k in (1, 2, 5):
        want = _brute_cosine_knn(q, ref, self_rows, k)
        np.testing.assert_allclose(embedding_knn_distance(q, ref, self_rows, k), want, atol=1e-6)
    d = embedding_knn_distance(q, ref, self_rows, 2)
    assert d[1] == 0.0  # two copies of row 7 remain once it is excluded
    # fewer than k other reference rows: NaN
    assert np.isnan(embedding_knn_distance(ref[:1], ref[:3], np.array([0]), 3)).all()


def test_index_outlier_score_uses_the_index_embedder_and_excludes_itself(tmp_path):
    """An index built by ``memscan index`` (pixel:4 embedder): members are represented by their
    stored vectors and excluded from their own neighbours; other examples are embedded with the
    recorded embedder. Against a brute force over PixelEmbedder(4) embeddings."""
    from memscan.data.training import load_training_set
    from memscan.synthetic import write_training_set

    train = tmp_path / "train"
    write_training_set(train, 30, size=16)
    res = runner.invoke(app, ["index", str(train), "--out", str(tmp_path / "idx"), "--embedder", "pixel:4"])
    assert res.exit_code == 0, res.output
    index = TrainingIndex.load(tmp_path / "idx")
    ts = load_training_set(train, size=(4, 4))  # decoded as memscan index decodes: at the embedder's size
    emb = PixelEmbedder(4).embed(ts.images)
    np.testing.assert_allclose(index.embeddings, emb, atol=1e-6)
    rng = np.random.default_rng(0)
    outsiders = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    ids = [ts.ids[2], ts.ids[11], "new-0", "new-1", "new-2"]
    images = np.concatenate([ts.images[[2, 11]], outsiders])
    q = np.concatenate([emb[[2, 11]], PixelEmbedder(4).embed(outsiders)])
    want = _brute_cosine_knn(q, emb, [2, 11, -1, -1, -1], 3)
    np.testing.assert_allclose(index_knn_distance(index, ids, images, 3), want, atol=1e-6)
    # without pictures, examples outside the index get no score
    got = index_knn_distance(index, ids, None, 3)
    assert np.isnan(got[2:]).all() and np.allclose(got[:2], want[:2], atol=1e-6)


# ---- the report's section ---------------------------------------------------------------------------
def _hand_disagreement(score, outlier, top):
    """Fractional ranks (average ties) / n, their difference, the ``top`` at each end."""
    score, outlier = np.asarray(score, float), np.asarray(outlier, float)
    ok = np.isfinite(score) & np.isfinite(outlier)
    n = ok.sum()
    rs = np.full(len(score), np.nan)
    ro = np.full(len(score), np.nan)
    rs[ok] = stats.rankdata(score[ok]) / n
    ro[ok] = stats.rankdata(outlier[ok]) / n
    diff = rs - ro
    order = [i for i in np.argsort(diff, kind="stable") if np.isfinite(diff[i])]
    return diff, order[::-1][:top], order[:top]


def _mia_run(tmp_path, caption=None):
    from golden_support import MIA_MEMBERS, _write_png, _write_tiny_unet, mia_ids, mia_images

    data, members, unet = tmp_path / "data", tmp_path / "members.txt", tmp_path / "unet"
    data.mkdir()
    for i, img in zip(mia_ids(), mia_images()):
        _write_png(data / f"{i}.png", img)
    if caption:
        for i in mia_ids():
            (data / f"{i}.txt").write_text(caption)
    members.write_text("\n".join(mia_ids()[:MIA_MEMBERS]) + "\n")
    _write_tiny_unet(unet)
    args = ["mia", "--data", data, "--model", unet, "--members", members, "--out", tmp_path / "run"]
    args += ["--timesteps", "10,100", "--noise-draws", 1, "--batch-size", 4, "--bootstrap", 0, "--quiet"]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return tmp_path / "run", data


def test_mia_report_outlier_section_spearman_disagreement_escaping(tmp_path):
    from memscan.compare.runs import summarize_run
    from memscan.data.training import load_training_set

    run, data = _mia_run(tmp_path, caption="<script>alert(1)</script> & a cat")
    assert "Memorization vs outliers" not in (run / "report.html").read_text()  # not asked for
    res = runner.invoke(app, ["report", str(run), "--outliers", "--k", "2"])
    assert res.exit_code == 0, res.output
    t = pd.read_parquet(run / "outliers.parquet")
    meta = json.loads((run / "outliers.json").read_text())
    # the score is the best attack's per-example score; the outlier score the pixel k-NN to members
    s = summarize_run(run)
    ex = pd.read_parquet(run / "examples.parquet").sort_values("index")
    np.testing.assert_allclose(t["score"], s.scores["score"])
    ts = load_training_set(data)
    pos = {i: n for n, i in enumerate(ts.ids)}
    x = np.stack([ts.images[pos[i]] for i in ex["id"]]).astype(np.float64).reshape(len(ex), -1) / 255.0
    mem = ex["is_member"].to_numpy(bool)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1))
    want = [round(sorted(d[i, j] for j in range(len(x)) if mem[j] and j != i)[1], 12) for i in range(len(x))]
    np.testing.assert_allclose(t["outlier"], want, atol=1e-9)
    # Spearman against scipy; the disagreeing examples against a hand computation
    rho = stats.spearmanr(t["score"], t["outlier"]).statistic
    assert meta["spearman"] == pytest.approx(rho) and meta["n"] == len(ex) and meta["k"] == 2
    diff, hi, lo = _hand_disagreement(t["score"], t["outlier"], 5)
    np.testing.assert_allclose(t["disagreement"], diff, atol=1e-12)
    ids = ex["id"].tolist()
    shown = set(t.loc[t["thumbnail"] != "", "id"])
    assert shown == {ids[i] for i in hi} | {ids[i] for i in lo}
    page = (run / "report.html").read_text()
    assert "Memorization vs outliers" in page and f"ρ = {rho:.3f}" in page
    sec = page[page.index("Memorization vs outliers") :]
    first = sec[sec.index("High score, typical") : sec.index("Outlying, low score")]
    second = sec[sec.index("Outlying, low score") :]
    in_page_order = lambda part: sorted(  # noqa: E731
        (i for i in ids if f"<code>{i}</code>" in part), key=lambda i: part.index(f"<code>{i}</code>")
    )
    assert in_page_order(first) == [ids[i] for i in hi]
    assert in_page_order(second) == [ids[i] for i in lo]
    assert sec.count("data:image/png;base64") >= 1 + 10  # scatter + thumbnails
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; a cat" in page
    # recomputed in a training index's embedding space: reference = the index's images
    res = runner.invoke(app, ["index", str(data), "--out", str(tmp_path / "idx"), "--embedder", "pixel:4"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", str(run), "--outliers", "--index", str(tmp_path / "idx"), "--k", "2"])
    assert res.exit_code == 0, res.output
    t2 = pd.read_parquet(run / "outliers.parquet")
    ts4 = load_training_set(data, size=(4, 4))
    emb = PixelEmbedder(4).embed(np.stack([ts4.images[ts4.ids.index(i)] for i in ex["id"]]))
    want2 = _brute_cosine_knn(emb, emb, list(range(len(emb))), 2)  # every example is indexed
    np.testing.assert_allclose(t2["outlier"], want2, atol=1e-6)
    meta2 = json.loads((run / "outliers.json").read_text())
    assert "index embedding" in meta2["space"] and meta2["index"] == str((tmp_path / "idx").resolve())
    assert len(list((run / "images" / "outliers").glob("*.png"))) == (t2["thumbnail"] != "").sum()
    # memscan compare --index: the same embedding space for every compared run
    import shutil

    shutil.copytree(run, tmp_path / "run2")
    res = runner.invoke(app, ["compare", str(run), str(tmp_path / "run2"), "--out", str(tmp_path / "cmp")]
                        + ["--index", str(tmp_path / "idx"), "--k", "2", "--quiet"])  # fmt: skip
    assert res.exit_code == 0, res.output
    o = pd.read_parquet(tmp_path / "cmp" / "outliers.parquet")
    np.testing.assert_allclose(o.loc[o["run"] == str(run), "outlier"], want2, atol=1e-6)
    assert json.loads((tmp_path / "cmp" / "manifest.json").read_text())["index"] == str((tmp_path / "idx").resolve())
    assert "embeddings of the training index" in (tmp_path / "cmp" / "compare.html").read_text()


def test_memscore_report_outlier_section_and_bad_inputs(tmp_path):
    from golden_support import MEMSCORE_X

    np.save(tmp_path / "x.npy", np.asarray(MEMSCORE_X))
    args = ["memscore", "--data", tmp_path / "x.npy", "--train-fn", "py:golden_support:gauss_train"]
    args += ["--log-likelihood-fn", "py:golden_support:gauss_loglik", "--folds", 3, "--out", tmp_path / "m"]
    res = runner.invoke(app, [str(a) for a in [*args, "--quiet"]])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", str(tmp_path / "m"), "--outliers", "--k", "3"])
    assert res.exit_code == 0, res.output
    ms = pd.read_parquet(tmp_path / "m" / "memscore.parquet")
    t = pd.read_parquet(tmp_path / "m" / "outliers.parquet")
    x = np.asarray(MEMSCORE_X)
    want = [round(sorted(abs(x[i] - x[j]) for j in range(len(x)) if j != i)[2], 12) for i in range(len(x))]
    np.testing.assert_allclose(t["outlier"], want, atol=1e-9)
    rho = stats.spearmanr(ms["score"], want).statistic
    page = (tmp_path / "m" / "report.html").read_text()
    assert f"ρ = {rho:.3f}" in page and "memorization score M" in page
    assert json.loads((tmp_path / "m" / "outliers.json").read_text())["spearman"] == pytest.approx(rho)
    # the same at run time: memscore --outliers records it and the run's page shows it
    res = runner.invoke(app, [str(a) for a in [*args[:-1], tmp_path / "m2", "--outliers", "--quiet"]])
    assert res.exit_code == 0, res.output
    t2 = pd.read_parquet(tmp_path / "m2" / "outliers.parquet")
    want5 = [round(sorted(abs(x[i] - x[j]) for j in range(len(x)) if j != i)[4], 12) for i in range(len(x))]
    np.testing.assert_allclose(t2["outlier"], want5, atol=1e-9)  # k = 5
    rho5 = stats.spearmanr(ms["score"], want5).statistic
    assert f"ρ = {rho5:.3f}" in (tmp_path / "m2" / "report.html").read_text()
    # arrays cannot be embedded by an image index; --index without --outliers; an extract run
    res = runner.invoke(app, ["report", str(tmp_path / "m"), "--index", str(tmp_path)])
    assert res.exit_code != 0 and "--outliers" in res.output
    res = runner.invoke(app, ["report", str(tmp_path / "m"), "--outliers", "--k", "0"])
    assert res.exit_code != 0 and "--k" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_lm_mia_report_outlier_section_tfidf_and_escaped_texts(tmp_path):
    """An lm-mia run (tiny random GPT-2): TF-IDF k-NN distance to the member texts, against a
    brute force; the page shows the texts escaped."""
    pytest.importorskip("transformers")
    from lm_support import MEMBERS, NONMEMBERS
    from sklearn.feature_extraction.text import TfidfVectorizer

    from memscan.testing.tiny_lm import make_tiny_gpt2

    model = make_tiny_gpt2(tmp_path / "gpt2", seed=4)
    members = [*MEMBERS[:-1], MEMBERS[-1] + " <b>bold</b>"]
    (tmp_path / "m.txt").write_text("\n".join(members) + "\n")
    (tmp_path / "n.txt").write_text("\n".join(NONMEMBERS) + "\n")
    args = ["lm", "mia", "--model", model, "--members", tmp_path / "m.txt", "--nonmembers", tmp_path / "n.txt"]
    res = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "a", "--bootstrap", 0, "--quiet"]])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", str(tmp_path / "a"), "--outliers", "--k", "2"])
    assert res.exit_code == 0, res.output
    ex = pd.read_parquet(tmp_path / "a" / "examples.parquet").sort_values("index")
    v = TfidfVectorizer().fit_transform(ex["text"]).toarray()
    mem = ex["is_member"].to_numpy(bool)
    cos = 1 - v @ v.T
    want = [round(sorted(cos[i, j] for j in range(len(ex)) if mem[j] and j != i)[1], 12) for i in range(len(ex))]
    t = pd.read_parquet(tmp_path / "a" / "outliers.parquet")
    np.testing.assert_allclose(t["outlier"], want, atol=1e-9)
    page = (tmp_path / "a" / "report.html").read_text()
    rho = stats.spearmanr(t["score"], want).statistic
    assert "Memorization vs outliers" in page and f"ρ = {rho:.3f}" in page
    assert "<b>bold</b>" not in page
