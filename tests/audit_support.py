"""Small inputs for the audit's tests: a 21-image slice of the demo data and the shipped demo model
(a caption-conditional UNet2DModel with a null class), sampled with few steps."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image

from memscan.demo.data import build_demo_data
from memscan.demo.run import model_dir

#: The demo model, sampled with 5 DDIM steps (10 UNet evaluations would be guided; it is not).
MODEL = str(model_dir())
#: audit/extract options shared by the tests (per prompt: at most 12 generations × 5 steps).
SAMPLING = ["--steps", 5, "--samples-per-prompt", 12, "--min-clique", 3, "--batch-size", 12]
ADAPTIVE = ["--first-round", 4, "--round-size", 4]


def small_demo(root: Path) -> tuple[Path, Path]:
    """``(train folder, prompts.csv)``: 3 images planted 200× in the demo (4 copies here) and 9
    unique ones, each with its caption; the prompts are all 12 captions (duplicated first)."""
    train, prompts = root / "train", root / "prompts.csv"
    if prompts.exists():
        return train, prompts
    data = build_demo_data()
    heavy = sorted(b for b in data.planted if data.copies[b] == 200)[:3]
    once = sorted(b for b in data.copies if data.copies[b] == 1)[:9]
    base = data.base_images()
    train.mkdir(parents=True)
    rows = []
    for b in heavy + once:
        copies = 4 if b in heavy else 1
        for c in range(copies):
            Image.fromarray(base[b][:, :, 0], mode="L").save(train / f"{b}_c{c:03d}.png")
            (train / f"{b}_c{c:03d}.txt").write_text(data.captions[b] + "\n")
        rows.append({"prompt_id": b, "prompt": data.captions[b], "train_id": f"{b}_c000", "duplicate_count": copies})
    pd.DataFrame(rows).to_csv(prompts, index=False)
    return train, prompts


def audit_args(root: Path, out: Path, *extra) -> list:
    train, prompts = small_demo(root)
    return ["audit", "--model", MODEL, "--train", train, "--prompts", prompts, "--out", out,
            *SAMPLING, *ADAPTIVE, "--round-prompts", 4, "--quiet", "--no-report", *extra]  # fmt: skip
