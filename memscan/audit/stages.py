"""The audit's stages, each with the standalone command's own library functions and tables.

1. **candidates** — the prompts: ``--prompts`` as given, or the training set's captions ranked by
   near-duplicate count (:func:`memscan.data.duplicates.select_candidates`, ``memscan candidates``);
   writes ``candidates.csv`` (+ its ``.duplicates.parquet``/``.pairs.parquet``/``.candidates.json``)
   and ``candidates.parquet``.
2. **triage** — :func:`memscan.triage.worker.triage_stage` over shards of the candidates (the
   shards of ``memscan triage``), then ``scores.parquet`` (:func:`memscan.triage.run.scores_table`)
   and the ranking; or, for a model the scores cannot apply to, the candidates' order.
3. **extract** — the adaptive extraction of ``memscan extract --adaptive``
   (:func:`memscan.extraction.worker.extraction_stage`) down the ranking, round by round, until
   the budget is spent (:mod:`memscan.audit.budget`).
4. **verify** — the rounds' shards merged into ``prompts.parquet``, ``detections.parquet`` and
   ``extractions.parquet`` (each candidate verified against the training set in its shard, as in
   ``memscan extract``), the matched training images saved.

Every stage's shards are committed in the audit's own run store (one numbering across stages);
a finished stage leaves ``stages/<name>.json``, so a resumed audit skips it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from memscan.audit.budget import prompt_cap, round_size
from memscan.data.duplicates import DuplicateConfig, select_candidates
from memscan.data.training import list_source
from memscan.errors import InputError
from memscan.extraction.config import ExtractConfig
from memscan.extraction.pipeline import save_train_matches
from memscan.extraction.shard import stops
from memscan.extraction.worker import extraction_stage
from memscan.runners.shards import run_shards
from memscan.store import Run, atomic_write_json, write_table
from memscan.triage.run import prompt_table, scores_table, select_ranked
from memscan.triage.scores import TriageConfig
from memscan.triage.worker import describe_triage_worker, shard_prompts, triage_stage

STAGES = ("candidates", "triage", "extract", "verify")
PROMPT_COLUMNS = ["prompt_id", "prompt", "train_id", "duplicate_count"]


# ---- stage markers --------------------------------------------------------------------------
def marker_path(run: Run, stage: str) -> Path:
    return run.root / "stages" / f"{stage}.json"


def clear_markers(run: Run, stages=STAGES) -> list[str]:
    """Remove the markers of ``stages`` (``stages/<name>.json``, the files :func:`write_marker`
    writes) and nothing else: the ``stages`` folder and any other file in it are kept (``--out``
    may be a folder of the user's). Returns the names removed."""
    removed = []
    for stage in stages:
        path = marker_path(run, stage)
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    if removed:
        run.store.log(f"audit: removed stage marker(s) of an earlier unfinished start: {', '.join(removed)}")
    return removed


def read_marker(run: Run, stage: str) -> dict | None:
    """The record of a finished stage (None while it is not finished)."""
    import json

    path = marker_path(run, stage)
    return json.loads(path.read_text()) if path.exists() else None


def write_marker(run: Run, stage: str, record: dict) -> dict:
    """Mark ``stage`` finished with its ``record`` (prompts kept, evaluations, …)."""
    path = marker_path(run, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    run.store.log(f"audit: stage {stage} done — {record}")
    return record


# ---- 1. candidates --------------------------------------------------------------------------
def candidates_stage(
    run: Run, train, prompts, duplicates: DuplicateConfig, top: int, min_count: int, progress: bool, listing=None
) -> tuple[pd.DataFrame, dict]:
    """The candidate prompts (``--prompts``, or the captions of the most duplicated images);
    ``listing``: ``train`` already listed (:func:`~memscan.data.training.list_source`). Only a
    resumed run reuses a finished stage: a marker in a new run's folder was left by a start that
    was refused before its manifest (with other inputs, perhaps), and is written anew."""
    done = read_marker(run, "candidates") if run.resuming else None
    if done is not None:
        return pd.read_parquet(run.root / "candidates.parquet"), done
    if prompts is not None:
        df, info = prompt_table(prompts)
        record = {"source": str(info.get("source", prompts)), "from": "prompts"}
    else:
        listing = listing if listing is not None else list_source(train)
        if listing.entries and not any(str(e.caption or "").strip() for e in listing.entries):
            raise InputError(
                f"the training set {train} has no captions, and no --prompts were given",
                "pass --prompts FILE (one prompt a line, or CSV/Parquet with prompt_id, prompt), or add captions",
            )
        res = select_candidates(
            train, run.root / "candidates.csv", top, duplicates, min_count=min_count, progress=progress, overwrite=True
        )
        df = res.prompts
        if df.empty:
            raise InputError(
                f"no duplicate cluster of {train} reaches --min-count {min_count}, so there is no candidate prompt",
                "lower --min-count (1 takes every image), or pass --prompts",
            )
        empty = df["prompt"].astype(str).str.strip() == ""
        df = df[~empty].reset_index(drop=True)
        if df.empty:
            raise InputError(
                f"none of the {int(empty.sum())} candidate images of {train} has a caption",
                "pass --prompts, or add captions to the most duplicated images",
            )
        record = {"source": str(train), "from": "duplicates", "without_caption": int(empty.sum())}
    df = df.reset_index(drop=True)
    df["duplicate_count"] = pd.to_numeric(df["duplicate_count"], errors="coerce").astype("Int64")
    if df["prompt_id"].astype(str).duplicated().any():
        raise InputError("the prompts repeat a prompt_id", "give every prompt its own prompt_id")
    write_table(df, run.root / "candidates.parquet")
    return df, write_marker(run, "candidates", {**record, "prompts_kept": len(df), "evaluations": 0})


# ---- 2. triage ------------------------------------------------------------------------------
def triage_shards(df: pd.DataFrame, config: TriageConfig, shard_size: int) -> dict[int, tuple]:
    """The triage shards (as ``memscan triage`` cuts them), numbered from 0."""
    per = shard_prompts(shard_size, config)
    ids, texts = df["prompt_id"].astype(str).tolist(), df["prompt"].astype(str).tolist()
    return {s: (ids[s * per : (s + 1) * per], texts[s * per : (s + 1) * per]) for s in range(math.ceil(len(df) / per))}


def triage_stage_run(
    run: Run,
    pool,
    df: pd.DataFrame,
    config: TriageConfig,
    shard_size: int,
    score: str,
    progress: bool,
    planned: int | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Score every candidate (shards 0…T−1), write ``scores.parquet``; returns the ranking.

    The evaluations are the triage module's count for the model a triage worker loaded
    (:func:`memscan.triage.worker.describe_triage_worker`: its guidance, negative prompt and the
    asked scores); ``planned`` is what the budget was checked with, which they must equal."""
    shards = triage_shards(df, config, shard_size)
    done = read_marker(run, "triage")
    if done is None:
        loaded = pool.call(describe_triage_worker)["scores"]
        per_prompt = int(loaded["unet_evaluations_per_prompt"])
        if planned is not None and per_prompt != planned:
            raise RuntimeError(f"triage counts {per_prompt} UNet evaluations a prompt, the audit planned {planned}")
        run_shards(
            run,
            pool,
            triage_stage,
            shards,
            weights={s: len(a[0]) for s, a in shards.items()},
            label="triage",
            unit="prompts",
            progress=progress,
        )
        parts = [run.store.read_shard(s, "scores") for s in range(len(shards))]
        table = scores_table(df, pd.concat(parts, ignore_index=True), config, per_prompt)
        write_table(table, run.root / "scores.parquet")
        done = write_marker(
            run,
            "triage",
            {
                "score": score,
                "prompts_kept": len(df),
                "evaluations": per_prompt * len(df),
                "unet_evaluations_per_prompt": per_prompt,
                "unet_evaluations_by_score": loaded["unet_evaluations_by_score"],
                "config": {k: v for k, v in config.to_dict().items() if k != "device"},
                "shards": len(shards),
            },
        )
    table = pd.read_parquet(run.root / "scores.parquet")
    return rank_by_score(df, table, score), done


def rank_by_score(df: pd.DataFrame, scores: pd.DataFrame, score: str) -> pd.DataFrame:
    """The candidates in the order of :func:`memscan.triage.run.select_ranked` (highest first)."""
    order = select_ranked(scores, score)["prompt_id"].astype(str).tolist()
    return df.set_index(df["prompt_id"].astype(str)).loc[order].reset_index(drop=True)


def skip_triage(run: Run, df: pd.DataFrame, reason: str) -> tuple[pd.DataFrame, dict]:
    """No triage score applies: keep the candidates' order (the adaptive first round screens)."""
    done = read_marker(run, "triage")
    if done is None:
        done = write_marker(
            run,
            "triage",
            {
                "skipped": True,
                "reason": reason,
                "fallback": "candidates' order; the adaptive first round screens every prompt",
                "prompts_kept": len(df),
                "evaluations": 0,
                "shards": 0,
            },
        )
    return df, done


# ---- 3. extract (adaptive, round by round) ----------------------------------------------------
def budgeted_extraction_stage(
    worker, prompts: pd.DataFrame, training, allowance: int, per_image: int, progress=None
) -> tuple[dict[str, pd.DataFrame], dict]:
    """:func:`memscan.extraction.worker.extraction_stage` within ``allowance`` model evaluations:
    the prompts go one by one, in ranking order, each capped at the adaptive round end the
    allowance left still pays after one first round is kept for each later prompt
    (:func:`memscan.audit.budget.prompt_cap`). A prompt's generations up to its cap are those of
    the uncapped attack (same seeds, same rounds). The record's ``capped`` names the prompts the
    cap cut: stopped at their cap while the adaptive rule would have continued them."""
    from dataclasses import replace

    from memscan.extraction.shard import run_shard

    config = worker.config
    rounds = config.rounds()
    left, parts, capped = int(allowance), [], []
    meta = {"prompts": len(prompts), "generation_s": 0.0, "detection_s": 0.0, "verification_s": 0.0}
    for j in range(len(prompts)):
        cap = prompt_cap(left, len(prompts) - j - 1, rounds, per_image)
        cfg = config if cap >= config.samples_per_prompt else replace(config, samples_per_prompt=cap)
        tables, t = run_shard(worker.generator, prompts.iloc[j : j + 1], cfg, training, worker.store, progress=progress)
        made = int(tables["detections"]["n_samples"].sum())
        left -= made * per_image
        if cap < config.samples_per_prompt:
            if made == cap and _would_continue(tables["detections"].iloc[0], config):
                capped.append(str(prompts["prompt_id"].iloc[j]))
            if progress is not None:
                progress(config.samples_per_prompt - cap)  # the generations the cap did not spend
        parts.append(tables)
        for k, v in (
            ("generation_s", t.generation_s),
            ("detection_s", t.detection_s),
            ("verification_s", t.verification_s),
        ):
            meta[k] += v
    tables = {name: pd.concat([t[name] for t in parts], ignore_index=True) for name in ("detections", "extractions")}
    tables["detections"]["duplicate_count"] = tables["detections"]["duplicate_count"].astype("Int64")
    meta = {k: round(v, 3) if isinstance(v, float) else v for k, v in meta.items()}
    return tables, {**meta, "allowance": int(allowance), "capped": capped}


def _would_continue(row, config: ExtractConfig) -> bool:
    """Whether the adaptive rule (:func:`memscan.extraction.shard.stops`) continues a prompt
    after its generations so far (its detection row): the budget, not the rule, cut it."""
    return not stops(row["clique_size"], row["detected"], config)


def extract_rounds(
    run: Run,
    pool,
    ranked: pd.DataFrame,
    training,
    config: ExtractConfig,
    *,
    first_shard: int,
    per_image: int,
    probe_cost: int,
    spent_before: int,
    budget: int | None,
    top: int | None,
    round_prompts: int,
    controls: list[str],
    progress: bool,
) -> dict:
    """Attack the ranking round by round until the budget (or ``top``) is spent; controls last.

    The budget is a hard cap (:mod:`memscan.audit.budget`): the first rounds of the control
    prompts not attacked yet are kept from the start; a round whose prompts could cost more than
    the budget left goes shard by shard and prompt by prompt in ranking order, each prompt capped
    (:func:`budgeted_extraction_stage`); a round the budget left pays in full runs its shards at
    once, as ``memscan extract`` does. Rounds and caps are planned from the committed shards
    alone (what each earlier round and shard spent), so a resumed audit plans the same ones.
    Returns the stage record (``rounds``: prompts, shards, generations, evaluations and the
    prompts the budget ``capped``; ``budget_left``, never negative).
    """
    done = read_marker(run, "extract")
    if done is not None:
        return done
    ranking = ranked if top is None else ranked.head(top)
    first_cost = config.rounds()[0] * per_image
    full_cost = config.samples_per_prompt * per_image
    spent, pos, shard, rounds = spent_before + probe_cost, 0, first_shard, []
    attacked: set[str] = set()
    args: dict[int, tuple] = {s: () for s in range(first_shard)}

    def kept_for_controls() -> int:
        """The first rounds kept for the controls not attacked yet (none without a budget)."""
        return 0 if budget is None else first_cost * len({c for c in controls if c not in attacked})

    while True:
        # 1. the next round: the next prompts of the ranking the budget left pays a first round
        #    for (the controls' first rounds kept); when none, the controls not attacked yet
        k = round_size(budget, spent, len(ranking) - pos, first_cost, round_prompts, kept_for_controls())
        if k > 0:
            batch, why = ranking.iloc[pos : pos + k], "ranking"
            pos += k
        else:
            rest = [c for c in controls if c not in attacked]
            if not rest:
                break
            batch, why = ranked[ranked["prompt_id"].astype(str).isin(rest)], "controls"
        batch = batch[~batch["prompt_id"].astype(str).isin(attacked)].reset_index(drop=True)
        if batch.empty:
            continue
        attacked.update(batch["prompt_id"].astype(str))
        # 2. its shards (the extraction's shard size), numbered after every earlier shard
        size = config.shard_size
        ids = list(range(shard, shard + math.ceil(len(batch) / size)))
        prompts_of = {
            s: batch.iloc[j * size : (j + 1) * size][PROMPT_COLUMNS].reset_index(drop=True) for j, s in enumerate(ids)
        }
        allowance = None if budget is None else budget - spent - kept_for_controls()
        weights = {s: len(prompts_of[s]) * config.samples_per_prompt for s in ids}
        label = f"extract round {len(rounds) + 1}"
        if allowance is None or allowance >= len(batch) * full_cost:
            # the budget left pays every prompt's full course: the shards at once, uncapped
            for s in ids:
                args[s] = (prompts_of[s], training)
            run_shards(
                run, pool, extraction_stage, args, weights=weights, label=label, unit="images", progress=progress
            )
            capped = []
        else:
            # shard by shard: each one's allowance is what the earlier shards of the round left,
            # less a first round for every prompt of the later shards
            capped, used = [], 0
            for j, s in enumerate(ids):
                later = sum(len(prompts_of[t]) for t in ids[j + 1 :])
                args[s] = (prompts_of[s], training, allowance - used - later * first_cost, per_image)
                run_shards(run, pool, budgeted_extraction_stage, args, weights={s: weights[s]}, label=label,
                           unit="images", progress=progress)  # fmt: skip
                used += per_image * int(run.store.read_shard(s, "detections")["n_samples"].sum())
                capped += _capped(run, s)
        # 3. what it spent, from the committed tables
        gens = sum(int(run.store.read_shard(s, "detections")["n_samples"].sum()) for s in ids)
        spent += gens * per_image
        rounds.append(
            {
                "prompts": len(batch),
                "why": why,
                "shards": ids,
                "generations": gens,
                "evaluations": gens * per_image,
                "allowance": allowance,
                "capped": capped,
            }
        )
        shard = ids[-1] + 1
        cut = f", {len(capped)} cut by the budget" if capped else ""
        run.store.log(f"audit: round {len(rounds)} ({why}) — {len(batch)} prompts, {gens} generations{cut}")
    if budget is not None and spent > budget:  # the caps make this impossible: never a silent overrun
        raise RuntimeError(f"audit spent {spent} model evaluations of a budget of {budget}")
    return write_marker(
        run,
        "extract",
        {
            "prompts_kept": sum(r["prompts"] for r in rounds),
            "evaluations": probe_cost + sum(r["evaluations"] for r in rounds),
            "probe_evaluations": probe_cost,
            "generations": sum(r["generations"] for r in rounds),
            "rounds": rounds,
            "shards": [s for r in rounds for s in r["shards"]],
            "capped": [c for r in rounds for c in r["capped"]],
            "budget_left": None if budget is None else budget - spent,
        },
    )


def _capped(run: Run, shard: int) -> list[str]:
    """The prompts a budgeted shard's cap cut (its completion record)."""
    return list(run.store.shard_record(shard).get("capped", []))


# ---- 4. verify ------------------------------------------------------------------------------
def verify_stage(run: Run, extracted: dict, ranked: pd.DataFrame, training) -> tuple[dict, dict]:
    """Merge the extraction shards into the tables ``memscan extract`` writes; save matches."""
    shards = extracted["shards"]
    tables = {}
    for t in ("detections", "extractions"):
        parts = [run.store.read_shard(s, t) for s in shards]
        parts = [p for p in parts if len(p)]
        empty = run.store.read_shard(shards[0], t).iloc[0:0] if shards else pd.DataFrame()
        tables[t] = pd.concat(parts, ignore_index=True) if parts else empty
        write_table(tables[t], run.root / f"{t}.parquet")
    order = tables["detections"]["prompt_id"].astype(str).tolist() if len(tables["detections"]) else []
    prompts = ranked.set_index(ranked["prompt_id"].astype(str)).loc[order].reset_index(drop=True)
    write_table(prompts, run.root / "prompts.parquet")
    if training is not None:
        save_train_matches(run.store, tables["extractions"], training)
    ext = tables["extractions"]
    top = ext[(ext["rank"] == 1) & ext["extracted"]] if len(ext) else ext
    record = read_marker(run, "verify") or write_marker(
        run,
        "verify",
        {
            "prompts_kept": int(len(top)),
            "evaluations": 0,
            "candidates_verified": int(tables["detections"]["detected"].sum()) if len(order) else 0,
        },
    )
    return tables, record
