"""`memscan demo-mia`, `memscan mia`, `memscan inpaint` and `memscan memscore` end to end on tiny
inputs; tables checked against independent recomputation."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from memscan.cli import app
from memscan.mia.loss import diffusion_loss
from memscan.mia.memscore import memorization_score
from memscan.mia.metrics import roc_metrics
from memscan.mia.noise import load_noise_predictor
from memscan.mia.shadow import load_shadow_models, torch_threads

runner = CliRunner()


def _cli(*args, ok=True):
    res = runner.invoke(app, [str(a) for a in args])
    if ok and res.exit_code != 0:
        raise AssertionError(
            f"memscan {' '.join(map(str, args))} failed ({res.exit_code}):\n{res.output}\n{res.exception!r}"
        )
    return res


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-mia") / "d"
    with torch_threads(1):
        res = _cli("demo-mia", "--quick", "--quiet", "--out", out)
    assert "diffusion_loss: best" in res.output and "inpaint_distance: best" in res.output
    return out


def test_demo_mia_tables_match_independent_recomputation(demo):
    run = demo / "run"
    m = json.loads((run / "manifest.json").read_text())
    assert m["kind"] == "demo-mia" and m["status"] == "complete"
    sm = load_shadow_models(demo / "shadows")
    ex = pd.read_parquet(run / "examples.parquet")
    assert ex["id"].tolist() == sm.ids
    np.testing.assert_array_equal(ex["is_member"].to_numpy(), sm.membership[0])
    np.testing.assert_array_equal(ex["n_in_shadows"].to_numpy(), sm.membership[1:].sum(0))

    # the target's losses, recomputed directly from its saved model and the pool images
    losses = pd.read_parquet(run / "losses.parquet")
    assert set(losses["model"]) == {"shadow_0000", "shadow_0001", "shadow_0002", "shadow_0003"}
    from PIL import Image

    imgs = np.stack([np.asarray(Image.open(demo / "data" / f"{i}.png"))[..., None] for i in sm.ids])
    with torch_threads(1):
        p = load_noise_predictor(sm.model_dir(0))
        ts = m["loss"]["timesteps"]
        direct = diffusion_loss(p, imgs, ts, condition=p.null_class, noise_draws=m["loss"]["noise_draws"], seed=0)
    target = losses[losses["model"] == "shadow_0000"]
    for j, t in enumerate(ts):
        got = target[target["timestep"] == t].sort_values("index")["loss"].to_numpy()
        np.testing.assert_allclose(got, direct[j], rtol=1e-5)

    # every metric row equals roc_metrics of the stored scores against the stored membership
    metrics = pd.read_parquet(run / "metrics.parquet")
    scores = pd.read_parquet(run / "scores.parquet")
    assert set(metrics["statistic"]) == {"diffusion_loss", "inpaint_distance"}
    assert "loss" in set(metrics["attack"])
    y = ex["is_member"].to_numpy()
    for r in metrics.to_dict("records"):
        sel = (scores["statistic"] == r["statistic"]) & (scores["attack"] == r["attack"])
        sel &= scores["timestep"].isna() if pd.isna(r["timestep"]) else scores["timestep"] == r["timestep"]
        sc = scores[sel].sort_values("index")["score"].to_numpy()
        ref = roc_metrics(sc, y)
        assert r["auc"] == pytest.approx(ref.auc)
        assert r["balanced_accuracy"] == pytest.approx(ref.balanced_accuracy)
        assert r["tpr@1%fpr"] == pytest.approx(ref.tpr_at_fpr(0.01))
    # the loss attack's score is minus the target's loss
    t0 = ts[0]
    sc = scores[(scores["attack"] == "loss") & (scores["timestep"] == t0)].sort_values("index")["score"].to_numpy()
    np.testing.assert_allclose(sc, -direct[0], rtol=1e-5)
    # attacks that could not run are recorded with their reason
    for s in m["skipped_attacks"]:
        assert s["reason"]

    html = (run / "report.html").read_text()
    assert "<script" not in html.lower() and "Content-Security-Policy" in html
    assert "Highest-scored members" in html and html.count("data:image/png;base64") >= 6


def test_mia_and_inpaint_commands(demo, tmp_path):
    sm = load_shadow_models(demo / "shadows")
    with torch_threads(1):
        a = _cli(
            "mia", "--data", demo / "data", "--shadows", demo / "shadows", "--target-shadow", 1,
            "--timesteps", "20,100", "--noise-draws", 1, "--bootstrap", 0, "--out", tmp_path / "a", "--quiet",
        )  # fmt: skip
        assert "best timestep" in a.output
        # the same target given as a model directory with a members file: same loss attack
        members = tmp_path / "members.txt"
        members.write_text("\n".join(i for i, m in zip(sm.ids, sm.membership[1]) if m) + "\n")
        _cli(
            "mia", "--data", demo / "data", "--model", sm.model_dir(1), "--members", members,
            "--timesteps", "20,100", "--noise-draws", 1, "--bootstrap", 0, "--out", tmp_path / "b", "--quiet",
        )  # fmt: skip
        c = _cli(
            "inpaint", "--data", demo / "data", "--shadows", demo / "shadows", "--target-shadow", 0,
            "--steps", 10, "--jump-n-sample", 1, "--region", "top", "--attacks", "loss,lira_offline_fixed",
            "--bootstrap", 0, "--out", tmp_path / "c", "--quiet",
        )  # fmt: skip
    ma = pd.read_parquet(tmp_path / "a" / "metrics.parquet")
    mb = pd.read_parquet(tmp_path / "b" / "metrics.parquet")
    assert set(mb["attack"]) == {"loss"}  # no shadows: the threshold attack only
    for t in (20, 100):
        ra = ma[(ma["attack"] == "loss") & (ma["timestep"] == t)].iloc[0]
        rb = mb[(mb["attack"] == "loss") & (mb["timestep"] == t)].iloc[0]
        assert ra["auc"] == pytest.approx(rb["auc"]) and ra["n_members"] == rb["n_members"]
    ea = pd.read_parquet(tmp_path / "a" / "examples.parquet")
    np.testing.assert_array_equal(ea["is_member"].to_numpy(), sm.membership[1])

    assert "inpaint_distance: best" in c.output
    dist = pd.read_parquet(tmp_path / "c" / "distances.parquet")
    assert len(dist) == sm.n_models * sm.n and dist["distance"].between(0, 1).all()
    mc = pd.read_parquet(tmp_path / "c" / "metrics.parquet")
    assert set(mc["attack"]) <= {"loss", "lira_offline_fixed"} and mc["timestep"].isna().all()
    assert list((tmp_path / "c" / "images" / "inpaint").glob("*.png"))
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["inpaint"]["region"] == "top" and manifest["inpaint"]["num_inference_steps"] == 10


def test_user_errors_are_one_line(demo, tmp_path):
    r = _cli("mia", "--data", demo / "data", "--out", tmp_path / "x", ok=False)
    assert r.exit_code == 2 and re.search(r"error: no target model", r.output)
    r = _cli(
        "mia", "--data", demo / "data", "--model", demo / "shadows" / "models" / "0000",
        "--members", tmp_path / "none.txt", "--out", tmp_path / "x", ok=False,
    )  # fmt: skip
    assert r.exit_code == 2 and "members file" in r.output
    members = tmp_path / "m.txt"
    members.write_text("img9999\n")
    r = _cli(
        "mia", "--data", demo / "data", "--model", demo / "shadows" / "models" / "0000",
        "--members", members, "--out", tmp_path / "x", ok=False,
    )  # fmt: skip
    assert r.exit_code == 2 and "not in the data" in r.output
    r = _cli(
        "mia", "--data", demo / "data", "--shadows", demo / "shadows", "--target-shadow", 0,
        "--timesteps", "5,1000", "--out", tmp_path / "x", ok=False,
    )  # fmt: skip
    assert r.exit_code == 2 and "not below T = 1000" in r.output
    r = _cli(
        "mia", "--data", demo / "data", "--shadows", demo / "shadows", "--target-shadow", 0,
        "--attacks", "lira", "--out", tmp_path / "x", ok=False,
    )  # fmt: skip
    assert r.exit_code == 2 and "unknown attack" in r.output
    r = _cli("demo-mia", "--quick", "--out", demo, ok=False)
    assert r.exit_code == 2 and "already holds" in r.output


GAUSS = """
import os
import numpy as np

def train(d):
    with open(os.environ["MEMSCAN_TEST_COUNTER"], "a") as f:
        f.write("x")
    return float(d.mean()), float(d.var())

def loglik(model, d):
    mu, var = model
    return -0.5 * np.log(2 * np.pi * var) - 0.5 * (d - mu) ** 2 / var
"""


def test_memscore_command_matches_the_library_and_resumes(tmp_path, monkeypatch):
    mod = tmp_path / "gauss.py"
    mod.write_text(GAUSS)
    counter = tmp_path / "calls.txt"
    counter.write_text("")
    monkeypatch.setenv("MEMSCAN_TEST_COUNTER", str(counter))
    x = np.r_[np.linspace(-1, 1, 19), 7.0]
    np.save(tmp_path / "x.npy", x)
    args = ("memscore", "--data", tmp_path / "x.npy", "--train-fn", f"py:{mod}:train",
            "--log-likelihood-fn", f"py:{mod}:loglik", "--folds", 5, "--repeats", 2, "--seed", 3,
            "--out", tmp_path / "run", "--quiet")  # fmt: skip
    r = _cli(*args)
    assert "most memorized: 19" in r.output
    assert len(counter.read_text()) == 10
    table = pd.read_parquet(tmp_path / "run" / "memscore.parquet")
    train = lambda d: (float(d.mean()), float(d.var()))  # noqa: E731

    def loglik(model, d):
        mu, var = model
        return -0.5 * np.log(2 * np.pi * var) - 0.5 * (d - mu) ** 2 / var

    ref = memorization_score(x, train, loglik, folds=5, repeats=2, seed=3)
    np.testing.assert_allclose(table["score"].to_numpy(), ref.score, rtol=1e-12)
    np.testing.assert_allclose(table["u"].to_numpy(), ref.u, rtol=1e-12)
    assert (table["n_in"] == 8).all() and (table["n_out"] == 2).all()
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Most memorized examples" in html and "<script" not in html.lower()
    # rerun: every (repeat, fold) is loaded from the store, nothing is trained again
    _cli(*args)
    assert len(counter.read_text()) == 10
    # (the common run lifecycle records each resumption's time; before it, ``resumed`` was True)
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert len(m["resumed"]) == 1 and m["status"] == "complete"
    assert pd.read_parquet(tmp_path / "run" / "memscore.parquet").equals(table)
    # --resume is accepted too; more repeats train only the new (repeat, fold) models
    _cli(*args[:9], "--repeats", 3, *args[11:], "--resume")
    assert len(counter.read_text()) == 15
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["memscore"]["repeats"] == 3
    # another fold setup is not the same run: refused, nothing trained
    r = _cli(*args[:7], "--folds", 4, *args[9:], "--resume", ok=False)
    assert r.exit_code == 2 and "folds_of differs" in r.output and len(counter.read_text()) == 15


def test_memscore_killed_run_needs_resume(tmp_path, monkeypatch):
    """A finished run reruns without --resume (above); a killed one asks for --resume, as every kind."""
    mod = tmp_path / "gauss.py"
    mod.write_text(GAUSS)
    monkeypatch.setenv("MEMSCAN_TEST_COUNTER", str(tmp_path / "calls.txt"))
    np.save(tmp_path / "x.npy", np.r_[np.linspace(-1, 1, 9), 5.0])
    from memscan.mia.memscore_run import run_memscore

    with pytest.raises(Exception, match="--resume"):
        run_memscore(tmp_path / "run", tmp_path / "x.npy", f"py:{mod}:train", f"py:{mod}:loglik",
                     folds=3, progress=False, stop_after_shards=1)  # fmt: skip
    args = ("memscore", "--data", tmp_path / "x.npy", "--train-fn", f"py:{mod}:train",
            "--log-likelihood-fn", f"py:{mod}:loglik", "--folds", 3, "--out", tmp_path / "run", "--quiet")  # fmt: skip
    r = _cli(*args, ok=False)
    assert r.exit_code == 2 and "--resume" in r.output
    _cli(*args, "--resume")
    assert len((tmp_path / "calls.txt").read_text()) == 3


def test_report_escapes_untrusted_ids(demo, tmp_path):
    """Example ids come from file names and captions from sidecar files: the report shows them as text."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    src = sorted((demo / "data").glob("*.png"))[:4]
    names = ["<script>alert(1)<", '"onmouseover=x"', "plain-a", "plain-b"]
    for s, name in zip(src, names):
        Image.open(s).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text("<img src=x onerror=alert(2)>")
    (tmp_path / "members.txt").write_text("<script>alert(1)<\nplain-a\n")
    with torch_threads(1):
        _cli(
            "mia", "--data", data, "--model", demo / "shadows" / "models" / "0000", "--members", tmp_path / "members.txt",
            "--timesteps", "50", "--noise-draws", 1, "--bootstrap", 0, "--out", tmp_path / "run", "--quiet",
        )  # fmt: skip
    html = (tmp_path / "run" / "report.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;" in html
    assert "&#34;onmouseover=x&#34;" in html and '"onmouseover=x"' not in html
    assert "<img src=x" not in html


def test_examples_outside_the_shadow_pool_are_reported(demo, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    shutil.copy(sorted(data.glob("*.png"))[0], data / "zz-extra.png")
    with torch_threads(1):
        r = _cli(
            "mia", "--data", data, "--shadows", demo / "shadows", "--target-shadow", 0, "--timesteps", "50",
            "--noise-draws", 1, "--attacks", "loss", "--bootstrap", 0, "--out", tmp_path / "run", "--quiet",
        )  # fmt: skip
    assert "1 example(s) of --data outside the shadow pool: not attacked" in r.output
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["sources"]["not_in_shadow_pool"] == {"count": 1, "first_ids": ["zz-extra"]}
    assert "zz-extra" not in set(pd.read_parquet(tmp_path / "run" / "examples.parquet")["id"])


def test_demo_mia_interrupted_attack_resumes_from_its_shards(demo, tmp_path, monkeypatch):
    """An attack stage killed after one shard commit resumes on the rerun (no --resume needed: the
    demo resumes what it started, training per model and the attack per shard): same tables."""
    import shutil

    from memscan.store import RunStore

    out = tmp_path / "d"
    out.mkdir()
    for part in ("data", "shadows"):  # the trained shadow models: nothing is trained again
        shutil.copytree(demo / part, out / part)
    original, commits = RunStore.commit_shard, []

    class Killed(BaseException):
        pass

    def commit_then_die(self, shard, tables, meta):
        original(self, shard, tables, meta)
        commits.append(shard)
        if len(commits) == 1:
            raise Killed

    monkeypatch.setattr(RunStore, "commit_shard", commit_then_die)
    with torch_threads(1), pytest.raises(Killed):
        runner.invoke(app, ["demo-mia", "--quick", "--quiet", "--out", str(out)], catch_exceptions=False)
    assert json.loads((out / "run" / "manifest.json").read_text())["status"] == "incomplete"
    with torch_threads(1):
        _cli("demo-mia", "--quick", "--quiet", "--out", out)
    m = json.loads((out / "run" / "manifest.json").read_text())
    assert m["status"] == "complete" and len(m["resumed"]) == 1
    assert sorted(commits) == list(range(m["n_shards"]))
    for t in ("examples", "losses", "distances", "scores", "metrics"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(demo / "run" / f"{t}.parquet"), pd.read_parquet(out / "run" / f"{t}.parquet")
        )


def test_mia_resume_refuses_data_rewritten_at_the_same_path(demo, tmp_path):
    """The run identity of ``mia``/``inpaint`` held the data's path only: a ``--resume`` after the
    images were rewritten in place mixed (or, finished, reused) losses of the old images with the
    new data. The manifest now records ``examples_sha256`` and a resume on other pixels is refused."""
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    args = (
        "mia", "--data", data, "--shadows", demo / "shadows", "--target-shadow", 1, "--timesteps", "20",
        "--noise-draws", 1, "--bootstrap", 0, "--attacks", "loss", "--out", tmp_path / "a", "--quiet",
    )  # fmt: skip
    with torch_threads(1):
        _cli(*args)
        digest = json.loads((tmp_path / "a" / "manifest.json").read_text())["examples_sha256"]
        assert re.fullmatch(r"[0-9a-f]{64}", digest)
        _cli(*args, "--resume")  # the same data: the finished run resumes
        first = sorted(data.glob("*.png"))[0]
        img = np.asarray(Image.open(first)).copy()
        img[0, 0] = 255 - img[0, 0]  # one pixel of one example
        Image.fromarray(img).save(first)
        res = _cli(*args, "--resume", ok=False)
    assert res.exit_code != 0
    assert "examples_sha256 differs" in res.output and "another --out" in res.output
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["examples_sha256"] == digest
    # memscan compare: the same ids and membership, other pixels — named as a data difference
    from memscan.compare.checks import data_mismatches

    with torch_threads(1):
        _cli(*args[:-3], "--out", tmp_path / "b", "--quiet")
    runs = [(str(tmp_path / r), json.loads((tmp_path / r / "manifest.json").read_text())) for r in "ab"]
    assert [m.key for m in data_mismatches("mia", runs)] == ["examples_sha256"]
    assert not data_mismatches("mia", [runs[0], runs[0]])


def test_examples_digest_is_over_content_not_alignment_order():
    """The same examples aligned in another order (the shadow pool's, or the data's with
    ``--model``/``--members``) are the same data for ``memscan compare``; a pixel, a caption, an
    id or a membership bit changed is not."""
    from memscan.mia.inputs import MiaInputs

    rng = np.random.default_rng(0)
    ids, caps = [f"e{i}" for i in range(6)], [f"c{i}" for i in range(6)]
    imgs, member = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8), np.arange(6) % 2 == 0

    def digest(order, images=imgs, captions=caps, is_member=member, names=ids):
        o = list(order)
        return MiaInputs([names[i] for i in o], [captions[i] for i in o], images[o], is_member[o],
                         None, "target", [], None, {}).examples_sha256()  # fmt: skip

    base = digest(range(6))
    assert digest([3, 1, 5, 0, 2, 4]) == base
    changed = imgs.copy()
    changed[2, 0, 0, 0] ^= 1
    assert digest(range(6), images=changed) != base
    assert digest(range(6), captions=caps[:5] + ["other"]) != base
    assert digest(range(6), is_member=~member) != base
    assert digest(range(6), names=ids[:5] + ["e9"]) != base
