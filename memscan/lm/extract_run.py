"""``memscan lm extract``: training data extraction by sampling and ranking (Carlini et al. 2021,
"Extracting Training Data from Large Language Models"), confirmed against a corpus index (run
kind ``lm-extract``).

1. **sample and score** (:mod:`memscan.lm.sampling_attack`), shards of samples through
   :func:`memscan.runners.shards.run_shards` on the local or the Ray runner: top-k 40 with the
   decaying temperature, unconditional or from ``--prompts``; each sample scored by
   ``perplexity``, ``zlib_ratio``, ``lowercase_ratio``, ``reference_ratio`` (with ``--reference``)
   and ``min_window_perplexity`` (:mod:`memscan.lm.ranking`);
2. **de-duplicate** (:mod:`memscan.lm.dedup`): word-trigram multisets, §6.1 "Data De-Duplication"'s rule, walking the
   samples by increasing perplexity; empty samples (EOS first) are dropped and counted;
3. **confirm** against the corpus index (:class:`memscan.lm.corpus_index.CorpusIndex`): the
   longest run of the sample found in the corpus; a sample is ``confirmed`` when that run is at
   least ``min_match`` long (default 50 tokens, as Nasr et al. 2023 and Carlini et al. 2022
   confirm; 100 bytes in bytes mode). In token mode the query is the sample's text re-encoded,
   ``encode(text)`` — the tokenization the index was built with (``encode(doc)``): sampled ids
   may spell the same text with other tokens ("hel" + "lo"), which the index does not hold — and
   also the sampled ids when they differ, the longer match kept; in bytes mode the text's UTF-8
   bytes. Every kept sample is checked, so the share confirmed among all samples is the
   precision of a random ranking;
4. **precision@N** of each metric: the confirmed share of its top ``N`` (``--top``).

A run directory holds

- ``samples.parquet`` — one row per kept sample: ``sample_id``, ``prompt_index``, ``text``,
  ``tokens`` (the generated ids), ``n_tokens``, ``ended`` (EOS drawn), ``mean_nll``,
  ``perplexity``, ``zlib_bits``, ``zlib_ratio``, ``lowercase_mean_nll``, ``lowercase_ratio``,
  ``reference_mean_nll``, ``reference_ratio``, ``min_window_perplexity``, ``duplicates`` (samples
  removed as its near duplicates), ``rank_<metric>`` (1 = ranked most likely memorized),
  ``confirmed``, ``match_len`` (tokens, or bytes in bytes mode), ``match_doc``, ``match_offset``
  (the corpus location of one occurrence), ``match_train_id`` (that document's id),
  ``match_start`` (where the match starts in the query, same unit), ``match_query`` (the query
  that matched: ``text``, the re-encoded text or its bytes, or ``sampled``, the generated ids),
  ``match_count`` (occurrences of the whole matched span in the corpus; its length varies),
  ``match_window_count`` (occurrences of the span's first ``min_match`` units: the duplication of
  the window that confirms the sample, one length for all; 0 when not confirmed),
  ``match_before`` / ``match_text`` / ``match_after`` (the sample's text cut around the match);
- ``precision.parquet`` — ``metric``, ``N``, ``confirmed``, ``precision`` (and the row
  ``all samples``: every kept sample, the random-ranking baseline);
- ``manifest.json`` — config, models, index record, counts (generated, empty, duplicates removed,
  kept, confirmed), throughput (samples/s; generation and scoring seconds apart);
- ``shards/`` — each shard's scored samples before de-duplication (``--resume``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan.data.prompts import read_utf8, text_lines
from memscan.errors import InputError, MemscanError, user_code
from memscan.generators.model_record import loaded_model_record
from memscan.lm import ranking as rk
from memscan.lm.dedup import greedy_dedup
from memscan.lm.sampling_attack import (
    LmExtractConfig,
    describe_extract_worker,
    sample_and_score_stage,
    setup_extract_worker,
    start_ids,
)
from memscan.runners import RayOptions, make_pool, require_ray
from memscan.runners.shards import run_shards
from memscan.store import open_run, write_table

__all__ = [
    "DEFAULT_MIN_MATCH",
    "DEFAULT_SHARD_SIZE",
    "KIND",
    "LmExtractConfig",
    "LmExtractResult",
    "confirm_samples",
    "lm_extract",
    "precision_table",
    "read_prompts",
]

KIND = "lm-extract"
#: Samples per shard by default (the unit of commit and ``--resume``).
DEFAULT_SHARD_SIZE = 256
#: The match that confirms a sample, by index mode: 50 tokens, or 100 bytes for a byte index.
DEFAULT_MIN_MATCH = {"tokens": 50, "bytes": 100}
#: The ``metric`` of the precision row over every kept sample (a random ranking's expectation).
ALL_SAMPLES = "all samples"

PROMPTS_HINT = 'pass a text file with one prompt a line, or JSONL with a "prompt" (or "text") field per line'


@dataclass
class LmExtractResult:
    """A finished ``lm extract`` run (the tables are also on disk in ``run_dir``)."""

    run_dir: Path
    samples: pd.DataFrame
    precision: pd.DataFrame
    manifest: dict

    def precision_of(self, metric: str) -> float:
        row = self.precision[self.precision["metric"] == metric]
        if row.empty:
            raise InputError(f"no precision for {metric!r}", f"choose one of {', '.join(self.precision['metric'])}")
        return float(row["precision"].iloc[0])


# ---- inputs -------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """Prompts of ``--prompts``: JSONL (``.jsonl``/``.ndjson``/``.json``) with a ``prompt`` or
    ``text`` string per line (so a prompt may hold newlines), else one prompt a line; blank lines
    are skipped."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--prompts {p} {'does not exist' if not p.exists() else 'is not a file'}", PROMPTS_HINT)
    content = read_utf8(p, "--prompts")
    prompts = []
    jsonl = p.suffix.lower() in (".jsonl", ".ndjson", ".json")
    for n, line in enumerate(text_lines(content), start=1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"--prompts {p} line {n} is not JSON ({exc.msg})", PROMPTS_HINT) from None
        text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text:
            raise InputError(f'--prompts {p} line {n} has no "prompt" (or "text") string', PROMPTS_HINT)
        prompts.append(text)
    if not prompts:
        raise InputError(f"--prompts {p} holds no prompt", PROMPTS_HINT)
    return prompts


def _open_index(index: Any):
    from memscan.lm.corpus_index import CorpusIndex

    if not isinstance(index, (str, Path)):
        return index
    p = Path(index)
    if not p.exists():
        raise InputError(f"--index {p} does not exist", "build it with `memscan lm index CORPUS --out IDX`")
    idx = CorpusIndex.open(p)
    idx.documents  # noqa: B018 - read now: a damaged documents.parquet fails before any sample is drawn
    return idx


def _index_record(index) -> dict:
    return {
        "path": str(Path(index.root).resolve()),
        "mode": index.mode,
        "n_docs": int(index.n_docs),
        "n_tokens": int(index.n_tokens),
        "tokenizer": index.tokenizer_record,
    }


def _spec(model) -> Any:
    if isinstance(model, (str, Path)):
        s = str(model)
        return str(Path(s).expanduser().resolve()) if not s.startswith("py:") and Path(s).expanduser().exists() else s
    return getattr(model, "spec", None) or type(model).__qualname__


def _load(model: Any, config: LmExtractConfig, what: str):
    if not isinstance(model, (str, Path)):
        return model
    from memscan.generators.causal_lm import load_causal_lm

    with user_code(f"loading the {what} {model} failed", "fix the model (or its py: function) and rerun"):
        return load_causal_lm(str(model), device=config.device, dtype=config.dtype)


def _check_positions(lm, prompts: list[str | None], length: int, what: str) -> None:
    """Refuse a model whose ``max_length`` positions cannot hold the longest prompt (its start
    token, unconditional) + ``length`` tokens: the sampled ids (the target) or the text re-encoded
    by its tokenizer (the reference) would not fit."""
    max_length = getattr(lm, "max_length", None)
    if not max_length:
        return
    context = max(start_ids(lm, p, what).size for p in prompts)
    if context + length > max_length:
        hint = "lower --length (or use shorter prompts)"
        if what != "the model":
            hint += f", or use a reference model of at least {context + length} positions"
        raise InputError(
            f"a prompt of {context} tokens + {length} new tokens exceeds the {max_length} positions of {what}"
            + ("" if what == "the model" else " (it scores every sample after the prompt, re-encoded)"),
            f"{hint}; at most --length {max(max_length - context, 0)} fits",
        )


def _pool(runner: str, model, reference, config: LmExtractConfig, options, log):
    cfg = config.to_dict()
    if runner != "ray":
        return make_pool(runner, setup_extract_worker, (model, reference, cfg), options, log=log)
    require_ray()
    for what, spec in (("model", model), ("reference model", reference)):
        if spec is not None and not isinstance(spec, (str, Path)):
            raise InputError(
                f"the Ray runner loads the {what} in each worker, but got a loaded {type(spec).__name__}",
                "pass its directory, hub id, .gguf file or py: spec instead",
            )
    opts = options if isinstance(options, RayOptions) else RayOptions(**(options or {}))
    if str(config.device).startswith("cuda") and opts.gpus_per_worker <= 0:
        raise InputError(f"device={config.device} but the Ray workers ask for no GPU", "pass --gpus-per-worker 1")
    if str(config.device).startswith("cuda:"):
        cfg["device"] = "cuda"
    ref = _spec(reference) if reference is not None else None
    return make_pool("ray", setup_extract_worker, (_spec(model), ref, cfg), opts, log=log)


# ---- confirmation and precision -----------------------------------------------------------------
def _queries(text: str, tokens, mode: str, encode) -> list[tuple[str, np.ndarray | bytes]]:
    """The sample in the index's units, as ``(match_query, query)`` pairs, the re-encoding first.

    Bytes mode: the text's UTF-8 bytes (``"text"``). Token mode: ``encode(text)`` (``"text"``):
    the canonical tokenization, the one the index holds (it was built from ``encode(doc)``); a
    sampled sequence may spell the same text with other tokens ("hel" + "lo" for "hello"), and
    those ids occur nowhere in the index. Then the sampled ids (``"sampled"``) when they differ:
    an index of pre-tokenized ids may hold a non-canonical spelling. Without ``encode``: the
    sampled ids only."""
    if mode == "bytes":
        return [("text", text.encode("utf-8"))]
    sampled = np.asarray(tokens, dtype=np.int64).ravel()
    if encode is None:
        return [("sampled", sampled)]
    canonical = np.asarray(encode(text), dtype=np.int64).ravel()
    if np.array_equal(canonical, sampled):
        return [("text", canonical)]
    return [("text", canonical), ("sampled", sampled)]


def confirm_samples(samples: pd.DataFrame, index, min_match: int, decode=None, encode=None) -> pd.DataFrame:
    """The corpus match of every sample: ``confirmed``, ``match_len``, ``match_doc``,
    ``match_offset``, ``match_train_id``, ``match_start``, ``match_query``, ``match_count``,
    ``match_window_count``, ``match_before``, ``match_text``, ``match_after`` (one row per sample,
    in order).

    The query (:func:`_queries`) is the sample's UTF-8 text for an index in bytes mode; in token
    mode ``encode(text)``, the text re-encoded (the tokenization the index was built with), and
    also the sampled ids (``tokens``) when they differ from it, keeping the longer match (the
    re-encoding on a tie; ``match_query`` says which: ``"text"`` or ``"sampled"``, and
    ``match_len`` / ``match_start`` count units of that query). ``decode`` turns a token span back
    into text for the three text columns.

    ``match_count`` counts the corpus occurrences of the whole longest match, whose length varies
    from sample to sample; ``match_window_count`` those of its first ``min_match`` units, one
    fixed length (the window that confirms the sample: Carlini et al. 2022 count the duplicates
    of the evaluated sequence itself), and 0 for a sample that is not confirmed (no run of
    ``min_match`` units of it occurs)."""
    rows = []
    # the documents' ids (a damaged documents.parquet is the index's own clear error, never a
    # silent None in every row); an index object without documents: no ids
    docs = index.documents["train_id"].astype(str).tolist() if hasattr(index, "documents") else None
    for text, tokens in zip(samples["text"], samples["tokens"]):
        # 1. the longest run of the sample in the corpus: over the re-encoded text (and the
        #    sampled ids when they spell it otherwise), the longer one; the re-encoding on a tie
        best = None
        for name, q in _queries(text, tokens, index.mode, encode):
            m = index.longest_substring_match(q)
            if best is None or m.length > best[2].length:
                best = (name, q, m)
        name, q, m = best
        length, doc, off, start = (int(v) for v in m)
        # 2. how often that run occurs, and how often its first min_match units do
        span = q[start : start + length] if length > 0 else q[:0]
        count = int(index.count(span)) if length > 0 else 0
        window_count = int(index.count(span[:min_match])) if length >= min_match else 0
        # 3. the sample's text around the match (for the report's highlight)
        if index.mode == "bytes":
            cut = (q[:start], span, q[start + length :]) if length > 0 else (q, b"", b"")
            before, mid, after = (c.decode("utf-8", errors="replace") for c in cut)
        else:
            parts = (q[:start], span, q[start + length :]) if length > 0 else (q, q[:0], q[:0])
            before, mid, after = (decode(p) if decode is not None and len(p) else "" for p in parts)
            if length == 0:
                before = text
        rows.append(
            {
                "confirmed": bool(length >= min_match),
                "match_len": length,
                "match_doc": doc,
                "match_offset": off,
                "match_train_id": docs[doc] if docs is not None and 0 <= doc < len(docs) else None,
                "match_start": start,
                "match_query": name,
                "match_count": count,
                "match_window_count": window_count,
                "match_before": before,
                "match_text": mid,
                "match_after": after,
            }
        )
    cols = ["confirmed", "match_len", "match_doc", "match_offset", "match_train_id", "match_start", "match_query",
            "match_count", "match_window_count", "match_before", "match_text", "match_after"]  # fmt: skip
    out = pd.DataFrame(rows, columns=cols)
    return out.astype({"confirmed": bool, "match_len": np.int64, "match_doc": np.int64, "match_offset": np.int64,
                       "match_start": np.int64, "match_count": np.int64,
                       "match_window_count": np.int64})  # fmt: skip


def precision_table(samples: pd.DataFrame, metrics, top: int) -> pd.DataFrame:
    """precision@N of each metric (:func:`memscan.lm.ranking.precision_at_n`) and the row
    ``all samples`` (every kept sample)."""
    rows = []
    conf = samples["confirmed"].to_numpy(dtype=bool)
    for m in metrics:
        n, hits, prec = rk.precision_at_n(samples[m].to_numpy(dtype=np.float64), conf, top, m in rk.HIGHER_FIRST)
        rows.append({"metric": m, "N": n, "confirmed": hits, "precision": prec})
    n = len(samples)
    rows.append(
        {"metric": ALL_SAMPLES, "N": n, "confirmed": int(conf.sum()), "precision": conf.mean() if n else float("nan")}
    )
    return pd.DataFrame(rows).astype({"N": np.int64, "confirmed": np.int64, "precision": np.float64})


def _digest(prompts: list[str | None]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(b"\x00none" if p is None else p.encode("utf-8") + b"\x00")
    return h.hexdigest()


# ---- the run ------------------------------------------------------------------------------------
def lm_extract(
    model: Any,
    index: Any,
    out: str | Path,
    config: LmExtractConfig = LmExtractConfig(),
    *,
    reference: Any = None,
    prompts: str | Path | list[str] | None = None,
    progress: bool = True,
    resume: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    runner: str = "local",
    runner_options=None,
    stop_after_shards: int | None = None,
) -> LmExtractResult:
    """Sample, rank and confirm (see the module docstring); writes an ``lm-extract`` run.

    Parameters
    ----------
    model : a ``--model`` spec (transformers directory, .gguf, hub id, ``py:``) or a loaded causal
        LM (local runner only)
    index : a corpus index folder (``memscan lm index``) or an open :class:`CorpusIndex`; its
        tokenizer must be the model's (a bytes-mode index takes any model)
    out : the run directory
    config : :class:`memscan.lm.sampling_attack.LmExtractConfig`
    reference : a second model for ``reference_ratio``
    prompts : a ``--prompts`` file (:func:`read_prompts`) or a list of prompts; ``None``:
        unconditional samples from the model's start token
    shard_size : samples per shard (the unit of commit and resume)
    runner, runner_options : ``"local"`` or ``"ray"``
    stop_after_shards : a kill hook for tests of resume
    """
    from memscan.lm.corpus_index import check_tokenizer

    config = config.validate()
    if int(shard_size) < 1:
        raise InputError(f"--shard-size {shard_size} must be ≥ 1", "e.g. --shard-size 256")
    if prompts is None:
        prompt_list: list[str | None] = [None]
    elif isinstance(prompts, (list, tuple)):
        prompt_list = [str(p) for p in prompts]
        if not prompt_list or any(not p for p in prompt_list):
            raise InputError("the prompts list is empty or holds an empty prompt", "give non-empty prompts")
    else:
        prompt_list = list(read_prompts(prompts))
    idx = _open_index(index)  # bad inputs fail before any model is loaded
    min_match = int(config.min_match) if config.min_match is not None else DEFAULT_MIN_MATCH[idx.mode]
    started = time.time()
    lm = _load(model, config, "model")
    check_tokenizer(idx, lm)
    for p in prompt_list:
        start_ids(lm, p)  # a model without a start token, an empty prompt: refused here
    _check_positions(lm, prompt_list, config.length, "the model")
    # the reference too is loaded here (the local runner's worker reuses it), so that a reference
    # whose positions cannot hold a prompt + --length tokens is refused before any sample is drawn
    ref = _load(reference, config, "reference model") if reference is not None else None
    if ref is not None:
        for p in prompt_list:
            start_ids(ref, p, "the reference model")  # a reference without a start token: refused here
        _check_positions(ref, prompt_list, config.length, "the reference model")
        if runner == "ray":  # its workers load their own: the driver's copy served the check only
            ref = None
    n = int(config.samples)
    n_shards = math.ceil(n / shard_size)
    cfg = config.to_dict()
    shard_args = {
        s: (list(range(s * shard_size, min(n, (s + 1) * shard_size))), prompt_list, cfg) for s in range(n_shards)
    }
    metrics = [m for m in rk.METRICS if m != "reference_ratio" or reference is not None]
    spec, ref_spec = _spec(model), (_spec(reference) if reference is not None else None)
    index_rec = _index_record(idx)
    with open_run(out, KIND, resume=resume) as run:
        run.start(
            {
                "config": cfg,
                "model_spec": spec,
                "reference_spec": ref_spec,
                "index": index_rec,
                "prompts": {
                    "count": len(prompt_list),
                    "unconditional": prompts is None,
                    "sha256": _digest(prompt_list),
                },  # fmt: skip
                "min_match": min_match,
                "match_unit": idx.mode,
                "metrics": metrics,
                "temperature_schedule": config.schedule()[: config.decay_tokens + 1],
                "shard_size": int(shard_size),
                "n_shards": n_shards,
                "seeds": {"run_seed": config.seed, "derivation": "blake2b('lm-extract', seed, sample_id) per sample"},
            },
            identity=(
                "config",
                "model_spec",
                "reference_spec",
                "index",
                "prompts",
                "min_match",
                "shard_size",
                "n_shards",
            ),  # fmt: skip
            started=started,
        )
        run.store.log(f"{KIND}: {n} samples in {n_shards} shards, index {index_rec['path']} ({idx.mode})")
        pool_model, pool_ref = (model, reference) if runner == "ray" else (lm, ref)
        with _pool(runner, pool_model, pool_ref, config, runner_options, run.store.log) as pool:
            loaded = pool.call(describe_extract_worker)
            run.manifest.update(
                model=loaded_model_record(model, loaded["model"]),
                reference_model=loaded_model_record(reference, loaded["reference"]) if reference is not None else None,
                tokenizer=(loaded["model"] or {}).get("describe", {}).get("tokenizer"),
                runner=pool.describe(),
            )
            run.save()
            run_shards(
                run,
                pool,
                sample_and_score_stage,
                shard_args,
                weights={s: len(a[0]) for s, a in shard_args.items()},
                label="lm extract",
                unit="samples",
                progress=progress,
                stop_after_shards=stop_after_shards,
                describe=lambda s, t: f"{len(t['samples'])} samples",
            )
        merged = run.store.merge(n_shards, tables=("samples",))["samples"]
        if merged["sample_id"].tolist() != list(range(n)):
            raise MemscanError(f"the shards of {run.root} do not hold this run's samples", "start a new run")
        (run.root / "samples.parquet").unlink(missing_ok=True)  # the merge's copy; rewritten below
        t0 = time.perf_counter()
        samples, counts = _kept_samples(merged, metrics)
        decode, encode = getattr(lm, "decode", None), getattr(lm, "encode", None)
        samples = pd.concat([samples, confirm_samples(samples, idx, min_match, decode, encode)], axis=1)
        t_confirm = time.perf_counter() - t0
        precision = precision_table(samples, metrics, config.top)
        write_table(samples, run.root / "samples.parquet")
        write_table(precision, run.root / "precision.parquet")
        records = [run.store.shard_record(s) for s in range(n_shards)]
        gen_s = sum(float(r.get("generate_seconds", 0.0)) for r in records)
        score_s = sum(float(r.get("score_seconds", 0.0)) for r in records)
        tokens = sum(int(r.get("tokens", 0)) for r in records)
        # re-encoded texts (lowercased; under the reference's tokenizer) cut to a model's positions
        cuts = {key: sum(int(r.get(key, 0)) for r in records) for key in ("lowercase_cut", "reference_cut")}
        for key, what in (("lowercase_cut", "lowercased samples"), ("reference_cut", "samples under the reference")):
            if cuts[key]:
                run.store.log(f"{KIND}: {cuts[key]} {what} re-encoded longer than the model's positions, cut to them")
        manifest = run.finish(
            counts={**counts, "confirmed": int(samples["confirmed"].sum()), "tokens": tokens, **cuts},
            precision={r["metric"]: r["precision"] for r in precision.to_dict("records")},
            throughput={
                "generate_seconds": round(gen_s, 3),
                "score_seconds": round(score_s, 3),
                "confirm_seconds": round(t_confirm, 3),
                "samples_per_s": round(n / (gen_s + score_s), 3) if gen_s + score_s else None,
                "score_share": round(score_s / (gen_s + score_s), 4) if gen_s + score_s else None,
            },
        )
    return LmExtractResult(Path(out), samples, precision, manifest)


def _kept_samples(merged: pd.DataFrame, metrics) -> tuple[pd.DataFrame, dict]:
    """Drop empty samples, de-duplicate the rest by increasing perplexity (§6.1 "Data De-Duplication"), rank them."""
    live = merged[merged["n_tokens"] > 0].reset_index(drop=True)
    order = rk.rank_order(live["perplexity"].to_numpy(dtype=np.float64), higher_first=False)
    dd = greedy_dedup(live["text"].tolist(), order)
    keep = np.sort(dd.keep)
    kept = live.iloc[keep].reset_index(drop=True)
    kept["duplicates"] = dd.duplicates[keep]
    for m in metrics:
        kept[f"rank_{m}"] = rk.ranks(kept[m].to_numpy(dtype=np.float64), m in rk.HIGHER_FIRST)
    counts = {
        "generated": int(len(merged)),
        "empty": int(len(merged) - len(live)),
        "duplicates_removed": int(len(live) - len(kept)),
        "kept": int(len(kept)),
    }
    return kept, counts
