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
- :mod:`memscan.mia.run` — run directories and reports for the CLI.
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
from memscan.mia.shadow import DemoRecipe, ShadowModels, load_shadow_models, shadow_membership, train_shadow_models

__all__ = [
    "CallableNoisePredictor",
    "DemoRecipe",
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
