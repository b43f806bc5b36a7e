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
