"""The language-model workers: setup and stages of ``lm-extractable`` and ``lm-exposure``, as every
runner calls them.

``setup_lm`` runs once per worker and loads the causal LM from its ``--model`` spec (each Ray actor
loads its own; the local runner may be handed the model the driver loaded). The stages work on one
shard each and return ``(tables, meta)``; the driver commits them
(:func:`memscan.runners.shards.run_shards`). Inside a shard the rows go through the model in
batches of ``batch_size`` in shard order, so the batches — and so the numbers, to the last bit —
are the same on every runner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan.errors import InputError, user_code
from memscan.generators.causal_lm import NEAR_TIE, describe_lm, load_causal_lm
from memscan.lm.exposure import (
    CanaryFormat,
    canary_log_perplexity,
    compare_to_canary,
    count_lower,
    sample_secrets,
    skewnorm_exposure,
)
from memscan.lm.memorization import (
    PYTHIA_LENGTH,
    exact_memorization,
    k_extractable,
    match_fraction,
    samples_needed,
    suffix_log_probability,
    teacher_forced,
)
from memscan.runners import RayOptions, WorkerPool, make_pool, require_ray


@dataclass
class LMWorker:
    """A worker's context: its causal LM."""

    lm: Any


def setup_lm(model: Any, device: str = "cpu", dtype: str = "auto") -> LMWorker:
    """Load the causal LM (when given as a spec); once per worker."""
    if isinstance(model, (str, Path)):
        with user_code(f"loading the language model {model} failed", "fix the model and rerun"):
            return LMWorker(load_causal_lm(str(model), device=device, dtype=dtype))
    return LMWorker(model)


def describe_lm_worker(worker: LMWorker) -> dict:
    """The model as the worker loaded it: its record and parameter count."""
    return {"describe": describe_lm(worker.lm), "parameters": getattr(worker.lm, "parameters", None)}


def lm_pool(runner: str, model: Any, *, device: str = "cpu", dtype: str = "auto", options=None, log=None) -> WorkerPool:
    """The worker pool for ``runner``: the local runner takes a loaded model or a spec; the Ray
    runner a spec (each worker loads its own model)."""
    if runner != "ray":
        return make_pool(runner, setup_lm, (model, device, dtype), options, log=log)
    require_ray()
    if not isinstance(model, (str, Path)):
        raise InputError(
            f"the Ray runner loads the model in each worker, but got a loaded {type(model).__name__}",
            "pass the --model directory, .gguf file, hub id or py: spec",
        )
    opts = options if isinstance(options, RayOptions) else RayOptions(**(options or {}))
    if str(device).startswith("cuda") and opts.gpus_per_worker <= 0:
        raise InputError(f"device={device} but the Ray workers ask for no GPU", "pass --gpus-per-worker 1")
    if str(device).startswith("cuda:"):
        device = "cuda"
    spec = str(model)
    if not spec.startswith("py:") and Path(spec).expanduser().exists():
        spec = str(Path(spec).expanduser().resolve())
    return make_pool("ray", setup_lm, (spec, device, dtype), opts, log=log)


# ---- lm-extractable


def _leading_matches(greedy: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Tokens from the start of the suffix that the greedy continuation gets right, per row."""
    eq = greedy == true
    return np.where(eq.all(axis=1), eq.shape[1], np.argmin(eq, axis=1))


def _after_start(x: np.ndarray, token: int) -> np.ndarray:
    """``x`` (B×T) with the document-start ``token`` put before every row."""
    return np.concatenate([np.full((len(x), 1), token, dtype=np.int64), x], axis=1)


def _groups(at_start: np.ndarray, token: int | None):
    """``(rows, after_start)`` of the batch: the rows fed as they are, then (with a ``token``) the
    rows whose prefix starts its document, fed after the token (equal lengths within each group)."""
    if token is None or not at_start.any():
        return [(np.ones(len(at_start), dtype=bool), False)]
    return [(rows, after) for rows, after in ((~at_start, False), (at_start, True)) if rows.any()]


def greedy_in_context(lm, prefixes: np.ndarray, n_new: int, at_start: np.ndarray, token: int | None):
    """``lm.greedy`` of each row's prefix, a row with ``at_start`` decoded after the document-start
    ``token`` (the other rows as they are): ``(tokens B×n_new, top2_gap B×n_new)``."""
    tokens = np.zeros((len(prefixes), n_new), dtype=np.int64)
    gaps = np.zeros((len(prefixes), n_new), dtype=np.float64)
    for rows, after in _groups(at_start, token):
        x = _after_start(prefixes[rows], token) if after else prefixes[rows]
        g, gap = lm.greedy(x, n_new)
        tokens[rows], gaps[rows] = np.asarray(g, dtype=np.int64), np.asarray(gap, dtype=np.float64)
    return tokens, gaps


def teacher_forced_in_context(lm, windows: np.ndarray, k: int, at_start: np.ndarray, token: int | None, **scheme):
    """:func:`~memscan.lm.memorization.teacher_forced` of the tokens after each row's ``k``-token
    prefix, a row with ``at_start`` scored after the document-start ``token``: ``(argmax, log_q)``."""
    width = windows.shape[1] - k
    argmax = np.zeros((len(windows), width), dtype=np.int64)
    log_q = np.zeros((len(windows), width), dtype=np.float64)
    for rows, after in _groups(at_start, token):
        x = _after_start(windows[rows], token) if after else windows[rows]
        argmax[rows], log_q[rows] = teacher_forced(lm, x, k - 1 + int(after), **scheme)
    return argmax, log_q


def extractable_stage(
    worker: LMWorker,
    seq_ids: np.ndarray,
    windows: np.ndarray,
    left: int,
    config: dict,
    starts: np.ndarray | None = None,
    start_token: int | None = None,
    progress=None,
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Every measure of :mod:`memscan.lm.memorization` for one shard of sequences.

    ``windows[i]`` holds the sequence's tokens; the suffix starts at ``left``; ``starts[i]`` is
    the document token index of ``windows[i, 0]`` (``None``: no window starts its document). A
    prefix that starts at token 0 of its document is greedily decoded and scored after
    ``start_token`` (the document-start token, :func:`memscan.lm.decoding.document_start`; ``None``:
    nothing is put before it); other prefixes are fed as they are. Returns one row per sequence
    and prefix length (``sequences``), and ``meta`` with counts and timings.
    """
    lm = worker.lm
    m = int(config["suffix_length"])
    ks = [int(k) for k in config["prefix_lengths"]]
    bs = int(config["batch_size"])
    scheme = {"temperature": config["temperature"], "top_k": config["top_k"], "top_p": config["top_p"]}
    t0 = time.perf_counter()
    rows: list[dict] = []
    for lo in range(0, len(seq_ids), bs):
        w = np.asarray(windows[lo : lo + bs], dtype=np.int64)
        ids = np.asarray(seq_ids[lo : lo + bs])
        # the rows whose k-token prefix (document tokens first + left − k …) starts its document
        first = None if starts is None else np.asarray(starts[lo : lo + bs], dtype=np.int64)
        at_start = {
            k: np.zeros(len(ids), dtype=bool) if first is None else first + left - k == 0 for k in {*ks, PYTHIA_LENGTH}
        }
        which = f"sequences {int(ids[0])}…{int(ids[-1])}"
        true = w[:, left : left + m]
        true32 = w[:, left : left + PYTHIA_LENGTH]
        # the Pythia score's 32 greedy tokens: from the k = 32 continuation when there is one
        # (the same prefix, the same batch: the same tokens), else decoded on their own
        g32 = None
        if PYTHIA_LENGTH not in ks or m < PYTHIA_LENGTH:
            with user_code(f"the language model failed on {which}"):
                g32, _ = greedy_in_context(
                    lm, w[:, left - PYTHIA_LENGTH : left], PYTHIA_LENGTH, at_start[PYTHIA_LENGTH], start_token
                )
        results = {}
        for k in ks:
            with user_code(f"the language model failed on {which} (prefix {k})"):
                greedy, gaps = greedy_in_context(lm, w[:, left - k : left], m, at_start[k], start_token)
                argmax, log_q = teacher_forced_in_context(
                    lm, w[:, left - k : left + m], k, at_start[k], start_token, **scheme
                )
            results[k] = (greedy, gaps, argmax, log_q)
            if k == PYTHIA_LENGTH and g32 is None:
                g32 = np.asarray(greedy)[:, :PYTHIA_LENGTH]
        pythia = match_fraction(g32, true32)
        for k in ks:
            greedy, gaps, argmax, log_q = results[k]
            greedy, gaps = np.asarray(greedy, dtype=np.int64), np.asarray(gaps, dtype=np.float64)
            ext = k_extractable(greedy, true)
            frac = match_fraction(greedy, true)
            mf = exact_memorization(argmax, true)
            log_p = suffix_log_probability(log_q)
            n50, n90 = samples_needed(log_p, 0.5), samples_needed(log_p, 0.9)
            lead = _leading_matches(greedy, true)
            for i in range(len(ids)):
                rows.append(
                    {
                        "seq_id": int(ids[i]),
                        "prefix_len": k,
                        "suffix_len": m,
                        "extractable": bool(ext[i]),
                        "match_fraction": float(frac[i]),
                        "matched_leading_tokens": int(lead[i]),
                        "pythia_score": float(pythia[i]),
                        "pythia_extractable": bool(pythia[i] == 1.0),
                        "exact_memorization": float(mf[i]),
                        "log_p_sample": float(log_p[i]),
                        "p_sample": float(np.exp(log_p[i])),
                        "n_samples_50": float(n50[i]),
                        "n_samples_90": float(n90[i]),
                        "near_ties": int(np.sum(gaps[i] < NEAR_TIE)),
                        "min_top2_gap": float(gaps[i].min()) if gaps.shape[1] else float("nan"),
                        "prefix_text": lm.decode(w[i, left - k : left]),
                        "suffix_text": lm.decode(true[i]),
                        "greedy_text": lm.decode(greedy[i]),
                        "suffix_matched_text": lm.decode(true[i, : lead[i]]),
                        "suffix_rest_text": lm.decode(true[i, lead[i] :]),
                    }
                )
        if progress is not None:
            progress(len(ids))
    table = pd.DataFrame(rows)
    return {"sequences": table}, {"sequences": int(len(seq_ids)), "seconds": round(time.perf_counter() - t0, 3)}


# ---- lm-exposure


def exposure_stage(worker: LMWorker, part: dict, progress=None) -> tuple[dict[str, pd.DataFrame], dict]:
    """One part of one canary's exposure: an exact count over candidates ``lo ≤ r < hi``, or the
    skew-normal estimate from ``samples`` uniform candidates (:mod:`memscan.lm.exposure`).

    The canary is compared with each candidate scored in the same batch as it
    (:func:`~memscan.lm.exposure.compare_to_canary`); its reported ``log_perplexity`` is the one
    scored alone, the same in every shard."""
    lm = worker.lm
    t0 = time.perf_counter()
    fmt = CanaryFormat.parse(part["format"])
    secret = fmt.index_of(part["canary"])
    where = f"the language model failed on canary {part['canary_id']}"
    row = {"canary_id": part["canary_id"], "method": part["method"], "lo": part["lo"], "hi": part["hi"]}
    with user_code(where):
        # 1. the canary alone: the log-perplexity the run reports
        px = canary_log_perplexity(lm, part["canary"])
        if part["method"] == "exact":
            # 2. exact: the other candidates of [lo, hi) below / equal to the canary
            lower, ties = count_lower(
                lm, fmt, part["canary"], part["lo"], part["hi"], canary_px=px, batch_size=part["batch_size"]
            )
            row.update(
                n_lower=lower, n_ties=ties, candidates=part["hi"] - part["lo"] - int(part["lo"] <= secret < part["hi"])
            )
            est = {}
        else:
            # 2. estimate: uniform samples of R, their counts, and the skew-normal fit
            secrets = sample_secrets(fmt, part["samples"], part["seed"])
            texts = [fmt.fill(int(r)) for r in secrets]
            sample_px, lower, ties = compare_to_canary(lm, texts, part["canary"], px, batch_size=part["batch_size"])
            est = skewnorm_exposure(sample_px, px, space_size=fmt.space_size)
            row.update(n_lower=lower, n_ties=ties, candidates=len(secrets))
    row["log_perplexity"] = px
    row["estimate_exposure"] = float(est.get("exposure", np.nan))
    row["extrapolated_exposure"] = float(est.get("extrapolated_exposure", np.nan))
    for key in ("skewnorm_a", "skewnorm_loc", "skewnorm_scale"):
        row[key] = float(est.get(key, np.nan))
    if progress is not None:
        progress(row["candidates"])
    return {"parts": pd.DataFrame([row])}, {
        "candidates": row["candidates"],
        "seconds": round(time.perf_counter() - t0, 3),
    }
