"""The extraction attack end to end through the CLI, with a generator whose memorization is known."""

import json

import pandas as pd
import pytest
from conftest import run_cli
from gen_support import MEMORIZED

from memscan.synthetic import training_image


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory, synth_train):
    root = tmp_path_factory.mktemp("e2e")
    prompts = list(MEMORIZED) + [f"fresh {i}" for i in range(10)]
    (root / "prompts.txt").write_text("\n".join(prompts[:8]) + "\n\n" + "\n".join(prompts[8:]) + "\n")
    run = root / "run"
    proc = run_cli(
        "extract",
        "--model",
        "py:gen_support:planted",
        "--prompts",
        root / "prompts.txt",
        "--train",
        synth_train,
        "--out",
        run,
        "--samples-per-prompt",
        60,
        "--shard-size",
        4,
        "--batch-size",
        25,
        "--quiet",
    )
    return run, proc, prompts


def test_every_planted_copy_is_detected_and_extracted_and_nothing_else(e2e_run):
    run, proc, prompts = e2e_run
    det = pd.read_parquet(run / "detections.parquet")
    ext = pd.read_parquet(run / "extractions.parquet")
    assert len(det) == len(prompts)
    by_prompt = det.set_index("prompt")
    for prompt in prompts:
        assert bool(by_prompt.loc[prompt, "detected"]) == (prompt in MEMORIZED), prompt
    top = ext[ext["rank"] == 1].merge(det[["prompt_id", "prompt"]], on="prompt_id")
    assert set(top.loc[top["extracted"], "prompt"]) == set(MEMORIZED)
    for r in top.itertuples():
        assert r.train_id == MEMORIZED[r.prompt]
        assert r.tiled_l2 < 0.1
        assert r.eidetic_k == 1
    # memorized prompts: copy_rate 0.4 of 60 samples → cliques around 24, far above k = 10
    assert (det.loc[det["detected"], "clique_size"] >= 12).all()
    assert (det.loc[~det["detected"], "clique_size"] < 10).all()


def test_run_directory_contents(e2e_run):
    run, proc, prompts = e2e_run
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["samples_per_prompt"] == 60
    assert manifest["config"]["alpha"] == 0.08 and manifest["config"]["delta"] == 0.15
    assert manifest["prompts"]["blank_lines_skipped"] == 1
    assert manifest["definitions"]["eidetic_k"].startswith("training images within delta of the extracted training")
    assert manifest["counts"] == {
        "prompts": 15,
        "samples": 900,
        "detections": 5,
        "undecided": 0,
        "extractions": 5,
        "extracted_images": 5,
    }
    assert manifest["throughput"]["generation_images_per_s"] > 0
    assert manifest["versions"]["torch"]
    # the one lifecycle's manifest (issue 12): kind instead of command, the model record, the runner
    assert manifest["kind"] == "extract" and manifest["memscan_run"] == 2 and "command" not in manifest
    assert manifest["model"] == {"id": "py:gen_support:planted", "parameters": None, "training_step": None}
    assert manifest["runner"]["name"] == "local" and manifest["n_shards"] == 4
    assert len(list((run / "images" / "candidates").glob("*.png"))) == 5
    assert len(list((run / "images" / "train").glob("*.png"))) == 5
    assert len(list((run / "shards").glob("*.done.json"))) == 4
    assert "5 extractions" in proc.stdout
    det = pd.read_parquet(run / "detections.parquet")
    assert {"prompt_id", "clique_size", "mean_clique_distance", "clique_method"} <= set(det.columns)
    assert set(det["clique_method"]) == {"exact"}


def test_verify_with_other_threshold_and_report(e2e_run, tmp_path):
    import shutil

    run, _, _ = e2e_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    proc = run_cli("verify", copy, "--delta", "0.001")
    assert "0 extractions" in proc.stdout
    ext = pd.read_parquet(copy / "extractions.parquet")
    assert not ext["extracted"].any() and (ext["delta"] == 0.001).all()
    run_cli("verify", copy, "--delta", "0.15")
    assert pd.read_parquet(copy / "extractions.parquet").query("rank == 1")["extracted"].sum() == 5
    out = run_cli("report", copy).stdout.strip()
    html = (copy / "report.html").read_text()
    assert out.endswith("report.html")
    assert html.count('class="card"') == 5
    assert "caption of t0042" in html


def test_verify_holds_the_run_lock_and_keeps_the_manifest_on_failure(e2e_run, tmp_path):
    import os
    import shutil
    import socket

    run, _, _ = e2e_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "manifest.json").read_bytes()
    (copy / ".lock").write_text(f"pid={os.getpid()} host={socket.gethostname()} since=now")
    busy = run_cli("verify", copy, "--delta", "0.001", check=False)
    assert busy.returncode == 2 and "in use by another memscan process" in busy.stderr
    (copy / ".lock").unlink()
    bad = run_cli("verify", copy, "--min-clique", "2", check=False)  # below the run's k: refused
    assert bad.returncode == 2 and "below the run's" in bad.stderr
    assert (copy / "manifest.json").read_bytes() == before and not (copy / ".lock").exists()
    run_cli("verify", copy, "--delta", "0.001")
    m = json.loads((copy / "manifest.json").read_text())
    assert m["status"] == "complete" and m["reverified"][-1]["delta"] == 0.001 and "resumed" not in m


def test_candidate_is_a_copy_of_its_training_image(e2e_run):
    from memscan import tiled_l2
    from memscan.data.images import read_image

    run, _, _ = e2e_run
    det = pd.read_parquet(run / "detections.parquet").query("detected")
    for r in det.itertuples():
        cand = read_image(run / r.candidate_image, (32, 32), 3)
        assert float(tiled_l2(cand, training_image(MEMORIZED[r.prompt], 32))) < 0.1


def test_bad_generator_outputs_give_one_line_errors(tmp_path, synth_train):
    (tmp_path / "p.txt").write_text("a\n")
    for name, needle in [("wrong_shape", "shape"), ("nan_output", "NaN"), ("wrong_dtype", "dtype")]:
        proc = run_cli(
            "extract",
            "--model",
            f"py:gen_support:{name}",
            "--prompts",
            tmp_path / "p.txt",
            "--train",
            synth_train,
            "--out",
            tmp_path / name,
            "--samples-per-prompt",
            10,
            "--quiet",
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.strip().startswith("error:")


def test_counts_name_the_prompts_a_bounded_clique_search_left_undecided():
    """A prompt not detected whose clique search stopped at its budget with an upper bound still
    ≥ min_clique is undecided (a larger search could detect it); a bounded search whose bound is
    below min_clique, an exact one, and a detected prompt are not."""
    from memscan.extraction.verify import empty_extractions, extraction_counts

    det = pd.DataFrame(
        {
            "n_samples": [50] * 4,
            "detected": [False, False, False, True],
            "clique_size": [6, 6, 6, 12],
            "clique_method": ["bounded", "bounded", "exact", "bounded"],
            "clique_upper_bound": [14, 9, 6, 20],
        }
    )
    counts = extraction_counts(det, empty_extractions(), min_clique=10)
    assert counts == {
        "prompts": 4,
        "samples": 200,
        "detections": 1,
        "undecided": 1,
        "extractions": 0,
        "extracted_images": 0,
    }
    assert extraction_counts(det, empty_extractions(), min_clique=9)["undecided"] == 2


def test_counts_of_extracted_images_are_distinct_training_images():
    """Three prompts extract, two of them the same training image: 3 extractions, 2 images; a
    rank-2 row and an unextracted prompt add nothing."""
    from memscan.extraction.verify import extraction_counts

    det = pd.DataFrame({"n_samples": [10] * 4, "detected": [True] * 4, "clique_size": [12] * 4,
                        "clique_method": ["exact"] * 4, "clique_upper_bound": [12] * 4})  # fmt: skip
    ext = pd.DataFrame({"prompt_id": ["a", "b", "c", "c", "d"], "rank": [1, 1, 1, 2, 1],
                        "train_id": ["t1", "t1", "t2", "t3", "t4"],
                        "extracted": [True, True, True, True, False]})  # fmt: skip
    counts = extraction_counts(det, ext, min_clique=10)
    assert counts["extractions"] == 3 and counts["extracted_images"] == 2


def test_verify_refuses_a_higher_min_clique_on_an_adaptive_run_that_stopped_at_k(tmp_path):
    """An adaptive run with stop_when_detected stops a prompt once its clique reaches k, so its
    recorded clique size is no measure at a higher k: the full run re-verified at 40 detects the
    copying prompt, the adaptive run would silently not — it is refused; k itself stays allowed."""
    from memscan import ExtractConfig, extract
    from memscan.errors import InputError
    from memscan.extraction.pipeline import reverify
    from memscan.synthetic import SyntheticGenerator, write_training_set

    write_training_set(tmp_path / "train", 20, size=32)
    gen = SyntheticGenerator({"copy": "t0003"}, size=32, copy_rate=0.6)
    base = dict(samples_per_prompt=120, min_clique=10, batch_size=30)
    full = extract(gen, ["copy"], tmp_path / "train", tmp_path / "full", ExtractConfig(**base), progress=False)
    adaptive = ExtractConfig(**base, adaptive=True, first_round=30, round_size=30)
    ad = extract(gen, ["copy"], tmp_path / "train", tmp_path / "ad", adaptive, progress=False)
    assert reverify(full.run_dir, tmp_path / "train", min_clique=40).manifest["counts"]["detections"] == 1
    assert int(ad.detections["n_samples"].iloc[0]) < 120  # it did stop early
    before = (ad.run_dir / "manifest.json").read_bytes()
    with pytest.raises(InputError, match="above the run's 10") as err:
        reverify(ad.run_dir, tmp_path / "train", min_clique=40)
    assert "--min-clique 40" in err.value.hint
    assert (ad.run_dir / "manifest.json").read_bytes() == before
    assert reverify(ad.run_dir, tmp_path / "train", min_clique=10).manifest["counts"]["detections"] == 1
