"""Generators and stage functions for the Ray runner tests (no tests here).

Loaded inside Ray workers as ``py:test_ray_support:<name>``; tests/ reaches the workers through
PYTHONPATH (set before the test cluster starts).
"""

import os
import time
from pathlib import Path

from gen_support import planted

from memscan.errors import InputError


def victim():
    """``planted``'s images, but the first worker to meet the victim prompt announces its pid in
    ``$MEMSCAN_VICTIM_DIR/victim.pid`` and waits there (mid-shard) until the test kills it.

    Later attempts at the prompt (a claim file exists) generate at once, so a retried shard
    finishes with the same images as an uninterrupted run.
    """
    gen = planted()
    folder = Path(os.environ["MEMSCAN_VICTIM_DIR"])
    victim_prompt = os.environ.get("MEMSCAN_VICTIM_PROMPT", "fresh 4")

    def fn(prompt, seeds):
        if prompt == victim_prompt:
            try:
                fd = os.open(folder / "victim.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                tmp = folder / f".victim.pid.{os.getpid()}"
                tmp.write_text(str(os.getpid()))
                os.replace(tmp, folder / "victim.pid")
                deadline = time.time() + 60
                while time.time() < deadline:  # the test kills this process here
                    time.sleep(0.02)
        return gen.generate(prompt, seeds)

    return fn


def offset_setup(offset):
    """A worker's one-time setup for the generic map_shards test."""
    return {"offset": offset, "pid": os.getpid()}


def square_stage(ctx, x):
    """A stage: x² + offset; a negative x is bad input."""
    if x < 0:
        raise InputError(f"x={x} is negative", "pass x ≥ 0")
    return x * x + ctx["offset"]
