"""GPU readiness check: the tiny Stable-Diffusion pipeline through ``memscan extract`` on a device.

Self-contained: builds the tiny pipeline (``memscan.testing.tiny_sd``, no downloads), a synthetic
training set and a prompts file in a temporary folder, then

1. runs ``memscan extract --model <tiny pipeline> --device D --dtype X`` as a user would
   (a subprocess of the CLI) and reads the run's manifest: generations/s, detection prompts/s;
2. times the text-to-image adapter directly (warm, excluding model load): generations/s in the
   chosen dtype and in fp32, same process, same device;
3. times ``pairwise_tiled_l2`` on random images on the device, at the paper's per-prompt size
   (500 generations of 512×512, 4×4 tiles; ``--quick``: 200 of 256×256) and on the CPU at a
   smaller size as the baseline, and prints pairs/s and the ratio.

Usage::

    python bench/gpu_check.py --device cuda            # fp16 (auto) on the first GPU
    python bench/gpu_check.py --device cpu --quick     # slowly, anywhere

It prints one line per figure and a final JSON summary (also written with ``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing memscan


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_info(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(
            card=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    else:
        info.update(card=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def cli_extract(tmp: Path, args) -> dict:
    """Step 1: the tiny pipeline through ``memscan extract`` (subprocess, as a user runs it)."""
    from memscan.synthetic import write_training_set
    from memscan.testing.tiny_sd import save_tiny_sd

    model = save_tiny_sd(tmp / "tiny-sd")
    write_training_set(tmp / "train", 50, size=32)
    prompts = [f"a photo of object number {i}" for i in range(args.prompts)]
    (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "memscan.cli",
        "extract",
        "--model",
        str(model),
        "--prompts",
        str(tmp / "prompts.txt"),
        "--train",
        str(tmp / "train"),
        "--out",
        str(tmp / "run"),
        "--samples-per-prompt",
        str(args.samples),
        "--batch-size",
        str(args.batch_size),
        "--min-clique",
        str(min(10, args.samples)),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        raise SystemExit(f"memscan extract failed ({proc.returncode})")
    manifest = json.loads((tmp / "run" / "manifest.json").read_text())
    tp, counts = manifest["throughput"], manifest["counts"]
    out = {
        "wall_s_including_load": round(wall, 2),
        "generation_images_per_s": tp["generation_images_per_s"],
        "detection_prompts_per_s": tp["detection_prompts_per_s"],
        "images": tp["images"],
        "counts": counts,
        "generator": manifest["generator"],
    }
    print(
        f"[extract] {counts['prompts']} prompts × {args.samples} generations, {args.steps} steps, "
        f"{manifest['generator'].get('dtype')}: {tp['generation_images_per_s']} generations/s, "
        f"{tp['detection_prompts_per_s']} prompts/s detection, {counts['detections']} detections, "
        f"{counts['extractions']} extractions (wall {wall:.1f} s with model load)"
    )
    return out


def adapter_throughput(args, dtype: str, model_dir: Path) -> float:
    """Step 2: warm generations/s of the adapter alone (no model load, no detection)."""
    from memscan.generators.text2image import load_text2image_generator

    gen = load_text2image_generator(
        str(model_dir), device=args.device, batch_size=args.batch_size, dtype=dtype, num_inference_steps=args.steps
    )
    gen.generate("warm-up", list(range(min(args.batch_size, 4))))
    _sync(args.device)
    n = args.batch_size * args.repeats
    t0 = time.perf_counter()
    gen.generate("a photo of a timing run", list(range(1000, 1000 + n)))
    _sync(args.device)
    rate = n / (time.perf_counter() - t0)
    print(f"[adapter] {dtype:>4} on {args.device}: {rate:.1f} generations/s ({n} images, batch {args.batch_size})")
    return rate


def pairwise_throughput(device: str, n: int, size: int, repeats: int = 3) -> dict:
    """Step 3: pairwise tiled ℓ2 of n random size×size×3 images on ``device`` (pairs/s)."""
    import torch

    from memscan.distances import pairwise_tiled_l2

    g = torch.Generator("cpu").manual_seed(0)
    images = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
    x = images.to(device) if device.startswith("cuda") else images.numpy()
    pairwise_tiled_l2(x, 4)  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pairwise_tiled_l2(x, 4)
        _sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    pairs = n * (n - 1) / 2
    out = {"n": n, "size": size, "seconds": round(best, 4), "pairs_per_s": round(pairs / best, 1)}
    print(f"[pairwise] {device}: {n} images of {size}×{size}: {best * 1e3:.1f} ms → {pairs / best:,.0f} pairs/s")
    return out


def main(argv: list[str] | None = None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto (fp16 on cuda, fp32 on cpu), fp16, bf16, fp32")
    ap.add_argument("--quick", action="store_true", help="small sizes (CI, CPU)")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args(argv)
    quick = args.quick
    args.prompts = 2 if quick else 8
    args.samples = 16 if quick else 100
    args.steps = 4 if quick else 25
    args.batch_size = 8 if quick else 50
    args.repeats = 1 if quick else 4
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; use --device cpu")

    info = device_info(args.device)
    print(f"[device] {json.dumps(info)}")
    summary: dict = {"device": info, "quick": quick}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. memscan extract end to end
        summary["extract"] = cli_extract(tmp, args)
        # 2. the adapter alone, chosen dtype vs fp32
        rate = adapter_throughput(args, args.dtype, tmp / "tiny-sd")
        summary["adapter_generations_per_s"] = {args.dtype: round(rate, 2)}
        if args.dtype not in ("fp32",) and args.device.startswith("cuda"):
            rate32 = adapter_throughput(args, "fp32", tmp / "tiny-sd")
            summary["adapter_generations_per_s"]["fp32"] = round(rate32, 2)
    # 3. pairwise distances: the paper's per-prompt matrix on the device, a smaller CPU baseline
    n, size = (200, 256) if quick else (500, 512)
    summary["pairwise_device"] = pairwise_throughput(args.device, n, size)
    base_n = 64 if quick else 100
    summary["pairwise_cpu_baseline"] = pairwise_throughput("cpu", base_n, size, repeats=1 if quick else 2)
    ratio = summary["pairwise_device"]["pairs_per_s"] / summary["pairwise_cpu_baseline"]["pairs_per_s"]
    summary["pairwise_speedup_vs_cpu"] = round(ratio, 1)
    per_prompt = summary["pairwise_device"]["seconds"] * (500 * 499 / 2) / (n * (n - 1) / 2)
    summary["seconds_per_paper_prompt_matrix"] = round(per_prompt, 4)
    print(
        f"[pairwise] device/cpu pairs/s ratio {ratio:.1f}×; one 500×500 matrix of {size}² images ≈ {per_prompt:.3f} s"
    )
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
