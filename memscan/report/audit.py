"""``report.html`` of a ``memscan audit`` run: every stage (prompts kept, model evaluations,
what was found) above the extraction page that ``memscan extract`` runs get."""

from __future__ import annotations

from pathlib import Path

from memscan.report.base import open_complete_run
from memscan.report.html import build_extraction_report


def stage_rows(manifest: dict) -> dict:
    """One summary row per stage and one for the total, from the manifest alone."""
    stages = manifest.get("stages", {})
    unit = manifest.get("budget", {}).get("unit", "unet evaluations")
    rows = {}
    for name, rec in stages.items():
        text = f"{rec.get('prompts_kept', 0)} prompts kept, {int(rec.get('evaluations', 0)):,} {unit}"
        if name == "triage" and rec.get("skipped"):
            text += f" — skipped: {rec.get('reason')} ({rec.get('fallback')})"
        elif name == "triage":
            text += f" (score {rec.get('score')})"
        elif name == "extract":
            text += f" in {len(rec.get('rounds', []))} rounds, {rec.get('generations', 0):,} generations"
        elif name == "verify":
            text = f"{rec.get('candidates_verified', 0)} candidates verified, {rec.get('prompts_kept', 0)} extractions"
        rows[f"stage {name}"] = text
    full = manifest.get("evaluations_full_budget")
    total = manifest.get("evaluations_total", 0)
    n = stages.get("candidates", {}).get("prompts_kept")
    spp = (manifest.get("config") or {}).get("samples_per_prompt")
    brute = f"every one of the {n} candidates × {spp} generations" if n is not None and spp else "every candidate"
    share = f": {total / full:.1%} of the brute force's {full:,} ({brute}); triage included" if full else ""
    rows["evaluations total (all stages)"] = f"{total:,} {unit}{share}"
    budget = manifest.get("budget", {})
    rows["budget"] = (
        f"top {budget['top']} prompts" if budget.get("top") else f"{budget.get('evaluations') or 0:,} {unit}"
    )
    left = stages.get("extract", {}).get("budget_left")
    if left is not None:
        rows["budget left"] = f"{left:,} {unit}"
    return rows


def build_audit_report(run: str | Path, out: str | Path | None = None, extra_summary: dict | None = None) -> Path:
    """Write ``report.html`` for a finished ``audit`` run; returns its path.

    Parameters
    ----------
    run : the audit's run directory
    out : output path (default ``RUN/report.html``)
    extra_summary : more key → value rows shown under the stages (the demo's ground truth)
    """
    _, manifest = open_complete_run(run, "audit")
    return build_extraction_report(
        run,
        out,
        extra_summary=extra_summary,
        kind="audit",
        sections=[("Audit: stages and budget", stage_rows(manifest))],
    )
