"""``memscan demo lm``: discoverable memorization and canary exposure rising with repetition.

The shipped model (``memscan/demo/lm/model``: a byte-level GPT-2, safetensors, trained by
:mod:`memscan.demo.lm.train` on the Shakespeare plays with planted canaries) is loaded through the
real causal-LM adapter (:func:`memscan.generators.causal_lm.load_causal_lm`), then

1. **extractable** (Carlini et al. 2022): every sentence canary and a seeded random sample of
   ordinary passages of the plays, prompted with their first ``PREFIX_BYTES`` bytes (= tokens: the
   model is byte-level); extracted when the greedy continuation equals the next ``SUFFIX_BYTES``
   exactly;
2. **exposure** (Carlini et al. 2019): every digit canary ``the secret number is DDDDD``, ranked
   by log-perplexity among all 10**5 candidates of its format (exact enumeration):
   ``exposure = log2 |R| − log2 rank``;
3. the figures by planted copy count go to ``OUT/summary.json`` (``extracted_by_duplicate_count``
   in the image demo's structure, ``exposure_by_duplicate_count``, ``ordinary``).
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


def model_dir() -> Path:
    """The shipped LM demo model (transformers layout, safetensors weights, ByT5 tokenizer)."""
    return Path(str(resources.files("memscan.demo.lm") / "model"))


def demo_lm_settings(quick: bool) -> dict:
    return {"ordinary": 40 if quick else 200, "batch_size": 64}


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
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def text(self) -> str:
        """The table the command prints."""
        s = self.summary
        lines = [
            f"memscan demo lm: {s['model']['parameters']:,}-parameter byte-level GPT-2, "
            f"prefix {s['prefix_length']} + suffix {s['suffix_length']} bytes, "
            f"{s['timings_s']['total']:.0f} s",
            f"  {'copies':>7}  {'extracted':>9}  {'exposure (bits, of ' + str(s['exposure_max_bits']) + ')':>26}",
        ]
        lines += [f"  {c:>7}  {e:>9}  {x:>26}" for c, e, x in self.rows]
        o = s["ordinary"]
        lines.append(f"  ordinary passages of the plays: {o['extracted']}/{o['sampled']} extracted ({o['rate']:.1%})")
        lines.append(f"  summary: {self.out / 'summary.json'}")
        return "\n".join(lines)


def _load(mdir: Path, device: str):
    from memscan.generators.causal_lm import load_causal_lm

    if not (mdir / "model.safetensors").exists():
        raise MemscanError(
            f"the LM demo model is missing from {mdir}", "reinstall memscan, or train it: memscan demo lm train"
        )
    return load_causal_lm(str(mdir), device=device)


def greedy_extractable(lm, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Per text: does the greedy continuation of its first ``PREFIX_BYTES`` tokens reproduce the
    next ``SUFFIX_BYTES`` tokens exactly (k-extractable, Carlini et al. 2022, §2)."""
    ids = [lm.encode(t) for t in texts]
    if any(len(x) < PREFIX_BYTES + SUFFIX_BYTES for x in ids):
        raise MemscanError("a demo sequence is shorter than prefix + suffix", "report this as a memscan bug")
    arr = np.stack([x[: PREFIX_BYTES + SUFFIX_BYTES] for x in ids])
    out = np.zeros(len(arr), dtype=bool)
    for i in range(0, len(arr), batch_size):
        chunk = arr[i : i + batch_size]
        toks, _ = lm.greedy(chunk[:, :PREFIX_BYTES], SUFFIX_BYTES)
        out[i : i + batch_size] = (toks == chunk[:, PREFIX_BYTES:]).all(axis=1)
    return out


def digit_logprobs(lm, batch_size: int = 1000) -> np.ndarray:
    """log p(d | ``DIGIT_PREFIX``) for every ``DIGITS``-digit string d (index = int(d)), exact.

    One forward pass per candidate *stem* (the first DIGITS−1 digits, 10**(DIGITS−1) of them): the
    next-token distributions at the last DIGITS positions give every digit's log-probability, so
    the 10 candidates that share a stem cost one pass."""
    prefix = lm.encode(DIGIT_PREFIX)
    digit_ids = np.array([lm.encode(str(d))[0] for d in range(10)])
    n_stems = 10 ** (DIGITS - 1)
    stems = np.array([[int(c) for c in f"{s:0{DIGITS - 1}d}"] for s in range(n_stems)], dtype=np.int64)
    L = len(prefix)
    total = np.zeros(10**DIGITS)
    for i in range(0, n_stems, batch_size):
        st = stems[i : i + batch_size]
        b = len(st)
        ids = np.concatenate([np.tile(prefix, (b, 1)), digit_ids[st], np.zeros((b, 1), dtype=np.int64)], axis=1)
        # rows j = 0..DIGITS-1: log p(· | prefix, d_1..d_j)
        nt = lm.next_token_logprobs(ids, start=L - 1)[:, :DIGITS, :][:, :, digit_ids]  # b × DIGITS × 10
        stem_lp = np.take_along_axis(nt[:, : DIGITS - 1, :], st[:, :, None], axis=2)[..., 0].sum(axis=1)
        last = nt[:, DIGITS - 1, :]  # b × 10
        total[(i + np.arange(b))[:, None] * 10 + np.arange(10)[None, :]] = stem_lp[:, None] + last
    return total


def exposure_of(total: np.ndarray, value: int) -> tuple[float, int]:
    """Exposure (Carlini et al. 2019, Def. 4): log2 |R| − log2 rank, rank = 1 + #candidates more likely."""
    rank = 1 + int((total > total[value]).sum())
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

    # 1. extractable: sentence canaries + ordinary passages
    sent = [c for c in cans if c.kind == "sentence"]
    ordinary = ordinary_passages(settings["ordinary"], seed)
    texts = [c.text for c in sent] + ordinary
    flags = greedy_extractable(lm, texts, settings["batch_size"])
    ext = pd.DataFrame(
        {
            "id": [c.id for c in sent] + [f"ordinary-{i:04d}" for i in range(len(ordinary))],
            "kind": ["canary"] * len(sent) + ["ordinary"] * len(ordinary),
            "copies": [c.copies for c in sent] + [1] * len(ordinary),
            "text": texts,
            "extractable": flags,
        }
    )
    ext.to_csv(out / "extractable.csv", index=False)
    t_ext = time.perf_counter()

    # 2. exposure: digit canaries, exact over all 10**DIGITS candidates of the format
    total = digit_logprobs(lm)
    dig = [c for c in cans if c.kind == "digits"]
    exp_rows = []
    for c in dig:
        e, r = exposure_of(total, int(c.text[len(DIGIT_PREFIX) :]))
        exp_rows.append({"id": c.id, "copies": c.copies, "text": c.text, "rank": r, "exposure": e})
    expo = pd.DataFrame(exp_rows)
    expo.to_csv(out / "exposure.csv", index=False)
    t_expo = time.perf_counter()

    summary = summarise(ext, expo, quick=quick)
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
        "total": round(time.perf_counter() - t0, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    rows = []
    for k in summary["extracted_by_duplicate_count"]:
        e = summary["extracted_by_duplicate_count"][k]
        x = summary["exposure_by_duplicate_count"][k]
        rows.append((k, f"{e['extracted']}/{e['planted']}", f"{x['mean']:.1f} (min {x['min']:.1f})"))
    return DemoLMResult(out, summary, rows)


def summarise(ext, expo, *, quick: bool) -> dict:
    """The summary's figures from the per-sequence tables."""
    can = ext[ext["kind"] == "canary"]
    by_count = {}
    for c in COPIES:
        sel = can[can["copies"] == c]
        by_count[str(c)] = {"planted": int(len(sel)), "extracted": int(sel["extractable"].sum())}
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
        "exposure_max_bits": round(math.log2(10**DIGITS), 3),
        "ordinary": {
            "sampled": int(len(ordn)),
            "extracted": int(ordn["extractable"].sum()),
            "rate": float(ordn["extractable"].mean()) if len(ordn) else 0.0,
        },
        "prefix_length": PREFIX_BYTES,
        "suffix_length": SUFFIX_BYTES,
        "candidates_per_format": 10**DIGITS,
        "quick": quick,
    }
