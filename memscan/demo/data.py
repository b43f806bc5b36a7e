"""The demo training set: scikit-learn's bundled digits with planted duplicates.

Web-scale training sets hold some images many times over (Carlini et al. 2023, §4.2: the most
extracted Stable Diffusion images were duplicated hundreds of times in LAION). We rebuild that
situation from package-bundled data only: the 1,797 8×8 digits of ``sklearn.datasets.load_digits``
are upscaled to 16×16 grayscale, a set of unique images is kept once, and chosen images are
repeated at counts from 1 to 200. Every image has its own caption (as every LAION image has its
own alt text; a duplicated image repeats its caption), and the ground truth — which image, how
many copies — is written beside the data.

The builder is deterministic: the same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

#: Planted duplicate counts (the x-axis of the paper's duplication figure).
DEFAULT_COUNTS = (1, 2, 5, 10, 25, 50, 100, 200)


@dataclass(frozen=True)
class DemoDataConfig:
    """Recipe of the demo training set (recorded in ``ground_truth.json``)."""

    seed: int = 0
    n_unique: int = 500
    counts: tuple[int, ...] = DEFAULT_COUNTS
    per_count: int = 4
    resolution: int = 16


@dataclass
class DemoData:
    """The built training set, in memory.

    Attributes
    ----------
    images : uint8 R×H×W×1, one row per training file (duplicates repeated)
    ids : file ids (``img0042_c003``: base image 42, copy 3)
    base_ids : the base image (``img0042``) of each row
    captions : caption of each base image, by base id
    copies : number of copies of each base image, by base id
    planted : base ids of the planted images (count ≥ 1 from ``config.counts``)
    """

    images: np.ndarray
    ids: list[str]
    base_ids: list[str]
    captions: dict[str, str]
    copies: dict[str, int]
    planted: list[str]
    config: DemoDataConfig = field(default_factory=DemoDataConfig)

    def base_images(self) -> dict[str, np.ndarray]:
        """One image per base id."""
        out: dict[str, np.ndarray] = {}
        for b, img in zip(self.base_ids, self.images):
            out.setdefault(b, img)
        return out


def _digits(resolution: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    raw = load_digits().images  # 1797×8×8, values 0..16
    scaled = np.clip(raw * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    out = np.empty((len(raw), resolution, resolution, 1), np.uint8)
    for i, im in enumerate(scaled):
        big = Image.fromarray(im, mode="L").resize((resolution, resolution), Image.BILINEAR)
        out[i, :, :, 0] = np.asarray(big)
    return out


def build_demo_data(config: DemoDataConfig = DemoDataConfig()) -> DemoData:
    """Build the demo training set.

    Examples
    --------
    >>> d = build_demo_data(DemoDataConfig(n_unique=10, counts=(1, 3), per_count=1))
    >>> d.images.shape, sorted(d.copies.values())
    ((14, 16, 16, 1), [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3])
    """
    rng = np.random.default_rng(config.seed)
    digits = _digits(config.resolution)
    n_planted = len(config.counts) * config.per_count
    if config.n_unique + n_planted > len(digits):
        raise ValueError(f"at most {len(digits)} base images are available")
    chosen = rng.permutation(len(digits))[: config.n_unique + n_planted]
    planted_idx = chosen[:n_planted]
    unique_idx = chosen[n_planted:]

    copies: dict[str, int] = {}
    planted: list[str] = []
    for k, idx in enumerate(planted_idx):
        copies[f"img{idx:04d}"] = int(config.counts[k // config.per_count])
        planted.append(f"img{idx:04d}")
    for idx in unique_idx:
        copies[f"img{idx:04d}"] = 1
    from sklearn.datasets import load_digits

    labels = load_digits().target
    captions = {b: f"a handwritten {int(labels[int(b[3:])])}, scan {b[3:]}" for b in copies}

    rows, ids, base_ids = [], [], []
    for b in sorted(copies):
        for c in range(copies[b]):
            rows.append(digits[int(b[3:])])
            ids.append(f"{b}_c{c:03d}")
            base_ids.append(b)
    return DemoData(np.stack(rows), ids, base_ids, captions, copies, planted, config)


def write_demo_data(data: DemoData, root: str | Path) -> Path:
    """Write the training folder (PNG + caption ``.txt`` per file) and the ground truth.

    Layout::

        root/train/img0042_c000.png, img0042_c000.txt, ...
        root/ground_truth.csv    base_id, caption, copies, planted
        root/ground_truth.json   the recipe and the same table
    """
    root = Path(root)
    train = root / "train"
    train.mkdir(parents=True, exist_ok=True)
    for img, fid, b in zip(data.images, data.ids, data.base_ids):
        buf = io.BytesIO()
        # no timestamps or other metadata in the PNG: same data, same bytes
        Image.fromarray(img[:, :, 0], mode="L").save(buf, format="PNG", optimize=False)
        (train / f"{fid}.png").write_bytes(buf.getvalue())
        (train / f"{fid}.txt").write_text(data.captions[b] + "\n", encoding="utf-8")
    rows = [
        {"base_id": b, "caption": data.captions[b], "copies": data.copies[b], "planted": b in data.planted}
        for b in sorted(data.copies)
    ]
    with open(root / "ground_truth.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["base_id", "caption", "copies", "planted"])
        w.writeheader()
        w.writerows(rows)
    cfg = asdict(data.config)
    cfg["counts"] = list(cfg["counts"])
    (root / "ground_truth.json").write_text(json.dumps({"recipe": cfg, "images": rows}, indent=1))
    return root
