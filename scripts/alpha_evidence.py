"""Measure tiled ℓ2 between independent generations and between copies, to choose alpha.

Two sources: the shipped demo model (16×16 grayscale, grid 4): prompts of images planted ≥ 25×
(memorized) and of unique images (not memorized); and the synthetic generator at 32×32 and 64×64
RGB (fresh smooth pictures vs noisy copies). Prints percentiles; docs/choosing-alpha.md records them.

With ``--tiny-model DIR`` (a memorized tiny Stable-Diffusion pipeline written by
``python -m memscan.testing.tiny_sd DIR --memorized N …``) it is the pilot that
docs/choosing-alpha.md asks for on a new model: generations of each memorized caption that lie
within δ = 0.15 of the caption's training image (as the pipeline renders it) against each other
("copies"), and independent generations of ``--others`` of its random training captions. The
pilot's seeds (base seed 1) are disjoint from those of ``bench/audit_cost.py`` (base seed 0).

    python scripts/alpha_evidence.py [--samples 100]
    python scripts/alpha_evidence.py --tiny-model bench/models/tiny_sd_audit --samples 50 --others 12
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from memscan.demo.data import build_demo_data
from memscan.demo.run import model_dir
from memscan.distances import pairwise_tiled_l2
from memscan.generators.diffusers_unet import load_unet_generator
from memscan.generators.seeds import derive_seeds
from memscan.synthetic import SyntheticGenerator

Q = (1, 5, 50, 95, 99)


def offdiag(d):
    return d[np.triu_indices(d.shape[0], 1)]


def show(name, values):
    v = np.concatenate(values)
    print(f"{name:58s} n={len(v):7d}  " + "  ".join(f"p{q}={np.percentile(v, q):.3f}" for q in Q))


def tiny_pilot(model: Path, samples: int, n_others: int, grid: int = 4, delta: float = 0.15) -> dict:
    """Copy-to-copy and independent tiled ℓ2 of a memorized tiny SD pipeline (seed base 1)."""
    from memscan.generators.text2image import load_text2image_generator
    from memscan.synthetic import training_image
    from memscan.testing.tiny_sd import as_the_pipeline_sees_it

    meta = json.loads((model / "memscan.json").read_text())["finetune"]
    gen = load_text2image_generator(str(model), batch_size=samples)
    copies, share = [], {}
    for i, m in enumerate(meta["memorized"]):
        view = as_the_pipeline_sees_it(gen.pipe, training_image(m["train_id"], gen.height)[None])[0]
        x = gen.generate(m["caption"], derive_seeds(1, f"mem{i}", 0, samples))
        d = pairwise_tiled_l2(np.concatenate([x, view[None]]), grid)
        close = d[-1, :-1] <= delta  # generations that are copies of the training image
        share[m["caption"]] = float(close.mean())
        if close.sum() >= 2:
            copies.append(offdiag(d[:-1, :-1][np.ix_(close, close)]))
    indep = []
    for j, caption in enumerate(meta["other_captions"][-n_others:]):  # the bench's pool takes the first ones
        x = gen.generate(caption, derive_seeds(1, f"o{j:03d}", 0, samples))
        indep.append(offdiag(pairwise_tiled_l2(x, grid)))
    print(f"tiny SD pipeline {model}, {samples} samples per prompt, grid {grid}")
    print("share of generations within δ of the training image:", {k: round(v, 2) for k, v in share.items()})
    show(f"copies of a memorized image ({len(copies)} captions with ≥ 2 copies)", copies)
    show(f"independent generations ({n_others} random training captions)", indep)
    c, u = np.concatenate(copies), np.concatenate(indep)
    return {
        "copies": {f"p{q}": float(np.percentile(c, q)) for q in Q},
        "independent": {f"p{q}": float(np.percentile(u, q)) for q in Q},
        "copy_share": share,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--tiny-model", type=Path, help="pilot on a memorized tiny SD pipeline instead")
    p.add_argument("--others", type=int, default=12, help="random captions in the tiny pilot")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.tiny_model:
        out = tiny_pilot(a.tiny_model, a.samples, a.others)
        if a.json:
            a.json.write_text(json.dumps(out, indent=1) + "\n")
        return
    data = build_demo_data()
    gen = load_unet_generator(str(model_dir()), batch_size=a.samples)
    rng = np.random.default_rng(0)
    heavy = [b for b in data.planted if data.copies[b] >= 25]
    unique = list(rng.choice(sorted(b for b, c in data.copies.items() if c == 1), 12, replace=False))
    mem, uniq = [], []
    for b in heavy:
        x = gen.generate(data.captions[b], derive_seeds(0, b, 0, a.samples))
        base = data.base_images()[b]
        d = pairwise_tiled_l2(np.concatenate([x, base[None]]), 4)
        close = d[-1, :-1] <= 0.15  # generations that are copies of the training image
        mem.append(offdiag(d[:-1, :-1][np.ix_(close, close)]))
    for b in unique:
        x = gen.generate(data.captions[b], derive_seeds(0, b, 0, a.samples))
        uniq.append(offdiag(pairwise_tiled_l2(x, 4)))
    print(f"demo model, {a.samples} samples per prompt, grid 4")
    show(f"copies of a memorized image ({len(heavy)} prompts, ≥25 copies)", mem)
    show(f"independent generations ({len(unique)} unique-image prompts)", uniq)
    for size in (32, 64):
        g = SyntheticGenerator({"m": "t0000"}, size=size, copy_rate=1.0, noise=0.02)
        f = SyntheticGenerator({}, size=size)
        show(
            f"synthetic {size}×{size}×3: noisy copies (σ = 0.02)",
            [offdiag(pairwise_tiled_l2(g.generate("m", list(range(100))), 4))],
        )
        show(
            f"synthetic {size}×{size}×3: fresh pictures",
            [offdiag(pairwise_tiled_l2(f.generate("x", list(range(100))), 4))],
        )


if __name__ == "__main__":
    main()
