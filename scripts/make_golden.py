"""Save the golden-output tables of every command that writes tables (issue 12, "Golden outputs").

    python scripts/make_golden.py            # (re)write tests/data/golden/<command>/
    python scripts/make_golden.py mia index  # only these commands

Each command runs through the CLI (``python -m memscan.cli …``) on the small deterministic inputs of
tests/golden_support.py (shared with tests/test_golden.py, which reruns the same commands and
compares). The tables are copied as they are into ``tests/data/golden/<command>/``, beside an
``inputs.json`` that records the command line (paths as ``{placeholders}``), the inputs, the tables
and the excluded columns. Run it once from the pre-refactor code; rerun it only when a change of
the tables is intended (and say so in the commit).

Commands and tables (paths relative to the command's output):

- extract — prompts, detections, extractions (py:gen_support:planted, 6 prompts × 40 samples, 32×32)
- verify — the same three tables of a copy of that run, re-verified with --delta 0.05, --n-nearest 3
- extract-unconditional — generations, extractions (32 generations of the planted generator)
- index — ids.parquet, embeddings.npy (pixel:8 embedder, flat index, 15 images with duplicates)
- candidates — prompts.parquet, prompts.duplicates.parquet, prompts.pairs.parquet (through that index)
- triage — scores.parquet, prompts.csv (tests/data/tiny_sd_memorized, 5 prompts × 2 generations)
- mia — examples, losses, scores, metrics (an untrained seeded 8×8 UNet2DModel saved with
  save_pretrained, 16 examples, 3 timesteps, flips, 20 bootstrap replicates)
- inpaint — examples, distances, scores, metrics (py:golden_support:memorizing_predictor, RePaint
  10 steps, 2 samples)
- memscore — memscore.parquet (a Gaussian fitted per fold, 16 values, 4 folds × 2 repeats)

Not compared:

- Columns: none. Every column of these tables was checked to be identical between two runs (this
  script run twice, byte-compared); the tables hold no timings and their paths are relative to
  the run directory (``images/…``, named by a hash of the id, not of the time). Should a column
  ever need excluding, list it in ``golden_support.EXCLUDED`` with the reason; it is recorded in
  inputs.json and skipped by the test.
- Files: ``shards/*.parquet`` (per-shard resume records, the refactor's run lifecycle owns their
  layout; the final tables are their concatenation), manifests (they hold versions, timings,
  throughput and absolute paths), report.html and images (views of the tables).
- LiRA attacks: they need a shadow directory, i.e. trained shadow models (minutes); mia and inpaint
  run the threshold attack of a target model given as --model / --members.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import golden_support as gs  # noqa: E402


def describe(command: str) -> dict:
    spec = gs.SPECS[command]
    return {
        "command": command,
        "argv": ["memscan", *spec.args],
        "needs": list(spec.needs),
        "tables": list(spec.tables),
        "excluded_columns": {t: gs.EXCLUDED.get(t, {}) for t in spec.tables if gs.EXCLUDED.get(t)},
        "inputs": gs.INPUTS_DESCRIPTION,
        "made_from": gs.source_commit(),
    }


def main(argv: list[str]) -> int:
    commands = argv or list(gs.COMMANDS)
    unknown = [c for c in commands if c not in gs.SPECS]
    if unknown:
        print(f"unknown command(s) {unknown}; choose from {list(gs.COMMANDS)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="memscan-golden-") as tmp:
        runner = gs.Runner(Path(tmp))
        for command in commands:
            tables = runner.tables(command)
            dest = gs.GOLDEN_DIR / command
            if dest.exists():
                shutil.rmtree(dest)
            dest.mkdir(parents=True)
            for name, src in tables.items():
                shutil.copyfile(src, dest / name)
            (dest / "inputs.json").write_text(json.dumps(describe(command), indent=1, ensure_ascii=False) + "\n")
            size = sum(f.stat().st_size for f in dest.iterdir())
            print(f"{command}: {len(tables)} table(s), {size / 1024:.1f} KiB → {dest.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
