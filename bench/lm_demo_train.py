"""Benchmark: wall time of the LM demo's training recipe on this CPU, one and two torch threads.

Runs the recipe (:class:`memscan.demo.lm.train.LMTrainConfig`, everything at its defaults) for its
first ``N`` steps (``stop_at``), once with one torch thread and once with two, writing the weights
to a temporary folder, and extrapolates the measured seconds per step (setup included, so an
over-estimate) to the recipe's 7,200 steps: the step cost is constant over training (fixed batch
and window). Prints and writes the figures with the load average at the start and end of each.

Usage::

    python bench/lm_demo_train.py 300 --json bench/results/lm_demo_train_cpu_300steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's memscan

from memscan.demo.lm.train import LMTrainConfig, train_lm_demo_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("steps", type=int, nargs="?", default=300, help="steps timed (of the recipe's 7,200)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    total = LMTrainConfig().steps
    res = {}
    for threads in (1, 2):
        load = os.getloadavg()
        t0, c0 = time.time(), time.process_time()
        with tempfile.TemporaryDirectory() as tmp:
            train_lm_demo_model(tmp, LMTrainConfig(stop_at=args.steps, threads=threads), log_every=10**9)
        wall = time.time() - t0
        res[threads] = {
            "steps": args.steps,
            "wall_s": round(wall, 1),
            "cpu_s": round(time.process_time() - c0, 1),
            "s_per_step": round(wall / args.steps, 4),
            f"est_{total}_min": round(wall / args.steps * total / 60, 1),
            "loadavg_start": [round(x, 2) for x in load],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        }
        print(f"{threads} thread(s): {args.steps} steps in {wall:.1f} s → {total} steps ≈ "
              f"{res[threads][f'est_{total}_min']} min (load {load[0]:.2f})", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
