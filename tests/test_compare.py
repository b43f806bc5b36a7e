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


def _mismatch_keys(runs, tmp, name, **kw):
    """The keys compare names as differing (refused without --allow-mismatch: the error's)."""
    try:
        compare_runs(runs, tmp / name, progress=False, **kw)
        return set()
    except InputError as e:
        assert "--allow-mismatch" in e.hint
        res = compare_runs(runs, tmp / f"{name}-flagged", allow_mismatch=True, progress=False, **kw)
        return {k.split(" ", 1)[1] for m in res.table["mismatch"] for k in m.split(", ") if k}


def test_data_are_compared_by_content_never_by_path(three_runs, tmp_path):
    """The training set and the prompts by their sha256 (docs/outputs.md): the same files at
    another path are the same data; other files, or other prompts of the same count, are not."""
    import shutil

    from compare_support import extract_run

    from memscan.synthetic import write_training_set

    tmp, runs = three_runs
    train, moved = tmp / "train", tmp_path / "elsewhere" / "train"
    shutil.copytree(train, moved)
    a = extract_run(tmp_path / "a" / "run", train)
    b = extract_run(tmp_path / "b" / "run", moved)
    ma, mb = (json.loads((r / "manifest.json").read_text()) for r in (a, b))
    assert ma["training_set"]["source"] != mb["training_set"]["source"]  # the paths differ …
    assert _mismatch_keys([a, b], tmp_path, "moved") == set()  # … and nothing else: comparable
    # another training set: one image more (the same count would differ in content as well)
    write_training_set(tmp_path / "train121", 121, size=32)
    c = extract_run(tmp_path / "c" / "run", tmp_path / "train121")
    assert _mismatch_keys([a, c], tmp_path, "other-train") == {"training_set_sha256"}
    # other prompts, as many: the same count, another text
    other = prompt_table()
    other.loc[7, "prompt"] = "fresh but different"
    d = extract_run(tmp_path / "d" / "run", train, prompts=other)
    assert len(other) == ma["prompts"]["count"]
    assert _mismatch_keys([a, d], tmp_path, "other-prompts") == {"prompts"}
    # the same prompts listed in another order: the same results (each generation's seed comes
    # from the prompt's id), so comparable — though `prompts_sha256`, a resume's identity, differs
    e = extract_run(tmp_path / "e" / "run", train, prompts=prompt_table().iloc[::-1].reset_index(drop=True))
    assert json.loads((e / "manifest.json").read_text())["prompts_sha256"] != ma["prompts_sha256"]
    assert _mismatch_keys([a, e], tmp_path, "reordered") == set()
    det_a, det_e = (pd.read_parquet(r / "detections.parquet").sort_values("prompt_id") for r in (a, e))
    assert det_a["clique_size"].tolist() == det_e["clique_size"].tolist()
    # a run made before the hashes were recorded: the path-free counts, never the path
    old = tmp_path / "old" / "run"
    shutil.copytree(b, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["training_set_sha256"], m["prompts_sha256"]
    (old / "manifest.json").write_text(json.dumps(m))
    assert _mismatch_keys([a, old], tmp_path, "old") == set()
    assert _mismatch_keys([c, old], tmp_path, "old-c") == {"training_set.images"}


def test_sampling_and_verification_are_settings(tmp_path, three_runs):
    """The generator's sampling (steps, guidance) and the verification method are compared; the
    model's source (what a comparison of checkpoints varies) and the index's path are not."""
    from compare_support import SamplingGenerator, extract_run

    from memscan.compare.checks import find_mismatches

    train = three_runs[0] / "train"
    a = extract_run(tmp_path / "a", train, generator=SamplingGenerator("/m/checkpoint-1", steps=20))
    b = extract_run(tmp_path / "b", train, generator=SamplingGenerator("/m/checkpoint-2", steps=20, memorized=4))
    c = extract_run(tmp_path / "c", train, generator=SamplingGenerator("/m/checkpoint-1", steps=50))
    d = extract_run(tmp_path / "d", train, generator=SamplingGenerator("/m/checkpoint-1", guidance=7.5))
    assert _mismatch_keys([a, b], tmp_path, "ab") == set()
    assert _mismatch_keys([a, c], tmp_path, "ac") == {"generator.num_inference_steps"}
    assert _mismatch_keys([a, d], tmp_path, "ad") == {"generator.guidance_scale"}
    # verification: exact, or through an index (its type, parameters, embedder and K; not its path)
    base = json.loads((a / "manifest.json").read_text())
    via = {"via": "index", "index": "/i/one", "index_type": "flat", "index_params": {"nlist": 1}, "retrieve": 100,
           "embedder": "pixel", "source": "/t", "indexed_images": 120}  # fmt: skip

    def keys(*vs):
        runs = [(f"r{i}", "extract", {**base, "verification": v}) for i, v in enumerate(vs)]
        return {m.key for m in find_mismatches(runs)}

    assert keys(None, via) == {"verification.via", "verification.index_type", "verification.index_params.nlist",
                               "verification.retrieve", "verification.embedder"}  # fmt: skip
    assert keys(via, {**via, "index": "/i/moved", "source": "/elsewhere"}) == set()
    assert keys(via, {**via, "retrieve": 10}) == {"verification.retrieve"}


def test_reverify_against_another_training_set_records_it(three_runs, tmp_path):
    """``memscan verify RUN --train OTHER`` rewrites the tables against OTHER: the manifest's
    ``training_set`` and ``training_set_sha256`` then name OTHER, so compare refuses to put the
    run beside one verified against the original set; the same set at another path changes
    nothing."""
    import shutil

    from memscan.data.training import training_set_sha256
    from memscan.extraction.pipeline import reverify
    from memscan.synthetic import write_training_set

    tmp, runs = three_runs
    a, b, c = (tmp_path / n for n in "abc")
    shutil.copytree(runs[1], a)
    shutil.copytree(runs[2], b)
    shutil.copytree(runs[2], c)
    write_training_set(tmp_path / "small", 20, size=32)  # holds t0003 and t0017 only of the copied images
    before = json.loads((b / "manifest.json").read_text())
    reverify(b, train=tmp_path / "small")
    m = json.loads((b / "manifest.json").read_text())
    assert m["counts"]["extractions"] < before["counts"]["extractions"]
    assert m["training_set"]["images"] == 20 and m["training_set_sha256"] == training_set_sha256(tmp_path / "small")
    assert _mismatch_keys([a, b], tmp_path, "reverified") == {"training_set_sha256"}
    moved = tmp_path / "moved" / "train"
    shutil.copytree(tmp / "train", moved)
    reverify(c, train=moved)
    mc = json.loads((c / "manifest.json").read_text())
    assert mc["training_set_sha256"] == before["training_set_sha256"] and mc["counts"] == before["counts"]
    assert _mismatch_keys([a, c], tmp_path, "moved") == set()


def test_index_verified_runs_are_compared_by_the_indexed_training_set(three_runs, tmp_path):
    """Runs verified through an index record no ``training_set_sha256`` of their own: the
    index's (its build run's) is compared — two indexes of other images with as many of them
    are refused, two indexes of the same images at other paths are not."""
    from compare_support import extract_run

    from memscan.extraction.verify_index import IndexVerification
    from memscan.index.faiss_index import build_index
    from memscan.synthetic import write_training_set

    train = three_runs[0] / "train"
    write_training_set(tmp_path / "other", 120, size=32, prefix="u")
    for name, src in (("ia", train), ("ib", train), ("io", tmp_path / "other")):
        build_index(src, tmp_path / name, embedder="pixel:8", index_type="flat", progress=False)
    a = extract_run(tmp_path / "run-a", IndexVerification(str(tmp_path / "ia"), 10))
    b = extract_run(tmp_path / "run-b", IndexVerification(str(tmp_path / "ib"), 10))
    o = extract_run(tmp_path / "run-o", IndexVerification(str(tmp_path / "io"), 10))
    ma, mo = (json.loads((r / "manifest.json").read_text()) for r in (a, o))
    assert ma["training_set_sha256"] is None and ma["training_set"]["images"] == mo["training_set"]["images"]
    assert ma["training_set"]["training_set_sha256"] != mo["training_set"]["training_set_sha256"]
    assert _mismatch_keys([a, b], tmp_path, "same-set") == set()
    assert _mismatch_keys([a, o], tmp_path, "other-set") == {"training_set_sha256"}


def test_adaptive_settings_count_only_for_adaptive_runs_and_precision_counts(three_runs, tmp_path):
    """``first_round`` / ``round_size`` … change nothing in a run without ``--adaptive`` (every
    prompt gets samples_per_prompt): not compared there, compared between adaptive runs. The
    precision a model ran at changes its numbers: compared, as resolved (``auto`` is no value)."""
    from compare_support import extract_run

    from memscan.compare.checks import find_mismatches

    train = three_runs[0] / "train"
    a = extract_run(tmp_path / "a", train)
    b = extract_run(tmp_path / "b", train, first_round=8, round_size=4)
    assert _mismatch_keys([a, b], tmp_path, "plain") == set()
    c = extract_run(tmp_path / "c", train, adaptive=True, first_round=8, round_size=4)
    d = extract_run(tmp_path / "d", train, adaptive=True, first_round=8, round_size=8)
    assert _mismatch_keys([c, d], tmp_path, "adaptive") == {"config.round_size"}

    def keys(kind, *ms):
        return {m.key for m in find_mismatches([(f"r{i}", kind, m) for i, m in enumerate(ms)])}

    lm = {"config": {"k_percent": 20.0, "dtype": "auto"}, "model": {"describe": {"dtype": "float32"}}}
    bf = {"config": {"k_percent": 20.0, "dtype": "bfloat16"}, "model": {"describe": {"dtype": "bfloat16"}}}
    f32 = {"config": {"k_percent": 20.0, "dtype": "float32"}, "model": {"describe": {"dtype": "float32"}}}
    assert keys("lm-mia", lm, bf) == {"precision"}
    assert keys("lm-mia", lm, f32) == set()  # auto that ran at float32 is float32
    img = json.loads((a / "manifest.json").read_text())
    half = {**img, "generator": {**img["generator"], "dtype": "float16"}}
    full = {**img, "generator": {**img["generator"], "dtype": "float32"}}
    assert keys("extract", half, full) == {"precision"}
    mia = {"attacks": ["loss"], "sources": {"target_config": {"dtype": "float16"}}}
    assert keys("mia", mia, {**mia, "sources": {"target_config": {"dtype": "float32"}}}) == {"precision"}
    # lm extractable / exposure record the loaded dtype in the model record itself; spellings agree
    ex = {"config": {"prefix_lengths": [32], "dtype": "auto"}, "model": {"dtype": "float32"}}
    assert keys("lm-extractable", ex, {**ex, "config": {**ex["config"], "dtype": "float32"}}) == set()
    assert keys("lm-extractable", ex, {**ex, "model": {"dtype": "bfloat16"}}) == {"precision"}
    assert keys("lm-exposure", {"config": {"dtype": "fp16"}}, {"config": {"dtype": "float16"}}) == set()
    # a run that records no resolved precision (auto, no model record): precision is not compared
    assert (
        keys("lm-exposure", {"config": {"dtype": "auto"}}, {"config": {"dtype": "auto"}, "model": {"dtype": "float32"}})
        == set()
    )


def test_by_train_size_compares_runs_on_different_training_sets(three_runs, tmp_path):
    """--by train_size varies the training set: its records are exempt, everything else is
    still checked; other --by attributes still refuse other training sets."""
    from compare_support import extract_run

    from memscan.synthetic import write_training_set

    sizes = (120, 160, 240)
    runs = []
    for n in sizes:
        write_training_set(tmp_path / f"train{n}", n, size=32)
        runs.append(extract_run(tmp_path / f"n{n}", tmp_path / f"train{n}"))
    res = compare_runs(runs, tmp_path / "by-size", by="train_size", progress=False)
    assert res.table["train_size"].tolist() == list(sizes) and (res.table["mismatch"] == "").all()
    assert res.fits.iloc[0]["n"] == 3 and res.fits.iloc[0]["by"] == "train_size"
    with pytest.raises(InputError, match="training_set_sha256"):
        compare_runs(runs, tmp_path / "by-step", by="step", progress=False)
    other = extract_run(tmp_path / "n240-delta", tmp_path / "train240", delta=0.2)
    with pytest.raises(InputError, match=r"config\.delta"):
        compare_runs([runs[0], other], tmp_path / "by-size-delta", by="train_size", progress=False)


def test_mia_examples_are_compared_by_content(tmp_path):
    """MIA manifests record only paths: the examples (ids and membership) are compared by a digest
    of each run's examples.parquet, so moved data match and other members do not."""
    from memscan.compare.checks import find_mismatches

    runs = []
    for name, members, data in (("a", [1, 0, 1], "/d/x"), ("b", [1, 0, 1], "/moved/x"), ("c", [1, 1, 0], "/d/x")):
        root = tmp_path / name
        root.mkdir()
        pd.DataFrame({"index": range(3), "id": ["e0", "e1", "e2"], "is_member": np.array(members, bool)}).to_parquet(
            root / "examples.parquet"
        )
        runs.append((str(root), "mia", {"sources": {"data": data, "members": data + ".txt"}}))
    assert find_mismatches(runs[:2]) == []
    assert [m.key for m in find_mismatches([runs[0], runs[2]])] == ["examples"]
    assert find_mismatches([runs[0], runs[2]], by="train_size") == []
    # LiRA with another number of shadow models is another attack's strength: not comparable
    a, b = runs[0], runs[1]
    with_shadows = [(a[0], "mia", {**a[2], "counts": {"shadow_models": 8}}),
                    (b[0], "mia", {**b[2], "counts": {"shadow_models": 16}})]  # fmt: skip
    assert [m.key for m in find_mismatches(with_shadows)] == ["shadow_models"]
    assert find_mismatches([with_shadows[0], (b[0], "mia", {**b[2], "counts": {"shadow_models": 8}})]) == []


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


def test_control_characters_in_a_run_name_cannot_forge_the_summary(three_runs, tmp_path):
    """A run folder named with terminal escapes and a newline (its name is the default label):
    the printed summary escapes them, so no line of it is forged and the screen is not cleared;
    the table keeps the name as it is."""
    import shutil

    _, runs = three_runs
    name = "run\x1b[2J\x1b[31m\nFAKE: extract, extraction_rate = 0.99"
    shutil.copytree(runs[0], tmp_path / name)
    res = runner.invoke(app, ["compare", str(tmp_path / name), str(runs[2]), "--out", str(tmp_path / "x"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.stdout and "\\x1b[2J" in res.stdout
    assert not any(line.lstrip().startswith("FAKE") for line in res.stdout.splitlines())
    assert len(res.stdout.splitlines()) == 3  # the header and one line per run
    assert name in pd.read_parquet(tmp_path / "x" / "compare.parquet")["label"].tolist()


def test_default_labels_are_unique_and_the_overlap_is_keyed_by_run(three_runs, tmp_path):
    """Two runs both called ``run`` (d1/run, d2/run): labels d1/run and d2/run, and the page's
    overlap table holds their Jaccard as computed by hand from their extractions."""
    import shutil

    _, runs = three_runs
    a, b = tmp_path / "d1" / "run", tmp_path / "d2" / "run"
    shutil.copytree(runs[0], a)
    shutil.copytree(runs[1], b)
    res = compare_runs([a, b], tmp_path / "cmp", progress=False)
    assert res.table["label"].tolist() == ["d1/run", "d2/run"]
    items = []
    for r in (a, b):
        ext = pd.read_parquet(r / "extractions.parquet")
        items.append(set(ext.loc[(ext["rank"] == 1) & ext["extracted"], "train_id"]))
    both, union = len(items[0] & items[1]), len(items[0] | items[1])
    assert union > both > 0
    page = (res.run_dir / "compare.html").read_text()
    want = (f"<tr><td>d1/run</td><td>d2/run</td><td class=\"num\">{both}</td><td class=\"num\">{union}</td>"
            f"<td class=\"num\">{both / union:.4g}</td></tr>")  # fmt: skip
    assert want in page
    assert page.count("✓") == len(items[0]) + len(items[1])  # one tick per (item, run) memorized


def test_labels_that_look_like_columns_or_mathtext_and_duplicates(three_runs, tmp_path):
    """Labels ``item`` / ``runs`` are run columns like any other; ``$x^$`` reaches matplotlib
    escaped (no mathtext parse error); two runs given one label are refused."""
    _, runs = three_runs
    items = []
    for r in runs[:2]:
        ext = pd.read_parquet(r / "extractions.parquet")
        items.append(set(ext.loc[(ext["rank"] == 1) & ext["extracted"], "train_id"]))
    res = compare_runs(runs[:2], tmp_path / "cols", labels={str(runs[0]): "item", str(runs[1]): "runs"}, progress=False)
    page = (res.run_dir / "compare.html").read_text()
    assert page.count("✓") == len(items[0]) + len(items[1])
    for item in items[1]:  # the row of each item memorized by the second run (only)
        flags = '<td><span class="ok">✓</span></td>' if item in items[0] else "<td></td>"
        assert f'<td class="caption">{item}</td>{flags}<td><span class="ok">✓</span></td>' in page
    res = compare_runs(runs, tmp_path / "math", labels={str(r): f"$x^$ {i}" for i, r in enumerate(runs)},
                       by="step", progress=False)  # fmt: skip
    assert (res.run_dir / "compare.html").exists() and res.manifest["status"] == "complete"
    with pytest.raises(InputError, match="same label") as e:
        compare_runs(runs[:2], tmp_path / "dup", labels={str(runs[0]): "x", str(runs[1]): "x"}, progress=False)
    assert e.value.hint and not (tmp_path / "dup").exists()


def test_a_label_given_by_an_equivalent_path_is_used(three_runs, tmp_path, monkeypatch):
    tmp, runs = three_runs
    monkeypatch.chdir(tmp)
    names = [r.name for r in runs[:2]]
    res = compare_runs(names, tmp_path / "eq", labels={f"./{names[0]}": "first"}, progress=False)
    assert res.table["label"].tolist() == ["first", names[1]]
    with pytest.raises(InputError, match="twice"):
        compare_runs(names, tmp_path / "eq2", labels={f"./{names[0]}": "a", names[0]: "b"}, progress=False)


def test_a_damaged_comparison_is_one_error_and_report_options_need_outliers(compared, tmp_path):
    import shutil

    from memscan.report.compare import _fmt

    broken = tmp_path / "broken"
    shutil.copytree(compared.run_dir, broken)
    (broken / "overlap.parquet").unlink()
    for argv, want in (
        (["report", broken], "overlap.parquet"),
        (["report", compared.run_dir, "--k", 5], "--outliers"),
        (["report", compared.run_dir, "--k", 3], "--outliers"),
    ):
        res = runner.invoke(app, [str(a) for a in argv])
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert res.exit_code == 2 and len(errors) == 1 and want in errors[0], res.output
        assert "Traceback" not in res.output
    # whole numbers in float columns (NaN for the other kinds) print as integers
    assert [_fmt(v) for v in (10000.0, 2.5e9, 0.25, 1 / 3, float("nan"))] == [
        "10000",
        "2500000000",
        "0.25",
        "0.3333",
        "",
    ]


def test_lm_extract_items_are_memorized_text_and_other_item_types_are_not_paired(three_runs, tmp_path):
    """lm-extract items are windows of the memorized training text: two runs that regurgitate
    the copy model's (thrice repeated) documents from different starting points share them; an
    extract run's training ids are never paired with them."""
    from lm_extract_support import DOCS, PROMPTS, copy_lm

    from memscan.compare.runs import TEXT_WINDOW
    from memscan.lm.corpus_index import CorpusIndex
    from memscan.lm.extract_run import LmExtractConfig, lm_extract

    idx = tmp_path / "idx"
    CorpusIndex.build([d.encode() for d in DOCS], idx)
    lm = []
    for seed in (1, 2):
        cfg = LmExtractConfig(samples=8, length=80, top=4, batch_size=8, min_match=40, seed=seed)
        lm.append(lm_extract(copy_lm(), idx, tmp_path / f"lm{seed}", cfg, prompts=PROMPTS, progress=False).run_dir)
    _, runs = three_runs
    res = compare_runs([runs[1], *lm], tmp_path / "cmp", allow_mismatch=True, progress=False)
    items = pd.read_parquet(res.run_dir / "items.parquet")
    want = {}
    for r in lm:
        s = pd.read_parquet(r / "samples.parquet")
        texts = s.loc[s["confirmed"], "match_text"].tolist()
        assert texts
        want[str(r)] = {t[i : i + TEXT_WINDOW] for t in texts for i in range(len(t) - TEXT_WINDOW + 1)}
        got = set(items.loc[items["run"] == str(r), "item"])
        assert got == want[str(r)] and all(any(w in d for d in DOCS) for w in got)  # training text
    ov = res.overlap.set_index(["run_a", "run_b"])
    a, b = (str(r) for r in lm)
    both = len(want[a] & want[b])
    assert ov.loc[(a, b), "both"] == both > 0 and ov.loc[(a, b), "jaccard"] == pytest.approx(
        both / len(want[a] | want[b])
    )
    assert set(res.overlap["run_a"] + "|" + res.overlap["run_b"]) == {
        f"{x}|{y}" for x, y in [(a, a), (a, b), (b, a), (b, b), (str(runs[1]), str(runs[1]))]
    }
    page = (res.run_dir / "compare.html").read_text()
    assert "only with runs whose items" in page and "training image id" in page and "memorized text" in page


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


def test_a_setting_added_later_compares_as_the_value_older_runs_behaved_as():
    """lm-mia's --document-start came after lm-mia runs existed: a run that does not record it
    scored without a start token, so it compares equal to a new run with it off, and differs
    from one with it on."""
    from memscan.compare.checks import settings_of

    config = {"max_tokens": 512, "k_fraction": 0.2}
    old = settings_of("lm-mia", {"config": config, "scores": ["loss"]})
    off = settings_of("lm-mia", {"config": {**config, "document_start": False}, "scores": ["loss"]})
    on = settings_of("lm-mia", {"config": {**config, "document_start": True}, "scores": ["loss"]})
    assert old == off and old["config.document_start"] == "false" and on["config.document_start"] == "true"
    assert "config.document_start" not in settings_of("lm-exposure", {"config": config})


def test_checkpoint_sweep_verifies_through_an_index(tmp_path):
    """``extract --model CKPTS --index INDEX``: every checkpoint is verified through the index
    (the sweep used to drop --index and fail for want of --train); with K ≥ the training set the
    extractions equal the exact sweep's. --heldout needs --train (the training images whose loss it
    is compared with)."""
    from memscan.index.faiss_index import build_index

    ckpts, base = _tiny_checkpoints(tmp_path)
    _sweep_argv(tmp_path, ckpts, base, tmp_path / "exact")  # writes the training set, train8
    build_index(tmp_path / "train8", tmp_path / "idx", embedder="pixel:4", index_type="flat", progress=False)

    def argv(out, *, index=True, heldout=False):
        # α = δ = 1 (tiled ℓ2 lies in [0, 1]): every pair of generations is an edge, so every prompt has a candidate to verify
        a = [str(x) for x in _sweep_argv(tmp_path, ckpts, base, out)] + ["--alpha", "1", "--delta", "1"]
        if not heldout:
            i = a.index("--heldout")
            del a[i : i + 2]
        if index:
            i = a.index("--train")
            a[i : i + 2] = ["--index", str(tmp_path / "idx"), "--retrieve", "12"]
        return a

    res = runner.invoke(app, argv(tmp_path / "exact", index=False), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, argv(tmp_path / "via"), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cols = ["prompt_id", "rank", "train_id", "tiled_l2", "extracted"]
    for sub in ("checkpoint-10", "checkpoint-20"):
        m = json.loads((tmp_path / "via" / sub / "manifest.json").read_text())
        assert m["verification"]["via"] == "index" and m["verification"]["retrieve"] == 12
        exact, via = (pd.read_parquet(tmp_path / d / sub / "extractions.parquet") for d in ("exact", "via"))
        assert len(exact) == 4 * 3 and exact["extracted"].all()  # 4 prompts × n_nearest 3
        pd.testing.assert_frame_equal(exact[cols], via[cols], check_dtype=False)
    res = runner.invoke(app, argv(tmp_path / "held", heldout=True))
    assert res.exit_code == 2 and "--heldout" in res.output and "--train" in res.output
    assert not (tmp_path / "held").exists()
    # --serve-index-cpus needs Ray: refused before any checkpoint is set up, as for one run
    res = runner.invoke(app, [*argv(tmp_path / "served"), "--serve-index-cpus", "1"])
    assert res.exit_code == 2 and "--runner ray" in res.output and not (tmp_path / "served").exists()


def test_overlap_pairs_runs_of_other_kinds_only_on_one_training_set(three_runs, tmp_path):
    """An ``extract`` and an ``extract-unconditional`` run both name training images by id; on
    one training set their ids are the same images and they are paired, on another set that
    reuses the ids (B's t0003 holds A's t0116) they are not — each is its own item type."""
    from memscan.data.images import save_png
    from memscan.extraction.unconditional import UnconditionalConfig, extract_unconditional
    from memscan.synthetic import SyntheticGenerator, training_image

    tmp, runs = three_runs
    other = tmp_path / "trainB"
    other.mkdir()
    for i in range(120):  # the same ids, other pictures
        save_png(training_image(f"t{119 - i:04d}", 32), other / f"t{i:04d}.png")
    cfg = UnconditionalConfig(samples=60, shard_size=30, batch_size=16)
    on_b = extract_unconditional(SyntheticGenerator({"": "t0116"}, size=32, copy_rate=0.3, noise=0.01), other,
                                 tmp_path / "on-b", cfg, progress=False)  # fmt: skip
    on_a = extract_unconditional(SyntheticGenerator({"": "t0003"}, size=32, copy_rate=0.3, noise=0.01), tmp / "train",
                                 tmp_path / "on-a", cfg, progress=False)  # fmt: skip
    assert set(on_b.extractions["train_id"]) == {"t0003"} == set(on_a.extractions["train_id"])

    def pairs(run):
        res = compare_runs([runs[0], run], tmp_path / f"cmp-{run.name}", progress=False)
        o = res.overlap
        return o[o["run_a"] != o["run_b"]], res

    paired, res = pairs(tmp_path / "on-a")
    assert len(paired) == 2 and paired["both"].tolist() == [1, 1] and paired["jaccard"].tolist() == [1.0, 1.0]
    assert res.table["training_set_sha256"].nunique() == 1
    apart, res = pairs(tmp_path / "on-b")
    assert apart.empty and res.table["training_set_sha256"].nunique() == 2
    assert set(res.overlap["item_type"]) == {"training image id (extract)", "training image id (extract-unconditional)"}
    page = (tmp_path / "cmp-on-b" / "compare.html").read_text()
    assert "training image id (extract-unconditional)" in page
