"""User code that fails, for tests/test_user_code_errors.py (loaded as ``py:user_code_support:<name>``).

The failure is switched by environment variables, so "fixing the bug" is unsetting them.
"""

import os

import numpy as np
from gen_support import planted

from memscan.errors import InputError


def _raise(what: str):
    kind = os.environ.get("MEMSCAN_TEST_FAIL_KIND", "RuntimeError")
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if kind == "InputError":
        raise InputError(f"the user's model refuses {what}", "the user's own hint")
    if kind == "oom":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nGPU 0 has a total capacity of 8 GiB")
    raise RuntimeError(f"simulated bug in the user's model on {what}")


def fails_on_prompt():
    """A ``py:`` factory: the planted generator as a plain function that raises on the prompt
    named by ``MEMSCAN_TEST_FAIL_PROMPT`` (unset: the bug is fixed)."""
    gen = planted()

    def sample(prompt, seeds):
        if prompt == os.environ.get("MEMSCAN_TEST_FAIL_PROMPT"):
            _raise(repr(prompt))
        return gen.generate(prompt, seeds)

    return sample


def fails_on_seed():
    """The planted generator, raising when the batch holds the seed ``MEMSCAN_TEST_FAIL_SEED``."""
    gen = planted()

    def sample(prompt, seeds):
        bad = os.environ.get("MEMSCAN_TEST_FAIL_SEED")
        if bad is not None and int(bad) in seeds:
            _raise(f"seed {bad}")
        return gen.generate(prompt, seeds)

    return sample


def changes_size_on_prompt():
    """The planted generator, returning half-size images for the prompt named by
    ``MEMSCAN_TEST_SMALL_PROMPT`` (a model whose output size changes between prompts)."""
    gen = planted()

    def sample(prompt, seeds):
        out = gen.generate(prompt, seeds)
        return out[:, ::2, ::2] if prompt == os.environ.get("MEMSCAN_TEST_SMALL_PROMPT") else out

    return sample


class AlwaysRaises:
    """A generator object (declares its output shape, so no probe call) whose every call raises."""

    output_shape = (32, 32, 3)

    def generate(self, prompt, seeds):
        _raise(repr(prompt))


def always_raises():
    return AlwaysRaises()


class _FailingPredictor:
    """The memorizing noise predictor of the golden inputs, with a bug that fires after
    ``MEMSCAN_TEST_FAIL_AFTER`` calls while ``MEMSCAN_TEST_FAIL=1`` (so the first shard can commit
    before it fails)."""

    def __init__(self):
        from golden_support import MemorizingPredictor

        self.inner = MemorizingPredictor()
        self.alphas_cumprod = self.inner.alphas_cumprod
        self.calls = 0

    def predict_noise(self, x_t, t, condition=None):
        self.calls += 1
        if os.environ.get("MEMSCAN_TEST_FAIL") == "1" and self.calls > int(
            os.environ.get("MEMSCAN_TEST_FAIL_AFTER", 1)
        ):
            raise ZeroDivisionError("bug in the user's noise predictor")
        return self.inner.predict_noise(x_t, t, condition)


def failing_predictor():
    """``py:user_code_support:failing_predictor`` for `memscan mia` / `inpaint`."""
    return _FailingPredictor()


def failing_train(d):
    """``py:user_code_support:failing_train`` for `memscan memscore`: fails while
    ``MEMSCAN_TEST_FAIL=1`` on every fold but the first."""
    global _TRAINED
    _TRAINED += 1
    if os.environ.get("MEMSCAN_TEST_FAIL") == "1" and _TRAINED > 1:
        raise ValueError("bug in the user's train function")
    return float(np.mean(d)), float(np.var(d))


_TRAINED = 0
