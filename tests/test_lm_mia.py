"""``memscan lm mia`` (memscan.lm.mia_run): the run's tables against a direct computation on a model
whose next-token distributions are known exactly (a byte bigram, tests/lm_support.py), its inputs,
the command and the report end to end on a tiny random GPT-2, and Ray against local."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lm_support import MEMBERS, NONMEMBERS, ByteBigram, TokenLogprobsOnly, bigram, reference_bigram
from typer.testing import CliRunner

from memscan.cli import app
from memscan.errors import InputError, MemscanError
from memscan.lm import membership as ms
from memscan.lm.mia_run import LmMiaConfig, read_texts, run_lm_mia
from memscan.mia.metrics import roc_metrics
from memscan.mia.tables import metrics_rows

runner = CliRunner()


def _run(tmp_path, name="run", model=None, config=None, **kw):
    cfg = config or LmMiaConfig(bootstrap=0)
    return run_lm_mia(model or bigram(), MEMBERS, NONMEMBERS, tmp_path / name, cfg, progress=False, **kw)


def _direct(model: ByteBigram, text: str, k: float = 20.0, reference: ByteBigram | None = None) -> dict:
    """Every score of one text, from the bigram's table directly (no adapter, no batching)."""
    b = list(text.encode("utf-8"))
    lp = np.array([model.table[a, c] for a, c in zip(b[:-1], b[1:])])
    dist = np.exp(model.table[b[:-1]])  # the next-token distributions, rows of the table
    mu = np.array([sum(p * math.log(p) for p in row) for row in dist])
    sd = np.sqrt(np.array([sum(p * math.log(p) ** 2 for p in row) for row in dist]) - mu**2)
    n = max(1, int(len(lp) * k / 100 + 1e-9))
    nll = -lp.mean()
    low = list(text.lower().encode())
    lnll = -np.mean([model.table[a, c] for a, c in zip(low[:-1], low[1:])])
    out = {
        "loss": -nll,
        "zlib": -nll / (8 * len(zlib.compress(text.encode()))),
        "lowercase": lnll / nll,
        "min_k": float(np.mean(np.sort(lp)[:n])),
        "min_k_plus_plus": float(np.mean(np.sort((lp - mu) / sd)[:n])),
    }
    if reference is not None:
        out["reference"] = -np.mean([reference.table[a, c] for a, c in zip(b[:-1], b[1:])]) / nll
    return out


def test_scores_equal_a_direct_computation_and_metrics_equal_roc_metrics(tmp_path):
    texts = [*MEMBERS, *NONMEMBERS]
    texts[3] = "To Be Or Not To Be, That Is The Question Here"  # mixed case: a lowercase ratio ≠ 1
    cfg = LmMiaConfig(bootstrap=30, seed=3, k_percent=20)
    res = run_lm_mia(
        bigram(), texts[:8], texts[8:], tmp_path / "r", cfg, reference=reference_bigram(), progress=False, shard_size=5
    )
    st = res.statistics.sort_values("index")
    for i, text in enumerate(texts):
        want = _direct(bigram(), text, 20, reference_bigram())
        for name, v in want.items():
            assert st[name].iloc[i] == pytest.approx(v, rel=1e-9), (i, name)
        assert st["n_tokens"].iloc[i] == len(text.encode())
    assert st["lowercase"].iloc[3] != pytest.approx(1.0)
    # scores.parquet: the diffusion MIA's long table
    scores = pd.read_parquet(tmp_path / "r" / "scores.parquet")
    assert list(scores.columns) == ["statistic", "attack", "timestep", "index", "score"]
    assert scores["timestep"].isna().all() and str(scores["timestep"].dtype) == "Int64"
    assert set(scores["statistic"]) == {*ms.SCORE_NAMES, "blind_baseline"}
    # metrics.parquet: the same columns as the diffusion MIA's, one row per score + the blind baseline
    metrics = pd.read_parquet(tmp_path / "r" / "metrics.parquet")
    y = np.array([True] * 8 + [False] * 8)
    for name in ms.SCORE_NAMES:
        sc = scores[scores["statistic"] == name].sort_values("index")["score"].to_numpy()
        np.testing.assert_array_equal(sc, st[name].to_numpy())
        row = metrics[metrics["statistic"] == name].iloc[0]
        roc = roc_metrics(sc, y, bootstrap=30, seed=3)
        assert row["attack"] == "threshold"
        assert row["auc"] == roc.auc and row["tpr@1%fpr"] == roc.tpr_at_fpr(0.01)
        assert (row["auc_lo"], row["auc_hi"]) == roc.ci["auc"]
    from memscan.mia.metrics import AttackResult

    want_cols = list(metrics_rows("x", [("a", AttackResult("a", np.zeros(2), roc_metrics([1, 0], [1, 0])))])[0])
    assert list(metrics.columns) == want_cols
    blind = metrics[metrics["statistic"] == "blind_baseline"].iloc[0]
    assert blind["attack"] == "tfidf_logistic_regression"
    assert blind["auc"] == pytest.approx(res.manifest["blind_baseline"]["auc"])
    # a bigram fitted on the members (one of them recased): the loss separates them well
    assert res.auc("loss") > 0.8 and res.auc("min_k") > 0.8


def test_tables_do_not_depend_on_shards_or_batches(tmp_path):
    a = _run(tmp_path, "a", config=LmMiaConfig(bootstrap=0, batch_size=1), shard_size=3)
    b = _run(tmp_path, "b", config=LmMiaConfig(bootstrap=0, batch_size=16), shard_size=100)
    pd.testing.assert_frame_equal(a.scores, b.scores)
    pd.testing.assert_frame_equal(a.metrics, b.metrics)


def test_long_texts_are_cut_and_counted(tmp_path):
    res = _run(tmp_path, config=LmMiaConfig(bootstrap=0, max_tokens=12))
    st = res.statistics
    assert (st["n_tokens"] == 12).all() and st["truncated"].all()
    assert res.manifest["counts"]["truncated"] == 16
    # zlib entropy of the text actually scored (the first 12 bytes)
    assert st["zlib_bits"].iloc[0] == 8 * len(zlib.compress(MEMBERS[0].encode()[:12]))
    assert st["mean_nll"].iloc[0] == pytest.approx(-_direct(bigram(), MEMBERS[0][:12])["loss"], rel=1e-12)


def test_a_model_without_next_token_distributions_skips_min_k_plus_plus(tmp_path):
    res = _run(tmp_path, model=TokenLogprobsOnly(MEMBERS))
    assert "min_k_plus_plus" not in set(res.metrics["statistic"])
    assert res.manifest["skipped_scores"][0]["statistic"] == "min_k_plus_plus"
    assert res.auc("loss") == 1.0


def test_manifest_records_models_config_counts_and_blind_baseline(tmp_path):
    res = _run(tmp_path, reference=reference_bigram())
    m = res.manifest
    assert m["kind"] == "lm-mia" and m["status"] == "complete"
    assert m["model"]["parameters"] == 65536 and m["model"]["describe"]["class"] == "ByteBigram"
    assert m["reference_model"]["describe"]["spec"] == "py:lm_support:reference_bigram"
    assert m["config"]["k_percent"] == 20.0 and m["counts"] == {
        "examples": 16,
        "members": 8,
        "nonmembers": 8,
        "truncated": 0,
        "reference_truncated": 0,
        "lowercase_one_token": 0,
        "tokens": sum(len(t.encode()) for t in MEMBERS + NONMEMBERS),
    }
    b = m["blind_baseline"]
    assert set(b) >= {"auc", "warning", "params"} and b["warning"] == (b["auc"] >= 0.6)


# ---- inputs --------------------------------------------------------------------------------------
def test_read_texts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first\n\n  \nsecond line\n")
    df, info = read_texts(tmp_path / "a.txt", "members")
    assert df["text"].tolist() == ["first", "second line"] and df["id"].tolist() == ["members:1", "members:4"]
    assert info["blank_skipped"] == 2 and info["format"] == "text"
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": 7, "text": "x y"}) + "\n" + json.dumps({"text": "z"}) + "\n")
    df, info = read_texts(tmp_path / "b.jsonl", "nonmembers")
    assert df["id"].tolist() == ["7", "nonmembers:2"] and info["format"] == "jsonl"
    pd.DataFrame({"text": ["p", "q"], "id": ["i1", "i2"]}).to_parquet(tmp_path / "c.parquet")
    df, _ = read_texts(tmp_path / "c.parquet")
    assert df["id"].tolist() == ["i1", "i2"]


@pytest.mark.parametrize(
    ("content", "suffix", "want"),
    [
        ("", ".txt", "holds no examples"),
        ("\n\n", ".txt", "holds no examples"),
        ('{"body": "x"}\n', ".jsonl", 'no "text" field'),
        ('{"text": 3}\n', ".jsonl", '"text" is not a string'),
        ("{not json\n", ".jsonl", "line 1 is not JSON"),
        (b"\xff\xfe bad", ".txt", "not UTF-8"),
    ],
)
def test_bad_text_files_are_refused(tmp_path, content, suffix, want):
    p = tmp_path / f"x{suffix}"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match=want):
        read_texts(p, "members")
    with pytest.raises(InputError, match="does not exist"):
        read_texts(tmp_path / "nowhere.txt", "members")


def test_overlapping_splits_and_one_token_examples_are_refused(tmp_path):
    with pytest.raises(InputError, match="are also in --nonmembers"):
        run_lm_mia(bigram(), MEMBERS, MEMBERS[:2] + NONMEMBERS, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # refused before the run directory
    with pytest.raises(InputError, match="1 token"):
        run_lm_mia(bigram(), MEMBERS + ["a"], NONMEMBERS, tmp_path / "p", progress=False)


# ---- the command and the report on a tiny random GPT-2 -------------------------------------------
@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from memscan.testing.tiny_lm import make_tiny_gpt2

    return make_tiny_gpt2(tmp_path_factory.mktemp("lm") / "gpt2")


def _files(tmp: Path) -> tuple[Path, Path]:
    m, n = tmp / "members.txt", tmp / "nonmembers.jsonl"
    texts = list(MEMBERS)
    texts[0] = "<script>alert('member')</script> & the quick brown fox"  # untrusted text, escaped
    m.write_text("\n".join(texts) + "\n")
    n.write_text("".join(json.dumps({"id": f"n{i}", "text": t}) + "\n" for i, t in enumerate(NONMEMBERS)))
    return m, n


def test_lm_mia_command_and_report_end_to_end_on_a_tiny_gpt2(tiny_gpt2, tmp_path):
    m, n = _files(tmp_path)
    out = tmp_path / "run"
    args = ["lm", "mia", "--model", tiny_gpt2, "--members", m, "--nonmembers", n, "--out", out]
    args += ["--reference", "py:lm_support:reference_bigram", "--bootstrap", 20, "--shard-size", 6, "--quiet"]
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "blind_baseline: AUC" in res.output and "min_k_plus_plus: AUC" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["describe"]["tokenizer"]["class"] == "ByT5Tokenizer"
    assert manifest["model"]["parameters"] > 0 and manifest["n_shards"] == 3
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert len(metrics) == 7 and metrics["auc"].between(0, 1).all()
    # the scores from the adapter equal the scores of the adapter's own per-token log-probabilities
    from memscan.generators.causal_lm import load_causal_lm

    lm = load_causal_lm(str(tiny_gpt2))
    st = pd.read_parquet(out / "statistics.parquet")
    ex = pd.read_parquet(out / "examples.parquet")
    for i in (0, 9):
        ids = lm.encode(ex["text"].iloc[i])
        lp = lm.token_logprobs(ids[None])[0]
        nlp = lm.next_token_logprobs(ids[None])[0]
        mu, sd = ms.next_token_moments(nlp)
        assert st["loss"].iloc[i] == pytest.approx(ms.loss_score(lp), rel=1e-6)
        assert st["min_k"].iloc[i] == pytest.approx(ms.min_k_score(lp), rel=1e-6)
        assert st["min_k_plus_plus"].iloc[i] == pytest.approx(ms.min_k_plus_plus_score(lp, mu, sd), rel=1e-6)

    rep = runner.invoke(app, ["report", str(out)], catch_exceptions=False)
    assert rep.exit_code == 0, rep.output
    html = (out / "report.html").read_text()
    assert "&lt;script&gt;alert(" in html and "<script>alert(" not in html
    assert "blind baseline" in html and "roc" in html.lower()


def test_report_warns_when_the_blind_baseline_separates_the_split(tmp_path):
    members = [f"copyright notice {i}: {t}" for i, t in enumerate(MEMBERS * 3)]
    nonmembers = [f"{t} number {i}" for i, t in enumerate(NONMEMBERS * 3)]
    res = run_lm_mia(ByteBigram(members), members, nonmembers, tmp_path / "r", LmMiaConfig(bootstrap=0), progress=False)
    assert res.blind["warning"] and res.blind["auc"] >= 0.9
    from memscan.report.registry import build_report

    html = Path(build_report(tmp_path / "r")).read_text()
    assert 'class="warning"' in html and "separable without the model" in html


def test_no_warning_on_an_unbiased_split(tmp_path):
    rng = np.random.default_rng(0)
    words = "river stone garden window letter summer market silver morning quiet paper harbor".split()
    texts = [" ".join(rng.choice(words, 8)) for _ in range(300)]
    texts = list(dict.fromkeys(texts))
    res = run_lm_mia(
        ByteBigram(texts[::2]), texts[::2], texts[1::2], tmp_path / "r", LmMiaConfig(bootstrap=0), progress=False
    )
    assert not res.blind["warning"]
    from memscan.report.registry import build_report

    html = Path(build_report(tmp_path / "r")).read_text()
    assert 'class="warning"' not in html


def test_ray_equals_local(ray_address, tmp_path):
    from memscan.runners import RayOptions

    m, n = _files(tmp_path)
    common = dict(reference="py:lm_support:reference_bigram", progress=False, shard_size=5)
    cfg = LmMiaConfig(bootstrap=10)
    local = run_lm_mia("py:lm_support:bigram", m, n, tmp_path / "local", cfg, **common)
    ray = run_lm_mia(
        "py:lm_support:bigram",
        m,
        n,
        tmp_path / "ray",
        cfg,
        runner="ray",
        runner_options=RayOptions(num_workers=2),
        **common,
    )
    assert ray.manifest["runner"]["name"] == "ray" and local.manifest["runner"]["name"] == "local"
    assert ray.manifest["model"] == local.manifest["model"]  # recorded from a worker's load
    for t in ("examples", "statistics", "scores", "metrics"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "local" / f"{t}.parquet"), pd.read_parquet(tmp_path / "ray" / f"{t}.parquet")
        )


class _MergesLowercase(ByteBigram):
    """A tokenizer that turns every all-lowercase text into one token (as BPE can: HELLO → hello)."""

    def encode(self, text):
        ids = super().encode(text)
        return ids[:1] if text.islower() else ids


def test_a_lowercased_text_of_one_token_gets_ratio_one_and_is_counted(tmp_path):
    members, nonmembers = [t.upper() for t in MEMBERS], [t.capitalize() for t in NONMEMBERS]
    res = run_lm_mia(
        _MergesLowercase(members), members, nonmembers, tmp_path / "r", LmMiaConfig(bootstrap=0), progress=False
    )
    st = res.statistics
    assert not st["lowercase_scored"].any() and (st["lowercase"] == 1.0).all()
    assert res.manifest["counts"]["lowercase_one_token"] == 16
    assert res.auc("lowercase") == 0.5 and res.auc("loss") == 1.0


def test_an_adapter_with_next_token_moments_gives_the_same_scores(tmp_path):
    from lm_support import MomentsBigram

    plain = _run(tmp_path, "plain")
    fast = _run(tmp_path, "fast", model=MomentsBigram(MEMBERS))
    assert MomentsBigram.calls > 0
    for name in ms.SCORE_NAMES[:-1]:
        np.testing.assert_allclose(fast.statistics[name], plain.statistics[name], rtol=1e-9, err_msg=name)


def test_report_of_a_damaged_run_is_one_clean_error(tmp_path):
    _run(tmp_path)
    (tmp_path / "run" / "statistics.parquet").unlink()
    res = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert res.exit_code == 2 and "statistics.parquet" in res.output and "Traceback" not in res.output


class _SlightlyPositive(TokenLogprobsOnly):
    """float32 rounding of a near-certain token: the first log-probability of every text is +5e-7."""

    def token_logprobs(self, ids):
        lp = super().token_logprobs(ids)
        lp[:, 0] = 5e-7
        return lp


def test_log_probabilities_slightly_above_zero_are_taken_as_zero(tmp_path):
    """The run's check and the scores share one tolerance (membership.LOGPROB_ATOL): +5e-7 passed
    the run's check and then crashed in the scores with "must be ≤ 0"."""
    res = _run(tmp_path, model=_SlightlyPositive(MEMBERS))
    table = ByteBigram(MEMBERS).table
    for i, text in enumerate([*MEMBERS, *NONMEMBERS]):
        b = list(text.encode())
        lp = [0.0] + [table[a, c] for a, c in zip(b[1:-1], b[2:])]  # the first one taken as 0
        assert res.statistics["loss"].iloc[i] == pytest.approx(sum(lp) / len(lp), rel=1e-12)


class _ShiftedRows(ByteBigram):
    """An adapter whose next-token rows are log-probabilities minus 0.5 (not distributions)."""

    def next_token_logprobs(self, ids):
        return super().next_token_logprobs(ids) - 0.5


def test_next_token_rows_that_are_not_distributions_are_refused(tmp_path):
    with pytest.raises(
        InputError, match=r"next_token_logprobs: \d+ of \d+ next-token row\(s\) are not log-probability"
    ):
        _run(tmp_path, model=_ShiftedRows(MEMBERS))


def test_a_partly_missing_min_k_plus_plus_names_the_score_and_the_example(tmp_path):
    from lm_support import MomentsBigram

    class NanMoments(MomentsBigram):
        def next_token_moments(self, ids):
            tok, mu, sigma = super().next_token_moments(ids)
            mu[np.asarray(ids)[:, 0] == ord("t")] = np.nan  # texts that start with "t"
            return tok, mu, sigma

    texts = [*MEMBERS, *NONMEMBERS]
    n_bad = sum(t.startswith("t") for t in texts)
    first = f"members:{next(i for i, t in enumerate(MEMBERS) if t.startswith('t')) + 1}"
    with pytest.raises(
        MemscanError, match=rf"score min_k_plus_plus: {n_bad} of 16 example\(s\).*first: example {first}\)"
    ):
        _run(tmp_path, model=NanMoments(MEMBERS))


# ---- the models' windows and the document-start token ---------------------------------------------
@pytest.fixture(scope="module")
def short_gpt2s(tmp_path_factory):
    """Tiny random GPT-2s of 32 and 16 positions (byte tokenizer: every MEMBERS text is longer)."""
    pytest.importorskip("transformers")
    from memscan.testing.tiny_lm import make_tiny_gpt2

    root = tmp_path_factory.mktemp("short")
    return make_tiny_gpt2(root / "p32", seed=1, n_positions=32), make_tiny_gpt2(root / "p16", seed=2, n_positions=16)


def _forward_logprobs(lm, ids: np.ndarray) -> np.ndarray:
    """log p(x_t | x_<t) of ids[1:], from the transformers model's own forward pass (not the adapter's)."""
    import torch

    with torch.no_grad():
        logits = lm.model(input_ids=torch.as_tensor(ids[None], dtype=torch.long)).logits[0].double()
    lp = torch.log_softmax(logits[:-1], dim=-1)
    return lp.gather(1, torch.as_tensor(ids[1:, None], dtype=torch.long))[:, 0].numpy()


def test_texts_longer_than_a_models_positions_are_cut_to_each_models_window(short_gpt2s, tmp_path):
    """--max-tokens 512 on a 32-position target and a 16-position reference: each model scores the
    text cut to its own window (the old code fed the whole text: IndexError in the position
    table, with a --resume hint that could not help); the limits are in the manifest, the cuts
    flagged, counted and logged."""
    from memscan.generators.causal_lm import load_causal_lm

    p32, p16 = short_gpt2s
    assert all(len(t.encode()) > 32 for t in MEMBERS + NONMEMBERS)
    res = run_lm_mia(str(p32), MEMBERS, NONMEMBERS, tmp_path / "r", LmMiaConfig(bootstrap=0), reference=str(p16),
                     progress=False, shard_size=5)  # fmt: skip
    st, m = res.statistics.sort_values("index"), res.manifest
    assert (st["n_tokens"] == 32).all() and st["truncated"].all() and st["reference_truncated"].all()
    assert m["token_limits"] == {
        "model": {"max_tokens": 512, "max_length": 32, "start_token": None, "text_tokens": 32},
        "reference": {"max_tokens": 512, "max_length": 16, "start_token": None, "text_tokens": 16},
    }
    assert m["counts"]["truncated"] == 16 and m["counts"]["reference_truncated"] == 16
    log = (tmp_path / "r" / "run.log").read_text()
    assert "16 of 16 texts cut to 32 tokens of the model" in log and "cut to 16 tokens of the reference" in log
    target, ref = load_causal_lm(str(p32)), load_causal_lm(str(p16))
    for i, text in enumerate(MEMBERS + NONMEMBERS):
        ids = target.encode(text)[:32]
        lp = _forward_logprobs(target, ids)
        assert st["mean_nll"].iloc[i] == pytest.approx(-lp.mean(), rel=1e-5)
        ref_lp = _forward_logprobs(ref, ref.encode(target.decode(ids))[:16])
        assert st["reference_mean_nll"].iloc[i] == pytest.approx(-ref_lp.mean(), rel=1e-5)
    # a --max-tokens below the window is the limit (and no reference cut beyond the target's)
    small = run_lm_mia(str(p32), MEMBERS, NONMEMBERS, tmp_path / "s", LmMiaConfig(bootstrap=0, max_tokens=12),
                       reference=str(p16), progress=False)  # fmt: skip
    assert small.manifest["token_limits"]["model"]["text_tokens"] == 12
    assert (small.statistics["n_tokens"] == 12).all() and not small.statistics["reference_truncated"].any()
    assert small.manifest["counts"]["reference_truncated"] == 0


def test_a_resume_must_score_the_same_tokens(short_gpt2s, tmp_path):
    """The effective limits (and --document-start) are part of what a resume checks: the same
    model spec whose positions changed is refused, the same model resumes to the tables of one
    uninterrupted run."""
    from memscan.testing.tiny_lm import make_tiny_gpt2

    model = make_tiny_gpt2(tmp_path / "m", seed=1, n_positions=32)
    cfg = LmMiaConfig(bootstrap=0)
    kw = dict(progress=False, shard_size=4)
    with pytest.raises(MemscanError, match="stopped|stop"):
        run_lm_mia(str(model), MEMBERS, NONMEMBERS, tmp_path / "r", cfg, stop_after_shards=1, **kw)
    with pytest.raises(MemscanError, match="config differs"):
        run_lm_mia(str(model), MEMBERS, NONMEMBERS, tmp_path / "r", LmMiaConfig(bootstrap=0, document_start=True),
                   resume=True, **kw)  # fmt: skip
    make_tiny_gpt2(model, seed=1, n_positions=24)  # the same spec, now 24 positions
    with pytest.raises(MemscanError, match="token_limits differs"):
        run_lm_mia(str(model), MEMBERS, NONMEMBERS, tmp_path / "r", cfg, resume=True, **kw)
    make_tiny_gpt2(model, seed=1, n_positions=32)
    done = run_lm_mia(str(model), MEMBERS, NONMEMBERS, tmp_path / "r", cfg, resume=True, **kw)
    whole = run_lm_mia(str(model), MEMBERS, NONMEMBERS, tmp_path / "w", cfg, **kw)
    assert done.manifest["token_limits"] == whole.manifest["token_limits"]
    pd.testing.assert_frame_equal(done.scores, whole.scores)


def test_a_run_killed_while_loading_its_model_resumes(short_gpt2s, tmp_path, monkeypatch):
    """A first attempt that dies before its model is loaded records no token limits and commits
    nothing; --resume loads the model and finishes (it is not taken for an older memscan's run)."""
    import memscan.lm.mia_run as mia_run
    from memscan.testing.tiny_lm import make_tiny_gpt2

    model = make_tiny_gpt2(tmp_path / "m", seed=1, n_positions=32)
    cfg, kw = LmMiaConfig(bootstrap=0), dict(progress=False, shard_size=4)

    def dies(ctx):
        raise MemoryError("out of memory while loading")

    with monkeypatch.context() as m:
        m.setattr(mia_run, "describe_lm_mia_worker", dies)
        with pytest.raises(MemoryError):
            run_lm_mia(str(model), MEMBERS, NONMEMBERS, tmp_path / "r", cfg, **kw)
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert "token_limits" not in manifest and manifest["status"] == "incomplete"
    done = run_lm_mia(str(model), MEMBERS, NONMEMBERS, tmp_path / "r", cfg, resume=True, **kw)
    whole = run_lm_mia(str(model), MEMBERS, NONMEMBERS, tmp_path / "w", cfg, **kw)
    assert done.manifest["token_limits"] == whole.manifest["token_limits"]
    pd.testing.assert_frame_equal(done.scores, whole.scores)
    # a run with committed shards and no recorded limits (an older memscan's) is still refused
    older = json.loads((tmp_path / "w" / "manifest.json").read_text())
    del older["token_limits"]
    older["status"] = "incomplete"
    (tmp_path / "w" / "manifest.json").write_text(json.dumps(older))
    with pytest.raises(MemscanError, match="records no token_limits"):
        run_lm_mia(str(model), MEMBERS, NONMEMBERS, tmp_path / "w", cfg, resume=True, **kw)


def test_document_start_scores_every_text_token_after_the_start_token(short_gpt2s, tmp_path):
    """--document-start: each text is fed after the model's BOS (else EOS) token, so its first
    token is scored too — every score against the transformers model's own forward pass over
    [start] + text; off (the default) the first token is only context."""
    from memscan.generators.causal_lm import load_causal_lm

    p32, _ = short_gpt2s
    lm = load_causal_lm(str(p32))
    start = lm.eos_token_id  # ByT5: no BOS token, so the EOS token starts a document
    assert lm.bos_token_id is None and start is not None
    members, nonmembers = [t[:20] for t in MEMBERS], [t[:20] for t in NONMEMBERS]  # 20 tokens: no cut
    m, n = tmp_path / "m.txt", tmp_path / "n.txt"
    m.write_text("\n".join(members) + "\n")
    n.write_text("\n".join(nonmembers) + "\n")
    args = ["lm", "mia", "--model", p32, "--members", m, "--nonmembers", n, "--bootstrap", 0, "--quiet"]
    for flag, out in (("--document-start", "on"), ("--no-document-start", "off")):
        res = runner.invoke(app, [str(a) for a in [*args, flag, "--out", tmp_path / out]], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    on, off = (pd.read_parquet(tmp_path / r / "statistics.parquet").sort_values("index") for r in ("on", "off"))
    manifest = json.loads((tmp_path / "on" / "manifest.json").read_text())
    assert manifest["config"]["document_start"] is True
    assert manifest["token_limits"]["model"] == {"max_tokens": 512, "max_length": 32, "start_token": start,
                                                 "text_tokens": 31}  # fmt: skip
    assert json.loads((tmp_path / "off" / "manifest.json").read_text())["config"]["document_start"] is False
    for i, text in enumerate(members + nonmembers):
        ids = lm.encode(text)
        assert ids.size == 20 and on["n_tokens"].iloc[i] == 21 and off["n_tokens"].iloc[i] == 20
        lp = _forward_logprobs(lm, np.concatenate([[start], ids]))  # 20 values: the first text token too
        assert lp.size == 20
        assert on["mean_nll"].iloc[i] == pytest.approx(-lp.mean(), rel=1e-5)
        assert on["min_k"].iloc[i] == pytest.approx(np.sort(lp)[:4].mean(), rel=1e-5)  # 20 % of 20
        assert off["mean_nll"].iloc[i] == pytest.approx(-_forward_logprobs(lm, ids).mean(), rel=1e-5)
        low = lm.encode(text.lower())
        low_lp = _forward_logprobs(lm, np.concatenate([[start], low]))
        assert on["lowercase_mean_nll"].iloc[i] == pytest.approx(-low_lp.mean(), rel=1e-5)
    assert not np.allclose(on["mean_nll"], off["mean_nll"])


def test_document_start_needs_a_start_token(tmp_path):
    with pytest.raises(InputError, match="--document-start: the model has neither a BOS nor an EOS token"):
        _run(tmp_path, config=LmMiaConfig(bootstrap=0, document_start=True))  # the byte bigram has neither
