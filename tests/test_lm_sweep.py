"""Checkpoint sweeps of the language-model run kinds and ``memscan compare`` over LM runs.

Two tiny GPT-2 checkpoints built from config (different seeds): ``memscan lm extractable --model
FOLDER --heldout`` killed inside the second checkpoint and resumed equals the uninterrupted sweep;
the comparison's rows, extraction rate by duplicate count and held-out losses equal hand
computations from the runs' own tables and a direct torch cross-entropy; ``lm mia`` and ``lm
extract`` runs are read by compare as their tables say; bad folders are refused."""

from __future__ import annotations

import json
import socket

import numpy as np
import pandas as pd
import pytest
from lm_support import MEMBERS, NONMEMBERS
from typer.testing import CliRunner

from memscan.cli import app
from memscan.store import RunStore

pytest.importorskip("transformers")
runner = CliRunner()


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    """checkpoint-100 and checkpoint-200 (tiny GPT-2s, 64 positions), training text with
    repeated documents, members / non-members, held-out texts (one longer than 64 bytes)."""
    from memscan.testing.tiny_lm import make_tiny_gpt2

    tmp = tmp_path_factory.mktemp("lmsweep")
    for step, seed in ((100, 0), (200, 1)):
        make_tiny_gpt2(tmp / "ck" / f"checkpoint-{step}", seed=seed, n_positions=64)
    data = tmp / "data.jsonl"
    docs = [MEMBERS[i % 4] + " / " + MEMBERS[i % 4] for i in range(7)] + [MEMBERS[5] + " / " + MEMBERS[6]]
    data.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    (tmp / "members.txt").write_text("\n".join(MEMBERS) + "\n")
    (tmp / "nonmembers.txt").write_text("\n".join(NONMEMBERS) + "\n")
    held = [NONMEMBERS[0], NONMEMBERS[1] + " and " + NONMEMBERS[2], "short"]
    (tmp / "held.txt").write_text("\n".join(held) + "\n")
    return tmp, held, docs


def _invoke(*args, ok=True):
    res = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def _extractable_argv(tmp, out, *extra):
    return (
        "lm", "extractable", "--model", tmp / "ck", "--data", tmp / "data.jsonl", "--out", out,
        "--prefix-lengths", 8, "--suffix-length", 8, "--sequences", 8, "--offsets", "start", "--shard-size", 3,
        "--heldout", tmp / "held.txt", "--quiet", *extra,
    )  # fmt: skip


def _torch_nll(model_dir, texts, window):
    """Σ cross-entropy over every predicted token / their number, windows of ``window`` bytes,
    straight from the transformers model (independent of the adapter)."""
    import torch
    from transformers import GPT2LMHeadModel

    m = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    total, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([b + 3 for b in t.encode("utf-8")])  # ByT5: byte b is id b + 3
        for s in range(0, len(ids), window):
            w = ids[s : s + window]
            if len(w) < 2:
                continue
            with torch.no_grad():
                logits = m(input_ids=w[None]).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            n += len(w) - 1
    return total / n, n


def test_extractable_sweep_killed_and_resumed_equals_hand_computation(lm_files, tmp_path, monkeypatch):
    tmp, held, docs = lm_files
    idx = tmp_path / "idx"
    _invoke("lm", "index", tmp / "data.jsonl", "--out", idx, "--bytes")
    full = tmp_path / "full"
    _invoke(*_extractable_argv(tmp, full, "--index", idx))
    t = pd.read_parquet(full / "compare.parquet").sort_values("step")
    assert t["step"].tolist() == [100, 200] and t["kind"].tolist() == ["lm-extractable"] * 2
    assert RunStore(full).read_manifest()["kind"] == "compare"
    dup = pd.read_parquet(full / "by_duplicates.parquet")
    for _, row in t.iterrows():
        sub = full / row["label"]
        seq = pd.read_parquet(sub / "sequences.parquet")
        m = json.loads((sub / "manifest.json").read_text())
        # 1. the row from the run's own table and manifest
        assert row["sequences"] == len(seq) == 8
        assert row["extractable"] == int(seq["extractable"].sum())
        assert row["extractable_rate"] == pytest.approx(seq["extractable"].mean())
        assert row["exact_memorization_mean"] == pytest.approx(seq["exact_memorization"].mean())
        assert row["step"] == m["model"]["training_step"] and row["params"] == m["model"]["parameters"]
        # 2. extraction rate by duplicate count = grouping by window_count (4 texts are repeated)
        want = seq.groupby("window_count")["extractable"].agg(["size", "sum"])
        got = dup[dup["run"] == row["run"]].set_index("duplicate_count")
        assert got.index.tolist() == want.index.tolist() and max(got.index) >= 2
        assert got["prompts"].tolist() == want["size"].tolist()
        assert got["extractions"].tolist() == want["sum"].tolist()
        np.testing.assert_allclose(got["extraction_rate"], want["sum"] / want["size"])
        # 3. held-out and training loss: a direct cross-entropy in 64-token windows
        h, n = _torch_nll(row["model"], held, 64)
        assert row["heldout_loss"] == pytest.approx(h, rel=1e-5) and row["heldout_tokens"] == n
        tr, _ = _torch_nll(row["model"], docs[: len(held)], 64)
        assert row["train_loss"] == pytest.approx(tr, rel=1e-5)
        assert row["loss_gap"] == pytest.approx(h - tr, rel=1e-5)
    # the same run and seeds on each checkpoint
    m1, m2 = (json.loads((full / f"checkpoint-{s}" / "manifest.json").read_text()) for s in (100, 200))
    assert m1["config"] == m2["config"] and m1["sequences_sha256"] == m2["sequences_sha256"]
    assert "held-out loss over training" in (full / "compare.html").read_text()

    # killed after the second checkpoint's first shard, refused without --resume, then resumed
    class Killed(BaseException):
        pass

    killed = tmp_path / "killed"
    original = RunStore.commit_shard
    seen = []

    def die(self, shard, tables, meta):
        original(self, shard, tables, meta)
        seen.append(self.root.name)
        if self.root.name == "checkpoint-200" and seen.count("checkpoint-200") == 1:
            (self.root / ".lock").write_text(f"pid=999999999 host={socket.gethostname()} since=killed")
            raise Killed

    monkeypatch.setattr(RunStore, "commit_shard", die)
    with pytest.raises(Killed):
        runner.invoke(app, [str(a) for a in _extractable_argv(tmp, killed, "--index", idx)], catch_exceptions=False)
    monkeypatch.setattr(RunStore, "commit_shard", original)
    again = _invoke(*_extractable_argv(tmp, killed, "--index", idx), ok=False)
    assert again.exit_code == 2 and "--resume" in again.output
    _invoke(*_extractable_argv(tmp, killed, "--index", idx, "--resume"))
    for sub in ("checkpoint-100", "checkpoint-200"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(full / sub / "sequences.parquet"), pd.read_parquet(killed / sub / "sequences.parquet")
        )
    a, b = pd.read_parquet(full / "compare.parquet"), pd.read_parquet(killed / "compare.parquet")
    cols = [c for c in a.columns if c not in ("run",)]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_lm_mia_sweep_reads_auc_and_tpr_with_their_intervals(lm_files, tmp_path):
    tmp, held, _ = lm_files
    out = tmp_path / "mia"
    _invoke(
        "lm", "mia", "--model", tmp / "ck", "--members", tmp / "members.txt", "--nonmembers",
        tmp / "nonmembers.txt", "--out", out, "--bootstrap", 20, "--heldout", tmp / "held.txt", "--quiet",
    )  # fmt: skip
    t = pd.read_parquet(out / "compare.parquet")
    assert sorted(t["step"]) == [100, 200]
    for _, row in t.iterrows():
        met = pd.read_parquet(out / row["label"] / "metrics.parquet")
        met = met[~met["statistic"].str.startswith("blind")]
        # the best statistic: highest TPR at 1 % FPR, then AUC (docs/mia.md), its interval columns
        best = met.sort_values(["tpr@1%fpr", "auc"], ascending=False, kind="stable").iloc[0]
        assert row["statistic"] == best["statistic"]
        for col in ("auc", "auc_lo", "auc_hi", "tpr@1%fpr", "tpr@1%fpr_lo", "tpr@1%fpr_hi"):
            assert row[col] == pytest.approx(best[col])
        assert row["memorization"] == row["auc"] and row["memorization_measure"] == "auc"
        tr, _ = _torch_nll(row["model"], MEMBERS[: len(held)], 64)  # train loss: the first members
        assert row["train_loss"] == pytest.approx(tr, rel=1e-5)


def test_lm_extract_runs_are_compared_from_their_tables(lm_files, tmp_path):
    tmp, _, _ = lm_files
    idx = tmp_path / "idx"
    _invoke("lm", "index", tmp / "data.jsonl", "--out", idx, "--bytes")
    out = tmp_path / "lx"
    _invoke(
        "lm", "extract", "--model", tmp / "ck", "--index", idx, "--out", out, "--samples", 12, "--length", 24,
        "--top", 5, "--min-match", 1, "--temperature-start", 1, "--quiet",
    )  # fmt: skip
    t = pd.read_parquet(out / "compare.parquet")
    items = pd.read_parquet(out / "items.parquet")
    for _, row in t.iterrows():
        sub = out / row["label"]
        s = pd.read_parquet(sub / "samples.parquet")
        p = pd.read_parquet(sub / "precision.parquet").set_index("metric")
        assert row["kind"] == "lm-extract" and row["kept"] == len(s)
        assert row["confirmed"] == int(s["confirmed"].sum()) and row["confirmed"] > 0
        assert row["confirmed_rate"] == pytest.approx(s["confirmed"].mean())
        assert row["precision_perplexity"] == pytest.approx(p.loc["perplexity", "precision"])
        # the items: every distinct 32-character window of the confirmed samples' matched corpus
        # text (the whole text when shorter), built here by hand
        want = set()
        for text in s.loc[s["confirmed"], "match_text"].astype(str):
            want |= {text} if len(text) <= 32 else {text[i : i + 32] for i in range(len(text) - 31)}
        assert want and set(items.loc[items["run"] == row["run"], "item"]) == want


def test_heldout_without_a_checkpoint_folder_is_refused(lm_files, tmp_path):
    tmp, _, _ = lm_files
    res = _invoke(
        "lm", "extractable", "--model", tmp / "ck" / "checkpoint-100", "--data", tmp / "data.jsonl", "--out",
        tmp_path / "o", "--heldout", tmp / "held.txt", "--quiet", ok=False,
    )  # fmt: skip
    assert res.exit_code == 2 and "--heldout applies to checkpoint sweeps" in res.output
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_mean_token_nll_pools_tokens_over_windows(lm_files):
    """The pooled mean: one long text split in 64-token windows and a short one, against torch."""
    from memscan.generators.causal_lm import load_causal_lm
    from memscan.lm.sweep import mean_token_nll

    tmp, _, _ = lm_files
    path = tmp / "ck" / "checkpoint-100"
    lm = load_causal_lm(str(path))
    texts = ["x" * 150 + " the end", "ab", "a"]
    got, n = mean_token_nll(lm, [lm.encode(t) for t in texts])
    want, n_want = _torch_nll(path, texts, 64)
    assert n == n_want == (63 + 63 + 29) + 1 and got == pytest.approx(want, rel=1e-6)


def test_lm_exposure_sweep_reads_each_runs_exposures(lm_files, tmp_path):
    tmp, held, _ = lm_files
    out = tmp_path / "expo"
    _invoke(
        "lm", "exposure", "--model", tmp / "ck", "--canaries", "my PIN is {d3}::my PIN is 042", "--out", out,
        "--heldout", tmp / "held.txt", "--quiet",
    )  # fmt: skip
    t = pd.read_parquet(out / "compare.parquet")
    assert sorted(t["step"]) == [100, 200] and "train_loss" not in t  # exposure has no training text
    for _, row in t.iterrows():
        e = pd.read_parquet(out / row["label"] / "exposures.parquet")
        assert row["exposure_mean"] == pytest.approx(e["exposure"].mean()) and row["canaries"] == len(e)
        assert row["heldout_loss"] == pytest.approx(_torch_nll(row["model"], held, 64)[0], rel=1e-5)
