"""TrainingIndex.save: the Parquet files and rows.arrow written from one Arrow table, nothing read
back, no Python object per row of a loaded (Arrow-backed) index; the files are those every save
wrote, and a saved-then-loaded index is the index."""

import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from memscan.index import faiss_index
from memscan.index.columns import StringColumn
from memscan.index.embedders import l2_normalize
from memscan.index.faiss_index import IndexParams, TrainingIndex
from memscan.index.locations import LOCATION_COLUMNS


def _index(n: int, kind: str = "flat", shards: int = 1) -> TrainingIndex:
    """An index of ``n`` random vectors with ids, captions (some empty) and locations (tar members
    and image files), built in memory as ``memscan index`` builds one."""
    x = l2_normalize(np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32))
    ids = [f"img-{i:06d}" for i in range(n)]
    captions = [f"a photo of thing {i % 97}" if i % 5 else "" for i in range(n)]
    tar = np.arange(n) % 4 != 0
    loc = pd.DataFrame(
        {
            "path": [f"/data/shard-{i // 100:05d}.tar" if t else f"/data/img/{i}.png" for i, t in enumerate(tar)],
            "member": [f"{i:06d}.jpg" if t else "" for i, t in enumerate(tar)],
            "offset": np.where(tar, np.arange(n) * 1536 + 512, -1),
            "size": np.where(tar, 1000 + np.arange(n) % 7, -1),
        }
    ).astype({"path": str, "member": str, "offset": "int64", "size": "int64"})  # as locations_table makes it
    return TrainingIndex.from_embeddings(
        x, ids, captions, IndexParams(kind, shards=shards, pq_m=4), {"embedder": "pixel"}, loc
    )


def _load_quietly(path, mmap=True) -> TrainingIndex:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rows.arrow is the Parquet files' own: used, nothing said
        return TrainingIndex.load(path, mmap=mmap)


def _rows(path) -> pa.Table:
    return ipc.open_file(pa.OSFile(str(path / "rows.arrow"))).read_all()


def _assert_same_index(a: TrainingIndex, b: TrainingIndex, queries: np.ndarray, exact: bool = True) -> None:
    """Same rows, embeddings, parameters and search answers (``exact=False``: similarities to
    float rounding — an in-memory flat index and a memory-mapped one sum in other orders)."""
    assert list(a.ids) == list(b.ids) and list(a.captions) == list(b.captions)
    assert a.locations.astype(object).equals(b.locations.astype(object))
    np.testing.assert_array_equal(np.asarray(a.embeddings), np.asarray(b.embeddings))
    assert a.params == b.params
    (sa, ia), (sb, ib) = a.search(queries, 5), b.search(queries, 5)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, rtol=0, atol=0 if exact else 1e-6)


# (IVF kinds loaded memory-mapped: see the test after this one)
@pytest.mark.parametrize(
    ("kind", "shards", "mmap"),
    [("flat", 1, True), ("hnsw", 1, True), ("flat", 3, True), ("flat", 1, False), ("ivf", 1, False),
     ("ivfpq", 2, False)],
)  # fmt: skip
def test_a_loaded_index_saved_elsewhere_is_the_same_index_in_the_same_files(tmp_path, kind, shards, mmap):
    """build → save → load → save to a new folder → load: the same rows, ids, captions,
    locations, embeddings and search answers; the Parquet files byte for byte those of the first
    save; rows.arrow the same table, used by the load (its recorded identity is the new files')."""
    built = _index(400, kind, shards)
    queries = np.asarray(built.embeddings[::37])
    built.save(tmp_path / "a")
    first = _load_quietly(tmp_path / "a", mmap=mmap)
    assert isinstance(first.ids, StringColumn)
    _assert_same_index(built, first, queries, exact=False)
    first.save(tmp_path / "b")
    second = _load_quietly(tmp_path / "b", mmap=mmap)
    _assert_same_index(first, second, queries)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert (tmp_path / "a" / "ids.parquet").read_bytes() == (tmp_path / "b" / "ids.parquet").read_bytes()
    loc_a, loc_b = (
        pq.read_table(tmp_path / "a" / "locations.parquet"),
        pq.read_table(tmp_path / "b" / "locations.parquet"),
    )
    assert loc_a.equals(loc_b)  # the pandas metadata differs: see the row-group test
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert a.equals(b) and a.schema.equals(b.schema)  # values and types (metadata: each folder's identity)
    assert b.column_names == ["id", "caption", *LOCATION_COLUMNS]
    assert [c.num_chunks for c in b.columns] == [1] * b.num_columns  # one record batch
    assert b.schema.field("path").type == pa.dictionary(pa.int32(), pa.string())
    assert b.schema.metadata == {
        f"memscan:{k}".encode(): v.encode() for k, v in faiss_index._parquet_identity(tmp_path / "b").items()
    }
    assert not list((tmp_path / "b").glob(".*tmp*"))  # every file renamed into place


@pytest.mark.parametrize(("kind", "shards"), [("ivf", 1), ("ivfpq", 2), ("hnsw", 1)])
def test_a_memory_mapped_index_saved_elsewhere_or_in_place_loads_and_answers_the_same(tmp_path, kind, shards):
    """faiss.write_index of an IVF index loaded with IO_FLAG_MMAP writes a stub naming a mapping
    (719 bytes, unreadable; a memory-mapped load of it crashed the process): save copies a mapped
    part's file instead, and keeps it as it is when saving into the folder it was loaded from."""
    built = _index(400, kind, shards)
    queries = np.asarray(built.embeddings[::37])
    built.save(tmp_path / "a")
    files = {p.name: p.read_bytes() for p in (tmp_path / "a").glob("index*.faiss")}
    loaded = _load_quietly(tmp_path / "a", mmap=True)
    loaded.save(tmp_path / "b")
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").glob("index*.faiss")} == files
    for mmap in (False, True):
        _assert_same_index(loaded, _load_quietly(tmp_path / "b", mmap=mmap), queries)
    loaded.save(tmp_path / "a", overwrite=True)  # the documented repair: into its own folder
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").glob("index*.faiss")} == files
    _assert_same_index(loaded, _load_quietly(tmp_path / "a", mmap=True), queries)
    assert not list((tmp_path / "a").glob(".*tmp*")) and not list((tmp_path / "b").glob(".*tmp*"))


def test_saving_a_loaded_index_reads_no_parquet_back_and_makes_no_python_row_objects(tmp_path, monkeypatch):
    """The rows of a loaded, memory-mapped index go to the Parquet files and rows.arrow as Arrow:
    no Parquet file is read back, its columns are not iterated as Python strings, and the Python
    memory save allocates does not grow with the rows (it did: ~100 bytes a row of lists)."""
    n = 20_000
    _index(n).save(tmp_path / "a")
    loaded = _load_quietly(tmp_path / "a", mmap=True)

    def refused(*args, **kwargs):
        raise AssertionError("save read a Parquet file back / made Python objects of an Arrow column")

    monkeypatch.setattr(pq, "read_table", refused)
    monkeypatch.setattr(StringColumn, "__iter__", refused)
    monkeypatch.setattr(StringColumn, "tolist", refused)
    tracemalloc.start()
    try:
        loaded.save(tmp_path / "b")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * n, f"save allocated {peak} bytes of Python memory for {n} rows"
    monkeypatch.undo()
    _assert_same_index(loaded, _load_quietly(tmp_path / "b"), np.asarray(loaded.embeddings[:3]))


def test_saving_a_loaded_index_into_its_own_folder_rewrites_a_stale_rows_file(tmp_path):
    """The documented repair: Parquet files edited after the build make rows.arrow stale (a load
    warns and reads Parquet); ``load(INDEX, mmap=True).save(INDEX, overwrite=True)`` writes it
    again, over the file the load may have memory-mapped, and the next load uses it."""
    built = _index(300)
    out = tmp_path / "idx"
    built.save(out)
    _load_quietly(out).save(out, overwrite=True)  # rows.arrow memory-mapped while it is replaced
    again = _load_quietly(out)
    _assert_same_index(built, again, np.asarray(built.embeddings[:4]), exact=False)
    ids = pd.read_parquet(out / "ids.parquet")
    ids.loc[4, "caption"] = "changed"
    ids.to_parquet(out / "ids.parquet")
    with pytest.warns(UserWarning, match="rows.arrow is not used"):
        stale = TrainingIndex.load(out, mmap=True)
    stale.save(out, overwrite=True)
    fixed = _load_quietly(out)
    assert fixed.captions[4] == "changed" and list(fixed.ids) == list(built.ids)
    assert fixed.locations.astype(object).equals(built.locations.astype(object))


def test_parquet_files_are_those_pandas_writes_row_group_by_row_group(tmp_path, monkeypatch):
    """save writes the Parquet files a row group at a time: byte for byte what
    ``pq.write_table`` of the pandas table of Python lists writes (what save always wrote), for an
    index built in memory and for one loaded from disk, across several row groups."""
    monkeypatch.setattr(faiss_index, "PARQUET_ROW_GROUP", 7)
    built = _index(50)
    built.save(tmp_path / "a")
    _load_quietly(tmp_path / "a").save(tmp_path / "b")
    want_ids = pd.DataFrame({"id": list(built.ids), "caption": list(built.captions)})
    want_loc = built.locations.astype({c: object for c in ("path", "member")})
    for name, df in (("ids.parquet", want_ids), ("locations.parquet", want_loc)):
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / name, row_group_size=7)
        assert pq.ParquetFile(tmp_path / "a" / name).metadata.num_row_groups == 8
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert (tmp_path / "a" / "ids.parquet").read_bytes() == (tmp_path / "b" / "ids.parquet").read_bytes()
    # a loaded index's offset and size columns are Arrow-typed in pandas: recorded as such
    loaded = _load_quietly(tmp_path / "a").locations.astype({"path": object, "member": object})
    loc = pa.Table.from_pandas(loaded, preserve_index=False)
    assert pq.read_schema(tmp_path / "b" / "locations.parquet").equals(loc.schema, check_metadata=True)


def test_an_index_without_locations_or_captions_round_trips(tmp_path):
    """No locations: no locations.parquet (an old one is removed) and rows.arrow has ids and
    captions only; missing captions (None) read as ""; ids that are not strings are written as
    pandas makes them and read back as strings, as before."""
    x = l2_normalize(np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32))
    built = TrainingIndex.from_embeddings(x, [f"t{i}" for i in range(30)], [None, *["c"] * 29])
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "locations.parquet").write_bytes(b"an older build's")
    built.save(tmp_path / "idx")
    assert not (tmp_path / "idx" / "locations.parquet").exists()
    assert _rows(tmp_path / "idx").column_names == ["id", "caption"]
    loaded = _load_quietly(tmp_path / "idx")
    assert loaded.locations is None and loaded.captions[:2] == ["", "c"] and loaded.ids[29] == "t29"
    loaded.save(tmp_path / "again")
    assert _load_quietly(tmp_path / "again").captions == [""] + ["c"] * 29
    numbered = TrainingIndex.from_embeddings(x, list(range(30)))
    numbered.save(tmp_path / "numbered")
    assert pq.read_schema(tmp_path / "numbered" / "ids.parquet").field("id").type == pa.int64()
    assert _load_quietly(tmp_path / "numbered").ids[:3] == ["0", "1", "2"]
