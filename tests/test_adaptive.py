"""The adaptive generation budget: it never stops a prompt the full budget would flag (constructed
cases), its stopping rule matches a brute-force recomputation, its stop rate at a borderline copy
rate matches the binomial formula, and it is off by default (tables unchanged)."""

import math

import numpy as np
import pandas as pd
import pytest

from memscan import ExtractConfig, extract, pairwise_tiled_l2
from memscan.errors import InputError
from memscan.generators.seeds import derive_seeds
from memscan.synthetic import SyntheticGenerator

N, K, FIRST, ROUND = 120, 10, 30, 30


class MixedRates:
    """Synthetic generator whose memorized prompts have different copy rates."""

    def __init__(self, rates: dict[str, tuple[str, float]]):
        self.gens = {p: SyntheticGenerator({p: tid}, size=32, copy_rate=r) for p, (tid, r) in rates.items()}
        self.fresh = SyntheticGenerator({}, size=32)
        self.output_shape = (32, 32, 3)
        self.config = {"type": "mixed-rates"}

    def generate(self, prompt, seeds):
        return self.gens.get(prompt, self.fresh).generate(prompt, seeds)


RATES = {f"copy {r} {j}": (f"t{10 * i + j:04d}", r) for i, r in enumerate((0.2, 0.3, 0.45, 0.6)) for j in range(2)}
FRESH = [f"fresh {i}" for i in range(6)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth_train):
    root = tmp_path_factory.mktemp("adaptive")
    gen = MixedRates(RATES)
    prompts = list(RATES) + FRESH
    base = dict(samples_per_prompt=N, min_clique=K, batch_size=30, shard_size=7)
    full = extract(gen, prompts, synth_train, root / "full", ExtractConfig(**base), progress=False)
    cfg = ExtractConfig(**base, adaptive=True, first_round=FIRST, round_size=ROUND)
    adaptive = extract(gen, prompts, synth_train, root / "adaptive", cfg, progress=False)
    return gen, prompts, full, adaptive


def _by_prompt(result):
    return result.detections.set_index("prompt")


def test_never_stops_a_prompt_the_full_budget_flags(runs):
    gen, prompts, full, adaptive = runs
    f, a = _by_prompt(full), _by_prompt(adaptive)
    flagged = set(f.index[f["detected"]])
    assert flagged == set(RATES)  # the constructed memorized prompts, and nothing else
    assert set(a.index[a["detected"]]) == flagged
    top_f = full.extracted.merge(full.detections[["prompt_id", "prompt"]], on="prompt_id")
    top_a = adaptive.extracted.merge(adaptive.detections[["prompt_id", "prompt"]], on="prompt_id")
    assert dict(zip(top_a["prompt"], top_a["train_id"])) == dict(zip(top_f["prompt"], top_f["train_id"]))
    assert len(top_a) == len(RATES)


def test_rounds_and_n_samples_follow_the_rule(runs):
    """Recompute every prompt's stopping point by brute force (generate the prefix, all pairs,
    the largest clique by exhaustive growth over the copies) and compare with n_samples."""
    gen, prompts, full, adaptive = runs
    a = adaptive.detections.set_index("prompt_id")
    alpha = ExtractConfig().alpha
    for pid, prompt in zip(adaptive.prompts["prompt_id"], adaptive.prompts["prompt"]):
        expected = N
        everything = gen.generate(prompt, derive_seeds(0, pid, 0, N))
        for upto in [30, 60, 90, 120]:
            d = np.asarray(pairwise_tiled_l2(everything[:upto]))
            np.fill_diagonal(d, np.inf)
            # copies are mutually within alpha and far from everything else here, so the largest
            # clique is the largest connected component of the alpha-graph
            clique = _largest_component(d < alpha)
            if upto < N and (clique < 2 or clique >= K):
                expected = upto
                break
        assert a.loc[pid, "n_samples"] == expected, prompt
    fresh = a[a["prompt"].isin(FRESH)]
    assert (fresh["n_samples"] == FIRST).all()
    assert (fresh["clique_size"] == 1).all()


def _largest_component(adj: np.ndarray) -> int:
    n, seen, best = len(adj), set(), 1
    for s in range(n):
        if s in seen:
            continue
        stack, comp = [s], {s}
        while stack:
            u = stack.pop()
            for v in np.flatnonzero(adj[u]):
                if v not in comp:
                    comp.add(int(v))
                    stack.append(int(v))
        seen |= comp
        best = max(best, len(comp))
    return best


def test_savings_are_reported(runs, capsys):
    gen, prompts, full, adaptive = runs
    spent, budget = int(adaptive.detections["n_samples"].sum()), len(prompts) * N
    assert full.manifest["counts"]["samples"] == budget
    assert adaptive.manifest["counts"]["samples"] == spent
    assert adaptive.manifest["config"]["adaptive"] is True
    assert adaptive.manifest["config"]["first_round"] == FIRST
    share = spent / budget
    with capsys.disabled():
        print(f"\n[adaptive] {spent} of {budget} generations ({share:.1%}), all {len(RATES)} extractions kept")
    # 6 fresh prompts stop at 30; memorized ones stop once flagged (rate 0.45 and 0.6: mostly at 30)
    assert share < 0.45


def test_default_is_off_and_tables_unchanged(runs):
    gen, prompts, full, _ = runs
    assert ExtractConfig().adaptive is False and ExtractConfig().rounds() == [500]
    assert (full.detections["n_samples"] == N).all()
    assert full.manifest["config"]["adaptive"] is False
    cfg = ExtractConfig(samples_per_prompt=N, min_clique=K, adaptive=True, first_round=FIRST, round_size=50)
    assert cfg.rounds() == [30, 80, 120]


def test_stop_rate_matches_the_binomial_formula(tmp_path, synth_train):
    """At copy rate r, a prompt stops after the first round of n exactly when fewer than 2 of its
    n generations are copies: P(stop) = (1 − r)^n + n·r·(1 − r)^(n−1)."""
    r, n, m = 0.05, 20, 60
    prompts = [f"borderline {i}" for i in range(m)]
    gen = SyntheticGenerator({p: "t0001" for p in prompts}, size=32, copy_rate=r)
    cfg = ExtractConfig(
        samples_per_prompt=40, min_clique=3, batch_size=20, shard_size=30, adaptive=True, first_round=n, round_size=20
    )
    res = extract(gen, prompts, synth_train, tmp_path / "run", cfg, progress=False)
    stopped = (res.detections["n_samples"] == n) & (res.detections["clique_size"] < 2)
    expected = (1 - r) ** n + n * r * (1 - r) ** (n - 1)
    sigma = math.sqrt(expected * (1 - expected) / m)
    assert abs(stopped.mean() - expected) < 3.5 * sigma, (stopped.mean(), expected)
    # the same count from the seeds alone: copies among the first n are the draws u < r
    copies = [sum(_is_copy(s, r) for s in derive_seeds(0, f"p{i}", 0, n)) for i in range(m)]
    assert stopped.tolist() == [c < 2 for c in copies]


def _is_copy(seed: int, rate: float) -> bool:
    from memscan.synthetic import keyed_rng

    return keyed_rng("sample", seed).uniform() < rate


def test_invalid_adaptive_parameters_are_refused():
    with pytest.raises(InputError, match="continue_clique"):
        ExtractConfig(adaptive=True, continue_clique=11).validate()
    with pytest.raises(InputError, match="first_round"):
        ExtractConfig(adaptive=True, first_round=1).validate()
    with pytest.raises(InputError, match="round_size"):
        ExtractConfig(adaptive=True, round_size=0).validate()


def test_cli_adaptive_flags(tmp_path, synth_train):
    from conftest import run_cli

    (tmp_path / "p.txt").write_text("copy t0003\nfresh 1\nfresh 2\n")
    proc = run_cli(
        "extract",
        "--model",
        "py:gen_support:planted",
        "--prompts",
        tmp_path / "p.txt",
        "--train",
        synth_train,
        "--out",
        tmp_path / "run",
        "--samples-per-prompt",
        100,
        "--adaptive",
        "--first-round",
        20,
        "--round-size",
        30,
        "--quiet",
    )
    det = pd.read_parquet(tmp_path / "run" / "detections.parquet").set_index("prompt")
    assert det.loc["fresh 1", "n_samples"] == 20 and det.loc["fresh 2", "n_samples"] == 20
    assert bool(det.loc["copy t0003", "detected"])
    assert "adaptive budget:" in proc.stdout


def test_report_shows_the_budget_curve(runs):
    """The report of an adaptive run carries the spending curve, recomputed here by hand from
    n_samples; a full-budget run's report has no such section."""
    from memscan.report.plots import adaptive_budget_curve
    from memscan.report.registry import build_report

    gen, prompts, full, adaptive = runs
    det, ext = adaptive.detections, adaptive.extractions
    curve = adaptive_budget_curve(det, ext, [30, 60, 90, 120])
    n = det["n_samples"].to_numpy()
    hit = det["prompt_id"].isin(adaptive.extracted["prompt_id"]).to_numpy()
    for r in (30, 60, 90, 120):
        row = curve.set_index("round_end").loc[r]
        assert row["generations"] == sum(min(int(x), r) for x in n)
        assert row["prompts_running"] == sum(int(x) > r for x in n)
        assert row["extractions_found"] == sum(bool(h) and int(x) <= r for x, h in zip(n, hit))
    last = curve.iloc[-1]
    assert last["generations"] == n.sum() and last["extractions_found"] == len(RATES)
    assert last["evaluations_share"] == n.sum() / (len(prompts) * N)

    html = build_report(adaptive.run_dir).read_text()
    assert "Adaptive generation budget" in html
    assert f"<b>{n.sum()}</b> of the {len(prompts) * N} generations a full budget gives them" in html
    assert "Adaptive generation budget" not in build_report(full.run_dir).read_text()
