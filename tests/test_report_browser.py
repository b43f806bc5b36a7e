"""Open a report with hostile captions in headless Chromium: no script runs, the text is visible."""

import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

from memscan import ExtractConfig, extract
from memscan.report.registry import build_report
from memscan.synthetic import SyntheticGenerator, write_training_set

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = [
    "<script>document.title='PWNED-script'</script>",
    "<img src=x onerror=\"document.title='PWNED-onerror'\">",
    "<a href=\"javascript:document.title='PWNED-href'\">click</a> [md](javascript:alert(1)) **bold**",
    '" onmouseover="document.title=\'PWNED-attr\'" x="',
]


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium not installed (CI installs it)")
def test_hostile_captions_render_as_text_in_a_browser(tmp_path):
    assert CHROMIUM, "CI must install Debian's chromium (see .ci/run)"
    train = tmp_path / "train"
    write_training_set(train, 8, size=16)
    memorized = {}
    for i, text in enumerate(HOSTILE):
        (train / f"t{i:04d}.txt").write_text(text)
        memorized[text] = f"t{i:04d}"
    gen = SyntheticGenerator(memorized, size=16, copy_rate=0.7)
    prompts = pd.DataFrame({"prompt_id": [f"h{i}" for i in range(len(HOSTILE))], "prompt": HOSTILE})
    extract(gen, prompts, train, tmp_path / "run", ExtractConfig(samples_per_prompt=30, shard_size=2), progress=False)
    page = build_report(tmp_path / "run")
    assert page.read_text().count('class="card"') == len(HOSTILE)

    proc = _dump_dom(page, tmp_path)
    dom = proc.stdout
    assert "<body" in dom, proc.stderr[-2000:]
    title = re.search(r"<title>(.*?)</title>", dom, flags=re.S).group(1)
    assert "PWNED" not in title, title  # no script, handler or URL ran
    assert "memscan report" in title
    # the hostile text is shown as text (escaped in the serialized DOM), in the cards
    assert "&lt;script&gt;document.title='PWNED-script'&lt;/script&gt;" in dom
    assert "&lt;img src=x onerror=" in dom
    assert not re.search(r"<img[^>]+onerror", dom)
    assert not re.search(r"<a [^>]*href=\"javascript:", dom)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium not installed (CI installs it)")
def test_the_browser_harness_does_detect_a_script_that_runs(tmp_path):
    """Control: an unescaped page's script changes the title, so the check above can fail."""
    page = tmp_path / "raw.html"
    page.write_text(
        "<html><head><title>t</title></head><body><img src=x onerror=\"document.title='PWNED-onerror'\"></body></html>"
    )
    proc = _dump_dom(page, tmp_path)
    assert "<title>PWNED-onerror</title>" in proc.stdout


def _dump_dom(page, tmp_path) -> subprocess.CompletedProcess:
    """Open ``page`` in headless Chromium, let scripts (if any could) run for 3 s of virtual
    time, and return the serialized DOM on stdout. The hostile-report test and its control use
    this same harness, so the control proves the harness can see a script that runs."""
    return subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=3000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
