"""``memscan candidates TRAIN --top K --out PROMPTS``: the most duplicated training images as prompts."""

from __future__ import annotations

from pathlib import Path

import typer

from memscan.commands.common import run_library_call, say


def register(app: typer.Typer) -> None:
    @app.command("candidates")
    def candidates(
        train: Path | None = typer.Argument(
            None,
            help="training set: folder, CSV/Parquet manifest, webdataset .tar (or folder of them), img2dataset output; "
            "optional with --index (the images are the index's, and the pixel check reads only those in candidate "
            "pairs, through the locations the index recorded)",
        ),
        top: int = typer.Option(..., "--top", help="number of prompts to write (one per duplicate cluster)"),
        out: Path = typer.Option(..., "--out", help="prompts file to write (.csv or .parquet)"),
        tau: float = typer.Option(0.9, "--tau", help="embedding cosine threshold for a candidate pair"),
        pixel_delta: float = typer.Option(0.1, "--pixel-delta", help="tiled ℓ2 that confirms a pair (pixel check)"),
        no_pixel_check: bool = typer.Option(False, "--no-pixel-check", help="count embedding matches unconfirmed"),
        check_size: int = typer.Option(32, "--check-size", help="side of the images the pixel check compares"),
        grid: int = typer.Option(4, "--grid", help="tiles per side of the pixel check"),
        min_count: int = typer.Option(1, "--min-count", help="skip clusters whose count is below this"),
        max_neighbors: int = typer.Option(
            10_000, "--max-neighbors", help="neighbours kept per image (counts at it are flagged capped)"
        ),
        index: Path | None = typer.Option(
            None,
            "--index",
            help="reuse an index built by `memscan index` (its embeddings and FAISS index; without TRAIN, its images)",
        ),
        embedder: str = typer.Option("pixel", "--embedder", help="embedder when no --index is given"),
        batch_size: int = typer.Option(256, "--batch-size", help="images per step"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N (model embedders)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing prompts file"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    ):
        """Count near-duplicates of every training image and write the top K as a prompts file."""
        from memscan.data.duplicates import DuplicateConfig, select_candidates

        cfg = DuplicateConfig(
            tau=tau,
            pixel_delta=None if no_pixel_check else pixel_delta,
            check_size=check_size,
            grid=grid,
            max_neighbors=max_neighbors,
        )
        res = run_library_call(
            select_candidates,
            train,
            out,
            top,
            cfg,
            min_count=min_count,
            embedder=embedder,
            index=index,
            batch_size=batch_size,
            device=device,
            progress=not quiet,
            overwrite=overwrite,
        )
        s = res.counts.summary
        say(
            f"{s['images']} images{' (via the index)' if s.get('via_index') else ''}: {s['images_with_duplicates']} with near-duplicates in {s['clusters_with_duplicates']} clusters "
            f"(τ = {tau}, {s['confirmed_pairs']} pairs confirmed, {s['rejected_by_pixel_check']} rejected); "
            f"{len(res.prompts)} prompts → {out}"
        )
        if s.get("skipped"):
            say(f"{s['skipped']} unreadable image(s) skipped (listed in {Path(out).stem}.candidates.json)", err=True)
        if s.get("not_in_index"):
            say(f"warning: {s['not_in_index']} images of {train} are not in the index and were not counted", err=True)
