"""Train the demo model shipped in memscan/demo/model (same as `memscan demo train`).

python scripts/train_demo_model.py [--out memscan/demo/model] [--steps 3000]
"""

import argparse
import time

from memscan.demo.data import build_demo_data
from memscan.demo.train import TrainConfig, train_demo_model

p = argparse.ArgumentParser()
p.add_argument("--out", default="memscan/demo/model")
p.add_argument("--steps", type=int, default=TrainConfig.steps)
p.add_argument("--device", default="cpu")
a = p.parse_args()
t0 = time.time()
rec = train_demo_model(
    build_demo_data(),
    a.out,
    TrainConfig(steps=a.steps),
    device=a.device,
    log_every=250,
    progress=lambda s, n: print(f"step {s}/{n} {time.time() - t0:.0f}s", flush=True) if s % 250 == 0 else None,
)
print("done", rec["training"]["seconds"], "s", rec["training"]["log"][-1])
