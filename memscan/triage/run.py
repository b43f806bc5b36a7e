"""``memscan triage``: score every prompt cheaply, write the scores and a ranked prompts file.

A triage run directory holds

- ``scores.parquet`` — one row per prompt: ``<score>_score`` and ``<score>_rank`` (1 = most
  likely memorized) for each score the run computed (``config.scores``: ``wen`` and/or
  ``webster``; a score not asked for has no columns), the UNet evaluations spent, and the
  prompt's ``train_id`` / ``duplicate_count`` when the prompts table had them;
- ``prompts.csv`` — the prompts ranked by the chosen score (highest first), cut to ``top`` and/or
  ``min_score``; ``memscan extract --prompts RUN/prompts.csv`` reads it as it is;
- ``manifest.json`` — configuration, model (id, parameters, training step, pipeline, dtype),
  the scores' definitions and what they depend on (``scores``: timesteps scored, ``σ_max``,
  ``c_empty``, guidance's unconditional input, latent shape), seeds, versions, the cost per
  prompt next to the full attack's, ranking and throughput;
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

from memscan.data.prompts import load_prompts, prompts_sha256, validate_prompt_table
from memscan.devices import check_device
from memscan.errors import InputError, MemscanError
from memscan.generators.diffusers_models import check_model_dir, load_scheduler, model_dirs, read_meta, read_model_json
from memscan.generators.diffusers_unet import DiffusersUNetGenerator, sampling_defaults
from memscan.generators.model_record import model_record
from memscan.generators.noise import ddim_scheduler_like
from memscan.generators.text2image import Text2ImageGenerator
from memscan.runners.shards import run_shards
from memscan.store import RunStore, open_run, replacing, write_table
from memscan.triage.scores import (
    SCORE_DEFINITIONS,
    SCORES,
    TriageConfig,
    resolve_schedule,
    scored_timesteps,
)
from memscan.triage.worker import (
    check_text2image_options,
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
    """The prompts as a checked table (a file, a list, or a table: the same checks as
    ``memscan extract``'s, :func:`memscan.data.prompts.validate_prompt_table`) and its source."""
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise InputError("no prompts to triage", "pass at least one prompt")
        df = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(prompts))], "prompt": list(prompts)})
        df, info = validate_prompt_table(df, "the prompts list"), {"source": "<list>"}
    elif isinstance(prompts, pd.DataFrame):
        df, info = validate_prompt_table(prompts, "the prompts table"), {"source": "<table>"}
    else:
        df, info = load_prompts(prompts)
    return df.reset_index(drop=True), info


def select_ranked(scores: pd.DataFrame, score: str = "wen", top: int | None = None, min_score: float | None = None):
    """Prompts sorted by ``score`` (highest first; ties by prompt id; a missing score last), cut
    to ``top`` / ``min_score``. A score the table has no column for (the run did not compute it)
    is refused.

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
    if col not in scores:
        computed = [s for s in SCORES if f"{s}_score" in scores]
        raise InputError(
            f"the triage scores hold no {score} score (computed: {', '.join(computed) or 'none'})",
            f"rank by one of those, or triage again with --scores including {score}",
        )
    ranked = scores.sort_values([col, "prompt_id"], ascending=[False, True], kind="mergesort", na_position="last")
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
    score: str | None = None,
    top: int | None = None,
    min_score: float | None = None,
    progress: bool = True,
    resume: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    runner: str = "local",
    runner_options=None,
    stop_after_shards: int | None = None,
) -> TriageResult:
    """Score every prompt (Wen et al. 2024 and/or Webster 2023, ``config.scores``) and write a
    triage run directory.

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
    score : which score ranks ``prompts.csv`` (``wen`` or ``webster``, one of ``config.scores``;
        None: the first of them, ``wen`` when it is computed)
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
    score = score or config.scores[0]
    if score in SCORES and score not in config.scores:
        raise InputError(
            f"--score {score} ranks by a score this run does not compute (--scores {','.join(config.scores)})",
            f"add {score} to --scores, or rank by {config.scores[0]}",
        )
    select_ranked(pd.DataFrame(columns=["prompt_id", *(f"{s}_score" for s in SCORES)]), score, top, min_score)
    df, info = prompt_table(prompts)  # bad prompts fail here, before the run or the model
    if runner == "local":
        check_device(config.device)  # the model loads in this process: a missing GPU fails here
    started = time.time()
    # 1. sampling defaults from the model's memscan.json (the workers load the model itself);
    #    shards are whole UNet batches of prompts
    source, meta = _sampling_defaults(model)
    config = resolve_schedule(config, meta.get("num_inference_steps"), meta.get("guidance_scale")).validate()
    _check_schedule(model, config)  # a schedule the Wen score refuses, before the run directory
    _check_options(model, config)  # height/width/negative prompt for a UNet2DModel: refused here too
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
                "definitions": {s: SCORE_DEFINITIONS[s] for s in config.scores},
                "shard_size": per_shard,
                "n_shards": n_shards,
                "seeds": {"run_seed": config.seed, "derivation": "blake2b(run_seed, prompt_id, generation) → 63-bit"},
            },
            # a run started with other score definitions (an older memscan) is not resumed into
            identity=("config", "shard_size", "n_shards", "prompts_sha256", "model_spec", "definitions"),
            started=started,
        )
        run.store.log(
            f"triage: {len(df)} prompts in {n_shards} shards of {per_shard}, {config.generations} generations each"
        )
        with triage_pool(runner, model, config, runner_options, log=run.store.log) as pool:
            # 3. the model as a worker loaded it (the driver of a Ray run loads nothing), and what
            #    the scores depend on there: timesteps, σ_max, c_empty, guidance, latent shape
            loaded = pool.call(describe_triage_worker)
            run.manifest.update(
                model=_model_info(model, source, loaded), runner=pool.describe(), scores=loaded["scores"]
            )
            per_prompt = int(loaded["scores"]["unet_evaluations_per_prompt"])
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
        table, ranked = _write_tables(run, df, n_shards, config, score, top, min_score, per_prompt)
        seconds = sum(float(run.store.shard_record(s).get("seconds", 0.0)) for s in range(n_shards))
        manifest = run.finish(
            ranking={"score": score, "top": top, "min_score": min_score, "kept": len(ranked)},
            cost=triage_cost(per_prompt, loaded["scores"]["unet_evaluations_by_score"]),
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


def _write_tables(run, df: pd.DataFrame, n_shards: int, config: TriageConfig, score, top, min_score, per_prompt):
    """Merge the shards, write ``scores.parquet`` and ``prompts.csv``; returns both tables."""
    merged = run.store.merge(n_shards, tables=("scores",))["scores"]
    if merged["prompt_id"].astype(str).tolist() != df["prompt_id"].astype(str).tolist():
        raise MemscanError(
            f"the shards of {run.root} do not hold the prompts of this run", "start a new run with another --out"
        )
    table = scores_table(df, merged, config, per_prompt)
    ranked = select_ranked(table, score, top, min_score)
    write_table(table, run.root / "scores.parquet")
    cols = ["prompt_id", "prompt", "train_id", "duplicate_count", f"{score}_score"]
    with replacing(run.root / "prompts.csv") as tmp:
        ranked[cols].rename(columns={f"{score}_score": "score"}).to_csv(tmp, index=False)
    return table, ranked


def triage_cost(per_prompt: int, by_score: dict) -> dict:
    """UNet evaluations per prompt of triage (``per_prompt``, as the worker's model counts them
    for the asked scores, ``by_score`` per score: :func:`~memscan.triage.scores.score_record`)
    against the full attack's."""
    full = FULL_ATTACK["samples_per_prompt"] * FULL_ATTACK["num_inference_steps"] * FULL_ATTACK["evaluations_per_step"]
    return {
        "unet_evaluations_per_prompt": per_prompt,
        "unet_evaluations_by_score": by_score,
        "full_attack_unet_evaluations_per_prompt": full,
        "full_attack": FULL_ATTACK,
        "share_of_full_attack": per_prompt / full,
    }


def scores_table(df: pd.DataFrame, merged: pd.DataFrame, config: TriageConfig, per_prompt: int) -> pd.DataFrame:
    """One row per prompt: its ids, the computed scores (``config.scores``; a score not asked
    for has no columns) and their ranks (1 = most likely memorized; a missing score ranks last),
    the cost (``per_prompt`` UNet evaluations, as the worker's model counts them, see
    :func:`triage_cost`)."""
    table = df[["prompt_id", "prompt", "train_id", "duplicate_count"]].copy()
    table["duplicate_count"] = pd.to_numeric(table["duplicate_count"], errors="coerce").astype("Int64")
    for s in config.scores:
        table[f"{s}_score"] = merged[f"{s}_score"].to_numpy(dtype=float)
    for s in config.scores:
        rank = table[f"{s}_score"].rank(ascending=False, method="min", na_option="bottom")
        table[f"{s}_rank"] = rank.astype(int)
    table["generations"] = config.generations
    table["steps"] = config.steps
    table["unet_evaluations"] = int(per_prompt)
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


def _check_schedule(model, config: TriageConfig) -> None:
    """Refuse a schedule whose first scored timestep is too low
    (:func:`~memscan.triage.scores.scored_timesteps`) when the model's scheduler can be read
    without loading the model; a hub id is checked by its worker (before any shard). Only the
    Wen score has scored timesteps: a run without it is not refused."""
    if "wen" not in config.scores:
        return
    if isinstance(model, Text2ImageGenerator):
        scheduler = model.pipe.scheduler
    elif isinstance(model, (str, Path)):
        root = Path(model)
        _, sched_dir = model_dirs(root)
        if not (sched_dir / "scheduler_config.json").is_file():
            return  # a hub id, or a directory the loader will refuse with its own error
        scheduler = load_scheduler(sched_dir)
    else:
        scheduler = getattr(model, "scheduler", None)
    if scheduler is not None:
        scored_timesteps(ddim_scheduler_like(scheduler), config)


def _check_options(model, config: TriageConfig) -> None:
    """Refuse ``height``/``width``/``negative_prompt`` for a UNet2DModel before the run directory
    is written (the worker refuses them too)."""
    if isinstance(model, DiffusersUNetGenerator) or (isinstance(model, (str, Path)) and is_unet_model_dir(model)):
        check_text2image_options(model, config)


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
    return {**meta, **sampling_defaults(meta)}  # the extraction's schedule (guidance 1 unless set)


def read_scores(run: str | Path) -> pd.DataFrame:
    """The scores table of a triage run."""
    path = Path(run) / "scores.parquet"
    if not path.exists():
        raise InputError(f"{run} holds no triage scores", "run `memscan triage` first")
    return pd.read_parquet(path)


def manifest_of(run: str | Path) -> dict:
    """The manifest of a triage run (older runs, with ``"command"``, included)."""
    return RunStore(run).read_manifest(expect="triage")
