"""memscan: find the training data a generative model has memorized, and measure how much.

Core: the black-box extraction attack of Carlini et al., "Extracting Training Data from Diffusion
Models" (USENIX Security 2023) — generate many images per prompt, find cliques of near-copies
under tiled ℓ2, and verify them against the training set.

The public API, grouped: configs (every parameter of a run), run functions (each writes a run
directory and returns its result type), result types, inputs and models, kernels (the papers'
measures on arrays), errors. Subpackages hold the rest, in data-flow order: ``data`` (training
sets, prompts, duplicate counts) → ``generators`` → ``extraction`` (detect, verify, unconditional
extraction) with ``index`` (embeddings, FAISS, nearest search) → ``mia`` / ``triage`` → ``report``;
``runners`` run the stages, ``store`` holds the run directory.
"""

# isort: split
# --- configs: every threshold and parameter of a run, recorded in its manifest -----------------
from memscan.data.duplicates import DuplicateConfig
from memscan.extraction.config import ExtractConfig
from memscan.extraction.unconditional import UnconditionalConfig
from memscan.mia.inpaint import InpaintConfig
from memscan.mia.loss import LossConfig
from memscan.triage import TriageConfig

# isort: split
# --- run functions: each writes (or reads) a run directory and returns its result -------------
from memscan.data.duplicates import count_duplicates, select_candidates
from memscan.extraction.pipeline import extract, reverify
from memscan.extraction.unconditional import extract_unconditional
from memscan.index import build_index
from memscan.mia.memscore import memorization_score
from memscan.mia.shadow import train_shadow_models
from memscan.report.registry import build_report
from memscan.triage import select_ranked
from memscan.triage import triage as triage_prompts  # `memscan.triage` stays the subpackage

# isort: split
# --- result types -------------------------------------------------------------------------
from memscan.cliques import CliqueResult
from memscan.data.duplicates import CandidateResult, DuplicateCounts
from memscan.data.training import TrainingSet
from memscan.extraction.calibrated import CalibratedResult
from memscan.extraction.detect import Detection
from memscan.extraction.pipeline import ExtractionResult
from memscan.extraction.unconditional import UnconditionalResult

# isort: split
# --- inputs and models: training sets, prompts, generators, noise predictors, embedders -------
from memscan.data.prompts import load_prompts
from memscan.data.training import load_training_set
from memscan.generators.base import CallableGenerator, Generator
from memscan.generators.load import as_generator, load_generator
from memscan.generators.seeds import derive_seed
from memscan.index import PixelEmbedder, TrainingIndex, load_embedder
from memscan.lm.corpus_index import CorpusIndex
from memscan.mia.noise import as_noise_predictor, load_noise_predictor

# isort: split
# --- kernels: the measures of the papers, on arrays -----------------------------------------
from memscan.cliques import largest_clique
from memscan.distances import (
    cross_tiled_l2,
    l2,
    nearest_tiled_l2,
    pairwise_tiled_l2,
    pairwise_tiled_l2_many,
    tiled_l2,
)
from memscan.extraction.calibrated import calibrated_distance
from memscan.extraction.detect import detect, detect_many
from memscan.index import nearest_pixels
from memscan.mia.inpaint import inpaint_distances
from memscan.mia.loss import diffusion_loss, timestep_sweep
from memscan.mia.metrics import roc_metrics

# isort: split
# --- errors -----------------------------------------------------------------------------------
from memscan.errors import InputError, MemscanError


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("memscan")
    except md.PackageNotFoundError:  # a checkout that was never installed
        return "0.0.0+unknown"


__version__ = _version()

__all__ = [
    # configs
    "DuplicateConfig",
    "ExtractConfig",
    "InpaintConfig",
    "LossConfig",
    "TriageConfig",
    "UnconditionalConfig",
    # run functions
    "build_index",
    "build_report",
    "count_duplicates",
    "extract",
    "extract_unconditional",
    "memorization_score",
    "reverify",
    "select_candidates",
    "select_ranked",
    "train_shadow_models",
    "triage_prompts",
    # result types
    "CalibratedResult",
    "CandidateResult",
    "CliqueResult",
    "Detection",
    "DuplicateCounts",
    "ExtractionResult",
    "TrainingSet",
    "UnconditionalResult",
    # inputs and models
    "CallableGenerator",
    "CorpusIndex",
    "Generator",
    "PixelEmbedder",
    "TrainingIndex",
    "as_generator",
    "as_noise_predictor",
    "derive_seed",
    "load_embedder",
    "load_generator",
    "load_noise_predictor",
    "load_prompts",
    "load_training_set",
    # kernels
    "calibrated_distance",
    "cross_tiled_l2",
    "detect",
    "detect_many",
    "diffusion_loss",
    "inpaint_distances",
    "l2",
    "largest_clique",
    "nearest_pixels",
    "nearest_tiled_l2",
    "pairwise_tiled_l2",
    "pairwise_tiled_l2_many",
    "roc_metrics",
    "tiled_l2",
    "timestep_sweep",
    # errors
    "InputError",
    "MemscanError",
]
