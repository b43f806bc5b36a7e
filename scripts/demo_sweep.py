"""Recipe sweep for the demo model (run once on a GPU to choose the CPU recipe).

Trains one recipe, then generates S samples for every planted caption and for a sample of unique
captions at several guidance scales, and saves the generations (uint8) for offline analysis:

    python scripts/demo_sweep.py NAME --steps 6000 --lr 2e-3 --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from memscan.demo.data import build_demo_data
from memscan.demo.train import TrainConfig, train_demo_model
from memscan.generators.diffusers_unet import load_unet_generator
from memscan.generators.seeds import derive_seeds

p = argparse.ArgumentParser()
p.add_argument("name")
p.add_argument("--steps", type=int, default=6000)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--channels", default="32,64,64")
p.add_argument("--p-uncond", type=float, default=0.1)
p.add_argument("--samples", type=int, default=100)
p.add_argument("--guidance", default="1,3")
p.add_argument("--out", default="sweep")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
a = p.parse_args()

data = build_demo_data()
cfg = TrainConfig(
    steps=a.steps,
    lr=a.lr,
    batch_size=a.batch,
    p_uncond=a.p_uncond,
    block_out_channels=tuple(int(c) for c in a.channels.split(",")),
)
model_dir = Path(a.out) / f"model_{a.name}"
t0 = time.time()
rec = train_demo_model(data, model_dir, cfg, device=a.device, log_every=1000)
print(a.name, "trained", round(time.time() - t0, 1), "s", rec["training"]["log"][-1:], flush=True)

rng = np.random.default_rng(1)
uniques = sorted(b for b, c in data.copies.items() if c == 1 and b not in data.planted)
bases = list(data.planted) + list(rng.choice(uniques, 32, replace=False))
gens = {}
for g in [float(x) for x in a.guidance.split(",")]:
    gen = load_unet_generator(str(model_dir), device=a.device, batch_size=a.samples, guidance_scale=g)
    t1 = time.time()
    gens[f"g{g:g}"] = np.stack([gen.generate(data.captions[b], derive_seeds(0, b, 0, a.samples)) for b in bases])
    print(a.name, "guidance", g, "sampled", round(time.time() - t1, 1), "s", flush=True)
np.savez_compressed(Path(a.out) / f"gens_{a.name}.npz", bases=np.array(bases), **gens)
(Path(a.out) / f"log_{a.name}.json").write_text(json.dumps(rec["training"]))
