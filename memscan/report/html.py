"""``report.html`` of a ``memscan extract`` run, from its tables alone.

The shared parts (template environment, CSP, data URIs, run context) are in
:mod:`memscan.report.base`; :func:`memscan.report.registry.build_report` picks this page for
``extract`` runs.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from memscan.extraction.config import ExtractConfig
from memscan.report.base import data_uri, environment, open_complete_run, png_base64, run_context, write_page
from memscan.report.plots import (
    adaptive_budget_curve,
    adaptive_budget_plot,
    detection_distance_plot,
    duplication_plot,
    extraction_rate_by_duplicates,
)
from memscan.store import safe_name


def _index_verification_rows(manifest: dict) -> dict:
    """Summary rows of a run verified through a training index (``extract --index``)."""
    v = manifest.get("verification") or {}
    if v.get("via") != "index":
        return {}
    r = manifest.get("retrieval") or {}
    return {
        "verification": f"through the {v['index_type']} index {v['index']}: each candidate against its "
        f"{v['retrieve']} retrieved training images (exact tiled ℓ2 among them)",
        "k-eidetic counts": f"counted among the up to {v['retrieve']} retrieved training images only (each "
        "candidate's retrieved column: an approximate index can return fewer): a lower bound, bounded by the "
        "retrieval"
        + (f"; {r['fewer_than_k']} candidate(s) got fewer than {v['retrieve']}" if r.get("fewer_than_k") else ""),
        "retrieved training images": f"{r.get('retrieved', 0)} retrieved, {r.get('decoded', 0)} decoded, "
        f"{r.get('skipped_count', 0)} unreadable (named in run.log)",
        "candidates not verified": (
            f"{r['unverified_count']} (none of their retrieved training images could be read; named in run.log)"
            if "unverified_count" in r
            else "not recorded (a run made before memscan counted them)"
        ),
    }


def build_extraction_report(
    run: str | Path,
    out: str | Path | None = None,
    extra_summary: dict | None = None,
    kind: str = "extract",
    sections: list[tuple[str, dict]] | None = None,
    extra_title: str = "Demo ground truth",
) -> Path:
    """Write ``report.html`` for a finished ``extract`` run; returns its path.

    Parameters
    ----------
    run : run directory
    out : output path (default ``RUN/report.html``)
    extra_summary : optional key → value rows shown under the summary, headed ``extra_title``
        (the demo's ground truth)
    kind : the run kind whose tables these are (``audit`` runs hold the same tables)
    sections : ``(heading, key → value rows)`` shown under the summary, before ``extra_summary``
        (an audit's stages and budget)
    extra_title : the heading of ``extra_summary``
    """
    store, manifest = open_complete_run(run, kind)
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
                "candidate": data_uri(root, d["candidate_image"]),
                "clique": data_uri(root, d["clique_image"]),
                "train": data_uri(root, f"images/train/{safe_name(r.train_id)}.png"),
                "train_id": r.train_id,
                "train_caption": getattr(r, "train_caption", ""),
                "tiled_l2": float(r.tiled_l2),
                "clique_size": int(r.clique_size),
                "mean_clique_distance": float(r.mean_clique_distance),
                "method": d["clique_method"],
                "eidetic_k": int(r.eidetic_k),
                # a prompt without an expected image (None, or NaN as pandas reads a null): no row
                "expected": None if pd.isna(r.expected_train_id) else r.expected_train_id,
                "matches": None
                if pd.isna(r.expected_train_id) or pd.isna(r.matches_expected)
                else bool(r.matches_expected),
                "duplicate_count": None if pd.isna(d["duplicate_count"]) else int(d["duplicate_count"]),
                "w": w,
            }
        )
    rates = extraction_rate_by_duplicates(det, ext)
    budget = None
    share_label = "share of these prompts' full budget of generations"
    if cfg.get("adaptive"):
        rounds = ExtractConfig.from_dict(cfg).rounds()
        curve = adaptive_budget_curve(det, ext, rounds)
        budget = {
            "png": png_base64(adaptive_budget_plot({"this run": curve}, xlabel=share_label)),
            "rows": curve.iloc[1:].to_dict("records"),
            "spent": int(det["n_samples"].sum()),
            "full": len(det) * rounds[-1],
            "stopped_early": int((det["n_samples"] < rounds[-1]).sum()),
            "prompts": len(det),
        }
    sections = list(sections or [])
    index_rows = _index_verification_rows(manifest)
    if index_rows:
        sections.append(("Verification through the training index", index_rows))
    if extra_summary:
        sections.append((extra_title, dict(extra_summary)))
    html = (
        environment()
        .get_template("report.html.j2")
        .render(
            **run_context(root, manifest),
            sections=[(title, list(rows.items())) for title, rows in sections],
            is_audit=kind == "audit",
            detection_png=png_base64(detection_distance_plot(det, cfg["alpha"], cfg["min_clique"])),
            duplication_png=png_base64(duplication_plot(rates)) if len(rates) else None,
            duplication_rows=rates.to_dict("records"),
            budget=budget,
            cards=cards,
            others=others,
        )
    )
    return write_page(html, root, out)
