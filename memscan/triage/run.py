"""``memscan triage``: score every prompt cheaply, write the scores and a ranked prompts file.

A triage run directory holds

- ``scores.parquet`` — one row per prompt: ``wen_score``, ``webster_score``, their ranks (1 =
  most likely memorized), the UNet evaluations spent, and the prompt's ``train_id`` /
  ``duplicate_count`` when the prompts table had them;
- ``prompts.csv`` — the prompts ranked by the chosen score (highest first), cut to ``top`` and/or
  ``min_score``; ``memscan extract --prompts RUN/prompts.csv`` reads it as it is;
- ``manifest.json`` — configuration, model, seeds, versions, counts and the cost per prompt
  next to the full attack's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from memscan.data.prompts import load_prompts
from memscan.errors import InputError, MemscanError
from memscan.store import atomic_write_json, write_table
from memscan.triage.scores import SCORES, TriageConfig, TriageModel, score_prompts

#: Generations and sampler steps of the full attack that triage is compared against
#: (Carlini et al. 2023: 500 generations; Stable Diffusion's default 50 steps, ×2 for guidance).
FULL_ATTACK = {"samples_per_prompt": 500, "num_inference_steps": 50, "evaluations_per_step": 2}


@dataclass
class TriageResult:
    """A finished triage run (the tables are also on disk in ``run_dir``)."""

    run_dir: Path
    scores: pd.DataFrame
    ranked: pd.DataFrame
    manifest: dict


def _prompt_table(prompts) -> tuple[pd.DataFrame, dict]:
    if isinstance(prompts, (list, tuple)):
        df = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(prompts))], "prompt": list(prompts)})
        info = {"source": "<list>"}
    elif isinstance(prompts, pd.DataFrame):
        df, info = prompts.copy(), {"source": "<table>"}
    else:
        df, info = load_prompts(prompts)
    for col in ("train_id", "duplicate_count"):
        if col not in df:
            df[col] = None
    if df.empty:
        raise InputError("no prompts to triage", "pass at least one prompt")
    return df.reset_index(drop=True), info


def select_ranked(scores: pd.DataFrame, score: str = "wen", top: int | None = None, min_score: float | None = None):
    """Prompts sorted by ``score`` (highest first; ties by prompt id), cut to ``top`` / ``min_score``.

    Examples
    --------
    >>> df = pd.DataFrame({"prompt_id": ["a", "b", "c"], "prompt": ["x", "y", "z"],
    ...                    "wen_score": [0.1, 0.9, 0.5], "webster_score": [3.0, 1.0, 2.0]})
    >>> select_ranked(df, "wen", top=2)["prompt_id"].tolist()
    ['b', 'c']
    >>> select_ranked(df, "webster", min_score=2.0)["prompt_id"].tolist()
    ['a', 'c']
    """
    if score not in SCORES:
        raise InputError(f"unknown score {score!r}", f"choose one of {', '.join(SCORES)}")
    if top is not None and top < 1:
        raise InputError(f"top={top}", "keep at least 1 prompt")
    col = f"{score}_score"
    ranked = scores.sort_values([col, "prompt_id"], ascending=[False, True], kind="mergesort")
    if min_score is not None:
        ranked = ranked[ranked[col] >= min_score]
    if top is not None:
        ranked = ranked.head(top)
    return ranked.reset_index(drop=True)


def triage(
    model,
    prompts,
    out: str | Path,
    config: TriageConfig = TriageConfig(),
    *,
    score: str = "wen",
    top: int | None = None,
    min_score: float | None = None,
    progress: bool = True,
) -> TriageResult:
    """Score every prompt (Wen et al. 2024, Webster 2023) and write a triage run directory.

    Parameters
    ----------
    model : a text-to-image pipeline directory or hub id, a loaded diffusers pipeline, or a
        :class:`memscan.generators.text2image.Text2ImageGenerator`
    prompts : prompts file (text, CSV or Parquet, as ``memscan extract`` reads), a list of
        strings, or a table with ``prompt_id``, ``prompt``
    out : the triage run directory (must not hold a triage run already)
    config : :class:`TriageConfig`
    score : which score ranks ``prompts.csv`` (``wen`` or ``webster``)
    top, min_score : keep the ``top`` highest-scoring prompts and/or those scoring ≥ ``min_score``
    """
    config = config.validate()
    out = Path(out)
    if (out / "scores.parquet").exists():
        raise MemscanError(f"{out} already holds a triage run", "choose another --out")
    select_ranked(pd.DataFrame(columns=["prompt_id", "wen_score", "webster_score"]), score, top, min_score)
    df, info = _prompt_table(prompts)  # bad prompts fail here, before the model loads
    started = time.time()
    # 1. the model, with sampling defaults from its memscan.json
    pipe, source, meta = _load(model, config)
    steps = config.num_inference_steps or int(meta.get("num_inference_steps", 50))
    guidance = config.guidance_scale if config.guidance_scale is not None else float(meta.get("guidance_scale", 7.5))
    config = TriageConfig(**{**config.to_dict(), "num_inference_steps": steps, "guidance_scale": guidance}).validate()
    tm = TriageModel(pipe, config.device)
    # 2. score all prompts
    t0 = time.perf_counter()
    res = _score_with_progress(tm, df, config, progress)
    seconds = time.perf_counter() - t0
    # 3. tables: scores (all prompts) and the ranked, cut prompts file
    table = df[["prompt_id", "prompt", "train_id", "duplicate_count"]].copy()
    table["duplicate_count"] = pd.to_numeric(table["duplicate_count"], errors="coerce").astype("Int64")
    table["wen_score"] = res["wen"]
    table["webster_score"] = res["webster"]
    for s in SCORES:
        table[f"{s}_rank"] = table[f"{s}_score"].rank(ascending=False, method="min").astype(int)
    table["generations"] = config.generations
    table["steps"] = config.steps
    table["unet_evaluations"] = res["unet_evaluations_per_prompt"]
    ranked = select_ranked(table, score, top, min_score)
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out / "scores.parquet")
    cols = ["prompt_id", "prompt", "train_id", "duplicate_count", f"{score}_score"]
    tmp = out / ".prompts.csv.tmp"
    ranked[cols].rename(columns={f"{score}_score": "score"}).to_csv(tmp, index=False)
    tmp.replace(out / "prompts.csv")
    # 4. manifest: configuration, cost against the full attack, counts
    full = FULL_ATTACK["samples_per_prompt"] * FULL_ATTACK["num_inference_steps"] * FULL_ATTACK["evaluations_per_step"]
    per_prompt = res["unet_evaluations_per_prompt"]
    manifest = {
        "memscan_run": 1,
        "command": "triage",
        "config": config.to_dict(),
        "model": {"source": source, "pipeline": type(pipe).__name__, "dtype": str(tm.dtype).replace("torch.", "")},
        "prompts": {**info, "count": len(table)},
        "ranking": {"score": score, "top": top, "min_score": min_score, "kept": len(ranked)},
        "seeds": {"run_seed": config.seed, "derivation": "blake2b(run_seed, prompt_id, generation) → 63-bit"},
        "cost": {
            "unet_evaluations_per_prompt": per_prompt,
            "full_attack_unet_evaluations_per_prompt": full,
            "full_attack": FULL_ATTACK,
            "share_of_full_attack": per_prompt / full,
        },
        "throughput": {
            "seconds": round(seconds, 3),
            "prompts_per_s": round(len(table) / seconds, 2) if seconds else None,
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_json(out / "manifest.json", manifest)
    return TriageResult(out, table, ranked, manifest)


def _load(model, config: TriageConfig):
    from memscan.generators.diffusers_models import read_meta
    from memscan.generators.text2image import Text2ImageGenerator, load_pipeline

    if isinstance(model, Text2ImageGenerator):
        return (
            model.pipe,
            model.config.get("source"),
            {
                "num_inference_steps": model.steps,
                "guidance_scale": model.guidance_scale,
            },
        )
    if isinstance(model, (str, Path)):
        root = Path(model)
        if root.exists() and not (root / "model_index.json").exists():
            raise InputError(
                f"{model} holds no model_index.json; triage needs a text-to-image pipeline",
                "pass a directory saved with StableDiffusionPipeline.save_pretrained, or a hub id",
            )
        meta = read_meta(root) if root.is_dir() else {}
        return load_pipeline(str(model), device=config.device, dtype=config.dtype), str(model), meta
    if hasattr(model, "unet"):
        return model, type(model).__name__, {}
    raise InputError(f"cannot triage a {type(model).__name__}", "pass a pipeline directory, hub id or pipeline")


def _score_with_progress(tm: TriageModel, df: pd.DataFrame, config: TriageConfig, progress: bool) -> dict:
    """Score in chunks of prompts so a progress bar can follow (results do not depend on chunks)."""
    import numpy as np

    from memscan.progress import progress_bar

    ids, texts = df["prompt_id"].astype(str).tolist(), df["prompt"].astype(str).tolist()
    chunk = max(1, config.batch_size // config.generations)
    parts = []
    with progress_bar(progress, unit="prompts") as bar:
        task = bar.add_task("triage", total=len(ids))
        for s in range(0, len(ids), chunk):
            parts.append(score_prompts(tm, ids[s : s + chunk], texts[s : s + chunk], config))
            bar.update(task, advance=len(ids[s : s + chunk]))
    return {
        "wen": np.concatenate([p["wen"] for p in parts]),
        "webster": np.concatenate([p["webster"] for p in parts]),
        "unet_evaluations_per_prompt": parts[0]["unet_evaluations_per_prompt"],
    }


def read_scores(run: str | Path) -> pd.DataFrame:
    """The scores table of a triage run."""
    path = Path(run) / "scores.parquet"
    if not path.exists():
        raise InputError(f"{run} holds no triage scores", "run `memscan triage` first")
    return pd.read_parquet(path)


def manifest_of(run: str | Path) -> dict:
    return json.loads((Path(run) / "manifest.json").read_text())
