"""memscan: find the training data a generative model has memorized, and measure how much.

Core: the black-box extraction attack of Carlini et al., "Extracting Training Data from Diffusion
Models" (USENIX Security 2023) — generate many images per prompt, find cliques of near-copies
under tiled ℓ2, and verify them against the training set.
"""

from memscan.cliques import CliqueResult, largest_clique
from memscan.data.duplicates import DuplicateConfig, count_duplicates, select_candidates
from memscan.data.prompts import load_prompts
from memscan.data.training import TrainingSet, load_training_set
from memscan.distances import cross_tiled_l2, l2, nearest_tiled_l2, pairwise_tiled_l2, tiled_l2
from memscan.errors import InputError, MemscanError
from memscan.extraction.calibrated import calibrated_distance
from memscan.extraction.config import ExtractConfig
from memscan.extraction.detect import Detection, detect
from memscan.extraction.pipeline import ExtractionResult, extract, reverify
from memscan.extraction.unconditional import UnconditionalConfig, extract_unconditional
from memscan.generators.base import CallableGenerator, Generator
from memscan.generators.load import as_generator, load_generator
from memscan.generators.seeds import derive_seed
from memscan.index import PixelEmbedder, TrainingIndex, build_index, load_embedder, nearest_pixels
from memscan.mia.inpaint import InpaintConfig, inpaint_distances
from memscan.mia.loss import LossConfig, diffusion_loss, timestep_sweep
from memscan.mia.memscore import memorization_score
from memscan.mia.metrics import roc_metrics
from memscan.mia.noise import as_noise_predictor, load_noise_predictor
from memscan.mia.shadow import train_shadow_models
from memscan.report.registry import build_report
from memscan.triage import TriageConfig, select_ranked
from memscan.triage import triage as triage_prompts  # `memscan.triage` stays the subpackage

__version__ = "0.1.0"

__all__ = [
    "InpaintConfig",
    "LossConfig",
    "as_noise_predictor",
    "diffusion_loss",
    "inpaint_distances",
    "load_noise_predictor",
    "memorization_score",
    "roc_metrics",
    "timestep_sweep",
    "train_shadow_models",
    "TriageConfig",
    "select_ranked",
    "triage_prompts",
    "DuplicateConfig",
    "PixelEmbedder",
    "TrainingIndex",
    "UnconditionalConfig",
    "build_index",
    "calibrated_distance",
    "count_duplicates",
    "extract_unconditional",
    "load_embedder",
    "nearest_pixels",
    "select_candidates",
    "CallableGenerator",
    "CliqueResult",
    "Detection",
    "ExtractConfig",
    "ExtractionResult",
    "Generator",
    "InputError",
    "MemscanError",
    "TrainingSet",
    "as_generator",
    "build_report",
    "cross_tiled_l2",
    "derive_seed",
    "detect",
    "extract",
    "l2",
    "largest_clique",
    "load_generator",
    "load_prompts",
    "load_training_set",
    "nearest_tiled_l2",
    "pairwise_tiled_l2",
    "reverify",
    "tiled_l2",
]
