"""The extraction attack end to end, with the local runner: shards, resume, manifest.

``extract`` is what ``memscan extract`` calls; ``reverify`` is ``memscan verify``.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.data.images import read_image
from memscan.data.prompts import load_prompts
from memscan.data.training import TrainingSet, load_training_set
from memscan.errors import MemscanError
from memscan.extraction.config import ExtractConfig
from memscan.extraction.shard import ShardTimings
from memscan.extraction.verify import verify_candidates
from memscan.extraction.worker import extraction_pool, extraction_stage, probe_generator
from memscan.progress import progress_bar
from memscan.runners import ShardTask
from memscan.store import RunLock, RunStore, safe_name, write_table


@dataclass
class ExtractionResult:
    """What a finished run holds (the tables are also on disk in ``run_dir``)."""

    run_dir: Path
    prompts: pd.DataFrame
    detections: pd.DataFrame
    extractions: pd.DataFrame
    manifest: dict

    @property
    def extracted(self) -> pd.DataFrame:
        """Rank-1 rows that are (ℓ, δ)-extractions."""
        e = self.extractions
        return e[(e["rank"] == 1) & e["extracted"]]


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("memscan", "numpy", "torch", "diffusers", "pyarrow", "pandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def extract(
    generator,
    prompts: str | Path | pd.DataFrame,
    train: str | Path | TrainingSet,
    out: str | Path,
    config: ExtractConfig = ExtractConfig(),
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after_shards: int | None = None,
    runner: str = "local",
    runner_options=None,
) -> ExtractionResult:
    """Run the generate → detect → verify attack over all prompts, shard by shard.

    Parameters
    ----------
    generator : a :class:`memscan.generators.Generator`, or a ``--model`` spec (a string or
        :class:`memscan.runners.GeneratorSpec`) that each worker loads; the Ray runner needs a spec
    prompts : prompts file path, a list of prompt strings (ids ``p0``, ``p1``, …), or a table
        with ``prompt_id``, ``prompt`` (``train_id``, ``duplicate_count``, …)
    train : training set path or a loaded :class:`TrainingSet`
    out : the run directory
    config : :class:`ExtractConfig`
    resume : continue a run in ``out`` (same config required); completed shards are kept
    stop_after_shards : stop after this many new shards (for tests of resume)
    runner : ``"local"`` (shards one after the other in this process) or ``"ray"`` (a pool of Ray
        actors running the same stage function; ``pip install memscan[ray]``, see docs/scale.md).
        Either runner can resume a run the other started.
    runner_options : :class:`memscan.runners.RayOptions` (or a dict of its fields) for ``"ray"``
    """
    config = config.validate()
    store = RunStore(out)
    if store.exists() and not resume:
        raise MemscanError(
            f"run directory {out} already holds a run", "pass --resume to finish it, or choose a new --out"
        )
    if resume and store.exists():
        store.read_manifest(expect="extract")  # before any model loads or log line is written
    store.create()
    with RunLock(store.root):
        # workers (one model load each) start while the driver reads the inputs
        with extraction_pool(runner, generator, config, store, runner_options) as pool:
            return _extract_locked(pool, prompts, train, store, config, resume, progress, stop_after_shards)


def _extract_locked(pool, prompts, train, store, config, resume, progress, stop_after_shards):
    started = time.time()
    # 1. inputs: prompts and the training set at the generator's resolution
    if isinstance(prompts, (list, tuple)):
        prompts = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(prompts))], "prompt": list(prompts)})
    if isinstance(prompts, pd.DataFrame):
        prompt_df, prompt_info = prompts.copy(), {"source": "<table>"}
        for col in ("train_id", "duplicate_count"):
            if col not in prompt_df:
                prompt_df[col] = None
    else:
        prompt_df, prompt_info = load_prompts(prompts)
    prompt_df["duplicate_count"] = pd.to_numeric(prompt_df["duplicate_count"], errors="coerce").astype("Int64")
    shape, generator_info = pool.call(probe_generator, prompt_df["prompt"].iloc[0], config.seed)
    training = train if isinstance(train, TrainingSet) else load_training_set(train, size=shape[:2], channels=shape[2])
    if training.images.shape[1:] != shape:
        raise MemscanError(
            f"training images are {training.images.shape[1:]} but generations are {shape}",
            "load the training set at the generator's resolution",
        )
    for s in training.skipped:
        store.log(f"skipped training image {s['id']} ({s['path']}): {s['reason']}")

    n_shards = math.ceil(len(prompt_df) / config.shard_size)
    manifest = {
        "memscan_run": 1,
        "command": "extract",
        "config": config.to_dict(),
        "generator": generator_info,
        "runner": pool.describe(),
        "output_shape": list(shape),
        "prompts": {**prompt_info, "count": len(prompt_df)},
        "training_set": training.summary(),
        "n_shards": n_shards,
        "seeds": {"run_seed": config.seed, "derivation": "blake2b(run_seed, prompt_id, sample_index) → 63-bit"},
        "versions": versions(),
    }
    if resume and store.exists():
        old = store.read_manifest(expect="extract")
        for key in ("config", "n_shards", "output_shape"):
            if old.get(key) != manifest[key]:
                raise MemscanError(
                    f"cannot resume {store.root}: its {key} differs from this invocation ({old.get(key)} vs {manifest[key]})",
                    "resume with the original options, or start a new run with another --out",
                )
        old_prompts = pd.read_parquet(store.root / "prompts.parquet")
        if old_prompts["prompt_id"].tolist() != prompt_df["prompt_id"].tolist():
            raise MemscanError(
                f"cannot resume {store.root}: the prompts differ from the original run", "pass the same prompts file"
            )
        manifest["started"] = old.get("started")
        manifest["resumed"] = old.get("resumed", []) + [time.strftime("%Y-%m-%dT%H:%M:%S")]
    else:
        manifest["started"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))
        write_table(prompt_df, store.root / "prompts.parquet")
    manifest["status"] = "running"
    store.write_manifest(manifest)
    store.log(f"extract: {len(prompt_df)} prompts in {n_shards} shards, {config.samples_per_prompt} samples each")

    # 2. shards: skip the committed ones, run the rest
    totals = ShardTimings()
    todo = [s for s in range(n_shards) if not store.shard_done(s)][:stop_after_shards]
    shared_training = pool.share(training)  # Ray: one copy in the object store per node
    bar = progress_bar(progress)
    with bar:
        task = bar.add_task(
            "generate + detect",
            total=sum(min(config.shard_size, len(prompt_df) - s * config.shard_size) for s in todo)
            * config.samples_per_prompt,
        )
        # the same stage over the same shards with either runner; results arrive in completion
        # order and are committed here, in the driver, once each (merge goes in shard order)
        tasks = [
            ShardTask(
                s,
                (prompt_df.iloc[s * config.shard_size : (s + 1) * config.shard_size], shared_training),
                weight=min(config.shard_size, len(prompt_df) - s * config.shard_size) * config.samples_per_prompt,
            )
            for s in todo
        ]
        for done in pool.map(extraction_stage, tasks, progress=lambda n: bar.update(task, advance=n)):
            s, (tables, t) = done.key, done.value
            shard_prompts = prompt_df.iloc[s * config.shard_size : (s + 1) * config.shard_size]
            store.commit_shard(
                s,
                tables,
                {
                    "prompts": len(shard_prompts),
                    "generation_s": round(t.generation_s, 3),
                    "detection_s": round(t.detection_s, 3),
                    "verification_s": round(t.verification_s, 3),
                    "worker": done.worker,
                    "attempt": done.attempt,
                },
            )
            store.log(
                f"shard {s} committed: {len(shard_prompts)} prompts, {int(tables['detections']['detected'].sum())} detected"
            )
            for k in ("generation_s", "detection_s", "verification_s", "images", "prompts"):
                setattr(totals, k, getattr(totals, k) + getattr(t, k))
    if any(not store.shard_done(s) for s in range(n_shards)):
        manifest["status"] = "incomplete"
        store.write_manifest(manifest)
        raise MemscanError(f"run {store.root} stopped before all shards were done", "rerun with --resume")

    # 3. merge, save the matched training images, record throughput
    tables = store.merge(n_shards)
    _save_train_matches(store, tables["extractions"], training)
    manifest["status"] = "complete"
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    manifest["throughput"] = _throughput(store, n_shards, totals)
    manifest["counts"] = _counts(tables["detections"], tables["extractions"])
    store.write_manifest(manifest)
    store.log(f"extract: complete — {manifest['counts']}")
    return ExtractionResult(store.root, prompt_df, tables["detections"], tables["extractions"], manifest)


def _throughput(store: RunStore, n_shards: int, this_session: ShardTimings) -> dict:
    recs = [store.shard_record(s) for s in range(n_shards)]
    gen = sum(r.get("generation_s", 0) for r in recs)
    det = sum(r.get("detection_s", 0) for r in recs)
    ver = sum(r.get("verification_s", 0) for r in recs)
    det_df = pd.read_parquet(store.root / "detections.parquet")
    images = int(det_df["n_samples"].sum())
    return {
        "generation_seconds": round(gen, 3),
        "generation_images_per_s": round(images / gen, 2) if gen else None,
        "detection_seconds": round(det, 3),
        "detection_prompts_per_s": round(len(det_df) / det, 2) if det else None,
        "verification_seconds": round(ver, 3),
        "images": images,
    }


def _counts(det: pd.DataFrame, ext: pd.DataFrame) -> dict:
    top = ext[ext["rank"] == 1] if len(ext) else ext
    return {
        "prompts": int(len(det)),
        "samples": int(det["n_samples"].sum()) if len(det) else 0,
        "detections": int(det["detected"].sum()) if len(det) else 0,
        "extractions": int(top["extracted"].sum()) if len(top) else 0,
    }


def _save_train_matches(store: RunStore, extractions: pd.DataFrame, training: TrainingSet) -> None:
    if not len(extractions):
        return
    index = {tid: i for i, tid in enumerate(training.ids)}
    for tid in extractions.loc[extractions["rank"] == 1, "train_id"].unique():
        if tid in index:
            store.save_image(training.images[index[tid]], "train", safe_name(tid))


def reverify(
    run: str | Path,
    train: str | Path | None = None,
    *,
    delta: float | None = None,
    min_clique: int | None = None,
    n_nearest: int | None = None,
) -> ExtractionResult:
    """Re-run verification of a finished run with other thresholds, without regenerating.

    The candidates are the stored clique medoids; ``min_clique`` can be raised or lowered down to
    the clique sizes recorded (medoids exist only for prompts detected at the original k).
    """
    store = RunStore(run)
    with RunLock(store.root):
        manifest = store.read_manifest(expect="extract")
        if manifest.get("status") != "complete":
            raise MemscanError(f"run {run} is not complete", "finish it with `memscan extract ... --resume` first")
        cfg = dict(manifest["config"])
        orig_k = cfg["min_clique"]
        if delta is not None:
            cfg["delta"] = float(delta)
        if min_clique is not None:
            if min_clique < orig_k:
                raise MemscanError(
                    f"min_clique {min_clique} is below the run's {orig_k}: no medoids were kept below it",
                    f"use ≥ {orig_k} or rerun extract",
                )
            cfg["min_clique"] = int(min_clique)
        if n_nearest is not None:
            cfg["n_nearest"] = int(n_nearest)
        config = ExtractConfig(**cfg).validate()
        shape = tuple(manifest["output_shape"])
        training = load_training_set(train or manifest["training_set"]["source"], size=shape[:2], channels=shape[2])
        det = store.table("detections")
        det["detected"] = det["clique_size"] >= config.min_clique
        cands = det[det["detected"] & det["candidate_image"].notna()].reset_index(drop=True)
        imgs = (
            np.stack([read_image(store.root / p, shape[:2], shape[2]) for p in cands["candidate_image"]])
            if len(cands)
            else np.zeros((0, *shape), np.uint8)
        )
        ext = verify_candidates(cands, imgs, training, delta=config.delta, grid=config.grid, n_nearest=config.n_nearest)
        write_table(det, store.root / "detections.parquet")
        write_table(ext, store.root / "extractions.parquet")
        _save_train_matches(store, ext, training)
        manifest["config"] = config.to_dict()
        manifest.setdefault("reverified", []).append(
            {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "delta": config.delta, "min_clique": config.min_clique}
        )
        manifest["counts"] = _counts(det, ext)
        store.write_manifest(manifest)
        prompts = pd.read_parquet(store.root / "prompts.parquet")
        return ExtractionResult(store.root, prompts, det, ext, manifest)
