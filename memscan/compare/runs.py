"""Read one finished run into what ``memscan compare`` puts side by side.

Every measured run kind gives one summary row (:class:`RunSummary`): its counts under the
manifest's own names (``prompts``, ``detections``, ``extractions``, …), rates, the MIA metrics
under the column names of ``metrics.parquet`` (``auc``, ``tpr@1%fpr`` with ``_lo``/``_hi``
bootstrap bounds; docs/mia.md), memorization-score distribution summaries; plus one number,
``memorization``, that the scaling fit uses (named in ``memorization_measure``):

=====================  ==========================================================
kind                   ``memorization``
=====================  ==========================================================
extract                ``extraction_rate`` = extractions / prompts (per prompt)
extract-unconditional  ``extracted_generation_rate`` = extracted generations / samples (per
                       generation: no prompts)
mia, inpaint, lm-mia   ``auc`` of the best attack (highest TPR at 1 % FPR, then AUC)
memscore               ``memscore_mean``
lm-extractable         ``extractable_rate`` at the longest prefix
lm-exposure            ``exposure_mean``
lm-extract             ``confirmed_rate`` = confirmed / kept samples
=====================  ==========================================================

Extraction rate by duplicate count: for ``extract``, the prompts' ``duplicate_count``; for
``lm-extractable`` run with ``--index``, each sequence's ``window_count`` (occurrences of its
prefix + suffix in the corpus) at the longest prefix, under the same column names (``prompts``:
sequences prompted, ``extractions``: extractable ones).

Items (``items.parquet``, the overlap between runs) and their type (:data:`ITEM_TYPES`): the
training images extracted (``extract``, ``extract-unconditional``: training ids), the extractable
training sequences (``lm-extractable``: ``train_id@offset``), and the memorized training text of
``lm-extract`` — every distinct :data:`TEXT_WINDOW`-character window of the confirmed samples'
matched corpus text (``match_text``), so two runs that regurgitate one passage from different
starting points, or from different copies of it in the corpus, share the windows of their
overlap, and Jaccard is over memorized text. Runs are paired only with runs of the same item type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.errors import InputError
from memscan.store import RunStore

#: The run kinds ``memscan compare`` reads.
COMPARABLE_KINDS = (
    "extract",
    "extract-unconditional",
    "mia",
    "inpaint",
    "demo-mia",
    "memscore",
    "lm-extractable",
    "lm-exposure",
    "lm-mia",
    "lm-extract",
)
MIA_KINDS = ("mia", "inpaint", "demo-mia", "lm-mia")
#: The attributes ``--by`` accepts.
BY_CHOICES = ("params", "step", "train_size", "label")
#: MIA metric columns copied from ``metrics.parquet`` (names of docs/mia.md).
MIA_COLUMNS = ("auc", "balanced_accuracy", "tpr@1%fpr", "tpr@0.1%fpr")
#: Characters of the windows of memorized text that are ``lm-extract``'s items.
TEXT_WINDOW = 32
#: What each kind's items are (runs of one item type are paired in the overlap, others are not).
ITEM_TYPES = {
    "extract": "training image id",
    "extract-unconditional": "training image id",
    "lm-extractable": "training sequence (train_id@offset)",
    "lm-extract": f"memorized text ({TEXT_WINDOW}-character windows)",
}


@dataclass
class RunSummary:
    """One run as ``memscan compare`` sees it.

    Attributes
    ----------
    row : the run's row of ``compare.parquet`` (``run``, ``kind``, ``label``, attributes, counts,
        rates, metrics, ``memorization`` and ``memorization_measure``)
    items : training items the run memorized (``item``: a training id, a sequence id, a window
        of memorized text), for the overlap between runs; empty for kinds that do not name items
    item_type : what the items are (:data:`ITEM_TYPES`; None for kinds that name none)
    by_duplicates : extraction rate by duplicate count (``duplicate_count``, ``prompts``,
        ``extractions``, ``extraction_rate``); empty when the prompts carry no counts
    scores : per-example memorization / MIA score (``id``, ``score``, ``is_member``) for the
        outlier analysis; empty for kinds without per-example scores
    """

    row: dict
    items: pd.DataFrame = field(default_factory=lambda: pd.DataFrame({"item": pd.Series([], dtype=str)}))
    by_duplicates: pd.DataFrame = field(default_factory=pd.DataFrame)
    scores: pd.DataFrame = field(default_factory=pd.DataFrame)
    item_type: str | None = None


def read_manifest(path: str | Path) -> dict:
    """The manifest of a finished run of a comparable kind (one clear error otherwise)."""
    store = RunStore(path)
    if not store.exists():
        raise InputError(
            f"{path} is not a memscan run (no manifest.json)", "pass the --out directory of a finished run"
        )
    m = store.read_manifest()
    kind = m.get("kind") or m.get("command")
    if kind not in COMPARABLE_KINDS:
        raise InputError(
            f"run {path} is of kind {kind!r}, which memscan compare does not read",
            f"pass runs of kinds {', '.join(COMPARABLE_KINDS)}",
        )
    if m.get("status") != "complete":
        raise InputError(f"run {path} is not complete", f"finish it first (memscan {kind} ... --resume)")
    return m


def attributes(manifest: dict) -> dict:
    """``params``, ``step`` (from the manifest's model record) and ``train_size``."""
    model = manifest.get("model") or {}
    counts = manifest.get("counts") or {}
    train_size = (manifest.get("training_set") or {}).get("images")
    if train_size is None:
        train_size = counts.get("members", counts.get("examples"))
    return {
        "model": model.get("id"),
        "params": model.get("parameters"),
        "step": model.get("training_step"),
        "train_size": train_size,
    }


def summarize_run(path: str | Path, label: str | None = None) -> RunSummary:
    """Read the run in ``path`` (see the module for what each kind gives)."""
    root = Path(path)
    m = read_manifest(root)
    kind = m.get("kind") or m.get("command")
    row = {"run": str(root), "kind": kind, "label": label if label is not None else root.name, **attributes(m)}
    reader = _READERS[kind]
    summary = reader(root, m, row)
    summary.item_type = ITEM_TYPES.get(kind)
    return summary


def _table(root: Path, name: str) -> pd.DataFrame:
    p = root / f"{name}.parquet"
    if not p.exists():
        raise InputError(f"run {root} has no {name}.parquet", "regenerate the run (it is incomplete or damaged)")
    return pd.read_parquet(p)


def _ratio(a, b) -> float:
    return float(a) / float(b) if b else math.nan


def training_sha256(manifest: dict) -> str | None:
    """The run's ``training_set_sha256`` (an ``extract --index`` run's: its index's, in the
    ``training_set`` record); None where it records none."""
    return manifest.get("training_set_sha256") or (manifest.get("training_set") or {}).get("training_set_sha256")


def _extract(root: Path, m: dict, row: dict) -> RunSummary:
    counts = m.get("counts", {})
    row["training_set_sha256"] = training_sha256(m)
    for key in ("prompts", "samples", "detections", "extractions"):
        row[key] = counts.get(key)
    row["detection_rate"] = _ratio(row["detections"], row["prompts"])
    row["extraction_rate"] = _ratio(row["extractions"], row["prompts"])
    row["memorization"], row["memorization_measure"] = row["extraction_rate"], "extraction_rate"
    ext = _table(root, "extractions")
    top = ext[(ext["rank"] == 1) & ext["extracted"].astype(bool)] if len(ext) else ext
    items = pd.DataFrame({"item": sorted(set(top["train_id"].astype(str)))}) if len(top) else None
    prompts = _table(root, "prompts")
    by_dup = pd.DataFrame()
    if "duplicate_count" in prompts and prompts["duplicate_count"].notna().any():
        hit = set(top["prompt_id"].astype(str)) if len(top) else set()
        p = prompts.dropna(subset=["duplicate_count"]).copy()
        p["extracted"] = p["prompt_id"].astype(str).isin(hit)
        g = p.groupby("duplicate_count", sort=True)["extracted"].agg(["size", "sum"]).reset_index()
        by_dup = pd.DataFrame(
            {
                "duplicate_count": g["duplicate_count"].astype("int64"),
                "prompts": g["size"].astype("int64"),
                "extractions": g["sum"].astype("int64"),
                "extraction_rate": g["sum"] / g["size"],
            }
        )
    s = RunSummary(row, by_duplicates=by_dup)
    if items is not None:
        s.items = items
    return s


def _unconditional(root: Path, m: dict, row: dict) -> RunSummary:
    counts = m.get("counts", {})
    row["training_set_sha256"] = training_sha256(m)
    for key in ("samples", "extracted_generations", "extracted_training_images"):
        row[key] = counts.get(key)
    # per generation (extract's extraction_rate is per prompt): its own name
    row["extracted_generation_rate"] = _ratio(row["extracted_generations"], row["samples"])
    row["memorization"], row["memorization_measure"] = row["extracted_generation_rate"], "extracted_generation_rate"
    ext = _table(root, "extractions")
    s = RunSummary(row)
    if len(ext):
        s.items = pd.DataFrame({"item": sorted(set(ext["train_id"].astype(str)))})
    return s


def _mia(root: Path, m: dict, row: dict) -> RunSummary:
    from memscan.mia.tables import best_results, scores_of

    counts = m.get("counts", {})
    for key in ("examples", "members"):
        row[key] = counts.get(key)
    metrics = _table(root, "metrics")
    scores = _table(root, "scores")
    examples = _table(root, "examples")
    # the blind baseline of Das et al. (a text-only classifier, lm-mia) measures no model
    best = {k: v for k, v in best_results(metrics).items() if not str(k).startswith("blind")}
    if not best:
        raise InputError(f"run {root} has no attack results in metrics.parquet", "rerun the MIA with an attack")
    # 1. the best result over every statistic (highest TPR at 1 % FPR, then AUC)
    cands = []
    for stat, (attack, t) in best.items():
        sel = (metrics["statistic"] == stat) & (metrics["attack"] == attack)
        sel &= metrics["timestep"].isna() if t is None else (metrics["timestep"] == t)
        cands.append(metrics[sel].iloc[0])
    r = sorted(cands, key=lambda x: (-float(x["tpr@1%fpr"]), -float(x["auc"])))[0]
    row["statistic"], row["attack"] = str(r["statistic"]), str(r["attack"])
    row["timestep"] = None if pd.isna(r["timestep"]) else int(r["timestep"])
    for k in MIA_COLUMNS:
        row[k] = float(r[k])
        for side in ("_lo", "_hi"):
            if f"{k}{side}" in r.index:
                row[f"{k}{side}"] = float(r[f"{k}{side}"])
    row["memorization"], row["memorization_measure"] = row["auc"], "auc"
    # 2. its per-example scores (higher = more likely a member)
    sc = scores_of(scores, row["statistic"], row["attack"], row["timestep"])
    ex = examples.sort_values("index")
    ids = ex["id"].astype(str).to_numpy() if "id" in ex else ex["index"].astype(str).to_numpy()
    per = pd.DataFrame({"id": ids, "score": sc, "is_member": ex["is_member"].astype(bool).to_numpy()})
    return RunSummary(row, scores=per)


def _memscore(root: Path, m: dict, row: dict) -> RunSummary:
    t = _table(root, "memscore")
    s = t["score"].to_numpy(np.float64)
    s = s[np.isfinite(s)]
    row["examples"] = int(len(t))
    row["memscore_mean"] = float(s.mean()) if len(s) else math.nan
    row["memscore_median"] = float(np.median(s)) if len(s) else math.nan
    row["memscore_p90"] = float(np.quantile(s, 0.9)) if len(s) else math.nan
    row["memscore_p99"] = float(np.quantile(s, 0.99)) if len(s) else math.nan
    row["memscore_max"] = float(s.max()) if len(s) else math.nan
    row["memorization"], row["memorization_measure"] = row["memscore_mean"], "memscore_mean"
    per = pd.DataFrame({"id": t["id"].astype(str), "score": t["score"].astype(float), "is_member": True})
    return RunSummary(row, scores=per)


def _lm_extractable(root: Path, m: dict, row: dict) -> RunSummary:
    t = _table(root, "sequences")
    k = int(t["prefix_len"].max())
    at = t[t["prefix_len"] == k]
    row["sequences"] = int(len(at))
    row["prefix_len"] = k
    row["extractable"] = int(at["extractable"].sum())
    row["extractable_rate"] = _ratio(row["extractable"], row["sequences"])
    if "pythia_score" in at:
        row["pythia_score_mean"] = float(at["pythia_score"].mean())
    if "exact_memorization" in at:
        row["exact_memorization_mean"] = float(at["exact_memorization"].mean())
    row["memorization"], row["memorization_measure"] = row["extractable_rate"], "extractable_rate"
    hit = at[at["extractable"].astype(bool)]
    items = hit["train_id"].astype(str) + "@" + hit["offset"].astype(str)
    by_dup = pd.DataFrame()
    if "window_count" in at and at["window_count"].notna().any():
        p = at.dropna(subset=["window_count"])
        g = p.groupby("window_count", sort=True)["extractable"].agg(["size", "sum"]).reset_index()
        by_dup = pd.DataFrame(
            {
                "duplicate_count": g["window_count"].astype("int64"),
                "prompts": g["size"].astype("int64"),
                "extractions": g["sum"].astype("int64"),
                "extraction_rate": g["sum"] / g["size"],
            }
        )
    return RunSummary(row, items=pd.DataFrame({"item": sorted(set(items))}), by_duplicates=by_dup)


def _lm_extract(root: Path, m: dict, row: dict) -> RunSummary:
    counts = m.get("counts", {})
    for key in ("generated", "kept", "duplicates_removed", "confirmed"):
        row[key] = counts.get(key)
    row["confirmed_rate"] = _ratio(row["confirmed"], row["kept"])
    prec = _table(root, "precision")
    for r in prec.to_dict("records"):
        if r["metric"] != "all samples":
            row["top"] = int(r["N"])
            row[f"precision_{r['metric']}"] = float(r["precision"])
    row["memorization"], row["memorization_measure"] = row["confirmed_rate"], "confirmed_rate"
    samples = _table(root, "samples")
    hit = samples[samples["confirmed"].astype(bool)] if len(samples) else samples
    return RunSummary(row, items=pd.DataFrame({"item": sorted(text_windows(hit["match_text"]))}))


def text_windows(texts, width: int = TEXT_WINDOW) -> set[str]:
    """Every distinct ``width``-character window of the texts (a shorter text is one window):
    ``lm-extract``'s items, the memorized training text by content.

    Examples
    --------
    >>> sorted(text_windows(["abcde", "cdefg"], 4))
    ['abcd', 'bcde', 'cdef', 'defg']
    >>> sorted(text_windows(["ab"], 4))
    ['ab']
    """
    out: set[str] = set()
    for t in texts:
        t = "" if t is None else str(t)
        if 0 < len(t) <= width:
            out.add(t)
        out.update(t[i : i + width] for i in range(len(t) - width + 1))
    return out


def _lm_exposure(root: Path, m: dict, row: dict) -> RunSummary:
    t = _table(root, "exposures")
    e = t["exposure"].to_numpy(np.float64)
    row["canaries"] = int(len(t))
    row["exposure_mean"] = float(e.mean()) if len(e) else math.nan
    row["exposure_max"] = float(e.max()) if len(e) else math.nan
    row["memorization"], row["memorization_measure"] = row["exposure_mean"], "exposure_mean"
    return RunSummary(row)


_READERS = {
    "extract": _extract,
    "extract-unconditional": _unconditional,
    "mia": _mia,
    "inpaint": _mia,
    "demo-mia": _mia,
    "lm-mia": _mia,
    "memscore": _memscore,
    "lm-extractable": _lm_extractable,
    "lm-exposure": _lm_exposure,
    "lm-extract": _lm_extract,
}
