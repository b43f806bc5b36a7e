"""``memscan compare``: the tables against hand computations from the runs' own tables, the
log-linear fit against numpy's least squares, refusal of incomparable runs, the outlier score
against a brute-force kNN, escaping of labels, and a checkpoint sweep killed and resumed."""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pandas as pd
import pytest
from compare_support import DUP, extraction_runs, prompt_table
from typer.testing import CliRunner

from memscan.cli import app
from memscan.compare.outliers import knn_distance, text_knn_distance
from memscan.compare.run import compare_runs
from memscan.compare.scaling import log_linear_fit
from memscan.errors import InputError
from memscan.store import RunStore

runner = CliRunner()


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    return tmp, extraction_runs(tmp)


@pytest.fixture(scope="module")
def compared(three_runs):
    tmp, runs = three_runs
    return compare_runs(runs, tmp / "compare", by="step", progress=False)


def test_table_equals_a_hand_computation_from_each_run(three_runs, compared):
    _, runs = three_runs
    t = compared.table.set_index("run")
    items = {}
    for r in runs:
        det = pd.read_parquet(r / "detections.parquet")
        ext = pd.read_parquet(r / "extractions.parquet")
        prompts = pd.read_parquet(r / "prompts.parquet")
        man = json.loads((r / "manifest.json").read_text())
        top = ext[(ext["rank"] == 1) & ext["extracted"]]
        row = t.loc[str(r)]
        # 1. counts under the manifest's names, recomputed from the tables
        assert row["prompts"] == len(prompts) == len(det)
        assert row["detections"] == int(det["detected"].sum())
        assert row["extractions"] == len(top)
        assert row["extraction_rate"] == pytest.approx(len(top) / len(prompts))
        assert row["memorization"] == row["extraction_rate"] and row["memorization_measure"] == "extraction_rate"
        assert row["step"] == man["model"]["training_step"] and row["kind"] == "extract"
        assert row["mismatch"] == ""
        # 2. extraction rate by duplicate count
        d = compared.run_dir / "by_duplicates.parquet"
        got = pd.read_parquet(d).query("run == @r.__str__()").set_index("duplicate_count")
        hit = set(top["prompt_id"])
        for count, g in prompts.groupby("duplicate_count"):
            want = sum(pid in hit for pid in g["prompt_id"]) / len(g)
            assert got.loc[count, "extraction_rate"] == pytest.approx(want)
            assert got.loc[count, "prompts"] == len(g)
        items[str(r)] = set(top["train_id"])
    # 3. memorized items and their Jaccard overlap
    ov = compared.overlap.set_index(["run_a", "run_b"])
    for a in items:
        for b in items:
            both, union = len(items[a] & items[b]), len(items[a] | items[b])
            assert ov.loc[(a, b), "both"] == both and ov.loc[(a, b), "union"] == union
            assert ov.loc[(a, b), "jaccard"] == pytest.approx(both / union)
    # the planted ground truth: later checkpoints extract more, the most duplicated first
    assert [len(items[str(r)]) for r in runs] == [1, 4, 5]
    assert sorted(DUP, reverse=True) == DUP and prompt_table()["duplicate_count"].iloc[0] == 200


def test_log_linear_fit_against_numpy_least_squares():
    rng = np.random.default_rng(3)
    x = 10 ** rng.uniform(2, 5, 7)
    y = 0.3 + 0.12 * np.log10(x) + rng.normal(0, 0.02, 7)
    f = log_linear_fit(x, y)
    X = np.column_stack([np.ones_like(x), np.log10(x)])
    coef, rss, *_ = np.linalg.lstsq(X, y, rcond=None)
    assert f.intercept == pytest.approx(coef[0]) and f.slope == pytest.approx(coef[1])
    # the slope's standard error: sqrt(σ² (XᵀX)⁻¹[1, 1]), σ² = RSS / (n − 2)
    cov = rss[0] / (len(x) - 2) * np.linalg.inv(X.T @ X)
    assert f.slope_se == pytest.approx(math.sqrt(cov[1, 1]))
    from scipy import stats

    q = stats.t.ppf(0.975, len(x) - 2)
    assert f.slope_ci == pytest.approx((coef[1] - q * f.slope_se, coef[1] + q * f.slope_se))
    assert f.r2 == pytest.approx(1 - rss[0] / ((y - y.mean()) ** 2).sum())
    with pytest.raises(ValueError):
        log_linear_fit([1, 10], [0.1, float("nan")])


def test_the_compare_fit_is_least_squares_over_its_table(compared):
    t, f = compared.table, compared.fits
    assert len(f) == 1 and f.iloc[0]["n"] == 3 and f.iloc[0]["by"] == "step"
    X = np.column_stack([np.ones(3), np.log10(t["step"].astype(float))])
    coef, *_ = np.linalg.lstsq(X, t["memorization"].astype(float), rcond=None)
    assert f.iloc[0]["slope"] == pytest.approx(coef[1]) and f.iloc[0]["intercept"] == pytest.approx(coef[0])
    assert f.iloc[0]["slope"] > 0  # later checkpoints memorize more
    page = (compared.run_dir / "compare.html").read_text()
    assert "Memorization against step" in page and "slope per decade" in page


def test_runs_with_other_thresholds_or_data_are_refused_or_flagged(three_runs, tmp_path):
    tmp, runs = three_runs
    other = extraction_runs(tmp_path, delta=0.2)[0]  # another δ
    with pytest.raises(InputError, match=r"config\.delta"):
        compare_runs([runs[0], other], tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    res = compare_runs([runs[0], other], tmp_path / "flagged", allow_mismatch=True, progress=False)
    assert all("config.delta" in m for m in res.table["mismatch"])
    page = (res.run_dir / "compare.html").read_text()
    assert "--allow-mismatch" in page and "config.delta" in page
    # another training set (same thresholds)
    from memscan.synthetic import write_training_set

    man = json.loads((runs[1] / "manifest.json").read_text())
    write_training_set(tmp_path / "train2", 120, size=32, prefix="t")
    moved = tmp_path / "moved"
    from memscan.extraction.pipeline import extract
    from memscan.synthetic import SyntheticGenerator

    extract(
        SyntheticGenerator({}, size=32),
        prompt_table(),
        tmp_path / "train2",
        moved,
        __import__("compare_support").config(),
        progress=False,
    )
    assert man["training_set"]["source"] != json.loads((moved / "manifest.json").read_text())["training_set"]["source"]
    res = runner.invoke(app, ["compare", str(runs[1]), str(moved), "--out", str(tmp_path / "c2"), "--quiet"])
    assert res.exit_code == 2 and "training_set.source" in res.output and "--allow-mismatch" in res.output


def test_bad_inputs_are_one_clear_error(three_runs, tmp_path):
    tmp, runs = three_runs
    cases = [
        (["compare", runs[0], "--out", tmp_path / "a"], "at least 2 runs"),
        (["compare", runs[0], runs[0], "--out", tmp_path / "b"], "given twice"),
        (["compare", runs[0], tmp_path / "nowhere", "--out", tmp_path / "c"], "not a memscan run"),
        (["compare", runs[0], runs[1], "--out", tmp_path / "d", "--by", "colour"], "--by"),
        (["compare", runs[0], runs[1], "--out", tmp_path / "e", "--label", "nolabel"], "RUN=TEXT"),
    ]
    for argv, want in cases:
        res = runner.invoke(app, [str(a) for a in argv])
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert res.exit_code == 2 and len(errors) == 1 and want in errors[0], res.output


def test_labels_are_escaped_in_the_page(three_runs, tmp_path):
    _, runs = three_runs
    evil = "<script>alert(1)</script>"
    res = runner.invoke(
        app,
        ["compare", str(runs[0]), str(runs[2]), "--out", str(tmp_path / "x"), "--label", f"{runs[0]}={evil}"]
        + ["--quiet"],
    )
    assert res.exit_code == 0, res.output
    page = (tmp_path / "x" / "compare.html").read_text()
    assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert pd.read_parquet(tmp_path / "x" / "compare.parquet")["label"].iloc[0] == evil


# ---- outliers -------------------------------------------------------------------------------------
def _brute_knn(x, ref, k):
    n = len(x)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).mean(-1))
    out = np.full(n, np.nan)
    for i in range(n):
        others = [d[i, j] for j in range(n) if ref[j] and j != i]
        if len(others) >= k:
            out[i] = round(sorted(others)[k - 1], 12)
    return out


def test_outlier_score_against_brute_force_knn():
    rng = np.random.default_rng(0)
    x = rng.random((40, 12)).astype(np.float32)
    x[5] = x[6] = x[7]  # exact duplicates: distance 0 to each other, never outliers
    ref = rng.random(40) < 0.7
    ref[[5, 6, 7]] = True
    for k in (1, 2, 5):
        np.testing.assert_allclose(knn_distance(x, ref, k), _brute_knn(x.astype(np.float64), ref, k), atol=1e-12)
    assert knn_distance(x, None, 2)[5] == 0.0


def test_text_outlier_score_against_brute_force_cosine():
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = ["the cat sat", "the cat sat down", "a dog ran", "the dog sat", "quantum chromodynamics", "cat cat"]
    ref = np.array([True, True, True, True, True, False])
    v = TfidfVectorizer().fit_transform(texts).toarray()
    cos = 1 - v @ v.T
    want = [round(sorted(cos[i, j] for j in range(6) if ref[j] and j != i)[1], 12) for i in range(6)]
    np.testing.assert_allclose(text_knn_distance(texts, ref, 2), want, atol=1e-12)


def test_memscore_runs_get_outlier_correlations(tmp_path):
    """Two memscore runs (the Gaussian toy of tests/golden_support.py): distribution summaries
    from memscore.parquet, Spearman between the score and the brute-force k-NN distance."""
    from golden_support import MEMSCORE_X
    from scipy import stats

    np.save(tmp_path / "x.npy", np.asarray(MEMSCORE_X))
    outs = []
    for name in ("a", "b"):
        args = ["memscore", "--data", tmp_path / "x.npy", "--train-fn", "py:golden_support:gauss_train"]
        args += ["--log-likelihood-fn", "py:golden_support:gauss_loglik", "--folds", 3, "--repeats", 1]
        args += ["--out", tmp_path / name, "--quiet"]
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        outs.append(tmp_path / name)
    res = compare_runs(outs, tmp_path / "cmp", k=2, progress=False)
    ms = pd.read_parquet(outs[0] / "memscore.parquet")
    row = res.table.iloc[0]
    assert row["memscore_mean"] == pytest.approx(ms["score"].mean())
    assert row["memscore_p90"] == pytest.approx(np.quantile(ms["score"], 0.9))
    x = np.asarray(MEMSCORE_X, np.float64).reshape(len(ms), -1)
    knn = _brute_knn(x, np.ones(len(x), bool), 2)
    o = res.outliers[res.outliers["run"] == str(outs[0])]
    np.testing.assert_allclose(o["outlier"], knn, rtol=1e-5)
    assert row["outlier_spearman"] == pytest.approx(stats.spearmanr(ms["score"], knn).statistic)


# ---- checkpoint sweeps ------------------------------------------------------------------------------
def _tiny_checkpoints(root):
    """checkpoint-10 (a full pipeline) and checkpoint-20 (unet/ only, completed by the base):
    two tiny UNet2DModels built from config, with different weights."""
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler
    from gen_support import tiny_unet

    base = root / "base"
    for step, seed in ((10, 0), (20, 1)):
        unet = tiny_unet(size=8, channels=1, blocks=(8, 8), seed=seed)
        with torch.no_grad():
            for p in unet.parameters():
                p.mul_(0.5)
        ck = root / "ckpts" / f"checkpoint-{step}"
        if step == 10:
            DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(ck)
            DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(base)
        else:
            unet.save_pretrained(ck / "unet")
    return root / "ckpts", base


def _sweep_argv(tmp, ckpts, base, out):
    from memscan.synthetic import write_training_set

    train, held = tmp / "train8", tmp / "held8"
    if not train.exists():
        write_training_set(train, 12, size=8, channels=1)
        write_training_set(held, 4, size=8, channels=1, prefix="h")
        (tmp / "p.txt").write_text("a\nb\nc\nd\n")
    return [
        "extract", "--model", ckpts, "--base", base, "--heldout", held, "--prompts", tmp / "p.txt", "--train", train,
        "--out", out, "--samples-per-prompt", 6, "--min-clique", 3, "--shard-size", 2, "--batch-size", 6,
        "--steps", 2, "--quiet",
    ]  # fmt: skip


def test_checkpoint_sweep_killed_and_resumed(tmp_path, monkeypatch):
    ckpts, base = _tiny_checkpoints(tmp_path)
    full = tmp_path / "full"
    res = runner.invoke(app, [str(a) for a in _sweep_argv(tmp_path, ckpts, base, full)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    t = pd.read_parquet(full / "compare.parquet")
    assert t["step"].tolist() == [10, 20] and t["label"].tolist() == ["checkpoint-10", "checkpoint-20"]
    assert t["heldout_loss"].notna().all() and t["train_loss"].notna().all()
    held = pd.read_parquet(full / "heldout.parquet")
    np.testing.assert_allclose(held["heldout_loss"], t["heldout_loss"])
    # the same attack and seeds on each checkpoint: same config, and the model record names it
    m10, m20 = (json.loads((full / f"checkpoint-{s}" / "manifest.json").read_text()) for s in (10, 20))
    assert m10["config"] == m20["config"] and m20["model"]["training_step"] == 20
    assert (full / ".models" / "checkpoint-20" / "scheduler").is_symlink()
    assert RunStore(full).read_manifest()["kind"] == "compare"

    # killed during checkpoint-20's first shard commit, then resumed
    class Killed(BaseException):
        pass

    killed = tmp_path / "killed"
    original = RunStore.commit_shard
    calls = []

    def die(self, shard, tables, meta):
        original(self, shard, tables, meta)
        calls.append((self.root.name, shard))
        if self.root.name == "checkpoint-20" and len([c for c in calls if c[0] == "checkpoint-20"]) == 1:
            (self.root / ".lock").write_text(f"pid=999999999 host={socket.gethostname()} since=killed")
            raise Killed

    monkeypatch.setattr(RunStore, "commit_shard", die)
    with pytest.raises(Killed):
        runner.invoke(app, [str(a) for a in _sweep_argv(tmp_path, ckpts, base, killed)], catch_exceptions=False)
    monkeypatch.setattr(RunStore, "commit_shard", original)
    again = runner.invoke(app, [str(a) for a in _sweep_argv(tmp_path, ckpts, base, killed)])
    assert again.exit_code == 2 and "--resume" in again.output
    res = runner.invoke(app, [str(a) for a in [*_sweep_argv(tmp_path, ckpts, base, killed), "--resume"]])
    assert res.exit_code == 0, res.output
    for sub in ("checkpoint-10", "checkpoint-20"):
        for table in ("detections", "extractions"):
            pd.testing.assert_frame_equal(
                pd.read_parquet(full / sub / f"{table}.parquet"), pd.read_parquet(killed / sub / f"{table}.parquet")
            )
    a, b = pd.read_parquet(full / "compare.parquet"), pd.read_parquet(killed / "compare.parquet")
    cols = [c for c in a.columns if c not in ("run", "model")]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_unet_only_checkpoint_without_base_is_refused(tmp_path):
    ckpts, base = _tiny_checkpoints(tmp_path)
    argv = [a for a in _sweep_argv(tmp_path, ckpts, base, tmp_path / "o")]
    i = argv.index("--base")
    del argv[i : i + 2]
    res = runner.invoke(app, [str(a) for a in argv])
    assert res.exit_code == 2 and "--base" in res.output and "unet/" in res.output


def test_mia_runs_metrics_and_outliers_from_their_tables(tmp_path):
    """Two mia runs (the golden 8×8 examples, an untrained tiny UNet): the row holds the best
    attack's metrics row of metrics.parquet; the outlier score is the brute-force k-NN distance
    to the *member* examples in pixel space."""
    from golden_support import MIA_MEMBERS, _write_png, _write_tiny_unet, mia_ids, mia_images

    data, members, unet = tmp_path / "data", tmp_path / "members.txt", tmp_path / "unet"
    data.mkdir()
    for i, img in zip(mia_ids(), mia_images()):
        _write_png(data / f"{i}.png", img)
    members.write_text("\n".join(mia_ids()[:MIA_MEMBERS]) + "\n")
    _write_tiny_unet(unet)
    import shutil

    args = ["mia", "--data", data, "--model", unet, "--members", members, "--out", tmp_path / "a"]
    args += ["--timesteps", "10,100", "--noise-draws", 1, "--batch-size", 4, "--bootstrap", 20, "--quiet"]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    outs = [tmp_path / "a", tmp_path / "b"]
    shutil.copytree(outs[0], outs[1])  # a second run directory with the same tables
    res = compare_runs(outs, tmp_path / "cmp", k=3, progress=False)
    m = pd.read_parquet(outs[0] / "metrics.parquet")
    best = m.sort_values(["tpr@1%fpr", "auc"], ascending=False, kind="stable").iloc[0]
    row = res.table.iloc[0]
    for col in ("auc", "auc_lo", "auc_hi", "tpr@1%fpr", "tpr@1%fpr_lo", "tpr@1%fpr_hi", "tpr@0.1%fpr"):
        assert row[col] == pytest.approx(best[col], nan_ok=True), col
    assert row["memorization"] == row["auc"] and row["kind"] == "mia"
    # outliers: pixels in [0, 1], reference = members, self excluded
    ex = pd.read_parquet(outs[0] / "examples.parquet").sort_values("index")
    from memscan.data.training import load_training_set

    ts = load_training_set(data)
    pos = {i: n for n, i in enumerate(ts.ids)}
    x = np.stack([ts.images[pos[i]] for i in ex["id"]]).astype(np.float64).reshape(len(ex), -1) / 255.0
    want = _brute_knn(x, ex["is_member"].to_numpy(bool), 3)
    got = res.outliers[res.outliers["run"] == str(outs[0])]["outlier"].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert (res.run_dir / "images" / "outliers").is_dir()
    page = (res.run_dir / "compare.html").read_text()
    assert "Memorization vs outliers" in page and "data:image/png;base64" in page


@pytest.mark.slow
def test_lm_mia_runs_use_tfidf_outliers(tmp_path):
    """An lm-mia run (tiny random GPT-2) and a copy: the outlier score is the brute-force TF-IDF
    cosine k-NN distance to the member texts, and the blind baseline is never the 'best' attack."""
    import shutil

    pytest.importorskip("transformers")
    from lm_support import MEMBERS, NONMEMBERS
    from sklearn.feature_extraction.text import TfidfVectorizer

    from memscan.testing.tiny_lm import make_tiny_gpt2

    model = make_tiny_gpt2(tmp_path / "gpt2", seed=4)
    (tmp_path / "m.txt").write_text("\n".join(MEMBERS) + "\n")
    (tmp_path / "n.txt").write_text("\n".join(NONMEMBERS) + "\n")
    args = ["lm", "mia", "--model", model, "--members", tmp_path / "m.txt", "--nonmembers", tmp_path / "n.txt"]
    res = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "a", "--bootstrap", 0, "--quiet"]])
    assert res.exit_code == 0, res.output
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    out = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp", k=2, progress=False)
    row = out.table.iloc[0]
    assert row["kind"] == "lm-mia" and not row["statistic"].startswith("blind")
    ex = pd.read_parquet(tmp_path / "a" / "examples.parquet").sort_values("index")
    v = TfidfVectorizer().fit_transform(ex["text"]).toarray()
    mem = ex["is_member"].to_numpy(bool)
    cos = 1 - v @ v.T
    want = [round(sorted(cos[i, j] for j in range(len(ex)) if mem[j] and j != i)[1], 12) for i in range(len(ex))]
    got = out.outliers[out.outliers["run"] == str(tmp_path / "a")]["outlier"].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-9)
