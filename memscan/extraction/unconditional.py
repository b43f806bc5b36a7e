"""Unconditional extraction: generate M images, verify each against the whole training set.

The setting of Carlini et al. (2023)'s CIFAR-10 study (2^16 generations per model against the
50,000 training images): there are no prompts to attack, so every generation is compared with
the training set and judged by the calibrated distance (:mod:`memscan.extraction.calibrated`):

1. generate M images; image i uses seed ``derive_seed(run_seed, "unconditional", i)``, so any
   generation can be reproduced alone (up to float rounding: a model's kernels differ with the
   batch size) and a resumed run regenerates the same images. Model calls take ``batch_size``
   generations starting at global multiples of ``batch_size`` (shards are whole batches,
   :func:`shard_samples`), so the generations are the same, bit for bit, whatever the shard size;
2. find each generation's n nearest training images — exactly over pixels
   (:class:`~memscan.index.nearest.PixelSearch`, a FAISS flat index), or, with a prebuilt
   embedding index, its ``n_candidates`` most similar training images re-ranked by exact ℓ2 /
   tiled ℓ2 on pixels;
3. calibrated decision: extracted when ℓ(x̂, x; S_x̂) < 1 (α_c = 0.5, n = 50; a training set
   of fewer than n images gives ``n_effective`` = its size, recorded and warned about in
   ``run.log``);
4. de-duplicate: extractions hitting the same training image count once (the closest
   generation represents it; ``hits`` counts them all).

The run directory (:class:`memscan.store.RunStore`)::

    RUN/
      manifest.json             kind, config, generator, model, runner, seeds, training set,
                                search, counts, throughput (the common fields: docs/outputs.md)
      generations.parquet       one row per generation (sample_index, seed, nearest training
                                image, distances, calibrated, extracted)
      extractions.parquet       one row per extracted training image (de-duplicated)
      shards/NNNNN.*            per-shard tables and completion records (resume)
      images/candidates/*.png   every extracted generation
      images/train/*.png        every extracted training image
      run.log
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.data.training import TrainingSet, list_source, training_at_shape, training_set_sha256
from memscan.distances import tiled_l2
from memscan.errors import InputError, MemscanError, user_code
from memscan.extraction.calibrated import CalibratedConfig
from memscan.extraction.pipeline import generator_identity
from memscan.extraction.verify_index import (
    VERIFY_CHUNK_BYTES,
    IndexVerification,
    RetrievalStats,
    open_index_verifier,
    verification_threads,
)
from memscan.extraction.worker import (
    generator_record,
    load_worker_generator,
    model_pool,
    probe_generator,
    worker_store,
)
from memscan.generators.base import check_generations
from memscan.generators.seeds import derive_seed
from memscan.index.embedders import load_embedder
from memscan.index.faiss_index import TrainingIndex
from memscan.index.nearest import PixelSearch, pixel_distances, rowsort
from memscan.runners.shards import run_shards
from memscan.store import Run, RunStore, open_run, safe_name, write_table

#: The prompt id under which unconditional seeds are derived.
SEED_STREAM = "unconditional"

GENERATION_COLUMNS = [
    "sample_index",
    "seed",
    "nearest_train_id",
    "nearest_distance",
    "mean_distance",
    "calibrated",
    "extracted",
    "nearest_l2",
    "nearest_tiled_l2",
    "n_nearest",
    "candidate_image",
]


@dataclass(frozen=True)
class UnconditionalConfig:
    """Parameters of ``memscan extract-unconditional`` (all recorded in the manifest).

    Parameters
    ----------
    samples : generations M (paper, CIFAR-10: 2^16 per model)
    seed : run seed; generation i uses ``derive_seed(seed, "unconditional", i)``
    n_nearest : n, the neighbourhood of the calibrated distance (paper: 50)
    alpha_c : α_c of the calibrated distance (paper: 0.5)
    metric : ``l2`` (paper) or ``tiled_l2`` for every distance
    grid : tiles per side for ``tiled_l2`` (and the reported ``nearest_tiled_l2``)
    n_candidates : with an embedding index, training images fetched per generation before the
        exact pixel re-rank (≥ n_nearest)
    prompt : what the generator is called with (unconditional models ignore it)
    batch_size : generations per model call (calls start at global multiples of it)
    shard_size : generations per shard (unit of commit and resume), rounded up to whole batches
        (:func:`shard_samples`): the generations do not depend on it
    device : ``cpu`` or ``cuda`` (model embedders of an index)
    save_images : write PNGs of extracted generations and their training images
    """

    samples: int = 1 << 16
    seed: int = 0
    n_nearest: int = 50
    alpha_c: float = 0.5
    metric: str = "l2"
    grid: int = 4
    n_candidates: int = 200
    prompt: str = ""
    batch_size: int = 64
    shard_size: int = 4096
    device: str = "cpu"
    save_images: bool = True

    def validate(self) -> UnconditionalConfig:
        CalibratedConfig(self.alpha_c, self.n_nearest, self.metric, self.grid).validate()
        for name in ("samples", "batch_size", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise InputError(
                    f"{name}={v!r} must be a positive integer",
                    f"e.g. --{name.replace('_', '-')} {getattr(type(self), name)}",
                )
        if self.n_candidates < self.n_nearest:
            raise InputError(
                f"n_candidates={self.n_candidates} is below n_nearest={self.n_nearest}",
                "fetch at least n_nearest candidates from the index",
            )
        if not (self.device in ("cpu", "cuda") or self.device.startswith("cuda:")):
            raise InputError(f"device={self.device!r}", "use cpu or cuda")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def shard_samples(config: UnconditionalConfig) -> int:
    """Generations per shard: ``shard_size`` rounded up to a whole number of ``batch_size``
    batches, so every model call covers the same samples whatever the shard size (a model's float
    rounding depends on its batch: a sample alone and in a batch of 64 can differ by a grey level).

    Examples
    --------
    >>> shard_samples(UnconditionalConfig(shard_size=4096, batch_size=64)), shard_samples(UnconditionalConfig(shard_size=100, batch_size=64))
    (4096, 128)
    """
    return math.ceil(config.shard_size / config.batch_size) * config.batch_size


@dataclass
class UnconditionalResult:
    """A finished unconditional run (tables also on disk in ``run_dir``)."""

    run_dir: Path
    generations: pd.DataFrame
    extractions: pd.DataFrame
    manifest: dict


class _Verifier:
    """n nearest training images of a batch of generations: exact, index + exact re-rank over
    the decoded training set, or — with an :class:`IndexVerification` instead of a training set —
    index + exact re-rank over just the retrieved images, read by random access (nothing else
    decoded)."""

    def __init__(self, training, config: UnconditionalConfig, index=None):
        self.training, self.config = training, config
        self.index, self.via = None, None
        if isinstance(training, IndexVerification):  # through the index: the training set is never decoded
            self.via = open_index_verifier(training)
            self.index, self.embedder = self.via.index, self.via.embedder
            self.ids, self.captions = self.index.ids, self.index.captions
            self.n = min(config.n_nearest, len(self.index))
            self.description = {
                "search": "index",
                "method": (
                    f"{self.index.params.index_type} embedding index, {config.n_candidates} retrieved training "
                    f"images per generation read by random access and re-ranked by exact {config.metric}"
                ),
                "index": training.index,
                "index_type": self.index.params.index_type,
                "index_params": asdict(self.index.params),
                "retrieve": config.n_candidates,
                "embedder": self.index.meta.get("embedder"),
                "training_decoded": False,
                "neighbourhood": f"the n nearest among the {config.n_candidates} retrieved training images",
            }
            return
        self.ids, self.captions = training.ids, training.captions
        self.n = min(config.n_nearest, len(training))
        if index is None:
            self.search = PixelSearch(training.images, grid=config.grid)
            self.description = {"search": "exact", "method": "faiss IndexFlatL2 over pixels, exact refinement"}
            return

        self.index = index if isinstance(index, TrainingIndex) else TrainingIndex.load(index)
        self.embedder = load_embedder(
            self.index.meta.get("embedder", "pixel"), device=config.device, batch_size=config.batch_size
        )
        row = {tid: k for k, tid in enumerate(training.ids)}
        self.to_train = np.array([row.get(i, -1) for i in self.index.ids] + [-1], np.int64)
        unmatched = int((self.to_train[:-1] < 0).sum())
        if unmatched == len(self.index):
            raise InputError(
                "no id of the index is in the training set", "pass the training set the index was built from"
            )
        self.description = {
            "search": "index",
            "method": f"{self.index.params.index_type} embedding index, {config.n_candidates} candidates re-ranked by exact {config.metric}",
            "index": str(index) if not isinstance(index, TrainingIndex) else None,
            "index_params": asdict(self.index.params),
            "embedder": self.index.meta.get("embedder"),
            "index_ids_not_in_training_set": unmatched,
        }

    def neighbours(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        """Ascending distances (Q×n, ``inf`` where fewer were found), training rows (Q×n, -1
        where none), the nearest training image of each generation (zeros where none) and what
        was read (through the index only: :class:`RetrievalStats` counts)."""
        if self.via is not None:
            return self._neighbours_via_index(images)
        if self.index is None:
            nb = self.search.search(images, k=self.n, metric=self.config.metric)
            dist, rows = nb.distances, nb.indices
        else:
            _, ii = self.index.search(self.embedder.embed(images), self.config.n_candidates)
            cand = self.to_train[np.where(ii >= 0, ii, len(self.to_train) - 1)]
            d = pixel_distances(images, self.training.images, cand, self.config.metric, self.config.grid)
            order = rowsort(d, cand)
            dist, rows = np.take_along_axis(d, order, 1)[:, : self.n], np.take_along_axis(cand, order, 1)[:, : self.n]
        nearest = np.zeros_like(images)
        ok = rows[:, 0] >= 0
        nearest[ok] = self.training.images[rows[ok, 0]]
        return dist, rows, nearest, {}

    def _neighbours_via_index(self, images: np.ndarray):
        """The same steps as :func:`memscan.extraction.verify_index.verify_candidates_indexed`:
        embed, retrieve ``n_candidates``, read each retrieved image once, exact distances — in
        chunks of generations whose retrieved images stay within
        :data:`~memscan.extraction.verify_index.VERIFY_CHUNK_BYTES`."""
        per = max(1, VERIFY_CHUNK_BYTES // max(1, self.config.n_candidates * int(np.prod(images.shape[1:]))))
        parts = [self._chunk_via_index(images[s : s + per]) for s in range(0, len(images), per)]
        stats = RetrievalStats()
        for p in parts:
            stats.add(p[3])
        cat = np.concatenate
        return (
            cat([p[0] for p in parts]),
            cat([p[1] for p in parts]),
            cat([p[2] for p in parts]),
            stats.to_dict(limit=None),
        )

    def _chunk_via_index(self, images: np.ndarray):
        stats = RetrievalStats(candidates=len(images))
        with verification_threads(len(images)):
            # 1. embed with the index's embedder; the top n_candidates index rows of each generation
            _, ii = self.index.search(self.embedder.embed(images), self.config.n_candidates)
            # 2. read each retrieved image once (deduplicated), at the generations' resolution
            wanted = np.unique(ii[ii >= 0])
            stats.retrieved = int((ii >= 0).sum())
            # an approximate index may return fewer than asked: the calibrated mean is then over fewer
            stats.fewer_than_k = int(((ii >= 0).sum(1) < min(self.config.n_candidates, len(self.index))).sum())
            before = self.via.reader.bytes_read
            kept, decoded, skipped = self.via.reader.read(wanted, size=images.shape[1:3], channels=images.shape[3])
            stats.decoded, stats.bytes_read = len(kept), self.via.reader.bytes_read - before
            stats.skipped = skipped
            # 3. exact pixel distances to the readable ones; unreadable or missing: -1 (inf)
            at = np.full(len(self.index) + 1, -1, np.int64)
            at[kept] = np.arange(len(kept))
            pos = at[np.where(ii >= 0, ii, len(self.index))]
            d = pixel_distances(images, decoded, pos, self.config.metric, self.config.grid)
            cand = np.where(pos >= 0, ii, -1)
            order = rowsort(d, np.where(cand >= 0, cand, np.iinfo(np.int64).max))
            dist = np.take_along_axis(d, order, 1)[:, : self.n]
            rows = np.take_along_axis(cand, order, 1)[:, : self.n]
            best = np.take_along_axis(pos, order, 1)[:, 0]
        nearest = np.zeros_like(images)
        nearest[best >= 0] = decoded[best[best >= 0]]
        return dist, rows, nearest, stats.to_dict(limit=None)


def _calibrated_rows(d: np.ndarray, alpha_c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Calibrated distance per row over its finite entries (an index may return fewer than n),
    summed in float64 as :func:`~memscan.extraction.calibrated.calibrated_from_neighbours` does
    (float32 sums moved ℓ by up to 1.5·10⁻⁷, so a near-tie at 1 could be decided differently)."""
    d = np.asarray(d, dtype=np.float64)
    finite = np.isfinite(d)
    n_used = finite.sum(1)
    dz = np.where(finite, d, 0.0)
    nearest = np.where(n_used > 0, np.where(finite, d, np.inf).min(1), np.nan)
    mean = np.divide(dz.sum(1), n_used, out=np.full(d.shape[0], np.nan), where=n_used > 0)
    denom = alpha_c * mean
    cal = np.divide(nearest, denom, out=np.where(n_used > 0, 0.0, np.nan), where=denom > 0)
    return cal, nearest, mean, n_used


def extract_unconditional(
    generator,
    train,
    out: str | Path,
    config: UnconditionalConfig = UnconditionalConfig(),
    *,
    index=None,
    resume: bool = False,
    progress: bool = True,
    stop_after_shards: int | None = None,
    runner: str = "local",
    runner_options=None,
    model_id: str | None = None,
) -> UnconditionalResult:
    """Generate ``config.samples`` images and verify each with the calibrated distance.

    Parameters
    ----------
    generator : a :class:`memscan.generators.Generator` (called with ``config.prompt``), or a
        ``--model`` spec (a string or :class:`memscan.runners.GeneratorSpec`) that each worker
        loads; the Ray runner needs a spec
    train : training set path (any layout) or a loaded :class:`~memscan.data.training.TrainingSet`;
        with an index folder, optional (the index records its source) — where the indexed
        images are now
    out : run directory (opened with :func:`memscan.store.open_run`, kind ``extract-unconditional``)
    config : :class:`UnconditionalConfig`
    index : None (exact pixel search); an index folder (``memscan index``): each generation's
        ``n_candidates`` most similar training images are retrieved, read by random access and
        re-ranked by exact pixel distance — the training set is never decoded whole, by the
        driver or by any worker (:mod:`memscan.extraction.verify_index`); or a loaded
        :class:`~memscan.index.faiss_index.TrainingIndex` with ``train`` (decoded) to re-rank on
    resume : finish a killed run in ``out``; committed shards are kept. The resumed run must be
        the same run — same model (``model_spec``, ``generator``), training set
        (``training_set_sha256``, or the index in ``search``), config, shard count and output
        shape — else it is refused before any worker starts (docs/reliability.md)
    stop_after_shards : stop after this many new shards (for tests of resume)
    runner : ``"local"`` or ``"ray"`` (a pool of Ray actors running the same stage over the same
        shards; see docs/scale.md); either runner can resume a run the other started
    runner_options : :class:`memscan.runners.RayOptions` (or a dict of its fields) for ``"ray"``
    model_id : the ``--model`` spec recorded in the manifest's ``model`` record when
        ``generator`` is a loaded object

    Examples
    --------
    >>> import tempfile
    >>> from memscan.synthetic import SyntheticGenerator, write_training_set
    >>> d = tempfile.mkdtemp()
    >>> _ = write_training_set(f"{d}/train", 60, size=16)
    >>> gen = SyntheticGenerator({"": "t0007"}, size=16, copy_rate=0.25)
    >>> cfg = UnconditionalConfig(samples=40, n_nearest=20, shard_size=16)
    >>> r = extract_unconditional(gen, f"{d}/train", f"{d}/run", cfg, progress=False)
    >>> r.extractions["train_id"].tolist(), int(r.extractions["hits"].iloc[0]) > 1
    (['t0007'], True)
    """
    config = config.validate()
    if runner == "ray" and isinstance(index, TrainingIndex):
        raise InputError(
            "the Ray runner loads the index in each worker, but got a loaded TrainingIndex",
            "pass the index folder (memscan index TRAIN --out INDEX) instead",
        )
    if isinstance(index, (str, Path)) and not isinstance(train, TrainingSet):
        # through the index folder: only the retrieved images are ever decoded
        train = IndexVerification(
            str(Path(index).resolve()), config.n_candidates, str(Path(train).resolve()) if train is not None else None,
            device=config.device,
        ).validate()  # fmt: skip
        open_index_verifier(train)  # a missing or damaged index (or source) fails before any run is written
        index = None
    elif train is None:
        raise InputError("extract-unconditional needs the training set", "pass --train TRAIN, or --index INDEX")
    # the model and the training set (listed once, not decoded): a resume with others is refused below
    if isinstance(train, (str, Path)):
        train = list_source(train)
    inputs = {
        "model_spec": generator_record(generator, None, model_id)["id"],
        "training_set_sha256": None if isinstance(train, IndexVerification) else training_set_sha256(train),
    }
    started = time.time()
    with open_run(out, "extract-unconditional", resume=resume) as run:
        run.check(inputs, tuple(inputs))  # before the workers load the model or any image is decoded
        index_arg = str(Path(index).resolve()) if isinstance(index, (str, Path)) else index
        with model_pool(
            runner, setup_unconditional, generator, config, run.store, runner_options, (index_arg,)
        ) as pool:
            return _run(
                run, pool, generator, model_id, inputs, train, config, index, progress, stop_after_shards, started
            )


@dataclass
class UnconditionalWorker:
    """A worker's context: its generator, the config, the run store, the index to search (if
    any) and the verifier, built on the first shard from the shared training set."""

    generator: object
    config: UnconditionalConfig
    store: RunStore
    index: object = None
    verifier: _Verifier | None = None

    def verifier_for(self, training) -> _Verifier:
        if self.verifier is None:
            self.verifier = _Verifier(training, self.config, self.index)
        return self.verifier


def setup_unconditional(generator, config: UnconditionalConfig, store_root: str, index=None) -> UnconditionalWorker:
    """Load the generator (when given as a spec) and open the run store; once per worker."""
    store = worker_store(store_root)
    return UnconditionalWorker(load_worker_generator(generator), config, store, index)


def search_description(worker: UnconditionalWorker, training) -> dict:
    """The verifier's description for the manifest (built in the worker that answers)."""
    return worker.verifier_for(training).description


def unconditional_stage(
    worker: UnconditionalWorker, shard: int, lo: int, hi: int, shape: tuple, training, progress=None
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Generate samples ``lo..hi-1`` → their n nearest training images → the calibrated decision.

    Returns ``({"generations": table}, meta)`` (meta: samples and timings of the shard).
    """
    config, generator, store = worker.config, worker.generator, worker.store
    verifier = worker.verifier_for(training)
    shape = tuple(shape)
    rows, gen_s, ver_s = [], 0.0, 0.0
    retrieval = RetrievalStats() if verifier.via is not None else None
    for b in range(lo, hi, config.batch_size):
        idx = list(range(b, min(hi, b + config.batch_size)))
        seeds = [derive_seed(config.seed, SEED_STREAM, i) for i in idx]
        t0 = time.perf_counter()
        with user_code(f"the generator failed in shard {shard} (samples {idx[0]}–{idx[-1]})"):
            made = generator.generate(config.prompt, seeds)  # user code: fails as one clean error
        images = check_generations(made, len(seeds), config.prompt)
        if images.shape[1:] != shape:
            raise MemscanError(f"generator returned {images.shape[1:]} images, expected {shape}", "return one size")
        t1 = time.perf_counter()
        rows.extend(_judge(images, idx, seeds, verifier, training, config, store, retrieval))
        ver_s += time.perf_counter() - t1
        gen_s += t1 - t0
        if progress is not None:
            progress(len(idx))
    table = pd.DataFrame(rows, columns=GENERATION_COLUMNS)
    meta = {"samples": hi - lo, "generation_s": round(gen_s, 3), "verification_s": round(ver_s, 3)}
    if retrieval is not None:
        meta["retrieval"] = retrieval.to_dict(limit=None)  # the shard record: complete lists
    return {"generations": table}, meta


def _judge(images, idx, seeds, verifier, training, config, store, retrieval=None) -> list[dict]:
    """One row per generation of a batch: nearest training image, distances, calibrated decision
    (``retrieval``: what reading through the index cost is added to it)."""
    dist, nn, nearest_images, read = verifier.neighbours(images)
    if retrieval is not None and read:
        retrieval.add(read)
    cal, nearest, mean, n_used = _calibrated_rows(dist, config.alpha_c)
    best = nn[:, 0]
    ok = best >= 0
    l2_near = np.full(len(idx), np.nan)
    tl2_near = np.full(len(idx), np.nan)
    if ok.any():
        ref = nearest_images[ok]
        if config.metric == "l2":
            l2_near[ok] = nearest[ok]
        else:
            l2_near[ok] = tiled_l2(images[ok], ref, grid=1)
        tl2_near[ok] = nearest[ok] if config.metric == "tiled_l2" else tiled_l2(images[ok], ref, grid=config.grid)
    rows = []
    for j, i in enumerate(idx):
        extracted = bool(cal[j] < 1.0)
        path = None
        if extracted and config.save_images:
            path = store.save_image(images[j], "candidates", f"u{i:08d}")
        rows.append(
            {
                "sample_index": i,
                "seed": seeds[j],
                "nearest_train_id": verifier.ids[int(best[j])] if best[j] >= 0 else None,
                "nearest_distance": float(nearest[j]),
                "mean_distance": float(mean[j]),
                "calibrated": float(cal[j]),
                "extracted": extracted,
                "nearest_l2": float(l2_near[j]),
                "nearest_tiled_l2": float(tl2_near[j]),
                "n_nearest": int(n_used[j]),
                "candidate_image": path,
            }
        )
    return rows


def _run(run: Run, pool, generator, model_id, inputs, train, config, index, progress, stop_after_shards, started):
    store = run.store
    # 1. the training set at the generator's resolution, and the searcher over it
    probe = pool.call(
        probe_generator,
        config.prompt,
        derive_seed(config.seed, SEED_STREAM, 0),
        "the generator failed on its first call (sample 0, before any shard)",
    )
    shape = tuple(probe.shape)
    via = open_index_verifier(train) if isinstance(train, IndexVerification) else None
    if via is not None:  # through the index: nothing decoded here
        training, summary, n_train = train, via.summary(shape), len(via.index)
    else:
        training = training_at_shape(train, shape, store.log)
        summary, n_train = training.summary(), len(training)
    # Ray: one copy in the object store per node (with an index: the small IndexVerification
    # record; each worker opens the index memory-mapped)
    shared_training = pool.share(training)
    search = pool.call(search_description, shared_training)
    if isinstance(index, (str, Path)):
        search = {**search, "index": str(index)}
    per_shard = shard_samples(config)  # whole batches: the generations do not depend on the shard size
    n_shards = math.ceil(config.samples / per_shard)
    n_effective = min(config.n_nearest, n_train)
    fields = {
        "config": config.to_dict(),
        "calibrated": {
            "alpha_c": config.alpha_c,
            "n": n_effective,
            "n_requested": config.n_nearest,
            "n_effective": n_effective,
            "metric": config.metric,
            "rule": "extracted when l2(x, nearest) / (alpha_c * mean l2 to the n nearest) < 1",
            "duplicates": "copies of the nearest training image among the n nearest count in the mean "
            "(the paper's formula)",
        },
        "shard_samples": per_shard,
        "generator": generator_identity(probe.description),
        "model": generator_record(generator, probe.parameters, model_id),
        **inputs,  # model_spec, training_set_sha256
        "runner": pool.describe(),
        "output_shape": list(shape),
        "training_set": summary,
        "search": search,
        "n_shards": n_shards,
        "seeds": {"run_seed": config.seed, "derivation": f"derive_seed(run_seed, {SEED_STREAM!r}, sample_index)"},
    }
    identity = ("config", "n_shards", "shard_samples", "output_shape", "search", *inputs, "generator")
    run.start(fields, identity=identity, started=started)  # a resume of another run is refused: nothing written
    store.log(
        f"extract-unconditional: {config.samples} generations in {n_shards} shards of {per_shard} "
        f"({search['search']} search)"
    )
    if per_shard != config.shard_size:
        store.log(f"shard size {config.shard_size} rounded up to {per_shard}: whole batches of {config.batch_size}")
    if n_effective < config.n_nearest:
        store.log(_small_neighbourhood_warning(config, n_train))

    # 2. shards of generations: generate → n nearest → calibrated decision → commit (in the driver)
    bounds = {s: (s * per_shard, min(config.samples, (s + 1) * per_shard)) for s in range(n_shards)}
    run_shards(
        run,
        pool,
        unconditional_stage,
        {s: (s, lo, hi, shape, shared_training) for s, (lo, hi) in bounds.items()},
        weights={s: hi - lo for s, (lo, hi) in bounds.items()},
        label="generate + verify",
        unit="images",
        progress=progress,
        stop_after_shards=stop_after_shards,
        describe=lambda s, t: (
            f"{len(t['generations'])} generations, {int(t['generations']['extracted'].sum())} extracted"
        ),
    )

    # 3. merge, de-duplicate extractions by training image, save their images, record throughput
    generations = store.merge(n_shards, tables=("generations",))["generations"]
    extractions = dedupe_extractions(generations, via.index if via is not None else training)
    if config.save_images and len(extractions):
        if via is not None:  # the extracted training images alone, read by random access
            row = {tid: k for k, tid in enumerate(via.index.ids)}
            kept, imgs, _ = via.reader.read([row[t] for t in extractions["train_id"]], shape[:2], shape[2])
            for r, img in zip(kept, imgs):
                store.save_image(img, "train", safe_name(via.index.ids[int(r)]))
        else:
            row = {tid: k for k, tid in enumerate(training.ids)}
            for tid in extractions["train_id"]:
                store.save_image(training.images[row[tid]], "train", safe_name(tid))
    write_table(extractions, store.root / "extractions.parquet")
    recs = [store.shard_record(s) for s in range(n_shards)]
    gen_total = sum(r.get("generation_s", 0) for r in recs)
    ver_total = sum(r.get("verification_s", 0) for r in recs)
    extra = {}
    if via is not None:  # what verification through the index read, summed over shards
        retrieval = RetrievalStats()
        for r in recs:
            retrieval.add(r.get("retrieval", {}))
        retrieval.log(store.log)
        extra["retrieval"] = retrieval.to_dict()
    manifest = run.finish(
        **extra,
        throughput={
            "generation_seconds": round(gen_total, 3),
            "generation_images_per_s": round(len(generations) / gen_total, 2) if gen_total else None,
            "verification_seconds": round(ver_total, 3),
            "verification_images_per_s": round(len(generations) / ver_total, 2) if ver_total else None,
        },
        counts={
            "samples": int(len(generations)),
            "extracted_generations": int(generations["extracted"].sum()),
            "extracted_training_images": int(len(extractions)),
        },
    )
    store.log(f"extract-unconditional: complete — {manifest['counts']}")
    return UnconditionalResult(store.root, generations, extractions, manifest)


def _small_neighbourhood_warning(config: UnconditionalConfig, n_train: int) -> str:
    """The ``run.log`` warning for a training set smaller than ``n_nearest``."""
    text = (
        f"warning: the training set holds {n_train} images, fewer than n_nearest={config.n_nearest}: the calibrated "
        f"distance averages over all {n_train} (n_effective={n_train}), a smaller neighbourhood than the paper's"
    )
    if n_train == 1:
        text += f"; with one image every generation gets l = 1/alpha_c = {1 / config.alpha_c:g}, so none is extracted"
    return text


def dedupe_extractions(generations: pd.DataFrame, training) -> pd.DataFrame:
    """One row per extracted training image: its closest generation, and how many hit it
    (``training``: anything with ``ids`` and ``captions`` — a training set or an index)."""
    ext = generations[generations["extracted"]]
    cols = [
        "train_id",
        "train_caption",
        "hits",
        "sample_index",
        "seed",
        "calibrated",
        "nearest_distance",
        "mean_distance",
        "nearest_l2",
        "nearest_tiled_l2",
        "sample_indices",
        "candidate_image",
        "train_image",
    ]
    if ext.empty:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in cols})
    caption = dict(zip(training.ids, training.captions))
    ext = ext.sort_values(["calibrated", "sample_index"])
    rows = []
    for tid, g in ext.groupby("nearest_train_id", sort=False):
        first = g.iloc[0]
        rows.append(
            {
                "train_id": tid,
                "train_caption": caption.get(tid, ""),
                "hits": int(len(g)),
                "sample_index": int(first["sample_index"]),
                "seed": int(first["seed"]),
                "calibrated": float(first["calibrated"]),
                "nearest_distance": float(first["nearest_distance"]),
                "mean_distance": float(first["mean_distance"]),
                "nearest_l2": float(first["nearest_l2"]),
                "nearest_tiled_l2": float(first["nearest_tiled_l2"]),
                "sample_indices": sorted(int(v) for v in g["sample_index"]),
                "candidate_image": first["candidate_image"],
                "train_image": f"images/train/{safe_name(tid)}.png",
            }
        )
    return pd.DataFrame(rows, columns=cols).sort_values(["calibrated", "train_id"]).reset_index(drop=True)
