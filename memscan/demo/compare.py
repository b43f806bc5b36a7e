"""``memscan demo compare``: memorization over training, on the shipped demo checkpoints.

The package ships ``memscan/demo/checkpoints/checkpoint-N/`` — a narrower demo model (block
widths 16/32/32) saved during one training run with the demo recipe
(``scripts/train_demo_checkpoints.py``). The demo:

1. rebuilds the demo training set (digits with planted duplicates) and a held-out set (digits
   that are not in it);
2. attacks the captions of the duplicated images and a sample of unique ones (the prompts of
   ``memscan demo``) with the same extraction attack and the same seeds on every checkpoint,
   recording each checkpoint's held-out and training loss (a checkpoint sweep,
   :func:`memscan.extraction.sweep.extract_sweep`);
3. compares them by training step (``OUT/sweep/compare.html``): extraction rate by duplicate
   count per checkpoint, which images each checkpoint memorized and their overlap;
4. runs the same attack on the shipped demo model (``memscan/demo/model``: the same recipe and
   data, wider — 32/64/64 — and trained for 3,000 steps) and compares all three
   (``OUT/compare/compare.html``) by training step, with the log-linear fit. That last point
   differs in width as well as in steps: the demo shows memorization growing with training and
   capacity together, and says so.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from memscan.demo.data import _digits, build_demo_data, write_demo_data
from memscan.demo.run import candidate_prompts
from memscan.errors import MemscanError
from memscan.extraction.config import ExtractConfig
from memscan.extraction.sweep import extract_sweep
from memscan.generators.checkpoints import list_checkpoints
from memscan.generators.diffusers_unet import load_unet_generator


def checkpoints_dir() -> Path:
    """The shipped demo checkpoints (``checkpoint-N/`` folders, safetensors weights)."""
    return Path(str(resources.files("memscan.demo") / "checkpoints"))


def write_heldout(data, root: Path, n: int) -> Path:
    """The first ``n`` digits (by index) that are not base images of the training set, as PNGs."""
    used = {int(b[3:]) for b in data.copies}
    digits = _digits(data.config.resolution)
    root.mkdir(parents=True, exist_ok=True)
    free = [i for i in range(len(digits)) if i not in used][:n]
    for i in free:
        buf = io.BytesIO()
        Image.fromarray(digits[i][:, :, 0], mode="L").save(buf, format="PNG")
        (root / f"held{i:04d}.png").write_bytes(buf.getvalue())
    return root


@dataclass
class DemoCompareResult:
    """A finished ``memscan demo compare``: ``out``, the comparison ``table`` (one row per
    checkpoint), the ``fits``, the page ``report`` and the ``summary`` (also in
    ``OUT/summary.json``)."""

    out: Path
    table: pd.DataFrame
    fits: pd.DataFrame
    report: Path
    summary: dict

    def text(self) -> str:
        s = self.summary
        lines = [
            f"memscan demo compare: {s['prompts']} prompts × {s['samples_per_prompt']} generations on "
            f"{len(s['checkpoints'])} checkpoints in {s['seconds']:.0f} s"
        ]
        for c in s["checkpoints"]:
            rates = ", ".join(f"{k}×: {v:.2f}" for k, v in c["extraction_rate_by_duplicates"].items())
            loss = (
                f"; held-out loss {c['heldout_loss']:.4f}, training loss {c['train_loss']:.4f}"
                if c["heldout_loss"] is not None
                else ""
            )
            lines.append(f"  {c['label']}: {c['extractions']:>2} extractions ({rates}){loss}")
        for f in s["fits"]:
            lines.append(
                f"  fit (widths differ at the last point): extraction rate = {f['intercept']:.3f} + "
                f"{f['slope']:.3f}·log10(step), slope 95% CI [{f['slope_lo']:.3f}, {f['slope_hi']:.3f}]"
            )
        lines.append(f"  report: {self.report} (the sweep alone: {s['sweep_report']})")
        return "\n".join(lines)


def run_demo_compare(
    out: str | Path = "runs/demo-compare", *, quick: bool = False, progress: bool = True
) -> DemoCompareResult:
    """Run the demo (see the module); ``quick``: fewer prompts and generations (CI)."""
    t0 = time.perf_counter()
    out = Path(out)
    ckdir = checkpoints_dir()
    if not list_checkpoints(ckdir):
        raise MemscanError(
            f"the demo checkpoints are missing from {ckdir}",
            "reinstall memscan, or train them: python scripts/train_demo_checkpoints.py",
        )
    if (out / "sweep" / "manifest.json").exists():
        raise MemscanError(f"{out} already holds a demo comparison", "remove it or pass another --out")
    samples = 24 if quick else 60
    from memscan.demo.run import model_dir

    # 1. data: the training set and held-out digits
    data = build_demo_data()
    write_demo_data(data, out / "data")
    write_heldout(data, out / "heldout", 16 if quick else 64)
    # 2. prompts: the duplicated images' captions and a few unique ones
    prompts = candidate_prompts(data, 2 if quick else 12, 50 if quick else 2)
    prompts.to_csv(out / "prompts.csv", index=False)
    config = ExtractConfig(
        samples_per_prompt=samples, grid=4, min_clique=10, delta=0.15, seed=0, batch_size=samples, shard_size=8
    )
    # 3. the sweep: the same attack and seeds on each checkpoint, then the comparison by step
    res = extract_sweep(
        ckdir,
        lambda path: load_unet_generator(path, batch_size=samples),
        out / "prompts.csv",
        out / "data" / "train",
        out / "sweep",
        config,
        heldout=out / "heldout",
        progress=progress,
    )
    # 4. the shipped (wider, longer-trained) model: the same attack, then all three compared
    from memscan.compare.run import compare_runs
    from memscan.extraction.pipeline import extract

    shipped = out / "shipped"
    extract(
        load_unet_generator(str(model_dir()), batch_size=samples),
        out / "prompts.csv",
        out / "data" / "train",
        shipped,
        config,
        progress=progress,
        model_id=str(model_dir()),
    )
    runs = [*[str(r) for r in res.table.sort_values("step")["run"]], str(shipped)]
    labels = {r: f"16/32/32, step {int(s)}" for r, s in zip(res.table["run"], res.table["step"])}
    labels[str(shipped)] = "32/64/64 (shipped), step 3000"
    both = compare_runs(runs, out / "compare", by="step", labels=labels, progress=progress)
    dup = pd.read_parquet(both.run_dir / "by_duplicates.parquet")
    held = res.table.set_index("run")
    rows = []
    for _, r in both.table.sort_values("step").iterrows():
        d = dup[dup["run"] == r["run"]].sort_values("duplicate_count")
        rows.append(
            {
                "step": int(r["step"]),
                "extractions": int(r["extractions"]),
                "extraction_rate": float(r["extraction_rate"]),
                "extraction_rate_by_duplicates": {
                    str(int(c)): float(v) for c, v in zip(d["duplicate_count"], d["extraction_rate"])
                },
                "label": str(r["label"]),
                "params": None if pd.isna(r["params"]) else int(r["params"]),
                "heldout_loss": float(held.loc[r["run"], "heldout_loss"]) if r["run"] in held.index else None,
                "train_loss": float(held.loc[r["run"], "train_loss"]) if r["run"] in held.index else None,
            }
        )
    summary = {
        "prompts": len(prompts),
        "samples_per_prompt": samples,
        "quick": quick,
        "checkpoints": rows,
        "fits": both.fits.to_dict(orient="records"),
        "model": json.loads((ckdir / "memscan.json").read_text())["training"]["recipe"]
        if (ckdir / "memscan.json").exists()
        else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "report": str(both.report),
        "sweep_report": str(res.report),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_plain))
    return DemoCompareResult(out, both.table, both.fits, both.report, summary)


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    return str(x)
