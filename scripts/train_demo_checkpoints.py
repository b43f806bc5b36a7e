"""Train the checkpoints shipped in memscan/demo/checkpoints (what `memscan demo compare` sweeps).

A narrower version of the demo model (block widths 16/32/32, about a quarter of the shipped model's
parameters, ~1.1 MB of float32 weights) trained with the demo recipe, saved as ``checkpoint-N/``
folders the way diffusers' and transformers' trainers save them.

python scripts/train_demo_checkpoints.py [--out memscan/demo/checkpoints] [--steps 500,1000,2000,3000] [--threads 1]

The shipped ones: steps 500, 1000, 2000 and 3000 of one run, one thread (603 s on the shared 2-core
machine; docs/demo.md). The learning rate is constant after warm-up, so a checkpoint does not depend
on the run's total length.
"""

import argparse
import json
import os
import time

import torch

from memscan.demo.data import build_demo_data
from memscan.demo.train import TrainConfig, train_demo_model

p = argparse.ArgumentParser()
p.add_argument("--out", default="memscan/demo/checkpoints")
p.add_argument("--steps", default="500,1000,2000,3000")
p.add_argument("--widths", default="16,32,32")
p.add_argument("--device", default="cpu")
p.add_argument("--threads", type=int, default=1)
a = p.parse_args()
torch.set_num_threads(a.threads)
steps = tuple(int(s) for s in a.steps.split(","))
cfg = TrainConfig(steps=max(steps), block_out_channels=tuple(int(w) for w in a.widths.split(",")))
t0 = time.time()
load0 = os.getloadavg()
rec = train_demo_model(
    build_demo_data(),
    a.out,
    cfg,
    device=a.device,
    log_every=250,
    checkpoint_steps=steps,
    progress=lambda s, n: print(f"step {s}/{n} {time.time() - t0:.0f}s", flush=True) if s % 50 == 0 else None,
)
print(
    json.dumps(
        {
            "seconds": rec["training"]["seconds"],
            "parameters": rec["training"]["parameters"],
            "load_before": load0,
            "load_after": os.getloadavg(),
        }
    )
)
