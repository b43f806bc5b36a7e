"""Benchmark: diffusion-loss evaluations per second on the demo model, memscan vs a plain loop.

One *evaluation* is one example at one timestep with one noise draw: a row of a UNet call. Two
ways, measured in the same process, interleaved (A B A B …) so that a busy machine slows both
alike, and the median of the repeats reported:

- ``memscan``: ``memscan.mia.loss.diffusion_loss(predictor, images, [t], noise_draws=1,
  batch_size=B)`` with the demo model loaded by ``load_noise_predictor`` — per-example noise from
  its own generator (``derive_seed``), uint8 → model space, conditioning, float64 accumulation;
- ``plain``: the loop a user would write: one ``torch.randn`` for the whole batch, ``x_t``, one
  ``unet(x_t, t, class_labels=...)`` call, per-row MSE — no per-example seeding.

Overhead = 1 − memscan / plain throughput (target ≤ 10 %). CPU time of the process is also
reported, because wall time on a shared machine depends on the neighbours.

Usage::

    python bench/mia_loss.py                      # B = 1, 4, 16, 64, 256 on the demo model
    python bench/mia_loss.py --batch-sizes 1,256 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time

import numpy as np
import torch


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,4,16,64,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timestep", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a busy machine)")
    ap.add_argument("--min-evals", type=int, default=256, help="evaluations per measurement (at least B)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from memscan.demo.data import build_demo_data
    from memscan.demo.run import model_dir
    from memscan.mia.loss import diffusion_loss
    from memscan.mia.noise import load_noise_predictor

    p = load_noise_predictor(model_dir(), device=args.device)
    unet, alphas = p.unet, p.alphas_cumprod
    data = build_demo_data()
    base = data.base_images()
    keys = sorted(base)
    captions = [data.captions[k] for k in keys]
    labels_all = np.array([p.class_of(c) for c in captions])
    images_all = np.stack([base[k] for k in keys])  # 532 × 16 × 16 × 1
    t = args.timestep
    a = float(alphas[t])

    def run_memscan(images, labels, bs):
        return diffusion_loss(p, images, [t], condition=labels, noise_draws=1, seed=0, batch_size=bs)

    @torch.no_grad()
    def run_plain(images, labels, bs):
        g = torch.Generator().manual_seed(0)
        x0_all = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(args.device)
        y_all = torch.from_numpy(labels).to(args.device)
        out = []
        for s in range(0, len(images), bs):
            x0, y = x0_all[s : s + bs], y_all[s : s + bs]
            eps = torch.randn(x0.shape, generator=g).to(args.device)
            xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
            pred = unet(xt, torch.full((len(x0),), t, device=args.device), class_labels=y).sample
            out.append(((pred - eps) ** 2).flatten(1).mean(1).cpu())
        return torch.cat(out).numpy()

    rows = []
    print(f"demo model {model_dir()}: {sum(q.numel() for q in unet.parameters()):,} parameters, 16×16×1")
    print(f"device {args.device}, torch threads {args.threads}, t = {t}, median of {args.repeats} repeats")
    print(f"{'B':>5} {'memscan eval/s':>15} {'plain eval/s':>13} {'overhead':>9} {'mem CPU s':>10} {'plain CPU s':>12}")
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        n = max(bs, args.min_evals)
        reps = math.ceil(n / len(images_all))
        images = np.concatenate([images_all] * reps)[:n]
        labels = np.concatenate([labels_all] * reps)[:n]
        run_memscan(images[:bs], labels[:bs], bs)  # warm-up
        run_plain(images[:bs], labels[:bs], bs)
        tm, tp, cm, cp = [], [], [], []
        for _ in range(args.repeats):
            for fn, wall, cpu in ((run_memscan, tm, cm), (run_plain, tp, cp)):
                c0, w0 = _cpu(), time.perf_counter()
                fn(images, labels, bs)
                wall.append(time.perf_counter() - w0)
                cpu.append(_cpu() - c0)
        rm, rp = n / statistics.median(tm), n / statistics.median(tp)
        overhead = 1 - rm / rp
        # the CPU-time ratio is steadier than the wall ratio on a shared machine
        cpu_overhead = statistics.median(cm) / statistics.median(cp) - 1
        rows.append(
            {
                "batch_size": bs,
                "evaluations": n,
                "memscan_evals_per_s": round(rm, 1),
                "plain_evals_per_s": round(rp, 1),
                "overhead_wall": round(overhead, 4),
                "memscan_cpu_s": round(statistics.median(cm), 3),
                "plain_cpu_s": round(statistics.median(cp), 3),
                "overhead_cpu": round(cpu_overhead, 4),
            }
        )
        print(
            f"{bs:>5} {rm:>15.1f} {rp:>13.1f} {overhead:>8.1%} {statistics.median(cm):>10.3f} "
            f"{statistics.median(cp):>12.3f}"
        )
    # sanity: the two compute the same quantity (different noise, so compare means only)
    mem = run_memscan(images_all, labels_all, 256)[0]
    plain = run_plain(images_all, labels_all, 256)
    print(f"mean L_{t}: memscan {mem.mean():.4f}, plain {plain.mean():.4f} (same model, different noise)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "timestep": t, "device": args.device, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
