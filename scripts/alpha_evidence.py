"""Measure tiled ℓ2 between independent generations and between copies, to choose alpha.

Two sources: the shipped demo model (16×16 grayscale, grid 4): prompts of images planted ≥ 25×
(memorized) and of unique images (not memorized); and the synthetic generator at 32×32 and 64×64
RGB (fresh smooth pictures vs noisy copies). Prints percentiles; docs/choosing-alpha.md records them.

    python scripts/alpha_evidence.py [--samples 100]
"""

from __future__ import annotations

import argparse

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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=100)
    a = p.parse_args()
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
