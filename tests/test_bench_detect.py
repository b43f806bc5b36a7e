"""bench/detect.py runs end to end on tiny inputs (the CUDA code path shares these functions;
its timing and memory hooks are no-ops on the CPU)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

import memscan.distances as dist_mod

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_detect", ROOT / "bench" / "detect.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def int8_products(monkeypatch):
    """The int8 rows whatever the process's one-off speed check decided (it may have run under
    load in an earlier test and cached float32 for the session)."""
    monkeypatch.setattr(dist_mod, "INT8_PRODUCTS", True)
    monkeypatch.setattr(dist_mod, "_int8_pays_on_cpu", lambda: True)
    monkeypatch.delitem(dist_mod._INT8_OK, "cpu", raising=False)
    if not dist_mod._int8_gram_ok("cpu"):
        pytest.skip("torch._int_mm does not run on this CPU")


def _args(**kw):
    base = dict(size=16, case="memorized", threads=0, n=24, reps=1, alpha=0.035, naive_pairs=3, device="cpu", shard=0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_prompt_and_shard_rows(bench, monkeypatch):
    rows = [bench.worker(_args(threads=1)), bench.worker(_args()), bench.shard_worker(_args(shard=3))]
    assert rows[0]["threads"] == 1 and rows[0]["kind"] == "prompt"
    assert rows[2]["same_cliques"] and rows[2]["prompts"] == 3 and rows[2]["ratio"] > 0
    assert rows[0]["naive_max_abs_diff"] < 1e-5
    assert rows[0]["products"] == "int8" and rows[0]["int8_speedup"] > 0 and rows[0]["int8_peak_gops"] > 0
    assert rows[0]["t_distances_float32"] > 0 and "× float32" in bench._products(rows[0])
    prof = bench.shard_worker(_args(shard=2, profile=True))["profile_distances"]
    assert prof["by"] == "self CPU time" and prof["ops"] > 0 and prof["host_syncs"] is None
    assert len(prof["top"]) == 10 and all(e["ms"] >= 0 and e["calls"] >= 1 for e in prof["top"])
    assert [e["ms"] for e in prof["top"]] == sorted((e["ms"] for e in prof["top"]), reverse=True)
    assert rows[2]["products"] == "int8" and rows[2]["int8_peak_gops"] > 0 and rows[2]["int8_fraction_many"] > 0
    assert rows[2]["stacked"] is False and rows[2]["int8_group"] is None
    monkeypatch.setattr(dist_mod, "INT8_GROUP", 2)  # as --int8-group 2 sets it in a worker process
    proxy = bench.shard_worker(_args(shard=3, stacked=True))  # the GPU path, on the CPU
    assert proxy["stacked"] and proxy["int8_group"] == 2 and proxy["same_cliques"]
    assert proxy["t_many_distances_ungrouped"] > 0 and proxy["group_speedup"] > 0
    gops, _ = bench._int8_rate(__import__("torch"), 64, 64, 64, reps=1)
    assert gops > 0 and bench._int8_peak(__import__("torch"), "cpu") > 0
    gpu = dict(rows[2], device="cuda", roofline_fraction_many=0.31, products="int8")
    assert "30% of the float32 peak met (31%, int8 products)" in bench.format_results([gpu], "m")
    table = bench.format_results(rows, "test machine")
    assert "× 1 thread" in table and "shard of 3 at 16×16 memorized" in table
    with pytest.raises(SystemExit, match="CUDA"):
        if not __import__("torch").cuda.is_available():
            bench.worker(_args(device="cuda"))
        raise SystemExit("CUDA present: nothing to check")
