"""The embedded demo: deterministic data, safetensors-only weights, and the quick run end to end."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from memscan.demo.data import DemoDataConfig, build_demo_data, write_demo_data
from memscan.demo.run import candidate_prompts, model_dir


def _digest(root):
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_dataset_builder_is_deterministic_and_matches_ground_truth(tmp_path):
    cfg = DemoDataConfig(n_unique=40, counts=(1, 3, 7), per_count=2)
    a, b = build_demo_data(cfg), build_demo_data(cfg)
    write_demo_data(a, tmp_path / "a")
    write_demo_data(b, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    other = build_demo_data(DemoDataConfig(seed=1, n_unique=40, counts=(1, 3, 7), per_count=2))
    assert other.planted != a.planted

    truth = pd.read_csv(tmp_path / "a" / "ground_truth.csv")
    files = [p.stem for p in (tmp_path / "a" / "train").glob("*.png")]
    per_base = pd.Series([f.split("_c")[0] for f in files]).value_counts()
    for row in truth.itertuples():
        assert per_base[row.base_id] == row.copies
        # every copy is the same image
        imgs = a.images[[i for i, bid in enumerate(a.base_ids) if bid == row.base_id]]
        assert (imgs == imgs[0]).all()
    assert sorted(truth.loc[truth["planted"], "copies"]) == [1, 1, 3, 3, 7, 7]
    assert len(truth) == 46 and len(files) == 40 + 2 * (1 + 3 + 7)
    meta = json.loads((tmp_path / "a" / "ground_truth.json").read_text())
    assert meta["recipe"]["counts"] == [1, 3, 7]


def test_candidate_selection_counts_duplicates_exactly():
    data = build_demo_data(DemoDataConfig(n_unique=60, counts=(1, 2, 5, 9), per_count=2))
    p = candidate_prompts(data, unique_prompts=6, min_count=1)
    assert (p["duplicate_count"] == p["planted_copies"]).all()
    assert sorted(p.loc[p["planted_copies"] > 1, "prompt_id"]) == sorted(b for b in data.planted if data.copies[b] > 1)
    assert (p["planted_copies"] == 1).sum() == 6


def test_score_counts_planted_images_and_lists_only_false_unique_extractions(tmp_path):
    """Per count: the images planted that many times (ground truth, attacked or not) apart from
    the candidate prompts of that count; a unique image whose candidate is its own image is a
    correct extraction (counted by precision), only one whose candidate is not is listed false."""
    from PIL import Image

    from memscan.demo.run import score

    data = build_demo_data(DemoDataConfig(n_unique=30, counts=(1, 3, 6), per_count=2))
    prompts = candidate_prompts(data, unique_prompts=4, min_count=1)
    prompts = prompts[prompts["planted_copies"] != 3].reset_index(drop=True)  # count 3: planted, not attacked
    base = data.base_images()
    unique = prompts.loc[prompts["planted_copies"] == 1, "prompt_id"].tolist()
    right, wrong = unique[0], unique[1]
    six = prompts.loc[prompts["planted_copies"] == 6, "prompt_id"].tolist()[0]
    (tmp_path / "c").mkdir()
    cands = {right: base[right], wrong: 255 - base[right], six: base[six]}
    for pid, img in cands.items():
        Image.fromarray(img[..., 0]).save(tmp_path / "c" / f"{pid}.png")
    pd.DataFrame({"prompt_id": prompts["prompt_id"],
                  "candidate_image": [f"c/{p}.png" if p in cands else None for p in prompts["prompt_id"]]}
                 ).to_parquet(tmp_path / "detections.parquet")  # fmt: skip
    pd.DataFrame({"prompt_id": list(cands), "rank": 1, "extracted": True}).to_parquet(tmp_path / "extractions.parquet")
    s = score(tmp_path, data, prompts, delta=0.1, shape=base[right].shape)
    assert s["false_extractions_of_unique_images"] == [wrong]
    assert s["precision"] == 2 / 3 and s["extractions"] == 3
    by = s["extracted_by_duplicate_count"]
    n_unique_prompts = int((prompts["planted_copies"] == 1).sum())
    assert by["1"] == {"images_planted": 2, "prompts": n_unique_prompts, "attacked": n_unique_prompts, "extracted": 2}
    assert by["3"] == {"images_planted": 2, "prompts": 0, "attacked": 0, "extracted": 0}
    assert by["6"] == {"images_planted": 2, "prompts": 2, "attacked": 2, "extracted": 1}


def test_shipped_weights_load_through_safetensors_only(monkeypatch):
    import torch

    from memscan.generators.diffusers_unet import load_unet_generator

    files = [p.name for p in model_dir().rglob("*") if p.is_file()]
    assert "diffusion_pytorch_model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    size = (model_dir() / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size <= 10 * 2**20

    def no_pickle(*a, **k):
        raise AssertionError("torch.load must not be used for the demo model")

    monkeypatch.setattr(torch, "load", no_pickle)
    gen = load_unet_generator(str(model_dir()), batch_size=4)
    meta = json.loads((model_dir() / "memscan.json").read_text())
    x = gen.generate(meta["class_captions"][0], [1, 2])
    assert x.shape == (2, 16, 16, 1) and x.dtype == np.uint8
    # the same seed alone gives the same image as inside a batch
    np.testing.assert_allclose(gen.generate(meta["class_captions"][0], [2])[0].astype(int), x[1].astype(int), atol=1)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "d"
    # the audit, then the brute force it is compared with: ≈ 50 s idle, 550 s at a load of 10 on 2 cores
    proc = run_cli("demo", "--quick", "--out", out, "--quiet", timeout=1500)
    return out, proc


def test_quick_demo_extracts_the_most_duplicated_images(quick_demo):
    out, proc = quick_demo
    s = json.loads((out / "summary.json").read_text())
    by = s["extracted_by_duplicate_count"]
    # the most duplicated planted images (≥ 50 copies) are extracted
    assert s["recall_at_50plus"] >= 0.75, by
    assert by["200"]["extracted"] >= 3 and by["100"]["extracted"] >= 3
    assert s["precision"] == 1.0
    assert "report" in proc.stdout and (out / "run" / "report.html").exists()
    assert s["timings_s"]["total"] > 0 and s["thresholds"]["delta"] == 0.15


def test_quick_demo_runs_through_the_audit_and_compares_with_the_full_budget(quick_demo):
    out, proc = quick_demo
    s = json.loads((out / "summary.json").read_text())
    m = json.loads((out / "run" / "manifest.json").read_text())
    assert m["kind"] == "audit" and s["evaluations_spent"] == m["evaluations_total"]
    full = json.loads((out / "full_budget" / "manifest.json").read_text())
    # the full budget: every candidate × 40 generations × 20 DDIM steps (unguided)
    assert s["evaluations_full_budget"] == full["counts"]["samples"] * 20 == s["prompts"] * 40 * 20
    assert s["evaluations_spent"] <= 0.4 * s["evaluations_full_budget"]
    ours = set(pd.read_parquet(out / "run" / "extractions.parquet").query("rank == 1 and extracted")["prompt_id"])
    theirs = set(
        pd.read_parquet(out / "full_budget" / "extractions.parquet").query("rank == 1 and extracted")["prompt_id"]
    )
    assert s["found_of_full_budget"] == len(ours & theirs) / len(theirs) and s["found_of_full_budget"] >= 0.9
    # the controls: every image planted once is attacked, and none is extracted
    once = s["extracted_by_duplicate_count"]["1"]
    assert once["attacked"] == once["prompts"] == 8 and once["extracted"] == 0
    # and every planted count has its true number of images planted, attacked or not (ground truth)
    truth = build_demo_data()
    for k, v in s["extracted_by_duplicate_count"].items():
        assert v["images_planted"] == sum(truth.copies[b] == int(k) for b in truth.planted)
    assert set(s["extracted_by_duplicate_count"]) >= {str(truth.copies[b]) for b in truth.planted}
    assert "found of full budget" in proc.stdout and "UNet evaluations" in proc.stdout


def test_quick_demo_reports_no_unique_image_unless_it_truly_matches(quick_demo):
    from memscan import tiled_l2
    from memscan.data.images import read_image

    out, _ = quick_demo
    det = pd.read_parquet(out / "run" / "detections.parquet")
    ext = pd.read_parquet(out / "run" / "extractions.parquet").query("rank == 1 and extracted")
    prompts = pd.read_csv(out / "prompts.csv")
    data = build_demo_data()
    base = data.base_images()
    unique = set(prompts.loc[prompts["planted_copies"] == 1, "prompt_id"])
    assert unique, "the quick demo attacks some unique images"
    for pid in set(ext["prompt_id"]) & unique:
        rel = det.loc[det["prompt_id"] == pid, "candidate_image"].iloc[0]
        assert float(tiled_l2(read_image(out / "run" / rel, (16, 16), 1), base[pid])) <= 0.15


def test_quick_demo_verified_through_a_flat_index_equals_its_train_path(quick_demo, tmp_path):
    """Issue 18 on the demo: the full-budget run's candidates (verified with --train against all
    2,072 training images) verified again through a flat pixel index with K ≥ N give the same
    extraction table: same matches, same distances, same k-eidetic counts."""
    from memscan.data.images import read_image
    from memscan.extraction.verify_index import IndexVerification, IndexVerifier, verify_candidates_indexed
    from memscan.index.faiss_index import build_index

    out, _ = quick_demo
    run = out / "full_budget"
    m = json.loads((run / "manifest.json").read_text())
    n_train, shape, cfg = m["training_set"]["images"], tuple(m["output_shape"]), m["config"]
    build_index(out / "data" / "train", tmp_path / "idx", embedder="pixel:8", index_type="flat", progress=False)
    det = pd.read_parquet(run / "detections.parquet")
    cands = det[det["detected"] & det["candidate_image"].notna()].reset_index(drop=True)
    assert len(cands) >= 10
    imgs = np.stack([read_image(run / p, shape[:2], shape[2]) for p in cands["candidate_image"]])
    verifier = IndexVerifier(IndexVerification(str(tmp_path / "idx"), n_train))
    ext, stats = verify_candidates_indexed(
        cands, imgs, verifier, delta=cfg["delta"], grid=cfg["grid"], n_nearest=cfg["n_nearest"]
    )
    want = pd.read_parquet(run / "extractions.parquet")
    key = ["prompt_id", "rank"]
    pd.testing.assert_frame_equal(
        ext.sort_values(key).reset_index(drop=True)[list(want.columns)],
        want.sort_values(key).reset_index(drop=True),
        check_exact=True,
    )
    assert stats["candidates"] == len(cands) and stats["skipped_count"] == 0
    assert ext.query("rank == 1 and extracted")["prompt_id"].nunique() >= 10


def test_recall_counts_the_prompts_planted_50_times_or_more(tmp_path):
    """``recall_at_50plus``: of the candidate prompts whose image was planted ≥ 50 times, the
    share extracted — a 50-copy prompt counts, a 49-copy one does not. By hand: both 49-copy
    prompts and one of the two 50-copy prompts extracted → 1/2."""
    from PIL import Image

    from memscan.demo.run import score

    data = build_demo_data(DemoDataConfig(n_unique=6, counts=(1, 49, 50), per_count=2))
    prompts = candidate_prompts(data, unique_prompts=2, min_count=1)
    base = data.base_images()
    by_copies = {c: prompts.loc[prompts["planted_copies"] == c, "prompt_id"].tolist() for c in (49, 50)}
    assert len(by_copies[49]) == 2 and len(by_copies[50]) == 2
    chosen = [*by_copies[49], by_copies[50][0]]
    (tmp_path / "c").mkdir()
    for pid in chosen:
        Image.fromarray(base[pid][..., 0]).save(tmp_path / "c" / f"{pid}.png")
    pd.DataFrame({"prompt_id": prompts["prompt_id"],
                  "candidate_image": [f"c/{p}.png" if p in chosen else None for p in prompts["prompt_id"]]}
                 ).to_parquet(tmp_path / "detections.parquet")  # fmt: skip
    pd.DataFrame({"prompt_id": chosen, "rank": 1, "extracted": True}).to_parquet(tmp_path / "extractions.parquet")
    s = score(tmp_path, data, prompts, delta=0.1, shape=base[chosen[0]].shape)
    assert s["recall_at_50plus"] == 1 / 2 and s["precision"] == 1.0 and s["extractions"] == 3
