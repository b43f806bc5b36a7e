"""The HTML report of a membership-inference run (``mia``, ``inpaint``, ``memscore``,
``demo-mia``) and its plots, made from the run's tables alone."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan.errors import MemscanError
from memscan.mia.attack_labels import STATISTICS
from memscan.mia.metrics import plot_roc, roc_metrics
from memscan.mia.tables import best_results, scores_of
from memscan.report.base import environment, write_page
from memscan.store import RunStore, safe_name

__all__ = ["MIA_KINDS", "build_mia_report"]

#: Run kinds this report renders.
MIA_KINDS = ("mia", "inpaint", "memscore", "demo-mia")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _hist_png(scores: np.ndarray, is_member: np.ndarray, title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bins = np.histogram_bin_edges(scores, bins=min(40, max(10, scores.size // 8)))
    ax.hist(scores[~is_member], bins=bins, alpha=0.6, label=f"OUT (non-members, {int((~is_member).sum())})")
    ax.hist(scores[is_member], bins=bins, alpha=0.6, label=f"IN (members, {int(is_member.sum())})")
    ax.set_xlabel("membership score (higher = member)")
    ax.set_ylabel("examples")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _sweep_png(metrics: pd.DataFrame) -> bytes | None:
    m = metrics[(metrics["statistic"] == "diffusion_loss") & metrics["timestep"].notna()]
    if m["timestep"].nunique() < 2:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2))
    FigureCanvasAgg(fig)
    a, b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for attack, g in m.groupby("attack", sort=False):
        g = g.sort_values("timestep")
        a.plot(g["timestep"], g["auc"], marker="o", label=attack)
        b.plot(g["timestep"], g["tpr@1%fpr"], marker="o", label=attack)
    for ax, lab in ((a, "ROC AUC"), (b, "TPR at 1% FPR")):
        ax.set_xscale("log")
        ax.set_xlabel("timestep t")
        ax.set_ylabel(lab)
    b.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _memscore_png(score: np.ndarray, quantiles: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(score, bins=min(50, max(10, score.size // 5)), color="#555")
    for q, v in quantiles.items():
        ax.axvline(v, ls="--", lw=1, c="#c0392b")
        ax.text(v, ax.get_ylim()[1] * 0.9, f" q{float(q):g}", fontsize=8, color="#c0392b")
    ax.set_xlabel("memorization score M (nats)")
    ax.set_ylabel("examples")
    fig.tight_layout()
    return _png(fig)


def _uri(root: Path, rel: str) -> str | None:
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _fmt_ci(row: dict, k: str) -> str:
    lo, hi = row.get(f"{k}_lo"), row.get(f"{k}_hi")
    if lo is None or pd.isna(lo):
        return ""
    return f"[{lo:.3f}, {hi:.3f}]"


def build_mia_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for a finished MIA/inpaint/memscore/demo-mia run from its tables
    alone (Jinja2 with autoescaping, images as ``data:`` URIs, no scripts)."""

    store = RunStore(run)
    manifest = store.read_manifest()
    kind = manifest.get("kind")
    if kind not in MIA_KINDS:
        raise MemscanError(f"{run} is not a membership-inference run (kind {kind!r})", "use `memscan report` for it")
    if manifest.get("status") != "complete":
        raise MemscanError(f"run {run} is not complete", "rerun the command")
    root = store.root
    ctx: dict[str, Any] = {
        "title": root.name,
        "kind": kind,
        "run_dir": str(root),
        "made": time.strftime("%Y-%m-%d %H:%M"),
        "version": manifest.get("versions", {}).get("memscan") or "dev",
        "manifest_rows": _manifest_rows(manifest),
        "skipped": manifest.get("skipped_attacks", []),
        "sections": [],
        "memscore": None,
        "outliers": outlier_context(root),
    }
    if kind == "memscore":
        ctx["memscore"] = _memscore_context(store, manifest)
    else:
        ctx["sections"] = _statistic_sections(store)
    html = environment().get_template("mia_report.html.j2").render(**ctx)
    return write_page(html, root, out)


def _rank_scatter_png(t: pd.DataFrame) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(t["outlier_rank"], t["score_rank"], s=8, alpha=0.6, color="#555")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, c="#c0392b")
    ax.set_xlabel("outlier score rank (k-NN distance)")
    ax.set_ylabel("memorization / membership score rank")
    fig.tight_layout()
    return _png(fig)


def outlier_context(root: Path, shown: int = 5) -> dict | None:
    """Memorization vs outliers, from ``outliers.parquet`` / ``outliers.json`` when the run holds
    them (``memscan report RUN --outliers``, or ``--outliers`` on the run's command): Spearman's ρ
    (recomputed from the table), a rank scatter, and the ``shown`` examples at each end of the
    rank difference, with their thumbnails and captions."""
    from memscan.compare.outliers import analyse

    path = root / "outliers.parquet"
    if not path.exists():
        return None
    t = pd.read_parquet(path)
    meta_path = root / "outliers.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    a = analyse(t["id"], t["score"].to_numpy(float), t["outlier"].to_numpy(float))
    hi, lo = a.most_disagreeing(shown)
    cap = dict(zip(t["id"].astype(str), t["caption"].fillna("").astype(str))) if "caption" in t else {}
    thumb = dict(zip(t["id"].astype(str), t["thumbnail"].fillna("").astype(str))) if "thumbnail" in t else {}

    def rows(d: pd.DataFrame) -> list[dict]:
        return [
            {
                "id": r.id,
                "caption": cap.get(r.id, ""),
                "score": float(r.score),
                "outlier": float(r.outlier),
                "score_rank": float(r.score_rank),
                "outlier_rank": float(r.outlier_rank),
                "img": _uri(root, thumb[r.id]) if thumb.get(r.id) else None,
            }
            for r in d.itertuples(index=False)
        ]

    ok = a.table.dropna(subset=["disagreement"])
    return {
        "n": a.n,
        "spearman": a.spearman,
        "p_value": a.p_value,
        "k": meta.get("k"),
        "space": meta.get("space") or "",
        "reference": meta.get("reference") or "",
        "score": meta.get("score") or "",
        "scatter": base64.b64encode(_rank_scatter_png(ok)).decode() if len(ok) else None,
        "memorized_typical": rows(hi),
        "outlying_not_memorized": rows(lo),
    }


def _memscore_context(store: RunStore, manifest: dict) -> dict:
    """Histogram, quantiles and the most memorized examples of a memscore run."""
    root = store.root
    df = store.table("memscore")
    res = manifest["result"]
    q = {float(k): v for k, v in res["quantiles"].items()}
    top = df.sort_values(["score", "index"], ascending=[False, True], kind="stable").head(16)
    return {
        "hist": base64.b64encode(_memscore_png(df["score"].to_numpy(), q)).decode(),
        "quantiles": [(f"{k:g}", v) for k, v in q.items()],
        "rows": [
            {
                "id": r.id,
                "score": r.score,
                "u": r.u,
                "v": r.v,
                "n_in": r.n_in,
                "n_out": r.n_out,
                "img": _uri(root, f"images/examples/{safe_name(r.id)}.png"),
            }
            for r in top.itertuples(index=False)
        ],
    }


def _statistic_sections(store: RunStore) -> list[dict]:
    """One report section per statistic of an mia/inpaint/demo-mia run."""
    root = store.root
    examples = store.table("examples")
    metrics = store.table("metrics")
    scores = store.table("scores")
    y = examples["is_member"].to_numpy(dtype=bool)
    ids = examples["id"].tolist()
    best = best_results(metrics)
    sweep = _sweep_png(metrics)
    sections = []
    for stat, g in metrics.groupby("statistic", sort=False):
        curves = {}
        for r in g.itertuples(index=False):
            t = None if pd.isna(r.timestep) else int(r.timestep)
            if t != best[stat][1]:  # every attack at the best timestep (the sweep plot has the rest)
                continue
            label = r.attack + ("" if t is None else f" t={t}")
            curves[label] = roc_metrics(scores_of(scores, stat, r.attack, t), y)
        roc_path = root / "images" / f"roc_{stat}.png"
        plot_roc(curves, roc_path, title=STATISTICS.get(stat, stat))
        attack, t = best[stat]
        sc = scores_of(scores, stat, attack, t)
        label = attack + ("" if t is None else f" at t = {t}")
        order = np.argsort(-sc, kind="stable")
        sections.append(
            {
                "statistic": stat,
                "description": STATISTICS.get(stat, stat),
                "rows": _metric_rows(g, attack, t),
                "roc": base64.b64encode(roc_path.read_bytes()).decode(),
                "hist": base64.b64encode(_hist_png(sc, y, f"{stat}: {label}")).decode(),
                "sweep": base64.b64encode(sweep).decode() if (sweep and stat == "diffusion_loss") else None,
                "best_label": label,
                "top_members": _cards(root, ids, sc, order, y, y),
                "top_nonmembers": _cards(root, ids, sc, order, y, ~y),
                "n_members": int(y.sum()),
                "n_nonmembers": int((~y).sum()),
            }
        )
    return sections


def _cards(root: Path, ids: list[str], sc: np.ndarray, order: np.ndarray, y: np.ndarray, sel: np.ndarray) -> list[dict]:
    """The eight highest-scored examples of ``sel``, with their thumbnails and inpaintings."""
    out = []
    for i in [j for j in order if sel[j]][:8]:
        c = {"id": ids[i], "score": float(sc[i]), "member": bool(y[i]), "img": None}
        c["img"] = _uri(root, f"images/examples/{safe_name(ids[i])}.png")
        c["masked"] = _uri(root, f"images/inpaint/{safe_name(ids[i] + '/masked')}.png")
        c["recon"] = _uri(root, f"images/inpaint/{safe_name(ids[i] + '/reconstruction')}.png")
        out.append(c)
    return out


def _metric_rows(g: pd.DataFrame, attack: str, t: int | None) -> list[dict]:
    """The results table of one statistic; the best (attack, timestep) is marked."""
    rows = []
    for row in g.sort_values(["timestep", "attack"], kind="stable").to_dict("records"):
        rt = None if pd.isna(row["timestep"]) else int(row["timestep"])
        rows.append(
            {
                "attack": row["attack"],
                "timestep": "" if rt is None else rt,
                "auc": row["auc"],
                "bacc": row["balanced_accuracy"],
                "tpr1": row["tpr@1%fpr"],
                "tpr01": row["tpr@0.1%fpr"],
                "auc_ci": _fmt_ci(row, "auc"),
                "tpr1_ci": _fmt_ci(row, "tpr@1%fpr"),
                "best": row["attack"] == attack and rt == t,
            }
        )
    return rows


def _manifest_rows(m: dict) -> list[tuple[str, str]]:
    rows = [("kind", m.get("kind")), ("started", m.get("started")), ("finished", m.get("finished"))]
    for k, v in (m.get("sources") or {}).items():
        if k != "target_config" and v is not None:
            rows.append((k, str(v)))
    for sec in ("loss", "inpaint", "memscore", "counts", "best_timestep", "timings", "demo"):
        if m.get(sec) is not None:
            rows.append((sec, json.dumps(m[sec], default=str)))
    return [(str(k), "" if v is None else str(v)) for k, v in rows]
