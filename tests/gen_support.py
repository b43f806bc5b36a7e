"""Generators used by the CLI tests (loaded as ``py:gen_support:<name>``; tests/ is on PYTHONPATH)."""

import os
import time

import numpy as np

from memscan.synthetic import SyntheticGenerator

#: Prompts "copy t0003" etc. are memorized; "fresh N" prompts are not.
MEMORIZED = {f"copy t{i:04d}": f"t{i:04d}" for i in (3, 17, 42, 64, 99)}


def planted():
    """Factory: the synthetic generator with five memorized training images."""
    return SyntheticGenerator(MEMORIZED, size=32, copy_rate=0.4, noise=0.015)


def slow():
    """Like planted, but each call sleeps (so a test can kill the process mid-run)."""
    gen = planted()
    delay = float(os.environ.get("MEMSCAN_TEST_DELAY", "0.05"))

    def fn(prompt, seeds):
        time.sleep(delay)
        return gen.generate(prompt, seeds)

    return fn


def wrong_shape(prompt, seeds):
    return np.zeros((len(seeds), 32, 32), np.uint8)


def nan_output(prompt, seeds):
    return np.full((len(seeds), 32, 32, 3), np.nan, np.float32)


def wrong_dtype(prompt, seeds):
    return np.zeros((len(seeds), 32, 32, 3), np.int64)


def tiny_unet(size=8, channels=3, blocks=(8, 16), groups=4, classes=None, seed=0):
    """A tiny two-level ``UNet2DModel`` built from config (no downloads), seeded."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(blocks),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=groups,
        num_class_embeds=classes,
    )


def unconditional16():
    """Factory: an unconditional 16×16 synthetic generator that copies t0007 a quarter of the time."""
    return SyntheticGenerator({"": "t0007"}, size=16, copy_rate=0.25)


def planted_other():
    """Factory: another model of the same output shape as :func:`planted` (other memorized images),
    for the tests that resume a run with a different model."""
    return SyntheticGenerator({f"copy t{i:04d}": f"t{i + 1:04d}" for i in (3, 17, 42, 64, 99)}, size=32, copy_rate=0.4)


def unconditional16_other():
    """Factory: another unconditional 16×16 generator (copies t0009), for the resume-refusal tests."""
    return SyntheticGenerator({"": "t0009"}, size=16, copy_rate=0.25)
