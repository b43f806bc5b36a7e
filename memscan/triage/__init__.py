"""Cheap triage scores for text-to-image prompts (Wen et al. ICLR 2024; Webster 2023).

A few denoising steps per prompt rank which prompts deserve the full extraction attack; see
:mod:`memscan.triage.scores` for the formulas and :mod:`memscan.triage.run` for the run
directory ``memscan triage`` writes.
"""

from memscan.triage.run import FULL_ATTACK, TriageResult, read_scores, select_ranked, triage
from memscan.triage.scores import SCORES, SDXLTriageModel, TriageConfig, TriageModel, score_prompts

__all__ = [
    "FULL_ATTACK",
    "SCORES",
    "TriageConfig",
    "TriageModel",
    "SDXLTriageModel",
    "TriageResult",
    "read_scores",
    "score_prompts",
    "select_ranked",
    "triage",
]
