"""Benchmark: the local runner vs the Ray runner on the synthetic extraction, on this machine.

Prints figures; asserts nothing. The workload is the synthetic extraction of the core pipeline
(``memscan.synthetic``: 32×32 RGB, five planted memorized prompts among fresh ones), run through
:func:`memscan.extract` with ``runner="local"`` and ``runner="ray"`` on the same inputs; the
tables of every run are checked equal to the local run's (a benchmark of a wrong answer is
worthless).

Method (also printed):

- Ray is started once (``ray.init``; its start-up time is reported apart), then each
  configuration runs ``--repeats`` times; the figure is the median wall time of ``extract``
  (``time.perf_counter``), which for Ray includes starting the workers (one model load each);
- worker start: time from creating the pool to every worker ready, measured on its own;
- per-shard overhead of the Ray runner: a pool of one worker runs the real extraction stage over
  the shards; overhead = (wall time of the map − the time the stage spent inside the worker) /
  shards. It covers scheduling, sending the shard's prompts, resolving the shared training set
  and returning the shard's tables; a no-op stage gives the bare round trip;
- memory per worker: peak resident set size (``VmHWM``) of each worker process after the run.

Usage::

    python bench/runners.py                    # 48 prompts × 100 samples, shards of 4
    python bench/runners.py --prompts 96 --samples 200 --repeats 3
    python bench/runners.py --markdown docs/benchmarks.md   # also write the docs section
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Local vs Ray runner"
#: The generator, importable in the workers (bench/ is put on their PYTHONPATH).
MODEL = "py:runners:planted"


def planted():
    """The synthetic generator with five memorized training images (as tests/gen_support.py)."""
    from memscan.synthetic import SyntheticGenerator

    return SyntheticGenerator({f"copy t{i:04d}": f"t{i:04d}" for i in (3, 17, 42, 64, 99)}, size=32, copy_rate=0.4)


def noop_stage(ctx, x):
    return x


def _rss_peak_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--markdown", type=Path, help="write/replace the docs section in this file")
    ap.add_argument(
        "--plan",
        type=float,
        nargs="*",
        metavar="SECONDS_PER_IMAGE",
        help="print only the GPU-hour plan of the paper's attack for these per-image costs [1.59 0.82]",
    )
    ap.add_argument("--from-json", type=Path, help="write --markdown from figures saved with --json (no run)")
    args = ap.parse_args(argv)
    if args.from_json and args.markdown:
        figures = json.loads(args.from_json.read_text())
        _write_markdown(args.markdown, figures, argparse.Namespace(**figures["args"]), figures["cores"])
        return figures
    if args.plan is not None:
        print(scaling_plan(tuple(args.plan) or (1.59, 0.82)))
        return {}

    import ray

    from memscan import ExtractConfig, extract
    from memscan.data.training import load_training_set
    from memscan.extraction.worker import extraction_stage, setup_extraction
    from memscan.runners import RayOptions, RayPool, ShardTask
    from memscan.store import RunStore
    from memscan.synthetic import write_training_set

    tmp = Path(tempfile.mkdtemp(prefix="memscan-bench-runners-"))
    write_training_set(tmp / "train", 120, size=32)
    names = [f"copy t{i:04d}" for i in (3, 17, 42, 64, 99)] + [f"fresh {i}" for i in range(args.prompts - 5)]
    prompts = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(names))], "prompt": names})
    prompts["train_id"], prompts["duplicate_count"] = None, pd.array([pd.NA] * len(names), dtype="Int64")
    cfg = ExtractConfig(samples_per_prompt=args.samples, shard_size=args.shard_size, batch_size=args.batch_size)
    n_shards = -(-len(prompts) // cfg.shard_size)
    cores = os.cpu_count()
    print(f"# workload: {len(prompts)} prompts × {cfg.samples_per_prompt} samples (32×32 RGB), {n_shards} shards")
    print(f"# machine: {platform.processor() or platform.machine()}, {cores} cores, Python {platform.python_version()}")
    print(f"# ray {ray.__version__}; medians of {args.repeats} runs; all tables checked equal to the local run's")

    def run(runner, workers=None, tag=""):
        out = tmp / f"run-{runner}-{workers}-{tag}-{time.monotonic_ns()}"
        t0 = time.perf_counter()
        if runner == "local":
            res = extract(planted(), prompts, tmp / "train", out, cfg, progress=False)
        else:
            res = extract(
                MODEL, prompts, tmp / "train", out, cfg, progress=False, runner="ray",
                runner_options=RayOptions(num_workers=workers),
            )  # fmt: skip
        return time.perf_counter() - t0, res

    figures: dict = {"workload": {"prompts": len(prompts), "samples": cfg.samples_per_prompt, "shards": n_shards}}
    figures["load_average_before"] = os.getloadavg()[0]
    figures["cores"] = cores
    figures["args"] = {k: getattr(args, k) for k in ("prompts", "samples", "shard_size", "repeats")}
    # 1. Ray start-up (once per process / cluster)
    sys.path.insert(0, str(ROOT / "bench"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "bench"), os.environ.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR")
    figures["ray_init_s"] = time.perf_counter() - t0
    print(f"ray.init (local Ray, {cores} CPUs): {figures['ray_init_s']:.2f} s (once per cluster, not per run)")

    # 2. end to end; repeats interleaved (local, local 1 thread, ray 1, ray 2, …) so that load
    #    from other jobs on the machine hits every configuration alike
    import torch

    threads = torch.get_num_threads()
    times: dict = {"local": [], "local_1thread": [], **{w: [] for w in args.workers}}
    ref = None
    run("local", tag="warm-up")  # first-call costs (imports, torch kernels) are nobody's
    for r in range(args.repeats):
        t, res = run("local", tag=r)
        times["local"].append(t)
        ref = ref or res
        torch.set_num_threads(1)  # what a Ray worker with 1 CPU gets (Ray sets OMP_NUM_THREADS=1)
        t, _ = run("local", tag=f"1t{r}")
        torch.set_num_threads(threads)
        times["local_1thread"].append(t)
        for w in args.workers:
            t, res = run("ray", w, r)
            for name in ("detections", "extractions"):
                pd.testing.assert_frame_equal(getattr(ref, name), getattr(res, name))
            times[w].append(t)
    local_s = statistics.median(times["local"])
    figures["local_s"] = local_s
    figures["local_1thread_s"] = statistics.median(times["local_1thread"])
    figures["torch_threads"] = threads
    print(f"local runner: {local_s:.2f} s end to end ({len(prompts) * cfg.samples_per_prompt / local_s:.0f} images/s)")
    print(f"local runner, 1 torch thread: {figures['local_1thread_s']:.2f} s")
    figures["ray"] = {}
    for w in args.workers:
        s = statistics.median(times[w])
        figures["ray"][w] = {"end_to_end_s": s, "ratio_to_local": s / local_s}
        print(f"ray runner, {w} worker(s): {s:.2f} s end to end, {s / local_s:.2f}× the local runner's time")
    figures["all_times_s"] = {str(k): v for k, v in times.items()}

    # 4. worker start, per-shard overhead and memory, with the stage run directly on a pool
    store = RunStore(tmp / "overhead")
    store.create()
    training = load_training_set(tmp / "train", size=(32, 32), channels=3)
    t0 = time.perf_counter()
    pool = RayPool(setup_extraction, (MODEL, cfg, str(store.root)), RayOptions(num_workers=1), log=None)
    with pool:
        pool.call(noop_stage, None)
        figures["worker_start_s"] = time.perf_counter() - t0
        shared = pool.share(training)
        tasks = [
            ShardTask(s, (prompts.iloc[s * cfg.shard_size : (s + 1) * cfg.shard_size], shared)) for s in range(n_shards)
        ]
        t0 = time.perf_counter()
        inside = 0.0
        for d in pool.map(extraction_stage, tasks):
            t = d.value[1]
            inside += t.generation_s + t.detection_s + t.verification_s
        wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_noop = 200
        list(pool.map(noop_stage, [ShardTask(i, (i,)) for i in range(n_noop)]))
        noop = (time.perf_counter() - t0) / n_noop
        pids = pool.worker_pids()
        mem = {name: _rss_peak_mb(pid) for name, pid in pids.items()}
    figures["per_shard_overhead_ms"] = 1000 * (wall - inside) / n_shards
    figures["per_shard_stage_ms"] = 1000 * inside / n_shards
    figures["noop_round_trip_ms"] = 1000 * noop
    figures["worker_peak_rss_mb"] = max(v for v in mem.values() if v is not None) if mem else None
    driver_rss = _rss_peak_mb(os.getpid())
    print(f"worker start (one model load): {figures['worker_start_s']:.2f} s")
    print(
        f"per-shard overhead of the Ray runner: {figures['per_shard_overhead_ms']:.1f} ms "
        f"(stage itself {figures['per_shard_stage_ms']:.0f} ms per shard; bare round trip "
        f"{figures['noop_round_trip_ms']:.2f} ms)"
    )
    print(f"peak RSS of a worker: {figures['worker_peak_rss_mb']:.0f} MB (driver: {driver_rss:.0f} MB)")
    ray.shutdown()
    figures["load_average_after"] = os.getloadavg()[0]
    print(
        f"1-minute load average: {figures['load_average_before']:.1f} before, {figures['load_average_after']:.1f} after"
    )

    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    if args.markdown:
        _write_markdown(args.markdown, figures, args, cores)
    return figures


def scaling_plan(
    seconds_per_image: tuple[float, ...] = (1.59, 0.82),
    prompts: int = 350_000,
    samples: int = 500,
    first_round: int = 50,
    continue_shares: tuple[float, ...] = (0.01, 0.05, 0.20),
    triage_unet_evals: int = 8,
    image_unet_evals: int = 100,
    top_shares: tuple[float, ...] = (0.10, 0.01),
) -> str:
    """GPU-hours of the paper's attack (Carlini et al. 2023: 350,000 prompts × 500 generations)
    with and without the adaptive budget and triage, as a markdown table. ESTIMATES: every input
    is a parameter (see docs/scale.md for where the defaults come from).

    - full budget: ``prompts × samples`` images;
    - adaptive budget (``memscan extract --adaptive``, first round 50): a prompt costs
      ``first_round`` images, plus ``samples − first_round`` more when it continues (share ``f``
      of the prompts; counted as running to the full budget, an upper bound);
    - triage (Wen et al. 2024, 4 generations × 1 step, each a conditional and an unconditional UNet
      call): ``triage_unet_evals`` UNet calls per prompt, against ``image_unet_evals`` (50 steps × 2)
      per generated image, then the attack on the top share of the ranked prompts.

    Examples
    --------
    >>> "| full budget | 175,000,000 |" in scaling_plan()
    True
    """
    rows = []

    def add(name, images):
        hours = " | ".join(f"{images * s / 3600:,.0f}" for s in seconds_per_image)
        rows.append(f"| {name} | {images:,.0f} | {100 * images / (prompts * samples):.2f} % | {hours} |")

    add("full budget", prompts * samples)
    for f in continue_shares:
        add(f"adaptive, {100 * f:g} % continue", prompts * (first_round + f * (samples - first_round)))
    triage = prompts * triage_unet_evals / image_unet_evals
    add("triage alone (all prompts)", triage)
    for top in top_shares:
        add(f"triage + full budget on top {100 * top:g} %", triage + top * prompts * samples)
        f = max(continue_shares)
        add(
            f"triage + adaptive on top {100 * top:g} % ({100 * f:g} % continue)",
            triage + top * prompts * (first_round + f * (samples - first_round)),
        )
    head = " | ".join(f"GPU-hours at {s:g} s/image" for s in seconds_per_image)
    return "\n".join(
        [f"| plan | images (or image-equivalents) | of full | {head} |", "|---" * (3 + len(seconds_per_image)) + "|"]
        + rows
    )


def _write_markdown(path: Path, f: dict, args, cores: int) -> None:
    w = f["workload"]
    ray_times = {int(k): v["end_to_end_s"] for k, v in f["ray"].items()}
    ray1 = ray_times.get(1, float("nan"))
    acc = f["local_1thread_s"] + f["worker_start_s"] + w["shards"] * f["per_shard_overhead_ms"] / 1000
    two = ""
    if 2 in ray_times and ray_times[2] > ray1:
        two = (
            f" Two workers were slower than one here: {cores} cores shared by the driver, two workers"
            " and other jobs add contention, not capacity."
        )
    rows = "\n".join(
        f"| Ray runner, {k} worker(s) | {v['end_to_end_s']:.2f} | {v['ratio_to_local']:.2f}× |"
        for k, v in f["ray"].items()
    )
    text = f"""{SECTION}

`python bench/runners.py --prompts {args.prompts} --samples {args.samples} --shard-size {args.shard_size} --repeats {args.repeats}`
on this machine ({cores} cores, no GPU, shared with other jobs: 1-minute load average
{f.get("load_average_before", float("nan")):.1f} before and {f.get("load_average_after", float("nan")):.1f} after the run): the synthetic extraction
({w["prompts"]} prompts × {w["samples"]} samples of 32×32, {w["shards"]} shards), tables of every
run checked equal to the local run's. Medians of {args.repeats} runs.

| runner | end to end (s) | vs local |
|---|---|---|
| local ({f["torch_threads"]} torch threads) | {f["local_s"]:.2f} | 1.00× |
| local, 1 torch thread | {f["local_1thread_s"]:.2f} | {f["local_1thread_s"] / f["local_s"]:.2f}× |
{rows}

- `ray.init` of a local Ray: {f["ray_init_s"]:.2f} s, once per cluster (not counted above).
- Worker start (process + imports + one model load): {f["worker_start_s"]:.2f} s, counted above.
- Per-shard overhead of the Ray runner: {f["per_shard_overhead_ms"]:.1f} ms per shard (scheduling,
  sending the prompts, resolving the shared training set, returning the tables), against
  {f["per_shard_stage_ms"]:.0f} ms of work per shard here; bare round trip of a no-op stage
  {f["noop_round_trip_ms"]:.2f} ms.
- Peak RSS of a worker: {f["worker_peak_rss_mb"]:.0f} MB (Python, torch, pandas, the generator).
- Accounting: the Ray runner with 1 worker ({ray1:.2f} s) ≈ the local runner with 1 torch thread
  ({f["local_1thread_s"]:.2f} s; a 1-CPU Ray worker gets 1 thread, Ray sets `OMP_NUM_THREADS`) + worker
  start ({f["worker_start_s"]:.2f} s) + {w["shards"]} shards × {f["per_shard_overhead_ms"]:.1f} ms = {acc:.2f} s.{two}

What these figures mean at GPU scale, and the cluster plan: [scale.md](scale.md).
"""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION in old:
        start = old.index(SECTION)
        nxt = old.find("\n## ", start + len(SECTION))
        old = old[:start] + text.rstrip() + "\n" + (old[nxt:] if nxt != -1 else "")
    else:
        old = old.rstrip() + "\n\n" + text
    path.write_text(old)
    print(f"wrote the section {SECTION!r} of {path}")


if __name__ == "__main__":
    main()
