"""The bad-input corpus: every broken or hostile input a user's data can hold, built on disk.

Made by the tests (nothing downloaded). ``build_corpus(root)`` writes it and returns a
:class:`Corpus` of paths; ``tests/test_bad_input_corpus.py`` runs every CLI command that reads
user data against it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from memscan.synthetic import training_image

SIZE = 32


@dataclass
class Corpus:
    #: a training folder of 8 good images in mixed sizes and modes (L, RGB, RGBA, 16-bit, CMYK,
    #: palette, a JPEG) plus 4 broken files: truncated PNG, corrupt JPEG, zero-byte PNG, text as .png
    mixed: Path
    mixed_good: int
    mixed_broken: list[str]
    #: training sets that must be refused, by name → (path, what the error must mention)
    bad_train: dict[str, tuple[Path, str]]
    #: prompt files that must be refused, by name → (path, what the error must mention)
    bad_prompts: dict[str, tuple[Path, str]]
    #: a prompts file with blank lines between 3 prompts (skipped and counted, not an error)
    blank_lines: Path
    #: 4 good RGB 32×32 images m0..m3 (membership inference needs every example readable)
    clean: Path
    #: member lists for membership inference: name → (path, what the error must mention)
    bad_members: dict[str, tuple[Path, str]]
    #: arrays for memscore --data: name → (path, what the error must mention)
    bad_arrays: dict[str, tuple[Path, str]]
    #: language-model inputs: name → (which option: data | model | canaries, value, what the error must mention)
    bad_lm: dict[str, tuple[str, str, str]] = None


def _good(name: str, size: int = SIZE) -> np.ndarray:
    return training_image(name, size)


def build_corpus(root: Path) -> Corpus:
    root.mkdir(parents=True, exist_ok=True)

    # 1. a training folder: good images in every mode and size, and broken files beside them
    mixed = root / "mixed"
    mixed.mkdir()
    Image.fromarray(_good("m0")).save(mixed / "m0.png")  # RGB
    Image.fromarray(_good("m1")).convert("L").save(mixed / "m1.png")  # grayscale
    Image.fromarray(_good("m2")).convert("RGBA").save(mixed / "m2.png")  # alpha
    Image.fromarray(_good("m3")[:, :, 0].astype(np.uint16) * 257).save(mixed / "m3.png")  # 16-bit
    Image.fromarray(_good("m4", 48)).save(mixed / "m4.png")  # larger
    Image.fromarray(_good("m5", 20)).resize((20, 28)).save(mixed / "m5.png")  # smaller, not square
    Image.fromarray(_good("m6")).convert("P").save(mixed / "m6.png")  # palette
    Image.fromarray(_good("m7")).save(mixed / "m7.jpg", quality=90)
    (mixed / "m1.txt").write_text("a caption with <script>alert(1)</script>\n")
    buf = io.BytesIO()
    Image.fromarray(_good("x")).save(buf, format="PNG")
    (mixed / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    jpg = io.BytesIO()
    Image.fromarray(_good("y")).save(jpg, format="JPEG")
    data = bytearray(jpg.getvalue())
    data[200:400] = b"\x00" * 200  # corrupt the entropy-coded data and markers
    (mixed / "corrupt.jpg").write_bytes(bytes(data[:300]))
    (mixed / "zero.png").write_bytes(b"")
    (mixed / "text.png").write_text("this is not an image")

    # 2. training sets that cannot be used at all
    empty = root / "empty"
    empty.mkdir()
    broken = root / "all_broken"
    broken.mkdir()
    (broken / "zero.png").write_bytes(b"")
    (broken / "text.jpg").write_text("no image here")
    (root / "img").mkdir()
    Image.fromarray(_good("ok")).save(root / "img" / "ok.png")
    escape = root / "escape.csv"
    pd.DataFrame({"id": ["ok", "pw"], "path": ["img/ok.png", "../../etc/passwd"]}).to_csv(escape, index=False)
    outside = root.parent / f"{root.name}-outside.png"
    Image.fromarray(_good("out")).save(outside)
    (root / "img" / "link.png").symlink_to(outside)
    symlink = root / "symlink.csv"
    pd.DataFrame({"id": ["ok", "ln"], "path": ["img/ok.png", "img/link.png"]}).to_csv(symlink, index=False)
    nopath = root / "nopath.parquet"
    pd.DataFrame({"id": ["ok"], "file": ["img/ok.png"]}).to_parquet(nopath)
    mistyped = root / "mistyped.parquet"
    pd.DataFrame({"id": [1], "path": [3.5]}).to_parquet(mistyped)
    missing_file = root / "missing.csv"
    pd.DataFrame({"id": ["gone"], "path": ["img/gone.png"]}).to_csv(missing_file, index=False)
    bad_train = {
        "empty folder": (empty, "no images"),
        "only broken files": (broken, "could be read"),
        "manifest path outside its root": (escape, "outside"),
        "manifest symlink out of its root": (symlink, "outside"),
        "manifest without a path column": (nopath, "path"),
        "manifest with a mistyped path column": (mistyped, "not a file path"),
        "manifest whose files are all missing": (missing_file, "could be read"),
        "a path that does not exist": (root / "nowhere", "nowhere"),
    }

    # 3. prompt files
    p = root / "prompts"
    p.mkdir()
    blank = p / "blank_lines.txt"
    blank.write_text("\n\ncopy t0003\n   \nfresh 1\n\n\nfresh 2\n")
    (p / "empty.txt").write_text("\n \n")
    (p / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (p / "long.txt").write_text("fresh 1\n" + "x" * 100_000 + "\n")
    pd.DataFrame({"prompt_id": ["a", "a"], "prompt": ["copy t0003", "fresh"]}).to_csv(p / "dup_ids.csv", index=False)
    pd.DataFrame({"id": ["a"], "text": ["copy t0003"]}).to_parquet(p / "no_columns.parquet")
    pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["copy t0003", None]}).to_parquet(p / "null_prompt.parquet")
    (p / "broken.parquet").write_bytes(b"PAR1 not really")
    bad_prompts = {
        "no prompts, only blank lines": (p / "empty.txt", "no prompts"),
        "non-UTF-8 bytes": (p / "latin1.txt", "UTF-8"),
        "a 100 kB line": (p / "long.txt", "characters"),
        "duplicate prompt ids": (p / "dup_ids.csv", "repeats prompt ids: a"),
        "a table without prompt_id/prompt": (p / "no_columns.parquet", "prompt"),
        "a missing (null) prompt in a table": (p / "null_prompt.parquet", "missing (null)"),
        "a corrupt Parquet file": (p / "broken.parquet", "broken.parquet"),
        "a prompts path that does not exist": (p / "nowhere.txt", "nowhere.txt"),
    }

    # 4. member lists (membership inference) and arrays (memscore)
    clean = root / "clean"
    clean.mkdir()
    for i in range(4):
        Image.fromarray(_good(f"m{i}")).save(clean / f"m{i}.png")
    members = root / "members"
    members.mkdir()
    pd.DataFrame({"id": ["m0", "m1", "m2", "m3"], "is_member": ["1", "0", "maybe", "1"]}).to_csv(
        members / "odd_flag.csv", index=False
    )
    pd.DataFrame({"id": ["m0", "m1"], "is_member": [1, 0]}).to_csv(members / "short.csv", index=False)
    (members / "broken.parquet").write_bytes(b"PAR1 nope")
    (members / "unknown.txt").write_text("m0\nnot-an-example\n")
    (members / "latin1.txt").write_bytes("m0\ncaf\xe9\n".encode("latin-1"))
    (members / "empty.txt").write_text("\n")
    bad_members = {
        "a member id that is not in the data": (members / "unknown.txt", "not-an-example"),
        "non-UTF-8 bytes": (members / "latin1.txt", "UTF-8"),
        "no member ids": (members / "empty.txt", "non-members"),
        "an is_member value that is not a flag": (members / "odd_flag.csv", "maybe"),
        "a table without a row for every example": (members / "short.csv", "no row"),
        "a corrupt Parquet table": (members / "broken.parquet", "broken.parquet"),
    }
    arrays = root / "arrays"
    arrays.mkdir()
    np.save(arrays / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (arrays / "truncated.npy").write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'")
    np.save(arrays / "nan.npy", np.array([0.0, np.nan, 1.0, 2.0, 3.0], np.float32))
    np.save(arrays / "text.npy", np.array(["a", "b", "c"]))
    np.save(arrays / "one.npy", np.zeros((1, 4), np.float32))
    bad_arrays = {
        "a pickled object array": (arrays / "objects.npy", "unpickles"),
        "a truncated .npy": (arrays / "truncated.npy", "not a valid .npy"),
        "NaN values": (arrays / "nan.npy", "NaN"),
        "a string array": (arrays / "text.npy", "numeric"),
        "too few examples for the folds": (arrays / "one.npy", "fold"),
    }
    bad_lm = _bad_lm_inputs(root / "lm")
    return Corpus(
        bad_lm=bad_lm,
        mixed=mixed,
        mixed_good=8,
        mixed_broken=["corrupt", "text", "truncated", "zero"],
        bad_train=bad_train,
        clean=clean,
        bad_prompts=bad_prompts,
        blank_lines=blank,
        bad_members=bad_members,
        bad_arrays=bad_arrays,
    )


def _bad_lm_inputs(lm: Path) -> dict[str, tuple[str, str, str]]:
    """Training text, models and canaries that ``memscan lm`` must refuse (the model, where one is
    needed, is a tiny byte-level GPT-2 the test supplies)."""
    import json

    lm.mkdir()
    (lm / "no_text.jsonl").write_text(json.dumps({"id": 1, "body": "the text is under another name"}) + "\n")
    pd.DataFrame({"content": ["a document " * 20]}).to_parquet(lm / "no_text.parquet")
    (lm / "not_json.jsonl").write_text(json.dumps({"text": "fine " * 30}) + "\n{oops\n")
    (lm / "short.jsonl").write_text("".join(json.dumps({"text": f"short {i}"}) + "\n" for i in range(5)))
    ids = np.arange(3, 203, dtype=np.int64).reshape(2, 100)
    np.save(lm / "other_tokenizer.npy", ids)
    (lm / "other_tokenizer.npy.tokenizer.json").write_text(json.dumps({"vocab_sha256": "0" * 64, "name": "gpt2"}))
    np.save(lm / "unrecorded.npy", ids)
    (lm / "empty_dir").mkdir()
    not_causal = lm / "t5"
    not_causal.mkdir()
    (not_causal / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 16, "vocab_size": 50}))
    no_config = lm / "no_config"
    no_config.mkdir()
    (no_config / "weights.bin").write_bytes(b"\0" * 16)
    (lm / "model.bin").write_bytes(b"\0" * 16)
    (lm / "mismatch.jsonl").write_text(json.dumps({"canary": "my PIN is 12a", "format": "my PIN is {d3}"}) + "\n")
    (lm / "no_hole.jsonl").write_text(json.dumps({"canary": "my PIN", "format": "my PIN"}) + "\n")
    (lm / "canaries_not_json.jsonl").write_text("my PIN is 123\n")
    # checkpoint sweeps (--model FOLDER of checkpoint-N/): one holding no model; two of other widths
    (lm / "ckpts_empty" / "checkpoint-10").mkdir(parents=True)
    for step, width in ((10, 32), (20, 64)):
        d = lm / "ckpts_mismatched" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 384, "n_embd": width}))
    return {
        "a checkpoint folder whose checkpoint-N holds no model": (
            "model",
            str(lm / "ckpts_empty"),
            "holds no model",
        ),
        "checkpoints of different models": ("model", str(lm / "ckpts_mismatched"), "are not one model"),
        "a JSONL file without the text field": ("data", str(lm / "no_text.jsonl"), "no 'text' field"),
        "a Parquet file without the text column": ("data", str(lm / "no_text.parquet"), "no text column"),
        "a JSONL line that is not JSON": ("data", str(lm / "not_json.jsonl"), "line 2 is not JSON"),
        "documents shorter than prefix + suffix": ("data", str(lm / "short.jsonl"), "tokens a window needs"),
        "token ids of another tokenizer": ("data", str(lm / "other_tokenizer.npy"), "another tokenizer"),
        "token ids without a tokenizer record": ("data", str(lm / "unrecorded.npy"), "no tokenizer record"),
        "a folder without training text": ("data", str(lm / "empty_dir"), "holds no"),
        "training text that does not exist": ("data", str(lm / "nowhere.jsonl"), "does not exist"),
        "a model directory that is not a causal LM": ("model", str(not_causal), "not a causal language model"),
        "a model directory without config.json": ("model", str(no_config), "no config.json"),
        "a model file that is not a .gguf": ("model", str(lm / "model.bin"), "not a .gguf"),
        "a py: object that is not a causal LM": ("model", "py:lm_corpus_support:not_a_causal_lm", "not a causal LM"),
        "a canary that does not match its format": ("canaries", str(lm / "mismatch.jsonl"), "does not match"),
        "a canary format without a hole": ("canaries", str(lm / "no_hole.jsonl"), "no hole"),
        "a canary line that is not JSON": ("canaries", str(lm / "canaries_not_json.jsonl"), "is not JSON"),
    }


# ---- language models: member / non-member texts for `memscan lm mia` ------------------------------
def build_lm_mia_texts(root: Path) -> tuple[Path, dict[str, tuple[Path, Path, str]]]:
    """A good members file and bad (members, non-members) pairs for ``lm mia``: name → (members,
    non-members, what the error must mention)."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    good = root / "members.txt"
    good.write_text("the first member text\nthe second member text\n")
    other = root / "nonmembers.txt"
    other.write_text("a text the model never saw\nanother unseen text\n")
    empty = root / "empty.txt"
    empty.write_text("")
    blank = root / "blank.txt"
    blank.write_text("\n  \n\n")
    no_text = root / "no_text.jsonl"
    no_text.write_text(json.dumps({"body": "a text under the wrong key"}) + "\n")
    not_json = root / "not_json.jsonl"
    not_json.write_text('{"text": "fine"}\n{"text": broken\n')
    binary = root / "binary.txt"
    binary.write_bytes(b"caf\xe9 au lait\n")
    one_token = root / "one_token.txt"
    one_token.write_text("a\nthe second member text\n")
    no_column = root / "no_column.parquet"
    pd.DataFrame({"body": ["x", "y"]}).to_parquet(no_column)
    return good, {
        "an empty members file": (empty, other, "holds no examples"),
        "a members file of blank lines": (blank, other, "holds no examples"),
        "a JSONL without text": (no_text, other, 'no "text" field'),
        "a JSONL line that is not JSON": (not_json, other, "line 2 is not JSON"),
        "non-UTF-8 bytes": (binary, other, "not UTF-8"),
        "a Parquet file without a text column": (no_column, other, 'no "text" column'),
        "members equal to non-members": (good, good, "(the same file)"),
        "a members path that does not exist": (root / "nowhere.txt", other, "does not exist"),
        "an example of one token": (one_token, other, "1 token(s)"),
    }


# ---- language models: the corpus index, `memscan lm index` and `lm extractable --index` --------------
def build_lm_index_inputs(root: Path) -> dict[str, tuple[list, str]]:
    """Inputs `memscan lm index` (and `lm extractable --index`) must refuse: name → (the command's
    arguments, less ``--out``, what the error must mention). ``{lookup}`` stands for the lookup
    model spec and ``{tiny}`` for the tiny GPT-2 directory the test supplies."""
    import json

    from memscan import CorpusIndex

    root.mkdir(parents=True, exist_ok=True)
    empty = root / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("")
    latin1 = root / "latin1"
    latin1.mkdir()
    (latin1 / "a.txt").write_bytes(b"caf\xe9 au lait")
    ids = np.arange(3, 203, dtype=np.int64).reshape(2, 100)
    np.save(root / "other_tokenizer.npy", ids)
    (root / "other_tokenizer.npy.tokenizer.json").write_text(json.dumps({"vocab_sha256": "0" * 64}))
    corpus = root / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"training document {i}: " + "words " * 30}) + "\n" for i in range(4))
    )
    # an index of another tokenizer (a recorded vocabulary no model has), and a damaged one
    other = root / "other_index"
    CorpusIndex.build(
        [np.arange(300) % 250], other, tokenizer={"name": "x", "vocab_sha256": "1" * 64, "vocab_size": 256}
    )
    damaged = root / "damaged_index"
    CorpusIndex.build([b"some training text"], damaged)
    sa = damaged / "sa" / "00000" / "sa.npy"
    sa.write_bytes(sa.read_bytes()[:-4])
    extractable = ["lm", "extractable", "--model", "{tiny}", "--data", str(corpus), "--sequences", 2, "--prefix-lengths", 16, "--suffix-length", 8]  # fmt: skip
    # training text that is not UTF-8: a JSONL line, and a .txt document (never silently replaced)
    bad_jsonl = root / "bad.jsonl"
    bad_jsonl.write_bytes(corpus.read_bytes() + b'{"text": "caf\xe9 ' + b"words " * 30 + b'"}\n')
    bad_txt = root / "bad_txt"
    bad_txt.mkdir()
    (bad_txt / "a.txt").write_bytes(b"training document: " + b"words " * 30 + b"\xff\xfe")
    data_of = extractable.index("--data") + 1
    return {
        "a JSONL line of training text that is not UTF-8": (
            [*extractable[:data_of], str(bad_jsonl), *extractable[data_of + 1 :]],
            "bad.jsonl line 5 is not UTF-8",
        ),
        "a training .txt that is not UTF-8": (
            [*extractable[:data_of], str(bad_txt), *extractable[data_of + 1 :]],
            "a.txt is not UTF-8",
        ),
        "an empty corpus": (["lm", "index", str(empty), "--bytes"], "holds no token"),
        "invalid UTF-8 where text is expected": (["lm", "index", str(latin1), "--tokenizer", "{lookup}"], "not UTF-8"),
        "token ids of another tokenizer": (
            ["lm", "index", str(root / "other_tokenizer.npy"), "--tokenizer", "{lookup}"],
            "another tokenizer",
        ),
        "neither --tokenizer nor --bytes": (["lm", "index", str(corpus)], "exactly one of"),
        "an index of another tokenizer": ([*extractable, "--index", str(other)], "not the corpus index's"),
        "a corrupt index file": ([*extractable, "--index", str(damaged)], "sa.npy"),
        "a folder that is no index": ([*extractable, "--index", str(latin1)], "not a corpus index"),
    }


# ---- language models: indexes and prompts for `memscan lm extract` --------------------------------
def build_lm_extract_inputs(root: Path) -> tuple[Path, dict[str, tuple[list, str]]]:
    """A good bytes-mode corpus index and the bad inputs ``lm extract`` must refuse: name → (the
    options that replace the good ones, what the error must mention)."""
    import json

    from memscan.lm.corpus_index import CorpusIndex

    root.mkdir(parents=True, exist_ok=True)
    good = root / "bytes_index"
    CorpusIndex.build([b"a small training corpus of plain text. " * 4], good)
    other = root / "other_tokenizer_index"
    CorpusIndex.build([np.arange(20)], other, tokenizer={"name": "gpt2", "vocab_sha256": "0" * 64, "vocab_size": 50257})
    not_index = root / "not_an_index"
    not_index.mkdir()
    (not_index / "index.json").write_text("{broken")
    empty_prompts = root / "empty_prompts.txt"
    empty_prompts.write_text("\n\n")
    no_prompt = root / "no_prompt.jsonl"
    no_prompt.write_text(json.dumps({"body": "hello"}) + "\n")
    binary = root / "binary_prompts.txt"
    binary.write_bytes(b"caf\xe9\n")
    no_docs = root / "damaged_documents_index"
    CorpusIndex.build([b"a small training corpus of plain text. " * 4], no_docs)
    (no_docs / "documents.parquet").write_bytes((no_docs / "documents.parquet").read_bytes()[:50])
    return good, {
        "a damaged documents.parquet": (["--index", no_docs], "documents.parquet"),
        "an index of another tokenizer": (["--index", other], "is not the corpus index's"),
        "an index path that does not exist": (["--index", root / "nowhere"], "does not exist"),
        "a damaged index.json": (["--index", not_index], "damaged"),
        "a prompts file of blank lines": (["--prompts", empty_prompts], "holds no prompt"),
        "a prompts JSONL without a prompt": (["--prompts", no_prompt], 'no "prompt"'),
        "non-UTF-8 prompts": (["--prompts", binary], "not UTF-8"),
        "a prompts path that does not exist": (["--prompts", root / "nowhere.txt"], "does not exist"),
        "samples longer than the model's positions": (["--length", 5000], "positions of the model"),
        "no sample to draw": (["--samples", 0], "--samples 0 must be ≥ 1"),
    }


# ---- diffusion models: damaged model directories (extract, audit, triage, mia, inpaint) -------------
#: the diffusion commands that open a ``--model`` directory
DIFFUSION_COMMANDS = ("extract", "extract-unconditional", "audit", "triage", "mia", "inpaint")
_NOT_MIA = tuple(c for c in DIFFUSION_COMMANDS if c not in ("mia", "inpaint"))  # they never read model_index.json
# triage reads the weights in its workers, after the run's manifest is written (an error all the same)
_NOT_TRIAGE = tuple(c for c in DIFFUSION_COMMANDS if c != "triage")
_SCHED = "scheduler/scheduler_config.json"

#: name → (the model copied: "demo" | "text2image" | "bare" (the demo's unet/ and memscan.json), the
#: file damaged, as the error must name it, its new text (None: its folder is removed; "{misfit}":
#: the demo's UNet config with other channel widths), the commands that must refuse it)
DAMAGED_MODELS: dict[str, tuple[str, str, str | None, tuple[str, ...]]] = {
    "a scheduler config that is not JSON": ("demo", _SCHED, '{"beta_schedule": ', DIFFUSION_COMMANDS),
    "a pipeline without its scheduler/": ("demo", _SCHED, None, DIFFUSION_COMMANDS),
    "a scheduler config diffusers refuses": (
        "demo",
        _SCHED,
        '{"_class_name": "DDIMScheduler", "beta_schedule": "no_such_schedule", "num_train_timesteps": 1000}',
        DIFFUSION_COMMANDS,
    ),
    "a scheduler class diffusers does not have": (
        "demo",
        _SCHED,
        '{"_class_name": "NoSuchScheduler"}',
        DIFFUSION_COMMANDS,
    ),
    "a UNet config that is not JSON": ("demo", "unet/config.json", '{"x": ', DIFFUSION_COMMANDS),
    "a UNet config that is not a JSON object": ("demo", "unet/config.json", "[1, 2]", DIFFUSION_COMMANDS),
    "a UNet config that does not fit its weights": ("demo", "unet/config.json", "{misfit}", _NOT_TRIAGE),
    "a model_index.json that is not JSON": ("demo", "model_index.json", '{"_class_name": ', _NOT_MIA),
    "a bare UNet without a scheduler": ("bare", _SCHED, None, DIFFUSION_COMMANDS),
    "a text-to-image pipeline whose UNet config is not JSON": (
        "text2image",
        "unet/config.json",
        '{"x": ',
        DIFFUSION_COMMANDS,
    ),
    "a text-to-image pipeline whose scheduler config is not JSON": ("text2image", _SCHED, "{", DIFFUSION_COMMANDS),
}


def build_damaged_models(root: Path, text2image: Path) -> dict[str, tuple[Path, str]]:
    """:data:`DAMAGED_MODELS` on disk: copies of the shipped demo pipeline (a class-conditional
    ``UNet2DModel`` with a ``DDIMScheduler`` on the ``squaredcos_cap_v2`` schedule), of its
    ``unet/`` alone, and of the tiny text-to-image pipeline ``text2image``, each with one file
    damaged or gone: name → (model directory, the damaged file as the error must name it)."""
    import json
    import shutil

    from memscan.demo.run import model_dir

    root.mkdir(parents=True, exist_ok=True)
    bases = {"demo": model_dir(), "bare": model_dir() / "unet", "text2image": text2image}
    cases = {}
    for name, (base, file, text, _) in DAMAGED_MODELS.items():
        d = root / "".join(ch if ch.isalnum() else "_" for ch in name)
        shutil.copytree(bases[base], d)
        if base == "bare":  # with the demo's class captions and null class, as a user would keep them
            shutil.copy(bases["demo"] / "memscan.json", d)
        if text is None:  # the file's folder is gone (or, for a bare UNet, was never there)
            shutil.rmtree(d / Path(file).parent, ignore_errors=True)
        elif text == "{misfit}":  # valid JSON, other channel widths than the weights have
            config = json.loads((d / file).read_text())
            (d / file).write_text(json.dumps({**config, "block_out_channels": [16, 32, 32]}))
        else:
            (d / file).write_text(text)
        cases[name] = (d, f"{d.name}/{file}")
    return cases
