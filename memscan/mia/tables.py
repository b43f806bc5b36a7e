"""The results tables of a membership-inference run (``metrics.parquet``, ``scores.parquet``)
and the lookups the report and the summary make in them."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from memscan.mia.metrics import TABLE_COLUMNS

__all__ = ["best_results", "metrics_rows", "score_rows", "scores_of", "top_indices"]


def metrics_rows(statistic: str, results: list[tuple[str, Any]]) -> list[dict]:
    rows = []
    for label, r in results:
        roc = r.roc
        row = {"statistic": statistic, "attack": label, "timestep": r.timestep}
        row.update(auc=roc.auc, balanced_accuracy=roc.balanced_accuracy)
        row["tpr@1%fpr"] = roc.tpr_at_fpr(0.01)
        row["tpr@0.1%fpr"] = roc.tpr_at_fpr(0.001)
        for k in TABLE_COLUMNS[2:]:
            lo, hi = roc.ci.get(k, (np.nan, np.nan))
            row[f"{k}_lo"], row[f"{k}_hi"] = lo, hi
        row["n_members"], row["n_nonmembers"] = roc.n_members, roc.n_nonmembers
        row["params"] = json.dumps(dict(r.params), sort_keys=True)
        rows.append(row)
    return rows


def score_rows(statistic: str, results: list[tuple[str, Any]]) -> pd.DataFrame:
    parts = []
    for label, r in results:
        n = r.scores.size
        parts.append(
            pd.DataFrame(
                {
                    "statistic": statistic,
                    "attack": label,
                    "timestep": pd.array([r.timestep] * n, dtype="Int64"),
                    "index": np.arange(n),
                    "score": r.scores,
                }
            )
        )
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def best_results(metrics: pd.DataFrame) -> dict[str, tuple[str, Any]]:
    """Per statistic: the (attack, timestep) with the highest TPR at 1 % FPR, then AUC."""
    best = {}
    for stat, g in metrics.groupby("statistic", sort=False):
        g = g.sort_values(["tpr@1%fpr", "auc"], ascending=False, kind="stable")
        r = g.iloc[0]
        best[stat] = (r["attack"], None if pd.isna(r["timestep"]) else int(r["timestep"]))
    return best


def scores_of(scores: pd.DataFrame, stat: str, attack: str, t: int | None) -> np.ndarray:
    sel = (scores["statistic"] == stat) & (scores["attack"] == attack)
    sel &= scores["timestep"].isna() if t is None else (scores["timestep"] == t)
    return scores[sel].sort_values("index")["score"].to_numpy()


def top_indices(scores_df: pd.DataFrame, metrics: pd.DataFrame, examples: pd.DataFrame, k: int) -> set[int]:
    """Examples the report shows: the k highest-scored members and non-members of each
    statistic's best result."""
    out: set[int] = set()
    for stat, (attack, t) in best_results(metrics).items():
        sc = scores_of(scores_df, stat, attack, t)
        mem = examples["is_member"].to_numpy()
        order = np.argsort(-sc, kind="stable")
        out.update(int(i) for i in [j for j in order if mem[j]][:k])
        out.update(int(i) for i in [j for j in order if not mem[j]][:k])
    return out
