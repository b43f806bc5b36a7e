"""``memscan demo lm compare``: memorization of the LM demo's canaries against training steps.

The package ships earlier checkpoints of the LM demo model, ``memscan/demo/lm/checkpoints/
checkpoint-N/`` (bfloat16 safetensors; one run of the shipped model's recipe stopped early,
:mod:`memscan.demo.lm.train_checkpoints`); the shipped model (``memscan/demo/lm/model``, 7,200
steps) is the last point. The demo

1. writes the demo's sequences (the 28 sentence canaries, then ``ordinary`` random passages of the
   plays, as ``memscan demo lm``), 28 held-out sentences of the canaries' kind that were never
   planted (the canary generator with other seeds), and a bytes-mode corpus index of the planted
   training text (so each sequence's duplicate count is measured, ``window_count``);
2. sweeps the checkpoints (:func:`memscan.lm.sweep.lm_checkpoint_sweep`, ``OUT/sweep``): the same
   ``memscan lm extractable`` run (prefix 32 + suffix 50 bytes, greedy) on each, with each
   checkpoint's held-out loss (mean token NLL on the held-out sentences) and training loss (on the
   first 28 training sequences: the planted canaries), then ``memscan compare`` by step —
   extraction rate by duplicate count, the log-linear fit over the steps, which canaries each
   checkpoint memorized and their overlap (``OUT/sweep/compare.html``);
3. computes the exposure of the 28 digit canaries on each checkpoint, exact over all 10^5
   candidates of their format (the demo's one enumeration, :func:`memscan.demo.lm.run.format_logprobs`);
4. writes ``OUT/summary.json`` (one entry per checkpoint) and ``OUT/exposure.csv``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd

from memscan.demo.lm.canaries import (
    COPIES,
    DEFAULT_SEED,
    DIGIT_PREFIX,
    DIGITS,
    PREFIX_BYTES,
    SUFFIX_BYTES,
    canaries,
)
from memscan.errors import MemscanError
from memscan.generators.checkpoints import list_checkpoints
from memscan.store import atomic_write_json, check_out_folder

#: Seeds of the canary generator whose sentences are the held-out set (never planted).
HELDOUT_SEEDS = (1001,)


def lm_checkpoints_dir() -> Path:
    """The shipped LM demo checkpoints (``checkpoint-N/``, bfloat16 safetensors)."""
    return Path(str(resources.files("memscan.demo.lm") / "checkpoints"))


def heldout_sentences(n: int, seed: int = DEFAULT_SEED) -> list[str]:
    """``n`` sentences made like the sentence canaries but never planted (other generator seeds)."""
    planted = {c.text for c in canaries(seed)}
    out: list[str] = []
    s = 0
    while len(out) < n:
        base = HELDOUT_SEEDS[0] + s
        out += [c.text for c in canaries(base) if c.kind == "sentence" and c.text not in planted]
        s += 1
    return out[:n]


def format_logprobs_cached(lm, prefix: str = DIGIT_PREFIX, digits: int = DIGITS, batch_size: int = 1000):
    """:func:`memscan.demo.lm.run.format_logprobs` (log p(d | prefix) of every ``digits``-digit
    string d, exact) with the prefix's KV cache: the prefix goes through the model once per batch
    of stems and each stem's pass covers only its own ``digits − 1`` tokens (5× fewer tokens for
    the demo's format). Equal to ``format_logprobs`` up to float rounding (tested); falls back to
    it for a model without a repeatable cache."""
    import numpy as np

    from memscan.demo.lm.run import format_logprobs

    model = getattr(lm, "model", None)
    if model is None:
        return format_logprobs(lm, prefix, digits, batch_size)
    import torch

    from memscan.lm.exposure import start_token

    ids = np.concatenate([[start_token(lm)], np.asarray(lm.encode(prefix), dtype=np.int64)]).astype(np.int64)
    pre = torch.as_tensor(ids)[None, :]  # scored after the start token, as format_logprobs
    digit_ids = np.array([int(lm.encode(str(d))[0]) for d in range(10)], dtype=np.int64)
    if any(len(lm.encode(str(d))) != 1 for d in range(10)):
        raise MemscanError("the model's tokenizer does not give one token per digit", "use a byte-level model")
    dev = next(model.parameters()).device
    pre, dig = pre.to(dev), torch.as_tensor(digit_ids, device=dev)
    n_stems = 10 ** (digits - 1)
    total = np.zeros(10**digits)
    with torch.inference_mode():
        for i in range(0, n_stems, batch_size):
            stem = np.arange(i, min(n_stems, i + batch_size))
            st = (stem[:, None] // 10 ** np.arange(digits - 2, -1, -1)[None, :]) % 10  # b × (digits−1)
            b = len(stem)
            # 1. the prefix once; its cache repeated for the b stems
            head = model(input_ids=pre, use_cache=True)
            arg = getattr(lm, "_cache_arg", "past_key_values")
            cache = getattr(head, arg, None)
            if cache is None:
                cache = getattr(head, "past_key_values", None)
            if not hasattr(cache, "batch_repeat_interleave"):
                return format_logprobs(lm, prefix, digits, batch_size)
            cache.batch_repeat_interleave(b)
            first = torch.log_softmax(head.logits[0, -1].double(), dim=-1)[dig].cpu().numpy()  # log p(d_1 | prefix)
            # 2. the stems' digits: row j of the output is log p(· | prefix, d_1..d_{j+1})
            tail = dig[torch.as_tensor(st, device=dev)]
            rest = model(input_ids=tail, use_cache=True, **{arg: cache})
            lp = torch.log_softmax(rest.logits.double(), dim=-1)[:, :, dig].cpu().numpy()  # b × (digits−1) × 10
            stem_lp = first[st[:, 0]].copy()
            for j in range(1, digits - 1):
                stem_lp += lp[np.arange(b), j - 1, st[:, j]]
            total[stem[:, None] * 10 + np.arange(10)[None, :]] = stem_lp[:, None] + lp[:, digits - 2, :]
    return total


@dataclass
class DemoLMCompareResult:
    """A finished ``memscan demo lm compare``: ``out``, the comparison ``table`` (one row per
    checkpoint), its ``report`` page and the ``summary`` (also ``OUT/summary.json``)."""

    out: Path
    table: pd.DataFrame
    report: Path
    summary: dict

    def text(self) -> str:
        s = self.summary
        lines = [
            f"memscan demo lm compare: {len(s['checkpoints'])} checkpoints, {s['sequences']} sequences "
            f"(prefix {s['prefix_length']} + suffix {s['suffix_length']} bytes), {s['seconds']:.0f} s",
            "  sentence canaries extracted, by planted copies; mean exposure of the digit canaries (bits, of "
            f"{s['exposure_max_bits']}); losses in nats a byte",
            f"  {'step':>6}  " + "  ".join(f"{c + '×':>5}" for c in s["copies"]) + "  ordinary  held-out  train",
        ]
        for c in s["checkpoints"]:
            ex = "  ".join(f"{v['extracted']}/{v['planted']:<3}".rjust(5) for v in c["extracted_by_copies"].values())
            o = c["ordinary"]
            lines.append(
                f"  {c['step']:>6}  {ex}  {o['extracted']:>3}/{o['sampled']:<4}  {c['heldout_loss']:>8.3f}  "
                f"{c['train_loss']:>5.3f}"
            )
            xs = "  ".join(f"{v['mean']:>5.1f}" for v in c["exposure_by_copies"].values())
            lines.append(f"  {'':>6}  {xs}  (exposure)")
        for f in s["fits"]:
            lines.append(
                f"  fit: {f['measure']} = {f['intercept']:.3f} + {f['slope']:.3f}·log10(step), "
                f"slope 95% CI [{f['slope_lo']:.3f}, {f['slope_hi']:.3f}] (n = {f['n']})"
            )
        lines.append(f"  report: {self.report}; summary: {self.out / 'summary.json'}")
        return "\n".join(lines)


def _models(out: Path) -> Path:
    """``OUT/models/checkpoint-N``: the shipped checkpoints and the shipped model (its step)."""
    from memscan.demo.lm.run import model_dir
    from memscan.generators.model_record import training_step

    ckdir = lm_checkpoints_dir()
    ckpts = list_checkpoints(ckdir)
    if not ckpts or not (model_dir() / "model.safetensors").exists():
        raise MemscanError(
            f"the LM demo checkpoints or model are missing from {ckdir.parent}",
            "reinstall memscan, or train them: python -m memscan.demo.lm.train_checkpoints",
        )
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    final = training_step(model_dir())
    for name, target in [*((c.name, c.path) for c in ckpts), (f"checkpoint-{final}", model_dir())]:
        link = models / name
        if not link.exists():
            link.symlink_to(Path(target).resolve(), target_is_directory=True)
    return models


def run_demo_lm_compare(
    out: str | Path = "runs/demo-lm-compare",
    *,
    quick: bool = False,
    progress: bool = True,
    device: str = "cpu",
    seed: int = DEFAULT_SEED,
) -> DemoLMCompareResult:
    """Run the demo (see the module); ``quick``: 40 ordinary passages instead of 200 (CI)."""
    check_out_folder(out)  # a file in the way: refused before any work
    from memscan.demo.lm.canaries import ordinary_passages, planted_corpus
    from memscan.demo.lm.run import exposure_of
    from memscan.generators.causal_lm import load_causal_lm
    from memscan.lm.corpus_index import CorpusIndex
    from memscan.lm.extractable_run import ExtractableConfig, lm_extractable
    from memscan.lm.sweep import first_documents, lm_checkpoint_sweep

    t0 = time.perf_counter()
    out = Path(out)
    if (out / "summary.json").exists() or (out / "sweep" / "manifest.json").exists():
        raise MemscanError(f"{out} already holds an LM demo comparison", "remove it or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    models = _models(out)
    # 1. sequences (canaries first), held-out sentences, the corpus index
    cans = canaries(seed)
    sent = [c for c in cans if c.kind == "sentence"]
    ordinary = ordinary_passages(40 if quick else 200, seed)
    docs = [{"id": c.id, "text": c.text, "kind": "canary", "copies": c.copies} for c in sent]
    docs += [{"id": f"ordinary-{i:04d}", "text": t, "kind": "ordinary", "copies": 1} for i, t in enumerate(ordinary)]
    seqs = out / "sequences.jsonl"
    seqs.write_text("".join(json.dumps(d) + "\n" for d in docs))
    held = out / "heldout.jsonl"
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in heldout_sentences(len(sent), seed)))
    index = CorpusIndex.build([planted_corpus(seed).text.encode("ascii")], out / "corpus_index")
    config = ExtractableConfig(
        prefix_lengths=(PREFIX_BYTES,),
        suffix_length=SUFFIX_BYTES,
        sequences=len(docs),
        offsets="start",
        batch_size=64,
        device=device,
    )

    # 2. the sweep: the same extractable run on every checkpoint, losses, the comparison by step
    def run_one(path: str, sub: Path, resume: bool, model_id: str):
        return lm_extractable(path, seqs, sub, config, progress=progress, resume=resume, index=index)

    res = lm_checkpoint_sweep(
        models, run_one, out / "sweep", heldout=held, train_rows=first_documents(seqs), device=device, progress=progress
    )
    # 3. exposure of the digit canaries on every checkpoint
    dig = [c for c in cans if c.kind == "digits"]
    exp_rows = []
    for c in list_checkpoints(models):
        lm = load_causal_lm(str(c.path), device=device)
        total = format_logprobs_cached(lm)
        for d in dig:
            e, r = exposure_of(total, int(d.text[len(DIGIT_PREFIX) :]))
            exp_rows.append({"step": c.step, "id": d.id, "copies": d.copies, "rank": r, "exposure": e})
    expo = pd.DataFrame(exp_rows)
    expo.to_csv(out / "exposure.csv", index=False)
    # 4. the summary, per checkpoint, from the runs' own tables
    summary = summarise(res.table, expo, docs, quick=quick)
    summary["fits"] = res.fits.to_dict(orient="records")
    summary["report"] = str(res.report)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "summary.json", summary, default=_plain)
    return DemoLMCompareResult(out, res.table, res.report, summary)


def summarise(table: pd.DataFrame, expo: pd.DataFrame, docs: list[dict], *, quick: bool) -> dict:
    """Per checkpoint (by step): canaries extracted and M(f) by copies, ordinary passages
    extracted, mean / min exposure by copies, the losses — from each run's ``sequences.parquet``."""
    import math

    kind = {d["id"]: (d["kind"], d["copies"]) for d in docs}
    rows = []
    for _, r in table.sort_values("step").iterrows():
        seq = pd.read_parquet(Path(r["run"]) / "sequences.parquet").drop_duplicates("train_id")
        seq["kind"] = [kind[i][0] for i in seq["train_id"]]
        seq["copies"] = [kind[i][1] for i in seq["train_id"]]
        can, ordn = seq[seq["kind"] == "canary"], seq[seq["kind"] == "ordinary"]
        e = expo[expo["step"] == int(r["step"])]
        rows.append(
            {
                "step": int(r["step"]),
                "run": str(r["run"]),
                "params": None if pd.isna(r["params"]) else int(r["params"]),
                "extracted_by_copies": {
                    str(c): {
                        "planted": int((can["copies"] == c).sum()),
                        "extracted": int(can.loc[can["copies"] == c, "extractable"].sum()),
                    }
                    for c in COPIES
                },
                "exact_memorization_by_copies": {
                    str(c): round(float(can.loc[can["copies"] == c, "exact_memorization"].mean()), 4) for c in COPIES
                },
                "exposure_by_copies": {
                    str(c): {
                        "mean": round(float(e.loc[e["copies"] == c, "exposure"].mean()), 3),
                        "min": round(float(e.loc[e["copies"] == c, "exposure"].min()), 3),
                    }
                    for c in COPIES
                },
                "ordinary": {"sampled": int(len(ordn)), "extracted": int(ordn["extractable"].sum())},
                "canaries_extracted": int(can["extractable"].sum()),
                "heldout_loss": float(r["heldout_loss"]),
                "train_loss": float(r["train_loss"]),
                "loss_gap": float(r["loss_gap"]),
            }
        )
    return {
        "checkpoints": rows,
        "copies": [str(c) for c in COPIES],
        "sequences": len(docs),
        "prefix_length": PREFIX_BYTES,
        "suffix_length": SUFFIX_BYTES,
        "exposure_max_bits": round(math.log2(10**DIGITS), 3),
        "quick": quick,
    }


def _plain(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    return str(x)
