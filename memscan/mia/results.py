"""What the membership-inference run functions return: the run directory, its manifest and its
tables as DataFrames (the same tables the run wrote)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.mia.memscore import MemorizationResult

__all__ = ["MemscoreResult", "MiaResult"]


@dataclass
class MiaResult:
    """A finished ``mia``, ``inpaint`` or ``demo-mia`` run (:func:`memscan.mia.statistic_run.run_mia`,
    :func:`~memscan.mia.statistic_run.run_inpaint`).

    Attributes
    ----------
    run_dir : Path
    manifest : dict
        As written to ``manifest.json`` (kind, sources, settings, counts, ``best_timestep``,
        ``skipped_attacks``, timings).
    examples, scores, metrics : pandas.DataFrame
        ``examples.parquet``, ``scores.parquet``, ``metrics.parquet``.
    losses : pandas.DataFrame or None
        ``losses.parquet`` (runs with the diffusion loss).
    distances : pandas.DataFrame or None
        ``distances.parquet`` (runs with the inpainting attack).
    report : Path
        ``report.html``.
    """

    run_dir: Path
    manifest: dict
    examples: pd.DataFrame
    scores: pd.DataFrame
    metrics: pd.DataFrame
    losses: pd.DataFrame | None
    distances: pd.DataFrame | None
    report: Path


@dataclass
class MemscoreResult:
    """A finished ``memscore`` run (:func:`memscan.mia.memscore_run.run_memscore`).

    Attributes
    ----------
    run_dir : Path
    manifest : dict
    table : pandas.DataFrame
        ``memscore.parquet``: index, id, score, u, v, n_in, n_out.
    result : MemorizationResult
        The scores with their quantiles.
    shown : numpy.ndarray of int
        Indices of the most memorized examples (highest score first), as the report shows them.
    report : Path
    """

    run_dir: Path
    manifest: dict
    table: pd.DataFrame
    result: MemorizationResult
    shown: np.ndarray
    report: Path
