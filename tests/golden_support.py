"""Inputs and command lines of the golden-output tables (shared by scripts/make_golden.py and
tests/test_golden.py, so that the saved tables and the rerun can never drift apart).

Every command runs through the CLI as a user runs it (``python -m memscan.cli ...`` in a
subprocess, one thread, tests/ on ``PYTHONPATH`` for the ``py:`` models), on small deterministic
inputs built here from fixed seeds. Nothing here imports memscan internals: the inputs are made
with numpy / PIL, the synthetic generator of tests/gen_support.py, and diffusers (the tiny UNet
saved with ``save_pretrained``), so the refactor cannot move anything this file depends on.

``SPECS[command]`` holds the command line and the tables compared (paths relative to its output);
``EXCLUDED`` the columns left out of the comparison (none today; see scripts/make_golden.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
GOLDEN_DIR = TESTS / "data" / "golden"
TINY_SD = TESTS / "data" / "tiny_sd_memorized"

COMMANDS = (
    "extract",
    "verify",
    "extract-unconditional",
    "index",
    "candidates",
    "triage",
    "mia",
    "inpaint",
    "memscore",
)

#: table → columns left out of the comparison, with the reason. Tables hold no timings by design;
#: a column is listed here only if it legitimately differs between two runs of the same inputs.
EXCLUDED: dict[str, dict[str, str]] = {}

# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

#: extract / verify / extract-unconditional: the planted generator of tests/gen_support.py
EXTRACT_PROMPTS = ["copy t0003", "copy t0017", "fresh 0", "copy t0042", "fresh 1", "fresh 2"]
TRAIN_SIZE, TRAIN_N = 32, 100

#: mia / inpaint: 16 examples of 8×8 RGB, the first 8 members
MIA_N, MIA_SIDE, MIA_MEMBERS = 16, 8, 8

#: memscore: a 1-D Gaussian fitted per fold; the last example is an outlier (most memorized)
MEMSCORE_X = [float(v) for v in np.r_[np.linspace(-1, 1, 15), 6.0]]

#: triage: prompts for the tiny SD pipeline (its memorized caption first, then unrelated ones)
TRIAGE_UNSEEN = ["a yellow tram", "two cats", "a quiet harbour"]


def _smooth(rng: np.random.Generator, side: int, channels: int = 3) -> np.ndarray:
    """A smooth random uint8 image (a coarse grid upsampled), made from ``rng`` alone."""
    coarse = rng.uniform(0, 255, (4, 4, channels))
    rep = side // 4
    return np.kron(coarse, np.ones((rep, rep, 1))).round().astype(np.uint8)


def mia_images() -> np.ndarray:
    """The mia / inpaint examples (N×8×8×3 uint8), from a fixed seed."""
    rng = np.random.default_rng(12)
    return np.stack([_smooth(rng, MIA_SIDE) for _ in range(MIA_N)])


def mia_ids() -> list[str]:
    return [f"ex{i:02d}" for i in range(MIA_N)]


class MemorizingPredictor:
    """``py:golden_support:memorizing_predictor``: a noise predictor that has memorized the member
    images: ``ε̂ = (x_t − sqrt(ᾱ_t)·m) / sqrt(1 − ᾱ_t)`` with ``m`` the member nearest to
    ``x_t / sqrt(ᾱ_t)`` (model space, [-1, 1]). Members get lower loss and better inpaintings."""

    def __init__(self):
        import torch

        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        members = mia_images()[:MIA_MEMBERS].astype(np.float32) / 127.5 - 1
        self.members = torch.from_numpy(members).permute(0, 3, 1, 2).contiguous()

    def predict_noise(self, x_t, t, condition=None):
        import torch

        a = self.alphas_cumprod.to(x_t.device)[t.long()].to(x_t.dtype).view(-1, 1, 1, 1)
        m = self.members.to(x_t.device, x_t.dtype)
        d = ((x_t / a.sqrt())[:, None] - m[None]).flatten(2).pow(2).sum(-1)
        nearest = m[torch.argmin(d, dim=1)]
        return (x_t - a.sqrt() * nearest) / (1 - a).sqrt()


def memorizing_predictor():
    return MemorizingPredictor()


def gauss_train(d):
    """``py:golden_support:gauss_train`` for memscore: fit a Gaussian."""
    return float(np.mean(d)), float(np.var(d))


def gauss_loglik(model, d):
    mu, var = model
    return -0.5 * np.log(2 * np.pi * var) - 0.5 * (np.asarray(d, np.float64) - mu) ** 2 / var


def _write_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(img).save(path)


def _write_candidates_train(root: Path) -> None:
    """Duplicate groups for `candidates`: 3 groups (3, 2, 2 copies, one copy slightly brightened)
    and 8 unique images, 32×32."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(7)
    groups = {"a": 3, "b": 2, "c": 2}
    for g, n in groups.items():
        base = _smooth(rng, 32)
        for k in range(n):
            img = base if k == 0 else np.clip(base.astype(np.int16) + 2 * k, 0, 255).astype(np.uint8)
            _write_png(root / f"{g}{k}.png", img)
            (root / f"{g}{k}.txt").write_text(f"caption of {g}")
    for i in range(8):
        _write_png(root / f"u{i:02d}.png", _smooth(rng, 32))
        (root / f"u{i:02d}.txt").write_text(f"unique {i}")


def _write_tiny_unet(out: Path) -> None:
    """An untrained, seeded 8×8 RGB UNet2DModel and a DDPM scheduler, saved with save_pretrained."""
    from diffusers import DDPMScheduler
    from gen_support import tiny_unet

    tiny_unet(size=MIA_SIDE, channels=3, blocks=(8, 16), groups=4, seed=0).save_pretrained(
        out / "unet", safe_serialization=True
    )
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(out / "scheduler")


def build_inputs(work: Path) -> dict[str, Path]:
    """Write every input under ``work``; returns name → path."""
    if str(TESTS) not in sys.path:  # gen_support, for the tiny UNet
        sys.path.insert(0, str(TESTS))
    from memscan.synthetic import write_training_set

    work.mkdir(parents=True, exist_ok=True)
    p: dict[str, Path] = {}
    p["train"] = work / "train"
    write_training_set(p["train"], TRAIN_N, size=TRAIN_SIZE)
    p["prompts"] = work / "prompts.txt"
    p["prompts"].write_text("\n".join(EXTRACT_PROMPTS) + "\n")
    p["dups"] = work / "dups"
    _write_candidates_train(p["dups"])
    p["mia_data"] = work / "mia_data"
    p["mia_data"].mkdir()
    for i, img in zip(mia_ids(), mia_images()):
        _write_png(p["mia_data"] / f"{i}.png", img)
    p["members"] = work / "members.txt"
    p["members"].write_text("\n".join(mia_ids()[:MIA_MEMBERS]) + "\n")
    p["unet"] = work / "tiny_unet"
    _write_tiny_unet(p["unet"])
    p["memscore_x"] = work / "x.npy"
    np.save(p["memscore_x"], np.asarray(MEMSCORE_X))
    meta = json.loads((TINY_SD / "memscan.json").read_text())
    p["triage_prompts"] = work / "triage_prompts.txt"
    ft = meta["finetune"]
    triage_prompts = [ft["memorized"][0]["caption"], ft["other_captions"][3], *TRIAGE_UNSEEN]
    p["triage_prompts"].write_text("\n".join(triage_prompts) + "\n")
    return p


#: what build_inputs writes, recorded in each inputs.json
INPUTS_DESCRIPTION = {
    "train": f"memscan.synthetic.write_training_set(train, {TRAIN_N}, size={TRAIN_SIZE}): t0000..t{TRAIN_N - 1:04d}",
    "prompts": EXTRACT_PROMPTS,
    "dups": "3 duplicate groups (a: 3, b: 2, c: 2 copies, brightened by 2 per copy) + 8 unique, 32×32, seed 7",
    "mia_data": f"{MIA_N} smooth 8×8 RGB PNGs ex00..ex{MIA_N - 1:02d}, seed 12; members: the first {MIA_MEMBERS}",
    "unet": "gen_support.tiny_unet(size=8, channels=3, blocks=(8, 16), seed=0) untrained + DDPMScheduler(1000)",
    "memscore_x": MEMSCORE_X,
    "triage_prompts": "tiny_sd_memorized's memorized caption, its other_captions[3], then " + ", ".join(TRIAGE_UNSEEN),
}


def source_commit() -> str:
    """The last commit that changed memscan/ (the code the tables were made from; ``+dirty`` with
    uncommitted changes there)."""
    try:
        head = subprocess.run(
            ["git", "log", "-1", "--format=%H", "--", "memscan"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "memscan"], cwd=ROOT, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


def run_cli(*args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m memscan.cli ARGS`` in a subprocess: the repository's memscan, tests/ importable
    (for ``py:gen_support:…`` and ``py:golden_support:…``), one thread (bit-stable floats)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "memscan.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"memscan {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


#: command → the command line (with {placeholders} for paths), the tables it writes (relative to
#: its output), and what it depends on.
@dataclass(frozen=True)
class Spec:
    args: tuple[str, ...]
    tables: tuple[str, ...]
    needs: tuple[str, ...] = field(default=())


SPECS: dict[str, Spec] = {
    "extract": Spec(
        (
            "extract", "--model", "py:gen_support:planted", "--prompts", "{prompts}", "--train", "{train}",
            "--out", "{out}", "--samples-per-prompt", "40", "--shard-size", "2", "--batch-size", "20",
            "--min-clique", "8", "--seed", "3", "--quiet",
        ),
        ("prompts.parquet", "detections.parquet", "extractions.parquet"),
    ),
    # a copy of the extract run, re-verified with a tighter delta
    "verify": Spec(
        ("verify", "{out}", "--delta", "0.05", "--n-nearest", "3"),
        ("prompts.parquet", "detections.parquet", "extractions.parquet"),
        ("extract",),
    ),
    "extract-unconditional": Spec(
        (
            "extract-unconditional", "--model", "py:gen_support:planted", "--train", "{train}", "--samples", "32",
            "--out", "{out}", "--prompt", "copy t0003", "--n-nearest", "10", "--shard-size", "16",
            "--batch-size", "16", "--seed", "1", "--quiet",
        ),
        ("extractions.parquet", "generations.parquet"),
    ),
    "index": Spec(
        ("index", "{dups}", "--out", "{out}", "--embedder", "pixel:8", "--index-type", "flat", "--quiet"),
        ("ids.parquet", "embeddings.npy"),
    ),
    "candidates": Spec(
        ("candidates", "{dups}", "--top", "4", "--out", "{out}/prompts.parquet", "--index", "{index}", "--quiet"),
        ("prompts.parquet", "prompts.duplicates.parquet", "prompts.pairs.parquet"),
        ("index",),
    ),
    "triage": Spec(
        (
            "triage", "--model", "{tiny_sd}", "--prompts", "{triage_prompts}", "--out", "{out}", "--generations", "2",
            "--num-inference-steps", "10", "--guidance-scale", "3.0", "--top", "3", "--seed", "5", "--quiet",
        ),
        ("scores.parquet", "prompts.csv"),
    ),
    "mia": Spec(
        (
            "mia", "--data", "{mia_data}", "--model", "{unet}", "--members", "{members}", "--out", "{out}",
            "--timesteps", "10,100,500", "--noise-draws", "2", "--flip", "--bootstrap", "20", "--seed", "2",
            "--threads", "1", "--quiet",
        ),
        ("examples.parquet", "losses.parquet", "scores.parquet", "metrics.parquet"),
    ),
    "inpaint": Spec(
        (
            "inpaint", "--data", "{mia_data}", "--model", "py:golden_support:memorizing_predictor",
            "--members", "{members}", "--out", "{out}", "--region", "left", "--steps", "10", "--jump-length", "2",
            "--jump-n-sample", "2", "--samples", "2", "--bootstrap", "20", "--seed", "4", "--threads", "1", "--quiet",
        ),
        ("examples.parquet", "distances.parquet", "scores.parquet", "metrics.parquet"),
    ),
    "memscore": Spec(
        (
            "memscore", "--data", "{memscore_x}", "--train-fn", "py:golden_support:gauss_train",
            "--log-likelihood-fn", "py:golden_support:gauss_loglik", "--folds", "4", "--repeats", "2", "--seed", "3",
            "--out", "{out}", "--quiet",
        ),
        ("memscore.parquet",),
    ),
}  # fmt: skip


class Runner:
    """Runs the commands once each (in dependency order) under one work directory."""

    def __init__(self, work: Path):
        self.work = Path(work)
        self.inputs = build_inputs(self.work / "inputs")
        self.outputs: dict[str, Path] = {}

    def run(self, command: str) -> Path:
        """Run ``command`` (and what it needs); returns its output directory."""
        if command in self.outputs:
            return self.outputs[command]
        spec = SPECS[command]
        for dep in spec.needs:
            self.run(dep)
        out = self.work / "runs" / command
        out.parent.mkdir(parents=True, exist_ok=True)
        if command == "verify":  # re-verify a copy of the extract run
            shutil.copytree(self.outputs["extract"], out)
        elif command == "candidates":
            out.mkdir()
        paths = {k: str(v) for k, v in self.inputs.items()}
        paths.update(out=str(out), tiny_sd=str(TINY_SD), **{k: str(v) for k, v in self.outputs.items()})
        run_cli(*(a.format(**paths) for a in spec.args))
        self.outputs[command] = out
        return out

    def tables(self, command: str) -> dict[str, Path]:
        """Table name (path relative to the command's output) → file, for the tables of ``SPECS``."""
        out = self.run(command)
        found = {t: out / t for t in SPECS[command].tables}
        missing = [t for t, f in found.items() if not f.is_file()]
        if missing:
            raise AssertionError(f"{command}: expected table(s) {missing} not written in {out}")
        return found


def read_table(path: Path) -> pd.DataFrame:
    """A saved table as a DataFrame: Parquet as is, CSV with pandas' defaults, a .npy matrix as
    one float column per matrix column (``c0``, ``c1``, …)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False)
    if path.suffix == ".npy":
        a = np.load(path, allow_pickle=False)
        a = a.reshape(len(a), -1)
        return pd.DataFrame({f"c{j}": a[:, j] for j in range(a.shape[1])})
    raise ValueError(f"unknown table format: {path}")
