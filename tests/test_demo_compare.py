"""``memscan demo compare``: the shipped checkpoints, and the quick sweep end to end (slow)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from memscan.demo.compare import checkpoints_dir
from memscan.generators.checkpoints import list_checkpoints
from memscan.generators.model_record import training_step


def test_shipped_checkpoints_are_small_safetensors_with_their_step():
    ckpts = list_checkpoints(checkpoints_dir())
    assert len(ckpts) >= 2 and [c.step for c in ckpts] == sorted(c.step for c in ckpts)
    total = 0
    for c in ckpts:
        assert training_step(c.path) == c.step
        assert json.loads((c.path / "trainer_state.json").read_text())["global_step"] == c.step
        assert not list(c.path.rglob("*.bin")) and not list(c.path.rglob("*.pt"))
        total += sum(f.stat().st_size for f in c.path.rglob("*") if f.is_file())
    assert total < 10 * 2**20  # the budget for added package data


@pytest.mark.slow
def test_quick_demo_compare_runs_the_sweep_and_compares_by_step(tmp_path):
    out = tmp_path / "d"
    proc = run_cli("demo", "compare", "--quick", "--out", out, "--quiet", timeout=1800)
    s = json.loads((out / "summary.json").read_text())
    steps = [c["step"] for c in s["checkpoints"]]
    assert steps == [*(c.step for c in list_checkpoints(checkpoints_dir())), 3000]  # + the shipped model
    for c in s["checkpoints"][:-1]:
        assert c["heldout_loss"] > 0 and c["train_loss"] > 0
    for c in s["checkpoints"]:
        assert set(c["extraction_rate_by_duplicates"]) >= {"200", "100", "50"}
    # the shipped model (3000 steps) extracts the most duplicated images; early checkpoints fewer
    last = s["checkpoints"][-1]["extraction_rate_by_duplicates"]
    assert last["200"] >= 0.5 and last["200"] >= s["checkpoints"][0]["extraction_rate_by_duplicates"]["200"]
    # the fit is over the checkpoints (one width); the shipped model is compared by parameters
    n_ckpts = len(list_checkpoints(checkpoints_dir()))
    assert len(s["fits"]) == 1 and s["fits"][0]["n"] == n_ckpts and s["fits"][0]["by"] == "step"
    assert s["checkpoints"][-1]["params"] > s["checkpoints"][-2]["params"]
    assert s["checkpoints"][-1]["heldout_loss"] is None
    for c in s["checkpoints"]:  # "e/n" beside each rate
        e, n = (int(v) for v in c["extractions_by_duplicates"]["200"].split("/"))
        assert e / n == c["extraction_rate_by_duplicates"]["200"]
    assert (out / "sweep" / "compare.html").exists() and (out / "compare" / "compare.html").exists()
    assert str(out / "sweep" / "compare.html") in proc.stdout and str(out / "compare" / "compare.html") in proc.stdout
    # memorization rises over training: the last checkpoint extracts at least what the first does
    assert s["checkpoints"][-2]["extractions"] >= s["checkpoints"][0]["extractions"]
