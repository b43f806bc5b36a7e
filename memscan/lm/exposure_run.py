"""``memscan lm exposure``: the Secret Sharer exposure of planted canaries (run kind ``lm-exposure``).

Canaries (:func:`read_canaries`):

- a JSONL file, one object a line: ``{"canary": "my PIN is 281945", "format": "my PIN is {d6}",
  "copies": 10, "id": "pin-10"}`` (``copies``: how often it was inserted, optional; ``id``
  optional, else ``c<line>``);
- a text file, one canary a line: ``<canary><TAB><format>[<TAB><copies>]``;
- an inline spec ``FORMAT::CANARY[::COPIES]`` (one canary).

Each canary's exposure (:mod:`memscan.lm.exposure`) is exact — the rank among all of ``R``,
``rank = |{r ∈ R : Px(r) ≤ Px(canary)}| = 1 + n_lower + n_ties`` (ties push the canary down),
enumerated in shards of ``candidates_per_shard`` — where ``|R| ≤ exact_limit`` (10^5), else
estimated from ``samples`` uniform candidates and a fitted skew-normal (one shard), clipped to
``log2 |R|``. Every token of the canary is scored, after the model's BOS (else EOS) token.

A run directory holds ``exposures.parquet`` (one row per canary: ``canary_id``, ``canary``,
``format``, ``copies``, ``space_size``, ``method``, ``log_perplexity`` (bits), ``rank``,
``ties``, ``exposure``, ``max_exposure`` = log2 |R|, ``candidates``, and for estimates
``extrapolated_exposure`` (the paper's unclipped ``−log2 F``), ``clipped`` and the skew-normal
fit), ``parts.parquet`` (the shards' partial counts), ``manifest.json`` (its ``definitions``:
:data:`memscan.lm.exposure.DEFINITIONS`), ``shards/`` and ``run.log``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.data.prompts import read_utf8, text_lines
from memscan.errors import InputError, MemscanError
from memscan.generators.model_record import model_record
from memscan.lm.exposure import DEFINITIONS, EXACT_LIMIT, CanaryFormat, exposure_from_rank
from memscan.lm.worker import describe_lm_worker, exposure_stage, lm_pool
from memscan.runners.shards import run_shards
from memscan.store import open_run, write_table

KIND = "lm-exposure"


@dataclass
class ExposureConfig:
    """Options of ``memscan lm exposure``."""

    exact_limit: int = EXACT_LIMIT
    samples: int = 10_000
    candidates_per_shard: int = 20_000
    batch_size: int = 256
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"

    def validate(self) -> ExposureConfig:
        checks = (
            ("--exact-limit", self.exact_limit, f"e.g. --exact-limit {EXACT_LIMIT} (enumerate when |R| ≤ it)"),
            ("--samples", self.samples, "e.g. --samples 10000"),
            ("--candidates-per-shard", self.candidates_per_shard, "e.g. --candidates-per-shard 20000"),
            ("--batch-size", self.batch_size, "e.g. --batch-size 256"),
        )
        for opt, value, hint in checks:
            if value < 1:
                raise InputError(f"{opt} {value} must be ≥ 1", hint)
        if self.samples < 100:
            raise InputError(f"--samples {self.samples} is too few to fit a distribution", "use at least 100")
        return self


@dataclass
class ExposureResult:
    """A finished ``lm-exposure`` run."""

    run_dir: Path
    exposures: pd.DataFrame
    manifest: dict


def read_canaries(spec: str | Path) -> pd.DataFrame:
    """Canaries from a JSONL / tab-separated file or an inline ``FORMAT::CANARY[::COPIES]`` spec."""
    text = str(spec)
    path = Path(text).expanduser()
    rows = []
    if not path.is_file():
        if "::" not in text:
            raise InputError(
                f"canaries {spec} is neither a file nor FORMAT::CANARY",
                "give a JSONL file of {canary, format, copies} or e.g. 'my PIN is {d6}::my PIN is 281945'",
            )
        parts = text.split("::")
        rows.append({"canary_id": "c1", "format": parts[0], "canary": parts[1], "copies": _copies(parts[2:3], text)})
    elif path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text_lines(read_utf8(path, "canaries file")), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} line {n} is not JSON ({exc.msg})", "one JSON object per line") from None
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("canary"), str)
                or not isinstance(obj.get("format"), str)
            ):
                raise InputError(f"{path} line {n} lacks a string canary or format", '{"canary": ..., "format": ...}')
            cid = str(obj.get("id", f"c{n}"))
            rows.append(
                {
                    "canary_id": cid,
                    "format": obj["format"],
                    "canary": obj["canary"],
                    "copies": _copies([obj.get("copies")], f"{path} line {n}"),
                }
            )
    else:
        for n, line in enumerate(text_lines(read_utf8(path, "canaries file")), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                raise InputError(f"{path} line {n} is not <canary><TAB><format>", "separate canary and format by a tab")
            rows.append(
                {
                    "canary_id": f"c{n}",
                    "canary": parts[0],
                    "format": parts[1],
                    "copies": _copies(parts[2:3], f"{path} line {n}"),
                }
            )
    if not rows:
        raise InputError(f"canaries {spec} holds no canary", "one canary per line")
    df = pd.DataFrame(rows)
    if df["canary_id"].duplicated().any():
        raise InputError(f"canaries {spec} repeat an id ({df['canary_id'][df['canary_id'].duplicated()].iloc[0]})", "")
    for row in df.itertuples():
        CanaryFormat.parse(row.format).index_of(row.canary)  # refuses a canary that does not match
    df["copies"] = df["copies"].astype("Int64")
    return df


def _copies(values, where: str):
    if not values or values[0] is None or values[0] == "":
        return None
    try:
        n = int(values[0])
    except (TypeError, ValueError):
        raise InputError(
            f"copies {values[0]!r} in {where} is not an integer", "the number of inserted copies"
        ) from None
    if n < 0:
        raise InputError(f"copies {n} in {where} is negative", "")
    return n


def plan_parts(canaries: pd.DataFrame, config: ExposureConfig) -> list[dict]:
    """The shards: candidate ranges of each exactly-enumerated canary, one estimate per other canary."""
    parts = []
    for row in canaries.itertuples():
        fmt = CanaryFormat.parse(row.format)
        base = {"canary_id": row.canary_id, "canary": row.canary, "format": row.format, "batch_size": config.batch_size}
        if fmt.space_size <= config.exact_limit:
            for lo in range(0, fmt.space_size, config.candidates_per_shard):
                hi = min(fmt.space_size, lo + config.candidates_per_shard)
                parts.append({**base, "method": "exact", "lo": lo, "hi": hi})
        else:
            seed = int.from_bytes(
                hashlib.blake2b(f"{config.seed}:{row.canary_id}".encode(), digest_size=7).digest(), "big"
            )
            parts.append({**base, "method": "estimate", "lo": 0, "hi": 0, "samples": config.samples, "seed": seed})
    return parts


def lm_exposure(
    model,
    canaries,
    out: str | Path,
    config: ExposureConfig = ExposureConfig(),
    *,
    progress: bool = True,
    resume: bool = False,
    runner: str = "local",
    runner_options=None,
    stop_after_shards: int | None = None,
) -> ExposureResult:
    """Exposure of every canary (see the module docstring)."""
    config = config.validate()
    table = canaries if isinstance(canaries, pd.DataFrame) else read_canaries(canaries)
    parts = plan_parts(table, config)
    started = time.time()
    spec = model if isinstance(model, (str, Path)) else None
    # the --model spec (a path made absolute; a loaded model: its spec or class), as lm mia records it
    model_spec = model_record(spec if spec is not None else model)["id"]
    if spec is not None and runner != "ray":  # a bad model fails here, before the run starts
        from memscan.errors import user_code
        from memscan.generators.causal_lm import load_causal_lm

        with user_code(f"loading the language model {spec} failed", "fix the model and rerun"):
            model = load_causal_lm(str(spec), device=config.device, dtype=config.dtype)
    digest = hashlib.sha256(table[["canary_id", "canary", "format"]].to_json(orient="records").encode()).hexdigest()
    with open_run(out, KIND, resume=resume) as run:
        run.start(
            {
                "config": asdict(config),
                "model_spec": model_spec,
                "canaries": {
                    "source": "<table>" if isinstance(canaries, pd.DataFrame) else str(canaries),
                    "count": len(table),
                },
                "canaries_sha256": digest,
                "definitions": DEFINITIONS,
                "n_shards": len(parts),
                "seeds": {"run_seed": config.seed, "derivation": "blake2b(run_seed, canary_id) → 56-bit sample seed"},
            },
            identity=("config", "model_spec", "n_shards", "canaries_sha256", "definitions"),
            started=started,
        )
        with lm_pool(
            runner, model, device=config.device, dtype=config.dtype, options=runner_options, log=run.store.log
        ) as pool:
            loaded = pool.call(describe_lm_worker)
            run.manifest.update(
                model={
                    **model_record(spec if spec is not None else model, None if spec is not None else model),
                    "parameters": loaded["parameters"],
                    "class": loaded["describe"].get("class"),
                    "dtype": loaded["describe"].get("dtype"),  # as loaded (--dtype auto resolved)
                },
                tokenizer=loaded["describe"].get("tokenizer"),
                runner=pool.describe(),
            )
            run.save()
            run_shards(
                run,
                pool,
                exposure_stage,
                {s: (p,) for s, p in enumerate(parts)},
                weights={
                    s: (p["hi"] - p["lo"]) if p["method"] == "exact" else p["samples"] for s, p in enumerate(parts)
                },
                label=KIND,
                unit="candidates",
                progress=progress,
                stop_after_shards=stop_after_shards,
                describe=lambda s, t: f"canary {t['parts']['canary_id'].iloc[0]} ({t['parts']['method'].iloc[0]})",
            )
        merged = run.store.merge(len(parts), tables=("parts",))["parts"]
        exposures = exposures_table(table, merged)
        write_table(exposures, run.root / "exposures.parquet")
        seconds = sum(float(run.store.shard_record(s).get("seconds", 0.0)) for s in range(len(parts)))
        manifest = run.finish(
            counts={"canaries": len(table), "exact": int((exposures["method"] == "exact").sum())},
            summary={"mean_exposure": float(exposures["exposure"].mean())},
            throughput={
                "seconds": round(seconds, 3),
                "candidates_per_s": round(float(merged["candidates"].sum()) / seconds, 1) if seconds else None,
            },
        )
    return ExposureResult(Path(out), exposures, manifest)


def exposures_table(canaries: pd.DataFrame, parts: pd.DataFrame) -> pd.DataFrame:
    """One row per canary from the shards' parts: the exact ``rank = 1 + Σ n_lower + Σ n_ties``
    (Carlini et al. 2019 Def. 2, ties push the canary down); or the estimate, clipped to
    ``log2 |R|`` (``clipped``; ``extrapolated_exposure`` unclipped) with ``rank = |R| · 2^−exposure``."""
    rows = []
    for row in canaries.itertuples():
        fmt = CanaryFormat.parse(row.format)
        mine = parts[parts["canary_id"] == row.canary_id]
        if mine.empty:
            raise MemscanError(f"no shard holds canary {row.canary_id}", "start a new run with another --out")
        px = mine["log_perplexity"].to_numpy()
        method = str(mine["method"].iloc[0])
        out = {
            "canary_id": row.canary_id,
            "canary": row.canary,
            "format": row.format,
            "copies": row.copies,
            "space_size": float(fmt.space_size),
            "method": method,
            "log_perplexity": float(px[0]),
            "max_exposure": math.log2(fmt.space_size),
        }
        if method == "exact":
            if not np.all(px == px[0]):
                raise MemscanError(f"the shards disagree on the log-perplexity of canary {row.canary_id}", "")
            ties = int(mine["n_ties"].sum())
            rank = 1 + int(mine["n_lower"].sum()) + ties
            out.update(rank=float(rank), ties=ties, exposure=exposure_from_rank(rank, fmt.space_size))
            out.update(candidates=int(mine["candidates"].sum()), extrapolated_exposure=np.nan, clipped=False)
            out.update(skewnorm_a=np.nan, skewnorm_loc=np.nan, skewnorm_scale=np.nan)
        else:
            e = float(mine["estimate_exposure"].iloc[0])
            extrapolated = float(mine["extrapolated_exposure"].iloc[0])
            clipped = bool(extrapolated > e)
            # rank = |R| · 2^−exposure: 1 where clipped, never below 1 through float rounding
            rank = 1.0 if clipped else max(1.0, float(fmt.space_size * 2.0**-e))
            out.update(rank=rank, ties=int(mine["n_ties"].iloc[0]), exposure=e)
            out.update(candidates=int(mine["candidates"].iloc[0]), extrapolated_exposure=extrapolated, clipped=clipped)
            out.update({k: float(mine[k].iloc[0]) for k in ("skewnorm_a", "skewnorm_loc", "skewnorm_scale")})
        rows.append(out)
    df = pd.DataFrame(rows)
    df["copies"] = df["copies"].astype("Int64")
    return df
