"""The sampling stage of the sampling-and-ranking attack (Carlini et al. 2021, "Extracting Training
Data from Large Language Models", §5): draw samples from a causal LM and score each by the ranking
metrics of :mod:`memscan.lm.ranking`, one shard of samples at a time, on any runner.

Sampling (§5.1). Each sample starts from a prompt: the model's start-of-text token by default
(the paper's unconditional samples start from GPT-2's ``<|endoftext|>``; memscan takes the
model's BOS token, else its EOS token), or the prompts of a file (§5.1 "Conditioning on Internet
Text"), sample ``i`` taking prompt ``i mod P``. Decoding is top-k (k = 40, the paper's and its
released code's) with the **decaying temperature** of §5.1: "t = 10, decaying to t = 1 over a
period of the first 20 tokens" — the paper gives the end points and the period, not the shape;
memscan decays linearly, ``T_j = max(1, 10 − 9 · j / 20)`` for the j-th new token (j = 0, 1, …),
so the first 20 tokens are drawn hotter and token 20 on at T = 1 (:func:`temperature_schedule`).
Every sample draws its own uniforms from its own seed (:func:`sample_seed`, blake2b of the run
seed and the sample id), so it does not depend on the samples batched with it. A sample ends at
the model's EOS token, if one is drawn (the token is dropped).

Scoring. A sample's tokens are scored in the context of its prompt (the first generated token
predicted from the prompt): the target model's per-token log-probabilities give ``mean_nll``,
``perplexity``, ``zlib_ratio`` and ``min_window_perplexity``; the lowercased sample (re-encoded)
after the same prompt gives ``lowercase_ratio``; with a reference model, the sample re-encoded by
the reference's tokenizer after the prompt (its start token) gives ``reference_ratio``.
Sequences of equal length go through the model in batches of ``batch_size``, in sample order.
A re-encoded text may take more tokens than were sampled (another tokenizer, a lowercased word
split differently): one that would not fit the model's ``max_length`` positions after its
context is cut to them — its first tokens scored — and counted (``lowercase_cut``,
``reference_cut`` in the shard's record and the run's ``counts``). The driver refuses, before
any sample is drawn, a run whose prompt + ``length`` tokens exceed the positions of the model or
of the reference (:func:`memscan.lm.extract_run.lm_extract`).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan.errors import InputError, MemscanError, user_code
from memscan.lm import membership as ms
from memscan.lm import ranking as rk
from memscan.lm.decoding import check_scheme, document_start

__all__ = [
    "ExtractSampleWorker",
    "LmExtractConfig",
    "SAMPLE_COLUMNS",
    "describe_extract_worker",
    "sample_and_score_stage",
    "sample_seed",
    "setup_extract_worker",
    "start_ids",
    "temperature_schedule",
]

#: Carlini et al. 2021 §5.1: top-k = 40; temperature 10 → 1 over the first 20 tokens.
TOP_K = 40
T_START = 10.0
T_END = 1.0
DECAY_TOKENS = 20


@dataclass(frozen=True)
class LmExtractConfig:
    """Settings of an ``lm extract`` run (recorded in the manifest; a resumed run must match).

    samples : samples to draw
    length : new tokens per sample (the paper: 256)
    top_k : top-k of the sampler (0: off)
    top_p : nucleus of the sampler (1: off)
    temperature_start, temperature_end, decay_tokens : the decaying temperature
        (``temperature_start == temperature_end``: a constant temperature)
    window : tokens of the sliding window of ``min_window_perplexity``
    top : N of precision@N (the samples of each ranking confirmed and counted)
    min_match : the longest exact match with the corpus (tokens, or bytes for an index in bytes
        mode) that confirms a sample; ``None``: 50 tokens / 100 bytes
    batch_size : samples per decoding and scoring batch
    seed : the run seed (each sample's seed derives from it and its id)
    device, dtype : where and in what precision the model runs
    """

    samples: int = 1000
    length: int = 256
    top_k: int | None = TOP_K
    top_p: float | None = None
    temperature_start: float = T_START
    temperature_end: float = T_END
    decay_tokens: int = DECAY_TOKENS
    window: int = rk.WINDOW
    top: int = 100
    min_match: int | None = None
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"

    def validate(self) -> LmExtractConfig:
        checks = (
            (self.samples, "--samples", "e.g. --samples 1000"),
            (self.length, "--length", "e.g. --length 256"),
            (self.window, "--window", "e.g. --window 50"),
            (self.top, "--top", "e.g. --top 100"),
            (self.batch_size, "--batch-size", "e.g. --batch-size 32"),
        )
        for value, opt, hint in checks:
            if int(value) < 1:
                raise InputError(f"{opt} {value} must be ≥ 1", hint)
        if self.min_match is not None and int(self.min_match) < 1:
            raise InputError(f"--min-match {self.min_match} must be ≥ 1", "e.g. --min-match 50 (tokens)")
        if int(self.decay_tokens) < 0:
            raise InputError(f"--decay-tokens {self.decay_tokens} must be ≥ 0", "e.g. --decay-tokens 20")
        top_k = int(self.top_k) if self.top_k else None
        for t in (self.temperature_start, self.temperature_end):
            check_scheme(float(t), top_k, self.top_p)  # before 1 means "off": a top-p above 1 is refused
        top_p = float(self.top_p) if self.top_p is not None and self.top_p < 1 else None
        return LmExtractConfig(**{**asdict(self), "top_k": top_k, "top_p": top_p})

    def schedule(self) -> list[float]:
        return temperature_schedule(self.length, self.temperature_start, self.temperature_end, self.decay_tokens)

    def to_dict(self) -> dict:
        return asdict(self)


def temperature_schedule(
    n_new: int, start: float = T_START, end: float = T_END, decay_tokens: int = DECAY_TOKENS
) -> list[float]:
    """Per-token temperatures: linear from ``start`` (token 0) to ``end`` (token ``decay_tokens``
    and after), ``T_j = start + (end − start) · min(j, d) / d`` (Carlini et al. 2021, §5.1).

    >>> [round(t, 2) for t in temperature_schedule(4, 10, 1, 2)]
    [10.0, 5.5, 1.0, 1.0]
    """
    d = int(decay_tokens)
    if d == 0:
        return [float(end)] * int(n_new)
    return [float(start) + (float(end) - float(start)) * min(j, d) / d for j in range(int(n_new))]


def sample_seed(run_seed: int, sample_id: int) -> int:
    """A 63-bit seed of one sample: blake2b of the run seed and the sample id.

    >>> sample_seed(0, 1) == sample_seed(0, 1) != sample_seed(0, 2)
    True
    """
    digest = hashlib.blake2b(f"lm-extract\x1f{int(run_seed)}\x1f{int(sample_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def start_ids(lm: Any, prompt: str | None, what: str = "the model") -> np.ndarray:
    """The context token ids a sample starts from: ``lm.encode(prompt)``, or (``prompt is None``)
    the model's BOS token, else its EOS token."""
    if prompt is not None:
        with user_code(f"{what}'s tokenizer failed on a prompt"):
            ids = np.asarray(lm.encode(prompt), dtype=np.int64).ravel()
        if ids.size == 0:
            raise InputError(f"a prompt {prompt!r} encodes to no token under {what}", "remove empty prompts")
        return ids
    tok = document_start(lm)
    if tok is None:
        raise InputError(
            f"{what} has neither a BOS nor an EOS token to start unconditional samples from",
            "pass --prompts FILE (one prompt a line) to condition the samples",
        )
    return np.asarray([int(tok)], dtype=np.int64)


# ---- the worker ---------------------------------------------------------------------------------
@dataclass
class ExtractSampleWorker:
    """A worker's context: the target model, the reference model (or ``None``)."""

    target: Any
    reference: Any


def _load(spec: Any, config: dict, what: str):
    if not isinstance(spec, (str, Path)):
        return spec  # a loaded causal LM (local runner)
    from memscan.generators.causal_lm import load_causal_lm

    with user_code(f"loading the {what} {spec} failed", "fix the model (or its py: function) and rerun"):
        return load_causal_lm(str(spec), device=config["device"], dtype=config["dtype"])


def setup_extract_worker(model: Any, reference: Any, config: dict) -> ExtractSampleWorker:
    """Load the target (and reference) model once per worker."""
    target = _load(model, config, "model")
    ref = _load(reference, config, "reference model") if reference is not None else None
    return ExtractSampleWorker(target, ref)


def describe_extract_worker(worker: ExtractSampleWorker) -> dict:
    """The records of the models as a worker loaded them."""
    from memscan.generators.causal_lm import describe_lm

    def one(m):
        if m is None:
            return None
        params = getattr(m, "parameters", None)
        return {"parameters": params if isinstance(params, int) else None, "describe": describe_lm(m)}

    return {"model": one(worker.target), "reference": one(worker.reference)}


# ---- the stage ----------------------------------------------------------------------------------
#: Columns of a shard's ``samples`` table (before de-duplication and confirmation).
SAMPLE_COLUMNS = [
    "sample_id",
    "prompt_index",
    "text",
    "tokens",
    "n_tokens",
    "ended",
    "mean_nll",
    "perplexity",
    "zlib_bits",
    "zlib_ratio",
    "lowercase_mean_nll",
    "lowercase_ratio",
    "reference_mean_nll",
    "reference_ratio",
    "min_window_perplexity",
]


def _batches(keys: list[int], sizes: list[int], batch_size: int):
    """``keys`` grouped by equal ``sizes`` (the adapter takes no padding), each group in order,
    groups in order of first appearance, batches of at most ``batch_size``."""
    groups: dict[int, list[int]] = defaultdict(list)
    for k, s in zip(keys, sizes):
        groups[s].append(k)
    for members in groups.values():
        for i in range(0, len(members), batch_size):
            yield members[i : i + batch_size]


def _fit(lm, contexts: list[np.ndarray], seqs: list[np.ndarray], what: str) -> tuple[list[np.ndarray], int]:
    """``seqs`` each cut so that context + sequence fits the ``max_length`` positions of ``lm``
    (none stated: kept whole), and how many were cut."""
    limit = getattr(lm, "max_length", None)
    if not limit:
        return seqs, 0
    out, cut = [], 0
    for c, s in zip(contexts, seqs):
        room = int(limit) - c.size
        if room < 1:
            raise InputError(
                f"a context of {c.size} tokens leaves no room in the {int(limit)} positions of {what}",
                "use shorter prompts",
            )
        cut += s.size > room
        out.append(s[:room])
    return out, cut


def _scored_logprobs(lm, contexts: list[np.ndarray], seqs: list[np.ndarray], batch_size: int, what: str):
    """Per sequence: ``log p`` of its tokens after its context (one forward pass per batch of equal
    total length). Every context + sequence must fit the model's positions (:func:`_fit`)."""
    full = [np.concatenate([c, s]) for c, s in zip(contexts, seqs)]
    out: list[np.ndarray] = [np.zeros(0)] * len(seqs)
    idx = list(range(len(seqs)))
    for batch in _batches(idx, [f.size for f in full], batch_size):
        with user_code(what):
            lp = np.asarray(lm.token_logprobs(np.stack([full[i] for i in batch])), dtype=np.float64)
        for j, i in enumerate(batch):
            n = seqs[i].size
            row = lp[j, lp.shape[1] - n :] if n else lp[j, :0]
            if row.size != n or not np.all(np.isfinite(row)) or np.any(row > ms.LOGPROB_ATOL):
                raise MemscanError(
                    f"{what}: token_logprobs gave no finite log-probability ≤ 0 for every token",
                    "check the model: per-token log-probabilities must be finite",
                )
            out[i] = np.minimum(row, 0.0)
    return out


def sample_and_score_stage(
    worker: ExtractSampleWorker,
    sample_ids: list[int],
    prompts: list[str | None],
    config: dict,
    progress=None,
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Draw and score one shard of samples; returns ``({"samples": one row per sample}, meta)``.

    ``prompts`` are the run's prompts (``[None]``: unconditional); sample ``i`` takes prompt
    ``i mod len(prompts)``. ``meta`` holds the generation and scoring seconds apart.
    """
    cfg = LmExtractConfig(**config)
    lm, ref = worker.target, worker.reference
    sample = getattr(lm, "sample", None)
    if not callable(sample):
        raise InputError(
            f"the model {type(lm).__name__} has no sample() method",
            "implement sample(prefixes, n_new, *, temperature, top_k, top_p, seed) (memscan.generators.causal_lm)",
        )
    t0 = time.perf_counter()
    contexts = [start_ids(lm, p) for p in prompts]
    which = [int(i) % len(prompts) for i in sample_ids]
    temps = cfg.schedule()
    eos = getattr(lm, "eos_token_id", None)
    gen: dict[int, np.ndarray] = {}
    ended: dict[int, bool] = {}
    done = sent = 0
    # 1. sampling: batches of samples whose prompts have the same token length
    for batch in _batches(list(range(len(sample_ids))), [contexts[w].size for w in which], cfg.batch_size):
        prefixes = np.stack([contexts[which[k]] for k in batch])
        seeds = [sample_seed(cfg.seed, sample_ids[k]) for k in batch]
        with user_code(f"the model failed to sample {sample_ids[batch[0]]}…{sample_ids[batch[-1]]}"):
            toks = np.asarray(
                sample(prefixes, cfg.length, temperature=temps, top_k=cfg.top_k, top_p=cfg.top_p, seed=seeds),
                dtype=np.int64,
            )
        if toks.shape != (len(batch), cfg.length):
            raise MemscanError(
                f"the model's sample() gave shape {toks.shape} for {len(batch)} rows of {cfg.length} tokens",
                "sample() must return B×n_new token ids",
            )
        for j, k in enumerate(batch):
            row = toks[j]
            stop = np.flatnonzero(row == eos) if eos is not None else np.zeros(0, dtype=np.int64)
            gen[k] = row[: stop[0]] if stop.size else row
            ended[k] = bool(stop.size)
        if progress is not None:  # sampling counts for half of a sample's progress
            half = (len(batch) + done % 2) // 2
            progress(half)
            sent += half
        done += len(batch)
    t_gen = time.perf_counter()
    # 2. scoring: target, lowercased, reference (empty samples get NaN scores)
    live = [k for k in range(len(sample_ids)) if gen[k].size > 0]
    texts = {k: lm.decode(gen[k]) for k in range(len(sample_ids))}
    where = f"the model failed to score samples {sample_ids[0]}…{sample_ids[-1]}" if sample_ids else ""
    lp = dict(zip(live, _scored_logprobs(lm, [contexts[which[k]] for k in live], [gen[k] for k in live],
                                          cfg.batch_size, where)))  # fmt: skip
    lower_seq = {}
    for k in live:
        with user_code("the model's tokenizer failed on a lowercased sample"):
            lower_seq[k] = np.asarray(lm.encode(texts[k].lower()), dtype=np.int64).ravel()
    low_live = [k for k in live if lower_seq[k].size > 0]
    # the re-encoded texts may take more tokens than were sampled: cut to the window, counted
    low_ctx = [contexts[which[k]] for k in low_live]
    low_seqs, lower_cut = _fit(lm, low_ctx, [lower_seq[k] for k in low_live], "the model")
    lower_lp = dict(zip(low_live, _scored_logprobs(lm, low_ctx, low_seqs, cfg.batch_size, where)))
    ref_lp: dict[int, np.ndarray] = {}
    reference_cut = 0
    if ref is not None:
        ref_ctx = [start_ids(ref, p, "the reference model") for p in prompts]
        ref_seq = {}
        for k in live:
            with user_code("the reference model's tokenizer failed on a sample"):
                ref_seq[k] = np.asarray(ref.encode(texts[k]), dtype=np.int64).ravel()
        ref_live = [k for k in live if ref_seq[k].size > 0]
        r_ctx = [ref_ctx[which[k]] for k in ref_live]
        r_seqs, reference_cut = _fit(ref, r_ctx, [ref_seq[k] for k in ref_live], "the reference model")
        ref_lp = dict(zip(ref_live, _scored_logprobs(ref, r_ctx, r_seqs, cfg.batch_size,
                                                      "the reference model failed to score samples")))  # fmt: skip
    rows = []
    nan = float("nan")
    for k, sid in enumerate(sample_ids):
        text, row_lp = texts[k], lp.get(k)
        r = {"sample_id": int(sid), "prompt_index": which[k], "text": text, "tokens": gen[k].astype(np.int64),
             "n_tokens": int(gen[k].size), "ended": ended[k]}  # fmt: skip
        if row_lp is None:
            r.update({c: nan for c in SAMPLE_COLUMNS[6:]})
        else:
            nll = ms.mean_nll(row_lp)
            low = lower_lp.get(k)
            rlp = ref_lp.get(k)
            r.update(
                mean_nll=nll,
                perplexity=math.exp(nll) if nll < 700 else math.inf,
                zlib_bits=float(ms.zlib_entropy_bits(text)),
                zlib_ratio=ms.zlib_ratio(row_lp, text),
                lowercase_mean_nll=ms.mean_nll(low) if low is not None else nan,
                lowercase_ratio=ms.lowercase_ratio(row_lp, low) if low is not None else nan,
                reference_mean_nll=ms.mean_nll(rlp) if rlp is not None else nan,
                reference_ratio=ms.reference_ratio(row_lp, rlp) if rlp is not None else nan,
                min_window_perplexity=rk.min_window_perplexity(row_lp, cfg.window),
            )
        rows.append(r)
    if progress is not None:
        progress(len(sample_ids) - sent)
    t_end = time.perf_counter()
    table = pd.DataFrame(rows, columns=SAMPLE_COLUMNS)
    tokens = int(sum(g.size for g in gen.values()))
    return {"samples": table}, {
        "samples": len(sample_ids),
        "tokens": tokens,
        "lowercase_cut": int(lower_cut),
        "reference_cut": int(reference_cut),
        "generate_seconds": round(t_gen - t0, 4),
        "score_seconds": round(t_end - t_gen, 4),
        "seconds": round(t_end - t0, 4),
    }
