"""Prompt lists: a text file (one prompt a line) or a CSV/Parquet table.

- **Text** (``.txt`` or anything not CSV/Parquet): one prompt a line; blank lines are skipped and
  counted; ids are ``line-<number>`` (1-based line numbers, stable when other lines change).
  For class-conditional models a prompt is a class id or a caption the model knows.
- **Table** (``.csv``/``.parquet``): columns ``prompt_id``, ``prompt`` and optionally
  ``train_id`` (the training image the prompt came from) and ``duplicate_count``.

Prompt ids must be unique: they name the prompt's generations, seeds and files.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pandas as pd

from memscan.errors import InputError

#: Columns of the prompts table every stage reads.
PROMPT_COLUMNS = ["prompt_id", "prompt", "train_id", "duplicate_count"]
MAX_PROMPT_CHARS = 10_000


def load_prompts(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read a prompts file; returns the table and a summary (counts of skipped lines)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"prompts file {path} does not exist", "pass a text file (one prompt a line) or a CSV/Parquet")
    info = {"source": str(p), "blank_lines_skipped": 0}
    if p.suffix.lower() in (".csv", ".parquet"):
        try:
            df = (
                pd.read_parquet(p)
                if p.suffix.lower() == ".parquet"
                else pd.read_csv(p, dtype=str, keep_default_na=False)
            )
        except Exception as exc:
            raise InputError(f"cannot read prompts table {path}: {exc}", "check it is a valid CSV/Parquet") from None
        df = validate_prompt_table(df, f"prompts table {path}")
        info["empty_prompts"] = int((df["prompt"].str.strip() == "").sum())
        return df, info
    text = read_utf8(p, "prompts file")
    rows = []
    for n, line in enumerate(text_lines(text), start=1):
        if not line.strip():
            info["blank_lines_skipped"] += 1
            continue
        rows.append({"prompt_id": f"line-{n}", "prompt": line.strip()})
    df = pd.DataFrame(rows, columns=["prompt_id", "prompt"])
    return validate_prompt_table(df, f"prompts file {path}"), info


def validate_prompt_table(df: pd.DataFrame, name: str = "prompts table") -> pd.DataFrame:
    """The checks every prompts table passes — read from a file or handed to
    :func:`memscan.extract` as a DataFrame or list: columns ``prompt_id`` and ``prompt`` present
    and not null, at least one row, unique ids, no prompt over :data:`MAX_PROMPT_CHARS`, and a
    ``duplicate_count`` that is an integer or empty (NA). ``name`` names the input in the errors.
    Returns a new table with columns :data:`PROMPT_COLUMNS` first (ids and prompts as ``str``,
    ``train_id`` ``str`` or None, ``duplicate_count`` ``Int64``).

    Examples
    --------
    >>> validate_prompt_table(pd.DataFrame({"prompt_id": ["a"], "prompt": ["x"], "duplicate_count": ["3"]}))[
    ...     "duplicate_count"
    ... ].tolist()
    [3]
    """
    missing = {"prompt_id", "prompt"} - set(df.columns)
    if missing:
        raise InputError(
            f"{name} lacks column(s) {', '.join(sorted(missing))}",
            "add columns prompt_id and prompt (optional: train_id, duplicate_count)",
        )
    df = df.reset_index(drop=True).copy()
    if df.empty:
        raise InputError(f"{name} holds no prompts", "add at least one prompt")
    for col in ("prompt_id", "prompt"):
        null = df.index[df[col].isna()].tolist()
        if null:
            raise InputError(
                f"{name}: {col} is missing (null) in row {null[0]} ({len(null)} rows in all)",
                "fill it in or drop the row (an empty string is a valid, unconditional prompt)",
            )
    df["prompt_id"] = df["prompt_id"].astype(str)
    df["prompt"] = df["prompt"].astype(str)
    for col in ("train_id", "duplicate_count"):
        if col not in df.columns:
            df[col] = None
    df["train_id"] = pd.Series([_clean_id(v) for v in df["train_id"]], index=df.index, dtype=object)
    df["duplicate_count"] = pd.array(
        [_duplicate_count(v, name, i, pid) for i, (v, pid) in enumerate(zip(df["duplicate_count"], df["prompt_id"]))],
        dtype="Int64",
    )
    dup = df["prompt_id"][df["prompt_id"].duplicated()].unique().tolist()
    if dup:
        raise InputError(f"{name} repeats prompt ids: {', '.join(map(str, dup[:5]))}", "make prompt_id unique")
    too_long = df.index[df["prompt"].str.len() > MAX_PROMPT_CHARS].tolist()
    if too_long:
        raise InputError(
            f"{name}: prompt {df['prompt_id'][too_long[0]]!r} is longer than {MAX_PROMPT_CHARS} characters",
            "shorten it (text encoders read at most a few hundred tokens)",
        )
    extra = [c for c in df.columns if c not in PROMPT_COLUMNS]
    return df[PROMPT_COLUMNS + extra]


def _duplicate_count(v, name: str, row: int, prompt_id: str) -> int | None:
    """One ``duplicate_count`` cell: an integer (``3``, ``"3"``, ``3.0``) or empty (None, NaN,
    ``""``: NA); anything else (``"abc"``, ``"12 copies"``, ``2.5``) is an error naming the row."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    text = str(v).strip()
    if text == "" or text.lower() in ("nan", "<na>", "none"):
        return None
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        raise InputError(
            f"{name}: duplicate_count {v!r} of row {row} (prompt {prompt_id!r}) is not an integer",
            "give a whole number of copies, or leave it empty when unknown",
        )
    return int(number)


def read_utf8(path: Path, what: str) -> str:
    """The text of a user's file (a leading byte-order mark dropped); bytes that are not UTF-8
    are an error naming the offset."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{what} {path} is not UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})",
            "re-encode it as UTF-8",
        ) from None


def text_lines(text: str) -> list[str]:
    """The lines of a user's text file: split at ``\n`` only (``\r\n`` too), so that line
    numbers are the file's own (``str.splitlines`` also splits at U+2028, U+0085, form feeds…,
    which a caption or a JSON string may hold)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _clean_id(v) -> str | None:
    if v is None or (isinstance(v, float) and pd.isna(v)) or v is pd.NA or str(v) == "":
        return None
    return str(v)


def prompts_sha256(ids, texts) -> str:
    """The manifest's ``prompts_sha256``: sha256 over the prompts in order, each as
    ``id \\0 text \\0`` (UTF-8) — as ``memscan triage`` records it. A resumed run must attack the
    same prompts: the same ids with the same texts, in the same order.

    Examples
    --------
    >>> prompts_sha256(["p0"], ["a cat"]) == prompts_sha256(["p0"], ["a dog"])
    False
    """
    h = hashlib.sha256()
    for i, t in zip(ids, texts):
        h.update(str(i).encode() + b"\0" + str(t).encode() + b"\0")
    return h.hexdigest()
