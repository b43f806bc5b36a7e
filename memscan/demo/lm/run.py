"""``memscan demo lm``: discoverable memorization and canary exposure rising with repetition.

The shipped model (``memscan/demo/lm/model``: a byte-level GPT-2, safetensors, trained by
:mod:`memscan.demo.lm.train` on the Shakespeare plays with planted canaries) is loaded through the
real causal-LM adapter (:func:`memscan.generators.causal_lm.load_causal_lm`), then

1. **extractable** (Carlini et al. 2022), through ``memscan lm extractable``'s run function
   (:func:`memscan.lm.extractable_run.lm_extractable`, run directory ``OUT/extractable``): every
   sentence canary and a seeded random sample of ordinary passages of the plays, prompted with
   their first ``PREFIX_BYTES`` bytes (= tokens: the model is byte-level); extracted when the greedy
   continuation equals the next ``SUFFIX_BYTES`` exactly;
2. **exposure** (Carlini et al. 2019): every digit canary ``the secret number is DDDDD``, ranked
   by log-perplexity among all 10**5 candidates of its format, exact: the demo's 28 canaries share
   one format, so :func:`format_logprobs` enumerates it once (10**4 forward passes, one per
   4-digit stem) where ``memscan lm exposure`` enumerates 10**5 texts per canary — the same ranks
   (tested against :func:`memscan.lm.exposure.exact_exposure`), 280× fewer passes, inside the
   demo's 5 minutes; ``exposure = log2 |R| − log2 rank``;
3. **sampling attack** (Carlini et al. 2021), through ``memscan lm extract``'s run function
   (:func:`memscan.lm.extract_run.lm_extract`, run directory ``OUT/extract``): an index of the
   planted training text in bytes mode is built at demo time (``OUT/corpus_index``), the model is
   sampled blind — every sample starts from a line break, knowing nothing of the canaries — and
   the samples are ranked, de-duplicated and confirmed against the index (≥ 100 bytes); a sentence
   canary "came out" when a confirmed sample's corpus match holds it whole;
4. the figures by planted copy count go to ``OUT/summary.json`` (``extracted_by_duplicate_count``
   in the image demo's structure, ``exposure_by_duplicate_count``, ``ordinary``,
   ``sampling_attack``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from memscan.demo.lm.canaries import (
    COPIES,
    DEFAULT_SEED,
    DIGIT_PREFIX,
    DIGITS,
    PREFIX_BYTES,
    SUFFIX_BYTES,
    canaries,
    ordinary_passages,
)
from memscan.errors import MemscanError
from memscan.lm.extract_run import lm_extract
from memscan.lm.extractable_run import ExtractableConfig, lm_extractable
from memscan.lm.memorization import samples_needed, suffix_log_probability, teacher_forced
from memscan.lm.sampling_attack import LmExtractConfig
from memscan.store import atomic_write_json, check_out_folder


def model_dir() -> Path:
    """The shipped LM demo model (transformers layout, safetensors weights, ByT5 tokenizer)."""
    return Path(str(resources.files("memscan.demo.lm") / "model"))


def demo_lm_settings(quick: bool) -> dict:
    """The demo's sizes. The sampling attack: ``attack_samples`` blind samples of ``attack_length``
    bytes from a line break, at the paper's top-k 40 and a constant temperature 1
    (``attack_temperature_start`` = 1: the paper's plain top-k sampler — its decaying temperature
    draws the first 20 bytes nearly at random, and a canary only comes out after a later line
    break, where the sample has too few bytes left for 100)."""
    return {
        "ordinary": 40 if quick else 200,
        "batch_size": 64,
        "attack_samples": 64 if quick else 1024,
        "attack_length": 128,
        "attack_batch_size": 128,
        "attack_temperature_start": 1.0,
        "attack_top": 100,
    }


@dataclass
class DemoLMResult:
    """A finished ``memscan demo lm``.

    Attributes
    ----------
    out : the demo directory (``summary.json``, ``extractable.csv``, ``exposure.csv``)
    summary : what ``summary.json`` holds
    """

    out: Path
    summary: dict
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def text(self) -> str:
        """The table the command prints."""
        s = self.summary
        lines = [
            f"memscan demo lm: {s['model']['parameters']:,}-parameter byte-level GPT-2, "
            f"prefix {s['prefix_length']} + suffix {s['suffix_length']} bytes, "
            f"{s['timings_s']['total']:.0f} s",
            f"  {'copies':>7}  {'extracted':>9}  {'M(f)':>6}  {'exposure (bits, of ' + str(s['exposure_max_bits']) + ')':>26}",
        ]
        lines += [f"  {c:>7}  {e:>9}  {m:>6}  {x:>26}" for c, e, m, x in self.rows]
        o = s["ordinary"]
        lines.append(
            f"  ordinary passages of the plays: {o['extracted']}/{o['sampled']} extracted ({o['rate']:.1%}), "
            f"M(f) {o['mean_exact_memorization']:.2f}"
        )
        lines.append(
            "  (M(f): share of suffix tokens whose teacher-forced argmax is the true token, Tirumala et al. 2022)"
        )
        a = s.get("sampling_attack")
        if a:
            by = ", ".join(
                f"{k}×: {v['extracted']}/{v['planted']}" for k, v in a["canaries_by_duplicate_count"].items()
            )
            lines.append(
                f"  sampling attack (Carlini et al. 2021): {a['samples']} blind samples of {a['length']} bytes → "
                f"{a['kept']} kept, {a['confirmed']} confirmed by the corpus index (≥ {a['min_match']} bytes)"
            )
            lines.append(
                f"    sentence canaries out of blind sampling, by copies: {by}; other confirmed: {a['confirmed_other']}"
            )
            prec = ", ".join(f"{m} {v['confirmed']}/{v['N']}" for m, v in a["precision"].items())
            lines.append(f"    precision@N: {prec}")
            part = ", ".join(
                f"{k}×: {v['partial']}/{v['planted']} (≤ {v['longest_partial_bytes']} B)"
                for k, v in a["canaries_by_duplicate_count"].items()
            )
            lines.append(f"    canaries begun but not finished (≥ {PARTIAL_BYTES} bytes matched inside one): {part}")
            need = ", ".join(
                f"{k}×: {v['median_samples_needed_50']:.3g}" if v["median_samples_needed_50"] else f"{k}×: ∞"
                for k, v in a["canaries_by_duplicate_count"].items()
            )
            lines.append(f"    samples a canary needs to open one with chance 1/2 (median, by copies): {need}")
        lines.append(f"  summary: {self.out / 'summary.json'}")
        return "\n".join(lines)


def _load(mdir: Path, device: str):
    from memscan.generators.causal_lm import load_causal_lm

    if not (mdir / "model.safetensors").exists():
        raise MemscanError(
            f"the LM demo model is missing from {mdir}", "reinstall memscan, or train it: memscan demo lm train"
        )
    return load_causal_lm(str(mdir), device=device)


def format_logprobs(lm, prefix: str = DIGIT_PREFIX, digits: int = DIGITS, batch_size: int = 1000) -> np.ndarray:
    """log p(d | prefix) for every ``digits``-digit string d (index = int(d)), exact, one format.

    The canaries of the demo share one format, so one enumeration ranks them all. One forward pass
    per *stem* (the first ``digits − 1`` digits: 10**(digits−1) passes, not 10**digits): the
    next-token distributions at the last ``digits`` positions give the log-probability of every
    candidate that shares the stem. Sums of the same per-token log-probabilities as
    :func:`memscan.lm.exposure.log_perplexity` (up to the prefix's own, shared by all candidates,
    and the unit: nats here, bits there), scored after the same start token
    (:func:`memscan.lm.exposure.start_token`), so the ranks are the same (tested)."""
    from memscan.lm.exposure import start_token

    pre = np.concatenate([[start_token(lm)], np.asarray(lm.encode(prefix), dtype=np.int64)]).astype(np.int64)
    digit_ids = np.array([int(lm.encode(str(d))[0]) for d in range(10)], dtype=np.int64)
    if any(len(lm.encode(str(d))) != 1 for d in range(10)):
        raise MemscanError("the model's tokenizer does not give one token per digit", "use a byte-level model")
    n_stems = 10 ** (digits - 1)
    L = len(pre)
    total = np.zeros(10**digits)
    for i in range(0, n_stems, batch_size):
        stem = np.arange(i, min(n_stems, i + batch_size))
        st = (stem[:, None] // 10 ** np.arange(digits - 2, -1, -1)[None, :]) % 10  # b × (digits−1) digits
        b = len(stem)
        pad = np.full((b, 1), digit_ids[0], dtype=np.int64)  # only its position's input is needed, not its own prob
        ids = np.concatenate([np.tile(pre, (b, 1)), digit_ids[st], pad], axis=1)
        # row j = 0..digits−1: log p(· | prefix, d_1..d_j), restricted to the 10 digit tokens
        nt = np.asarray(lm.next_token_logprobs(ids, start=L - 1))[:, :digits, :][:, :, digit_ids]
        stem_lp = np.take_along_axis(nt[:, : digits - 1, :], st[:, :, None], axis=2)[..., 0].sum(axis=1)
        total[stem[:, None] * 10 + np.arange(10)[None, :]] = stem_lp[:, None] + nt[:, digits - 1, :]
    return total


def exposure_of(total: np.ndarray, value: int) -> tuple[float, int]:
    """Exposure (Carlini et al. 2019, Def. 2–3): ``log2 |R| − log2 rank``, ``rank`` the number of
    candidates at least as likely as the canary, itself included (ties push the canary down, as in
    :mod:`memscan.lm.exposure`)."""
    rank = int((total >= total[value]).sum())
    return math.log2(len(total)) - math.log2(rank), rank


def run_demo_lm(
    out: str | Path = "runs/demo-lm",
    *,
    quick: bool = False,
    progress: bool = True,
    device: str = "cpu",
    seed: int = DEFAULT_SEED,
    model: str | Path | None = None,
) -> DemoLMResult:
    """Run the LM demo; the summary is also written to ``OUT/summary.json``.

    ``model``: another model directory trained by :mod:`memscan.demo.lm.train` (default: the shipped one)."""
    check_out_folder(out)  # a file in the way: refused before any work
    import pandas as pd

    t0 = time.perf_counter()
    out = Path(out)
    if (out / "summary.json").exists():
        raise MemscanError(f"{out} already holds an LM demo run", "remove it or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    settings = demo_lm_settings(quick)
    mdir = Path(model) if model is not None else model_dir()
    lm = _load(mdir, device)
    meta = json.loads((mdir / "memscan.json").read_text())
    cans = canaries(seed)
    t_load = time.perf_counter()

    # 1. extractable (memscan lm extractable's run function): sentence canaries + ordinary passages,
    #    prefix = the first PREFIX_BYTES tokens of each document, suffix the next SUFFIX_BYTES
    sent = [c for c in cans if c.kind == "sentence"]
    ordinary = ordinary_passages(settings["ordinary"], seed)
    docs = [{"id": c.id, "text": c.text, "kind": "canary", "copies": c.copies} for c in sent]
    docs += [{"id": f"ordinary-{i:04d}", "text": t, "kind": "ordinary", "copies": 1} for i, t in enumerate(ordinary)]
    with open(out / "sequences.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    config = ExtractableConfig(
        prefix_lengths=(PREFIX_BYTES,),
        suffix_length=SUFFIX_BYTES,
        sequences=len(docs),
        offsets="start",
        batch_size=settings["batch_size"],
        device=device,
    )
    res = lm_extractable(lm, out / "sequences.jsonl", out / "extractable", config, progress=progress)
    table = res.sequences.drop_duplicates("train_id").set_index("train_id")
    ext = pd.DataFrame(docs)
    ext["extractable"] = [bool(table.loc[d["id"], "extractable"]) for d in docs]
    for col in ("matched_leading_tokens", "match_fraction", "exact_memorization"):
        ext[col] = [table.loc[d["id"], col] for d in docs]
    ext.to_csv(out / "extractable.csv", index=False)
    t_ext = time.perf_counter()

    # 2. exposure: digit canaries, exact over all 10**DIGITS candidates of the format
    total = format_logprobs(lm)
    dig = [c for c in cans if c.kind == "digits"]
    exp_rows = []
    for c in dig:
        e, r = exposure_of(total, int(c.text[len(DIGIT_PREFIX) :]))
        exp_rows.append({"id": c.id, "copies": c.copies, "text": c.text, "rank": r, "exposure": e})
    expo = pd.DataFrame(exp_rows)
    expo.to_csv(out / "exposure.csv", index=False)
    t_expo = time.perf_counter()

    # 3. the sampling attack: index the planted text (bytes), sample blind, rank, confirm
    attack = sampling_attack(lm, out, settings, seed=seed, progress=progress)
    t_attack = time.perf_counter()

    summary = summarise(ext, expo, quick=quick)
    summary["sampling_attack"] = attack
    summary["model"] = {
        "dir": str(mdir),
        "parameters": meta["parameters"],
        "recipe": meta["recipe"],
        "training_seconds": meta["seconds"],
    }
    summary["timings_s"] = {
        "load": round(t_load - t0, 2),
        "extractable": round(t_ext - t_load, 2),
        "exposure": round(t_expo - t_ext, 2),
        "sampling_attack": round(t_attack - t_expo, 2),
        "total": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(out / "summary.json", summary)
    rows = []
    for k in summary["extracted_by_duplicate_count"]:
        e = summary["extracted_by_duplicate_count"][k]
        x = summary["exposure_by_duplicate_count"][k]
        m = summary["memorization_by_duplicate_count"][k]["mean_exact_memorization"]
        rows.append((k, f"{e['extracted']}/{e['planted']}", f"{m:.2f}", f"{x['mean']:.1f} (min {x['min']:.1f})"))
    return DemoLMResult(out, summary, rows)


#: A sample's corpus match counts as part of a canary (a partial emission) from this many bytes.
PARTIAL_BYTES = 20


def sampling_attack(lm, out: Path, settings: dict, *, seed: int = DEFAULT_SEED, progress: bool = True) -> dict:
    """The sampling attack on the demo model: index the planted corpus (bytes mode), draw
    ``attack_samples`` samples from a line break, rank, de-duplicate and confirm them
    (``OUT/extract``); which canaries came out, by planted copy count."""
    from memscan.demo.lm.canaries import planted_corpus
    from memscan.lm.corpus_index import CorpusIndex

    t0 = time.perf_counter()
    planted = planted_corpus(seed)
    t1 = time.perf_counter()
    CorpusIndex.build([planted.text.encode("ascii")], out / "corpus_index")
    t2 = time.perf_counter()
    config = LmExtractConfig(
        samples=settings["attack_samples"],
        length=settings["attack_length"],
        batch_size=settings["attack_batch_size"],
        temperature_start=settings["attack_temperature_start"],
        top=settings["attack_top"],
    )
    res = lm_extract(lm, out / "corpus_index", out / "extract", config, prompts=["\n"], progress=progress)
    t3 = time.perf_counter()
    min_match = res.manifest["min_match"]
    sentences = [c for c in planted.canaries if c.kind == "sentence"]
    found: dict[str, int] = {}
    other = 0
    for r in res.samples[res.samples["confirmed"]].to_dict("records"):
        hits = [c.id for c in sentences if c.text in r["match_text"] or r["match_text"].strip("\n") in c.text]
        for h in hits:
            found[h] = found.get(h, 0) + 1 + int(r["duplicates"])
        other += not hits
    # the chance that one sample *starts* with the whole canary line, under the attack's own
    # scheme (Hayes et al. 2025: p = Π q(byte | "\n", bytes before)), and the samples that would
    # draw it with probability 1/2 — what blind sampling is up against
    log_p = {}
    for c in sentences:
        ids = np.asarray(lm.encode("\n" + c.text), dtype=np.int64)[None, :]
        _, log_q = teacher_forced(
            lm, ids, 0, temperature=config.temperature_end, top_k=config.top_k, top_p=config.top_p
        )
        log_p[c.id] = float(suffix_log_probability(log_q)[0])
    # partial emissions: the longest corpus match of any sample that lies inside a canary line
    # (≥ PARTIAL_BYTES), confirmed or not
    longest: dict[str, int] = {}
    for r in res.samples[res.samples["match_len"] >= PARTIAL_BYTES].to_dict("records"):
        inner = r["match_text"].strip("\n")
        for c in sentences:
            if len(inner) >= PARTIAL_BYTES and inner in c.text:
                longest[c.id] = max(longest.get(c.id, 0), len(inner))
    by_count = {}
    for c in COPIES:
        ids = [s.id for s in sentences if s.copies == c]
        lp = np.array([log_p[i] for i in ids])
        by_count[str(c)] = {
            "planted": len(ids),
            "extracted": sum(i in found for i in ids),
            "samples": int(sum(found.get(i, 0) for i in ids)),
            "median_log10_p_line_start": _finite(round(float(np.median(lp)) / math.log(10), 2)),
            "median_samples_needed_50": _finite(float(np.median(samples_needed(lp, 0.5)))),
            "partial": sum(i in longest for i in ids),
            "longest_partial_bytes": max((longest.get(i, 0) for i in ids), default=0),
        }
    return {
        "samples": int(config.samples),
        "length": int(config.length),
        "prompt": "\n",
        "top_k": config.top_k,
        "temperature": [config.temperature_start, config.temperature_end, config.decay_tokens],
        "min_match": int(min_match),
        "kept": int(res.manifest["counts"]["kept"]),
        "duplicates_removed": int(res.manifest["counts"]["duplicates_removed"]),
        "confirmed": int(res.manifest["counts"]["confirmed"]),
        "confirmed_other": int(other),
        "canaries_by_duplicate_count": by_count,
        "canaries_extracted": sorted(found),
        "precision": {
            r["metric"]: {"N": int(r["N"]), "confirmed": int(r["confirmed"]), "precision": float(r["precision"])}
            for r in res.precision.to_dict("records")
        },
        "longest_match": int(res.samples["match_len"].max()) if len(res.samples) else 0,
        "timings_s": {
            "planted_corpus": round(t1 - t0, 2),
            "index_build": round(t2 - t1, 2),
            "attack": round(t3 - t2, 2),
            **{k: res.manifest["throughput"][k] for k in ("generate_seconds", "score_seconds", "confirm_seconds")},
        },
    }


def _finite(x: float) -> float | None:
    """``x``, or ``None`` for ±inf/NaN (summary.json stays strict JSON)."""
    return x if math.isfinite(x) else None


def summarise(ext, expo, *, quick: bool) -> dict:
    """The summary's figures from the per-sequence tables."""
    can = ext[ext["kind"] == "canary"]
    by_count, memo = {}, {}
    for c in COPIES:
        sel = can[can["copies"] == c]
        by_count[str(c)] = {"planted": int(len(sel)), "extracted": int(sel["extractable"].sum())}
        memo[str(c)] = {
            "mean_matched_leading_tokens": round(float(sel["matched_leading_tokens"].mean()), 3),
            "mean_match_fraction": round(float(sel["match_fraction"].mean()), 4),
            "mean_exact_memorization": round(float(sel["exact_memorization"].mean()), 4),
        }
    exposure = {}
    for c in COPIES:
        sel = expo[expo["copies"] == c]["exposure"]
        exposure[str(c)] = {
            "planted": int(len(sel)),
            "mean": round(float(sel.mean()), 3),
            "min": round(float(sel.min()), 3),
            "max": round(float(sel.max()), 3),
            "exposures": [round(float(v), 3) for v in sel],
        }
    ordn = ext[ext["kind"] == "ordinary"]
    return {
        "extracted_by_duplicate_count": by_count,
        "exposure_by_duplicate_count": exposure,
        "memorization_by_duplicate_count": memo,
        "exposure_max_bits": round(math.log2(10**DIGITS), 3),
        "ordinary": {
            "sampled": int(len(ordn)),
            "extracted": int(ordn["extractable"].sum()),
            "rate": float(ordn["extractable"].mean()) if len(ordn) else 0.0,
            "mean_exact_memorization": round(float(ordn["exact_memorization"].mean()), 4) if len(ordn) else 0.0,
            "mean_matched_leading_tokens": round(float(ordn["matched_leading_tokens"].mean()), 3) if len(ordn) else 0.0,
        },
        "prefix_length": PREFIX_BYTES,
        "suffix_length": SUFFIX_BYTES,
        "candidates_per_format": 10**DIGITS,
        "quick": quick,
    }
