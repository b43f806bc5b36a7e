"""``memscan demo compare``: memorization over training, on the shipped demo checkpoints.

The package ships ``memscan/demo/checkpoints/checkpoint-N/`` — a narrower demo model (block
widths 16/32/32) saved during one training run with the demo recipe
(``scripts/train_demo_checkpoints.py``). The demo:

1. rebuilds the demo training set (digits with planted duplicates) and a held-out set (digits
   that are not in it);
2. attacks the captions of the images planted ≥ 25 times and of the 4 planted once
   (``--quick``: ≥ 50 times) with the same extraction attack and the same seeds on every checkpoint,
   recording each checkpoint's held-out and training loss (a checkpoint sweep,
   :func:`memscan.extraction.sweep.extract_sweep`);
3. compares them by training step (``OUT/sweep/compare.html``): extraction rate by duplicate
   count per checkpoint, which images each checkpoint memorized and their overlap, and the
   log-linear fit of the extraction rate against the step — memorization over training at one
   width;
4. runs the same attack on the shipped demo model (``memscan/demo/model``: the same recipe and
   data, wider — 32/64/64 — trained as long as the last checkpoint, 3,000 steps) and compares it
   with that checkpoint by parameter count (``OUT/compare/compare.html``) — memorization against
   capacity at equal training.
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
from memscan.store import atomic_write_json, check_out_folder


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
    """A finished ``memscan demo compare``: ``out``, the ``table`` (one row per checkpoint, then
    the shipped model), the ``fits`` over the checkpoints, the ``report`` (the checkpoint against
    the shipped model; the sweep's page is ``summary["sweep_report"]``) and the ``summary``
    (also in ``OUT/summary.json``)."""

    out: Path
    table: pd.DataFrame
    fits: pd.DataFrame
    report: Path
    summary: dict

    def text(self) -> str:
        s = self.summary
        lines = [
            f"memscan demo compare: {s['prompts']} prompts × {s['samples_per_prompt']} generations on "
            f"{len(s['checkpoints']) - 1} checkpoints and the shipped model in {s['seconds']:.0f} s"
        ]
        for c in s["checkpoints"]:
            loss = (
                f"; held-out loss {c['heldout_loss']:.4f}, training loss {c['train_loss']:.4f}"
                if c["heldout_loss"] is not None
                else ""
            )
            rates = ", ".join(f"{k}×: {v}" for k, v in c["extractions_by_duplicates"].items())
            lines.append(f"  {c['label']}: {c['extractions']:>2} extractions ({rates}){loss}")
        for f in s["fits"]:
            lines.append(
                f"  fit over the checkpoints: extraction rate = {f['intercept']:.3f} + "
                f"{f['slope']:.3f}·log10(step), slope 95% CI [{f['slope_lo']:.3f}, {f['slope_hi']:.3f}]"
            )
        lines.append(f"  over training: {s['sweep_report']}; against width at equal steps: {self.report}")
        return "\n".join(lines)


#: Generations per prompt (``--quick``: :data:`QUICK_SAMPLES`), sized for the 5-minute budget on
#: 2 CPU cores (docs/demo.md has the measured time).
SAMPLES = 32
QUICK_SAMPLES = 24
#: Torch threads: one. The models are tiny (8×8 digits); on 2 busy cores two threads spin for
#: cores that other processes hold (the default run took 563 s of CPU with two threads under a
#: load of 7, 40 s with one; docs/demo.md).
THREADS = 1


def run_demo_compare(
    out: str | Path = "runs/demo-compare", *, quick: bool = False, progress: bool = True, threads: int | None = THREADS
) -> DemoCompareResult:
    """Run the demo (see the module); ``quick``: fewer prompts and generations (CI); ``threads``:
    torch threads while it runs (None: unchanged)."""
    check_out_folder(out)  # a file in the way: refused before any work
    from memscan.mia.shadow import torch_threads

    with torch_threads(threads):
        res = _run_demo_compare(Path(out), quick, progress)
    res.summary["threads"] = threads
    atomic_write_json(res.out / "summary.json", res.summary, default=_plain)
    return res


def _run_demo_compare(out: Path, quick: bool, progress: bool) -> DemoCompareResult:
    t0 = time.perf_counter()
    out = Path(out)
    ckdir = checkpoints_dir()
    ckpts = list_checkpoints(ckdir)
    if not ckpts:
        raise MemscanError(
            f"the demo checkpoints are missing from {ckdir}",
            "reinstall memscan, or train them: python scripts/train_demo_checkpoints.py",
        )
    if (out / "sweep" / "manifest.json").exists():
        raise MemscanError(f"{out} already holds a demo comparison", "remove it or pass another --out")
    samples = QUICK_SAMPLES if quick else SAMPLES
    from memscan.demo.run import model_dir

    # 1. data: the training set and held-out digits
    data = build_demo_data()
    write_demo_data(data, out / "data")
    write_heldout(data, out / "heldout", 16 if quick else 32)
    # 2. prompts: the captions of the images planted ≥ 25 times (quick: ≥ 50) and of the unique
    #    ones planted once (4)
    prompts = candidate_prompts(data, 2 if quick else 4, 50 if quick else 25)
    prompts.to_csv(out / "prompts.csv", index=False)
    config = ExtractConfig(
        samples_per_prompt=samples, grid=4, min_clique=10, delta=0.15, seed=0, batch_size=samples, shard_size=8
    )
    # 3. the sweep: the same attack and seeds on each checkpoint, then the comparison by step
    #    (memorization over training, one width: the log-linear fit)
    t_sweep = time.perf_counter()
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
    t_sweep = time.perf_counter() - t_sweep
    # 4. the shipped model (the same recipe and data, wider, trained as long as the last
    #    checkpoint): the same attack, then compared with that checkpoint by parameters (capacity)
    from memscan.compare.run import compare_runs
    from memscan.extraction.pipeline import extract

    t_shipped = time.perf_counter()
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
    t_shipped = time.perf_counter() - t_shipped
    sweep = res.table.sort_values("step")
    widths = _widths(ckdir, ckpts)
    labels = {r: f"{widths}, step {int(s)}" for r, s in zip(sweep["run"], sweep["step"])}
    last = str(sweep["run"].iloc[-1])
    labels[str(shipped)] = f"{_widths(model_dir())} (shipped), step {_step(model_dir())}"
    pair = {r: labels[r] for r in (last, str(shipped))}
    both = compare_runs([last, str(shipped)], out / "compare", by="params", labels=pair, progress=progress)
    shipped_row = both.table[both.table["run"] == str(shipped)].iloc[0]
    table = pd.concat([sweep.assign(label=[labels[r] for r in sweep["run"]]), shipped_row.to_frame().T])
    dup = pd.concat(
        [
            pd.read_parquet(res.run_dir / "by_duplicates.parquet"),
            (b := pd.read_parquet(both.run_dir / "by_duplicates.parquet"))[b["run"] == str(shipped)],
        ]
    )
    rows = []
    for _, r in table.iterrows():
        d = dup[dup["run"] == r["run"]].sort_values("duplicate_count")
        loss = {k: (None if k not in r or pd.isna(r[k]) else float(r[k])) for k in ("heldout_loss", "train_loss")}
        rows.append(
            {
                "step": int(r["step"]),
                "extractions": int(r["extractions"]),
                "extraction_rate": float(r["extraction_rate"]),
                "extraction_rate_by_duplicates": {
                    str(int(c)): float(v) for c, v in zip(d["duplicate_count"], d["extraction_rate"])
                },
                "extractions_by_duplicates": {
                    str(int(c)): f"{int(e)}/{int(n)}"
                    for c, e, n in zip(d["duplicate_count"], d["extractions"], d["prompts"])
                },
                "label": labels[str(r["run"])],
                "params": None if pd.isna(r["params"]) else int(r["params"]),
                **loss,
            }
        )
    summary = {
        "prompts": len(prompts),
        "samples_per_prompt": samples,
        "quick": quick,
        "checkpoints": rows,
        "fits": res.fits.to_dict(orient="records"),
        "model": json.loads((ckdir / "memscan.json").read_text())["training"]["recipe"]
        if (ckdir / "memscan.json").exists()
        else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "seconds_sweep": round(t_sweep, 1),
        "seconds_shipped": round(t_shipped, 1),
        "report": str(both.report),
        "sweep_report": str(res.report),
    }
    atomic_write_json(out / "summary.json", summary, default=_plain)
    return DemoCompareResult(out, table.reset_index(drop=True), res.fits, both.report, summary)


def _widths(folder: Path, ckpts=None) -> str:
    """``16/32/32``: the UNet's block widths, from its config."""
    unet = (ckpts[0].path if ckpts else folder) / "unet" / "config.json"
    try:
        return "/".join(str(w) for w in json.loads(unet.read_text())["block_out_channels"])
    except (OSError, KeyError, ValueError):
        return "?"


def _step(folder: Path) -> str:
    try:
        return str(json.loads((folder / "memscan.json").read_text())["training"]["recipe"]["steps"])
    except (OSError, KeyError, ValueError):
        return "?"


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    return str(x)
