"""Membership inference and memorization measures.

- :mod:`memscan.mia.metrics` — ROC curve, AUC, balanced accuracy, TPR at low FPR (Carlini et
  al. 2022), bootstrap intervals, log-log ROC plots, results tables;
- :mod:`memscan.mia.attacks` — loss threshold and LiRA online/offline on per-example losses;
- :mod:`memscan.mia.memscore` — memorization score of van den Burg & Williams (2021).
"""

from memscan.mia.attacks import (
    ATTACKS,
    Attack,
    AttackInputs,
    LiRAOffline,
    LiRAOnline,
    LossThreshold,
    make_attack,
)
from memscan.mia.memscore import MemorizationResult, fold_assignment, memorization_score
from memscan.mia.metrics import (
    AttackResult,
    AttackResultsTable,
    RocResult,
    plot_roc,
    roc_metrics,
    tpr_key,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackInputs",
    "AttackResult",
    "AttackResultsTable",
    "LiRAOffline",
    "LiRAOnline",
    "LossThreshold",
    "MemorizationResult",
    "RocResult",
    "fold_assignment",
    "make_attack",
    "memorization_score",
    "plot_roc",
    "roc_metrics",
    "tpr_key",
]
