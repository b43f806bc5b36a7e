"""``report.html`` for a ``memscan lm mia`` run, from its tables alone.

The page puts the blind baseline (Das et al. 2024) beside the membership scores: first a warning
box when the text alone separates members from non-members (AUC ≥ 0.6), then the metrics table
with bootstrap intervals (the blind baseline's row among them), the ROC curves on log-log axes
(:func:`memscan.mia.metrics.plot_roc`, as the diffusion MIA report) with the blind baseline's
curve, the scores of members and non-members, and the highest-scored examples of each class with
their text (escaped: it is the user's data) and every score.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.errors import MemscanError
from memscan.lm.blind import BLIND_AUC_WARNING, BLIND_WARNING_TEXT
from memscan.lm.membership import SCORE_DESCRIPTIONS
from memscan.lm.mia_run import BLIND_STATISTIC
from memscan.mia.metrics import plot_roc, roc_metrics
from memscan.mia.tables import scores_of
from memscan.report.base import environment, open_complete_run, write_page
from memscan.report.mia import outlier_context

__all__ = ["build_lm_mia_report"]

#: Characters of an example's text shown in the examples tables.
TEXT_CHARS = 400

_BLIND_LABEL = "blind baseline (text only, no model)"


def build_lm_mia_report(run: str | Path, out: str | Path | None = None, top: int = 10) -> Path:
    """Write ``report.html`` for a finished ``lm-mia`` run; returns its path.

    ``top``: highest-scored members and non-members listed (under the best score).
    """
    store, manifest = open_complete_run(run, "lm-mia")
    root = store.root
    try:
        examples, metrics, scores = store.table("examples"), store.table("metrics"), store.table("scores")
        stats = store.table("statistics")
    except MemscanError as exc:
        raise MemscanError(exc.message, "the lm-mia run is damaged: rerun `memscan lm mia`") from None
    y = examples["is_member"].to_numpy(dtype=bool)
    blind = manifest.get("blind_baseline") or {}
    model_rows = metrics[metrics["statistic"] != BLIND_STATISTIC]
    best = _best(model_rows)

    curves = {}
    for r in metrics.to_dict("records"):
        label = _BLIND_LABEL if r["statistic"] == BLIND_STATISTIC else r["statistic"]
        curves[label] = roc_metrics(scores_of(scores, r["statistic"], r["attack"], None), y)
    roc_path = root / "images" / "roc_lm_mia.png"
    plot_roc(curves, roc_path, title="membership scores and the blind baseline")

    table = stats.merge(examples[["index", "id", "is_member", "text"]], on="index").sort_values("index")
    score_names = [n for n in manifest.get("scores", []) if n in set(metrics["statistic"])]
    html = (
        environment()
        .get_template("lm_mia_report.html.j2")
        .render(
            title=root.name,
            run_dir=str(root),
            made=pd.Timestamp.now().strftime("%Y-%m-%d %H:%M"),
            version=(manifest.get("versions") or {}).get("memscan") or "dev",
            manifest_rows=_manifest_rows(manifest),
            outliers=outlier_context(root),
            blind=blind,
            blind_threshold=BLIND_AUC_WARNING,
            blind_text=BLIND_WARNING_TEXT,
            rows=[_metric_row(r, best) for r in metrics.to_dict("records")],
            roc=base64.b64encode(roc_path.read_bytes()).decode(),
            hist=base64.b64encode(_hist_grid(table, score_names, y)).decode() if score_names else None,
            best=best,
            best_description=SCORE_DESCRIPTIONS.get(best, best) if best else None,
            score_names=score_names,
            top_members=_examples(table, best, True, top, score_names),
            top_nonmembers=_examples(table, best, False, top, score_names),
            n_members=int(y.sum()),
            n_nonmembers=int((~y).sum()),
            skipped=manifest.get("skipped_scores") or [],
            descriptions=SCORE_DESCRIPTIONS,
        )
    )
    return write_page(html, root, out)


def _best(metrics: pd.DataFrame) -> str | None:
    """The score with the highest TPR at 1 % FPR, then AUC."""
    if metrics.empty:
        return None
    g = metrics.sort_values(["tpr@1%fpr", "auc"], ascending=False, kind="stable")
    return str(g.iloc[0]["statistic"])


def _ci(row: dict, k: str) -> str:
    lo, hi = row.get(f"{k}_lo"), row.get(f"{k}_hi")
    if lo is None or pd.isna(lo):
        return ""
    return f"[{lo:.3f}, {hi:.3f}]"


def _metric_row(r: dict, best: str | None) -> dict:
    return {
        "statistic": r["statistic"],
        "attack": r["attack"],
        "description": _BLIND_LABEL
        if r["statistic"] == BLIND_STATISTIC
        else SCORE_DESCRIPTIONS.get(r["statistic"], ""),
        "auc": r["auc"],
        "auc_ci": _ci(r, "auc"),
        "bacc": r["balanced_accuracy"],
        "tpr1": r["tpr@1%fpr"],
        "tpr1_ci": _ci(r, "tpr@1%fpr"),
        "tpr01": r["tpr@0.1%fpr"],
        "blind": r["statistic"] == BLIND_STATISTIC,
        "best": r["statistic"] == best,
    }


def _examples(table: pd.DataFrame, best: str | None, member: bool, top: int, names: list[str]) -> list[dict]:
    if best is None:
        return []
    sel = table[table["is_member"] == member].sort_values([best, "index"], ascending=[False, True], kind="stable")
    out = []
    for r in sel.head(top).to_dict("records"):
        text = str(r["text"])
        out.append(
            {
                "id": str(r["id"]),
                "text": text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + "…",
                "n_tokens": int(r["n_tokens"]),
                "truncated": bool(r["truncated"]),
                "scores": [(n, float(r[n])) for n in names],
            }
        )
    return out


def _hist_grid(table: pd.DataFrame, names: list[str], y: np.ndarray) -> bytes:
    """One histogram per score, members against non-members."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig = Figure(figsize=(4 * cols, 2.8 * rows))
    FigureCanvasAgg(fig)
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        v = table[name].to_numpy(dtype=float)
        finite = v[np.isfinite(v)]
        bins = np.histogram_bin_edges(finite, bins=min(30, max(8, finite.size // 6))) if finite.size else 10
        ax.hist(v[~y & np.isfinite(v)], bins=bins, alpha=0.6, label="non-members")
        ax.hist(v[y & np.isfinite(v)], bins=bins, alpha=0.6, label="members")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _manifest_rows(m: dict) -> list[tuple[str, str]]:
    rows = [("kind", m.get("kind")), ("started", m.get("started")), ("finished", m.get("finished"))]
    for key in ("model", "reference_model"):
        rec = m.get(key)
        if rec:
            rows.append((key, json.dumps({k: rec.get(k) for k in ("id", "parameters", "training_step")}, default=str)))
            desc = rec.get("describe") or {}
            tok = desc.get("tokenizer") if isinstance(desc, dict) else None
            if tok:
                rows.append((f"{key} tokenizer", json.dumps(tok, default=str)))
    for key in ("config", "counts", "throughput", "runner"):
        if m.get(key) is not None:
            rows.append((key, json.dumps(m[key], default=str)))
    for role, info in (m.get("sources") or {}).items():
        rows.append((role, json.dumps(info, default=str)))
    return [(str(k), "" if v is None else str(v)) for k, v in rows]
