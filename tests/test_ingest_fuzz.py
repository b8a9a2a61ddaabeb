"""Property tests of convmf_core.ingest with hypothesis: every reader, random bytes and corrupted structured rows.

The only allowed outcomes are an :class:`IngestError` whose message names the file, or a result that satisfies the
row accounting (rows read = accepted + quarantined, per file, frames matching the counts and the schemas). For
delimited and MovieLens text, reading the ratings in small batches (the streaming path) must give exactly the same
outcome as reading them whole. Examples are derandomized (reproducible in CI), with a per-example deadline against
hangs; each bug the fuzzing found is kept as an ``@example``.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from convmf_core.ingest import REASON_CODES, IngestConfig, IngestError, IngestResult, ingest
from convmf_core.schemas import ITEMS_SCHEMA, QUARANTINE_SCHEMA, RATINGS_SCHEMA, frame_to_table

FUZZ = settings(max_examples=50, derandomize=True, database=None, deadline=timedelta(seconds=10),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ITEMS_CSV = b"item_id,title,text\n1,Alpha,first film\n2,Beta,second film\n3,Gamma,third film\n"
RATINGS_CSV = b"user_id,item_id,rating,timestamp\n1,1,4,10\n2,2,3,20\n"
U_ITEM = ("1|A (1995)|01-Jan-1995||http://x|" + "|".join("0" * 19) + "\n"
          "2|B (1996)|01-Jan-1996||http://y|" + "|".join("1" + "0" * 18) + "\n").encode("latin-1")
ITEMS_TEXT = b"item_id\ttitle\timdb_id\timdb_description\ttmdb_overview\n1\tA\ttt1\tone\tuno\n2\tB\ttt2\t\ttwo\n"
MOVIES_DAT = b"1::A (1995)::Drama\n2::B: Two (1996)::Animation|Comedy\n"
U_DATA = b"1\t1\t5\t10\n2\t2\t4\t11\n"
RATINGS_DAT = b"1::1::5::978300760\n2::2::3::978302109\n"


@pytest.fixture(scope="module")
def workdir():
    """One directory for the module (hypothesis examples overwrite the same file names)."""
    with tempfile.TemporaryDirectory(prefix="ingest-fuzz-") as d:
        yield Path(d)


def check_outcome(ratings: Path, items: Path, config: IngestConfig = IngestConfig()) -> IngestResult | None:
    """Ingest; assert the outcome is a clear IngestError or a result with exact row accounting."""
    try:
        result = ingest(ratings, items, config)
    except IngestError as exc:
        message = str(exc)
        assert str(ratings) in message or str(items) in message, message
        assert len(message) < 2000
        return None
    for role, frame in (("ratings", result.ratings), ("items", result.items)):
        c = result.counts[role]
        assert c["rows_read"] == c["rows_accepted"] + c["rows_quarantined"]
        assert len(frame) == c["rows_accepted"] > 0
        assert (result.quarantine["source_file"] == c["file"]).sum() == c["rows_quarantined"]
        assert sum(c["reasons"].values()) == c["rows_quarantined"]
    assert set(result.quarantine["reason"]) <= set(REASON_CODES)
    assert (result.quarantine["line"] >= 1).all()
    assert not result.ratings.duplicated(["user_id", "item_id"]).any()
    assert result.ratings["rating"].between(config.rating_min, config.rating_max).all()
    assert not result.items["item_id"].duplicated().any()
    frame_to_table(result.ratings, RATINGS_SCHEMA)
    frame_to_table(result.items, ITEMS_SCHEMA)
    frame_to_table(result.quarantine, QUARANTINE_SCHEMA)
    return result


def check_streaming_same(ratings: Path, items: Path, config: IngestConfig = IngestConfig()) -> None:
    """check_outcome for the whole-file read and for batches of a few bytes: the same outcome both ways."""
    whole = check_outcome(ratings, items, replace(config, stream_min_bytes=1 << 62))
    for block in (3, 16):
        streamed = check_outcome(ratings, items, replace(config, stream_min_bytes=0, stream_block_bytes=block,
                                                         stream_batch_rows=2))
        assert (whole is None) == (streamed is None), (block, whole, streamed)
        if whole is not None and streamed is not None:
            pd.testing.assert_frame_equal(whole.ratings, streamed.ratings)
            pd.testing.assert_frame_equal(whole.quarantine, streamed.quarantine)
            assert whole.counts == streamed.counts
            assert whole.content_hash == streamed.content_hash


# ------------------------------------------------------------------------------------------------- random bytes

BYTES = st.binary(max_size=400) | st.builds(lambda head, tail: head + tail,
                                            st.sampled_from([RATINGS_CSV, b"\xef\xbb\xbf" + RATINGS_CSV, b"PAR1",
                                                             b"{", b"user_id\titem_id\trating\n"]),
                                            st.binary(max_size=200))

RATINGS_NAMES = ["ratings.csv", "r.tsv", "r.jsonl", "r.parquet", "u.data", "ratings.dat", "r.txt"]
ITEMS_FILES = {"items.csv": ITEMS_CSV, "u.item": U_ITEM, "items_text.tsv": ITEMS_TEXT, "movies.dat": MOVIES_DAT}


@FUZZ
@given(data=BYTES, name=st.sampled_from(RATINGS_NAMES))
@example(data=b"user_id,item_id,rating\n1,1,4\n1,1,3\n", name="ratings.csv")
def test_random_bytes_as_ratings(workdir: Path, data: bytes, name: str) -> None:
    ratings = workdir / name
    ratings.write_bytes(data)
    items = workdir / "items.csv"
    items.write_bytes(ITEMS_CSV)
    check_outcome(ratings, items)


@FUZZ
@given(data=BYTES, name=st.sampled_from(sorted(ITEMS_FILES) + ["i.jsonl", "i.parquet"]))
def test_random_bytes_as_items(workdir: Path, data: bytes, name: str) -> None:
    items = workdir / name
    items.write_bytes(data)
    ratings = workdir / ("u.data" if name in ("u.item", "items_text.tsv") else
                         "ratings.dat" if name == "movies.dat" else "ratings.csv")
    ratings.write_bytes({"u.data": U_DATA, "ratings.dat": RATINGS_DAT}.get(ratings.name, RATINGS_CSV))
    check_outcome(ratings, items)


# ------------------------------------------------------------------------------------ structured, then corrupted

FIELD = st.one_of(
    st.sampled_from(["1", "2", "3", "u1", " 2 ", "", "4", "4.5", "0.5", "5", "6", "-1", "nan", "inf", "1e3", "x",
                     "2001-09-09T01:46:40Z", "-5", "99999999999999", "1,2", '"3"', '"a ""b"" c"', '"line\nbreak"',
                     '"', 'ab"c', "\t", "|", "::", ";", "\u00e9", "\ufeff", "\x00", "\r"]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=6),
)
ROW = st.lists(FIELD, min_size=0, max_size=6)


def delimited(header: list[str], rows: list[list[str]], sep: str, newline: str) -> str:
    return newline.join([sep.join(header)] + [sep.join(r) for r in rows]) + newline


@FUZZ
@given(rows=st.lists(ROW, max_size=12), sep=st.sampled_from([",", "\t", ";", "|"]),
       newline=st.sampled_from(["\n", "\r\n", "\r"]), bom=st.booleans(),
       encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]),
       name=st.sampled_from(["ratings.csv", "r.tsv", "r.txt"]))
@example(rows=[["1", "1", "4", "1", "", "x"]], sep=",", newline="\n", bom=False, encoding="utf-8",
         name="ratings.csv")  # a row wider than the header by two fields, the first empty: malformed
@example(rows=[['"u', "1"], ["2", '1"', "3"]], sep=",", newline="\n", bom=False, encoding="utf-8",
         name="ratings.csv")  # a record holding a newline in quotes across batch boundaries
@example(rows=[["1", '6,"never closed']], sep=",", newline="\n", bom=False, encoding="utf-8",
         name="ratings.csv")  # an unmatched quote: an error naming its line, whole or in batches
@example(rows=[["1", "1", "4"], ["1", "1", "5", "3"], ["2", "3", "3"]], sep=",", newline="\r\n", bom=True,
         encoding="utf-8", name="ratings.csv")  # a CRLF cut between "\r" and "\n" by a batch boundary
def test_corrupted_delimited_ratings(workdir: Path, rows: list[list[str]], sep: str, newline: str, bom: bool,
                                     encoding: str, name: str) -> None:
    text = delimited(["user_id", "item_id", "rating", "timestamp"], rows, sep, newline)
    if bom:
        text = "\ufeff" + text.replace("\ufeff", "")
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        data = text.encode("utf-8")
    ratings = workdir / name
    ratings.write_bytes(data)
    items = workdir / "items.csv"
    items.write_bytes(ITEMS_CSV)
    check_streaming_same(ratings, items, IngestConfig(rating_min=0.5))


@FUZZ
@given(rows=st.lists(ROW, max_size=12), layout=st.sampled_from(["u.data", "ratings.dat", "ratings.csv"]),
       newline=st.sampled_from(["\n", "\r\n"]))
@example(rows=[["1", "1", "5", "1"], [], ["1", "1", "4", "2"]], layout="u.data", newline="\n")
def test_corrupted_movielens_ratings(workdir: Path, rows: list[list[str]], layout: str, newline: str) -> None:
    d = workdir / "ml"
    d.mkdir(exist_ok=True)
    if layout == "ratings.csv":  # MovieLens "latest"
        text, items_name, items = (delimited(["userId", "movieId", "rating", "timestamp"], rows, ",", newline),
                                   "movies.csv", b"movieId,title,genres\n1,A,Comedy\n2,B,(no genres listed)\n")
    else:
        sep = "\t" if layout == "u.data" else "::"
        text = newline.join(sep.join(r) for r in rows) + newline
        items_name, items = ("u.item", U_ITEM) if layout == "u.data" else ("movies.dat", MOVIES_DAT)
    (d / layout).write_bytes(text.encode("utf-8"))
    (d / items_name).write_bytes(items)
    check_streaming_same(d / layout, d / items_name, IngestConfig(rating_min=0.5))


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**20) | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["1", "2", " 3", "", "4.5", "x", "\ud800"]) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=2) | st.dictionaries(st.text(max_size=3), children, max_size=2),
    max_leaves=4,
)
JSON_RECORD = st.dictionaries(st.sampled_from(["user_id", "item_id", "rating", "timestamp", "Rating", "other"]),
                              JSON_VALUE, max_size=5)


@FUZZ
@given(records=st.lists(JSON_RECORD | JSON_VALUE, max_size=10), garbage=st.lists(st.text(max_size=8), max_size=2))
@example(records=[{"user_id": "\ud800", "item_id": 1, "rating": 3}], garbage=[])  # a lone surrogate
@example(records=[{"user_id": 1, "item_id": 1e20, "rating": 3}], garbage=[])
def test_corrupted_jsonl_ratings(workdir: Path, records: list, garbage: list[str]) -> None:
    lines = [json.dumps(r) for r in records] + garbage
    ratings = workdir / "r.jsonl"
    ratings.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    items = workdir / "items.csv"
    items.write_bytes(ITEMS_CSV)
    check_outcome(ratings, items)


PARQUET_COLUMN = st.sampled_from(["int", "float", "string", "bool", "timestamp", "date", "dict", "null", "list"])


def parquet_column(kind: str, values: list[float]) -> pa.Array:
    """A column of ``kind`` built from ``values`` (floats, some NaN/inf/huge), with nulls where the value is NaN."""
    finite = [v if math.isfinite(v) else None for v in values]
    if kind == "int":
        return pa.array([None if v is None else int(max(min(v, 2**62), -2**62)) for v in finite], pa.int64())
    if kind == "float":
        return pa.array(values, pa.float64())
    if kind == "string":
        return pa.array([None if v is None else repr(v) for v in finite], pa.string())
    if kind == "bool":
        return pa.array([None if v is None else v > 0 for v in finite], pa.bool_())
    if kind == "timestamp":  # up to +-2**40 s: beyond Python's date-times, within what Parquet stores
        return pa.array([None if v is None else int(max(min(v, 2**40), -2**40)) for v in finite], pa.int64()).cast(
            pa.timestamp("s"))
    if kind == "date":
        return pa.array([None if v is None else int(max(min(v, 2**30), -2**30)) for v in finite], pa.int32()).cast(
            pa.date32())
    if kind == "dict":
        return pa.array([None if v is None else str(int(v) % 4) for v in finite], pa.string()).dictionary_encode()
    if kind == "list":
        return pa.array([[v] for v in values], pa.list_(pa.float64()))
    return pa.nulls(len(values))


@FUZZ
@given(columns=st.dictionaries(st.sampled_from(["user_id", "item_id", "rating", "timestamp", "USER_ID", "x"]),
                               PARQUET_COLUMN, min_size=1, max_size=5),
       values=st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-3, 7).map(float),
                       min_size=0, max_size=8))
@example(columns={"user_id": "int", "item_id": "float", "rating": "float", "timestamp": "timestamp"},
         values=[1.0, 1e20, 2.5, 3.0])  # a huge float id: no unhandled cast error
@example(columns={"user_id": "int", "item_id": "int", "rating": "int", "timestamp": "timestamp"},
         values=[1.0, 2.0, -1e300, 4.0])  # a date-time beyond Python's range, in a quarantined row's raw text
def test_corrupted_parquet_ratings(workdir: Path, columns: dict[str, str], values: list[float]) -> None:
    table = pa.table({name: parquet_column(kind, values) for name, kind in columns.items()})
    ratings = workdir / "r.parquet"
    pq.write_table(table, ratings)
    items = workdir / "items.csv"
    items.write_bytes(ITEMS_CSV)
    whole = check_outcome(ratings, items)
    streamed = check_outcome(ratings, items, IngestConfig(stream_min_bytes=0, stream_batch_rows=3))
    assert (whole is None) == (streamed is None)
    if whole is not None and streamed is not None:
        pd.testing.assert_frame_equal(whole.ratings, streamed.ratings)
        pd.testing.assert_frame_equal(whole.quarantine, streamed.quarantine)
        assert whole.content_hash == streamed.content_hash


@FUZZ
@given(rows=st.lists(ROW, max_size=10), name=st.sampled_from(["items.csv", "u.item", "items_text.tsv",
                                                              "movies.dat"]))
@example(rows=[["1", '"desc, with ""quotes""\nand a newline"'], ["1", "again"]], name="items.csv")
def test_corrupted_items(workdir: Path, rows: list[list[str]], name: str) -> None:
    d = workdir / "items"
    d.mkdir(exist_ok=True)
    if name == "items.csv":
        text = delimited(["item_id", "text"], rows, ",", "\n")
        ratings_name, ratings = "ratings.csv", RATINGS_CSV
    elif name == "items_text.tsv":
        text = delimited(["item_id", "title", "imdb_id", "imdb_description", "tmdb_overview"], rows, "\t", "\n")
        ratings_name, ratings = "u.data", U_DATA
    else:
        sep = "|" if name == "u.item" else "::"
        text = "\n".join(sep.join(r) for r in rows) + "\n"
        ratings_name, ratings = ("u.data", U_DATA) if name == "u.item" else ("ratings.dat", RATINGS_DAT)
    (d / name).write_bytes(text.encode("latin-1", errors="replace") if name == "u.item" else text.encode())
    (d / ratings_name).write_bytes(ratings)
    check_outcome(d / ratings_name, d / name)


def test_outcome_checker_on_a_known_file(workdir: Path) -> None:
    """The property checker passes a good file through and returns what it read."""
    ratings, items = workdir / "ratings.csv", workdir / "items.csv"
    ratings.write_bytes(RATINGS_CSV + b"1,2,x,3\n")
    items.write_bytes(ITEMS_CSV)
    result = check_outcome(ratings, items)
    assert result is not None and result.counts["ratings"]["rows_quarantined"] == 1
    assert np.array_equal(result.quarantine["line"].to_numpy(), [4])
    ratings.write_bytes(b"")
    assert check_outcome(ratings, items) is None  # an empty file: an IngestError naming it
