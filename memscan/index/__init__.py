"""Training sets at scale: embeddings, a FAISS index and nearest-neighbour search.

- :mod:`memscan.index.embedders` — images → L2-normalised vectors (pixel, TorchScript, ONNX, open_clip);
- :mod:`memscan.index.faiss_index` — build / save / load / query an index (flat, IVF, HNSW);
- :mod:`memscan.index.nearest` — exact nearest training images by ℓ2 / tiled ℓ2 over pixels;
- :mod:`memscan.index.source` — streaming decoder of a training-set listing, in batches.

Their users live by stage: duplicate counts in :mod:`memscan.data.duplicates`, the calibrated
rule and unconditional extraction in :mod:`memscan.extraction.calibrated` and
:mod:`memscan.extraction.unconditional`.
"""

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

__all__ = [
    "Embedder",
    "IndexParams",
    "Neighbours",
    "OnnxEmbedder",
    "OpenCLIPEmbedder",
    "PixelEmbedder",
    "PixelSearch",
    "TorchScriptEmbedder",
    "TrainingIndex",
    "build_index",
    "load_embedder",
    "nearest_pixels",
    "pixel_distances",
]
