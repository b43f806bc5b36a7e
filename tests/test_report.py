"""The report is made from the tables alone and shows untrusted captions as text."""

import json
import re

import pandas as pd

from memscan import ExtractConfig, extract
from memscan.report.registry import build_report
from memscan.synthetic import SyntheticGenerator, write_training_set

HOSTILE = '<script>alert(1)</script><img src=x onerror=alert(2)> [x](javascript:alert(3)) " onmouseover="alert(4)'


def test_hostile_caption_and_prompt_are_escaped(tmp_path):
    train = tmp_path / "train"
    write_training_set(train, 10, size=16)
    (train / "t0002.txt").write_text(HOSTILE)
    gen = SyntheticGenerator({HOSTILE: "t0002"}, size=16, copy_rate=0.6)
    prompts = pd.DataFrame({"prompt_id": ["../../evil"], "prompt": [HOSTILE]})
    extract(gen, prompts, train, tmp_path / "run", ExtractConfig(samples_per_prompt=30, shard_size=1), progress=False)
    html = build_report(tmp_path / "run").read_text()
    assert "<script>" not in html and "onerror=alert" not in html.replace("onerror=alert(2)&gt;", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count('class="card"') == 1
    # the id with path separators became a safe file name inside the run
    assert not (tmp_path / "evil.png").exists()
    assert all(".." not in p.name for p in (tmp_path / "run" / "images" / "candidates").iterdir())
    assert "Content-Security-Policy" in html
    # only data: images, no external references
    assert not re.search(r'src="(?!data:)', html)


def test_report_rebuilds_from_tables_alone(tmp_path):
    train = tmp_path / "train"
    write_training_set(train, 10, size=16)
    gen = SyntheticGenerator({"p": "t0001"}, size=16, copy_rate=0.6)
    extract(
        gen,
        pd.DataFrame({"prompt_id": ["p"], "prompt": ["p"], "duplicate_count": [7]}),
        train,
        tmp_path / "run",
        ExtractConfig(samples_per_prompt=30),
        progress=False,
    )
    import shutil

    shutil.rmtree(train)  # the training set is gone: the report needs only the run
    html = build_report(tmp_path / "run", tmp_path / "r.html").read_text()
    assert "Extraction rate vs duplicate count" in html
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert f'<td class="num">{m["counts"]["samples"]}</td>' in html


def test_index_verification_rows_have_their_own_heading(tmp_path):
    """A run verified through an index: its rows under "Verification through the training index",
    never under the demo's heading; the demo's rows, when given, under theirs."""
    from memscan.index.faiss_index import build_index

    train = tmp_path / "train"
    write_training_set(train, 12, size=16)
    build_index(train, tmp_path / "idx", embedder="pixel:8", index_type="flat", progress=False)
    gen = SyntheticGenerator({"p": "t0001"}, size=16, copy_rate=0.6)
    extract(gen, ["p"], None, tmp_path / "run", ExtractConfig(samples_per_prompt=30), progress=False,
            index=tmp_path / "idx", retrieve=5)  # fmt: skip
    html = build_report(tmp_path / "run").read_text()
    head = html.index("<h2>Verification through the training index</h2>")
    assert "Demo ground truth" not in html
    assert head < html.index("k-eidetic counts</th><td>counted among the up to 5 retrieved training images only")
    html = build_report(tmp_path / "run", extra_summary={"planted": "1/1"}).read_text()
    assert head < html.index("<h2>Demo ground truth</h2>") < html.index("<th>planted</th>")


def test_extract_summary_shows_distinct_images_extracted_and_undecided_prompts(tmp_path):
    """Two prompts copy the same training image: 2 extractions, 1 distinct training image, both
    on the page (recounted from the extraction table); the undecided prompts are shown with the
    sentence that they count as not detected."""
    import re

    train = tmp_path / "train"
    write_training_set(train, 10, size=16)
    gen = SyntheticGenerator({"a": "t0001", "b": "t0001"}, size=16, copy_rate=0.6)
    prompts = pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["a", "b"]})
    extract(gen, prompts, train, tmp_path / "run", ExtractConfig(samples_per_prompt=30), progress=False)
    ext = pd.read_parquet(tmp_path / "run" / "extractions.parquet").query("rank == 1 and extracted")
    assert len(ext) == 2 and ext["train_id"].nunique() == 1
    html = build_report(tmp_path / "run", tmp_path / "r.html").read_text()
    assert re.search(r'distinct training images extracted</th><td class="num">1</td>', html)
    assert re.search(r'extractions \(prompts\)</th><td class="num">2</td>', html)
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert re.search(rf'undecided prompts</th><td class="num">{m["counts"]["undecided"]}</td>', html)
    assert "counted as not detected" in html


def test_prompt_without_expected_image_gets_no_match_row(tmp_path):
    """A prompt table whose ``train_id`` is null for the extracted prompt (pandas reads it back
    as NaN): the extraction is no mismatch — ``expected_train_id`` null, ``matches_expected``
    null — and its card shows no "prompt's own training image" row; a prompt with an expected
    image still gets one."""
    train = tmp_path / "train"
    write_training_set(train, 10, size=16)
    gen = SyntheticGenerator({"a": "t0001", "b": "t0002"}, size=16, copy_rate=0.6)
    prompts = pd.DataFrame({"prompt_id": ["pa", "pb"], "prompt": ["a", "b"], "train_id": [None, "t0002"]})
    extract(gen, prompts, train, tmp_path / "run", ExtractConfig(samples_per_prompt=30), progress=False)
    ext = pd.read_parquet(tmp_path / "run" / "extractions.parquet")
    top = ext[ext["rank"] == 1].set_index("prompt_id")
    assert bool(top.loc["pa", "extracted"]) and bool(top.loc["pb", "extracted"])
    assert pd.isna(top.loc["pa", "expected_train_id"]) and pd.isna(top.loc["pa", "matches_expected"])
    assert top.loc["pb", "expected_train_id"] == "t0002" and bool(top.loc["pb", "matches_expected"])
    html = build_report(tmp_path / "run").read_text()
    assert html.count("prompt's own training image") == 1
    assert "other image" not in html and ">nan<" not in html
    # memscan verify reads the prompts back from detections.parquet, where the null is NaN: the
    # re-verified rows stay null too
    from memscan.extraction.pipeline import reverify

    reverify(tmp_path / "run", delta=0.2)
    ext = pd.read_parquet(tmp_path / "run" / "extractions.parquet")
    top = ext[ext["rank"] == 1].set_index("prompt_id")
    assert pd.isna(top.loc["pa", "expected_train_id"]) and pd.isna(top.loc["pa", "matches_expected"])
    assert bool(top.loc["pb", "matches_expected"])
    assert "other image" not in build_report(tmp_path / "run").read_text()
