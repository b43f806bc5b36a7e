"""``memscan lm extractable``: discoverable memorization of training sequences (run kind
``lm-extractable``).

A run directory holds

- ``sequences.parquet`` — one row per sequence and prefix length: ``seq_id``, ``train_id`` (the
  document's ``id``, else its line/row number), ``doc_index``, ``offset`` (the document token
  index where the suffix starts; the prefix of length k starts at ``offset − k``), ``prefix_len``,
  ``suffix_len``, ``extractable`` (Carlini et al. 2022), ``match_fraction``,
  ``matched_leading_tokens``, ``pythia_score`` / ``pythia_extractable`` (Biderman et al. 2023,
  32 + 32 tokens whatever the suffix length), ``exact_memorization`` (Tirumala et al. 2022),
  ``log_p_sample`` / ``p_sample`` / ``n_samples_50`` / ``n_samples_90`` (Hayes et al. 2025, under
  the recorded temperature/top-k/top-p), ``near_ties`` (greedy steps whose top-2 logit gap is
  below float rounding), and the decoded prefix, suffix and greedy texts; with ``--index IDX``
  also ``suffix_count`` and ``window_count``, how often the suffix and the prefix + suffix occur
  in the corpus index (:mod:`memscan.lm.duplication`);
- ``manifest.json`` — config, model record (id, parameters, training step, class, dtype,
  tokenizer name and vocabulary sha256), data source, counts, skipped documents, the extractable
  rate by prefix length, throughput;
- ``shards/``, ``run.log`` — the shard records (``--resume``).

Definitions: :mod:`memscan.lm.memorization`. The window of every sequence is
``max(K, 32) + max(m, 32)`` tokens (K the longest prefix, m the suffix length), so that the Pythia
score's 32 + 32 tokens fit too; documents shorter than that are skipped, counted and named.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.errors import InputError, MemscanError, user_code
from memscan.generators.causal_lm import describe_lm, load_causal_lm
from memscan.generators.model_record import model_record
from memscan.lm.corpus_index import CorpusIndex
from memscan.lm.corpus_index import check_tokenizer as check_index_tokenizer
from memscan.lm.decoding import check_scheme
from memscan.lm.duplication import duplicate_counts, duplication_summary
from memscan.lm.memorization import PYTHIA_LENGTH
from memscan.lm.text_data import check_tokenizer, open_text_source, sample_sequences
from memscan.lm.worker import describe_lm_worker, extractable_stage, lm_pool
from memscan.runners.shards import run_shards
from memscan.store import open_run, write_table

KIND = "lm-extractable"
#: Sequences per shard by default (the unit of commit and ``--resume``).
DEFAULT_SHARD_SIZE = 256


@dataclass
class ExtractableConfig:
    """Options of ``memscan lm extractable`` (see the module docstring)."""

    prefix_lengths: tuple[int, ...] = (32,)
    suffix_length: int = 50
    sequences: int = 1000
    seed: int = 0
    batch_size: int = 64
    temperature: float = 1.0
    top_k: int | None = 40
    top_p: float | None = None
    offsets: str = "random"
    text_column: str = "text"
    device: str = "cpu"
    dtype: str = "auto"

    def validate(self) -> ExtractableConfig:
        ks = tuple(sorted({int(k) for k in self.prefix_lengths}))
        if not ks or ks[0] < 1:
            raise InputError(f"prefix lengths {self.prefix_lengths} must be ≥ 1", "e.g. --prefix-lengths 32,64")
        if self.suffix_length < 1:
            raise InputError(f"suffix length {self.suffix_length} must be ≥ 1", "e.g. --suffix-length 50")
        if self.batch_size < 1:
            raise InputError(f"batch size {self.batch_size} must be ≥ 1", "e.g. --batch-size 64")
        top_k = int(self.top_k) if self.top_k else None
        top_p = float(self.top_p) if self.top_p is not None and self.top_p < 1 else None
        check_scheme(self.temperature, top_k, top_p)
        return ExtractableConfig(**{**asdict(self), "prefix_lengths": ks, "top_k": top_k, "top_p": top_p})

    @property
    def window(self) -> tuple[int, int]:
        """(tokens before the suffix, tokens from the suffix on) every sequence needs."""
        return max(max(self.prefix_lengths), PYTHIA_LENGTH), max(self.suffix_length, PYTHIA_LENGTH)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefix_lengths"] = list(self.prefix_lengths)
        return d


@dataclass
class ExtractableResult:
    """A finished ``lm-extractable`` run (the table is also on disk in ``run_dir``)."""

    run_dir: Path
    sequences: pd.DataFrame
    manifest: dict
    rates: dict = field(default_factory=dict)


def parse_prefix_lengths(text: str) -> tuple[int, ...]:
    """``"32,64"`` → ``(32, 64)``.

    >>> parse_prefix_lengths("64, 32")
    (64, 32)
    """
    try:
        return tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise InputError(
            f"--prefix-lengths {text!r} is not a list of integers", "e.g. --prefix-lengths 32,64"
        ) from None


def _digest(sample) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(sample.tokens).tobytes())
    h.update(np.ascontiguousarray(sample.offset).tobytes())
    h.update("\0".join(sample.train_id).encode())
    return h.hexdigest()


def lm_extractable(
    model,
    data,
    out: str | Path,
    config: ExtractableConfig = ExtractableConfig(),
    *,
    progress: bool = True,
    resume: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    runner: str = "local",
    runner_options=None,
    stop_after_shards: int | None = None,
    index=None,
) -> ExtractableResult:
    """Measure discoverable memorization on ``config.sequences`` training sequences of ``data``.

    Parameters
    ----------
    model : a ``--model`` spec (transformers directory, .gguf, hub id, ``py:``) or a loaded causal
        LM (local runner only)
    data : training text (:mod:`memscan.lm.text_data`)
    out : the run directory
    config : :class:`ExtractableConfig`
    shard_size : sequences per shard (the unit of commit and resume)
    runner, runner_options : ``"local"`` or ``"ray"`` (:func:`memscan.runners.make_pool`)
    stop_after_shards : a kill hook for tests of resume
    index : a corpus index (:class:`memscan.lm.corpus_index.CorpusIndex` or its folder): adds
        ``suffix_count`` and ``window_count`` (:mod:`memscan.lm.duplication`) and the duplication
        curve to the summary
    """
    config = config.validate()
    if shard_size < 1:
        raise InputError(f"shard size {shard_size} must be ≥ 1", "e.g. --shard-size 256")
    source = open_text_source(data, text_column=config.text_column)  # bad data fails before any model
    if index is not None and not isinstance(index, CorpusIndex):
        index = CorpusIndex.open(index)  # a damaged index fails before any model too
    started = time.time()
    spec = model if isinstance(model, (str, Path)) else None
    # the driver needs the tokenizer to cut the sequences; the local runner reuses this model
    if spec is not None:
        with user_code(f"loading the language model {spec} failed", "fix the model and rerun"):
            lm = load_causal_lm(str(spec), device=config.device, dtype=config.dtype)
    else:
        lm = model
    longest = max(config.prefix_lengths) + config.suffix_length
    max_length = getattr(lm, "max_length", None)
    if max_length and longest > max_length:
        raise InputError(
            f"a prefix of {max(config.prefix_lengths)} + suffix of {config.suffix_length} tokens exceeds the "
            f"{max_length} positions of the model",
            "lower --prefix-lengths / --suffix-length",
        )
    record = describe_lm(lm)
    tokenizer = record.get("tokenizer")
    check_tokenizer(source, (tokenizer or {}).get("vocab_sha256"), int(lm.vocab_size))
    if index is not None:
        check_index_tokenizer(index, lm)
    left, right = config.window
    sample = sample_sequences(
        source,
        lm.encode,
        left=left,
        right=right,
        n=config.sequences,
        seed=config.seed,
        offsets=config.offsets,
        vocab_size=int(lm.vocab_size),
    )
    n = len(sample.offset)
    n_shards = math.ceil(n / shard_size)
    seq_ids = np.arange(n, dtype=np.int64)
    cfg = config.to_dict()
    shard_args = {
        s: (
            seq_ids[s * shard_size : (s + 1) * shard_size],
            sample.tokens[s * shard_size : (s + 1) * shard_size],
            left,
            cfg,
        )
        for s in range(n_shards)
    }
    with open_run(out, KIND, resume=resume) as run:
        run.start(
            {
                "config": cfg,
                # the --model spec (a path made absolute; a loaded model: its spec or class), as lm mia records it
                "model_spec": model_record(spec if spec is not None else lm)["id"],
                "data": {**source.record(), **sample.record()},
                "sequences_sha256": _digest(sample),
                "shard_size": shard_size,
                "n_shards": n_shards,
                "seeds": {
                    "sampling_seed": config.seed,
                    "derivation": "numpy default_rng(seed): documents, then offsets",
                },
            },
            identity=("config", "model_spec", "shard_size", "n_shards", "sequences_sha256"),
            started=started,
        )
        if sample.skipped:
            run.store.log(f"skipped {sample.skipped} document(s) shorter than {left + right} tokens")
        run.store.log(f"{KIND}: {n} sequences in {n_shards} shards, prefixes {list(config.prefix_lengths)}")
        pool_model = spec if (runner == "ray" and spec is not None) else lm
        with lm_pool(
            runner, pool_model, device=config.device, dtype=config.dtype, options=runner_options, log=run.store.log
        ) as pool:
            loaded = pool.call(describe_lm_worker)
            run.manifest.update(
                model={
                    **model_record(spec if spec is not None else lm, lm),
                    "parameters": loaded["parameters"],
                    **_model_fields(loaded["describe"]),
                },
                tokenizer=loaded["describe"].get("tokenizer"),
                runner=pool.describe(),
            )
            run.save()
            run_shards(
                run,
                pool,
                extractable_stage,
                shard_args,
                weights={s: len(a[0]) for s, a in shard_args.items()},
                label=KIND,
                unit="sequences",
                progress=progress,
                stop_after_shards=stop_after_shards,
                describe=lambda s, t: f"{t['sequences']['seq_id'].nunique()} sequences",
            )
        merged = run.store.merge(n_shards, tables=("sequences",))["sequences"]
        table = _sequences_table(merged, sample)
        if index is not None:
            table = _with_duplicate_counts(table, index, sample, config, lm)
            run.manifest["corpus_index"] = {
                "path": str(index.root),
                "mode": index.mode,
                "documents": index.n_docs,
                "tokens": index.n_tokens,
                "vocab_sha256": (index.tokenizer_record or {}).get("vocab_sha256"),
            }
        write_table(table, run.root / "sequences.parquet")
        rates = extractable_rates(table)
        seconds = sum(float(run.store.shard_record(s).get("seconds", 0.0)) for s in range(n_shards))
        manifest = run.finish(
            counts={"sequences": n, "rows": len(table), "skipped_short_documents": sample.skipped},
            summary=rates,
            throughput={"seconds": round(seconds, 3), "sequences_per_s": round(n / seconds, 3) if seconds else None},
        )
    return ExtractableResult(Path(out), table, manifest, rates)


def _with_duplicate_counts(table: pd.DataFrame, index, sample, config: ExtractableConfig, lm) -> pd.DataFrame:
    """``suffix_count`` and ``window_count`` of every (sequence, prefix length) row."""
    ks = list(config.prefix_lengths)
    suffix, window = duplicate_counts(index, sample.tokens, sample.left, ks, config.suffix_length, lm)
    counts = pd.DataFrame(
        {
            "seq_id": np.repeat(np.arange(len(suffix), dtype=np.int64), len(ks)),
            "prefix_len": np.tile(np.asarray(ks, dtype=np.int64), len(suffix)),
            "suffix_count": np.repeat(suffix, len(ks)),
            "window_count": window.reshape(-1),
        }
    )
    table = table.drop(columns=["suffix_count", "window_count"], errors="ignore")
    return table.merge(counts, on=["seq_id", "prefix_len"], how="left", validate="one_to_one")


def _model_fields(describe: dict) -> dict:
    return {k: describe.get(k) for k in ("class", "dtype", "device", "gguf_file") if k in describe}


def _sequences_table(merged: pd.DataFrame, sample) -> pd.DataFrame:
    if merged["seq_id"].nunique() != len(sample.offset):
        raise MemscanError("the shards do not hold the sequences of this run", "start a new run with another --out")
    meta = pd.DataFrame(
        {
            "seq_id": np.arange(len(sample.offset), dtype=np.int64),
            "train_id": sample.train_id,
            "doc_index": sample.doc_index.astype(np.int64),
            "offset": sample.offset.astype(np.int64),
        }
    )
    table = merged.merge(meta, on="seq_id", how="left", validate="many_to_one")
    first = ["seq_id", "train_id", "doc_index", "offset", "prefix_len", "suffix_len"]
    table = table[first + [c for c in table.columns if c not in first]]
    return table.sort_values(["seq_id", "prefix_len"], kind="mergesort").reset_index(drop=True)


def extractable_rates(table: pd.DataFrame) -> dict:
    """The share of k-extractable sequences (and mean measures) by prefix length, and the
    log-linear trend of Carlini et al. 2022 (Fig. 1c): ``rate ≈ a + b · log10 k`` by least squares."""
    by_k = {}
    for k, g in table.groupby("prefix_len", sort=True):
        by_k[int(k)] = {
            "sequences": int(len(g)),
            "extractable_rate": float(g["extractable"].mean()),
            "mean_match_fraction": float(g["match_fraction"].mean()),
            "mean_exact_memorization": float(g["exact_memorization"].mean()),
            "rate_within_n_samples_50_le_1000": float((g["n_samples_50"] <= 1000).mean()),
        }
    pythia = table.drop_duplicates("seq_id")
    return {
        "by_prefix_length": by_k,
        "trend": log_linear_trend(list(by_k), [v["extractable_rate"] for v in by_k.values()]),
        "pythia_extractable_rate": float(pythia["pythia_extractable"].mean()) if len(pythia) else 0.0,
        "mean_pythia_score": float(pythia["pythia_score"].mean()) if len(pythia) else 0.0,
        "near_tie_steps": int(table["near_ties"].sum()),
        "duplication": duplication_summary(table),
    }


def log_linear_trend(ks, rates) -> dict | None:
    """Least-squares fit ``rate = intercept + slope · log10 k`` (None with fewer than 2 prefix lengths).

    >>> log_linear_trend([10, 100], [0.1, 0.3])
    {'slope_per_decade': 0.2, 'intercept': -0.1, 'points': 2}
    """
    if len(ks) < 2:
        return None
    x = np.log10(np.asarray(ks, dtype=float))
    slope, intercept = np.polyfit(x, np.asarray(rates, dtype=float), 1)
    return {"slope_per_decade": round(float(slope), 12), "intercept": round(float(intercept), 12), "points": len(ks)}
