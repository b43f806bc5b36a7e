"""``memscan demo``: the paper's central finding on a laptop, from package-bundled data only.

1. Rebuild the demo training set (scikit-learn digits, planted duplicates; deterministic).
2. Choose candidate prompts the way Carlini et al. did: count near-duplicates in the training
   set and attack the captions of the most duplicated images (plus a sample of unique ones, so the
   contrast is visible).
3. Audit with the shipped model (:func:`memscan.audit.audit`): triage scores rank the candidates,
   the adaptive extraction goes down the ranking within a budget of 10 % of the brute force's
   UNet evaluations (40 % in ``--quick``, whose pool is two-thirds memorized), and the images
   planted once are attacked whatever the budget (the controls).
4. The brute force for comparison: every candidate × the full budget (``full_budget/``), so the
   summary can say which share of its extractions the audit found, for which share of its cost.
5. Score against the ground truth and write ``summary.json`` and ``report.html``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.audit import AuditBudget, AuditResult, audit, default_extract_config
from memscan.data.images import read_image
from memscan.demo.data import DemoData, build_demo_data, write_demo_data
from memscan.demo.model_out import check_model_out, check_train_steps
from memscan.devices import check_device
from memscan.distances import cross_tiled_l2, nearest_tiled_l2
from memscan.errors import InputError, MemscanError
from memscan.extraction.config import ExtractConfig
from memscan.extraction.pipeline import extract
from memscan.extraction.verify import delta_float32, refine_near
from memscan.generators.diffusers_unet import load_unet_generator
from memscan.report.registry import build_report
from memscan.store import atomic_write_json, check_out_folder

#: Near-duplicate threshold for counting training-set duplicates (tiled ℓ2, pixel space).
DUPLICATE_TAU = 0.05


def model_dir() -> Path:
    """The shipped demo model (diffusers layout, safetensors weights)."""
    return Path(str(resources.files("memscan.demo") / "model"))


def demo_settings(quick: bool, samples_per_prompt: int | None) -> dict:
    # the audit's rounds: the quick pool is two-thirds memorized, so its first round is k = 10
    # generations (a memorized prompt is flagged in one model call); the full demo screens with 5
    if quick:
        return {
            "samples": 40 if samples_per_prompt is None else samples_per_prompt,
            "unique_prompts": 8,
            "min_count": 25,
            "budget_share": 0.4,
            "first_round": 10,
            "round_size": 5,
        }
    return {
        "samples": 100 if samples_per_prompt is None else samples_per_prompt,
        "unique_prompts": 24,
        "min_count": 1,
        "budget_share": 0.1,
        "first_round": 5,
        "round_size": 5,
    }


def count_duplicates(images: np.ndarray, tau: float = DUPLICATE_TAU, grid: int = 4) -> np.ndarray:
    """For each training image, how many training images (itself included) lie within τ."""
    _, _, counts = nearest_tiled_l2(images, images, k=1, grid=grid, within=tau)
    return counts


def candidate_prompts(data: DemoData, unique_prompts: int, min_count: int, seed: int = 0) -> pd.DataFrame:
    """Captions of every image duplicated ≥ 2 times (and ≥ ``min_count``), plus random unique ones."""
    counts = count_duplicates(data.images)
    first_row: dict[str, int] = {}
    for i, b in enumerate(data.base_ids):
        first_row.setdefault(b, i)
    measured = {b: int(counts[i]) for b, i in first_row.items()}
    dup = sorted((b for b, c in measured.items() if c >= max(2, min_count)), key=lambda b: (-measured[b], b))
    singles = sorted(b for b, c in measured.items() if c == 1)
    rng = np.random.default_rng(seed)
    # the planted-once images are always attacked (their contrast with the duplicated ones is the point)
    once = [b for b in data.planted if measured[b] == 1]
    others = [b for b in singles if b not in once]
    pick = once + list(rng.choice(others, max(0, unique_prompts - len(once)), replace=False))
    chosen = dup + sorted(pick)
    return pd.DataFrame(
        {
            "prompt_id": chosen,
            "prompt": [data.captions[b] for b in chosen],
            "train_id": [f"{b}_c000" for b in chosen],
            "duplicate_count": [measured[b] for b in chosen],
            "planted_copies": [data.copies[b] for b in chosen],
        }
    )


def score(run_dir: Path, data: DemoData, prompts: pd.DataFrame, delta: float, shape) -> dict:
    """Compare the run's extractions with the ground truth that was planted."""
    det = pd.read_parquet(run_dir / "detections.parquet")
    ext = pd.read_parquet(run_dir / "extractions.parquet")
    top = ext[(ext["rank"] == 1) & ext["extracted"]]
    base = data.base_images()
    extracted = set(top["prompt_id"])
    attacked = set(det["prompt_id"])
    # precision: each extraction's candidate vs the prompt's own ground-truth image, recomputed
    correct: set[str] = set()
    for pid in extracted:
        rel = det.loc[det["prompt_id"] == pid, "candidate_image"].iloc[0]
        cand = read_image(run_dir / rel, shape[:2], shape[2])
        if cross_tiled_l2(cand[None], base[pid][None], exact_near=refine_near(delta))[0, 0] <= delta_float32(delta):
            correct.add(pid)
    # per planted count: the images planted that many times (ground truth), the candidate prompts
    # of that count, how many were attacked and how many extracted
    by_count: dict[str, dict] = {}
    for b in data.planted:
        k = str(int(data.copies[b]))
        by_count.setdefault(k, {"images_planted": 0, "prompts": 0, "attacked": 0, "extracted": 0})
        by_count[k]["images_planted"] += 1
    for row in prompts.itertuples(index=False):
        k = str(int(row.planted_copies))
        entry = by_count.setdefault(k, {"images_planted": 0, "prompts": 0, "attacked": 0, "extracted": 0})
        entry["prompts"] += 1
        entry["attacked"] += row.prompt_id in attacked
        entry["extracted"] += row.prompt_id in extracted
    by_count = dict(sorted(by_count.items(), key=lambda kv: int(kv[0])))
    heavy = [b for b in prompts["prompt_id"] if data.copies[b] >= 50]
    return {
        "extracted_by_duplicate_count": by_count,
        "precision": (len(correct) / len(extracted)) if extracted else None,
        "recall_at_50plus": (sum(b in extracted for b in heavy) / len(heavy)) if heavy else None,
        "extractions": len(extracted),
        # extracted unique images whose candidate is not within delta of the image: false
        "false_extractions_of_unique_images": sorted(b for b in extracted - correct if data.copies[b] == 1),
    }


@dataclass
class DemoResult:
    """A finished ``memscan demo``.

    Attributes
    ----------
    out : the demo directory (``data/``, ``prompts.csv``, ``run/``, ``full_budget/``, ``summary.json``)
    run : the audit run ``out/run``
    summary : what ``summary.json`` holds (extraction by planted copy count, precision, recall,
        thresholds, timings, the report's path)
    rows : (label, value) pairs of the headline figures, as the report and the CLI show them
    """

    out: Path
    run: AuditResult
    summary: dict
    rows: list[tuple[str, str]]

    @property
    def report(self) -> Path:
        return Path(self.summary["report"])


def run_demo(
    out: str | Path = "runs/demo",
    *,
    samples_per_prompt: int | None = None,
    quick: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> DemoResult:
    """Run the demo end to end; the summary is also written to ``OUT/summary.json``."""
    if samples_per_prompt is not None and samples_per_prompt < 2:
        raise InputError(
            f"--samples-per-prompt {samples_per_prompt} must be ≥ 2", "e.g. --samples-per-prompt 40 (or leave it out)"
        )
    check_out_folder(out)  # a file in the way: refused before any work
    t0 = time.perf_counter()
    out = Path(out)
    if (out / "run" / "manifest.json").exists():
        raise MemscanError(f"{out} already holds a demo run", "remove it or pass another --out")
    mdir = model_dir()
    if not (mdir / "unet" / "diffusion_pytorch_model.safetensors").exists():
        raise MemscanError(
            f"the demo model is missing from {mdir}", "reinstall memscan, or train it: memscan demo train"
        )
    settings = demo_settings(quick, samples_per_prompt)

    # 1. data
    data = build_demo_data()
    write_demo_data(data, out / "data")
    t_data = time.perf_counter()
    # 2. candidates
    prompts = candidate_prompts(data, settings["unique_prompts"], settings["min_count"])
    prompts.to_csv(out / "prompts.csv", index=False)
    t_cand = time.perf_counter()
    # 3. the audit: triage → adaptive extraction down the ranking within the budget; controls
    gen = load_unet_generator(str(mdir), device=device, batch_size=min(settings["samples"], 128))
    common = {"grid": 4, "min_clique": 10, "delta": 0.15, "seed": 0, "shard_size": 8, "device": device}
    common["batch_size"] = min(settings["samples"], 128)
    rounds = {"first_round": min(settings["first_round"], settings["samples"]), "round_size": settings["round_size"]}
    config = default_extract_config(settings["samples"], **common, **rounds)
    controls = prompts.loc[prompts["planted_copies"] == 1, "prompt_id"].tolist()
    result = audit(
        gen,
        out / "data" / "train",
        out / "run",
        prompts=out / "prompts.csv",
        config=config,
        budget=AuditBudget(share=settings["budget_share"]),
        controls=controls,
        progress=progress,
    )
    t_ext = time.perf_counter()
    # 4. the brute force it is compared with: every candidate × the full budget
    full = extract(
        gen,
        out / "prompts.csv",
        out / "data" / "train",
        out / "full_budget",
        ExtractConfig(samples_per_prompt=settings["samples"], **common),
        progress=progress,
    )
    t_full = time.perf_counter()
    # 5. score and report
    shape = tuple(result.manifest["output_shape"])
    summary = score(out / "run", data, prompts, config.delta, shape)
    summary["thresholds"] = {
        "alpha": config.alpha,
        "min_clique": config.min_clique,
        "delta": config.delta,
        "grid": config.grid,
        "duplicate_tau": DUPLICATE_TAU,
    }
    summary["samples_per_prompt"] = config.samples_per_prompt
    found_full = set(full.extracted["prompt_id"])
    m = result.manifest
    summary["evaluations_spent"] = int(m["evaluations_total"])
    summary["evaluations_full_budget"] = int(m["evaluations_full_budget"])
    summary["found_of_full_budget"] = (
        len(found_full & set(result.extracted["prompt_id"])) / len(found_full) if found_full else None
    )
    summary["full_budget_extractions"] = len(found_full)
    summary["audit"] = {
        "budget": m["budget"],
        "stages": {
            k: {"prompts_kept": v["prompts_kept"], "evaluations": v["evaluations"]} for k, v in m["stages"].items()
        },
        "controls": controls,
        "first_round": config.first_round,
        "round_size": config.round_size,
    }
    summary["prompts"] = len(prompts)
    summary["quick"] = quick
    summary["model"] = json.loads((mdir / "memscan.json").read_text())["training"]["recipe"]
    rows = [
        (f"{k} copies", f"{v['extracted']}/{v['prompts']} prompts extracted ({v['attacked']} attacked)")
        for k, v in summary["extracted_by_duplicate_count"].items()
    ]
    rows += [("precision", _fmt(summary["precision"])), ("recall at ≥ 50 copies", _fmt(summary["recall_at_50plus"]))]
    spent, brute = summary["evaluations_spent"], summary["evaluations_full_budget"]
    rows += [
        ("UNet evaluations", f"{spent:,} of the full budget's {brute:,} ({spent / brute:.1%})"),
        (
            "found of full budget",
            f"{len(found_full & set(result.extracted['prompt_id']))}/{len(found_full)} extractions"
            + (f" ({summary['found_of_full_budget']:.0%})" if found_full else ""),
        ),
    ]
    report = build_report(out / "run", extra_summary=dict(rows))
    t_end = time.perf_counter()
    summary["timings_s"] = {
        "data": round(t_data - t0, 2),
        "candidates": round(t_cand - t_data, 2),
        "audit": round(t_ext - t_cand, 2),
        "full_budget": round(t_full - t_ext, 2),
        "report": round(t_end - t_full, 2),
        "total": round(t_end - t0, 2),
    }
    summary["report"] = str(report)
    atomic_write_json(out / "summary.json", summary)
    return DemoResult(out, result, summary, rows)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


#: Files or folders whose presence in ``--out`` means it already holds a demo model (or checkpoints).
MODEL_MARKERS = ("model_index.json", "memscan.json", "unet")


def train_model(out: str | Path, *, steps: int | None = None, device: str = "cpu", overwrite: bool = False) -> dict:
    """Retrain the demo model with the recorded recipe (``memscan demo train``). A bad ``steps``,
    an ``out`` that is a file or already holds a model (unless ``overwrite``) are refused before
    any training."""
    check_train_steps(steps, example="3000")
    check_device(device)
    check_model_out(out, MODEL_MARKERS, overwrite=overwrite)
    from memscan.demo.train import TrainConfig, train_demo_model

    cfg = TrainConfig() if steps is None else TrainConfig(steps=steps)
    return train_demo_model(build_demo_data(), out, cfg, device=device)
