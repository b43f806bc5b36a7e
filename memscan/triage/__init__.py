"""Cheap triage scores for text-to-image prompts (Wen et al. ICLR 2024; Webster 2023).

A few UNet evaluations per prompt rank which prompts deserve the full extraction attack; see
:mod:`memscan.triage.scores` for the formulas and :mod:`memscan.triage.run` for the run
directory ``memscan triage`` writes.
"""

from memscan.triage.run import FULL_ATTACK, TriageResult, read_scores, select_ranked, triage
from memscan.triage.scores import (
    SCORE_DEFINITIONS,
    SCORES,
    SDXLTriageModel,
    TriageConfig,
    TriageModel,
    score_prompts,
    unet_evaluations_by_score,
    unet_evaluations_per_prompt,
)

__all__ = [
    "FULL_ATTACK",
    "SCORES",
    "SCORE_DEFINITIONS",
    "TriageConfig",
    "TriageModel",
    "SDXLTriageModel",
    "TriageResult",
    "read_scores",
    "score_prompts",
    "select_ranked",
    "triage",
    "unet_evaluations_by_score",
    "unet_evaluations_per_prompt",
]
