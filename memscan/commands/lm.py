"""``memscan lm``: language-model memorization — ``extractable``, ``exposure``, ``mia``, ``index``
(the corpus index) and ``extract`` (extraction by sampling), one block each."""

from __future__ import annotations

from pathlib import Path

import typer

from memscan.commands.common import (
    clean_errors,
    dtype_option,
    gpus_per_worker_option,
    num_workers_option,
    quiet_option,
    ray_address_option,
    resume_option,
    runner_option,
    say,
)

lm_app = typer.Typer(no_args_is_help=True, help="Memorization of causal language models (docs/lm.md).")


def register(app: typer.Typer) -> None:
    app.add_typer(lm_app, name="lm")


def _ray_options(runner, ray_address, num_workers, gpus_per_worker, device):
    from memscan.runners.ray_runner import RayOptions

    return RayOptions.from_cli(
        runner, address=ray_address, num_workers=num_workers, gpus_per_worker=gpus_per_worker, device=device
    )


MODEL_HELP = (
    "transformers model directory, .gguf file, hub id, or py:module:attribute; or a folder of checkpoint-N/ "
    "model directories (a checkpoint sweep: the same run and seeds on each, then `memscan compare` by step)"
)
LM_DTYPE_HELP = "auto (float32 on CPU), fp32 or float32, fp16 or float16, bf16 or bfloat16"
HELDOUT_HELP = (
    "sweep: held-out texts (JSONL with text, Parquet, or one a line); each checkpoint's mean token NLL on "
    "them is recorded (heldout_loss)"
)


def _sweep(model, out, heldout, run_one, *, train_rows=None, device="cpu", dtype="auto", resume=False, quiet=False):
    """Run a checkpoint sweep when ``model`` is a folder of ``checkpoint-N/`` (True), else nothing
    (False; ``--heldout`` is then refused)."""
    from memscan.errors import InputError
    from memscan.generators.checkpoints import list_checkpoints

    if not list_checkpoints(model):
        if heldout is not None:
            raise InputError(
                f"--heldout applies to checkpoint sweeps; {model} is not a folder of checkpoint-N directories",
                "drop it, or pass the folder that holds the checkpoints",
            )
        return False
    from memscan.commands.formatting import compare_summary
    from memscan.lm.sweep import lm_checkpoint_sweep

    res = lm_checkpoint_sweep(
        model,
        run_one,
        out,
        heldout=heldout,
        train_rows=train_rows() if train_rows is not None and heldout is not None else None,
        device=device,
        dtype=dtype,
        resume=resume,
        progress=not quiet,
    )
    say(compare_summary(res))
    return True


@lm_app.command("extractable")
def extractable(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    data: Path = typer.Option(
        ..., "--data", help="training text: folder of .txt, JSONL/Parquet (text column), .npy ids"
    ),
    out: Path = typer.Option(..., "--out", help="run directory to write"),
    prefix_lengths: str = typer.Option(
        "32", "--prefix-lengths", help="prefix lengths k, comma-separated (suffix fixed)"
    ),
    suffix_length: int = typer.Option(50, "--suffix-length", help="suffix length m (tokens that must match)"),
    sequences: int = typer.Option(1000, "--sequences", help="training sequences to sample"),
    seed: int = typer.Option(0, "--seed", help="sampling seed (documents and offsets)"),
    batch_size: int = typer.Option(64, "--batch-size", help="sequences per decoding batch"),
    temperature: float = typer.Option(1.0, "--temperature", help="decoding scheme of p_sample: temperature"),
    top_k: int = typer.Option(40, "--top-k", help="decoding scheme of p_sample: top-k (0: off)"),
    top_p: float = typer.Option(1.0, "--top-p", help="decoding scheme of p_sample: top-p (1: off)"),
    offsets: str = typer.Option("random", "--offsets", help="random: a random window per document; start: its start"),
    document_start: bool = typer.Option(
        False,
        "--document-start/--no-document-start",
        help="feed a prefix that opens its document after the model's BOS (else EOS) token, as models trained "
        "with a start token per document saw it (default: every prefix as it is, as the papers did)",
    ),
    text_column: str = typer.Option("text", "--text-column", help="JSONL field / Parquet column holding the text"),
    shard_size: int = typer.Option(256, "--shard-size", help="sequences per shard, the unit of --resume"),
    index: Path | None = typer.Option(
        None,
        "--index",
        help="corpus index (memscan lm index): adds suffix_count / window_count and the duplication curve",
    ),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
    dtype: str = dtype_option("lm", help=LM_DTYPE_HELP),
    heldout: Path | None = typer.Option(None, "--heldout", help=HELDOUT_HELP),
    resume: bool = resume_option(),
    runner: str = runner_option(),
    ray_address: str | None = ray_address_option(),
    num_workers: int | None = num_workers_option(),
    gpus_per_worker: float | None = gpus_per_worker_option(),
    quiet: bool = quiet_option("no progress bar"),
):
    """k-extractable (Carlini 2022), Pythia score, exact memorization and probabilistic extraction
    (Hayes 2025) of training sequences; writes sequences.parquet."""
    from memscan.lm.extractable_run import ExtractableConfig, lm_extractable, parse_prefix_lengths

    with clean_errors():
        cfg = ExtractableConfig(
            prefix_lengths=parse_prefix_lengths(prefix_lengths),
            suffix_length=suffix_length,
            sequences=sequences,
            seed=seed,
            batch_size=batch_size,
            temperature=temperature,
            top_k=top_k or None,
            top_p=top_p,
            offsets=offsets,
            document_start=document_start,
            text_column=text_column,
            device=device,
            dtype=dtype,
        )
        opts = _ray_options(runner, ray_address, num_workers, gpus_per_worker, device)

        def run_one(path, sub, resume_run, model_id):
            return lm_extractable(
                path,
                data,
                sub,
                cfg,
                progress=not quiet,
                resume=resume_run,
                shard_size=shard_size,
                runner=runner,
                runner_options=opts,
                index=index,
            )

        from memscan.lm.sweep import first_documents

        rows = lambda: first_documents(data, text_column)  # noqa: E731
        if _sweep(
            model, out, heldout, run_one, train_rows=rows, device=device, dtype=dtype, resume=resume, quiet=quiet
        ):
            return
        res = run_one(model, out, resume, model)
    rates = ", ".join(f"k={k}: {v['extractable_rate']:.1%}" for k, v in res.rates["by_prefix_length"].items())
    skipped = res.manifest["counts"]["skipped_short_documents"]
    say(
        f"{res.manifest['counts']['sequences']} sequences; extractable {rates}"
        + (f"; {skipped} short documents skipped" if skipped else "")
        + f" → {out / 'sequences.parquet'}"
    )


@lm_app.command("exposure")
def exposure(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    canaries: str = typer.Option(
        ..., "--canaries", help="JSONL of {canary, format, copies}, canary<TAB>format lines, or 'FORMAT::CANARY'"
    ),
    out: Path = typer.Option(..., "--out", help="run directory to write"),
    exact_limit: int = typer.Option(100_000, "--exact-limit", help="enumerate the candidates when |R| ≤ this"),
    samples: int = typer.Option(10_000, "--samples", help="candidates sampled for the skew-normal estimate"),
    candidates_per_shard: int = typer.Option(20_000, "--candidates-per-shard", help="the unit of --resume"),
    batch_size: int = typer.Option(256, "--batch-size", help="candidates per forward pass"),
    seed: int = typer.Option(0, "--seed", help="seed of the sampled candidates"),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
    dtype: str = dtype_option("lm", help=LM_DTYPE_HELP),
    heldout: Path | None = typer.Option(None, "--heldout", help=HELDOUT_HELP),
    resume: bool = resume_option(),
    runner: str = runner_option(),
    ray_address: str | None = ray_address_option(),
    num_workers: int | None = num_workers_option(),
    gpus_per_worker: float | None = gpus_per_worker_option(),
    quiet: bool = quiet_option("no progress bar"),
):
    """Secret Sharer exposure (Carlini et al. 2019) of planted canaries; writes exposures.parquet."""
    from memscan.lm.exposure_run import ExposureConfig, lm_exposure

    with clean_errors():
        cfg = ExposureConfig(
            exact_limit=exact_limit,
            samples=samples,
            candidates_per_shard=candidates_per_shard,
            batch_size=batch_size,
            seed=seed,
            device=device,
            dtype=dtype,
        )
        opts = _ray_options(runner, ray_address, num_workers, gpus_per_worker, device)

        def run_one(path, sub, resume_run, model_id):
            return lm_exposure(
                path, canaries, sub, cfg, progress=not quiet, resume=resume_run, runner=runner, runner_options=opts
            )

        if _sweep(model, out, heldout, run_one, device=device, dtype=dtype, resume=resume, quiet=quiet):
            return
        res = run_one(model, out, resume, model)
    e = res.exposures
    say(
        f"{len(e)} canaries: exposure {e['exposure'].min():.2f}–{e['exposure'].max():.2f} bits "
        f"(max {e['max_exposure'].max():.2f}) → {out / 'exposures.parquet'}"
    )


# ---- `memscan lm mia` ------------------------------------------------------------------------------


@lm_app.command("mia")
def lm_mia(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    members: Path = typer.Option(..., "--members", help='member texts: JSONL with "text", Parquet, or one a line'),
    nonmembers: Path = typer.Option(..., "--nonmembers", help="non-member texts, as --members"),
    out: Path = typer.Option(..., "--out", help="run directory to write"),
    reference: str | None = typer.Option(None, "--reference", help="reference model for the reference ratio"),
    k_percent: float = typer.Option(20.0, "--k-percent", help="k of Min-K% and Min-K%++ (percent of the tokens)"),
    batch_size: int = typer.Option(8, "--batch-size", help="examples of equal token length per forward pass"),
    max_tokens: int = typer.Option(
        512,
        "--max-tokens",
        help="text tokens scored per example (longer texts are cut, also to each model's positions)",
    ),
    document_start: bool = typer.Option(
        False,
        "--document-start/--no-document-start",
        help="score every text token after the model's BOS (else EOS) token, as the papers' code does for "
        "tokenizers that add a BOS (LLaMA's); default: the first token is only context (GPT-2, Pythia)",
    ),
    bootstrap: int = typer.Option(200, "--bootstrap", help="bootstrap replicates for 95% intervals"),
    seed: int = typer.Option(0, "--seed", help="seed of the blind baseline's folds and the bootstrap"),
    shard_size: int = typer.Option(64, "--shard-size", help="examples per shard (unit of commit and resume)"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N"),
    dtype: str = dtype_option("lm", help=LM_DTYPE_HELP),
    heldout: Path | None = typer.Option(None, "--heldout", help=HELDOUT_HELP),
    resume: bool = resume_option(),
    runner: str = runner_option(),
    ray_address: str | None = ray_address_option(),
    num_workers: int | None = num_workers_option(),
    gpus_per_worker: float | None = gpus_per_worker_option(),
    quiet: bool = quiet_option("no progress bar"),
):
    """Membership scores of a causal LM on member and non-member texts (loss, zlib, lowercase,
    Min-K%, Min-K%++, reference ratio) with ROC metrics, and the blind baseline (Das et al. 2024)
    that sees only the text."""
    from memscan.lm.mia_run import LmMiaConfig, run_lm_mia

    with clean_errors():
        cfg = LmMiaConfig(
            k_percent=k_percent,
            max_tokens=max_tokens,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            seed=seed,
            bootstrap=bootstrap,
            document_start=document_start,
        )
        opts = _ray_options(runner, ray_address, num_workers, gpus_per_worker, device)

        def run_one(path, sub, resume_run, model_id):
            return run_lm_mia(
                path,
                members,
                nonmembers,
                sub,
                cfg,
                reference=reference,
                progress=not quiet,
                resume=resume_run,
                shard_size=shard_size,
                runner=runner,
                runner_options=opts,
            )

        from memscan.lm.sweep import first_texts

        rows = lambda: first_texts(members, "members")  # noqa: E731
        if _sweep(
            model, out, heldout, run_one, train_rows=rows, device=device, dtype=dtype, resume=resume, quiet=quiet
        ):
            return
        res = run_one(model, out, resume, model)
    lines = [f"memscan lm mia: {out}"]
    for r in res.metrics.to_dict("records"):
        lines.append(
            f"  {r['statistic']}: AUC {r['auc']:.3f}, TPR@1%FPR {r['tpr@1%fpr']:.3f}, "
            f"balanced accuracy {r['balanced_accuracy']:.3f}"
        )
    blind = res.blind
    if blind.get("warning"):
        lines.append(f"  WARNING: blind baseline AUC {blind['auc']:.3f} ≥ 0.6: {blind['warning_text']}")
    elif blind.get("skipped"):
        lines.append(f"  blind baseline not run: {blind['skipped']}")
    lines.append(f"  report: memscan report {out}")
    say("\n".join(lines))


# ---- `memscan lm index` (the exact-substring corpus index) ----------------------------------------


@lm_app.command("index")
def lm_index_command(
    corpus: Path = typer.Argument(
        ..., help="training corpus: folder of .txt, JSONL/Parquet (text column), pre-tokenized .npy/Parquet ids"
    ),
    out: Path = typer.Option(..., "--out", help="index folder to write (a run directory: --resume continues it)"),
    tokenizer: str | None = typer.Option(
        None,
        "--tokenizer",
        help="index token ids of this model's tokenizer (transformers model directory, .gguf file, hub id, "
        "or py:module:attribute)",
    ),
    byte_mode: bool = typer.Option(False, "--bytes", help="index raw bytes instead (any encoding; no tokenizer)"),
    text_column: str = typer.Option("text", "--text-column", help="JSONL field / Parquet column holding the text"),
    shard_tokens: int = typer.Option(
        1 << 27,
        "--shard-tokens",
        help="tokens per suffix-array shard at most (the unit of --resume; build memory ≈ 16 bytes a token)",
    ),
    resume: bool = resume_option(),
    quiet: bool = quiet_option("no progress bar"),
):
    """Suffix-array index of a training corpus (exact substring count / locate / longest match;
    docs/lm.md). Give exactly one of --tokenizer and --bytes."""
    from memscan.lm.index_run import lm_index

    with clean_errors():
        index = lm_index(
            corpus,
            out,
            tokenizer=tokenizer,
            byte_mode=byte_mode,
            text_column=text_column,
            shard_tokens=shard_tokens,
            resume=resume,
            progress=not quiet,
        )
    disk = index.meta["disk_bytes"]
    say(
        f"{index.n_docs} documents, {index.n_tokens} {'bytes' if index.mode == 'bytes' else 'tokens'} in "
        f"{len(index.shards)} shard(s), {disk / max(index.n_tokens, 1):.2f} bytes a token on disk → {out}"
    )


# ---- `memscan lm extract` (Carlini et al. 2021) ------------------------------------------------------


@lm_app.command("extract")
def lm_extract_command(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    index: Path = typer.Option(..., "--index", help="corpus index of the training data (memscan lm index)"),
    out: Path = typer.Option(..., "--out", help="run directory to write"),
    samples: int = typer.Option(1000, "--samples", help="samples to draw"),
    length: int = typer.Option(256, "--length", help="new tokens per sample"),
    top: int = typer.Option(100, "--top", help="N of precision@N: top samples of each ranking"),
    reference: str | None = typer.Option(None, "--reference", help="reference model for reference_ratio"),
    prompts: Path | None = typer.Option(
        None, "--prompts", help="prompts, one a line (or JSONL with 'prompt'); default: the model's start token"
    ),
    top_k: int = typer.Option(40, "--top-k", help="top-k of the sampler (0: off)"),
    top_p: float = typer.Option(1.0, "--top-p", help="top-p of the sampler (1: off)"),
    temperature_start: float = typer.Option(10.0, "--temperature-start", help="temperature of the first token"),
    temperature_end: float = typer.Option(1.0, "--temperature-end", help="temperature after the decay"),
    decay_tokens: int = typer.Option(20, "--decay-tokens", help="tokens of the linear temperature decay"),
    window: int = typer.Option(50, "--window", help="tokens of the sliding window of min_window_perplexity"),
    min_match: int | None = typer.Option(
        None,
        "--min-match",
        help="corpus match that confirms a sample (default: 50 tokens, 100 bytes for a bytes index)",
    ),
    batch_size: int = typer.Option(32, "--batch-size", help="samples per decoding and scoring batch"),
    seed: int = typer.Option(0, "--seed", help="run seed (each sample's seed derives from it and its id)"),
    shard_size: int = typer.Option(256, "--shard-size", help="samples per shard, the unit of --resume"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N"),
    dtype: str = dtype_option("lm", help=LM_DTYPE_HELP),
    heldout: Path | None = typer.Option(None, "--heldout", help=HELDOUT_HELP),
    resume: bool = resume_option(),
    runner: str = runner_option(),
    ray_address: str | None = ray_address_option(),
    num_workers: int | None = num_workers_option(),
    gpus_per_worker: float | None = gpus_per_worker_option(),
    quiet: bool = quiet_option("no progress bar"),
):
    """Extraction by sampling and ranking (Carlini et al. 2021): sample (top-k 40, temperature
    10 → 1 over the first 20 tokens), score (perplexity, zlib, lowercase, reference, 50-token
    window), de-duplicate (word trigrams), confirm against the corpus index; writes
    samples.parquet and precision.parquet."""
    from memscan.lm.extract_run import lm_extract
    from memscan.lm.sampling_attack import LmExtractConfig

    with clean_errors():
        cfg = LmExtractConfig(
            samples=samples,
            length=length,
            top_k=top_k or None,
            top_p=top_p,
            temperature_start=temperature_start,
            temperature_end=temperature_end,
            decay_tokens=decay_tokens,
            window=window,
            top=top,
            min_match=min_match,
            batch_size=batch_size,
            seed=seed,
            device=device,
            dtype=dtype,
        )
        opts = _ray_options(runner, ray_address, num_workers, gpus_per_worker, device)

        def run_one(path, sub, resume_run, model_id):
            return lm_extract(
                path,
                index,
                sub,
                cfg,
                reference=reference,
                prompts=prompts,
                progress=not quiet,
                resume=resume_run,
                shard_size=shard_size,
                runner=runner,
                runner_options=opts,
            )

        if _sweep(model, out, heldout, run_one, device=device, dtype=dtype, resume=resume, quiet=quiet):
            return
        res = run_one(model, out, resume, model)
    c = res.manifest["counts"]
    unit = res.manifest["match_unit"]
    lines = [
        f"memscan lm extract: {c['generated']} samples, {c['kept']} kept after de-duplication, "
        f"{c['confirmed']} confirmed (≥ {res.manifest['min_match']} {unit} in the corpus)"
    ]
    for r in res.precision.to_dict("records"):
        lines.append(f"  {r['metric']}: precision@{r['N']} {r['precision']:.3f} ({r['confirmed']} confirmed)")
    lines.append(f"  samples: {out / 'samples.parquet'}; report: memscan report {out}")
    say("\n".join(lines))
