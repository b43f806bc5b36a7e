"""The LM demo: shipped corpus and weights, deterministic canaries, exact exposure, the quick run."""

import hashlib
import json
import lzma
import math

import numpy as np
import pytest
from conftest import run_cli

pytest.importorskip("transformers")

from memscan.demo.lm.canaries import (  # noqa: E402
    COPIES,
    CORPUS_XZ,
    DIGIT_PREFIX,
    DIGITS,
    PER_COUNT,
    PREFIX_BYTES,
    SUFFIX_BYTES,
    canaries,
    corpus_record,
    corpus_text,
    ordinary_passages,
    planted_corpus,
)
from memscan.demo.lm.run import exposure_of, format_logprobs, model_dir  # noqa: E402


def test_corpus_decompresses_to_the_recorded_sha256():
    rec = corpus_record()
    raw = lzma.decompress(CORPUS_XZ.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == rec["sha256"]
    assert hashlib.sha256(CORPUS_XZ.read_bytes()).hexdigest() == rec["xz_sha256"]
    assert len(raw) == rec["bytes"] > 4_500_000  # the whole plays, not an excerpt
    assert len(rec["plays"]) >= 36 and CORPUS_XZ.stat().st_size < 3 * 2**20
    text = raw.decode("ascii")
    assert "To be, or not to be" in text and "**" not in text and "\\" not in text


def test_canaries_are_deterministic_and_planted_exactly():
    a, b = canaries(13), canaries(13)
    assert a == b and canaries(14) != a
    assert len(a) == 2 * len(COPIES) * PER_COUNT
    sent = [c for c in a if c.kind == "sentence"]
    dig = [c for c in a if c.kind == "digits"]
    assert all(len(c.text) >= max(100, PREFIX_BYTES + SUFFIX_BYTES) for c in sent)
    assert len({c.text[:PREFIX_BYTES] for c in sent}) == len(sent)
    assert len({c.text for c in dig}) == len(dig)
    for c in dig:
        assert c.text.startswith(DIGIT_PREFIX) and len(c.text) == len(DIGIT_PREFIX) + DIGITS
        assert c.text[len(DIGIT_PREFIX) :].isdigit()
    p, q = planted_corpus(13), planted_corpus(13)
    assert p.sha256 == q.sha256 and p.positions == q.positions
    lines = p.text.split("\n")
    for c in a:
        # every copy is one whole line, at its recorded position, and nowhere else
        assert sum(line == c.text for line in lines) == c.copies
        assert all(lines[i] == c.text for i in p.positions[c.id])
        assert c.text not in corpus_text()
    # the plays themselves are intact: removing the canary lines gives the corpus back
    planted_lines = {c.text for c in a}
    assert "\n".join(x for x in lines if x not in planted_lines) == corpus_text()
    assert ordinary_passages(5) == ordinary_passages(5)
    assert all(len(s) == PREFIX_BYTES + SUFFIX_BYTES for s in ordinary_passages(20))


def test_shipped_weights_are_safetensors_and_load_through_the_adapter(monkeypatch):
    import torch

    from memscan.generators.causal_lm import load_causal_lm

    files = {p.name for p in model_dir().iterdir() if p.is_file()}
    assert "model.safetensors" in files and "memscan.json" in files and "tokenizer_config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    assert (model_dir() / "model.safetensors").stat().st_size <= 16 * 2**20

    def no_pickle(*a, **k):
        raise AssertionError("torch.load must not be used for the demo model")

    monkeypatch.setattr(torch, "load", no_pickle)
    lm = load_causal_lm(str(model_dir()))
    assert lm.vocab_size == 259
    ids = lm.encode("Ab\n")
    assert ids.tolist() == [ord("A") + 3, ord("b") + 3, ord("\n") + 3]
    assert lm.decode(ids) == "Ab\n"
    meta = json.loads((model_dir() / "memscan.json").read_text())
    assert meta["parameters"] == lm.parameters
    assert meta["threads"] >= 1 and meta["seconds"] > 0 and meta["loss_log"]
    assert meta["corpus"]["sha256"] == corpus_record()["sha256"]
    assert meta["planted"]["sha256"] == planted_corpus(meta["recipe"]["canary_seed"]).sha256


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random 1-layer byte-level GPT-2 (ByT5 tokenizer) saved and loaded through the adapter."""
    import torch
    from transformers import ByT5Tokenizer

    from memscan.demo.lm.train import LMTrainConfig, build_model
    from memscan.generators.causal_lm import load_causal_lm

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tinylm")
    build_model(LMTrainConfig(n_layer=1, n_embd=16, n_head=2, n_positions=64)).save_pretrained(d)
    ByT5Tokenizer(extra_ids=0).save_pretrained(d)
    return load_causal_lm(str(d))


def test_exposure_enumeration_equals_direct_scoring(tiny_lm):
    """The stem-sharing enumeration gives each candidate's log-probability as scoring its whole
    text in one pass does, and the rank is the brute-force rank (Carlini et al. 2019, Def. 4)."""
    total = format_logprobs(tiny_lm, batch_size=2048)
    assert total.shape == (10**DIGITS,) and np.isfinite(total).all()
    rng = np.random.default_rng(0)
    values = rng.choice(10**DIGITS, 12, replace=False)
    from memscan.lm.exposure import start_token

    L = len(tiny_lm.encode(DIGIT_PREFIX))  # the digits follow the start token and the prefix
    ids = np.stack([[start_token(tiny_lm), *tiny_lm.encode(DIGIT_PREFIX + f"{v:0{DIGITS}d}")] for v in values])
    direct = tiny_lm.token_logprobs(ids)[:, L:].sum(axis=1)
    np.testing.assert_allclose(total[values], direct, rtol=0, atol=1e-4)
    for v in values[:4]:
        e, r = exposure_of(total, int(v))
        assert r == sum(1 for x in total if x >= total[v])  # ties count against the canary
        assert e == pytest.approx(math.log2(10**DIGITS) - math.log2(r))
    top = int(np.argmax(total))
    assert exposure_of(total, top) == (pytest.approx(math.log2(10**DIGITS)), 1)


def test_demo_exposure_equals_lm_exposure_exact_enumeration(tiny_lm):
    """The demo's one-enumeration-per-format exposure equals memscan.lm.exposure's per-canary
    exact enumeration (whole-text log-perplexities in bits) on a 3-digit format."""
    from memscan.lm.exposure import CanaryFormat, exact_exposure

    fmt = CanaryFormat.parse("my pin: {d3}")
    total = format_logprobs(tiny_lm, prefix="my pin: ", digits=3, batch_size=37)
    order = np.argsort(-total)
    for v in [int(order[0]), int(order[1]), int(order[500]), int(order[-1]), 7, 123]:
        want = exact_exposure(tiny_lm, fmt, fmt.fill(v))
        e, r = exposure_of(total, v)
        assert r == want["rank"] and e == pytest.approx(want["exposure"])


@pytest.fixture(scope="module")
def quick_demo_lm(tmp_path_factory):
    out = tmp_path_factory.mktemp("demolm") / "d"
    proc = run_cli("demo", "lm", "--quick", "--out", out, "--quiet")
    return out, proc


def test_quick_demo_lm_summary_schema(quick_demo_lm):
    out, proc = quick_demo_lm
    s = json.loads((out / "summary.json").read_text())
    assert set(s["extracted_by_duplicate_count"]) == {str(c) for c in COPIES}
    assert set(s["exposure_by_duplicate_count"]) == {str(c) for c in COPIES}
    for v in s["extracted_by_duplicate_count"].values():
        assert set(v) == {"planted", "extracted"} and v["planted"] == PER_COUNT and 0 <= v["extracted"] <= PER_COUNT
    for v in s["exposure_by_duplicate_count"].values():
        assert v["planted"] == PER_COUNT and len(v["exposures"]) == PER_COUNT
        assert 0 <= v["min"] <= v["mean"] <= v["max"] <= s["exposure_max_bits"] + 1e-9
    assert set(s["memorization_by_duplicate_count"]) == {str(c) for c in COPIES}
    for v in s["memorization_by_duplicate_count"].values():
        assert 0 <= v["mean_exact_memorization"] <= 1 and 0 <= v["mean_matched_leading_tokens"] <= SUFFIX_BYTES
    assert s["ordinary"]["sampled"] == 40 and s["quick"] is True
    assert s["prefix_length"] == PREFIX_BYTES and s["suffix_length"] == SUFFIX_BYTES
    assert s["timings_s"]["total"] > 0
    assert "ordinary passages" in proc.stdout and "100" in proc.stdout
    assert (out / "extractable.csv").exists() and (out / "exposure.csv").exists()


def test_quick_demo_lm_shows_memorization_rising_with_repetition(quick_demo_lm):
    """The shipped weights (docs/demo.md, "Results"): the issue's targets — every canary planted
    ≥ 50 times extracted, none planted once, ordinary passages mostly not — and extraction,
    exposure and exact memorization M(f) rising with the number of copies."""
    out, _ = quick_demo_lm
    s = json.loads((out / "summary.json").read_text())
    by = s["extracted_by_duplicate_count"]
    ex = {k: v["mean"] for k, v in s["exposure_by_duplicate_count"].items()}
    mf = {k: v["mean_exact_memorization"] for k, v in s["memorization_by_duplicate_count"].items()}
    copies = ("1", "2", "5", "10", "20", "50", "100")
    # canaries planted ≥ 50 times are extracted, those planted ≤ 5 times are not, and the count
    # extracted never falls as the copies rise; ordinary passages of the plays are mostly not extracted
    assert by["100"]["extracted"] == 4 and by["50"]["extracted"] == 4, by
    assert all(by[c]["extracted"] == 0 for c in ("1", "2", "5")), by
    counts = [by[c]["extracted"] for c in copies]
    assert counts == sorted(counts), by
    assert s["ordinary"]["rate"] <= 0.05, s["ordinary"]
    # exposure (bits, of log2 1e5 = 16.6): high at 100 copies, low at 1, rising with every step
    assert s["exposure_by_duplicate_count"]["100"]["min"] >= 10 and ex["100"] >= 12, ex
    assert all(ex[a] < ex[b] for a, b in zip(copies, copies[1:])), ex
    assert ex["1"] <= 6, ex
    # exact memorization of the sentence canaries' suffixes rises with repetition
    assert mf["100"] >= 0.99 and mf["50"] >= 0.99 and mf["1"] <= 0.7, mf
    assert mf["50"] > mf["5"] > mf["2"] > mf["1"], mf


def test_quick_demo_lm_sampling_attack_is_consistent_with_its_run(quick_demo_lm):
    """The sampling attack (Carlini et al. 2021) against an index of the planted corpus built at
    demo time: the summary agrees with its lm-extract run, every canary said to have come out is
    held whole by a confirmed sample's corpus match, and the run renders. Which canaries come out
    of blind sampling is not asserted (it depends on the weights and the sample budget)."""
    import pandas as pd

    from memscan.demo.lm.canaries import canaries

    out, proc = quick_demo_lm
    a = json.loads((out / "summary.json").read_text())["sampling_attack"]
    samples = pd.read_parquet(out / "extract" / "samples.parquet")
    manifest = json.loads((out / "extract" / "manifest.json").read_text())
    assert manifest["kind"] == "lm-extract" and manifest["match_unit"] == "bytes" and a["min_match"] == 100
    assert manifest["counts"]["generated"] == a["samples"] == 64 and len(samples) == a["kept"]
    assert a["confirmed"] == int(samples["confirmed"].sum())
    assert (samples["match_len"] >= 100).sum() == a["confirmed"]
    assert set(a["canaries_by_duplicate_count"]) == {str(c) for c in COPIES}
    texts = {c.id: c.text for c in canaries()}
    confirmed = samples[samples["confirmed"]]["match_text"].tolist()
    for cid in a["canaries_extracted"]:
        assert any(texts[cid] in m or m.strip("\n") in texts[cid] for m in confirmed), cid
    n_out = sum(v["extracted"] for v in a["canaries_by_duplicate_count"].values())
    assert n_out == len(a["canaries_extracted"]) and all(
        0 <= v["extracted"] <= v["planted"] == PER_COUNT for v in a["canaries_by_duplicate_count"].values()
    )
    assert set(a["precision"]) >= {"perplexity", "zlib_ratio", "lowercase_ratio", "min_window_perplexity"}
    assert a["timings_s"]["index_build"] > 0 and "sampling attack" in proc.stdout
    run_cli("report", out / "extract")
    assert (out / "extract" / "report.html").exists()


def test_demo_lm_refuses_an_out_that_holds_a_run(quick_demo_lm):
    out, _ = quick_demo_lm
    proc = run_cli("demo", "lm", "--quick", "--out", out, "--quiet", check=False)
    assert proc.returncode == 2 and "already holds" in proc.stderr


def test_demo_lm_train_writes_a_loadable_model(tmp_path):
    from memscan.generators.causal_lm import load_causal_lm

    out = tmp_path / "m"
    proc = run_cli("demo", "lm", "train", "--out", out, "--steps", "2", "--restart-steps", "1", "--quiet")
    assert "trained in" in proc.stdout
    meta = json.loads((out / "memscan.json").read_text())
    assert meta["recipe"]["steps"] == 2 and meta["recipe"]["restart_steps"] == 1 and meta["threads"] == 1
    assert [r["phase"] for r in meta["loss_log"]] == [1, 1, 2, 3] and meta["steps_run"] == 4
    assert (out / "model.safetensors").exists()
    lm = load_causal_lm(str(out))
    assert lm.parameters == meta["parameters"]


def test_demo_lm_commands_are_registered():
    from typer.testing import CliRunner

    from memscan.cli import app

    res = CliRunner().invoke(app, ["demo", "lm", "--help"])
    assert res.exit_code == 0 and "--quick" in res.output and "--out" in res.output
    res = CliRunner().invoke(app, ["demo", "lm", "train", "--help"])
    assert res.exit_code == 0 and "--steps" in res.output and "--threads" in res.output and "--bf16" in res.output


def test_training_is_deterministic_and_phase_two_from_a_saved_phase_one_equals_one_run(tmp_path):
    """The shipped weights were trained as phase 1, then phase 2 from phase 1's saved directory
    (``init_from``): that equals training both phases in one run (same seeds, one thread)."""
    from safetensors.numpy import load_file

    from memscan.demo.lm.train import LMTrainConfig, train_lm_demo_model

    small = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64, "block": 64, "batch_size": 4}
    both = LMTrainConfig(steps=3, warmup=1, restart_steps=2, restarts=1, **small)
    one = LMTrainConfig(steps=3, warmup=1, restart_steps=0, **small)
    train_lm_demo_model(tmp_path / "a", both)
    train_lm_demo_model(tmp_path / "p1", one)
    rec = train_lm_demo_model(tmp_path / "b", both, init_from=tmp_path / "p1")
    wa = load_file(tmp_path / "a" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    assert [r["phase"] for r in rec["loss_log"]] == [1, 1, 2, 2] and rec["steps_run"] == 5
    # a second warm restart continued from the two-phase directory = three phases in one run
    three = LMTrainConfig(steps=3, warmup=1, restart_steps=2, restarts=2, **small)
    train_lm_demo_model(tmp_path / "d", three)
    rec = train_lm_demo_model(tmp_path / "e", three, init_from=tmp_path / "b")
    wd = load_file(tmp_path / "d" / "model.safetensors")
    we = load_file(tmp_path / "e" / "model.safetensors")
    for k in wd:
        np.testing.assert_array_equal(wd[k], we[k])
    assert len(rec["phase_seconds"]) == 3 and rec["steps_run"] == 7
    with pytest.raises(ValueError, match="another phase-1 recipe"):
        train_lm_demo_model(tmp_path / "c", LMTrainConfig(steps=4, warmup=1, **small), init_from=tmp_path / "p1")


def test_bf16_training_is_recorded_deterministic_and_differs_from_float32(tmp_path):
    """``bf16=True`` runs the forward under bfloat16 autocast: recorded in the recipe, the same
    weights twice (float32 state), and not the float32 run's weights (the autocast is engaged);
    ``restart_steps=0`` is one phase; an older record without ``bf16`` still seeds phase 2."""
    from safetensors.numpy import load_file

    from memscan.demo.lm.train import LMTrainConfig, train_lm_demo_model

    small = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64, "block": 64, "batch_size": 4}
    cfg = LMTrainConfig(steps=3, warmup=1, restart_steps=0, bf16=True, **small)
    rec = train_lm_demo_model(tmp_path / "a", cfg)
    train_lm_demo_model(tmp_path / "b", cfg)
    train_lm_demo_model(tmp_path / "f", LMTrainConfig(steps=3, warmup=1, restart_steps=0, bf16=False, **small))
    assert rec["recipe"]["bf16"] is True and rec["steps_run"] == 3 and len(rec["phase_seconds"]) == 1
    wa, wb, wf = (load_file(tmp_path / d / "model.safetensors") for d in "abf")
    for k in wa:
        assert wa[k].dtype == np.float32
        np.testing.assert_array_equal(wa[k], wb[k])
    assert any(not np.array_equal(wa[k], wf[k]) for k in wa)
    # a record written before the option existed (no "bf16" key) reads as bf16 = False
    meta = json.loads((tmp_path / "f" / "memscan.json").read_text())
    del meta["recipe"]["bf16"]
    (tmp_path / "f" / "memscan.json").write_text(json.dumps(meta))
    more = LMTrainConfig(steps=3, warmup=1, restart_steps=1, restarts=1, bf16=False, **small)
    assert train_lm_demo_model(tmp_path / "g", more, init_from=tmp_path / "f")["steps_run"] == 4
