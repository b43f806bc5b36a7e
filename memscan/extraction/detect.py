"""Detection stage: one prompt's generations → generation graph → largest clique.

Carlini et al. 2023, §4.1: a prompt is flagged when its largest clique under tiled ℓ2 < α has at
least k members; the clique medoid is the candidate copy, ranked by the mean intra-clique
distance (lower = more confident).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memscan.cliques import CliqueResult, largest_clique
from memscan.distances import pairwise_tiled_l2


@dataclass(frozen=True)
class Detection:
    """Result of detection on one prompt."""

    clique: CliqueResult
    detected: bool
    median_pairwise: float
    min_pairwise: float

    def row(self) -> dict:
        c = self.clique
        return {
            "clique_size": int(c.size),
            "clique_upper_bound": int(c.upper_bound),
            "clique_method": c.method,
            "mean_clique_distance": float(c.mean_distance),
            "medoid_index": int(c.medoid),
            "graph_edges": int(c.n_edges),
            "median_pairwise_distance": self.median_pairwise,
            "min_pairwise_distance": self.min_pairwise,
            "detected": bool(self.detected),
        }


def detect(images, *, alpha: float, min_clique: int, grid: int = 4, max_expansions: int = 100_000) -> Detection:
    """Pairwise tiled ℓ2 of one prompt's generations, then the largest clique.

    ``images`` may be a numpy array or a torch tensor on any device (the distances are computed
    there).
    """
    d = pairwise_tiled_l2(images, grid)
    d = d.cpu().numpy() if hasattr(d, "cpu") else np.asarray(d)
    clique = largest_clique(d, alpha, max_expansions=max_expansions)
    iu = np.triu_indices(d.shape[0], 1)
    off = d[iu]
    return Detection(
        clique=clique,
        detected=clique.size >= min_clique,
        median_pairwise=float(np.median(off)) if off.size else 0.0,
        min_pairwise=float(off.min()) if off.size else 0.0,
    )
