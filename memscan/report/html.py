"""``report.html`` from a run's tables alone.

The page is one self-contained file: images and plots are embedded as ``data:`` URIs, so it opens
offline and can be mailed around. Every string from the run (prompts, captions, ids, file names)
is untrusted web text and goes through Jinja2 autoescaping; a Content-Security-Policy forbids
scripts altogether.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from memscan.errors import MemscanError
from memscan.extraction.config import ExtractConfig
from memscan.report.plots import (
    adaptive_budget_curve,
    adaptive_budget_plot,
    detection_distance_plot,
    duplication_plot,
    extraction_rate_by_duplicates,
)
from memscan.store import RunStore, safe_name


def _data_uri(root: Path, rel: str | None) -> str | None:
    """Embed a PNG that lives inside the run directory (paths leaving it are ignored)."""
    if not rel:
        return None
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def build_report(run: str | Path, out: str | Path | None = None, extra_summary: dict | None = None) -> Path:
    """Write ``report.html`` for a finished run; returns its path.

    Parameters
    ----------
    run : run directory
    out : output path (default ``RUN/report.html``)
    extra_summary : optional key → value rows shown under the summary (the demo's ground truth)
    """

    store = RunStore(run)
    manifest = store.read_manifest(expect=("extract", "extract-unconditional"))
    if manifest.get("status") != "complete":
        raise MemscanError(
            f"run {run} is not complete (status {manifest.get('status')!r})", "finish it with --resume first"
        )
    if manifest.get("command") == "extract-unconditional":
        from memscan.report.unconditional import build_unconditional_report

        return build_unconditional_report(store, manifest, out)
    det, ext = store.table("detections"), store.table("extractions")
    root = store.root
    cfg = manifest["config"]
    top = ext[ext["rank"] == 1] if len(ext) else ext
    by_prompt = det.set_index("prompt_id")
    shape = manifest.get("output_shape", [64, 64, 3])
    w = max(128, int(shape[1]))

    cards, others = [], []
    for r in top.sort_values(["extracted", "mean_clique_distance"], ascending=[False, True]).itertuples(index=False):
        d = by_prompt.loc[r.prompt_id]
        if not r.extracted:
            others.append(
                {
                    "prompt": d["prompt"],
                    "clique_size": int(r.clique_size),
                    "train_id": r.train_id,
                    "tiled_l2": float(r.tiled_l2),
                }
            )
            continue
        cards.append(
            {
                "prompt_id": r.prompt_id,
                "prompt": d["prompt"],
                "candidate": _data_uri(root, d["candidate_image"]),
                "clique": _data_uri(root, d["clique_image"]),
                "train": _data_uri(root, f"images/train/{safe_name(r.train_id)}.png"),
                "train_id": r.train_id,
                "train_caption": getattr(r, "train_caption", ""),
                "tiled_l2": float(r.tiled_l2),
                "clique_size": int(r.clique_size),
                "mean_clique_distance": float(r.mean_clique_distance),
                "method": d["clique_method"],
                "eidetic_k": int(r.eidetic_k),
                "expected": r.expected_train_id,
                "matches": bool(r.matches_expected) if r.matches_expected is not None else None,
                "duplicate_count": None if pd.isna(d["duplicate_count"]) else int(d["duplicate_count"]),
                "w": w,
            }
        )
    rates = extraction_rate_by_duplicates(det, ext)
    budget = None
    if cfg.get("adaptive"):
        rounds = ExtractConfig.from_dict(cfg).rounds()
        curve = adaptive_budget_curve(det, ext, rounds)
        budget = {
            "png": base64.b64encode(adaptive_budget_plot({"this run": curve})).decode(),
            "rows": curve.iloc[1:].to_dict("records"),
            "spent": int(det["n_samples"].sum()),
            "full": len(det) * rounds[-1],
            "stopped_early": int((det["n_samples"] < rounds[-1]).sum()),
            "prompts": len(det),
        }
    html = (
        _environment()
        .get_template("report.html.j2")
        .render(
            **run_context(root, manifest),
            extra_summary=list((extra_summary or {}).items()),
            detection_png=base64.b64encode(detection_distance_plot(det, cfg["alpha"], cfg["min_clique"])).decode(),
            duplication_png=base64.b64encode(duplication_plot(rates)).decode() if len(rates) else None,
            duplication_rows=rates.to_dict("records"),
            budget=budget,
            cards=cards,
            others=others,
        )
    )
    path = Path(out) if out else root / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


def run_context(root: Path, manifest: dict) -> dict:
    """What every run page shows at its top: name, place, time, version, counts, config,
    training set and its skipped files, throughput."""
    import importlib.metadata as md

    training = manifest.get("training_set", {})
    return {
        "title": root.name,
        "run_dir": str(root),
        "made": time.strftime("%Y-%m-%d %H:%M"),
        "version": _version(md),
        "counts": manifest.get("counts", {}),
        "config": manifest["config"],
        "training": training,
        "skipped": training.get("skipped_files", []),
        "throughput": manifest.get("throughput"),
    }


def _environment() -> Environment:
    """The report templates, autoescaped: every string from a run is untrusted web text."""
    return Environment(
        loader=PackageLoader("memscan.report", "templates"), autoescape=select_autoescape(["html", "j2"])
    )


def _version(md) -> str:
    try:
        return md.version("memscan")
    except md.PackageNotFoundError:
        return "dev"
