"""The extraction attack end to end: the run lifecycle, the shards, the merge, the manifest.

``extract`` is what ``memscan extract`` calls; ``reverify`` is ``memscan verify``. Both open the
run through :func:`memscan.store.open_run` (kind ``extract``); the shards go through
:func:`memscan.runners.shards.run_shards` with the local or the Ray runner.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.data.images import read_image
from memscan.data.prompts import load_prompts, prompts_sha256, validate_prompt_table
from memscan.data.training import TrainingSet, list_source, load_training_set, training_at_shape, training_set_sha256
from memscan.errors import InputError, MemscanError
from memscan.extraction.config import ExtractConfig
from memscan.extraction.verify import DEFINITIONS, extraction_counts, verify_candidates
from memscan.extraction.verify_index import (
    DEFAULT_RETRIEVE,
    IndexVerification,
    RetrievalStats,
    open_index_verifier,
    verify_candidates_indexed,
)
from memscan.extraction.worker import extraction_pool, extraction_stage, generator_record, probe_generator
from memscan.index.faiss_index import serve_index_on_ray
from memscan.runners.shards import run_shards
from memscan.store import Run, RunStore, open_run, safe_name, write_table


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
    model_id: str | None = None,
    index: str | Path | None = None,
    retrieve: int = DEFAULT_RETRIEVE,
    serve_index: float | None = None,
) -> ExtractionResult:
    """Run the generate → detect → verify attack over all prompts, shard by shard.

    Parameters
    ----------
    generator : a :class:`memscan.generators.Generator`, or a ``--model`` spec (a string or
        :class:`memscan.runners.GeneratorSpec`) that each worker loads; the Ray runner needs a spec
    prompts : prompts file path, a list of prompt strings (ids ``p0``, ``p1``, …), or a table
        with ``prompt_id``, ``prompt`` (``train_id``, ``duplicate_count``, …)
    train : training set path or a loaded :class:`TrainingSet`; with ``index``, optional (the
        index records its source) — where the indexed images are now
    out : the run directory (opened with :func:`memscan.store.open_run`, kind ``extract``)
    config : :class:`ExtractConfig`
    resume : continue a run in ``out``; completed shards are kept. The resumed run must be the
        same run — same model (``model_spec``, ``generator``), prompts (``prompts_sha256``: ids
        and texts), training set (``training_set_sha256``, or the index in ``verification``),
        config, shard count and output shape — else it is refused before any worker starts
        (docs/reliability.md)
    stop_after_shards : stop after this many new shards (for tests of resume)
    runner : ``"local"`` (shards one after the other in this process) or ``"ray"`` (a pool of Ray
        actors running the same stage function; ``pip install memscan[ray]``, see docs/scale.md).
        Either runner can resume a run the other started.
    runner_options : :class:`memscan.runners.RayOptions` (or a dict of its fields) for ``"ray"``
    model_id : the ``--model`` spec recorded in the manifest's ``model`` record when
        ``generator`` is a loaded object (default: the spec it was given as, or its class)
    index : a training index folder (``memscan index``): verify each candidate among its top
        ``retrieve`` training images only (:mod:`memscan.extraction.verify_index`); the training
        set is never decoded whole, by the driver or by any worker
    retrieve : K, training images retrieved and decoded per candidate with ``index``
    serve_index : with ``index`` and the Ray runner: serve each part of the index from its own
        Ray actor reserving this many CPUs (:func:`memscan.index.faiss_index.serve_index_on_ray`),
        so that no worker opens the whole index — for an index larger than one machine's memory,
        built in shards (``memscan index --index-shards``). None: each worker opens the index
        memory-mapped.
    """
    config = config.validate()
    if index is not None:
        if isinstance(train, TrainingSet):
            raise InputError("with an index, pass the training set as a path (or None), not loaded images")
        train = IndexVerification(
            str(Path(index).resolve()), retrieve, str(Path(train).resolve()) if train is not None else None,
            device=config.device,
        ).validate()  # fmt: skip
        open_index_verifier(train)  # a missing or damaged index (or source) fails before any run is written
    elif train is None:
        raise InputError("extract needs the training set", "pass --train TRAIN, or --index INDEX")
    if serve_index is not None:
        if index is None or runner != "ray":
            raise InputError(
                "--serve-index-cpus serves an index's parts from Ray actors", "use it with --index and --runner ray"
            )
        if serve_index < 0:
            raise InputError(f"--serve-index-cpus must be ≥ 0, got {serve_index}")
    # the run's inputs, read (not decoded) before the run: bad prompts or a missing training set
    # fail here, and a resume with another model, prompts or training set is refused below
    prompt_df, prompt_info = _prompt_table(prompts)
    if isinstance(train, (str, Path)):  # listed once: hashed here, decoded as listed once the shape is known
        train = list_source(train)
    inputs = {
        "model_spec": generator_record(generator, None, model_id)["id"],
        "prompts_sha256": prompts_sha256(prompt_df["prompt_id"], prompt_df["prompt"]),
        "training_set_sha256": None if isinstance(train, IndexVerification) else training_set_sha256(train),
    }
    started = time.time()
    with open_run(out, "extract", resume=resume) as run:
        _refuse_reverified(run)
        run.check(inputs, tuple(inputs))  # before the workers load the model, an index is served or an image decoded
        if serve_index is None:
            return _extract_pool(run, runner, generator, config, runner_options, model_id, prompt_df, prompt_info,
                                 inputs, train, progress, stop_after_shards, started)  # fmt: skip
        address = getattr(runner_options, "address", None) if runner_options is not None else None
        served = serve_index_on_ray(train.index, cpus_per_part=float(serve_index), address=address)
        try:
            return _extract_pool(run, runner, generator, config, runner_options, model_id, prompt_df, prompt_info,
                                 inputs, replace(train, served=served.index), progress, stop_after_shards,
                                 started)  # fmt: skip
        finally:
            served.index.close()


#: config fields an ``extract --resume`` may change: how generations are batched changes no result
RESUME_FREE = {"config": ("batch_size",)}


def _refuse_reverified(run: Run) -> None:
    """A run ``memscan verify`` rewrote no longer holds the tables its shards give: resuming it
    would merge the shards' tables back under the re-verified settings. Refused, nothing written."""
    previous = run.previous or {}
    if previous.get("reverified") or previous.get("status") == VERIFYING:
        how = "is being re-verified" if previous.get("status") == VERIFYING else "was re-verified"
        raise MemscanError(
            f"cannot resume {run.store.root}: it {how} by `memscan verify`, so its tables are no longer those of "
            "its shards, and a resume would put the shards' tables back",
            f"it is complete: change its thresholds or training set with `memscan verify {run.store.root}`, "
            "or start a new run with another --out",
        )


def _extract_pool(run, runner, generator, config, runner_options, model_id, prompt_df, prompt_info, inputs, train,
                  progress, stop_after_shards, started) -> ExtractionResult:  # fmt: skip
    # workers (one model load each) start while the driver reads the training set
    with extraction_pool(runner, generator, config, run.store, runner_options) as pool:
        return _extract_in(run, pool, generator, model_id, prompt_df, prompt_info, inputs, train, config, progress,
                           stop_after_shards, started)  # fmt: skip


def generator_identity(description: dict) -> dict:
    """The manifest's ``generator`` record (the generator's recorded configuration:
    :func:`memscan.generators.base.describe`) with a ``source`` that names an existing path made
    absolute — the same run gets the same record from any working directory and either runner."""
    source = description.get("source")
    if isinstance(source, str) and not source.startswith("py:") and Path(source).expanduser().exists():
        return {**description, "source": str(Path(source).expanduser().resolve())}
    return dict(description)


def _prompt_table(prompts) -> tuple[pd.DataFrame, dict]:
    """The prompts as a checked table (:func:`memscan.data.prompts.validate_prompt_table`: the
    same checks for a file, a DataFrame or a list) and its summary."""
    if isinstance(prompts, (list, tuple)):
        table = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(prompts))], "prompt": list(prompts)})
        return validate_prompt_table(table, "prompts list"), {"source": "<table>"}
    if isinstance(prompts, pd.DataFrame):
        return validate_prompt_table(prompts, "prompts DataFrame"), {"source": "<table>"}
    return load_prompts(prompts)


def _extract_in(
    run: Run, pool, generator, model_id, prompt_df, prompt_info, inputs, train, config, progress, stop_after_shards,
    started,
) -> ExtractionResult:  # fmt: skip
    store = run.store
    # 1. inputs: the generator's output shape, the training set at that resolution
    first = prompt_df.iloc[0]
    where = (
        f"the generator failed on its first call (prompt {first['prompt_id']}, {str(first['prompt'])[:60]!r}, "
        "before any shard)"
    )
    probe = pool.call(probe_generator, first["prompt"], config.seed, where)
    shape = probe.shape
    verifier = open_index_verifier(train) if isinstance(train, IndexVerification) else None
    if verifier is not None:  # through the index: nothing decoded here
        training, summary, verification = train, verifier.summary(shape), verifier.describe()
    else:
        training = training_at_shape(train, shape, store.log)
        summary, verification = training.summary(), None

    n_shards = math.ceil(len(prompt_df) / config.shard_size)
    prompts_path = store.root / "prompts.parquet"
    fields = {
        "config": config.to_dict(),
        "generator": generator_identity(probe.description),
        "model": generator_record(generator, probe.parameters, model_id),
        **inputs,  # model_spec, prompts_sha256, training_set_sha256
        "runner": pool.describe(),
        "output_shape": list(shape),
        "prompts": {**prompt_info, "count": len(prompt_df)},
        "training_set": summary,
        "n_shards": n_shards,
        "seeds": {"run_seed": config.seed, "derivation": "blake2b(run_seed, prompt_id, sample_index) → 63-bit"},
        "definitions": DEFINITIONS,
    }
    if verification is not None:
        fields["verification"] = verification
        # how the index was searched (not part of the run's identity: it changes no result)
        fields["index_search"] = "ray actors, one per part" if train.served is not None else "opened by each worker"
    identity = ("config", "n_shards", "output_shape", "verification", "definitions", *inputs, "generator")
    # a resume of another run is refused (nothing written); a lower --batch-size after running out
    # of memory is not: each generation's seed is its own (prompt, sample index), not its batch's
    run.start(fields, identity=identity, started=started, free=RESUME_FREE)
    if not (run.resuming and prompts_path.exists()):
        write_table(prompt_df, prompts_path)
    store.log(f"extract: {len(prompt_df)} prompts in {n_shards} shards, {config.samples_per_prompt} samples each")

    # 2. shards: the same stage over the same shards with either runner; results are committed
    #    in the driver, once each (merge goes in shard order)
    # Ray: one copy in the object store per node (with an index: the small IndexVerification
    # record; each worker opens the index memory-mapped)
    shared_training = pool.share(training)
    size = config.shard_size
    run_shards(
        run,
        pool,
        extraction_stage,
        {s: (prompt_df.iloc[s * size : (s + 1) * size], shared_training) for s in range(n_shards)},
        weights={s: min(size, len(prompt_df) - s * size) * config.samples_per_prompt for s in range(n_shards)},
        label="generate + detect",
        unit="images",
        progress=progress,
        stop_after_shards=stop_after_shards,
        describe=lambda s, t: f"{len(t['detections'])} prompts, {int(t['detections']['detected'].sum())} detected",
    )

    # 3. merge, save the matched training images, record throughput
    tables = store.merge(n_shards)
    extra = {}
    if verifier is not None:
        _save_train_matches_indexed(store, tables["extractions"], verifier, shape)
        extra["retrieval"] = _retrieval(store, n_shards)
    else:
        save_train_matches(store, tables["extractions"], training)
    manifest = run.finish(
        throughput=_throughput(store, n_shards),
        counts=extraction_counts(tables["detections"], tables["extractions"], config.min_clique),
        **extra,
    )
    store.log(f"extract: complete — {manifest['counts']}")
    return ExtractionResult(store.root, prompt_df, tables["detections"], tables["extractions"], manifest)


def _throughput(store: RunStore, n_shards: int) -> dict:
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


def save_train_matches(store: RunStore, extractions: pd.DataFrame, training: TrainingSet) -> None:
    if not len(extractions):
        return
    index = {tid: i for i, tid in enumerate(training.ids)}
    for tid in extractions.loc[extractions["rank"] == 1, "train_id"].unique():
        if tid in index:
            store.save_image(training.images[index[tid]], "train", safe_name(tid))


def _retrieval(store: RunStore, n_shards: int) -> dict:
    """The manifest's ``retrieval`` record: what verification through the index read (summed
    over shards); each unreadable retrieved image is logged by name, and each candidate left
    unverified because none of its retrieved images could be read."""
    total = RetrievalStats()
    for s in range(n_shards):
        total.add(store.shard_record(s).get("retrieval", {}))
    total.log(store.log)
    return total.to_dict()


def _save_train_matches_indexed(store: RunStore, extractions: pd.DataFrame, verifier, shape) -> None:
    """The rank-1 training images of an index-verified run, read by random access."""
    if not len(extractions):
        return
    tids = extractions.loc[extractions["rank"] == 1, "train_id"].unique()
    rows = [r for r in (verifier.row_of(t) for t in tids) if r is not None]
    kept, images, _ = verifier.reader.read(rows, size=tuple(shape[:2]), channels=int(shape[2]))
    for r, img in zip(kept, images):
        store.save_image(img, "train", safe_name(verifier.index.ids[int(r)]))


#: The status (and manifest record) of a finished run whose tables ``memscan verify`` is
#: rewriting; left in place when it was stopped, until a rerun of ``memscan verify`` finishes.
VERIFYING = "verifying"


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
    the clique sizes recorded (medoids exist only for prompts detected at the original k). An
    adaptive run with ``stop_when_detected`` stopped each prompt once its clique reached the
    original k, so there ``min_clique`` cannot be raised (an :class:`InputError`).

    The detections, the extractions, the matched training images and the manifest are rewritten
    one after the other, each file atomically. Before the first, the manifest is marked ``status:
    verifying`` with the new thresholds (its ``verifying`` record); only the last write marks it
    ``complete`` again. So a kill leaves either the run as it was or one marked unfinished, which
    ``memscan report`` refuses and a rerun of ``memscan verify RUN`` finishes (an option not given
    again is the interrupted verify's).
    """
    with open_complete_for_rewrite(run) as opened:
        store, manifest = opened.store, opened.manifest
        pending = manifest.get(VERIFYING) or {}  # an interrupted verify: its options are the defaults
        if pending:
            delta = pending.get("delta") if delta is None else delta
            min_clique = pending.get("min_clique") if min_clique is None else min_clique
            n_nearest = pending.get("n_nearest") if n_nearest is None else n_nearest
            train = pending.get("train") if train is None else train
            store.log(f"verify: finishing the re-verification interrupted since {pending.get('started')}")
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
            if min_clique > orig_k and cfg.get("adaptive") and cfg.get("stop_when_detected", True):
                # an adaptive run stopped each prompt once its clique reached orig_k: the recorded
                # clique sizes stop there, so a higher k would turn flagged prompts into misses
                raise InputError(
                    f"min_clique {min_clique} is above the run's {orig_k}, and the run was adaptive with "
                    f"stop_when_detected: each prompt stopped generating once its clique reached {orig_k}, "
                    "so its recorded clique size says nothing about a higher k",
                    f"rerun extract with --min-clique {min_clique} (re-verify at ≤ {orig_k} here)",
                )
            cfg["min_clique"] = int(min_clique)
        if n_nearest is not None:
            cfg["n_nearest"] = int(n_nearest)
        config = ExtractConfig(**cfg).validate()
        shape = tuple(manifest["output_shape"])
        via = manifest.get("verification") or {}
        if via.get("via") == "index":  # verified through an index: re-verify through it
            verifier = open_index_verifier(
                IndexVerification(
                    via["index"],
                    int(via["retrieve"]),
                    str(Path(train).resolve()) if train else None,
                    device=config.device,
                )  # fmt: skip
            )
        else:
            verifier = None
            training = load_training_set(train or manifest["training_set"]["source"], size=shape[:2], channels=shape[2])
            if train:  # the tables will say what this set holds: so must the manifest (compare reads it)
                new_training = {"training_set": training.summary(), "training_set_sha256": training_set_sha256(train)}
        det = store.table("detections")
        det["detected"] = det["clique_size"] >= config.min_clique
        cands = det[det["detected"] & det["candidate_image"].notna()].reset_index(drop=True)
        imgs = (
            np.stack([read_image(store.root / p, shape[:2], shape[2]) for p in cands["candidate_image"]])
            if len(cands)
            else np.zeros((0, *shape), np.uint8)
        )
        kw = {"delta": config.delta, "grid": config.grid, "n_nearest": config.n_nearest}
        if verifier is not None:
            ext, stats = verify_candidates_indexed(cands, imgs, verifier, **kw)
            total = RetrievalStats()
            total.add(stats)
            total.log(store.log)
            manifest["retrieval"] = total.to_dict()
        else:
            ext = verify_candidates(cands, imgs, training, **kw)
        # the tables, images and manifest cannot change at once: mark the run first (a kill
        # between the writes leaves tables that disagree), unmark it with the last write
        rerun = f"rerun `memscan verify {store.root}` to finish it"
        manifest["status"] = VERIFYING
        manifest[VERIFYING] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "delta": config.delta,
            "min_clique": config.min_clique,
            "n_nearest": config.n_nearest,
            **({"train": str(Path(train).resolve())} if train else {}),
            "rewrites": ["detections.parquet", "extractions.parquet", "images/train", "manifest.json"],
            "hint": f"the tables are being rewritten by memscan verify; if it was stopped, {rerun}",
        }
        opened.save()
        try:
            write_table(det, store.root / "detections.parquet")
            write_table(ext, store.root / "extractions.parquet")
            if verifier is not None:
                _save_train_matches_indexed(store, ext, verifier, shape)
            else:
                save_train_matches(store, ext, training)
        except (OSError, MemscanError) as exc:  # the run stays marked: its tables may disagree
            reason = exc.message if isinstance(exc, MemscanError) else (exc.strerror or str(exc))
            raise MemscanError(
                f"verify stopped while rewriting {store.root}: {reason}", f"fix it, then {rerun}"
            ) from exc
        del manifest[VERIFYING]
        manifest["status"] = "complete"
        manifest["config"] = config.to_dict()
        manifest.setdefault("reverified", []).append(
            {
                "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "delta": config.delta,
                "min_clique": config.min_clique,
                "n_nearest": config.n_nearest,
                **({"train": str(Path(train).resolve())} if train else {}),
            }
        )
        manifest["counts"] = extraction_counts(det, ext, config.min_clique)
        manifest["definitions"] = DEFINITIONS  # every row recomputed under the current definitions
        if verifier is None and train:
            manifest.update(new_training)
        opened.save()
        prompts = pd.read_parquet(store.root / "prompts.parquet")
        return ExtractionResult(store.root, prompts, det, ext, manifest)


def open_complete_for_rewrite(run: str | Path, kind: str = "extract") -> Run:
    """Open a finished run of ``kind`` to rewrite its tables in place (``memscan verify``).

    The lifecycle's :func:`~memscan.store.open_run` with ``resume=True`` (lock held, kind checked),
    without :meth:`~memscan.store.Run.start`: the manifest stays ``complete`` and the caller
    updates it with :meth:`~memscan.store.Run.save`. A missing or unfinished run is refused and
    nothing is written; an exception leaves the manifest as it was. A run that ``memscan verify``
    marked ``verifying`` and did not finish (killed while rewriting) is opened too, to finish it.
    """
    store = RunStore(run)
    store.read_manifest(expect=kind)  # a missing run is an error, never created here
    opened = open_run(run, kind, resume=True)
    opened.manifest = opened.previous
    status = opened.manifest.get("status")
    if status != "complete" and not (status == VERIFYING and opened.manifest.get(VERIFYING)):
        opened.close()
        raise MemscanError(f"run {run} is not complete", f"finish it with `memscan {kind} ... --resume` first")
    return opened
