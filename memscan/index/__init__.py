"""Training sets at scale: embeddings, a FAISS index, duplicate counts, unconditional extraction.

- :mod:`memscan.index.embedders` — images → L2-normalised vectors (pixel, TorchScript, ONNX, open_clip);
- :mod:`memscan.index.faiss_index` — build / save / load / query an index (flat, IVF, HNSW);
- :mod:`memscan.index.nearest` — exact nearest training images by ℓ2 / tiled ℓ2 over pixels;
- :mod:`memscan.index.duplicates` — near-duplicate counts, clusters and candidate prompts;
- :mod:`memscan.index.calibrated` — the calibrated distance of Carlini et al. (2023);
- :mod:`memscan.index.unconditional` — unconditional extraction (generate M, verify each).
"""

from memscan.index.calibrated import CalibratedConfig, CalibratedResult, calibrated_distance, calibrated_from_neighbours
from memscan.index.duplicates import (
    CandidateResult,
    DuplicateConfig,
    DuplicateCounts,
    count_duplicates,
    count_duplicates_arrays,
    select_candidates,
    top_candidates,
)
from memscan.index.embedders import (
    Embedder,
    OnnxEmbedder,
    OpenCLIPEmbedder,
    PixelEmbedder,
    TorchScriptEmbedder,
    load_embedder,
)
from memscan.index.faiss_index import IndexParams, TrainingIndex, build_index
from memscan.index.nearest import Neighbours, PixelSearch, nearest_pixels, pixel_distances
from memscan.index.unconditional import UnconditionalConfig, UnconditionalResult, extract_unconditional

__all__ = [
    "CalibratedConfig",
    "CalibratedResult",
    "CandidateResult",
    "DuplicateConfig",
    "DuplicateCounts",
    "Embedder",
    "IndexParams",
    "Neighbours",
    "OnnxEmbedder",
    "OpenCLIPEmbedder",
    "PixelEmbedder",
    "PixelSearch",
    "TorchScriptEmbedder",
    "TrainingIndex",
    "UnconditionalConfig",
    "UnconditionalResult",
    "build_index",
    "calibrated_distance",
    "calibrated_from_neighbours",
    "count_duplicates",
    "count_duplicates_arrays",
    "extract_unconditional",
    "load_embedder",
    "nearest_pixels",
    "pixel_distances",
    "select_candidates",
    "top_candidates",
]
