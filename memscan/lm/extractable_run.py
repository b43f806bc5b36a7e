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

Every prefix is fed as it is by default, as in Carlini et al. 2022 and Biderman et al. 2023
(sequences of packed training data). With ``document_start=True`` (``--document-start``), for
models trained with a start token before each document (the Llama family), a prefix (of any
length k, or the Pythia score's 32 tokens) that starts at token 0 of its document is decoded and
scored after the document-start token (the model's BOS token, else its EOS token:
:func:`memscan.lm.decoding.document_start`), the context the document had in training, as
``lm exposure`` and ``lm extract`` do; a prefix that starts inside its document is still fed as it
is (in packed training its context was other text). The manifest records the choice and the token
(``document_start``). A model whose ``max_length`` is below the longest sequence the run feeds it
(:func:`model_positions`) is refused before any work.
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
from memscan.lm.decoding import check_scheme, document_start
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
    document_start: bool = False
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
        check_scheme(self.temperature, top_k, self.top_p)  # before 1 means "off": a top-p above 1 is refused
        top_p = float(self.top_p) if self.top_p is not None and self.top_p < 1 else None
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


def model_positions(config: ExtractableConfig, start_token: bool) -> int:
    """The longest token sequence the run feeds the model: a k-token prefix and its m-token suffix
    under teacher forcing (``k + m``), the Pythia score's 32-token prefix and the 31 greedy tokens
    fed back (``63``, unless taken from the k = 32 continuation), and one more token where a prefix
    that starts its document is fed after the document-start token (``start_token``; only a
    prefix of the window's full left length, ``max(K, 32)``, can start its document).

    >>> model_positions(ExtractableConfig(prefix_lengths=(16,), suffix_length=16), True)
    64
    >>> model_positions(ExtractableConfig(prefix_lengths=(32, 64), suffix_length=50), False)
    114
    """
    left, _ = config.window
    m = config.suffix_length
    lengths = [k + m + int(start_token and k == left) for k in config.prefix_lengths]
    if PYTHIA_LENGTH not in config.prefix_lengths or m < PYTHIA_LENGTH:
        lengths.append(2 * PYTHIA_LENGTH - 1 + int(start_token and left == PYTHIA_LENGTH))
    return max(lengths)


def _check_positions(config: ExtractableConfig, max_length: int | None, start_token: int | None) -> None:
    """Refuse a model that takes fewer positions than :func:`model_positions`."""
    need = model_positions(config, start_token is not None)
    if not max_length or need <= max_length:
        return
    pythia = 2 * PYTHIA_LENGTH - 1 + int(start_token is not None and config.window[0] == PYTHIA_LENGTH)
    after = " (each after the document-start token where it starts its document)" if start_token is not None else ""
    raise InputError(
        f"the run feeds the model sequences of up to {need} tokens — prefixes {list(config.prefix_lengths)} + "
        f"suffix {config.suffix_length} under teacher forcing, and the Pythia score's {PYTHIA_LENGTH}-token "
        f"prefix + {PYTHIA_LENGTH} greedy tokens{after} — more than the {max_length} positions of the model",
        f"use a model of at least {need} positions (the Pythia score alone needs {pythia}, whatever "
        "--prefix-lengths / --suffix-length say)"
        if pythia > max_length
        else f"lower --prefix-lengths / --suffix-length, or use a model of at least {need} positions",
    )


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
    start_token = document_start(lm) if config.document_start else None
    _check_positions(config, getattr(lm, "max_length", None), start_token)
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
    starts = (sample.offset - left).astype(np.int64)  # the document token index of each window's first token
    # the duplicate counts need no model: counted (and a tokenizer that cannot give them refused) first
    counts = _duplicate_counts(index, sample, starts, config, lm) if index is not None else None
    n_shards = math.ceil(n / shard_size)
    seq_ids = np.arange(n, dtype=np.int64)
    cfg = config.to_dict()
    shard_args = {
        s: (
            seq_ids[s * shard_size : (s + 1) * shard_size],
            sample.tokens[s * shard_size : (s + 1) * shard_size],
            left,
            cfg,
            starts[s * shard_size : (s + 1) * shard_size],
            start_token,
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
                "document_start": {
                    "token": start_token,
                    "rule": "put before a prefix that starts at token 0 of its document (BOS, else EOS); "
                    "a prefix inside its document is fed as it is"
                    if start_token is not None
                    else "off: every prefix is fed as it is (--document-start puts BOS, else EOS, before "
                    "a prefix that opens its document)",
                },
                "shard_size": shard_size,
                "n_shards": n_shards,
                "seeds": {
                    "sampling_seed": config.seed,
                    "derivation": "numpy default_rng(seed): documents, then offsets",
                },
            },
            identity=("config", "model_spec", "shard_size", "n_shards", "sequences_sha256", "document_start"),
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
        if counts is not None:
            table = table.drop(columns=["suffix_count", "window_count"], errors="ignore")
            table = table.merge(counts, on=["seq_id", "prefix_len"], how="left", validate="one_to_one")
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


def _duplicate_counts(index, sample, starts: np.ndarray, config: ExtractableConfig, lm) -> pd.DataFrame:
    """``suffix_count`` and ``window_count`` of every (sequence, prefix length) row."""
    ks = list(config.prefix_lengths)
    suffix, window = duplicate_counts(index, sample.tokens, sample.left, ks, config.suffix_length, lm, starts=starts)
    return pd.DataFrame(
        {
            "seq_id": np.repeat(np.arange(len(suffix), dtype=np.int64), len(ks)),
            "prefix_len": np.tile(np.asarray(ks, dtype=np.int64), len(suffix)),
            "suffix_count": np.repeat(suffix, len(ks)),
            "window_count": window.reshape(-1),
        }
    )


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
