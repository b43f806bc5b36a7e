"""One conformance test applied to every run kind (scikit-learn's ``check_estimator``, for runs).

Every command that writes a run directory goes through the one lifecycle (``memscan.store.open_run``)
and the one shard loop (``memscan.runners.shards.run_shards``). For each kind:

- killed mid-run (an in-process kill hook: the process "dies" right after its N-th shard commit,
  without any cleanup a real SIGKILL would not do either), then ``--resume`` → the tables equal an
  uninterrupted run's, and every shard was committed exactly once;
- a second concurrent start on the same directory is refused with one clear error;
- the manifest has the common fields (``memscan_run``, ``kind``, ``status``, ``started``,
  ``versions``) and the model record (id, parameters, training step) where a model was attacked;
- ``memscan report RUN`` renders it;
- a bad ``--out`` (a file, not a directory) gives one clear error;
- a resume with another model, other prompt texts, another training set (``OTHER_INPUTS``), or of
  a run whose manifest predates those identity fields, is refused with one clear error and leaves
  the run directory byte for byte as it was; the same inputs still resume it.

The real SIGKILL of a subprocess is tested once for the lifecycle (tests/test_resume.py,
tests/test_reliability.py): with one lifecycle, one is enough.

Adding a run kind = one ``KindCase`` in ``CASES``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from gen_support import MEMORIZED
from typer.testing import CliRunner

from memscan.cli import app
from memscan.store import COMMON_MANIFEST_FIELDS, RunStore

runner = CliRunner()


@dataclass
class KindCase:
    """How to run one kind small: ``argv(tmp_path, out)`` builds inputs and returns the CLI args."""

    kind: str
    argv: Callable[[Path, Path], list]
    tables: tuple[str, ...]
    kill_after: int = 1  # shard commits before the simulated kill
    has_model: bool = True
    arrays: tuple[str, ...] = ()  # .npy files compared like the tables
    label: str = ""  # the test id when one kind has several cases (default: the kind)


def _prompts(tmp: Path) -> Path:
    p = tmp / "prompts.txt"
    if not p.exists():
        p.write_text("\n".join(list(MEMORIZED)[:2] + [f"fresh {i}" for i in range(4)]) + "\n")
    return p


def _extract(tmp: Path, out: Path) -> list:
    from memscan.synthetic import write_training_set

    train = tmp / "train"
    if not train.exists():
        write_training_set(train, 120, size=32)
    return [
        "extract",
        "--model",
        "py:gen_support:planted",
        "--prompts",
        _prompts(tmp),
        "--train",
        train,
        "--out",
        out,
        "--samples-per-prompt",
        20,
        "--shard-size",
        2,
        "--batch-size",
        10,
        "--min-clique",
        4,
        "--quiet",
    ]


def _unconditional(tmp: Path, out: Path) -> list:
    from memscan.synthetic import write_training_set

    train = tmp / "train16"
    if not train.exists():
        write_training_set(train, 40, size=16)
    return [
        "extract-unconditional",
        "--model",
        "py:gen_support:unconditional16",
        "--train",
        train,
        "--out",
        out,
        "--samples",
        48,
        "--shard-size",
        16,
        "--batch-size",
        8,
        "--n-nearest",
        10,
        "--quiet",
    ]


def _unconditional_via_index(tmp: Path, out: Path) -> list:
    """extract-unconditional through a training index (issue 18): no --train, nothing decoded whole."""
    from memscan.index.faiss_index import build_index

    args = _unconditional(tmp, out)
    index = tmp / "index16"
    if not (index / "index.json").exists():
        build_index(tmp / "train16", index, embedder="pixel:8", index_type="flat", progress=False)
    at = args.index("--train")
    return [*args[:at], "--index", index, "--n-candidates", 20, *args[at + 2 :]]


def _index(tmp: Path, out: Path) -> list:
    from memscan.synthetic import write_training_set

    train = tmp / "train16"
    if not train.exists():
        write_training_set(train, 40, size=16)
    return ["index", train, "--out", out, "--embedder", "pixel:8", "--shard-size", 16, "--batch-size", 7, "--quiet"]


# ---- membership inference: the small inputs of tests/golden_support.py ---------------------------
def _mia_inputs(tmp: Path) -> tuple[Path, Path]:
    """16 smooth 8×8 RGB examples (the first 8 members) and their members file."""
    from golden_support import MIA_MEMBERS, _write_png, mia_ids, mia_images

    data, members = tmp / "mia_data", tmp / "members.txt"
    if not data.exists():
        data.mkdir()
        for i, img in zip(mia_ids(), mia_images()):
            _write_png(data / f"{i}.png", img)
        members.write_text("\n".join(mia_ids()[:MIA_MEMBERS]) + "\n")
    return data, members


def _mia(tmp: Path, out: Path) -> list:
    from golden_support import _write_tiny_unet

    data, members = _mia_inputs(tmp)
    unet = tmp / "tiny_unet"
    if not unet.exists():
        _write_tiny_unet(unet)  # an untrained, seeded 8×8 UNet
    return [
        "mia", "--data", data, "--model", unet, "--members", members, "--out", out, "--timesteps", "10,100",
        "--noise-draws", 1, "--batch-size", 4, "--shard-size", 8, "--bootstrap", 0, "--threads", 1, "--quiet",
    ]  # fmt: skip


def _inpaint(tmp: Path, out: Path) -> list:
    data, members = _mia_inputs(tmp)
    return [
        "inpaint", "--data", data, "--model", "py:golden_support:memorizing_predictor", "--members", members,
        "--out", out, "--steps", 5, "--jump-n-sample", 1, "--batch-size", 4, "--shard-size", 8,
        "--bootstrap", 0, "--threads", 1, "--quiet",
    ]  # fmt: skip


def _memscore(tmp: Path, out: Path) -> list:
    import numpy as np
    from golden_support import MEMSCORE_X

    x = tmp / "x.npy"
    if not x.exists():
        np.save(x, np.asarray(MEMSCORE_X))
    return [
        "memscore", "--data", x, "--train-fn", "py:golden_support:gauss_train",
        "--log-likelihood-fn", "py:golden_support:gauss_loglik", "--folds", 3, "--repeats", 1, "--out", out, "--quiet",
    ]  # fmt: skip


TINY_SD = Path(__file__).parent / "data" / "tiny_sd_memorized"


def _triage(tmp: Path, out: Path) -> list:
    # 6 prompts, 2 per shard (--batch-size 4 // --generations 2 = 2 prompts per UNet batch): 3 shards
    return [
        "triage",
        "--model",
        TINY_SD,
        "--prompts",
        _prompts(tmp),
        "--out",
        out,
        "--generations",
        2,
        "--batch-size",
        4,
        "--shard-size",
        2,
        "--num-inference-steps",
        4,
        "--guidance-scale",
        3.0,
        "--top",
        3,
        "--quiet",
    ]


def _audit(tmp: Path, out: Path) -> list:
    # the demo model on 12 captions: 1 triage shard, then 3 rounds of 4 prompts (1 shard each)
    from audit_support import audit_args

    return audit_args(tmp, out, "--top", 12)


# ---- language models: a tiny random GPT-2 (byte-level) and a small JSONL corpus --------------------
def _tiny_lm(tmp: Path) -> Path:
    from memscan.testing.tiny_lm import make_tiny_gpt2

    model = tmp / "tiny_gpt2"
    if not model.exists():
        make_tiny_gpt2(model, seed=4)
    return model


def _lm_extractable(tmp: Path, out: Path) -> list:
    from lm_corpus_support import write_corpus

    data = tmp / "lm_corpus.jsonl"
    if not data.exists():
        write_corpus(data)
    return [
        "lm", "extractable", "--model", _tiny_lm(tmp), "--data", data, "--out", out, "--prefix-lengths", "16,32",
        "--suffix-length", 16, "--sequences", 9, "--shard-size", 3, "--batch-size", 2, "--quiet",
    ]  # fmt: skip


def _lm_exposure(tmp: Path, out: Path) -> list:
    return [
        "lm", "exposure", "--model", _tiny_lm(tmp), "--canaries", "my PIN is {d3}::my PIN is 042::3", "--out", out,
        "--candidates-per-shard", 300, "--batch-size", 128, "--quiet",
    ]  # fmt: skip


def _lm_mia(tmp: Path, out: Path) -> list:
    """16 texts (8 members, 8 non-members) on the tiny random GPT-2: 3 shards."""
    import json

    from lm_support import MEMBERS, NONMEMBERS

    members, nonmembers = tmp / "lm_members.txt", tmp / "lm_nonmembers.jsonl"
    if not members.exists():
        members.write_text("\n".join(MEMBERS) + "\n")
        nonmembers.write_text("".join(json.dumps({"text": t}) + "\n" for t in NONMEMBERS))
    return [
        "lm", "mia", "--model", _tiny_lm(tmp), "--members", members, "--nonmembers", nonmembers, "--out", out,
        "--shard-size", 6, "--bootstrap", 10, "--quiet",
    ]  # fmt: skip


def _lm_extract(tmp: Path, out: Path) -> list:
    """The copy model of tests/lm_extract_support.py, 12 samples from 4 prompts, a bytes index: 3 shards."""
    import json

    from lm_extract_support import DOCS, PROMPTS

    from memscan.lm.corpus_index import CorpusIndex

    index, prompts = tmp / "lm_extract_index", tmp / "lm_extract_prompts.jsonl"
    if not index.exists():
        CorpusIndex.build([d.encode() for d in DOCS], index)
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return [
        "lm", "extract", "--model", "py:lm_extract_support:copy_lm", "--index", index, "--out", out,
        "--prompts", prompts, "--samples", 12, "--length", 120, "--top", 4, "--shard-size", 4, "--batch-size", 3,
        "--min-match", 60, "--quiet",
    ]  # fmt: skip


def _lm_index(tmp: Path, out: Path) -> list:
    """6 text files of 120 bytes, indexed as bytes, ≤ 250 a shard: 3 shards."""
    corpus = tmp / "lm_index_corpus"
    if not corpus.exists():
        corpus.mkdir()
        for i in range(6):
            (corpus / f"doc{i}.txt").write_bytes((f"document {i} says: " * 20).encode()[:120])
    return ["lm", "index", corpus, "--out", out, "--bytes", "--shard-tokens", 250]


def _compare(tmp: Path, out: Path) -> list:
    """Two extract runs (made once), compared: one shard per run."""
    runs = [tmp / "compare_in_a", tmp / "compare_in_b"]
    for r in runs:
        if not (r / "manifest.json").exists():
            _invoke(_extract(tmp, r))
    return ["compare", *runs, "--out", out, "--quiet"]


# Each section below is one family of run kinds; adding a kind = an argv builder + one KindCase.
CASES = [
    # ---- extraction: extract, extract-unconditional, index ------------------------------------
    KindCase("extract", _extract, ("prompts", "detections", "extractions"), kill_after=1),
    KindCase("extract-unconditional", _unconditional, ("generations", "extractions"), kill_after=1),
    KindCase(
        "extract-unconditional", _unconditional_via_index, ("generations", "extractions"), label="unconditional-index"
    ),
    # the index of a training set: embedding shards; the pixel embedder is no model
    KindCase("index", _index, ("ids",), kill_after=2, has_model=False, arrays=("embeddings",)),
    # ---- triage -----------------------------------------------------------------------------------
    KindCase("triage", _triage, ("scores",), kill_after=1),
    # ---- the whole audit: candidates → triage → adaptive extraction → verify --------------------
    KindCase("audit", _audit, ("scores", "prompts", "detections", "extractions"), kill_after=2),
    # ---- membership inference: mia, inpaint, memscore ---------------------------------------------
    KindCase("mia", _mia, ("examples", "losses", "scores", "metrics"), kill_after=1),
    KindCase("inpaint", _inpaint, ("examples", "distances", "scores", "metrics"), kill_after=1),
    KindCase("memscore", _memscore, ("memscore",), kill_after=1),
    # ---- language models ------------------------------------------------------------------------------
    KindCase("lm-extractable", _lm_extractable, ("sequences",), kill_after=1),
    KindCase("lm-exposure", _lm_exposure, ("exposures", "parts"), kill_after=2),
    KindCase("lm-mia", _lm_mia, ("examples", "statistics", "scores", "metrics"), kill_after=1),
    KindCase("lm-extract", _lm_extract, ("samples", "precision"), kill_after=1),
    KindCase("lm-index", _lm_index, ("documents",), kill_after=1, has_model=False),
    # ---- comparisons of finished runs -------------------------------------------------------------
    KindCase("compare", _compare, ("compare", "items", "overlap", "outliers"), kill_after=1, has_model=False),
]


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in memscan catches or cleans up after it."""


def _invoke(args, ok=True):
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    if ok and res.exit_code != 0:
        raise AssertionError(f"memscan {' '.join(map(str, args))} failed ({res.exit_code}):\n{res.output}")
    return res


def _tables(run: Path, names) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(run / f"{t}.parquet") for t in names}


@pytest.fixture(params=CASES, ids=lambda c: c.label or c.kind)
def case(request):
    return request.param


def test_killed_run_resumes_to_the_uninterrupted_tables(case, tmp_path, monkeypatch):
    full = tmp_path / "full"
    _invoke(case.argv(tmp_path, full))
    killed = tmp_path / "killed"
    commits, dying = [], [True]
    original = RunStore.commit_shard

    def commit_then_die(self, shard, tables, meta):
        original(self, shard, tables, meta)
        commits.append(shard)
        if dying[0] and len(commits) == case.kill_after:
            # a real kill leaves the lock of a process that no longer exists
            (self.root / ".lock").write_text(f"pid=999999999 host={socket.gethostname()} since=killed")
            raise _Killed

    monkeypatch.setattr(RunStore, "commit_shard", commit_then_die)
    with pytest.raises(_Killed):
        _invoke(case.argv(tmp_path, killed))
    dying[0] = False
    assert RunStore(killed).read_manifest()["status"] != "complete"
    n_shards = RunStore(full).read_manifest()["n_shards"]
    assert 0 < case.kill_after < n_shards, "the kill must land mid-run"

    again = _invoke(case.argv(tmp_path, killed), ok=False)  # protected without --resume
    assert again.exit_code == 2 and "--resume" in again.output
    _invoke([*case.argv(tmp_path, killed), "--resume"])
    a, b = _tables(full, case.tables), _tables(killed, case.tables)
    for name in case.tables:
        pd.testing.assert_frame_equal(a[name], b[name], check_dtype=True, obj=f"{case.kind}: {name}")
    for name in case.arrays:
        np.testing.assert_array_equal(np.load(full / f"{name}.npy"), np.load(killed / f"{name}.npy"), err_msg=name)
    assert sorted(commits) == list(range(n_shards)), f"{case.kind}: every shard committed exactly once ({commits})"


def test_manifest_report_lock_and_bad_out(case, tmp_path):
    out = tmp_path / "run"
    _invoke(case.argv(tmp_path, out))
    m = RunStore(out).read_manifest(expect=case.kind)
    for key in COMMON_MANIFEST_FIELDS:
        assert key in m, f"{case.kind} manifest lacks {key}"
    assert m["kind"] == case.kind and m["status"] == "complete" and m["memscan_run"] == 2
    if case.has_model:
        assert set(m["model"]) >= {"id", "parameters", "training_step"}, m.get("model")

    rep = _invoke(["report", out])
    html = (out / "report.html").read_text()
    assert str(out / "report.html") in rep.output and "<html" in html.lower()

    # a second concurrent start (a live process holds the lock) is refused, and changes nothing
    (out / ".lock").write_text(f"pid={os.getpid()} host={socket.gethostname()} since=now")
    before = (out / "manifest.json").read_bytes()
    res = _invoke([*case.argv(tmp_path, out), "--resume"], ok=False)
    assert res.exit_code == 2 and "in use by another memscan process" in res.output
    assert (out / "manifest.json").read_bytes() == before
    (out / ".lock").unlink()

    # a bad --out: a file where the run directory should be
    bad = tmp_path / "a-file"
    bad.write_text("not a directory")
    res = _invoke(case.argv(tmp_path, bad), ok=False)
    assert res.exit_code == 2
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0], res.output
    assert "Traceback" not in res.output


# ---- a resumed run must be the same run: other inputs are refused, and change nothing ------------
def _arg(argv: list, flag: str, value) -> list:
    """``argv`` with the value after ``flag`` replaced by ``value``."""
    at = argv.index(flag)
    return [*argv[: at + 1], value, *argv[at + 2 :]]


def _edited_prompts(tmp: Path, argv: list) -> list:
    """The same prompt ids (a text file's line numbers, or a table's ids), one prompt's text changed."""
    src = Path(argv[argv.index("--prompts") + 1])
    if src.suffix == ".csv":
        df = pd.read_csv(src)
        df.loc[1, "prompt"] += " again"
        df.to_csv(tmp / "prompts_edited.csv", index=False)
        return _arg(argv, "--prompts", tmp / "prompts_edited.csv")
    lines = src.read_text().splitlines()
    edited = tmp / "prompts_edited.txt"
    edited.write_text("\n".join([lines[0], lines[1] + " again", *lines[2:]]) + "\n")
    return _arg(argv, "--prompts", edited)


def _other_demo_model(tmp: Path) -> Path:
    """Another model directory (the demo model's files at another path: another --model, which
    takes the same sampling options)."""
    from memscan.demo.run import model_dir

    other = tmp / "other_model"
    if not other.exists():
        shutil.copytree(model_dir(), other)
    return other


def _edited_training_set(tmp: Path, argv: list) -> list:
    """A copy of the training set with the same ids, one image replaced by noise."""
    from memscan.data.images import read_image, save_png

    src = Path(argv[argv.index("--train") + 1])
    dst = tmp / f"{src.name}_edited"
    if not dst.exists():
        shutil.copytree(src, dst)
        victim = dst / "t0005.png" if (dst / "t0005.png").exists() else sorted(dst.glob("*.png"))[5]
        size = victim.stat().st_size
        shape = read_image(victim).shape
        save_png(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8), victim)
        assert victim.stat().st_size != size
    return _arg(argv, "--train", dst)


def _other_tiny_lm(tmp: Path, argv: list) -> list:
    """Another tiny random GPT-2 (other weights, the same tokenizer)."""
    from memscan.testing.tiny_lm import make_tiny_gpt2

    other = tmp / "tiny_gpt2_other"
    if not other.exists():
        make_tiny_gpt2(other, seed=5)
    return _arg(argv, "--model", other)


@dataclass
class OtherInputs:
    """A resume that is not the same run: ``change(tmp, argv)`` gives its CLI args; the refusal
    names ``refused``. ``older``: the same args, on a run whose manifest an older memscan wrote
    (without the identity fields of the model, prompts and training set)."""

    label: str
    change: Callable[[Path, list], list]
    refused: str
    older: bool = False


#: Per kind (its KindCase label): the resumes that must be refused.
OTHER_INPUTS = {
    "extract": [
        OtherInputs("model", lambda t, a: _arg(a, "--model", "py:gen_support:planted_other"), "model_spec"),
        OtherInputs("prompt-texts", _edited_prompts, "prompts_sha256"),
        OtherInputs("training-set", _edited_training_set, "training_set_sha256"),
        OtherInputs("older-run", lambda t, a: a, "records no model_spec", older=True),
    ],
    "extract-unconditional": [
        OtherInputs("model", lambda t, a: _arg(a, "--model", "py:gen_support:unconditional16_other"), "model_spec"),
        OtherInputs("training-set", _edited_training_set, "training_set_sha256"),
    ],
    "audit": [
        OtherInputs("model", lambda t, a: _arg(a, "--model", _other_demo_model(t)), "model_spec"),
        OtherInputs("prompt-texts", _edited_prompts, "prompts_sha256"),
        OtherInputs("training-set", _edited_training_set, "training_set_sha256"),
    ],
    "index": [
        OtherInputs(
            "training-set",
            lambda t, a: [a[0], _edited_training_set(t, ["--train", a[1]])[1], *a[2:]],
            "training_set_sha256",
        ),
    ],
    "unconditional-index": [
        OtherInputs("model", lambda t, a: _arg(a, "--model", "py:gen_support:unconditional16_other"), "model_spec"),
    ],
    "lm-extractable": [
        OtherInputs("model", _other_tiny_lm, "model_spec"),
        OtherInputs("older-run", lambda t, a: a, "records no model_spec", older=True),
    ],
    "lm-exposure": [
        OtherInputs("model", _other_tiny_lm, "model_spec"),
        OtherInputs(
            "canary-texts", lambda t, a: _arg(a, "--canaries", "my PIN is {d3}::my PIN is 043::3"), "canaries_sha256"
        ),
    ],
}
REFUSALS = [
    pytest.param(c, o, id=f"{c.label or c.kind}-{o.label}")
    for c in CASES
    for o in OTHER_INPUTS.get(c.label or c.kind, [])
]


def _killed_run(case: KindCase, tmp_path: Path, out: Path, monkeypatch) -> None:
    """``case`` written into ``out`` and "killed" after ``case.kill_after`` shard commits."""
    argv = case.argv(tmp_path, out)  # its inputs are made before the kill hook (an index is a run too)
    commits = []
    original = RunStore.commit_shard

    def commit_then_die(self, shard, tables, meta):
        original(self, shard, tables, meta)
        commits.append(shard)
        if len(commits) == case.kill_after:
            (self.root / ".lock").write_text(f"pid=999999999 host={socket.gethostname()} since=killed")
            raise _Killed

    with monkeypatch.context() as m:
        m.setattr(RunStore, "commit_shard", commit_then_die)
        with pytest.raises(_Killed):
            _invoke(argv)


def _files(run: Path) -> dict[str, bytes]:
    """Every file of a run directory (but its lock), by path."""
    return {
        str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"
    }


@pytest.mark.parametrize(("case", "other"), REFUSALS)
def test_resume_with_other_inputs_is_refused_and_changes_nothing(case, other, tmp_path, monkeypatch):
    run = tmp_path / "killed"
    _killed_run(case, tmp_path, run, monkeypatch)
    if other.older:
        m = json.loads((run / "manifest.json").read_text())
        for key in ("model_spec", "prompts_sha256", "training_set_sha256"):
            m.pop(key, None)
        (run / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
    before = _files(run)
    assert "manifest.json" in before and any(k.endswith(".done.json") for k in before)

    res = _invoke([*other.change(tmp_path, case.argv(tmp_path, run)), "--resume"], ok=False)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and other.refused in errors[0], res.output
    assert "cannot resume" in errors[0] and "--out" in res.output and "Traceback" not in res.output
    assert _files(run) == before, "a refused resume must leave the run as it was"
    if other.older:
        return
    # the same inputs still resume it
    _invoke([*case.argv(tmp_path, run), "--resume"])
    m = RunStore(run).read_manifest(expect=case.kind)
    assert m["status"] == "complete" and len(m["resumed"]) == 1 and (not case.has_model or m["model_spec"])


def test_extract_resume_checks_a_loaded_generator_and_accepts_a_moved_training_set(tmp_path, synth_train):
    """Through Python: another loaded generator of the same class (its recorded configuration
    differs) is refused; the same training files at another path are the same training set."""
    from memscan import ExtractConfig, MemscanError, extract
    from memscan.synthetic import SyntheticGenerator

    prompts = list(MEMORIZED)[:2] + ["fresh 0", "fresh 1"]
    cfg = ExtractConfig(samples_per_prompt=20, shard_size=2, batch_size=10, min_clique=4)
    run = tmp_path / "run"

    def gen(copy_rate=0.4):
        return SyntheticGenerator(MEMORIZED, size=32, copy_rate=copy_rate, noise=0.015)

    with pytest.raises(MemscanError, match="stopped before all shards"):
        extract(gen(), prompts, synth_train, run, cfg, progress=False, stop_after_shards=1)
    before = _files(run)
    with pytest.raises(MemscanError, match="its generator differs") as info:
        extract(gen(copy_rate=0.3), prompts, synth_train, run, cfg, progress=False, resume=True)
    assert "--out" in info.value.hint
    assert {k: v for k, v in _files(run).items() if k != "run.log"} == {
        k: v for k, v in before.items() if k != "run.log"
    }
    moved = tmp_path / "moved_train"
    shutil.copytree(synth_train, moved)
    res = extract(gen(), prompts, moved, run, cfg, progress=False, resume=True)
    assert res.manifest["status"] == "complete" and res.manifest["training_set"]["source"] == str(moved)


def test_extract_lists_the_training_set_once(tmp_path, synth_train, monkeypatch):
    """The listing hashed for ``training_set_sha256`` is the one decoded: one pass over the
    source (a full pass on a network file system), in extract and extract-unconditional."""
    import memscan.data.training as training_mod
    import memscan.extraction.pipeline as pipeline_mod
    import memscan.extraction.unconditional as unconditional_mod
    from memscan import ExtractConfig, extract
    from memscan.extraction.unconditional import UnconditionalConfig, extract_unconditional
    from memscan.synthetic import SyntheticGenerator

    listed = []
    original = training_mod.list_source

    def counting(path):
        listed.append(str(path))
        return original(path)

    for mod in (training_mod, pipeline_mod, unconditional_mod):
        monkeypatch.setattr(mod, "list_source", counting)
    cfg = ExtractConfig(samples_per_prompt=20, shard_size=2, batch_size=10, min_clique=4)
    res = extract(SyntheticGenerator(MEMORIZED, size=32, copy_rate=0.4, noise=0.015), list(MEMORIZED)[:2],
                  synth_train, tmp_path / "run", cfg, progress=False)  # fmt: skip
    assert listed == [str(synth_train)]
    assert res.manifest["training_set"]["source"] == str(synth_train) and len(res.extractions)
    assert res.manifest["training_set_sha256"] == training_mod.training_set_sha256(str(synth_train))

    listed.clear()
    gen = SyntheticGenerator({"": next(iter(MEMORIZED.values()))}, size=32, copy_rate=0.25)
    r = extract_unconditional(gen, synth_train, tmp_path / "unc", UnconditionalConfig(samples=20, n_nearest=5,
                              shard_size=10), progress=False)  # fmt: skip
    assert listed == [str(synth_train)] and r.manifest["training_set"]["source"] == str(synth_train)
