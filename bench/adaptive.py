"""Adaptive generation budget: share of the full-budget extractions still found against the share
of model evaluations spent, on the demo model and on the tiny memorized Stable-Diffusion pipeline.

Method (one process, one device):

1. Full budget: every prompt gets ``N`` generations (seeds ``derive_seed(0, prompt id, i)``), kept
   in memory; detection (tiled ℓ2 < α → largest clique ≥ k) and verification (medoid within δ
   of a training image) give the full-budget extractions.
2. Adaptive settings are simulated on prefixes of those same generations — an adaptive run's
   first n generations *are* the full run's first n (same seeds), and the rule
   (:func:`memscan.extraction.shard.adaptive_stop`) only sees them. Each setting gives the
   generations spent (= model evaluations / steps per image, which are constant) and the
   extractions found.
3. The default setting is also run for real through ``memscan.extract(adaptive=True)``; its
   per-prompt ``n_samples`` and detections are compared with the simulation.

Usage::

    python bench/adaptive.py --device cuda                 # demo N=500 + tiny pipeline N=200
    python bench/adaptive.py --quick                       # small, CPU
    python bench/adaptive.py --tiny-model DIR              # a memorized tiny pipeline directory

Prints a table per model and a JSON summary (``--json PATH``); ``--plot PNG`` draws the curves
(the same plot as a run's report), and ``--replot JSON --plot PNG`` redraws them from a saved
summary without generating anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memscan.distances import nearest_tiled_l2  # noqa: E402
from memscan.extraction.config import ExtractConfig  # noqa: E402
from memscan.extraction.detect import detect  # noqa: E402
from memscan.extraction.shard import adaptive_stop  # noqa: E402
from memscan.generators.seeds import derive_seeds  # noqa: E402

#: (first_round, round_size) settings on the curve, as shares of N.
SETTINGS = [(0.02, 0.02), (0.04, 0.04), (0.06, 0.06), (0.08, 0.08), (0.1, 0.1), (0.15, 0.1), (0.2, 0.1), (0.3, 0.1)]


def full_pass(generator, prompts: pd.DataFrame, n: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """All ``n`` generations of every prompt (in memory)."""
    out = {}
    for p in prompts.itertuples(index=False):
        parts = []
        for s in range(0, n, batch):
            seeds = derive_seeds(seed, p.prompt_id, s, min(n, s + batch))
            parts.append(np.asarray(generator.generate(p.prompt, seeds)))
        out[p.prompt_id] = np.concatenate(parts)
    return out


class Simulator:
    """Detections on prefixes of the full-budget generations (cached by prefix length)."""

    def __init__(self, images: dict[str, np.ndarray], training: np.ndarray, base: ExtractConfig, device: str):
        self.images, self.training, self.base, self.device = images, training, base, device
        self.cache: dict[tuple[str, int], object] = {}

    def detection(self, pid: str, n: int):
        key = (pid, n)
        if key not in self.cache:
            x = self.images[pid][:n]
            if self.device.startswith("cuda"):
                import torch

                x = torch.as_tensor(x, device=self.device)
            self.cache[key] = detect(x, alpha=self.base.alpha, min_clique=self.base.min_clique, grid=self.base.grid)
        return self.cache[key]

    def extracted(self, pid: str, n: int) -> bool:
        """Detected, and the clique medoid lies within δ of a training image."""
        d = self.detection(pid, n)
        if not d.detected:
            return False
        medoid = self.images[pid][d.clique.medoid][None]
        dist, _, _ = nearest_tiled_l2(medoid, self.training, k=1, grid=self.base.grid)
        return bool(dist[0, 0] <= self.base.delta)

    def run(self, cfg: ExtractConfig) -> dict[str, int]:
        """Generations each prompt gets under ``cfg`` (its rounds and the stopping rule)."""
        spent = {}
        for pid in self.images:
            n = cfg.samples_per_prompt
            for upto in cfg.rounds():
                if upto < cfg.samples_per_prompt and adaptive_stop(self.detection(pid, upto), cfg):
                    n = upto
                    break
            spent[pid] = n
        return spent


def curve(sim: Simulator, base: ExtractConfig, pids: list[str]) -> tuple[list[dict], set]:
    n = base.samples_per_prompt
    full = {pid for pid in pids if sim.extracted(pid, n)}
    rows = []
    for fr, rs in SETTINGS:
        first, size = max(2, round(fr * n)), max(1, round(rs * n))
        cfg = ExtractConfig(**{**base.to_dict(), "adaptive": True, "first_round": first, "round_size": size})
        spent = sim.run(cfg)
        found = {pid for pid in pids if sim.extracted(pid, spent[pid])}
        rows.append(
            {
                "first_round": first,
                "round_size": size,
                "evaluations_share": sum(spent.values()) / (len(pids) * n),
                "extractions_found_share": len(found & full) / len(full) if full else None,
                "extractions_full": len(full),
                "extractions_found": len(found & full),
                "extra_extractions": len(found - full),
                "missed": sorted(full - found),
            }
        )
    return rows, full


def real_run(generator, prompts, training_dir, base: ExtractConfig, first: int, size: int, sim: Simulator, tmp: Path):
    """The adaptive run for real (memscan.extract) vs the simulation, prompt by prompt."""
    from memscan import extract

    cfg = ExtractConfig(**{**base.to_dict(), "adaptive": True, "first_round": first, "round_size": size})
    t0 = time.perf_counter()
    res = extract(generator, prompts, training_dir, tmp / f"real-{first}-{size}", cfg, progress=False)
    seconds = time.perf_counter() - t0
    spent = sim.run(cfg)
    det = res.detections.set_index("prompt_id")
    agree = sum(int(det.loc[pid, "n_samples"]) == spent[pid] for pid in spent)
    ext = set(res.extracted["prompt_id"])
    full = {pid for pid in spent if sim.extracted(pid, cfg.samples_per_prompt)}
    return {
        "first_round": first,
        "round_size": size,
        "n_samples_agree_with_simulation": f"{agree}/{len(spent)}",
        "generations": int(det["n_samples"].sum()),
        "evaluations_share": float(det["n_samples"].sum()) / (len(spent) * cfg.samples_per_prompt),
        "extractions": len(ext),
        "extractions_of_full_budget_found": len(ext & full),
        "extractions_full": len(full),
        "seconds": round(seconds, 1),
    }


def print_curve(name: str, rows: list[dict]) -> None:
    print(f"\n{name}: share of full-budget extractions found vs share of generations (model evaluations)")
    print("first_round round_size  evaluations  found")
    for r in rows:
        found = "n/a" if r["extractions_found_share"] is None else f"{r['extractions_found_share']:.1%}"
        extra = f" (+{r['extra_extractions']} new)" if r["extra_extractions"] else ""
        print(
            f"{r['first_round']:>11} {r['round_size']:>10} {r['evaluations_share']:>12.1%}  {found} "
            f"({r['extractions_found']}/{r['extractions_full']}){extra}"
        )


def bench_demo(args, tmp: Path) -> dict:
    from memscan.demo.data import build_demo_data, write_demo_data
    from memscan.demo.run import candidate_prompts, model_dir
    from memscan.generators.diffusers_unet import load_unet_generator

    data = build_demo_data()
    prompts = candidate_prompts(data, 24 if not args.quick else 4, 1)
    if args.quick:
        prompts = prompts.groupby("planted_copies").head(1).reset_index(drop=True)
    write_demo_data(data, tmp / "demo")
    gen = load_unet_generator(str(model_dir()), device=args.device, batch_size=args.batch)
    n = args.demo_samples
    base = ExtractConfig(samples_per_prompt=n, min_clique=10, delta=0.15, batch_size=args.batch, device=args.device)
    t0 = time.perf_counter()
    images = full_pass(gen, prompts, n, args.batch)
    gen_s = time.perf_counter() - t0
    sim = Simulator(images, data.images, base, args.device)
    rows, full = curve(sim, base, list(prompts["prompt_id"]))
    print_curve(f"demo model ({len(prompts)} prompts × {n})", rows)
    by_count = {}
    for p in prompts.itertuples(index=False):
        by_count.setdefault(int(p.planted_copies), []).append(p.prompt_id in full)
    out = {
        "model": "memscan/demo/model",
        "prompts": len(prompts),
        "samples_per_prompt": n,
        "steps_per_generation": gen.config["num_inference_steps"],
        "full_generation_seconds": round(gen_s, 1),
        "full_extractions_by_planted_copies": {k: f"{sum(v)}/{len(v)}" for k, v in sorted(by_count.items())},
        "curve": rows,
    }
    first, size = max(2, round(0.06 * n)), max(1, round(0.06 * n))
    out["real_run"] = real_run(gen, prompts, tmp / "demo" / "train", base, first, size, sim, tmp)
    print(f"real run: {out['real_run']}")
    return out


def bench_tiny(args, tmp: Path) -> dict:
    from memscan.data.images import save_png
    from memscan.generators.text2image import load_text2image_generator
    from memscan.synthetic import training_image
    from memscan.testing.tiny_sd import as_the_pipeline_sees_it

    model = Path(args.tiny_model)
    meta = json.loads((model / "memscan.json").read_text())["finetune"]
    gen = load_text2image_generator(str(model), device=args.device, batch_size=args.batch)
    mem = meta["memorized"]
    unrelated = meta["other_captions"][:6] + [
        "a yellow tram",
        "two cats",
        "a quiet harbour",
        "snowy peaks",
    ]
    if args.quick:
        unrelated = unrelated[:3]
    prompts = pd.DataFrame(
        {
            "prompt_id": [f"mem{i}" for i in range(len(mem))] + [f"u{i}" for i in range(len(unrelated))],
            "prompt": [m["caption"] for m in mem] + unrelated,
            "train_id": [m["train_id"] for m in mem] + [None] * len(unrelated),
            "duplicate_count": None,
        }
    )
    # the training set as the pipeline renders it (its autoencoder is untrained: decode(encode(x)))
    ids = [m["train_id"] for m in mem] + meta["pool_ids"]
    raw = np.stack([training_image(t, gen.height) for t in ids])
    view = as_the_pipeline_sees_it(gen.pipe, raw)
    train_dir = tmp / "tiny-train"
    train_dir.mkdir()
    for tid, img in zip(ids, view):
        save_png(img, train_dir / f"{tid}.png")
    n = args.tiny_samples
    base = ExtractConfig(samples_per_prompt=n, min_clique=10, delta=0.15, batch_size=args.batch, device=args.device)
    t0 = time.perf_counter()
    images = full_pass(gen, prompts, n, args.batch)
    gen_s = time.perf_counter() - t0
    sim = Simulator(images, view, base, args.device)
    rows, full = curve(sim, base, list(prompts["prompt_id"]))
    print_curve(f"tiny SD pipeline ({len(prompts)} prompts × {n}, {len(mem)} memorized)", rows)
    clique = {pid: int(sim.detection(pid, n).clique.size) for pid in prompts["prompt_id"]}
    out = {
        "model": str(model),
        "prompts": len(prompts),
        "samples_per_prompt": n,
        "steps_per_generation": gen.steps,
        "full_generation_seconds": round(gen_s, 1),
        "full_clique_sizes": clique,
        "curve": rows,
    }
    first, size = max(2, round(0.06 * n)), max(1, round(0.06 * n))
    out["real_run"] = real_run(gen, prompts, train_dir, base, first, size, sim, tmp)
    print(f"real run: {out['real_run']}")
    return out


def plot_curves(summary: dict, path: Path) -> None:
    """Share of full-budget extractions found against share of evaluations, one line per model."""
    from memscan.report.plots import adaptive_budget_plot

    curves = {}
    for key, name in (("demo", "demo model"), ("tiny", "tiny SD pipeline")):
        part = summary.get(key)
        if not part:
            continue
        c = pd.DataFrame(part["curve"]).dropna(subset=["extractions_found_share"]).sort_values("evaluations_share")
        label = f"{name}, N = {part['samples_per_prompt']} ({c['extractions_full'].iloc[0]} extractions)"
        points = c[["evaluations_share", "extractions_found_share"]].set_axis(
            ["evaluations_share", "extractions_found"], axis=1
        )
        ends = pd.DataFrame({"evaluations_share": [0.0], "extractions_found": [0.0]})
        full = pd.DataFrame({"evaluations_share": [1.0], "extractions_found": [1.0]})  # the full budget itself
        curves[label] = pd.concat([ends, points, full])
    png = adaptive_budget_plot(
        curves, ylabel="share of full-budget extractions found", target=(0.25, 0.95), legend=True
    )
    path.write_bytes(png)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="few prompts, small N (CPU smoke run)")
    ap.add_argument("--demo-samples", type=int, default=None, help="N for the demo model [500; quick 40]")
    ap.add_argument("--tiny-samples", type=int, default=None, help="N for the tiny pipeline [200; quick 30]")
    ap.add_argument("--tiny-model", type=Path, help="memorized tiny pipeline directory (skip the tiny part if absent)")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path, help="write the curves as a PNG")
    ap.add_argument(
        "--replot", type=Path, nargs="+", help="redraw --plot from saved --json summaries (merged), generating nothing"
    )
    args = ap.parse_args(argv)
    if args.replot:
        summary = {}
        for path in args.replot:
            summary.update(json.loads(path.read_text()))
        plot_curves(summary, args.plot or args.replot[0].with_suffix(".png"))
        return summary
    args.demo_samples = args.demo_samples or (40 if args.quick else 500)
    args.tiny_samples = args.tiny_samples or (30 if args.quick else 200)
    args.batch = args.batch or (40 if args.quick else 250)
    summary: dict = {"device": args.device, "settings_as_share_of_N": SETTINGS}
    if args.device.startswith("cuda"):
        summary["card"] = torch.cuda.get_device_name(0)

    def save():
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1, default=str))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_demo:
            summary["demo"] = bench_demo(args, tmp)
            save()
        if args.tiny_model:
            summary["tiny"] = bench_tiny(args, tmp)
            save()
    print(json.dumps(summary, indent=1, default=str))
    save()
    if args.plot:
        plot_curves(summary, args.plot)
    return summary


if __name__ == "__main__":
    main()
