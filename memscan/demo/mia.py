"""``memscan demo-mia``: shadow models trained on the demo data, then membership inference and
the inpainting attack on model 0 (``OUT/data``, ``OUT/shadows``, ``OUT/run``)."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memscan.demo.data import DemoDataConfig, build_demo_data
from memscan.demo.shadow_recipe import DemoRecipe, shadow_train_config
from memscan.errors import InputError, MemscanError
from memscan.mia.attack_labels import parse_attacks
from memscan.mia.inpaint import InpaintConfig
from memscan.mia.inputs import load_mia_inputs
from memscan.mia.loss import LossConfig
from memscan.mia.results import MiaResult
from memscan.mia.run_dir import cpu_seconds
from memscan.mia.shadow import check_threads, torch_threads, train_shadow_models
from memscan.mia.statistic_run import DiffusionLossStatistic, InpaintDistanceStatistic, attack_statistics
from memscan.store import check_out_folder, open_run

__all__ = ["DemoMiaResult", "DemoMiaSettings", "run_demo_mia", "write_pool"]


@dataclass(frozen=True)
class DemoMiaSettings:
    """Budget of ``memscan demo-mia`` (the defaults: ≤ 10 minutes of CPU time, one thread; see
    ``docs/mia.md`` for measured figures).

    Attributes
    ----------
    n_examples : int
        Pool size: the first ``n_examples`` base images of the demo data (each once).
    n_models : int
        Shadow models ``M``; model 0 is the target, the rest calibrate LiRA.
    steps, batch_size : int
        Training of each shadow model (the demo recipe, :func:`memscan.demo.shadow_recipe.shadow_train_config`).
    block_out_channels : tuple of int
    timesteps : tuple of int
    noise_draws : int
    inpaint : InpaintConfig
    threads : int or None
        Torch threads (1 is fastest on a busy machine).
    """

    n_examples: int = 128
    n_models: int = 8
    steps: int = 400
    batch_size: int = 32
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    timesteps: tuple[int, ...] = (10, 20, 50, 100, 200, 500)
    noise_draws: int = 4
    inpaint: InpaintConfig = InpaintConfig(num_inference_steps=25, jump_length=5, jump_n_sample=2, batch_size=128)
    threads: int | None = 1
    bootstrap: int = 200
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoMiaSettings:
        """Tiny settings for tests and CI (well under a minute)."""
        return cls(
            n_examples=24,
            n_models=4,
            steps=60,
            batch_size=8,
            block_out_channels=(16, 32),
            timesteps=(20, 100),
            noise_draws=1,
            inpaint=InpaintConfig(num_inference_steps=10, jump_length=5, jump_n_sample=1, batch_size=64),
            bootstrap=20,
        )


@dataclass
class DemoMiaResult:
    """A finished ``memscan demo-mia``.

    Attributes
    ----------
    out : Path
        The demo directory (``data/``, ``shadows/``, ``run/``).
    run : MiaResult
        The attack run ``out/run`` (its ``manifest``, tables and ``report``).
    settings : DemoMiaSettings
    training_s : float
        Wall seconds spent training the shadow models (this call).
    total_s, cpu_s : float
        Wall and CPU seconds of the whole call, measured when it returned.
    """

    out: Path
    run: MiaResult
    settings: DemoMiaSettings
    training_s: float
    total_s: float
    cpu_s: float

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def manifest(self) -> dict:
        return self.run.manifest

    @property
    def report(self) -> Path:
        return self.run.report


def run_demo_mia(
    out: str | Path = "runs/demo-mia",
    settings: DemoMiaSettings = DemoMiaSettings(),
    *,
    progress: bool = True,
) -> DemoMiaResult:
    """``memscan demo-mia``: shadow models on the demo data, then MIA and inpainting.

    1. Take the first ``n_examples`` base images of the demo data (:func:`memscan.demo.data.build_demo_data`)
       and write them to ``out/data`` (PNG), so the CLI commands can be rerun on them.
    2. Train ``n_models`` models on random halves (balanced: every image is IN half of them) with
       the demo recipe, into ``out/shadows`` — resumable per model: rerunning continues.
    3. Model 0 is the target; the others are shadow models. Diffusion loss at each timestep
       (loss threshold, LiRA online/offline, fixed variance) and the inpainting attack, into the
       run ``out/run`` with its ``report.html``.
    """
    check_settings(settings)  # bad options: refused before anything is written
    check_out_folder(out)  # a file in the way: refused before any work
    t0, c0 = time.perf_counter(), cpu_seconds()
    out = Path(out)
    resume = _unfinished_run(out)
    st = settings
    keys, images = _demo_pool(out, st.n_examples)
    recipe = DemoRecipe(
        shadow_train_config(steps=st.steps, batch_size=st.batch_size, block_out_channels=tuple(st.block_out_channels)),
        threads=st.threads,
    )
    t_data = time.perf_counter()
    train_shadow_models(
        images, recipe, out / "shadows", n_models=st.n_models, seed=st.seed, ids=keys, progress=progress
    )
    t_train = time.perf_counter()
    with open_run(out / "run", "demo-mia", resume=resume) as run_dir, torch_threads(st.threads):
        s = load_mia_inputs(
            out / "data", model=None, members=None, shadows=out / "shadows", target_shadow=0, device="cpu"
        )
        s.sources["condition"] = "auto"
        loss_cfg = LossConfig(timesteps=st.timesteps, noise_draws=st.noise_draws, seed=st.seed, batch_size=256)
        loss_cfg = loss_cfg.validated(int(s.target.alphas_cumprod.numel()))
        names = parse_attacks(None, True)
        demo = {
            "n_examples": st.n_examples,
            "n_models": st.n_models,
            "recipe": recipe.describe(),
            "threads": st.threads,
        }
        run = attack_statistics(
            "demo-mia",
            run_dir,
            s,
            [DiffusionLossStatistic(loss_cfg), InpaintDistanceStatistic(st.inpaint)],
            attacks=names,
            bootstrap=st.bootstrap,
            top=8,
            progress=progress,
            t0=t0,
            threads=st.threads,
            manifest_extra={"demo": demo},
            timings_before={"data_s": round(t_data - t0, 2), "training_s": round(t_train - t_data, 2)},
            cpu0=c0,
        )
    return DemoMiaResult(
        out=out,
        run=run,
        settings=st,
        training_s=t_train - t_data,
        total_s=time.perf_counter() - t0,
        cpu_s=cpu_seconds() - c0,
    )


def pool_size(config: DemoDataConfig = DemoDataConfig()) -> int:
    """How many base images the demo data has (the most ``--examples`` can take)."""
    return config.n_unique + len(config.counts) * config.per_count


def check_settings(st: DemoMiaSettings) -> None:
    """Refuse settings the demo cannot run with, naming the CLI option (``--examples``, ``--models``,
    ``--steps``, ``--threads``) and its valid range: called before anything is written or trained."""
    n = pool_size()
    if not 4 <= st.n_examples <= n:
        raise InputError(
            f"--examples {st.n_examples} is not in 4..{n}", f"pass --examples between 4 and {n} (default 128)"
        )
    if st.n_models < 2:
        raise InputError(
            f"--models {st.n_models}: the demo needs at least 2 models (model 0 is the target, the others shadows)",
            "use --models 2 or more (default 8)",
        )
    if st.steps < 1:
        raise InputError(f"--steps {st.steps} must be ≥ 1 (training steps per model)", "e.g. --steps 400")
    check_threads(st.threads)


def _unfinished_run(out: Path) -> bool:
    """Refuse a finished demo in ``out``; True when an unfinished attack stage is there to resume
    (its committed shards are kept; training resumes per model)."""
    run_manifest = out / "run" / "manifest.json"
    if not run_manifest.exists():
        return False
    try:
        status = json.loads(run_manifest.read_text()).get("status")
    except (json.JSONDecodeError, OSError, AttributeError):
        raise MemscanError(f"{run_manifest} is damaged", f"remove {out / 'run'} and rerun") from None
    if status == "complete":
        raise MemscanError(f"{out} already holds a demo-mia run", "remove it or pass another --out")
    return True


def _demo_pool(out: Path, n_examples: int) -> tuple[list[str], np.ndarray]:
    """The first ``n_examples`` base images of the demo data, also written to ``out/data``."""
    data = build_demo_data()
    base = data.base_images()
    keys = sorted(base)
    if not 4 <= n_examples <= len(keys):
        raise InputError(
            f"--examples {n_examples} is not in 4..{len(keys)}", f"pass --examples between 4 and {len(keys)}"
        )
    keys = keys[:n_examples]
    images = np.stack([base[k] for k in keys])
    write_pool(out / "data", keys, images, [data.captions[k] for k in keys])
    return keys, images


def write_pool(root: Path, keys: list[str], images: np.ndarray, captions: list[str]) -> None:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for k, img, cap in zip(keys, images, captions):
        path = root / f"{k}.png"
        buf = io.BytesIO()
        Image.fromarray(img[:, :, 0], mode="L").save(buf, format="PNG")
        if not path.exists() or path.read_bytes() != buf.getvalue():
            path.write_bytes(buf.getvalue())
        (root / f"{k}.txt").write_text(cap + "\n", encoding="utf-8")
