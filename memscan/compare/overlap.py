"""Which training items several runs memorized, and how much two runs share (Jaccard)."""

from __future__ import annotations

import pandas as pd


def overlap_table(items: dict[str, set[str]]) -> pd.DataFrame:
    """One row per ordered pair of runs: ``run_a``, ``run_b``, ``n_a``, ``n_b``, ``both``,
    ``union`` and ``jaccard`` = |A ∩ B| / |A ∪ B| (NaN when both are empty).

    Examples
    --------
    >>> t = overlap_table({"a": {"x", "y"}, "b": {"y", "z", "w"}})
    >>> r = t[(t.run_a == "a") & (t.run_b == "b")].iloc[0]
    >>> int(r.both), int(r.union), float(r.jaccard)
    (1, 4, 0.25)
    """
    rows = []
    names = list(items)
    for a in names:
        for b in names:
            inter = len(items[a] & items[b])
            union = len(items[a] | items[b])
            rows.append(
                {
                    "run_a": a,
                    "run_b": b,
                    "n_a": len(items[a]),
                    "n_b": len(items[b]),
                    "both": inter,
                    "union": union,
                    "jaccard": inter / union if union else float("nan"),
                }
            )
    return pd.DataFrame(rows)


def membership_matrix(items: dict[str, set[str]]) -> pd.DataFrame:
    """Item × run table of booleans (which run memorized which item), items sorted by how many
    runs memorized them, then by name."""
    every = sorted(set().union(*items.values())) if items else []
    df = pd.DataFrame({"item": every})
    for run, s in items.items():
        df[run] = df["item"].isin(s)
    if len(df):
        df["runs"] = df[list(items)].sum(axis=1)
        df = df.sort_values(["runs", "item"], ascending=[False, True], kind="stable").reset_index(drop=True)
    return df
