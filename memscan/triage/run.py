"""``memscan triage``: score every prompt cheaply, write the scores and a ranked prompts file.

A triage run directory holds

- ``scores.parquet`` — one row per prompt: ``wen_score``, ``webster_score``, their ranks (1 =
  most likely memorized), the UNet evaluations spent, and the prompt's ``train_id`` /
  ``duplicate_count`` when the prompts table had them;
- ``prompts.csv`` — the prompts ranked by the chosen score (highest first), cut to ``top`` and/or
  ``min_score``; ``memscan extract --prompts RUN/prompts.csv`` reads it as it is;
- ``manifest.json`` — configuration, model (id, parameters, training step, pipeline, dtype),
  seeds, versions, the cost per prompt next to the full attack's, ranking and throughput;
- ``shards/`` — each shard's scores and completion record (``--resume`` redoes only the rest),
  ``run.log``, and ``report.html`` once ``memscan report RUN`` made it.

It is written through the one run lifecycle (:func:`memscan.store.open_run`: lock, resume,
status) and the one shard loop (:func:`memscan.runners.shards.run_shards`), on the local or the
Ray runner (:mod:`memscan.triage.worker`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from memscan.data.prompts import load_prompts, prompts_sha256
from memscan.devices import check_device
from memscan.errors import InputError, MemscanError
from memscan.generators.diffusers_models import check_model_dir, load_scheduler, model_dirs, read_meta, read_model_json
from memscan.generators.diffusers_unet import DiffusersUNetGenerator
from memscan.generators.model_record import model_record
from memscan.generators.text2image import Text2ImageGenerator
from memscan.runners.shards import run_shards
from memscan.store import RunStore, open_run, write_table
from memscan.triage.scores import SCORES, TriageConfig
from memscan.triage.worker import (
    describe_triage_worker,
    is_unet_model_dir,
    shard_prompts,
    triage_pool,
    triage_stage,
)

#: Prompts per shard by default (the unit of commit and ``--resume``).
DEFAULT_SHARD_SIZE = 64

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


def prompt_table(prompts) -> tuple[pd.DataFrame, dict]:
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
    resume: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    runner: str = "local",
    runner_options=None,
    stop_after_shards: int | None = None,
) -> TriageResult:
    """Score every prompt (Wen et al. 2024, Webster 2023) and write a triage run directory.

    Parameters
    ----------
    model : a text-to-image pipeline directory or hub id, a loaded diffusers pipeline, a
        :class:`memscan.generators.text2image.Text2ImageGenerator`, or a class- or
        caption-conditional ``UNet2DModel`` directory with a ``null_class`` in its
        ``memscan.json`` (or its :class:`~memscan.generators.diffusers_unet.DiffusersUNetGenerator`);
        the Ray runner needs a directory or hub id: each worker loads its own model
    prompts : prompts file (text, CSV or Parquet, as ``memscan extract`` reads), a list of
        strings, or a table with ``prompt_id``, ``prompt``
    out : the triage run directory (must not hold a run already, unless ``resume``)
    config : :class:`TriageConfig`
    score : which score ranks ``prompts.csv`` (``wen`` or ``webster``)
    top, min_score : keep the ``top`` highest-scoring prompts and/or those scoring ≥ ``min_score``
    resume : finish the run in ``out`` (same config, shard size and prompts); committed shards
        are kept. The ranking options may differ: ``prompts.csv`` is made from the merged scores.
    shard_size : prompts per shard (the unit of commit and resume), rounded up to a whole number
        of UNet batches of ``batch_size // generations`` prompts; the scores do not depend on it
    runner : ``"local"`` (shards one after the other in this process) or ``"ray"`` (a pool of Ray
        actors, ``pip install memscan[ray]``, see docs/scale.md); either can resume the other's run
    runner_options : :class:`memscan.runners.RayOptions` (or a dict of its fields) for ``"ray"``
    stop_after_shards : stop after this many new shards (a kill hook for tests of resume)
    """
    config = config.validate()
    select_ranked(pd.DataFrame(columns=["prompt_id", "wen_score", "webster_score"]), score, top, min_score)
    df, info = prompt_table(prompts)  # bad prompts fail here, before the run or the model
    if runner == "local":
        check_device(config.device)  # the model loads in this process: a missing GPU fails here
    started = time.time()
    # 1. sampling defaults from the model's memscan.json (the workers load the model itself);
    #    shards are whole UNet batches of prompts
    source, meta = _sampling_defaults(model)
    steps = config.num_inference_steps or int(meta.get("num_inference_steps", 50))
    guidance = config.guidance_scale if config.guidance_scale is not None else float(meta.get("guidance_scale", 7.5))
    config = TriageConfig(**{**config.to_dict(), "num_inference_steps": steps, "guidance_scale": guidance}).validate()
    per_shard = shard_prompts(shard_size, config)
    n_shards = math.ceil(len(df) / per_shard)
    ids, texts = df["prompt_id"].astype(str).tolist(), df["prompt"].astype(str).tolist()
    shard_args = {
        s: (ids[s * per_shard : (s + 1) * per_shard], texts[s * per_shard : (s + 1) * per_shard])
        for s in range(n_shards)
    }
    with open_run(out, "triage", resume=resume) as run:
        # 2. the manifest; a resumed run must be the same run (checked before any model loads)
        run.start(
            {
                "config": config.to_dict(),
                "prompts": {**info, "count": len(df)},
                "prompts_sha256": prompts_sha256(ids, texts),
                "model_spec": model_record(model)["id"],
                "shard_size": per_shard,
                "n_shards": n_shards,
                "seeds": {"run_seed": config.seed, "derivation": "blake2b(run_seed, prompt_id, generation) → 63-bit"},
            },
            identity=("config", "shard_size", "n_shards", "prompts_sha256", "model_spec"),
            started=started,
        )
        run.store.log(
            f"triage: {len(df)} prompts in {n_shards} shards of {per_shard}, {config.generations} generations each"
        )
        with triage_pool(runner, model, config, runner_options, log=run.store.log) as pool:
            # 3. the model as a worker loaded it (the driver of a Ray run loads nothing)
            run.manifest.update(
                model=_model_info(model, source, pool.call(describe_triage_worker)), runner=pool.describe()
            )
            run.save()
            # 4. score the shards not yet committed
            run_shards(
                run,
                pool,
                triage_stage,
                shard_args,
                weights={s: len(a[0]) for s, a in shard_args.items()},
                label="triage",
                unit="prompts",
                progress=progress,
                stop_after_shards=stop_after_shards,
                describe=lambda s, t: f"{len(t['scores'])} prompts",
            )
        # 5. tables from the merged shards: scores (all prompts), the ranked and cut prompts file
        table, ranked = _write_tables(run, df, n_shards, config, score, top, min_score)
        seconds = sum(float(run.store.shard_record(s).get("seconds", 0.0)) for s in range(n_shards))
        manifest = run.finish(
            ranking={"score": score, "top": top, "min_score": min_score, "kept": len(ranked)},
            cost=triage_cost(config),
            throughput={
                "seconds": round(seconds, 3),
                "prompts_per_s": round(len(table) / seconds, 2) if seconds else None,
            },
        )
    return TriageResult(Path(out), table, ranked, manifest)


def _model_info(model, source: str | None, loaded: dict) -> dict:
    """The manifest's ``model``: :func:`model_record` (its parameter count from a worker, which
    loaded the pipeline) with the pipeline class, dtype and the ``--model`` as given."""
    spec = source if isinstance(model, (str, Path, Text2ImageGenerator, DiffusersUNetGenerator)) and source else model
    info = {**model_record(spec), "parameters": loaded["parameters"], "source": source}
    return {**info, "pipeline": loaded["pipeline"], "dtype": loaded["dtype"]}


def _write_tables(run, df: pd.DataFrame, n_shards: int, config: TriageConfig, score, top, min_score):
    """Merge the shards, write ``scores.parquet`` and ``prompts.csv``; returns both tables."""
    merged = run.store.merge(n_shards, tables=("scores",))["scores"]
    if merged["prompt_id"].astype(str).tolist() != df["prompt_id"].astype(str).tolist():
        raise MemscanError(
            f"the shards of {run.root} do not hold the prompts of this run", "start a new run with another --out"
        )
    table = scores_table(df, merged, config)
    ranked = select_ranked(table, score, top, min_score)
    write_table(table, run.root / "scores.parquet")
    cols = ["prompt_id", "prompt", "train_id", "duplicate_count", f"{score}_score"]
    tmp = run.root / ".prompts.csv.tmp"
    ranked[cols].rename(columns={f"{score}_score": "score"}).to_csv(tmp, index=False)
    tmp.replace(run.root / "prompts.csv")
    return table, ranked


def triage_cost(config: TriageConfig) -> dict:
    """UNet evaluations per prompt of triage against the full attack's."""
    full = FULL_ATTACK["samples_per_prompt"] * FULL_ATTACK["num_inference_steps"] * FULL_ATTACK["evaluations_per_step"]
    per_prompt = 2 * config.generations * config.steps
    return {
        "unet_evaluations_per_prompt": per_prompt,
        "full_attack_unet_evaluations_per_prompt": full,
        "full_attack": FULL_ATTACK,
        "share_of_full_attack": per_prompt / full,
    }


def scores_table(df: pd.DataFrame, merged: pd.DataFrame, config: TriageConfig) -> pd.DataFrame:
    """One row per prompt: its ids, both scores, their ranks (1 = most likely memorized), the cost."""
    table = df[["prompt_id", "prompt", "train_id", "duplicate_count"]].copy()
    table["duplicate_count"] = pd.to_numeric(table["duplicate_count"], errors="coerce").astype("Int64")
    table["wen_score"] = merged["wen_score"].to_numpy(dtype=float)
    table["webster_score"] = merged["webster_score"].to_numpy(dtype=float)
    for s in SCORES:
        table[f"{s}_rank"] = table[f"{s}_score"].rank(ascending=False, method="min").astype(int)
    table["generations"] = config.generations
    table["steps"] = config.steps
    table["unet_evaluations"] = 2 * config.generations * config.steps
    return table


def _sampling_defaults(model) -> tuple[str | None, dict]:
    """``(source, memscan.json sampling defaults)`` of ``model``, without loading it."""
    if isinstance(model, (Text2ImageGenerator, DiffusersUNetGenerator)):
        return model.config.get("source"), {"num_inference_steps": model.steps, "guidance_scale": model.guidance_scale}
    if isinstance(model, (str, Path)):
        root = Path(model)
        if root.is_dir():  # a damaged config: one error naming it, before the run is written
            check_model_dir(root)
        if is_unet_model_dir(root):
            meta = _class_model_meta(root)  # a model triage cannot score is refused first
            load_scheduler(model_dirs(root)[1])  # then a missing scheduler, or one diffusers refuses
            return str(model), meta
        if root.exists() and not (root / "model_index.json").exists():
            raise InputError(
                f"{model} holds no model_index.json; triage needs a text-to-image pipeline",
                "pass a directory saved with StableDiffusionPipeline.save_pretrained, or a hub id",
            )
        return str(model), (read_meta(root) if root.is_dir() else {})
    if hasattr(model, "unet"):
        return type(model).__name__, {}
    raise InputError(f"cannot triage a {type(model).__name__}", "pass a pipeline directory, hub id or pipeline")


def _class_model_meta(root: Path) -> dict:
    """``memscan.json`` of a UNet2DModel directory the triage scores apply to (refused otherwise:
    an unconditional model has no prompt to score, one without a null class no empty prompt)."""
    unet_dir, _ = model_dirs(root)
    config = read_model_json(unet_dir / "config.json")
    meta = read_meta(root)
    if config.get("num_class_embeds") is None:
        raise InputError(
            f"{root} is an unconditional UNet2DModel: it has no prompt to score",
            "triage scores text-to-image pipelines and class-conditional UNets with a null_class",
        )
    if meta.get("null_class") is None:
        raise InputError(
            f"{root} is a class-conditional UNet2DModel without a null_class in memscan.json: the Wen score "
            "needs the unconditional prediction",
            "set null_class (the label trained as 'no condition'), or run `memscan extract --adaptive`",
        )
    return meta


def read_scores(run: str | Path) -> pd.DataFrame:
    """The scores table of a triage run."""
    path = Path(run) / "scores.parquet"
    if not path.exists():
        raise InputError(f"{run} holds no triage scores", "run `memscan triage` first")
    return pd.read_parquet(path)


def manifest_of(run: str | Path) -> dict:
    """The manifest of a triage run (older runs, with ``"command"``, included)."""
    return RunStore(run).read_manifest(expect="triage")
