"""The stage function over one shard of prompts: generate → detect → verify.

The local runner loops over shards with it; a distributed runner maps the very same function
over the same shards. It reads its inputs, writes its images and returns its tables; committing
them (the completion record) is the runner's job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from memscan.data.images import montage
from memscan.data.training import TrainingSet
from memscan.errors import InputError, user_code
from memscan.extraction.config import ExtractConfig
from memscan.extraction.detect import DETECT_BATCH_BYTES, DETECT_BATCH_PROMPTS, detect, detect_many
from memscan.extraction.verify import verify_candidates
from memscan.extraction.verify_index import IndexVerification, open_index_verifier, verify_candidates_indexed
from memscan.generators.base import check_generations
from memscan.generators.seeds import derive_seed, derive_seeds
from memscan.store import RunStore, safe_name

DETECTION_COLUMNS = [
    "prompt_id",
    "prompt",
    "train_id",
    "duplicate_count",
    "n_samples",
    "alpha",
    "min_clique",
    "clique_size",
    "clique_upper_bound",
    "clique_method",
    "mean_clique_distance",
    "medoid_index",
    "medoid_seed",
    "graph_edges",
    "median_pairwise_distance",
    "min_pairwise_distance",
    "detected",
    "candidate_image",
    "clique_image",
]


@dataclass
class ShardTimings:
    generation_s: float = 0.0
    detection_s: float = 0.0
    verification_s: float = 0.0
    images: int = 0
    prompts: int = 0
    extra: dict = field(default_factory=dict)


def run_shard(
    generator,
    prompts: pd.DataFrame,
    config: ExtractConfig,
    training: TrainingSet | IndexVerification,
    store: RunStore,
    progress=None,
) -> tuple[dict[str, pd.DataFrame], ShardTimings]:
    """Attack every prompt of one shard; returns ``{"detections": df, "extractions": df}``.

    ``training`` is the decoded training set, or an :class:`IndexVerification` (verify through
    the index: only each candidate's retrieved images are decoded; counts in ``timings.extra``).

    Generations live in memory only until the prompt's detection is done — batched over up to
    ``DETECT_BATCH_PROMPTS`` prompts (``DETECT_BATCH_BYTES`` of generations) with
    :func:`detect_many`; only the clique medoid and a montage of the clique are written (as PNG).
    """
    timings = ShardTimings()
    rows, cand_rows, cand_images = [], [], []
    pending: list = []  # generated prompts whose detection is batched (detect_many)
    # every generation has the run's output shape (the training set was decoded at it; through
    # the index: the shard's first generations fix it)
    expected = None if isinstance(training, IndexVerification) else tuple(training.images.shape[1:])
    for p in prompts.itertuples(index=False):
        # 1. generate, batch by batch, with per-sample seeds — in rounds when the budget is
        #    adaptive (config.rounds(): one round of samples_per_prompt otherwise)
        t0 = time.perf_counter()
        parts, made, found, t_detect = [], 0, None, 0.0
        for upto in config.rounds():
            for s in range(made, upto, config.batch_size):
                stop = min(upto, s + config.batch_size)
                seeds = derive_seeds(config.seed, p.prompt_id, s, stop)
                where = f"the generator failed on prompt {p.prompt_id} ({p.prompt[:60]!r}, samples {s}–{stop - 1})"
                with user_code(where):
                    made_now = generator.generate(p.prompt, seeds)  # user code: fails as one clean error
                batch = check_generations(made_now, len(seeds), p.prompt)
                expected = expected or tuple(batch.shape[1:])
                if tuple(batch.shape[1:]) != expected:
                    raise InputError(
                        f"the generator returned {tuple(batch.shape[1:])} images for prompt {p.prompt_id} "
                        f"({p.prompt[:60]!r}, samples {s}–{stop - 1}); the run's generations are {expected}",
                        "return one image size (H×W×C) for every prompt and seed",
                    )
                parts.append(batch)
                if progress is not None:
                    progress(stop - s)
            made = upto
            if upto == config.samples_per_prompt:
                break
            # 1b. adaptive rule: stop when no clique of continue_clique (no pair within alpha),
            #     or, with stop_when_detected, when the prompt is flagged already
            td = time.perf_counter()
            found = _detect(np.concatenate(parts), config)
            t_detect += time.perf_counter() - td
            if adaptive_stop(found, config):
                if progress is not None:
                    progress(config.samples_per_prompt - made)  # the budget not spent
                break
            found = None
        images = np.concatenate(parts)
        del parts
        timings.generation_s += time.perf_counter() - t0 - t_detect
        timings.detection_s += t_detect
        # 2. detect: pairwise tiled ℓ2 → largest clique, for a few prompts at once (done
        #    already if the last round decided); generations live until then
        pending.append((p, images, found))
        if len(pending) >= DETECT_BATCH_PROMPTS or sum(x[1].nbytes for x in pending) >= DETECT_BATCH_BYTES:
            _detect_pending(pending, config, store, timings, rows, cand_rows, cand_images)
    _detect_pending(pending, config, store, timings, rows, cand_rows, cand_images)
    # 4. verify the shard's candidates against the training set
    t2 = time.perf_counter()
    cand_df = pd.DataFrame(cand_rows, columns=DETECTION_COLUMNS)
    if isinstance(training, IndexVerification):  # through the index: only the retrieved are decoded
        stack = np.stack(cand_images) if cand_images else np.zeros((0, 1, 1, 3), np.uint8)
        extractions, timings.extra["retrieval"] = verify_candidates_indexed(
            cand_df, stack, open_index_verifier(training), delta=config.delta, grid=config.grid,
            n_nearest=config.n_nearest,
        )  # fmt: skip
    else:
        stack = np.stack(cand_images) if cand_images else np.zeros((0, *training.images.shape[1:]), np.uint8)
        extractions = verify_candidates(
            cand_df, stack, training, delta=config.delta, grid=config.grid, n_nearest=config.n_nearest
        )
    timings.verification_s = time.perf_counter() - t2
    detections = pd.DataFrame(rows, columns=DETECTION_COLUMNS)
    detections["duplicate_count"] = detections["duplicate_count"].astype("Int64")
    return {"detections": detections, "extractions": extractions}, timings


def adaptive_stop(found, config: ExtractConfig) -> bool:
    """The adaptive budget's rule after a round (:func:`stops`) for a detection result ``found``."""
    return stops(found.clique.size, found.detected, config)


def stops(clique_size: int, detected: bool, config: ExtractConfig) -> bool:
    """The adaptive budget's rule: stop when the largest clique of the generations so far has
    fewer than ``continue_clique`` members (2: no pair within alpha), or, with
    ``stop_when_detected``, when it has reached ``min_clique`` (the prompt is flagged already)."""
    return int(clique_size) < config.continue_clique or (config.stop_when_detected and bool(detected))


def _detect_pending(pending: list, config: ExtractConfig, store, timings, rows, cand_rows, cand_images) -> None:
    """Detect the pending prompts not decided yet (one :func:`detect_many` call), then write
    each prompt's row, in prompt order, and keep what a person will look at; empties
    ``pending``."""
    t1 = time.perf_counter()
    todo = [k for k, (_, _, found) in enumerate(pending) if found is None]
    found_now = detect_many(
        [pending[k][1] for k in todo],
        alpha=config.alpha,
        min_clique=config.min_clique,
        grid=config.grid,
        max_expansions=config.max_expansions,
        device=config.device,
    )
    for k, found in zip(todo, found_now):
        pending[k] = (*pending[k][:2], found)
    for p, images, found in pending:
        c = found.clique
        row = {
            "prompt_id": p.prompt_id,
            "prompt": p.prompt,
            "train_id": p.train_id,
            "duplicate_count": p.duplicate_count,
            "n_samples": len(images),
            "alpha": config.alpha,
            "min_clique": config.min_clique,
            **found.row(),
            "medoid_seed": str(derive_seed(config.seed, p.prompt_id, c.medoid)),
            "candidate_image": None,
            "clique_image": None,
        }
        # 3. keep what a person will look at: the medoid and the clique
        if found.detected:
            name = safe_name(p.prompt_id)
            row["candidate_image"] = store.save_image(images[c.medoid], "candidates", name)
            row["clique_image"] = store.save_image(montage(images[c.members[:100]], columns=10), "cliques", name)
            cand_rows.append(row)
            cand_images.append(images[c.medoid])
        rows.append(row)
        timings.images += len(images)
        timings.prompts += 1
    pending.clear()
    timings.detection_s += time.perf_counter() - t1


def _detect(images: np.ndarray, config: ExtractConfig):
    return detect(
        images,
        alpha=config.alpha,
        min_clique=config.min_clique,
        grid=config.grid,
        max_expansions=config.max_expansions,
    )
