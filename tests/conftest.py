import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memscan.synthetic import write_training_set

TESTS = Path(__file__).parent


@pytest.fixture(scope="session")
def synth_train(tmp_path_factory) -> Path:
    """120 synthetic 32×32 RGB training images t0000..t0119 with captions."""
    root = tmp_path_factory.mktemp("synth") / "train"
    write_training_set(root, 120, size=32)
    return root


def shard_log_counts(log: str, n_shards: int) -> dict[int, tuple[int, int]]:
    """For each shard: how many times ``run.log`` says it was committed, and how many times a
    resume says it kept it (``resume: kept 3 shards committed earlier (0-1, 4)``).

    A process killed between a shard's commit and its log line leaves no "committed" line; the
    resume that keeps the shard names it instead.
    """
    kept: list[int] = []
    for group in re.findall(r"resume: kept \d+ shards? committed earlier \(([^)]*)\)", log):
        for part in group.split(", "):
            a, _, b = part.partition("-")
            kept += range(int(a), int(b or a) + 1)
    return {s: (log.count(f"shard {s} committed"), kept.count(s)) for s in range(n_shards)}


def assert_committed_once(log: str, n_shards: int) -> None:
    """Every shard was committed exactly once: one "committed" line, or none and a resume that
    kept it (its commit's process was killed before the line); never two commits."""
    for s, (commits, kept) in shard_log_counts(log, n_shards).items():
        assert commits == 1 or (commits == 0 and kept >= 1), (s, commits, kept, log)


def run_cli(*args, check=True, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run ``memscan`` as a user would (python -m memscan.cli)."""
    full_env = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "memscan.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"memscan {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """8 members, 8 held-out 8×8 digits; the demo recipe, 200 steps of 8 (≈ 5–15 s on 1 idle core).

    Trained once per test session and shared by tests/test_mia_loss.py and tests/test_inpaint.py.
    Returns (images, is_member, model directory).
    """
    import numpy as np
    from sklearn.datasets import load_digits

    from memscan.demo.shadow_recipe import DemoRecipe, shadow_train_config

    raw = load_digits().images
    imgs = np.clip(raw * 255 / 16, 0, 255).round().astype(np.uint8)[:, :, :, None]
    imgs = imgs[np.random.default_rng(0).permutation(len(imgs))[:16]]
    d = tmp_path_factory.getbasetemp() / "mia-tiny-8x8-model"
    if not d.is_dir():
        tmp = d.with_name(d.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        cfg = shadow_train_config(steps=200, batch_size=8, block_out_channels=(16, 32), warmup=20)
        DemoRecipe(cfg, threads=1)(imgs[:8], tmp)
        tmp.rename(d)
    return imgs, np.arange(16) < 8, d


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """One local Ray (2 CPUs, as CI has) shared by every test that needs it: (address, victims dir).

    tests/ reaches the workers through PYTHONPATH, set before Ray starts; ``MEMSCAN_TEST_DELAY``
    slows ``py:gen_support:slow`` in the workers so that a test can kill one mid-shard.
    """
    ray = pytest.importorskip("ray")
    victims = tmp_path_factory.mktemp("victims")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "MEMSCAN_TEST_DELAY")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), saved["PYTHONPATH"]) if p)
    os.environ["MEMSCAN_TEST_DELAY"] = "0.1"
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield ray.get_runtime_context().gcs_address, victims
    ray.shutdown()
