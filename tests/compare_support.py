"""Small finished runs for the tests of ``memscan compare`` (synthetic generators, seconds)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from gen_support import MEMORIZED

from memscan.extraction.config import ExtractConfig
from memscan.extraction.pipeline import extract
from memscan.synthetic import SyntheticGenerator, write_training_set

#: Memorized prompts of each "checkpoint": later checkpoints memorize more.
STEPS = {100: 1, 1000: 4, 10000: 5}
#: Duplicate counts given to the memorized prompts (by position in MEMORIZED).
DUP = [200, 100, 50, 10, 5]


def prompt_table() -> pd.DataFrame:
    mem = list(MEMORIZED)
    fresh = [f"fresh {i}" for i in range(3)]
    return pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(len(mem) + len(fresh))],
            "prompt": mem + fresh,
            "train_id": list(MEMORIZED.values()) + [None] * len(fresh),
            "duplicate_count": DUP + [1, 1, 1],
        }
    )


def config(**over) -> ExtractConfig:
    base = {"samples_per_prompt": 16, "min_clique": 4, "shard_size": 4, "batch_size": 16, "seed": 0}
    base.update(over)
    return ExtractConfig(**base)


def extraction_runs(tmp: Path, **config_over) -> list[Path]:
    """Three extract runs of "checkpoints" 100, 1000, 10000 (their model record's training step)."""
    train = tmp / "train"
    if not train.exists():
        write_training_set(train, 120, size=32)
    runs = []
    for step, n in STEPS.items():
        gen = SyntheticGenerator(dict(list(MEMORIZED.items())[:n]), size=32, copy_rate=0.6, noise=0.01)
        model = tmp / "models" / f"checkpoint-{step}"
        model.mkdir(parents=True, exist_ok=True)
        out = tmp / f"run-{step}"
        extract(gen, prompt_table(), train, out, config(**config_over), progress=False, model_id=str(model))
        runs.append(out)
    return runs


class SamplingGenerator(SyntheticGenerator):
    """The synthetic generator with a diffusers-like record: the model's ``source`` and the
    sampler's ``num_inference_steps`` / ``guidance_scale`` (what the comparability check reads)."""

    def __init__(self, source: str, steps: int = 20, guidance: float = 1.0, memorized: int = 2):
        super().__init__(dict(list(MEMORIZED.items())[:memorized]), size=32, copy_rate=0.6, noise=0.01)
        self.config = {**self.config, "source": source, "num_inference_steps": steps, "guidance_scale": guidance}


def extract_run(out: Path, train: Path, prompts: pd.DataFrame | None = None, generator=None, model_id=None, **over):
    """One small extract run (the compare tests' runs' configuration, ``over`` on top)."""
    gen = generator or SyntheticGenerator(dict(list(MEMORIZED.items())[:2]), size=32, copy_rate=0.6, noise=0.01)
    p = prompt_table() if prompts is None else prompts
    extract(gen, p, train, out, config(**over), progress=False, model_id=model_id or str(out.parent / "model"))
    return out
