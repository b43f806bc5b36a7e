"""``memscan index TRAIN --out INDEX``: embed a training set and build its FAISS index."""

from __future__ import annotations

from pathlib import Path

import typer

from memscan.commands.common import quiet_option, resume_option, run_library_call, say


def register(app: typer.Typer) -> None:
    @app.command("index")
    def index(
        train: Path = typer.Argument(
            ...,
            help="training set: folder, CSV/Parquet manifest, webdataset .tar (or folder of them), img2dataset output",
        ),
        out: Path = typer.Option(..., "--out", help="index folder to write"),
        embedder: str = typer.Option(
            "pixel",
            "--embedder",
            help="pixel, pixel:SIZE, a TorchScript file (.pt), an .onnx file, or open_clip:MODEL:WEIGHTS",
        ),
        index_type: str = typer.Option(
            "auto",
            "--index-type",
            help="auto (flat up to 1M vectors, else ivf), flat, ivf, ivfpq (product-quantized: --pq-m bytes a "
            "vector), hnsw",
        ),
        nlist: int | None = typer.Option(None, help="IVF cells (ivf, ivfpq) [4·sqrt(N)]"),
        nprobe: int | None = typer.Option(None, help="IVF cells visited per query \\[max(8, nlist/8)]"),
        pq_m: int = typer.Option(64, "--pq-m", help="ivfpq: bytes per vector code (must divide the dimension)"),
        index_shards: int = typer.Option(
            1, "--index-shards", help="build the index in this many parts (one file each; searches are merged)"
        ),
        batch_size: int = typer.Option(256, "--batch-size", help="images decoded and embedded per step"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N (model embedders)"),
        workers: int = typer.Option(2, "--workers", help="image-decoding threads"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an index already in --out"),
        shard_size: int = typer.Option(
            8192, "--shard-size", help="training images per shard (the unit of commit and --resume)"
        ),
        resume: bool = resume_option(),
        quiet: bool = quiet_option(),
    ):
        """Embed every training image and build a FAISS index (embeddings and ids stored on disk)."""
        from memscan.index.faiss_index import IndexParams, build_index

        params = IndexParams(index_type, nlist=nlist, nprobe=nprobe, pq_m=pq_m, shards=index_shards)
        idx = run_library_call(
            build_index,
            train,
            out,
            embedder=embedder,
            index_type=params,
            batch_size=batch_size,
            device=device,
            workers=workers,
            overwrite=overwrite,
            resume=resume,
            shard_size=shard_size,
            progress=not quiet,
        )
        m = idx.meta
        say(
            f"{len(idx)} images indexed ({idx.params.index_type}, dim {idx.dim}, {m['skipped']} skipped) "
            f"in {m['timings_s']['total']} s → {out}"
        )
