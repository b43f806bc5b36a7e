"""Membership inference and memorization measures.

- :mod:`memscan.mia.metrics` — ROC curve, AUC, balanced accuracy, TPR at low FPR (Carlini et
  al. 2022), bootstrap intervals, log-log ROC plots, results tables;
- :mod:`memscan.mia.attacks` — loss threshold and LiRA online/offline on per-example losses;
- :mod:`memscan.mia.memscore` — memorization score of van den Burg & Williams (2021);
- :mod:`memscan.mia.noise` — the noise-prediction protocol ε_θ(x_t, t, condition) (diffusers
  UNets + scheduler, or a callable);
- :mod:`memscan.mia.loss` — the diffusion loss L_t(x) and the timestep sweep;
- :mod:`memscan.mia.shadow` — shadow models on random halves, resumable per model;
- :mod:`memscan.mia.inpaint` — the inpainting attack (RePaint);
- :mod:`memscan.mia.inputs` — the examples, target, members and shadow models of a run;
- :mod:`memscan.mia.attack_labels` — the ``--attacks`` labels and running them on a statistic;
- :mod:`memscan.mia.statistic_run` — ``run_mia``, ``run_inpaint``: one shared run over a
  per-example statistic (diffusion loss, inpainting distance);
- :mod:`memscan.mia.memscore_run` — ``run_memscore``;
- :mod:`memscan.mia.tables`, :mod:`memscan.mia.run_dir`, :mod:`memscan.mia.results` — the run's
  tables, its directory and the result types (the report: :mod:`memscan.report.mia`; the demo:
  :mod:`memscan.demo.mia`).
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
from memscan.mia.inpaint import InpaintConfig, InpaintResult, inpaint_distances, inpaint_mask, repaint
from memscan.mia.loss import LossConfig, TimestepSweep, diffusion_loss, timestep_sweep
from memscan.mia.memscore import MemorizationResult, fold_assignment, memorization_score
from memscan.mia.metrics import (
    AttackResult,
    AttackResultsTable,
    RocResult,
    plot_roc,
    roc_metrics,
    tpr_key,
)
from memscan.mia.noise import (
    CallableNoisePredictor,
    DiffusersNoisePredictor,
    NoisePredictor,
    as_noise_predictor,
    load_noise_predictor,
)
from memscan.mia.results import MemscoreResult, MiaResult
from memscan.mia.shadow import ShadowModels, load_shadow_models, shadow_membership, train_shadow_models

__all__ = [
    "MemscoreResult",
    "MiaResult",
    "CallableNoisePredictor",
    "DiffusersNoisePredictor",
    "InpaintConfig",
    "InpaintResult",
    "LossConfig",
    "NoisePredictor",
    "ShadowModels",
    "TimestepSweep",
    "as_noise_predictor",
    "diffusion_loss",
    "inpaint_distances",
    "inpaint_mask",
    "load_noise_predictor",
    "load_shadow_models",
    "repaint",
    "shadow_membership",
    "timestep_sweep",
    "train_shadow_models",
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
