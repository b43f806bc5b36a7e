"""Per-example statistics as shards: the tables do not depend on the shard size or the runner.

Small inputs of tests/golden_support.py (16 smooth 8×8 examples, an untrained seeded 8×8 UNet, the
Gaussian memorization-score functions); Ray tests use the session's one local Ray (conftest.py).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from golden_support import MEMSCORE_X, MIA_MEMBERS, _write_png, _write_tiny_unet, mia_ids, mia_images

from memscan.mia.inpaint import InpaintConfig
from memscan.mia.loss import LossConfig
from memscan.mia.memscore_run import run_memscore
from memscan.mia.shadow import torch_threads
from memscan.mia.statistic_run import run_inpaint, run_mia

LOSS = LossConfig(timesteps=(10, 100), noise_draws=2, flip=True, seed=2, batch_size=8)
TABLES = ("examples", "losses", "scores", "metrics")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mia-runners")
    data = root / "data"
    data.mkdir()
    for i, img in zip(mia_ids(), mia_images()):
        _write_png(data / f"{i}.png", img)
    members = root / "members.txt"
    members.write_text("\n".join(mia_ids()[:MIA_MEMBERS]) + "\n")
    _write_tiny_unet(root / "unet")
    return data, members, root / "unet"


def _mia(inputs, out, **kw):
    data, members, unet = inputs
    with torch_threads(1):
        return run_mia(out, data, model=str(unet), members=members, loss=LOSS, bootstrap=10, progress=False, **kw)


def _same(a, b, tables=TABLES):
    for t in tables:
        pd.testing.assert_frame_equal(pd.read_parquet(a / f"{t}.parquet"), pd.read_parquet(b / f"{t}.parquet"), obj=t)


@pytest.fixture(scope="module")
def whole(inputs, tmp_path_factory):
    """One shard: the run as it was before sharding."""
    out = tmp_path_factory.mktemp("whole") / "run"
    _mia(inputs, out)
    assert json.loads((out / "manifest.json").read_text())["n_shards"] == 1
    return out


def test_loss_tables_do_not_depend_on_the_shard_size(inputs, whole, tmp_path):
    # chunks of ceil(8 / (2 draws · 2 flips)) = 2 examples per model batch: 3 rounds up to 4
    _mia(inputs, tmp_path / "sharded", shard_size=3)
    m = json.loads((tmp_path / "sharded" / "manifest.json").read_text())
    assert m["n_shards"] == 4 and m["shard_size"] == 3
    _same(whole, tmp_path / "sharded")
    log = (tmp_path / "sharded" / "run.log").read_text()
    assert "shard 3 committed: diffusion_loss of target, examples 12:16" in log


def test_a_resume_with_another_shard_size_is_refused_and_the_run_still_resumes(inputs, whole, tmp_path):
    """Shard sizes 10 and 12 both cut 16 examples into 2 shards (of whole model batches of 2
    examples), so the shard count alone (the old identity) let a resume with the other size
    through: it mixed shards of two plans (a bare ValueError, or a run neither size could resume).
    Refused now, naming shard_size."""
    from memscan.errors import MemscanError

    out = tmp_path / "run"
    with pytest.raises(MemscanError, match="stopped before"):
        _mia(inputs, out, shard_size=10, stop_after_shards=1)
    with pytest.raises(MemscanError, match=r"shard_size differs .*\(10 vs 12\)"):
        _mia(inputs, out, shard_size=12, resume=True)
    _mia(inputs, out, shard_size=10, resume=True)  # nothing was mixed in: the original finishes it
    _same(whole, out)


def test_inpaint_tables_and_thumbnails_do_not_depend_on_the_shard_size(inputs, tmp_path):
    data, members, _ = inputs
    cfg = InpaintConfig(num_inference_steps=5, jump_length=2, jump_n_sample=2, samples=2, seed=4, batch_size=4)
    runs = {}
    for size in (256, 4):
        out = tmp_path / f"s{size}"
        with torch_threads(1):
            run_inpaint(out, data, model="py:golden_support:memorizing_predictor", members=members, config=cfg,
                        bootstrap=0, progress=False, shard_size=size)  # fmt: skip
        runs[size] = out
    assert json.loads((runs[4] / "manifest.json").read_text())["n_shards"] == 4
    _same(runs[256], runs[4], ("examples", "distances", "scores", "metrics"))
    pngs = {
        s: sorted(p.relative_to(r).as_posix() for p in (r / "images" / "inpaint").rglob("*.png"))
        for s, r in runs.items()
    }
    assert pngs[256] and pngs[256] == pngs[4]
    for rel in pngs[4]:  # the reconstructions the report shows, kept in the target's shards
        assert (runs[4] / rel).read_bytes() == (runs[256] / rel).read_bytes()


def test_unknown_runner_and_bad_shard_size_are_clear(inputs, tmp_path):
    from memscan.errors import MemscanError

    with pytest.raises(MemscanError, match="shard size"):
        _mia(inputs, tmp_path / "a", shard_size=0)
    with pytest.raises(MemscanError, match="unknown runner"):
        _mia(inputs, tmp_path / "b", runner="slurm")


def test_ray_loss_tables_equal_the_local_tables(ray_address, inputs, whole, tmp_path):
    from memscan.runners import RayOptions

    out = tmp_path / "ray"
    _mia(inputs, out, shard_size=4, runner="ray", runner_options=RayOptions(num_workers=2))
    m = json.loads((out / "manifest.json").read_text())
    assert m["n_shards"] == 4 and m["runner"]["name"] == "ray" and m["status"] == "complete"
    assert m["model"]["parameters"] > 0
    _same(whole, out)
    workers = {json.loads((out / "shards" / f"{s:05d}.done.json").read_text())["worker"] for s in range(4)}
    assert all(w.startswith("ray:w") for w in workers), workers  # each worker loaded the UNet itself


def test_ray_memscore_equals_local(ray_address, tmp_path):
    from memscan.runners import RayOptions

    np.save(tmp_path / "x.npy", np.asarray(MEMSCORE_X))
    args = (tmp_path / "x.npy", "py:golden_support:gauss_train", "py:golden_support:gauss_loglik")
    local = run_memscore(tmp_path / "local", *args, folds=4, repeats=2, seed=3, progress=False)
    ray = run_memscore(
        tmp_path / "ray", *args, folds=4, repeats=2, seed=3, progress=False, runner="ray",
        runner_options=RayOptions(num_workers=2),
    )  # fmt: skip
    pd.testing.assert_frame_equal(local.table, ray.table)
    assert ray.manifest["n_shards"] == 8 and ray.manifest["runner"]["name"] == "ray"


def test_an_inpaint_mask_that_hides_nothing_is_refused_before_any_shard(tmp_path):
    """1-pixel-high examples: the ``top`` region hides no pixel. The run refuses them before the
    manifest or any shard is written, not in a worker once other shards ran."""
    from memscan.errors import InputError
    from memscan.mia.inpaint import inpaint_mask

    data = tmp_path / "data"
    data.mkdir()
    for i, img in zip(mia_ids(), mia_images()):
        _write_png(data / f"{i}.png", img[:1])  # 1 × 8
    members = tmp_path / "members.txt"
    members.write_text("\n".join(mia_ids()[:MIA_MEMBERS]) + "\n")
    assert not inpaint_mask((1, 8), "left").all()  # (the left half of a 1×8 image is fine)
    cfg = InpaintConfig(region="top", num_inference_steps=2, jump_length=1, jump_n_sample=1, samples=1, batch_size=4)
    out = tmp_path / "run"
    with pytest.raises(InputError, match=r"'top' region .* hides no pixel of an image of 1×8"):
        run_inpaint(out, data, model="py:golden_support:memorizing_predictor", members=members, config=cfg,
                    bootstrap=0, progress=False, shard_size=4)  # fmt: skip
    assert not (out / "manifest.json").exists() and not list(out.glob("shards/*"))
