"""The bad-input corpus (``tests/bad_inputs.py``) against every CLI command that reads user data.

Each bad input must give either a clear one-line error naming the input and the fix (exit code
2, no traceback) or a counted, reported skip. The table in ``docs/reliability.md`` lists the
behaviour for each; this module is what proves it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from bad_inputs import DAMAGED_MODELS, build_corpus
from gen_support import tiny_unet
from typer.testing import CliRunner

from memscan.cli import app

TINY_SD = Path(__file__).parent / "data" / "tiny_sd_memorized"
runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus") / "c")


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    """A tiny untrained UNet2DModel pipeline folder (32×32 RGB) for the membership commands."""
    from diffusers import DDPMScheduler

    root = tmp_path_factory.mktemp("unet")
    unet = tiny_unet(size=32, groups=8)
    unet.save_pretrained(root / "unet")
    DDPMScheduler().save_pretrained(root / "scheduler")
    return root


def cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(res, *needles: str) -> str:
    """Exit code 2, exactly one ``error:`` line naming the input and a fix, no traceback."""
    assert res.exception is None or isinstance(res.exception, SystemExit), f"crashed: {res.exception!r}\n{res.output}"
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


# commands that read a training set: (name, argv builder taking (train path, fresh output path))
TRAIN_COMMANDS = {
    "extract": lambda c, t, out: (
        "extract", "--model", "py:gen_support:planted", "--prompts", c.blank_lines, "--train", t, "--out", out,
        "--samples-per-prompt", 12, "--min-clique", 3, "--quiet",
    ),
    "index": lambda c, t, out: ("index", t, "--out", out, "--quiet"),
    "candidates": lambda c, t, out: ("candidates", t, "--top", 3, "--out", out.with_suffix(".csv"), "--quiet"),
    "extract-unconditional": lambda c, t, out: (
        "extract-unconditional", "--model", "py:gen_support:planted", "--train", t, "--samples", 16, "--out", out,
        "--quiet",
    ),
    "audit": lambda c, t, out: (
        "audit", "--model", "py:gen_support:planted", "--prompts", c.blank_lines, "--train", t, "--out", out,
        "--samples-per-prompt", 12, "--min-clique", 3, "--first-round", 4, "--round-size", 4, "--top", 3, "--quiet",
    ),
}  # fmt: skip

BAD_TRAIN = [
    "empty folder",
    "only broken files",
    "manifest path outside its root",
    "manifest symlink out of its root",
    "manifest without a path column",
    "manifest with a mistyped path column",
    "manifest whose files are all missing",
    "a path that does not exist",
]


@pytest.mark.parametrize("bad", BAD_TRAIN)
@pytest.mark.parametrize("command", [*TRAIN_COMMANDS, "mia", "verify"])
def test_bad_training_sets_are_refused_by_every_command(corpus, unet_dir, finished_run, tmp_path, command, bad):
    path, want = corpus.bad_train[bad]
    if command == "mia":
        args = ("mia", "--data", path, "--model", unet_dir, "--members", tmp_path / "m.txt", "--out", tmp_path / "o")
        (tmp_path / "m.txt").write_text("m0\n")
    elif command == "verify":
        args = ("verify", finished_run, "--train", path)
    else:
        args = TRAIN_COMMANDS[command](corpus, path, tmp_path / "out")
    before = _snapshot(finished_run)
    line = assert_clean_error(cli(*args), want)
    assert str(path) in line or path.name in line  # names the input
    assert " — " in line  # and a fix
    assert _snapshot(finished_run) == before  # nothing already done is lost


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("done") / "run"
    res = cli(*TRAIN_COMMANDS["extract"](corpus, corpus.mixed, out))
    assert res.exit_code == 0, res.output
    return out


def _snapshot(run: Path) -> dict:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", list(TRAIN_COMMANDS))
def test_broken_files_beside_good_ones_are_skipped_and_counted(corpus, tmp_path, command):
    """8 good images in every mode and size are read; the 4 broken files are skipped, counted and
    named in what the command writes."""
    out = tmp_path / "out"
    res = cli(*TRAIN_COMMANDS[command](corpus, corpus.mixed, out))
    assert res.exit_code == 0, res.output
    if command in ("extract", "extract-unconditional", "audit"):
        info = json.loads((out / "manifest.json").read_text())["training_set"]
        assert info["images"] == corpus.mixed_good
    elif command == "index":
        info = json.loads((out / "index.json").read_text())
        assert info["count"] == corpus.mixed_good
        assert f"{len(corpus.mixed_broken)} skipped" in res.output
    else:
        info = json.loads(out.with_suffix(".candidates.json").read_text())
        assert info["images"] == corpus.mixed_good
        assert f"{len(corpus.mixed_broken)} unreadable image(s) skipped" in res.output
    assert info["skipped"] == len(corpus.mixed_broken)
    assert sorted(s["id"] for s in info["skipped_files"]) == corpus.mixed_broken
    assert all(s["reason"] for s in info["skipped_files"])


def test_membership_refuses_a_data_set_with_unreadable_examples(corpus, unet_dir, tmp_path):
    """Membership needs every example (a skipped member would bias the ROC): an error, not a skip."""
    (tmp_path / "m.txt").write_text("m0\n")
    args = (
        "mia",
        "--data",
        corpus.mixed,
        "--model",
        unet_dir,
        "--members",
        tmp_path / "m.txt",
        "--out",
        tmp_path / "o",
    )
    assert_clean_error(cli(*args), "4 image(s)", "could not be read")


BAD_PROMPTS = [
    "no prompts, only blank lines",
    "non-UTF-8 bytes",
    "a 100 kB line",
    "duplicate prompt ids",
    "a table without prompt_id/prompt",
    "a missing (null) prompt in a table",
    "a corrupt Parquet file",
    "a prompts path that does not exist",
]


@pytest.mark.parametrize("bad", BAD_PROMPTS)
@pytest.mark.parametrize("command", ["extract", "triage"])
def test_bad_prompt_files_are_refused(corpus, tmp_path, command, bad):
    path, want = corpus.bad_prompts[bad]
    if command == "extract":
        args = ("extract", "--model", "py:gen_support:planted", "--prompts", path, "--train", corpus.mixed)
    else:
        args = ("triage", "--model", TINY_SD, "--prompts", path)
    line = assert_clean_error(cli(*args, "--out", tmp_path / "out", "--quiet"), want)
    assert path.name in line


@pytest.mark.parametrize("command", ["extract", "triage"])
def test_blank_lines_are_skipped_and_counted(corpus, tmp_path, command):
    out = tmp_path / "out"
    if command == "extract":
        args = TRAIN_COMMANDS["extract"](corpus, corpus.mixed, out)
    else:
        args = ("triage", "--model", TINY_SD, "--prompts", corpus.blank_lines, "--out", out, "--quiet")
        args += ("--generations", 1, "--steps", 1, "--num-inference-steps", 4)
    res = cli(*args)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompts"]["blank_lines_skipped"] == 5
    table = "detections.parquet" if command == "extract" else "scores.parquet"
    assert pd.read_parquet(out / table)["prompt"].tolist() == ["copy t0003", "fresh 1", "fresh 2"]


@pytest.mark.parametrize(
    "bad",
    [
        "a member id that is not in the data",
        "non-UTF-8 bytes",
        "no member ids",
        "an is_member value that is not a flag",
        "a table without a row for every example",
        "a corrupt Parquet table",
    ],
)
def test_bad_member_lists_are_refused(corpus, unet_dir, tmp_path, bad):
    path, want = corpus.bad_members[bad]
    args = ("mia", "--data", corpus.clean, "--model", unet_dir, "--members", path, "--out", tmp_path / "o", "--quiet")
    assert_clean_error(cli(*args), want)


@pytest.mark.parametrize(
    "bad",
    ["a pickled object array", "a truncated .npy", "NaN values", "a string array", "too few examples for the folds"],
)
def test_bad_arrays_are_refused_by_memscore(corpus, tmp_path, bad):
    path, want = corpus.bad_arrays[bad]
    mod = tmp_path / "gauss.py"
    mod.write_text(
        "def train(d):\n    return float(d.mean()), float(d.var()) + 1e-3\n\n"
        "def loglik(m, d):\n    return -0.5 * (d - m[0]) ** 2 / m[1]\n"
    )
    args = ("memscore", "--data", path, "--train-fn", f"py:{mod}:train", "--log-likelihood-fn", f"py:{mod}:loglik")
    res = cli(*args, "--out", tmp_path / "o", "--folds", 2, "--quiet")
    assert_clean_error(res, want)


@pytest.mark.parametrize("generator", ["wrong_shape", "nan_output", "wrong_dtype"])
def test_bad_generator_outputs_in_unconditional_extraction(synth_train, tmp_path, generator):
    args = ("extract-unconditional", "--model", f"py:gen_support:{generator}", "--train", synth_train)
    line = assert_clean_error(cli(*args, "--samples", 8, "--out", tmp_path / "o", "--quiet"))
    assert "generator" in line or "shape" in line or "NaN" in line or "dtype" in line


@pytest.mark.parametrize("command", ["extract", "extract-unconditional"])
def test_user_code_that_raises_is_one_error_and_keeps_the_run_resumable(corpus, synth_train, tmp_path, command):
    """A generator whose code raises (a bug, CUDA out of memory) ends the run with one error naming
    where and pointing to --resume (tests/test_user_code_errors.py: the resume itself)."""
    args = TRAIN_COMMANDS[command](corpus, synth_train, tmp_path / "o")
    args = tuple("py:user_code_support:always_raises" if a == "py:gen_support:planted" else a for a in args)
    line = assert_clean_error(cli(*args), "the generator failed", "RuntimeError: simulated bug", "--resume")
    assert ("on prompt line-" in line) if command == "extract" else ("in shard 0 (samples 0–" in line)


def test_report_and_verify_refuse_what_is_not_a_run(tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "manifest.json").write_text("{")
    for command in ("report", "verify"):
        assert_clean_error(cli(command, damaged), "not valid JSON")
        assert_clean_error(cli(command, tmp_path / "nowhere"), "not a memscan run")


@pytest.mark.parametrize("command", list(TRAIN_COMMANDS))
def test_a_refused_command_can_be_rerun_on_the_same_out(corpus, tmp_path, command):
    """Whatever a refused start left in --out does not block the corrected rerun."""
    out = tmp_path / "out"
    assert_clean_error(cli(*TRAIN_COMMANDS[command](corpus, corpus.bad_train["only broken files"][0], out)))
    res = cli(*TRAIN_COMMANDS[command](corpus, corpus.mixed, out))
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "bad",
    [
        "no captions and no prompts",
        "no cluster reaches --min-count",
        "a budget smaller than one round",
        "no conditioning",
    ],
)
def test_audit_refuses_what_it_cannot_attack(corpus, unet_dir, tmp_path, bad):
    """One clear error each, before any model evaluation: a training set without captions and no
    --prompts, a budget that cannot pay triage and one round, a model without conditioning."""
    base = ["audit", "--model", "py:gen_support:planted", "--train", corpus.mixed, "--out", tmp_path / "o", "--quiet"]
    if bad == "no captions and no prompts":
        line = assert_clean_error(cli(*[a if a is not corpus.mixed else corpus.clean for a in base]), "no captions")
        assert str(corpus.clean) in line and "--prompts" in line
    elif bad == "no cluster reaches --min-count":  # used to blame captions the images have
        line = assert_clean_error(cli(*base, "--min-count", 100), "--min-count 100", "lower --min-count")
        assert "caption" not in line
    elif bad == "a budget smaller than one round":
        line = assert_clean_error(cli(*base, "--prompts", corpus.blank_lines, "--budget", 50), "smaller than one round")
        # a plain function: no triage; 3 prompts × a first round of 20 generations (4 % of 500)
        assert "3 prompts × first round 20" in line and "--top" in line
    else:
        args = [a if a != "py:gen_support:planted" else unet_dir for a in base]
        line = assert_clean_error(cli(*args, "--prompts", corpus.blank_lines), "no conditioning")
        assert "extract-unconditional" in line


def test_report_and_verify_refuse_runs_of_other_commands(corpus, tmp_path):
    """An extract-unconditional run is not an extract run: verify and extract --resume say so and
    where its results are, instead of failing on a missing table; a mia run is not either."""
    out = tmp_path / "u"
    res = cli(*TRAIN_COMMANDS["extract-unconditional"](corpus, corpus.mixed, out))
    assert res.exit_code == 0, res.output
    before = _snapshot(out)
    assert_clean_error(cli("verify", out), "memscan extract-unconditional` run", "memscan report")
    args = TRAIN_COMMANDS["extract"](corpus, corpus.mixed, out)
    assert_clean_error(cli(*args, "--resume"), "not a `memscan extract` run")
    assert _snapshot(out) == before
    # `memscan report` renders every registered kind; a kind it does not know is refused clearly
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "manifest.json").write_text('{"kind": "from-the-future", "status": "complete"}')
    assert_clean_error(cli("report", odd), "`memscan from-the-future` run")
    # a mia run whose tables are gone: one clean error, not a traceback
    mia = tmp_path / "mia"
    mia.mkdir()
    (mia / "manifest.json").write_text('{"kind": "mia", "status": "complete"}')
    assert_clean_error(cli("report", mia), "mia")


# ---- language models: memscan lm extractable / exposure ----------------------------------------------
LM_BAD = [
    "a JSONL file without the text field",
    "a Parquet file without the text column",
    "a JSONL line that is not JSON",
    "documents shorter than prefix + suffix",
    "token ids of another tokenizer",
    "token ids without a tokenizer record",
    "a folder without training text",
    "training text that does not exist",
    "a model directory that is not a causal LM",
    "a model directory without config.json",
    "a model file that is not a .gguf",
    "a py: object that is not a causal LM",
    "a canary that does not match its format",
    "a canary format without a hole",
    "a canary line that is not JSON",
    "a checkpoint folder whose checkpoint-N holds no model",
    "checkpoints of different models",
]


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from memscan.testing.tiny_lm import make_tiny_gpt2

    return make_tiny_gpt2(tmp_path_factory.mktemp("lm") / "gpt2")


def test_lm_window_longer_than_the_model_positions(tiny_lm_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "x" * 2000}) + "\n")
    args = ("lm", "extractable", "--model", tiny_lm_dir, "--data", data, "--prefix-lengths", "32,600")
    assert_clean_error(cli(*args, "--out", tmp_path / "o", "--quiet"), "positions of the model")


@pytest.mark.parametrize("bad", LM_BAD)
def test_bad_language_model_inputs_are_refused(corpus, tiny_lm_dir, tmp_path, bad):
    option, value, want = corpus.bad_lm[bad]
    good_data = tmp_path / "good.jsonl"
    good_data.write_text(json.dumps({"text": "a long enough training document. " * 10}) + "\n")
    model = value if option == "model" else tiny_lm_dir
    commands = []
    if option in ("data", "model"):
        data = value if option == "data" else good_data
        commands.append(
            ("lm", "extractable", "--model", model, "--data", data, "--sequences", 2, "--prefix-lengths", 32)
        )
    if option in ("canaries", "model"):
        canaries = value if option == "canaries" else "my PIN is {d2}::my PIN is 12"
        commands.append(("lm", "exposure", "--model", model, "--canaries", canaries))
    assert commands, f"case {bad!r}: option {option!r} runs no command"
    for i, args in enumerate(commands):
        out = tmp_path / f"o{i}"
        assert_clean_error(cli(*args, "--out", out, "--quiet"), want)
        assert not (out / "manifest.json").exists()  # refused before any run starts


# ---- language models: `memscan lm mia` -----------------------------------------------------------
LM_MIA_BAD = [
    "an empty members file",
    "a members file of blank lines",
    "a JSONL without text",
    "a JSONL line that is not JSON",
    "non-UTF-8 bytes",
    "a Parquet file without a text column",
    "members equal to non-members",
    "a members path that does not exist",
    "an example of one token",
]


@pytest.fixture(scope="module")
def lm_mia_texts(tmp_path_factory):
    from bad_inputs import build_lm_mia_texts

    return build_lm_mia_texts(tmp_path_factory.mktemp("lm_mia_texts"))[1]


@pytest.mark.parametrize("bad", LM_MIA_BAD)
def test_bad_member_texts_are_refused_by_lm_mia(lm_mia_texts, tmp_path, bad):
    members, nonmembers, want = lm_mia_texts[bad]
    args = ("lm", "mia", "--model", "py:lm_support:bigram", "--members", members, "--nonmembers", nonmembers)
    line = assert_clean_error(cli(*args, "--out", tmp_path / "o", "--bootstrap", 0, "--quiet"), want)
    assert members.name in line or "example" in line  # names the input
    assert " — " in line  # and a fix


# ---- language models: the corpus index -----------------------------------------------------------
LM_INDEX_BAD = [
    "an empty corpus",
    "invalid UTF-8 where text is expected",
    "token ids of another tokenizer",
    "neither --tokenizer nor --bytes",
    "an index of another tokenizer",
    "a corrupt index file",
    "a folder that is no index",
    "a JSONL line of training text that is not UTF-8",
    "a training .txt that is not UTF-8",
]


# ---- memscan extract --index (issue 18): a missing or damaged index, a training source gone ----
def _index_cases(root: Path, clean: Path) -> dict[str, tuple[Path, str]]:
    import shutil

    from memscan.index.faiss_index import IndexParams, build_index

    good = root / "good"
    build_index(clean, good, embedder="pixel:8", index_type=IndexParams("ivf", nlist=1), progress=False)
    cases: dict[str, tuple[Path, str]] = {"an index path that does not exist": (root / "nope", "does not exist")}

    def copy(name: str) -> Path:
        p = root / name.replace(" ", "_")
        shutil.copytree(good, p)
        return p

    p = copy("no index json")
    (p / "index.json").unlink()
    cases["a folder without index.json"] = (p, "not a memscan index")
    p = copy("bad json")
    (p / "index.json").write_text("{not json")
    cases["an index.json that is not JSON"] = (p, "not valid JSON")
    p = copy("bad ids")
    (p / "ids.parquet").write_bytes(b"PAR1 garbage")
    cases["a corrupt ids.parquet"] = (p, "cannot be read")
    p = copy("bad faiss")
    (p / "index.faiss").write_bytes(b"\0" * 64)
    cases["a corrupt index.faiss"] = (p, "cannot be read")
    p = copy("source gone")
    loc = pd.read_parquet(p / "locations.parquet")
    loc["path"] = [str(root / "moved" / f"{i}.png") for i in range(len(loc))]
    loc.to_parquet(p / "locations.parquet")
    cases["an index whose training images moved"] = (p, "--train")
    return cases


INDEX_BAD = [
    "an index path that does not exist",
    "a folder without index.json",
    "an index.json that is not JSON",
    "a corrupt ids.parquet",
    "a corrupt index.faiss",
    "an index whose training images moved",
]


@pytest.fixture(scope="module")
def lm_index_inputs(tmp_path_factory):
    from bad_inputs import build_lm_index_inputs

    return build_lm_index_inputs(tmp_path_factory.mktemp("lm_index") / "c")


@pytest.mark.parametrize("bad", LM_INDEX_BAD)
def test_bad_corpus_index_inputs_are_refused(lm_index_inputs, tiny_lm_dir, tmp_path, bad):
    args, want = lm_index_inputs[bad]
    spec = {"{lookup}": "py:lm_corpus_support:lookup", "{tiny}": str(tiny_lm_dir)}
    args = [spec.get(str(a), a) for a in args]
    out = tmp_path / "o"
    assert_clean_error(cli(*args, "--out", out), want)
    assert not (out / "manifest.json").exists()  # refused before any run starts


@pytest.fixture(scope="module")
def index_cases(corpus, tmp_path_factory):
    return _index_cases(tmp_path_factory.mktemp("bad_index"), corpus.clean)


@pytest.mark.parametrize("bad", INDEX_BAD)
def test_bad_indexes_are_refused_by_extract(corpus, index_cases, tmp_path, bad):
    path, want = index_cases[bad]
    out = tmp_path / "out"
    args = ("extract", "--model", "py:gen_support:planted", "--prompts", corpus.blank_lines, "--index", path)
    line = assert_clean_error(cli(*args, "--out", out, "--quiet"), want)
    assert path.name in line or "--train" in line  # names the input, or the option that fixes it
    assert not out.exists()  # refused before any run is written: a corrected rerun starts afresh


def test_extract_needs_train_or_index_and_a_positive_retrieve(corpus, index_cases, tmp_path):
    base = ("extract", "--model", "py:gen_support:planted", "--prompts", corpus.blank_lines, "--out", tmp_path / "o")
    assert_clean_error(cli(*base, "--quiet"), "--train", "--index")
    good = index_cases["a corrupt ids.parquet"][0].parent / "good"
    assert_clean_error(cli(*base, "--index", good, "--retrieve", 0, "--quiet"), "--retrieve")
    # part servers need Ray: without --runner ray, refused before any run is written
    assert_clean_error(cli(*base, "--index", good, "--serve-index-cpus", 1, "--quiet"), "--runner ray")
    assert not (tmp_path / "o").exists()


def test_options_that_apply_only_with_another_are_refused_not_ignored(corpus, tmp_path):
    """An option read only with another one (--retrieve with --index, --first-round with --adaptive,
    --n-candidates with --index, --grid with --metric tiled_l2) used to be taken and change nothing;
    given alone it is refused before any run is written, naming itself and the option it needs."""
    out = tmp_path / "o"
    base = ("extract", "--model", "py:gen_support:planted", "--prompts", corpus.blank_lines, "--train", corpus.clean)
    base = (*base, "--out", out, "--samples-per-prompt", 12, "--min-clique", 3, "--quiet")
    assert_clean_error(cli(*base, "--retrieve", 5), "--retrieve", "--index")
    for extra, flag in [
        (("--first-round", 4), "--first-round"),
        (("--round-size", 4), "--round-size"),
        (("--continue-clique", 3), "--continue-clique"),
        (("--no-stop-when-detected",), "--stop-when-detected"),
        (("--full-budget", "--first-round", 4), "--first-round"),
    ]:
        assert_clean_error(cli(*base, *extra), flag, "--adaptive")
    assert not out.exists()
    # adaptive set in --config: the explicit adaptive options are read, so they are taken
    toml = tmp_path / "adaptive.toml"
    toml.write_text("[extract]\nadaptive = true\n")
    res = cli(*base, "--config", toml, "--first-round", 4, "--round-size", 4)
    assert res.exit_code == 0, res.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["adaptive"] is True and man["config"]["first_round"] == 4

    unc = ("extract-unconditional", "--model", "py:gen_support:unconditional16", "--train", corpus.clean)
    unc = (*unc, "--samples", 4, "--out", tmp_path / "u", "--quiet")
    assert_clean_error(cli(*unc, "--n-candidates", 20), "--n-candidates", "--index")
    assert_clean_error(cli(*unc, "--grid", 2), "--grid", "--metric tiled_l2")
    assert not (tmp_path / "u").exists()
    res = cli(*unc, "--metric", "tiled_l2", "--grid", 2)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("bad", [*INDEX_BAD, "an index of another training set"])
def test_bad_indexes_are_refused_by_extract_unconditional(corpus, index_cases, tmp_path, bad):
    from memscan.synthetic import write_training_set

    if bad == "an index of another training set":  # --train names a set none of the index's ids is in
        other = tmp_path / "other"
        write_training_set(other, 3, size=16, prefix="o")
        path, want, extra = (
            index_cases["a corrupt ids.parquet"][0].parent / "good",
            "no id of the index",
            ("--train", other),
        )
    else:
        (path, want), extra = index_cases[bad], ()
    out = tmp_path / "out"
    args = ("extract-unconditional", "--model", "py:gen_support:unconditional16", "--samples", 4, "--index", path)
    assert_clean_error(cli(*args, *extra, "--n-candidates", 50, "--out", out, "--quiet"), want)
    assert not out.exists()  # refused before any run is written


@pytest.mark.parametrize("bad", INDEX_BAD)
def test_bad_indexes_are_refused_by_candidates_without_train(index_cases, tmp_path, bad):
    path, want = index_cases[bad]
    out = tmp_path / "prompts.csv"
    assert_clean_error(cli("candidates", "--index", path, "--top", 2, "--out", out, "--quiet"), want)
    assert not out.exists() and not (tmp_path / "prompts.candidates.json").exists()


# ---- language models: `memscan lm extract` -------------------------------------------------------
LM_EXTRACT_BAD = [
    "an index of another tokenizer",
    "an index path that does not exist",
    "a damaged index.json",
    "a damaged documents.parquet",
    "a prompts file of blank lines",
    "a prompts JSONL without a prompt",
    "non-UTF-8 prompts",
    "a prompts path that does not exist",
    "samples longer than the model's positions",
    "no sample to draw",
]


@pytest.fixture(scope="module")
def lm_extract_inputs(tmp_path_factory):
    from bad_inputs import build_lm_extract_inputs

    return build_lm_extract_inputs(tmp_path_factory.mktemp("lm_extract_inputs"))


@pytest.mark.parametrize("bad", LM_EXTRACT_BAD)
def test_bad_inputs_are_refused_by_lm_extract(lm_extract_inputs, tiny_lm_dir, tmp_path, bad):
    good_index, cases = lm_extract_inputs
    options, want = cases[bad]
    base = {"--model": tiny_lm_dir, "--index": good_index, "--samples": 2, "--length": 8}
    base.update(dict(zip(options[::2], options[1::2])))
    args = ["lm", "extract", *(x for kv in base.items() for x in kv), "--out", tmp_path / "o", "--quiet"]
    assert_clean_error(cli(*args), want)
    assert not (tmp_path / "o" / "manifest.json").exists()  # refused before any run starts


def test_lm_extract_unconditional_needs_a_start_token(lm_extract_inputs, tmp_path):
    good_index, _ = lm_extract_inputs
    args = ["lm", "extract", "--model", "py:lm_extract_support:no_start_lm", "--index", good_index, "--samples", 2]
    assert_clean_error(cli(*args, "--out", tmp_path / "o", "--quiet"), "neither a BOS nor an EOS", "--prompts")


def test_lm_extract_reference_with_fewer_positions_than_the_samples(lm_extract_inputs, tiny_lm_dir, tmp_path):
    """A reference whose positions cannot hold the start token + --length tokens: one error with
    both lengths and the --length that fits, before any run starts (not an IndexError after
    every sample was drawn)."""
    from memscan.testing.tiny_lm import make_tiny_gpt2

    good_index, _ = lm_extract_inputs
    short = make_tiny_gpt2(tmp_path / "ref16", seed=1, n_positions=16)
    args = ["lm", "extract", "--model", tiny_lm_dir, "--index", good_index, "--samples", 2, "--length", 32]
    assert_clean_error(
        cli(*args, "--reference", short, "--out", tmp_path / "o", "--quiet"),
        "1 tokens + 32 new tokens exceeds the 16 positions of the reference model",
        "at most --length 15 fits",
    )
    assert not (tmp_path / "o" / "manifest.json").exists()  # refused before any run starts


# ---- memscan compare: what is not a finished, comparable run -----------------------------------------
def test_compare_refuses_what_it_cannot_compare(corpus, finished_run, tmp_path):
    """Not a run, a damaged manifest, an unfinished run, a run of a kind compare does not read, a
    checkpoint folder without checkpoints: one clean error each, the inputs unchanged, and the
    refused --out reusable."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "manifest.json").write_text("{")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "manifest.json").write_text('{"kind": "extract", "status": "incomplete"}')
    index = tmp_path / "index"
    assert cli("index", corpus.mixed, "--out", index, "--quiet").exit_code == 0
    before = _snapshot(finished_run)
    out = tmp_path / "cmp"
    for bad, want in (
        (tmp_path / "nowhere", "not a memscan run"),
        (damaged, "not valid JSON"),
        (unfinished, "not complete"),
        (index, "kind 'index'"),
    ):
        assert_clean_error(cli("compare", finished_run, bad, "--out", out, "--quiet"), str(bad.name), want)
        assert not (out / "manifest.json").exists()
    assert _snapshot(finished_run) == before
    empty = tmp_path / "ckpts"
    (empty / "checkpoint-5").mkdir(parents=True)  # a checkpoint folder whose checkpoint holds no model
    args = TRAIN_COMMANDS["extract"](corpus, corpus.mixed, tmp_path / "sweep")
    args = tuple(empty if a == "py:gen_support:planted" else a for a in args)
    assert_clean_error(cli(*args), "checkpoint-5", "holds no model")


# ---- the outlier score in a training index's space: memscan compare / report --index ------------------
@pytest.mark.parametrize("bad", [b for b in INDEX_BAD if b != "an index whose training images moved"])
def test_bad_indexes_are_refused_by_the_outlier_score(corpus, index_cases, finished_run, tmp_path, bad):
    """(The training images are not read back: the outlier score uses the index's embeddings.)"""
    import shutil

    import numpy as np

    path, want = index_cases[bad]
    twin = tmp_path / "twin"
    shutil.copytree(finished_run, twin)
    out = tmp_path / "cmp"
    assert_clean_error(cli("compare", finished_run, twin, "--out", out, "--index", path, "--quiet"), want)
    assert not out.exists()
    np.save(tmp_path / "x.npy", np.linspace(0, 1, 9))
    ms = tmp_path / "ms"
    args = ("memscore", "--data", tmp_path / "x.npy", "--train-fn", "py:golden_support:gauss_train")
    args += ("--log-likelihood-fn", "py:golden_support:gauss_loglik", "--folds", 3, "--out", ms, "--quiet")
    assert cli(*args).exit_code == 0
    before = _snapshot(ms)
    assert_clean_error(cli("report", ms, "--outliers", "--index", path), want)
    assert _snapshot(ms) == before  # nothing written to the run


def test_report_outliers_refuses_runs_without_per_example_scores(finished_run):
    before = _snapshot(finished_run)
    assert_clean_error(cli("report", finished_run, "--outliers"), "kind 'extract'", "memscore")
    assert _snapshot(finished_run) == before


# ---- a device this machine does not have ---------------------------------------------------------
def _no_such_device() -> str:
    import torch

    return f"cuda:{torch.cuda.device_count() + 7}" if torch.cuda.is_available() else "cuda"


DEVICE_COMMANDS = {
    "extract": lambda c, m, lm, d, t: (
        "extract", "--model", "py:gen_support:planted", "--prompts", c.blank_lines, "--train", c.clean,
        "--samples-per-prompt", 12, "--min-clique", 3,
    ),
    "extract-unconditional": lambda c, m, lm, d, t: (
        "extract-unconditional", "--model", "py:gen_support:planted", "--train", c.clean, "--samples", 16,
    ),
    "audit": lambda c, m, lm, d, t: (
        "audit", "--model", "py:gen_support:planted", "--prompts", c.blank_lines, "--train", c.clean,
        "--samples-per-prompt", 12, "--min-clique", 3,
    ),
    "triage": lambda c, m, lm, d, t: ("triage", "--model", TINY_SD, "--prompts", c.blank_lines),
    "mia": lambda c, m, lm, d, t: ("mia", "--data", c.clean, "--model", m, "--members", t),
    "index": lambda c, m, lm, d, t: ("index", c.clean),
    "lm extractable": lambda c, m, lm, d, t: (
        "lm", "extractable", "--model", lm, "--data", d, "--sequences", 2, "--prefix-lengths", 32,
    ),
    "lm exposure": lambda c, m, lm, d, t: ("lm", "exposure", "--model", lm, "--canaries", "my PIN is {d2}::my PIN is 12"),
    "lm mia": lambda c, m, lm, d, t: ("lm", "mia", "--model", lm, "--members", d, "--nonmembers", d.with_name("n.jsonl")),
    "inpaint": lambda c, m, lm, d, t: ("inpaint", "--data", c.clean, "--model", m, "--members", t),
    "candidates": lambda c, m, lm, d, t: ("candidates", c.clean, "--top", 3, "--embedder", "pixel"),
    "lm extract": lambda c, m, lm, d, t: ("lm", "extract", "--model", lm, "--index", _bytes_index(t.parent), "--samples", 2),
}  # fmt: skip


def _bytes_index(root: Path) -> Path:
    """A small bytes-mode corpus index for `lm extract`."""
    from memscan.lm.corpus_index import CorpusIndex

    CorpusIndex.build([b"a small training corpus of plain text. " * 4], root / "bytes_index")
    return root / "bytes_index"


@pytest.mark.parametrize("command", sorted(DEVICE_COMMANDS))
def test_a_device_this_machine_lacks_is_one_error_before_any_work(corpus, unet_dir, tiny_lm_dir, tmp_path, command):
    """``--device cuda`` without a GPU (or ``cuda:N`` past the GPUs there are): one error naming
    the device and the fix, before any generation, training or scoring — nothing written."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a long enough training document. " * 10}) + "\n")
    (tmp_path / "n.jsonl").write_text(json.dumps({"text": "another document, not a member. " * 10}) + "\n")
    (tmp_path / "m.txt").write_text("m0\n")
    out = tmp_path / ("o.csv" if command == "candidates" else "o")
    args = DEVICE_COMMANDS[command](corpus, unet_dir, tiny_lm_dir, data, tmp_path / "m.txt")
    device = _no_such_device()
    assert_clean_error(cli(*args, "--out", out, "--device", device, "--quiet"), f"--device {device}", "--device cpu")
    assert not out.exists()


def test_error_hints_name_the_argument_the_command_takes(tiny_lm_dir, tmp_path):
    """The fix names what the user typed: ``lm index`` takes its corpus as the CORPUS argument,
    ``lm extractable`` as ``--data``; any run kind can be reported."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(cli("lm", "index", empty, "--out", tmp_path / "li", "--bytes"), "point CORPUS at")
    args = ("lm", "extractable", "--model", tiny_lm_dir, "--data", empty, "--out", tmp_path / "o", "--quiet")
    assert_clean_error(cli(*args), "point --data at")
    assert_clean_error(cli("report", tmp_path / "nothing"), "the --out directory of a memscan run")


@pytest.mark.parametrize("option", [("--nlist", "-3"), ("--nprobe", "0"), ("--pq-m", "0"), ("--index-shards", "0")])
def test_bad_index_parameters_are_refused_before_anything_is_embedded(corpus, tmp_path, monkeypatch, option):
    import memscan.index.faiss_index as fi

    monkeypatch.setattr(fi, "load_embedder", lambda *a, **k: pytest.fail("embedding started"), raising=False)
    out = tmp_path / "idx"
    res = cli("index", corpus.clean, "--out", out, "--index-type", "ivfpq", option[0], option[1], "--quiet")
    assert_clean_error(res, f"={option[1]} must be a positive integer", f"e.g. {option[0]} 8")
    assert not out.exists()


@pytest.mark.parametrize("option", ["--samples", "--batch-size", "--shard-size"])
def test_unconditional_counts_must_be_positive(corpus, tmp_path, option):
    args = ("extract-unconditional", "--model", "py:gen_support:planted", "--train", corpus.clean, "--samples", 16)
    res = cli(*args, option, 0, "--out", tmp_path / "o", "--quiet")
    assert_clean_error(res, f"{option.strip('-').replace('-', '_')}=0 must be a positive integer", f"e.g. {option} ")


# ---- output paths that cannot be written: refused before any work, nothing lost -------------------
def test_bad_output_paths_are_refused_before_any_work(corpus, finished_run, tmp_path, monkeypatch):
    """A report --out that is a folder or lies in a missing folder, a candidates --out that is a
    folder (checked before the duplicate counting), a demo --out that is a file: one clean error
    each; the finished run is untouched; no demo work starts."""
    before = _snapshot(finished_run)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert_clean_error(cli("report", finished_run, "--out", folder), "is a folder")
    assert_clean_error(cli("report", finished_run, "--out", tmp_path / "missing" / "r.html"), "does not exist")
    assert _snapshot(finished_run) == before
    counted = []
    import memscan.data.duplicates as dup

    monkeypatch.setattr(dup, "count_duplicates", lambda *a, **k: counted.append(1))
    csv_folder = tmp_path / "p.csv"
    csv_folder.mkdir()
    assert_clean_error(cli("candidates", corpus.clean, "--top", 3, "--out", csv_folder, "--quiet"), "is a folder")
    blocked = tmp_path / "a_file_too"
    blocked.write_text("x")
    under = blocked / "sub" / "p.csv"
    assert_clean_error(cli("candidates", corpus.clean, "--top", 3, "--out", under, "--quiet"), "is a file")
    assert not counted  # refused before the counting
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for demo in (["demo"], ["demo-mia"], ["demo", "lm"], ["demo", "lm", "compare"], ["demo", "compare"]):
        assert_clean_error(cli(*demo, "--quick", "--quiet", "--out", a_file / "sub"), "a_file is a file")
        assert_clean_error(cli(*demo, "--quick", "--quiet", "--out", a_file), "is a file")
    assert a_file.read_text() == "not a folder"


# ---- diffusion models: a damaged or incomplete model directory ----------------------------------------
# Inputs the intact models accept (class ids as prompts, the null class as condition), so that the
# damaged file is the only thing wrong: before the fix, a missing or unreadable scheduler config
# ran to the end on diffusers' default noise schedule (exit 0, nothing recorded).
MODEL_COMMANDS = {
    "extract": lambda c, m, p, t: (
        "extract", "--model", m, "--prompts", p, "--train", c.clean, "--samples-per-prompt", 4, "--min-clique", 3,
    ),
    "extract-unconditional": lambda c, m, p, t: ("extract-unconditional", "--model", m, "--train", c.clean, "--samples", 4),
    "audit": lambda c, m, p, t: (
        "audit", "--model", m, "--prompts", p, "--train", c.clean, "--samples-per-prompt", 12, "--min-clique", 3,
        "--budget", 200,
    ),
    "triage": lambda c, m, p, t: ("triage", "--model", m, "--prompts", p),
    "mia": lambda c, m, p, t: ("mia", "--data", c.clean, "--model", m, "--members", t, "--condition", "null"),
    "inpaint": lambda c, m, p, t: ("inpaint", "--data", c.clean, "--model", m, "--members", t, "--condition", "null"),
}  # fmt: skip


@pytest.fixture(scope="module")
def damaged_models(tmp_path_factory):
    from bad_inputs import build_damaged_models

    return build_damaged_models(tmp_path_factory.mktemp("damaged_models"), TINY_SD)


def _model_args(corpus, model, tmp_path: Path, command: str) -> tuple:
    (tmp_path / "ids.txt").write_text("0\n1\n")  # class ids of the demo model
    (tmp_path / "m.txt").write_text("m0\n")
    return MODEL_COMMANDS[command](corpus, model, tmp_path / "ids.txt", tmp_path / "m.txt")


@pytest.mark.parametrize(
    ("bad", "command"), [(bad, command) for bad, case in DAMAGED_MODELS.items() for command in case[3]]
)
def test_a_damaged_model_directory_is_one_error_naming_the_file(corpus, damaged_models, tmp_path, bad, command):
    """A model directory with a file that does not parse, a scheduler config diffusers refuses, or
    no scheduler at all: one error naming the file and the fix, never a traceback, never diffusers'
    default noise schedule in its place — and nothing written under --out."""
    model, file = damaged_models[bad]
    out = tmp_path / "o"
    line = assert_clean_error(cli(*_model_args(corpus, model, tmp_path, command), "--out", out, "--quiet"), file)
    assert " — " in line and ("save_pretrained" in line or "_class_name" in line)  # and the fix
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]  # nothing written


@pytest.mark.parametrize("command", [c for c in MODEL_COMMANDS if c != "extract-unconditional"])
def test_the_intact_demo_model_runs_with_the_same_arguments(corpus, tmp_path, command):
    """The control: the demo pipeline the damaged copies come from runs to the end with the same
    arguments (extract-unconditional excepted: the demo model is class-conditional)."""
    from memscan.demo.run import model_dir

    res = cli(*_model_args(corpus, model_dir(), tmp_path, command), "--out", tmp_path / "o", "--quiet")
    assert res.exit_code == 0, res.output


# ---- py: specs whose module does not import -----------------------------------------------------
@pytest.mark.parametrize("module", ["raises", "syntax error"])
@pytest.mark.parametrize("command", ["memscore", "mia", "inpaint", "extract-unconditional", "lm exposure"])
def test_a_py_module_that_fails_to_import_is_one_error(corpus, tmp_path, module, command):
    """A ``py:`` module that raises on import, or does not parse: one error naming the spec and
    the exception's first line, for every command that takes one."""
    mod = tmp_path / "boom.py"
    mod.write_text("raise RuntimeError('boom on import')\n" if module == "raises" else "def f(:\n")
    spec = f"py:{mod}:f"
    (tmp_path / "m.txt").write_text("m0\n")
    args = {
        "memscore": ("memscore", "--data", corpus.bad_arrays["NaN values"][0], "--train-fn", spec,
                     "--log-likelihood-fn", spec, "--folds", 2),
        "mia": ("mia", "--data", corpus.clean, "--model", spec, "--members", tmp_path / "m.txt"),
        "inpaint": ("inpaint", "--data", corpus.clean, "--model", spec, "--members", tmp_path / "m.txt"),
        "extract-unconditional": ("extract-unconditional", "--model", spec, "--train", corpus.clean, "--samples", 4),
        "lm exposure": ("lm", "exposure", "--model", spec, "--canaries", "my PIN is {d2}::my PIN is 12"),
    }[command]  # fmt: skip
    want = "RuntimeError: boom on import" if module == "raises" else "SyntaxError"
    line = assert_clean_error(cli(*args, "--out", tmp_path / "o", "--quiet"), spec, want)
    assert " — " in line  # and a hint


# ---- any integer is a valid --seed ---------------------------------------------------------------
SEED_COMMANDS = ["mia", "inpaint", "lm extractable", "lm exposure", "lm mia", "memscore", "extract-unconditional"]


@pytest.mark.parametrize("command", SEED_COMMANDS)
def test_a_negative_seed_is_accepted_by_every_command(corpus, unet_dir, tiny_lm_dir, tmp_path, command):
    """``--seed -1`` runs to the end (numpy's generators get ``numpy_seed(seed)``), as it does in
    extract, triage, lm extract and lm exposure — never a traceback after the shards are done."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a long enough training document. " * 10}) + "\n")
    (tmp_path / "n.jsonl").write_text(json.dumps({"text": "another document, not a member. " * 10}) + "\n")
    (tmp_path / "m.txt").write_text("m0\n")
    if command == "memscore":
        mod = tmp_path / "gauss.py"
        mod.write_text(
            "def train(d):\n    return float(d.mean()), float(d.var()) + 1e-3\n\n"
            "def loglik(m, d):\n    return -0.5 * (d - m[0]) ** 2 / m[1]\n"
        )
        import numpy as np

        np.save(tmp_path / "x.npy", np.arange(8, dtype=np.float32))
        args = ("memscore", "--data", tmp_path / "x.npy", "--train-fn", f"py:{mod}:train", "--folds", 2,
                "--log-likelihood-fn", f"py:{mod}:loglik")  # fmt: skip
    else:
        args = DEVICE_COMMANDS[command](corpus, unet_dir, tiny_lm_dir, data, tmp_path / "m.txt")
    if command in ("mia", "inpaint"):
        args = (*args, "--bootstrap", 5, *(("--timesteps", 10, "--noise-draws", 1) if command == "mia" else ()))
        args = (*args, *(("--steps", 2, "--jump-n-sample", 1) if command == "inpaint" else ()))
    if command == "lm mia":
        args = (*args, "--bootstrap", 5)
    res = cli(*args, "--seed", -1, "--out", tmp_path / "o", "--quiet")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("command", ["mia", "inpaint"])
@pytest.mark.parametrize(("option", "value"), [("--threads", 0), ("--threads", -2), ("--bootstrap", -1)])
def test_bad_threads_and_bootstrap_are_refused_before_any_work(corpus, unet_dir, tmp_path, command, option, value):
    """``--threads`` below 1 (leave it out for torch's default) and a negative ``--bootstrap``: one
    error naming the option, before the run directory is written."""
    (tmp_path / "m.txt").write_text("m0\n")
    args = DEVICE_COMMANDS[command](corpus, unet_dir, None, None, tmp_path / "m.txt")
    out = tmp_path / "o"
    line = assert_clean_error(cli(*args, option, value, "--out", out, "--quiet"), f"{option} {value}")
    assert " — " in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("toml", "want"),
    [
        ("[extract]\nsamples_per_prompt = 'many'\n", "samples_per_prompt = 'many' is not an integer"),
        ("alpha = 'x'\n", "alpha = 'x' is not a number"),
        ("[extract]\nadaptive = 1\n", "adaptive = 1 is not true or false"),
        ("[extrct]\nsamples_per_prompt = 12\n", "[extrct]"),
        ("[extract]\nbatch_size = 0\n", "batch_size=0"),
    ],
)
def test_bad_config_files_are_one_error(corpus, tmp_path, toml, want):
    """A --config value of the wrong type, a misspelled table (once silently ignored) or a value
    out of range: one error naming it and a fix."""
    (tmp_path / "run.toml").write_text(toml)
    args = TRAIN_COMMANDS["extract"](corpus, corpus.clean, tmp_path / "o")
    line = assert_clean_error(cli(*args, "--config", tmp_path / "run.toml"), want)
    assert " — " in line


@pytest.mark.parametrize("command", ["extract", "audit"])
def test_pipeline_options_are_refused_for_a_py_generator(corpus, tmp_path, command):
    """--steps, --dtype, --scheduler, --height, --width mean nothing to a py: generator: one error
    naming them, not a run that silently drops them."""
    args = TRAIN_COMMANDS[command](corpus, corpus.clean, tmp_path / "o")
    extra = ("--steps", 5) if command == "audit" else ("--steps", 5, "--dtype", "fp16", "--height", 32)
    line = assert_clean_error(cli(*args, *extra), "--steps", "py:gen_support:planted")
    assert command == "audit" or ("--dtype" in line and "--height" in line)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_a_bad_dtype_is_named_not_blamed_on_the_model(tiny_lm_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a long enough training document. " * 10}) + "\n")
    args = ("lm", "extractable", "--model", tiny_lm_dir, "--data", data, "--sequences", 2, "--prefix-lengths", 32)
    line = assert_clean_error(cli(*args, "--dtype", "fp8", "--out", tmp_path / "o", "--quiet"), "fp8")
    assert "not a causal language model" not in line


# ---- --dtype: one set of spellings, one error for any other -------------------------------------
# every command with --dtype (triage joins when its --dtype is dtype_option("image"))
DTYPE_COMMANDS = {
    "extract": lambda c, m, lm, d, t: (
        "extract", "--model", TINY_SD, "--prompts", c.blank_lines, "--train", c.clean, "--samples-per-prompt", 4,
    ),
    "triage": DEVICE_COMMANDS["triage"],
    **{k: DEVICE_COMMANDS[k] for k in ("lm extractable", "lm exposure", "lm mia", "lm extract")},
}  # fmt: skip


@pytest.mark.parametrize("value", ["fp8", "half", "float", "float64", ""])
@pytest.mark.parametrize("command", sorted(DTYPE_COMMANDS))
def test_a_bad_dtype_is_one_error_naming_the_option_and_the_spellings(
    corpus, unet_dir, tiny_lm_dir, tmp_path, command, value
):
    """A --dtype no command knows: one error naming --dtype, the value and every accepted spelling
    (short and torch names), before anything is read or written."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a long enough training document. " * 10}) + "\n")
    (tmp_path / "n.jsonl").write_text(json.dumps({"text": "another document, not a member. " * 10}) + "\n")
    out = tmp_path / "o"
    args = DTYPE_COMMANDS[command](corpus, unet_dir, tiny_lm_dir, data, tmp_path / "m.txt")
    line = assert_clean_error(cli(*args, "--dtype", value, "--out", out, "--quiet"), f"--dtype {value!r}")
    for spelling in ("auto", "fp32", "float32", "fp16", "float16", "bf16", "bfloat16"):
        assert spelling in line
    assert " — " in line
    assert not out.exists()


def test_a_bad_dtype_on_resume_leaves_the_run_as_it_was(finished_run):
    before = _snapshot(finished_run)
    args = ("extract", "--model", TINY_SD, "--prompts", "p.txt", "--train", "t", "--out", finished_run, "--resume")
    assert_clean_error(cli(*args, "--dtype", "fp8", "--quiet"), "--dtype 'fp8'")
    assert _snapshot(finished_run) == before


# ---- a UNet .bin that holds more than tensors -----------------------------------------------------
@pytest.mark.parametrize("command", ["extract", "triage", "mia", "inpaint"])
def test_a_unet_bin_holding_a_pickled_object_is_refused_by_every_diffusion_command(corpus, tmp_path, command):
    """A model directory whose only UNet weights are a .bin pickling a callable (here ``open``):
    one error naming the file, the object never built (no marker file), nothing written — in every
    command that loads a diffusion model (they all read a .bin weights-only)."""
    import pickle
    import shutil

    from pickle_support import Payload

    from memscan.demo.run import model_dir

    model = tmp_path / "model"
    shutil.copytree(model_dir(), model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(model / "unet" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"conv_in.weight": Payload(str(marker))}, f)
    out = tmp_path / "o"
    line = assert_clean_error(
        cli(*_model_args(corpus, model, tmp_path, command), "--out", out, "--quiet"),
        "refused to load diffusion_pytorch_model.bin",
    )
    assert "safetensors" in line  # the fix
    assert not marker.exists()
    if command != "triage":  # triage starts its run (manifest.json, run.log) before its workers load the weights
        assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_error_line_shows_input_as_typed(tmp_path):
    """rich replaced ``:name:`` emoji codes in the error line: ``py:train:build`` printed as
    ``py🚋build`` and a prompt's ``:dog:`` as 🐶, so what was shown could not be copied back."""
    import typer

    from memscan.commands.common import console, fail
    from memscan.errors import InputError

    res = cli("extract-unconditional", "--model", "py:train:build", "--samples", 4, "--out", tmp_path / "o")
    line = assert_clean_error(res, "py:train:build")
    assert "🚋" not in line
    with pytest.raises(typer.Exit):
        with console.capture() as cap:
            fail(InputError("prompt 'a :dog: in [bold]grass[/]' is bad", "see :smile:"))
    assert "a :dog: in [bold]grass[/]" in cap.get() and "see :smile:" in cap.get()
