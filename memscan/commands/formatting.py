"""What the membership-inference commands print, formatted from their result dataclasses.

Shared by :mod:`memscan.commands.mia` and :mod:`memscan.commands.demo` (commands never import
each other; this module is not a command).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from memscan.mia.results import MemscoreResult, MiaResult
from memscan.mia.tables import best_results


def summary_text(kind: str, metrics: pd.DataFrame, out: Path, extra: list[str] | None = None) -> str:
    """``memscan KIND: OUT``, the best attack of each statistic, ``extra`` lines, the report."""
    lines = [f"memscan {kind}: {out}"]
    for stat, (attack, t) in best_results(metrics).items():
        r = metrics[(metrics["statistic"] == stat) & (metrics["attack"] == attack)]
        r = r[r["timestep"].isna()] if t is None else r[r["timestep"] == t]
        r = r.iloc[0]
        at = "" if t is None else f" at t = {t}"
        lines.append(
            f"  {stat}: best {attack}{at}: AUC {r['auc']:.3f}, TPR@1%FPR {r['tpr@1%fpr']:.3f}, "
            f"TPR@0.1%FPR {r['tpr@0.1%fpr']:.3f}, balanced accuracy {r['balanced_accuracy']:.3f}"
        )
    lines += extra or []
    lines.append(f"  report: {out / 'report.html'}")
    return "\n".join(lines)


def _outside_pool(res: MiaResult) -> list[str]:
    outside = res.manifest["sources"].get("not_in_shadow_pool")
    if not outside:
        return []
    return [f"  {outside['count']} example(s) of --data outside the shadow pool: not attacked"]


def mia_summary(res: MiaResult, out: Path | None = None) -> str:
    """What ``memscan mia`` prints."""
    best = res.manifest["best_timestep"]
    extra = [f"  best timestep ({best['by']}): t = {best['timestep']}"] + _outside_pool(res)
    extra += [
        f"  skipped {k['attack']} at t = {k['timestep']}: {k['reason']}" for k in res.manifest["skipped_attacks"][:3]
    ]
    return summary_text("mia", res.metrics, Path(out) if out is not None else res.run_dir, extra)


def inpaint_summary(res: MiaResult, out: Path | None = None) -> str:
    """What ``memscan inpaint`` prints."""
    return summary_text("inpaint", res.metrics, Path(out) if out is not None else res.run_dir, _outside_pool(res))


def memscore_summary(res: MemscoreResult) -> str:
    """What ``memscan memscore`` prints."""
    m, ids = res.result, res.table["id"].tolist()
    q = ", ".join(f"q{float(k):g} = {v:.3f}" for k, v in m.quantiles.items())
    best = int(res.shown[0]) if len(res.shown) else 0
    folds, repeats = res.manifest["memscore"]["folds"], res.manifest["memscore"]["repeats"]
    return (
        f"memscan memscore: {len(ids)} examples, {folds} folds × {repeats} repeats; {q}; "
        f"most memorized: {ids[best]} (M = {m.score[best]:.3f})\n  report: {res.report}"
    )


def demo_mia_summary(res) -> str:
    """What ``memscan demo-mia`` prints (``res``: a :class:`memscan.demo.mia.DemoMiaResult`)."""
    st, best = res.settings, res.manifest["best_timestep"]
    extra = [
        f"  {st.n_models} models × {st.steps} steps trained in {res.training_s:.0f} s; "
        f"total {res.total_s:.0f} s wall, {res.cpu_s:.0f} s CPU",
        f"  best timestep ({best['by']}): t = {best['timestep']}",
    ]
    return summary_text("demo-mia", res.run.metrics, res.out / "run", extra)


def compare_summary(res) -> str:
    """What `memscan compare` (and a checkpoint sweep) prints: one line per run, one per fit."""
    from memscan.store import escape_controls as esc  # a label (a run folder's name) is untrusted: one line each

    t = res.table
    lines = [f"{len(t)} runs compared → {res.run_dir / 'compare.parquet'}, {res.report}"]
    for _, r in t.iterrows():
        flag = f"  [mismatch: {esc(str(r['mismatch']))}]" if r.get("mismatch") else ""
        lines.append(
            f"  {esc(str(r['label']))}: {r['kind']}, {r['memorization_measure']} = {r['memorization']:.4g}{flag}"
        )
    for f in res.fits.itertuples(index=False):
        lines.append(
            f"  fit ({f.kind}): {f.measure} = {f.intercept:.4g} + {f.slope:.4g}·log10({f.by}), "
            f"slope 95% CI [{f.slope_lo:.3g}, {f.slope_hi:.3g}] (n = {f.n})"
        )
    return "\n".join(lines)
