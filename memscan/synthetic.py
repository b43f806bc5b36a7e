"""A synthetic generator and training set with known memorization, for tests and benchmarks.

Training image ``id`` is a smooth random picture determined by the id alone. The generator
memorizes the images named in its ``memorized`` mapping: for a prompt mapped to a training id, a
share ``copy_rate`` of its generations are that image plus small pixel noise; every other
generation is a fresh smooth random picture from its seed. So the ground truth of an extraction
run is known exactly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from memscan.data.images import save_png


def keyed_rng(*key) -> np.random.Generator:
    """A random generator seeded by blake2b of ``key``: the same key gives the same stream."""
    digest = hashlib.blake2b("\x1f".join(map(str, key)).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def smooth_image(rng: np.random.Generator, size: int = 32, channels: int = 3) -> np.ndarray:
    """A random picture of a few soft blobs on a gradient (uint8 H×W×C)."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, channels))
    img += rng.uniform(0, 1, channels) * (1 - y[..., None]) + rng.uniform(0, 1, channels) * y[..., None]
    for _ in range(4):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.3)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-0.8, 0.8, channels)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def training_image(train_id: str, size: int = 32, channels: int = 3) -> np.ndarray:
    """The synthetic training image of ``train_id``."""
    return smooth_image(keyed_rng("train", train_id), size, channels)


def write_training_set(root: str | Path, n: int, size: int = 32, channels: int = 3, prefix: str = "t") -> list[str]:
    """Write ``n`` synthetic training images (PNG + caption .txt); returns their ids."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"{prefix}{i:04d}" for i in range(n)]
    for tid in ids:
        save_png(training_image(tid, size, channels), root / f"{tid}.png")
        (root / f"{tid}.txt").write_text(f"caption of {tid}\n")
    return ids


class SyntheticGenerator:
    """Generator with planted memorization (see module docstring).

    Parameters
    ----------
    memorized : dict prompt → training id
    size, channels : output shape
    copy_rate : share of a memorized prompt's generations that are copies
    noise : pixel noise (std, in [0, 1] units) added to copies

    Examples
    --------
    >>> g = SyntheticGenerator({"p": "t0001"}, size=16, copy_rate=1.0)
    >>> from memscan import tiled_l2
    >>> x = g.generate("p", [1, 2])
    >>> float(tiled_l2(x[0], training_image("t0001", 16))) < 0.05
    True
    """

    def __init__(
        self,
        memorized: dict[str, str] | None = None,
        size: int = 32,
        channels: int = 3,
        copy_rate: float = 0.5,
        noise: float = 0.01,
    ):
        self.memorized = dict(memorized or {})
        self.size, self.channels = size, channels
        self.copy_rate, self.noise = copy_rate, noise
        self.output_shape = (size, size, channels)
        self.config = {
            "type": "synthetic",
            "memorized": len(self.memorized),
            "copy_rate": copy_rate,
            "noise": noise,
            "size": size,
        }

    def generate(self, prompt: str, seeds: list[int]) -> np.ndarray:
        out = np.empty((len(seeds), self.size, self.size, self.channels), np.uint8)
        target = self.memorized.get(prompt)
        for k, s in enumerate(seeds):
            rng = keyed_rng("sample", s)
            if target is not None and rng.uniform() < self.copy_rate:
                base = training_image(target, self.size, self.channels).astype(np.float64) / 255
                noisy = base + rng.normal(0, self.noise, base.shape)
                out[k] = (np.clip(noisy, 0, 1) * 255).round().astype(np.uint8)
            else:
                out[k] = smooth_image(rng, self.size, self.channels)
        return out


def demo_factory():
    """A zero-argument factory for ``--model py:memscan.synthetic:demo_factory``: prompts
    ``memorized t0000`` … ``memorized t0004`` are memorized; anything else is fresh."""
    return SyntheticGenerator({f"memorized t{i:04d}": f"t{i:04d}" for i in range(5)}, size=32, copy_rate=0.5)
