"""``memscan lm mia``: membership scores of a causal language model on member and non-member text.

The user supplies texts known to be in the model's training data (``--members``) and texts known
not to be (``--nonmembers``): JSONL with a ``text`` field (and optionally ``id``), Parquet with a
``text`` column, or a text file with one example a line (blank lines skipped and counted). Each
example is tokenized by the target model (no special tokens), cut to the model's token limit
(:func:`token_limits`: ``max_tokens``, within the model's ``max_length`` positions), scored in
one forward pass that gives its next-token distributions — the per-token log-probabilities and
the exact moments of Min-K%++ come from the same pass —, its lowercased form in a second pass,
and, with a reference model, a pass of the reference, cut to the reference's own limit
(:mod:`memscan.lm.membership` has the scores and their papers). With ``document_start``
(``--document-start``) every text is fed after the model's document-start token (BOS, else EOS:
:func:`memscan.lm.decoding.document_start`), so its first token is scored too — what the papers'
code does for a tokenizer that adds a BOS token by default (LLaMA's); off (the default), the
first token is only context, as their code does for GPT-2 and Pythia. A blind baseline
(:mod:`memscan.lm.blind`) scores the same split from the text alone.

A run directory holds

- ``examples.parquet`` — ``index``, ``id``, ``source`` (``members``/``nonmembers``), ``line``,
  ``is_member``, ``text``;
- ``statistics.parquet`` — one row per example: ``index``, ``n_tokens`` (scored tokens + 1: the
  tokens fed, the document-start token among them), ``truncated`` (the text cut to the target's
  limit), ``reference_truncated`` (cut to the reference's), ``lowercase_scored``, ``mean_nll``,
  ``perplexity``, ``zlib_bits``, ``lowercase_mean_nll``,
  ``reference_mean_nll`` and one column per score (higher = member);
- ``scores.parquet`` / ``metrics.parquet`` — the diffusion MIA's tables (``docs/mia.md``): one
  ``statistic`` per score (``loss``, ``zlib``, ``lowercase``, ``min_k``, ``min_k_plus_plus``,
  ``reference``) and ``blind_baseline``, ``attack`` ``threshold`` (the global threshold swept over
  the ROC curve; ``tfidf_logistic_regression`` for the blind baseline), ``timestep`` empty;
- ``manifest.json`` — the common fields, ``model`` and ``reference_model`` records, ``config``,
  ``token_limits`` (per model: ``max_tokens``, ``max_length``, ``start_token``, ``text_tokens``;
  a resume must match them), ``sources``, ``counts``, ``blind_baseline`` (AUC, warning flag,
  settings), ``throughput``;
- ``shards/`` — each shard's ``statistics`` and completion record.

Shards of examples go through :func:`memscan.runners.shards.run_shards` on the local or the Ray
runner (each worker loads the model once, :func:`setup_lm_mia`; :func:`lm_mia_stage` scores one
shard). The metrics are computed in the driver from the merged statistics, so they do not depend
on the runner.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan.data.prompts import read_utf8, text_lines
from memscan.devices import check_device
from memscan.errors import InputError, MemscanError, user_code
from memscan.generators.model_record import loaded_model_record
from memscan.lm import membership as ms
from memscan.lm.blind import BLIND_AUC_WARNING, BLIND_WARNING_TEXT, blind_baseline
from memscan.lm.decoding import document_start
from memscan.mia.metrics import AttackResult, roc_metrics
from memscan.mia.tables import metrics_rows, score_rows
from memscan.runners import RayOptions, make_pool, require_ray
from memscan.runners.shards import run_shards
from memscan.store import open_run, write_table

__all__ = [
    "ATTACK",
    "BLIND_ATTACK",
    "BLIND_STATISTIC",
    "LmMiaConfig",
    "LmMiaResult",
    "lm_mia_stage",
    "read_texts",
    "run_lm_mia",
    "setup_lm_mia",
    "token_limits",
]

KIND = "lm-mia"
#: The ``attack`` of every score's rows: the global threshold swept over the ROC curve.
ATTACK = "threshold"
#: The ``statistic`` and ``attack`` of the blind baseline's rows.
BLIND_STATISTIC = "blind_baseline"
BLIND_ATTACK = "tfidf_logistic_regression"
#: Examples per shard by default (the unit of commit and ``--resume``).
DEFAULT_SHARD_SIZE = 64
#: Next-token log-probabilities held at once (bytes of float64), per forward chunk.
NEXT_TOKEN_BUDGET = 256 * 2**20

TEXT_HINT = (
    'pass a JSONL file with a "text" field, a Parquet file with a text column, or a text file with one example a line'
)


@dataclass(frozen=True)
class LmMiaConfig:
    """Settings of an ``lm mia`` run (recorded in the manifest; a resumed run must match).

    k_percent : k of Min-K% and Min-K%++ (percent of the tokens, floor, at least one)
    max_tokens : text tokens kept per example (longer texts are cut, counted in ``truncated``);
        a model takes at most its ``max_length`` positions, so the text a model scores is cut to
        ``min(max_tokens, max_length)`` tokens, one fewer with ``document_start``
        (:func:`token_limits`, recorded in the manifest)
    document_start : feed every text after the model's document-start token (BOS, else EOS), so
        its first token is scored too (off: the first token is only context)
    batch_size : examples of equal token length per forward pass
    device, dtype : where and in what precision the model runs
    seed : the blind baseline's folds and the bootstrap
    bootstrap : replicates of the 95 % intervals
    """

    k_percent: float = ms.DEFAULT_K_PERCENT
    max_tokens: int = 512
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "auto"
    seed: int = 0
    bootstrap: int = 200
    document_start: bool = False

    def validate(self) -> LmMiaConfig:
        ms.k_count(1, self.k_percent)
        if int(self.max_tokens) < 2:
            raise InputError(f"max_tokens={self.max_tokens}", "score at least 2 tokens per example (e.g. 512)")
        if int(self.batch_size) < 1:
            raise InputError(f"batch_size={self.batch_size}", "use at least 1")
        if int(self.bootstrap) < 0:
            raise InputError(f"bootstrap={self.bootstrap}", "use 0 (no intervals) or e.g. 200")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LmMiaResult:
    """A finished ``lm mia`` run (the tables are also on disk in ``run_dir``)."""

    run_dir: Path
    examples: pd.DataFrame
    statistics: pd.DataFrame
    scores: pd.DataFrame
    metrics: pd.DataFrame
    blind: dict
    manifest: dict

    def auc(self, statistic: str) -> float:
        """The AUC of one score (or of ``blind_baseline``)."""
        row = self.metrics[self.metrics["statistic"] == statistic]
        if row.empty:
            raise InputError(f"no metrics for {statistic!r}", f"choose one of {', '.join(self.metrics['statistic'])}")
        return float(row["auc"].iloc[0])


# ---- inputs -------------------------------------------------------------------------------------
def read_texts(path: str | Path, role: str = "members") -> tuple[pd.DataFrame, dict]:
    """The examples of one side: ``(table of id, line, text; info)``.

    ``path`` is JSONL (``.jsonl``/``.ndjson``/``.json``, one object a line with a ``text`` string
    and optionally an ``id``), Parquet with a ``text`` column (and optionally ``id``), or a text file
    with one example a line (blank lines skipped and counted in ``info``). Ids default to
    ``<role>:<line>``. Every error names the file (and line) and what to do.
    """
    p = Path(path)
    opt = f"--{role}"
    if not p.is_file():
        what = "does not exist" if not p.exists() else "is not a file"
        raise InputError(f"{opt} {p} {what}", TEXT_HINT)
    suffix = p.suffix.lower()
    ids, lines, texts, blank = [], [], [], 0
    if suffix == ".parquet":
        try:
            df = pd.read_parquet(p)
        except Exception as exc:
            raise InputError(f"{opt} {p} is not a readable Parquet file ({type(exc).__name__})", TEXT_HINT) from None
        if "text" not in df.columns:
            raise InputError(f'{opt} {p} has no "text" column (columns: {", ".join(map(str, df.columns))})', TEXT_HINT)
        for i, (t, rid) in enumerate(zip(df["text"], df["id"] if "id" in df.columns else [None] * len(df))):
            if not isinstance(t, str):
                raise InputError(f"{opt} {p} row {i}: text is {type(t).__name__}, not a string", "fill or drop it")
            if not t.strip():
                blank += 1
                continue
            ids.append(f"{role}:{i}" if rid is None or (not isinstance(rid, str) and pd.isna(rid)) else str(rid))
            lines.append(i)
            texts.append(t)
    else:
        content = read_utf8(p, opt)
        jsonl = suffix in (".jsonl", ".ndjson", ".json")
        for n, line in enumerate(text_lines(content), start=1):
            if not line.strip():
                blank += 1
                continue
            if jsonl:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{opt} {p} line {n} is not JSON ({exc.msg})", "one JSON object a line") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    what = (
                        'no "text" field'
                        if not isinstance(obj, dict) or "text" not in obj
                        else '"text" is not a string'
                    )
                    raise InputError(f"{opt} {p} line {n}: {what}", 'give every line a "text" string')
                if not obj["text"].strip():
                    blank += 1
                    continue
                ids.append(str(obj["id"]) if obj.get("id") is not None else f"{role}:{n}")
                texts.append(obj["text"])
            else:
                ids.append(f"{role}:{n}")
                texts.append(line)
            lines.append(n)
    if not texts:
        raise InputError(f"{opt} {p} holds no examples", f"{TEXT_HINT}; membership needs at least one {role[:-1]}")
    info = {
        "path": str(p.resolve()),
        "format": "parquet"
        if suffix == ".parquet"
        else ("jsonl" if suffix in (".jsonl", ".ndjson", ".json") else "text"),
        "count": len(texts),
        "blank_skipped": blank,
    }
    return pd.DataFrame({"id": ids, "line": lines, "text": texts}), info


def _examples(members, nonmembers) -> tuple[pd.DataFrame, dict]:
    """Members then non-members as one table (``index`` 0…N−1), refusing overlaps and clashing ids."""
    parts, sources = [], {}
    for role, src, flag in (("members", members, True), ("nonmembers", nonmembers, False)):
        if isinstance(src, (list, tuple)):
            df = pd.DataFrame(
                {
                    "id": [f"{role}:{i + 1}" for i in range(len(src))],
                    "line": range(1, len(src) + 1),
                    "text": [str(t) for t in src],
                }
            )
            if df.empty:
                raise InputError(f"no {role} given", f"pass at least one {role[:-1]}")
            info = {"path": "<list>", "format": "list", "count": len(df), "blank_skipped": 0}
        else:
            df, info = read_texts(src, role)
        df.insert(1, "source", role)
        df["is_member"] = flag
        parts.append(df)
        sources[role] = info
    ex = pd.concat(parts, ignore_index=True)
    both = set(parts[0]["text"]) & set(parts[1]["text"])
    if both:
        first = next(t for t in parts[0]["text"] if t in both)
        m, n = (sources[r]["path"] for r in ("members", "nonmembers"))
        same = " (the same file)" if m == n and m != "<list>" else ""
        raise InputError(
            f"{len(both)} text(s) of --members {m} are also in --nonmembers {n}{same} (first: {first[:60]!r})",
            "a text cannot be both a member and a non-member: pass disjoint files",
        )
    dup = ex["id"][ex["id"].duplicated()]
    if len(dup):
        raise InputError(f"{len(dup)} example id(s) repeat (first: {dup.iloc[0]!r})", "give every example its own id")
    ex.insert(0, "index", np.arange(len(ex), dtype=np.int64))
    return ex[["index", "id", "source", "line", "is_member", "text"]], sources


def _digest(ex: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for i, t, m in zip(ex["id"], ex["text"], ex["is_member"]):
        h.update(f"{i}\0{int(m)}\0".encode() + t.encode() + b"\0")
    return h.hexdigest()


# ---- the worker ---------------------------------------------------------------------------------
@dataclass
class LmMiaWorker:
    """A worker's context: the target model, the reference model (or ``None``), the config."""

    target: Any
    reference: Any
    config: LmMiaConfig


def _load(spec: Any, config: LmMiaConfig, what: str):
    if not isinstance(spec, (str, Path)):
        return spec  # a loaded CausalLM (local runner)
    from memscan.generators.causal_lm import load_causal_lm

    with user_code(f"loading the {what} {spec} failed", "fix the model (or its py: function) and rerun"):
        return load_causal_lm(str(spec), device=config.device, dtype=config.dtype)


def setup_lm_mia(model: Any, reference: Any, config: LmMiaConfig) -> LmMiaWorker:
    """Load the target (and reference) model once per worker."""
    target = _load(model, config, "model")
    ref = _load(reference, config, "reference model") if reference is not None else None
    return LmMiaWorker(target, ref, config)


def _model_limits(model, config: LmMiaConfig, what: str, option: str) -> dict:
    """One model's entry of :func:`token_limits` (refusing --document-start without a start token)."""
    start = None
    if config.document_start:
        start = document_start(model)
        if start is None:
            raise InputError(
                f"--document-start: {what} has neither a BOS nor an EOS token to put before each text",
                "run again without --document-start (each text scored from its second token), with a new --out",
            )
    max_length = getattr(model, "max_length", None)
    max_length = int(max_length) if max_length else None
    text_tokens = int(config.max_tokens)
    if max_length is not None:
        text_tokens = min(text_tokens, max_length - (start is not None))
    if text_tokens + (start is not None) < 2:
        raise InputError(
            f"{what} takes {max_length} position(s): too few to score a token of a text"
            + (" after the document-start token" if start is not None else ""),
            f"use a model with more positions as {option}",
        )
    return {
        "max_tokens": int(config.max_tokens),
        "max_length": max_length,
        "start_token": start,
        "text_tokens": text_tokens,
    }


def token_limits(worker: LmMiaWorker) -> dict:
    """The tokens of a text each model scores: ``{"model": …, "reference": … or None}``, each
    ``max_tokens`` (the config's), ``max_length`` (the model's positions, ``None`` when it states
    none), ``start_token`` (the document-start token fed first with ``document_start``, else
    ``None``) and ``text_tokens``: ``min(max_tokens, max_length − 1 if start_token else
    max_length)``, the text tokens kept. Recorded in the manifest; a resume must match them."""
    cfg = worker.config
    ref = worker.reference
    return {
        "model": _model_limits(worker.target, cfg, "the model", "--model"),
        "reference": _model_limits(ref, cfg, "the reference model", "--reference") if ref is not None else None,
    }


def describe_lm_mia_worker(worker: LmMiaWorker) -> dict:
    """What the manifest records of the models as a worker loaded them, and their
    :func:`token_limits`."""

    from memscan.generators.causal_lm import describe_lm

    def one(m):
        if m is None:
            return None
        params = getattr(m, "parameters", None)
        return {"parameters": params if isinstance(params, int) else None, "describe": describe_lm(m)}

    return {"model": one(worker.target), "reference": one(worker.reference), "token_limits": token_limits(worker)}


def _encode(model, text: str, max_tokens: int) -> tuple[np.ndarray, bool]:
    ids = np.asarray(model.encode(text), dtype=np.int64).ravel()
    return (ids[:max_tokens], True) if ids.size > max_tokens else (ids, False)


def _fed(ids: np.ndarray, start: int | None) -> np.ndarray:
    """The token ids fed to a model: the text's, after the document-start token when there is one."""
    return ids if start is None else np.concatenate([np.asarray([start], dtype=np.int64), ids])


def _equal_length_batches(seqs: list[np.ndarray], batch_size: int):
    """Indices of ``seqs`` in batches of equal length (the adapter takes no padding), in order of
    first appearance, each at most ``batch_size``."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(seqs):
        groups[s.size].append(i)
    for _, members in groups.items():
        for s in range(0, len(members), batch_size):
            yield members[s : s + batch_size]


def _token_logprobs(model, seqs: list[np.ndarray], batch_size: int, what: str) -> list[np.ndarray]:
    out: list[np.ndarray] = [np.zeros(0)] * len(seqs)
    for batch in _equal_length_batches(seqs, batch_size):
        with user_code(what):
            lp = np.asarray(model.token_logprobs(np.stack([seqs[i] for i in batch])), dtype=np.float64)
        for j, i in enumerate(batch):
            out[i] = lp[j]
    return out


def _next_token_pass(model, seqs: list[np.ndarray], batch_size: int, what: str):
    """Per sequence: token log-probabilities and the Min-K%++ moments, from one pass over the
    next-token distributions (in chunks of at most :data:`NEXT_TOKEN_BUDGET` bytes).

    An adapter with ``next_token_moments(ids) -> (log p(x_t), μ_t, σ_t)`` (three B×(T−1) arrays,
    the sums of :func:`memscan.lm.membership.next_token_moments` done where the logits are) is
    asked for those instead of the full B×(T−1)×V distributions."""
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [None] * len(seqs)  # type: ignore[list-item]
    vocab = int(getattr(model, "vocab_size", 0) or 0)
    fast = callable(getattr(model, "next_token_moments", None))
    for batch in _equal_length_batches(seqs, batch_size):
        t = seqs[batch[0]].size
        per = max(1, (t - 1) * max(vocab, 1) * 8)
        step = max(1, min(len(batch), NEXT_TOKEN_BUDGET // per)) if vocab and not fast else len(batch)
        for s in range(0, len(batch), step):
            part = batch[s : s + step]
            ids = np.stack([seqs[i] for i in part])
            if fast:  # the adapter computes them where the logits are (no B×(T−1)×V transfer)
                with user_code(what):
                    tok, mu, sigma = (np.asarray(a, dtype=np.float64) for a in model.next_token_moments(ids))
                if not tok.shape == mu.shape == sigma.shape == (len(part), t - 1):
                    raise MemscanError(
                        f"{what}: next_token_moments gave shapes {tok.shape}, {mu.shape}, {sigma.shape} "
                        f"for {ids.shape} token ids",
                        "it must return three B×(T−1) arrays: log p(x_t), μ_t, σ_t",
                    )
            else:
                with user_code(what):
                    nlp = np.asarray(model.next_token_logprobs(ids), dtype=np.float64)
                if nlp.shape[:2] != (len(part), t - 1):
                    raise MemscanError(
                        f"{what}: next_token_logprobs gave shape {nlp.shape} for {ids.shape} token ids",
                        "it must return B×(T−1)×V log-probabilities",
                    )
                tok = np.take_along_axis(nlp, ids[:, 1:, None], axis=-1)[..., 0]
                mu, sigma = ms.next_token_moments(nlp, name=f"{what}: next_token_logprobs")
            for j, i in enumerate(part):
                out[i] = (tok[j], mu[j], sigma[j])
    return out


def lm_mia_stage(
    worker: LmMiaWorker, indices: list[int], ids: list[str], texts: list[str], progress=None
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Score one shard of examples; returns ``({"statistics": one row per example}, meta)``."""
    cfg = worker.config
    t0 = time.perf_counter()
    target, ref = worker.target, worker.reference
    limits = token_limits(worker)
    keep, start = limits["model"]["text_tokens"], limits["model"]["start_token"]
    seqs, truncated, scored = [], [], []
    for i, text in zip(ids, texts):
        with user_code(f"the model's tokenizer failed on example {i}"):
            s, cut = _encode(target, text, keep)
            scored_text = target.decode(s) if cut else text
        if s.size + (start is not None) < 2:
            raise InputError(
                f"example {i} has {s.size} token(s); membership scores need at least "
                + ("1 (after the document-start token)" if start is not None else "2 (the first is not predicted)"),
                "remove it from the members/non-members file (or give it more text) and run again with a new --out",
            )
        seqs.append(_fed(s, start))
        truncated.append(cut)
        scored.append(scored_text)
    where = f"the model failed in shard of examples {ids[0]}…{ids[-1]}" if ids else "the model failed"
    if callable(getattr(target, "next_token_logprobs", None)):
        main = _next_token_pass(target, seqs, cfg.batch_size, where)
    else:  # a user's model without next-token distributions: no Min-K%++ (recorded by the driver)
        nan = [np.full(s.size - 1, np.nan) for s in seqs]
        main = list(zip(_token_logprobs(target, seqs, cfg.batch_size, where), nan, nan))
    if progress is not None:
        progress(len(ids) // 2)
    # the lowercased text, re-encoded, within the same limit (it may take more tokens)
    lower = [_fed(_encode(target, t.lower(), keep)[0], start) for t in scored]
    # a lowercased text can tokenize to a single token ("HELLO" → "hello"): its ratio is then 1
    # (no evidence either way), flagged per example and counted in the manifest
    lower_scored = [s.size >= 2 for s in lower]
    lower = [s if ok else seqs[k] for k, (s, ok) in enumerate(zip(lower, lower_scored))]
    lower_lp = _token_logprobs(target, lower, cfg.batch_size, where)
    ref_lp, ref_cut = None, [False] * len(ids)
    if ref is not None:
        ref_keep, ref_start = limits["reference"]["text_tokens"], limits["reference"]["start_token"]
        ref_seqs = []
        for k, t in enumerate(scored):
            with user_code(f"the reference model's tokenizer failed on example {ids[k]}"):
                r, ref_cut[k] = _encode(ref, t, ref_keep)
            ref_seqs.append(_fed(r, ref_start))
        short = [ids[k] for k, s in enumerate(ref_seqs) if s.size < 2]
        if short:
            raise InputError(
                f"example {short[0]} has fewer than 2 tokens under the reference model's tokenizer",
                "remove it, or give it more text",
            )
        ref_lp = _token_logprobs(ref, ref_seqs, cfg.batch_size, f"the reference model failed on examples {ids[0]}…")
    rows = []
    for k, (idx, eid) in enumerate(zip(indices, ids)):
        lp, mu, sigma = main[k]
        for name, arr in (("the model", lp), ("the model (lowercased text)", lower_lp[k])) + (
            (("the reference model", ref_lp[k]),) if ref_lp is not None else ()
        ):
            if not np.all(np.isfinite(arr)) or np.any(arr > ms.LOGPROB_ATOL):
                raise MemscanError(
                    f"{name} gave a log-probability that is not finite and ≤ 0 (up to {ms.LOGPROB_ATOL:g}) "
                    f"on example {eid}",
                    "check the model: per-token log-probabilities must be finite",
                )
        row = {
            "index": int(idx),
            "n_tokens": int(seqs[k].size),
            "truncated": bool(truncated[k]),
            "reference_truncated": bool(ref_cut[k]),
            "lowercase_scored": bool(lower_scored[k]),
            "mean_nll": ms.mean_nll(lp),
            "perplexity": ms.perplexity(lp) if ms.mean_nll(lp) < 700 else math.inf,
            "zlib_bits": ms.zlib_entropy_bits(scored[k]),
            "lowercase_mean_nll": ms.mean_nll(lower_lp[k]),
            "reference_mean_nll": ms.mean_nll(ref_lp[k]) if ref_lp is not None else np.nan,
            "loss": ms.loss_score(lp),
            "zlib": ms.zlib_score(lp, scored[k]),
            "lowercase": ms.lowercase_score(lp, lower_lp[k]),
            "min_k": ms.min_k_score(lp, cfg.k_percent),
            "min_k_plus_plus": ms.min_k_plus_plus_score(lp, mu, sigma, cfg.k_percent)
            if not np.isnan(mu).any()
            else np.nan,
            "reference": ms.reference_score(lp, ref_lp[k]) if ref_lp is not None else np.nan,
        }
        rows.append(row)
    if progress is not None:
        progress(len(ids) - len(ids) // 2)
    table = pd.DataFrame(rows, columns=_STAT_COLUMNS)
    tokens = int(sum(s.size for s in seqs))
    return {"statistics": table}, {
        "examples": len(ids),
        "tokens": tokens,
        "seconds": round(time.perf_counter() - t0, 3),
    }


_STAT_COLUMNS = [
    "index",
    "n_tokens",
    "truncated",
    "reference_truncated",
    "lowercase_scored",
    "mean_nll",
    "perplexity",
    "zlib_bits",
    "lowercase_mean_nll",
    "reference_mean_nll",
    *ms.SCORE_NAMES,
]


def _pool(runner: str, model, reference, config: LmMiaConfig, options, log):
    if runner != "ray":
        return make_pool(runner, setup_lm_mia, (model, reference, config), options, log=log)
    require_ray()
    for what, spec in (("model", model), ("reference model", reference)):
        if spec is not None and not isinstance(spec, (str, Path)):
            raise InputError(
                f"the Ray runner loads the {what} in each worker, but got a loaded {type(spec).__name__}",
                "pass its directory, hub id, .gguf file or py: spec instead",
            )
    opts = options if isinstance(options, RayOptions) else RayOptions(**(options or {}))
    if str(config.device).startswith("cuda") and opts.gpus_per_worker <= 0:
        raise InputError(
            f"device={config.device} but the Ray workers ask for no GPU",
            "pass --gpus-per-worker 1 (Ray hides the GPUs from workers that did not ask for one)",
        )
    if str(config.device).startswith("cuda:"):
        config = LmMiaConfig(**{**config.to_dict(), "device": "cuda"})
    return make_pool("ray", setup_lm_mia, (_abs(model), _abs(reference), config), opts, log=log)


def _abs(spec):
    if spec is None:
        return None
    s = str(spec)
    if not s.startswith("py:") and Path(s).expanduser().exists():
        return str(Path(s).expanduser().resolve())  # workers may start in another directory
    return s


def _spec_of(model) -> Any:
    return _abs(model) if isinstance(model, (str, Path)) else (getattr(model, "spec", None) or type(model).__qualname__)


# ---- the run ------------------------------------------------------------------------------------
def run_lm_mia(
    model: Any,
    members,
    nonmembers,
    out: str | Path,
    config: LmMiaConfig = LmMiaConfig(),
    *,
    reference: Any = None,
    progress: bool = True,
    resume: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    runner: str = "local",
    runner_options=None,
    stop_after_shards: int | None = None,
) -> LmMiaResult:
    """Score member and non-member texts under a causal LM; write an ``lm-mia`` run directory.

    Parameters
    ----------
    model : a ``--model`` spec for :func:`memscan.generators.causal_lm.load_causal_lm` (a
        transformers directory or hub id, a ``.gguf`` file, ``py:module:attr``), or a loaded
        causal LM (local runner only)
    members, nonmembers : files (:func:`read_texts`) or lists of strings
    out : the run directory
    config : :class:`LmMiaConfig`
    reference : a second model (same kinds as ``model``) for the reference ratio
    resume : finish the run in ``out`` (same inputs and config); committed shards are kept
    shard_size : examples per shard (the unit of commit and resume)
    runner, runner_options : ``"local"`` or ``"ray"`` (:class:`memscan.runners.RayOptions`)
    stop_after_shards : stop after this many new shards (a kill hook for tests of resume)
    """
    config = config.validate()
    if int(shard_size) < 1:
        raise InputError(f"shard_size={shard_size}", "use at least 1 example per shard")
    examples, sources = _examples(members, nonmembers)  # bad inputs fail here, before the run
    if runner == "local":
        check_device(config.device)  # the models load in this process: a missing GPU fails here
    started = time.time()
    n = len(examples)
    n_shards = math.ceil(n / shard_size)
    idx, ids, texts = examples["index"].tolist(), examples["id"].tolist(), examples["text"].tolist()
    shard_args = {
        s: (
            idx[s * shard_size : (s + 1) * shard_size],
            ids[s * shard_size : (s + 1) * shard_size],
            texts[s * shard_size : (s + 1) * shard_size],
        )
        for s in range(n_shards)
    }
    spec, ref_spec = _spec_of(model), (_spec_of(reference) if reference is not None else None)
    with open_run(out, KIND, resume=resume) as run:
        # the models' token limits are known once a worker has loaded them (below); until then the
        # manifest keeps the earlier run's, so that a refused resume leaves them as they were
        previous = run.previous or {}
        run.start(
            {
                "config": config.to_dict(),
                **({"token_limits": previous["token_limits"]} if "token_limits" in previous else {}),
                "model_spec": spec,
                "reference_spec": ref_spec,
                "sources": sources,
                "examples_sha256": _digest(examples),
                "shard_size": int(shard_size),
                "n_shards": n_shards,
                "scores": [s for s in ms.SCORE_NAMES if s != "reference" or reference is not None],
            },
            identity=("config", "model_spec", "reference_spec", "examples_sha256", "shard_size", "n_shards"),
            started=started,
        )
        run.store.log(f"lm-mia: {n} examples ({int(examples['is_member'].sum())} members) in {n_shards} shards")
        with _pool(runner, model, reference, config, runner_options, run.store.log) as pool:
            loaded = pool.call(describe_lm_mia_worker)
            limits = loaded["token_limits"]
            # the tokens each model scores are part of the run: a resume must score the same (a run
            # killed before its first load recorded none and committed nothing: nothing to check)
            if "token_limits" in previous or len(run.todo(n_shards)) < n_shards:
                run.check({"token_limits": limits}, ("token_limits",))
            run.manifest.update(
                model=loaded_model_record(model, loaded["model"]),
                reference_model=loaded_model_record(reference, loaded["reference"]) if reference is not None else None,
                token_limits=limits,
                runner=pool.describe(),
            )
            run.save()
            for what, lim in (("model", limits["model"]), ("reference model", limits["reference"])):
                if lim is not None and lim["text_tokens"] < lim["max_tokens"]:
                    run.store.log(
                        f"lm-mia: the {what} takes {lim['max_length']} positions: texts are cut to "
                        f"{lim['text_tokens']} tokens (--max-tokens {lim['max_tokens']})"
                        + (" after the document-start token" if lim["start_token"] is not None else "")
                    )
            run_shards(
                run,
                pool,
                lm_mia_stage,
                shard_args,
                weights={s: len(a[0]) for s, a in shard_args.items()},
                label="lm mia",
                unit="examples",
                progress=progress,
                stop_after_shards=stop_after_shards,
                describe=lambda s, t: f"{len(t['statistics'])} examples",
            )
        stats = run.store.merge(n_shards, tables=("statistics",))["statistics"]
        if stats["index"].tolist() != idx:
            raise MemscanError(
                f"the shards of {run.root} do not hold the examples of this run", "start a new run with another --out"
            )
        cut = {
            "truncated": int(stats["truncated"].sum()),
            "reference_truncated": int(stats["reference_truncated"].sum()),
        }
        for key, what in (("truncated", "model"), ("reference_truncated", "reference model")):
            if cut[key]:
                lim = limits["model" if key == "truncated" else "reference"]
                run.store.log(f"lm-mia: {cut[key]} of {n} texts cut to {lim['text_tokens']} tokens of the {what}")
        scores, metrics, blind, skipped = _tables(examples, stats, config, reference is not None)
        write_table(examples, run.root / "examples.parquet")
        write_table(scores, run.root / "scores.parquet")
        write_table(metrics, run.root / "metrics.parquet")
        records = [run.store.shard_record(s) for s in range(n_shards)]
        seconds = sum(float(r.get("seconds", 0.0)) for r in records)
        tokens = sum(int(r.get("tokens", 0)) for r in records)
        manifest = run.finish(
            counts={
                "examples": n,
                "members": int(examples["is_member"].sum()),
                "nonmembers": int((~examples["is_member"]).sum()),
                "truncated": cut["truncated"],
                "reference_truncated": cut["reference_truncated"],
                "lowercase_one_token": int((~stats["lowercase_scored"]).sum()),
                "tokens": tokens,
            },
            blind_baseline=blind,
            skipped_scores=skipped,
            throughput={
                "seconds": round(seconds, 3),
                "examples_per_s": round(n / seconds, 2) if seconds else None,
                "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            },
        )
    statistics = stats.merge(examples[["index", "id", "is_member"]], on="index")
    return LmMiaResult(Path(out), examples, statistics, scores, metrics, blind, manifest)


def _tables(examples: pd.DataFrame, stats: pd.DataFrame, config: LmMiaConfig, with_reference: bool):
    """scores.parquet and metrics.parquet (the diffusion MIA's schema) and the blind baseline."""
    y = examples["is_member"].to_numpy(dtype=bool)
    names = [s for s in ms.SCORE_NAMES if s != "reference" or with_reference]
    score_parts, metric_rows, skipped = [], [], []
    for name in names:
        sc = stats[name].to_numpy(dtype=np.float64)
        if name == "min_k_plus_plus" and np.isnan(sc).all():
            skipped.append({"statistic": name, "reason": "the model has no next_token_logprobs (needed for μ_t, σ_t)"})
            continue
        bad = ~np.isfinite(sc)
        if bad.any():
            first = examples["id"].iloc[int(np.flatnonzero(bad)[0])]
            raise MemscanError(
                f"score {name}: {int(bad.sum())} of {sc.size} example(s) have no value (NaN or infinite; "
                f"first: example {first})",
                "the model's next_token_moments gave NaN μ_t or σ_t there; check the adapter"
                if name == "min_k_plus_plus"
                else "check the model's per-token log-probabilities on that example",
            )
        roc = roc_metrics(sc, y, bootstrap=config.bootstrap, seed=config.seed)
        params = {"k_percent": config.k_percent} if name in ("min_k", "min_k_plus_plus") else {}
        res = AttackResult(ATTACK, sc, roc, None, {**params, "max_tokens": config.max_tokens})
        score_parts.append(score_rows(name, [(ATTACK, res)]))
        metric_rows += metrics_rows(name, [(ATTACK, res)])
    bl = blind_baseline(examples["text"].tolist(), y, seed=config.seed, bootstrap=config.bootstrap)
    blind = {
        "statistic": BLIND_STATISTIC,
        "auc": bl.auc,
        "warning": bl.warning,
        "warning_text": BLIND_WARNING_TEXT if bl.warning else None,
        "threshold": BLIND_AUC_WARNING,
        "skipped": bl.skipped,
        "params": bl.params,
    }
    if bl.roc is not None:
        res = AttackResult(BLIND_ATTACK, bl.scores, bl.roc, None, bl.params)
        score_parts.append(score_rows(BLIND_STATISTIC, [(BLIND_ATTACK, res)]))
        metric_rows += metrics_rows(BLIND_STATISTIC, [(BLIND_ATTACK, res)])
    scores = pd.concat(score_parts, ignore_index=True)
    metrics = pd.DataFrame(metric_rows)
    metrics["timestep"] = metrics["timestep"].astype("Int64")
    return scores, metrics, blind, skipped
