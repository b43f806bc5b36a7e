"""Per-sample seeds derived from (run seed, prompt id, sample index).

Any single generation can be reproduced alone, on any runner, in any shard order, and a resumed
run regenerates exactly the images an uninterrupted run would have made.
"""

from __future__ import annotations

import hashlib


def derive_seed(run_seed: int, prompt_id: str, index: int) -> int:
    """A 63-bit seed from blake2b(run_seed, prompt_id, index); stable across platforms.

    Examples
    --------
    >>> derive_seed(0, "p1", 3) == derive_seed(0, "p1", 3) != derive_seed(0, "p1", 4)
    True
    """
    key = f"{int(run_seed)}\x1f{prompt_id}\x1f{int(index)}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def derive_seeds(run_seed: int, prompt_id: str, start: int, stop: int) -> list[int]:
    """Seeds of samples ``start .. stop - 1`` of one prompt."""
    return [derive_seed(run_seed, prompt_id, i) for i in range(start, stop)]


def numpy_seed(seed: int) -> int:
    """``seed`` as numpy's (and scikit-learn's) generators take it: a non-negative seed unchanged,
    a negative one mapped to ``derive_seed(seed, "numpy", 0)`` (any integer is a valid ``--seed``).

    Examples
    --------
    >>> numpy_seed(7), numpy_seed(-1) == derive_seed(-1, "numpy", 0)
    (7, True)
    """
    seed = int(seed)
    return seed if seed >= 0 else derive_seed(seed, "numpy", 0)
