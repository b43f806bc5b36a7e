"""Which training items several runs memorized, and how much two runs share (Jaccard)."""

from __future__ import annotations

import pandas as pd

from memscan.compare.runs import ITEM_TYPES


def overlap_table(items: dict[str, set[str]], types: dict[str, str | None] | None = None) -> pd.DataFrame:
    """One row per ordered pair of runs whose items are of one type: ``run_a``, ``run_b``,
    ``item_type``, ``n_a``, ``n_b``, ``both``, ``union`` and ``jaccard`` = |A ∩ B| / |A ∪ B|
    (NaN when both are empty).

    ``types`` (run → item type, None for a run that names no items; default: one type for all)
    keeps runs whose items are different things (training image ids, LM sequences, memorized
    text) out of each other's pairs: a Jaccard between them would count nothing shared.

    Examples
    --------
    >>> t = overlap_table({"a": {"x", "y"}, "b": {"y", "z", "w"}})
    >>> r = t[(t.run_a == "a") & (t.run_b == "b")].iloc[0]
    >>> int(r.both), int(r.union), float(r.jaccard)
    (1, 4, 0.25)
    >>> len(overlap_table({"a": {"x"}, "b": {"x"}}, {"a": "image", "b": "text"}))  # only (a, a), (b, b)
    2
    """
    types = types if types is not None else {r: "" for r in items}
    rows = []
    names = [r for r in items if types.get(r) is not None]
    for a in names:
        for b in names:
            if types[a] != types[b]:
                continue
            inter = len(items[a] & items[b])
            union = len(items[a] | items[b])
            rows.append(
                {
                    "run_a": a,
                    "run_b": b,
                    "item_type": types[a],
                    "n_a": len(items[a]),
                    "n_b": len(items[b]),
                    "both": inter,
                    "union": union,
                    "jaccard": inter / union if union else float("nan"),
                }
            )
    cols = ["run_a", "run_b", "item_type", "n_a", "n_b", "both", "union", "jaccard"]
    return pd.DataFrame(rows, columns=cols)


def membership_matrix(items: dict[str, set[str]]) -> pd.DataFrame:
    """Item × run table of booleans (which run memorized which item): the index (named
    ``item``) holds the items, sorted by how many runs memorized them, then by name; one column
    per key of ``items``, in order — any string, none reserved (a run called ``item`` or
    ``runs`` is a column like any other).

    Examples
    --------
    >>> m = membership_matrix({"item": {"x"}, "runs": {"x", "y"}})
    >>> m.index.tolist(), m["item"].tolist(), m["runs"].tolist()
    (['x', 'y'], [True, False], [True, True])
    """
    every = sorted(set().union(*items.values())) if items else []
    runs = list(items)
    flags = [[i in items[r] for r in runs] for i in every]
    df = pd.DataFrame(flags, index=pd.Index(every, name="item", dtype=object), columns=pd.Index(runs, dtype=object))
    if len(df):
        counts = df.sum(axis=1).to_numpy()
        order = sorted(range(len(every)), key=lambda k: (-counts[k], every[k]))
        df = df.iloc[order]
    return df.astype(bool)


def item_sets(items: pd.DataFrame, runs, kinds, training=None) -> tuple[dict[str, set], dict[str, str | None]]:
    """Run → the items it memorized (``items.parquet``) and run → their type (that of the run's
    kind, :data:`memscan.compare.runs.ITEM_TYPES`; None for a kind that names no items).

    ``training`` (run → … in the order of ``runs``: each run's ``training_set_sha256``, None where
    it has none) keeps runs of different kinds with one item type — ``extract`` and
    ``extract-unconditional`` both name training images by id — in one type only where they
    share one training set: ids of two other training sets are no shared images, so the type of
    each is then qualified by its kind (``training image id (extract)``) and they are not paired.
    Runs of one kind stay one type (their data were compared: a mismatch names the difference).
    Without ``training`` (a ``compare.parquet`` written before it held the hashes) the types are
    the kinds'. ``items.parquet`` keeps each kind's own type; the qualified one is the overlap's.

    Examples
    --------
    >>> items = pd.DataFrame({"run": ["a", "b"], "item": ["t1", "t1"]})
    >>> item_sets(items, ["a", "b"], ["extract", "extract-unconditional"], ["h1", "h1"])[1]["b"]
    'training image id'
    >>> item_sets(items, ["a", "b"], ["extract", "extract-unconditional"], ["h1", "h2"])[1]["b"]
    'training image id (extract-unconditional)'
    """
    sets, types, kind_of = {}, {}, {}
    for r, kind in zip(runs, kinds):
        sets[r] = set(items.loc[items["run"] == r, "item"])
        types[r] = ITEM_TYPES.get(kind)
        kind_of[r] = kind
    if training is None:  # a comparison written before the hashes were in its table: as it was
        return sets, types
    sha = {}
    for r, h in zip(runs, training):
        sha[r] = None if h is None or (isinstance(h, float) and h != h) else str(h)
    for t in {t for t in types.values() if t is not None}:
        group = [r for r in types if types[r] == t]
        if len({kind_of[r] for r in group}) > 1:
            hashes = {sha[r] for r in group}
            if len(hashes) != 1 or None in hashes:
                for r in group:
                    types[r] = f"{t} ({kind_of[r]})"
    return sets, types
