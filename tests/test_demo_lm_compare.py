"""``memscan demo lm compare``: the shipped LM checkpoints, the cached exposure enumeration against
the demo's own, and the quick demo end to end (slow) against its runs' tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from memscan.demo.lm.canaries import canaries
from memscan.demo.lm.compare import heldout_sentences, lm_checkpoints_dir
from memscan.generators.checkpoints import list_checkpoints
from memscan.generators.model_record import training_step


def test_shipped_lm_checkpoints_are_small_bf16_safetensors_with_their_step():
    from safetensors import safe_open

    ckpts = list_checkpoints(lm_checkpoints_dir())
    assert len(ckpts) >= 2
    for c in ckpts:
        assert training_step(c.path) == c.step
        rec = json.loads((c.path / "memscan.json").read_text())
        assert rec["step"] == c.step and rec["saved_dtype"] == "bfloat16" and rec["recipe"]["steps"] == 7200
        weights = c.path / "model.safetensors"
        assert weights.stat().st_size < 4 * 2**20 and not list(c.path.glob("*.bin"))
        with safe_open(str(weights), "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}


def test_heldout_sentences_are_canary_like_and_never_planted():
    planted = {c.text for c in canaries()}
    held = heldout_sentences(28)
    assert len(held) == len(set(held)) == 28 and not planted & set(held)
    assert all(len(t) >= 100 and t.endswith(".") for t in held)


def test_cached_format_enumeration_equals_the_demo_one():
    pytest.importorskip("transformers")
    import tempfile

    from memscan.demo.lm.compare import format_logprobs_cached
    from memscan.demo.lm.run import format_logprobs
    from memscan.generators.causal_lm import load_causal_lm
    from memscan.testing.tiny_lm import make_tiny_gpt2

    lm = load_causal_lm(str(make_tiny_gpt2(tempfile.mkdtemp() + "/m", seed=2, n_positions=64)))
    a = format_logprobs_cached(lm, "my PIN is ", 3, batch_size=32)
    b = format_logprobs(lm, "my PIN is ", 3, batch_size=32)
    assert a.shape == (1000,) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    # and against a direct sum of the adapter's per-token log-probabilities, for a few candidates
    # (scored after the start token, as memscan.lm.exposure scores canaries)
    from memscan.lm.exposure import start_token

    pre = np.concatenate([[start_token(lm)], lm.encode("my PIN is ")])
    for d in (0, 417, 999):
        ids = np.concatenate([pre, lm.encode(f"{d:03d}")])[None, :].astype(np.int64)
        want = lm.token_logprobs(ids)[0, len(pre) - 1 :].sum()
        assert a[d] == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
def test_quick_demo_lm_compare_against_its_runs(tmp_path):
    out = tmp_path / "d"
    proc = run_cli("demo", "lm", "compare", "--quick", "--out", out, "--quiet", timeout=1800)
    s = json.loads((out / "summary.json").read_text())
    steps = [c["step"] for c in s["checkpoints"]]
    assert steps == [*(c.step for c in list_checkpoints(lm_checkpoints_dir())), 7200]  # + the shipped model
    docs = [json.loads(line) for line in (out / "sequences.jsonl").read_text().splitlines()]
    copies = {d["id"]: d["copies"] for d in docs if d["kind"] == "canary"}
    expo = pd.read_csv(out / "exposure.csv")
    table = pd.read_parquet(out / "sweep" / "compare.parquet").set_index("step")
    for c in s["checkpoints"]:
        seq = pd.read_parquet(out / "sweep" / f"checkpoint-{c['step']}" / "sequences.parquet")
        can = seq[seq["train_id"].isin(copies)]
        # extracted canaries by copies, from the run's own table
        for k, v in c["extracted_by_copies"].items():
            sel = can[can["train_id"].map(copies) == int(k)]
            assert v == {"planted": len(sel), "extracted": int(sel["extractable"].sum())}
        e = expo[expo["step"] == c["step"]]
        assert len(e) == 28 and (e["exposure"] <= s["exposure_max_bits"] + 1e-9).all()
        for k, v in c["exposure_by_copies"].items():
            assert v["mean"] == pytest.approx(e.loc[e["copies"] == int(k), "exposure"].mean(), abs=1e-3)
        assert c["heldout_loss"] == pytest.approx(table.loc[c["step"], "heldout_loss"]) and c["train_loss"] > 0
        assert table.loc[c["step"], "extractable"] == int(seq["extractable"].sum())
    # the compare page has the rates by duplicate count (window_count of the corpus index)
    dup = pd.read_parquet(out / "sweep" / "by_duplicates.parquet")
    assert {1, 100} <= set(dup["duplicate_count"])
    # memorization over training: the shipped model has extracted at least as many canaries
    first, last = s["checkpoints"][0], s["checkpoints"][-1]
    assert last["canaries_extracted"] >= first["canaries_extracted"]
    assert last["exposure_by_copies"]["100"]["mean"] >= first["exposure_by_copies"]["100"]["mean"]
    assert "report" in proc.stdout
