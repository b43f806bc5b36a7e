"""Checkpoint sweeps through the one sweep loop (:func:`memscan.compare.sweep.checkpoint_sweep`)
for the image MIA: ``memscan mia --model FOLDER --base`` runs the same attack on each checkpoint
and the comparison's rows equal each run's own best metrics row."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from memscan.cli import app

runner = CliRunner()


def _tiny_checkpoints(root):
    """checkpoint-10 (a full DDIM pipeline) and checkpoint-20 (unet/ only, completed by --base)."""
    from diffusers import DDIMPipeline, DDIMScheduler
    from gen_support import tiny_unet

    base = root / "base"
    for step, seed in ((10, 0), (20, 1)):
        unet = tiny_unet(size=8, channels=1, blocks=(8, 8), seed=seed)
        ck = root / "ckpts" / f"checkpoint-{step}"
        if step == 10:
            DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(ck)
            DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(base)
        else:
            unet.save_pretrained(ck / "unet")
    return root / "ckpts", base


def test_mia_sweep_compares_each_checkpoints_best_attack(tmp_path):
    pytest.importorskip("diffusers")
    from memscan.synthetic import write_training_set

    ckpts, base = _tiny_checkpoints(tmp_path)
    ids = write_training_set(tmp_path / "data", 12, size=8, channels=1)
    (tmp_path / "members.txt").write_text("\n".join(ids[:6]) + "\n")
    out = tmp_path / "sweep"
    argv = [
        "mia", "--model", ckpts, "--base", base, "--data", tmp_path / "data", "--members", tmp_path / "members.txt",
        "--out", out, "--timesteps", "10,50", "--noise-draws", 1, "--bootstrap", 20, "--outliers", "--quiet",
    ]  # fmt: skip
    res = runner.invoke(app, [str(a) for a in argv])
    assert res.exit_code == 0, res.output
    # --outliers: each checkpoint's run records the analysis (it was dropped in a sweep)
    assert res.output.count("outliers: Spearman's rho") == 2
    for s in (10, 20):
        assert len(pd.read_parquet(out / f"checkpoint-{s}" / "outliers.parquet")) == 12
        assert "Memorization vs outliers" in (out / f"checkpoint-{s}" / "report.html").read_text()
    t = pd.read_parquet(out / "compare.parquet").sort_values("step")
    assert t["step"].tolist() == [10, 20] and t["kind"].tolist() == ["mia", "mia"]
    for _, row in t.iterrows():
        met = pd.read_parquet(out / row["label"] / "metrics.parquet")
        best = met.sort_values(["tpr@1%fpr", "auc"], ascending=False, kind="stable").iloc[0]
        for col in ("auc", "auc_lo", "auc_hi", "tpr@1%fpr", "tpr@1%fpr_lo", "tpr@1%fpr_hi"):
            assert row[col] == pytest.approx(best[col])
    m10, m20 = (json.loads((out / f"checkpoint-{s}" / "manifest.json").read_text()) for s in (10, 20))
    assert m20["model"]["training_step"] == 20 and m10["model"]["training_step"] == 10
    # the same attack: no setting or data record differs between the two runs (memscan.compare.checks)
    assert json.loads((out / "manifest.json").read_text())["mismatches"] == []
    assert t["mismatch"].tolist() == ["", ""] and m10["loss"] == m20["loss"]


def test_base_without_a_checkpoint_folder_is_refused(tmp_path):
    res = runner.invoke(
        app,
        [
            "mia",
            "--model",
            str(tmp_path),
            "--base",
            str(tmp_path),
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2 and "--base applies to checkpoint sweeps" in res.output


def test_a_sweep_folder_keeps_the_base_it_started_with(tmp_path):
    """A unet/-only checkpoint is completed by links to --base's components in the sweep's
    folder. A second invocation with another --base used to reuse the first base's links without
    a word (its scheduler, VAE, text encoder): refused now, naming the link and both bases; the
    original base still works, and links whose base moved are made anew."""
    from memscan.errors import InputError
    from memscan.generators.checkpoints import list_checkpoints, model_dir

    for name, beta in (("baseA", "linear"), ("baseB", "scaled_linear")):
        (tmp_path / name / "scheduler").mkdir(parents=True)
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        config = {"_class_name": "DDIMScheduler", "beta_schedule": beta}
        (tmp_path / name / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    (tmp_path / "ckpts" / "checkpoint-10" / "unet").mkdir(parents=True)
    (tmp_path / "ckpts" / "checkpoint-10" / "unet" / "config.json").write_text("{}")
    (ckpt,) = list_checkpoints(tmp_path / "ckpts")
    work = tmp_path / "sweep" / ".models"

    def beta(folder):
        return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["beta_schedule"]

    assert beta(model_dir(ckpt, tmp_path / "baseA", work)) == "linear"
    with pytest.raises(InputError, match=r"scheduler already links to .*baseA.*--base differs"):
        model_dir(ckpt, tmp_path / "baseB", work)
    assert beta(model_dir(ckpt, tmp_path / "baseA", work)) == "linear"  # the original base: as before
    (tmp_path / "baseA").rename(tmp_path / "baseA-moved")  # its links now dangle: made anew
    assert beta(model_dir(ckpt, tmp_path / "baseB", work)) == "scaled_linear"
    assert (work / "checkpoint-10" / "unet").resolve() == (tmp_path / "ckpts" / "checkpoint-10" / "unet").resolve()
