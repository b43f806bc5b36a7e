import os
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
