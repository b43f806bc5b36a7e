"""``memscan demo …``: the demos, one group.

- ``memscan demo`` (no subcommand): the image-extraction demo on the shipped model and data;
- ``memscan demo train``: retrain the shipped demo model from its recorded recipe;
- ``memscan demo mia`` (alias ``memscan demo-mia``): membership inference and inpainting with
  CPU-trained shadow models;
- ``memscan demo compare``: the same extraction attack on each shipped demo checkpoint (memorization
  over training steps, with held-out loss), compared by step, and the last one against the wider
  shipped model (by parameters);
- ``memscan demo lm``: prefix → suffix extraction and canary exposure on a small byte-level GPT-2
  trained on the Shakespeare plays with planted canaries; ``memscan demo lm train`` retrains it;
  ``memscan demo lm compare``: the same measurements on each shipped LM checkpoint, by step.

Adding a demo is one function here: ``@demo_app.command("NAME")`` over one library call (its
library function lives in :mod:`memscan.demo`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import typer

from memscan.commands.common import quiet_option, run_library_call, say
from memscan.commands.formatting import demo_mia_summary

demo_app = typer.Typer(
    help="The embedded demo: a small diffusion model with planted duplicates.", invoke_without_command=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(demo_app, name="demo")
    # today's name of `memscan demo mia`, kept as an alias (hidden from the command list)
    app.command("demo-mia", hidden=True)(demo_mia)


@demo_app.callback()
def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/demo"), "--out", help="run directory"),
    samples_per_prompt: int | None = typer.Option(None, help="generations per prompt"),
    quick: bool = typer.Option(False, "--quick", help="reduced run (CI): fewer prompts and samples"),
    quiet: bool = quiet_option(),
):
    """Run the whole pipeline on the shipped demo model and data (no network, CPU, minutes)."""
    if ctx.invoked_subcommand is not None:
        return
    from memscan.demo.run import run_demo

    res = run_library_call(run_demo, out, samples_per_prompt=samples_per_prompt, quick=quick, progress=not quiet)
    s = res.summary
    lines = [
        f"memscan demo: {s['prompts']} prompts, full budget {s['samples_per_prompt']} generations each, "
        f"in {s['timings_s']['total']:.0f} s"
    ]
    lines += [f"  {k:>15}: {v}" for k, v in res.rows]
    lines += [f"  report: {res.report}", f"  summary: {res.out / 'summary.json'}"]
    say("\n".join(lines))


@demo_app.command("train")
def demo_train(
    out: Path = typer.Option(Path("memscan/demo/model"), "--out", help="model directory to write"),
    steps: int | None = typer.Option(None, help="training steps"),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a model already in --out"),
):
    """Retrain the demo model from its recorded recipe."""
    from memscan.demo.run import train_model

    rec = run_library_call(train_model, out, steps=steps, device=device, overwrite=overwrite)
    say(f"trained in {rec['training']['seconds']} s → {out}")


@demo_app.command("mia")
def demo_mia(
    out: Path = typer.Option(Path("runs/demo-mia"), "--out", help="output directory (rerun resumes training)"),
    n_examples: int | None = typer.Option(None, "--examples", help="pool size [128]"),
    n_models: int | None = typer.Option(None, "--models", help="shadow models, model 0 is the target [8]"),
    steps: int | None = typer.Option(None, "--steps", help="training steps per model [400]"),
    threads: int | None = typer.Option(None, "--threads", help="torch threads [1]"),
    quick: bool = typer.Option(False, "--quick", help="tiny settings (seconds; for CI)"),
    quiet: bool = quiet_option("no progress output"),
):
    """Membership inference and inpainting on the demo data with CPU-trained shadow models."""
    over = {"n_examples": n_examples, "n_models": n_models, "steps": steps, "threads": threads}
    text = run_library_call(_demo_mia, out, quick, {k: v for k, v in over.items() if v is not None}, not quiet)
    say(text)


def _demo_mia(out: Path, quick: bool, overrides: dict, progress: bool) -> str:
    """The MIA demo's library call, its summary text and ``OUT/summary.json``."""
    from memscan.demo.mia import DemoMiaSettings, run_demo_mia

    settings = replace(DemoMiaSettings.quick() if quick else DemoMiaSettings(), **overrides)
    res = run_demo_mia(out, settings, progress=progress)
    text = demo_mia_summary(res)
    summary = {"report": str(res.report), "manifest": res.manifest, "text": text}
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return text


lm_app = typer.Typer(
    help="The language-model demo: a byte-level GPT-2 trained on the Shakespeare plays with planted canaries.",
    invoke_without_command=True,
)
demo_app.add_typer(lm_app, name="lm")


@lm_app.callback()
def demo_lm(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/demo-lm"), "--out", help="output directory"),
    quick: bool = typer.Option(False, "--quick", help="reduced run (CI): fewer ordinary passages"),
    quiet: bool = quiet_option(),
):
    """Extraction and exposure of planted canaries on the shipped LM demo model (CPU, minutes)."""
    if ctx.invoked_subcommand is not None:
        return
    from memscan.demo.lm.run import run_demo_lm

    res = run_library_call(run_demo_lm, out, quick=quick, progress=not quiet)
    say(res.text())


@lm_app.command("train")
def demo_lm_train(
    out: Path = typer.Option(Path("memscan/demo/lm/model"), "--out", help="model directory to write"),
    steps: int | None = typer.Option(None, help="phase-1 training steps [7200]"),
    restart_steps: int | None = typer.Option(None, help="warm-restart phase steps (0: none) [0]"),
    threads: int | None = typer.Option(None, help="torch threads [1]"),
    bf16: bool = typer.Option(
        True,
        "--bf16/--fp32",
        help="bfloat16 autocast for forward and loss (float32 weights): ≈ 2× faster a step \\[bf16]",
    ),
    device: str = typer.Option("cpu", "--device", help="where to train: cpu, cuda, cuda:1 \\[cpu]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a model already in --out"),
    quiet: bool = quiet_option("no loss log, no save progress bar"),
):
    """Retrain the LM demo model from its recorded recipe: 7,200 bf16 steps — ≈ 22 min on 2 CPU cores
    with --threads 2, ≈ 41 min with one (the first 300 steps timed on the idle 2-core machine,
    extrapolated); the shipped weights took 128 s on a lent H200 (--device cuda)."""
    from memscan.demo.lm.train import retrain

    rec = run_library_call(
        retrain,
        out,
        steps=steps,
        restart_steps=restart_steps,
        threads=threads,
        bf16=bf16,
        device=device,
        progress=not quiet,
        overwrite=overwrite,
    )
    say(f"trained in {rec['seconds']} s ({rec['threads']} threads) → {out}")


@lm_app.command("compare")
def demo_lm_compare(
    out: Path = typer.Option(Path("runs/demo-lm-compare"), "--out", help="output directory"),
    quick: bool = typer.Option(False, "--quick", help="reduced run (CI): 40 ordinary passages instead of 200"),
    quiet: bool = quiet_option(),
):
    """Memorization over training: the LM demo's canaries (extracted by copy count, exposure) on each shipped
    checkpoint and the shipped model, with held-out loss, compared by step (CPU, minutes)."""
    from memscan.demo.lm.compare import run_demo_lm_compare

    res = run_library_call(run_demo_lm_compare, out, quick=quick, progress=not quiet)
    say(res.text())


@demo_app.command("compare")
def demo_compare(
    out: Path = typer.Option(Path("runs/demo-compare"), "--out", help="output directory"),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="reduced run (CI): the images planted ≥ 50 times [≥ 25 times] and the 4 planted once, 24 "
        "generations each [32], 16 held-out images [32]",
    ),
    threads: int = typer.Option(1, "--threads", help="torch threads (one is fastest for these tiny models)"),
    quiet: bool = quiet_option(),
):
    """Memorization over training and width: the same extraction attack on each shipped demo checkpoint (16/32/32,
    compared by step, with held-out loss), then the last checkpoint against the wider shipped model (by parameters)."""
    from memscan.demo.compare import run_demo_compare

    res = run_library_call(run_demo_compare, out, quick=quick, progress=not quiet, threads=threads)
    say(res.text())
