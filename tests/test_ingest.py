"""Tests of convmf_core.ingest: formats, bad-row quarantine, row accounting, errors, hashing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import convmf_core.ingest as ingest_module
from convmf_core.ingest import (
    BAD_TIMESTAMP,
    DUPLICATE_ITEM,
    DUPLICATE_SUPERSEDED,
    EMPTY_ID,
    MALFORMED_ROW,
    MISSING_FIELD,
    NON_NUMERIC_RATING,
    RATING_OUT_OF_SCALE,
    REASON_CODES,
    UNKNOWN_ITEM,
    IngestConfig,
    IngestError,
    IngestResult,
    ingest,
    write_parquet_atomic,
)
from convmf_core.schemas import ITEMS_SCHEMA, QUARANTINE_SCHEMA, RATINGS_SCHEMA, frame_to_table

ML100K = Path("/work/shared/data/ml-100k")

ITEMS_CSV = "item_id,title,text\n1,Alpha,first film\n2,Beta,second film\n3,Gamma,third film\n"


def write(path: Path, content: str | bytes, encoding: str = "utf-8") -> Path:
    """Write exact bytes (no newline translation)."""
    path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
    return path


def check_accounting(result: IngestResult) -> None:
    """rows read = accepted + quarantined per file, and the frames agree with the counts."""
    for role, frame in (("ratings", result.ratings), ("items", result.items)):
        c = result.counts[role]
        assert c["rows_read"] == c["rows_accepted"] + c["rows_quarantined"]
        assert len(frame) == c["rows_accepted"]
        assert (result.quarantine["source_file"] == c["file"]).sum() == c["rows_quarantined"]
        assert sum(c["reasons"].values()) == c["rows_quarantined"]
    assert set(result.quarantine["reason"]) <= set(REASON_CODES)
    assert pa.Table.from_pandas(result.ratings, preserve_index=False).schema.names == RATINGS_SCHEMA.names
    frame_to_table(result.ratings, RATINGS_SCHEMA)
    frame_to_table(result.items, ITEMS_SCHEMA)
    frame_to_table(result.quarantine, QUARANTINE_SCHEMA)


def run(tmp_path: Path, ratings: str | bytes, items: str | bytes = ITEMS_CSV, *, rname: str = "ratings.csv",
        iname: str = "items.csv", config: IngestConfig = IngestConfig()) -> IngestResult:
    """Ingest two small files written into tmp_path."""
    result = ingest(write(tmp_path / rname, ratings), write(tmp_path / iname, items), config)
    check_accounting(result)
    return result


def only_quarantined(result: IngestResult, role: str = "ratings") -> pd.DataFrame:
    q = result.quarantine
    return q[q["source_file"] == result.counts[role]["file"]].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------------ formats


def test_csv_basic_types_and_order(tmp_path: Path) -> None:
    r = run(tmp_path, "user_id,item_id,rating,timestamp\nu2,2,4,100\nu1,1,3.5,\n10,3,5,300\n")
    assert r.ratings.dtypes.astype(str).tolist() == ["str", "str", "float32", "Int64"]
    assert r.ratings["user_id"].tolist() == ["10", "u1", "u2"]  # canonical order: sorted by (user, item)
    assert r.ratings["rating"].tolist() == [5.0, 3.5, 4.0]
    assert r.ratings["timestamp"].isna().tolist() == [False, True, False]
    assert r.items["text"].tolist() == ["first film", "second film", "third film"]
    assert r.counts["ratings"]["format"] == "csv"
    assert r.counts["ratings"]["rows_read"] == 3 and len(r.quarantine) == 0
    assert len(r.content_hash) == 64


def test_tsv(tmp_path: Path) -> None:
    items = "item_id\ttitle\tdescription\n1\tAlpha\tfirst, with comma\n"
    r = run(tmp_path, "user_id\titem_id\trating\n7\t1\t2\n", items, rname="r.tsv", iname="i.tsv")
    assert r.counts["ratings"]["format"] == "tsv"
    assert r.items["text"].tolist() == ["first, with comma"]
    assert r.ratings["user_id"].tolist() == ["7"]


def test_tsv_handed_in_as_csv_is_sniffed(tmp_path: Path) -> None:
    ratings = "user_id\titem_id\trating\ttimestamp\n1\t1\t4\t10\n2\t2\t3\t20\n"
    items = "item_id\ttitle\ttext\n1\tA, the\tsome, text\n2\tB\tmore\n"
    r = run(tmp_path, ratings, items, config=IngestConfig(format="csv"))
    assert r.ratings["rating"].tolist() == [4.0, 3.0]
    assert r.items["title"].tolist() == ["A, the", "B"]
    assert r.items["text"].tolist() == ["some, text", "more"]


def test_jsonl(tmp_path: Path) -> None:
    ratings = "\n".join([
        json.dumps({"user_id": 1, "item_id": 1, "rating": 4, "timestamp": 5}),
        json.dumps({"user_id": "u9", "item_id": 2.0, "rating": "3.5", "timestamp": None}),
        "{not json",
        json.dumps([1, 2, 3]),
        json.dumps({"user_id": 2, "item_id": 3, "rating": 2}),
        "",
        '{"user_id": 3, "item_id": 1, "rating": 1}, {"user_id": 4, "item_id": 1, "rating": 1}',
        '{"user_id": NaN, "item_id": 1, "rating": 1}',
    ]) + "\n"
    items = "".join(json.dumps(d) + "\n" for d in (
        {"item_id": 1, "text": "one"}, {"item_id": 2, "text": "two", "title": "Two"}, {"item_id": 3, "text": None}))
    r = run(tmp_path, ratings, items, rname="r.jsonl", iname="i.jsonl")
    assert sorted(zip(r.ratings["user_id"], r.ratings["item_id"])) == [("1", "1"), ("2", "3"), ("u9", "2")]
    assert r.items["text"].tolist() == ["one", "two", ""]
    assert r.counts["items"]["empty_text"] == 1
    q = only_quarantined(r)
    assert q["reason"].tolist() == [MALFORMED_ROW, MALFORMED_ROW, MALFORMED_ROW, EMPTY_ID]
    assert q["line"].tolist() == [3, 4, 7, 8]  # line 6 is blank
    assert q["raw"].tolist()[:2] == ["{not json", "[1, 2, 3]"]
    assert r.counts["ratings"]["blank_lines"] == 1


def test_parquet(tmp_path: Path) -> None:
    ratings = pa.table({
        "user_id": pa.array([1, 2, 3, 4], pa.int64()),
        "item_id": pa.array([1.0, 2.0, 2.0, float("nan")]),
        "rating": pa.array([4.0, float("nan"), 2.5, 3.0], pa.float32()),
        "timestamp": pa.array([1_000_000_000, None, 5, 6], pa.timestamp("s")),
    })
    items = pa.table({"item_id": ["1", "2"], "text": ["one", "two"], "title": [None, "Two"]})
    pq.write_table(ratings, tmp_path / "r.parquet")
    pq.write_table(items, tmp_path / "i.parquet")
    r = ingest(tmp_path / "r.parquet", tmp_path / "i.parquet")
    check_accounting(r)
    assert r.ratings["item_id"].tolist() == ["1", "2"]  # integral float ids lose their ".0"
    assert r.ratings["timestamp"].tolist() == [1_000_000_000, 5]
    assert r.items["title"].isna().tolist() == [True, False]
    q = only_quarantined(r)
    assert q["reason"].tolist() == [NON_NUMERIC_RATING, EMPTY_ID] and q["line"].tolist() == [2, 4]
    assert json.loads(q["raw"][0])["user_id"] == 2


def test_movielens_100k_latin1_u_item(tmp_path: Path) -> None:
    d = tmp_path / "ml"
    d.mkdir()
    write(d / "u.data", "1\t1\t5\t874965758\n1\t2\t3\t876893171\n2\t2\t4\t888550871\n")
    genres = ["0"] * 19
    genres[3], genres[5] = "1", "1"
    u_item = (f"1|Misérables, Les (1995)|01-Jan-1995||http://x|{'|'.join(genres)}\n"
              f"2|GoldenEye (1995)|01-Jan-1995||http://y|{'|'.join(['0'] * 18 + ['1'])}\n")
    write(d / "u.item", u_item, encoding="latin-1")
    r = ingest(d / "u.data", d / "u.item")
    check_accounting(r)
    assert r.counts["ratings"]["format"] == "movielens-100k"
    assert r.counts["items"]["encoding"] == "latin-1"
    assert r.items["title"].tolist() == ["Misérables, Les (1995)", "GoldenEye (1995)"]
    assert r.items["text"].tolist() == ["Misérables, Les (1995) Animation Comedy", "GoldenEye (1995) Western"]
    assert r.ratings["timestamp"].tolist() == [874965758, 876893171, 888550871]


def test_movielens_100k_items_text(tmp_path: Path) -> None:
    write(tmp_path / "u.data", "1\t1\t5\t10\n1\t2\t3\t11\n1\t3\t3\t12\n")
    items_text = ("item_id\ttitle\timdb_id\timdb_description\ttmdb_overview\n"
                  '1\tToy Story (1995)\ttt1\t"Rambo" parody, sort of.\tWoody and Buzz.\n'
                  "2\tNo Text (1990)\ttt2\t\t\n"
                  "3\tOnly TMDB (1991)\ttt3\t\tOverview only.\n")
    write(tmp_path / "items_text.tsv", items_text)
    r = ingest(tmp_path / "u.data", tmp_path / "items_text.tsv")
    check_accounting(r)
    assert r.items["text"].tolist() == ['"Rambo" parody, sort of. Woody and Buzz.', "", "Overview only."]
    assert r.counts["items"]["empty_text"] == 1
    assert len(r.ratings) == 3


def test_movielens_1m(tmp_path: Path) -> None:
    write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978300000\n")
    write(tmp_path / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                                   "661::James and the Giant Peach: Crème (1996)::Animation|Children's|Musical\n",
          encoding="latin-1")
    r = ingest(tmp_path / "ratings.dat", tmp_path / "movies.dat")
    check_accounting(r)
    assert r.counts["ratings"]["format"] == "movielens-1m"
    assert r.items.set_index("item_id").loc["661", "text"] == (
        "James and the Giant Peach: Crème (1996) Animation Children's Musical")
    assert r.ratings["item_id"].tolist() == ["1193", "661", "1193"]


def test_movielens_latest(tmp_path: Path) -> None:
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,0.5,964981247\n")
    write(tmp_path / "movies.csv", 'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama|Romance\n'
                                   "3,Unknown Film (2020),(no genres listed)\n")
    r = ingest(tmp_path / "ratings.csv", tmp_path / "movies.csv", IngestConfig(rating_min=0.5))
    check_accounting(r)
    assert r.counts["ratings"]["format"] == "movielens-latest"
    assert r.items["text"].tolist() == ["American President, The (1995) Comedy Drama Romance", "Unknown Film (2020)"]
    assert r.ratings["rating"].tolist() == [4.0, 0.5]


# ------------------------------------------------------------------------------------------------ bad-row kinds

HEADER = "user_id,item_id,rating,timestamp\n"


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        ("1,2,,40", MISSING_FIELD),
        ("1,2", MISSING_FIELD),  # a short row: absent fields are empty
        ("1,2,abc,40", NON_NUMERIC_RATING),
        ("1,2,nan,40", NON_NUMERIC_RATING),
        ("1,2,6,40", RATING_OUT_OF_SCALE),
        ("1,2,0,40", RATING_OUT_OF_SCALE),
        ("1,2,inf,40", RATING_OUT_OF_SCALE),
        ("1,2,-inf,40", RATING_OUT_OF_SCALE),
        ("1,2,4,yesterday", BAD_TIMESTAMP),
        ("1,2,4,-5", BAD_TIMESTAMP),
        ("1,99,4,40", UNKNOWN_ITEM),
        (",2,4,40", EMPTY_ID),
        ("1,  ,4,40", EMPTY_ID),
        ("1,2,4,40,extra", MALFORMED_ROW),
    ],
)
@pytest.mark.parametrize("streamed", [False, True])
def test_bad_rating_row_is_quarantined(tmp_path: Path, bad_row: str, reason: str, streamed: bool) -> None:
    config = IngestConfig(stream_min_bytes=0, stream_block_bytes=4) if streamed else IngestConfig()
    r = run(tmp_path, HEADER + "1,1,4,10\n" + bad_row + "\n3,3,2,30\n", config=config)
    q = only_quarantined(r)
    assert q["reason"].tolist() == [reason]
    assert q["line"].tolist() == [3]
    assert q["raw"].tolist() == [bad_row]
    assert q["source_file"].tolist() == [str(tmp_path / "ratings.csv")]
    assert r.counts["ratings"]["rows_read"] == 3 and r.counts["ratings"]["rows_accepted"] == 2
    assert r.counts["ratings"]["reasons"][reason] == 1 and r.counts["reasons"][reason] == 1


def test_malformed_row_with_many_extra_fields(tmp_path: Path) -> None:
    r = run(tmp_path, HEADER + "1,1,4,10\n1,2,4,40,x,y,z\n3,3,2,30,\n")
    q = only_quarantined(r)
    assert q["reason"].tolist() == [MALFORMED_ROW] and q["line"].tolist() == [3]
    assert len(r.ratings) == 2  # a trailing empty field is tolerated


def test_duplicates_keep_newest_then_last(tmp_path: Path) -> None:
    ratings = HEADER + "\n".join([
        "1,1,5,300",  # newest of (1,1): kept
        "1,1,2,100",
        "1,1,3,",  # no timestamp: oldest
        "2,2,1,",
        "2,2,4,",  # same (missing) timestamp: the last in the file is kept
        "3,3,2,50",
        "3,3,3,50",
    ]) + "\n"
    r = run(tmp_path, ratings)
    kept = {(u, i): x for u, i, x in zip(r.ratings["user_id"], r.ratings["item_id"], r.ratings["rating"])}
    assert kept == {("1", "1"): 5.0, ("2", "2"): 4.0, ("3", "3"): 3.0}
    q = only_quarantined(r)
    assert q["reason"].eq(DUPLICATE_SUPERSEDED).all()
    assert q["line"].tolist() == [3, 4, 5, 7]


def test_duplicate_and_empty_items(tmp_path: Path) -> None:
    items = 'item_id,title,text\n1,A,old text\n2,B,\n1,A2,new text\n ,C,no id\n3,D,"   "\n'
    r = run(tmp_path, HEADER + "1,1,4,1\n1,2,4,1\n", items)
    assert r.items["item_id"].tolist() == ["1", "2", "3"]
    assert r.items["text"].tolist() == ["new text", "", ""]  # the last row of a repeated id wins
    assert r.counts["items"]["empty_text"] == 2
    q = only_quarantined(r, "items")
    assert list(zip(q["reason"], q["line"])) == [(DUPLICATE_ITEM, 2), (EMPTY_ID, 5)]


def test_all_rows_bad_raises(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"ratings\.csv.*no valid rows.*rating_out_of_scale=2"):
        run(tmp_path, HEADER + "1,1,9,1\n1,2,0,1\n")


# ------------------------------------------------------------------------------------------- encodings and quoting


def test_bom_and_crlf(tmp_path: Path) -> None:
    ratings = "\ufeff" + (HEADER + "1,1,4,1\r\n1,2,x,1\r\n1,3,3,1\r\n").replace("\n", "\r\n").replace("\r\r", "\r")
    items = ("\ufeff" + ITEMS_CSV).replace("\n", "\r\n")
    r = run(tmp_path, ratings, items)
    assert r.ratings.columns.tolist() == ["user_id", "item_id", "rating", "timestamp"]
    assert r.counts["ratings"]["encoding"] == "utf-8"
    assert r.items["text"].tolist() == ["first film", "second film", "third film"]  # no stray "\r"
    q = only_quarantined(r)
    assert q["line"].tolist() == [3] and q["raw"].tolist() == ["1,2,x,1"]


def test_quoted_description_with_comma_quote_newline(tmp_path: Path) -> None:
    items = ('item_id,title,text\n'
             '1,"Title, with comma","He said ""hi"", then\nleft, twice\r\nthe end"\n'
             '2,B,plain\n'
             '2,B,dup\n')
    r = run(tmp_path, HEADER + "1,1,4,1\n1,2,4,1\n", items)
    assert r.items["text"].tolist() == ['He said "hi", then\nleft, twice\nthe end', "dup"]
    assert r.items["title"].tolist() == ["Title, with comma", "B"]
    q = only_quarantined(r, "items")
    assert q["line"].tolist() == [5]  # the quoted record spans lines 2-4
    assert q["reason"].tolist() == [DUPLICATE_ITEM]


def test_line_numbers_after_multiline_record_in_ratings(tmp_path: Path) -> None:
    ratings = 'user_id,item_id,rating,timestamp\n"u\n1",1,4,1\n\n1,1,x,1\n'
    r = run(tmp_path, ratings)
    q = only_quarantined(r)
    assert q["line"].tolist() == [5]  # line 4 is blank (skipped, not a row)
    assert r.counts["ratings"]["blank_lines"] == 1 and r.counts["ratings"]["rows_read"] == 2


def test_iso_timestamps_and_custom_columns(tmp_path: Path) -> None:
    ratings = "User,Movie,Stars,When\nu1,1,4,2001-09-09T01:46:40Z\n"
    items = "movie;plot\n1;text one\n"
    config = IngestConfig(user_col="user", item_col=("movie", "item_id"), rating_col="stars", timestamp_col="when",
                          text_col="plot")
    r = run(tmp_path, ratings, items, config=config)
    assert r.ratings["timestamp"].tolist() == [1_000_000_000]
    assert r.items["title"].isna().all()


def test_encodings(tmp_path: Path) -> None:
    items_latin1 = "item_id,title,text\n1,Amélie,café crème\n".encode("latin-1")
    r = run(tmp_path, HEADER + "1,1,4,1\n", items_latin1)  # auto: not UTF-8, so Latin-1
    assert r.items["text"].tolist() == ["café crème"] and r.counts["items"]["encoding"] == "latin-1"
    r = run(tmp_path, (HEADER + "1,1,4,1\n").encode("utf-16"), ITEMS_CSV)  # UTF-16 with its BOM
    assert r.counts["ratings"]["encoding"] == "utf-16" and len(r.ratings) == 1
    r = run(tmp_path, HEADER + "1,1,4,1\n", items_latin1, config=IngestConfig(encoding="cp1252"))
    assert r.items["title"].tolist() == ["Amélie"]
    with pytest.raises(IngestError, match=r"items\.csv.*cannot be decoded"):
        run(tmp_path, HEADER + "1,1,4,1\n", items_latin1, config=IngestConfig(encoding="utf-8"))


def test_half_star_scale(tmp_path: Path) -> None:
    ratings = HEADER + "1,1,0.5,1\n1,2,4.5,1\n1,3,0.25,1\n"
    with pytest.raises(IngestError, match="rating_out_of_scale=1"):  # 0.5 is off the default 1-5 scale
        run(tmp_path, HEADER + "1,1,0.5,1\n")
    r = run(tmp_path, ratings, config=IngestConfig(rating_min=0.5, rating_max=5.0))
    assert sorted(r.ratings["rating"].tolist()) == [0.5, 4.5]
    assert only_quarantined(r)["reason"].tolist() == [RATING_OUT_OF_SCALE]


def test_long_description_is_truncated(tmp_path: Path) -> None:
    items = "item_id,text\n1," + "x" * 100_000 + "\n2,short\n"
    r = run(tmp_path, HEADER + "1,1,4,1\n", items, config=IngestConfig(max_text_chars=20_000))
    assert r.items["text"].str.len().tolist() == [20_000, 5]
    assert r.counts["items"]["text_truncated"] == 1 and len(r.quarantine) == 0


# -------------------------------------------------------------------------------------------------------- errors


def test_missing_column_error_names_column_and_file(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"ratings\.csv.*'rating'") as exc:
        run(tmp_path, "user_id,item_id,score\n1,1,4\n")
    assert "user_id" not in str(exc.value).split("found")[0]
    with pytest.raises(IngestError, match=r"items\.csv.*\('text' or 'description'\)"):
        run(tmp_path, HEADER + "1,1,4,1\n", "item_id,title\n1,A\n")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"  \n\n", "empty"),
        (b"user_id,item_id,rating,timestamp\n", "no data rows"),
        (b"user_id,item_id,rating,timestamp\r\n\r\n", "no data rows"),
        (bytes(range(256)) * 8, "binary"),
        (b"\x89PNG\r\n\x1a\n" + bytes(np.random.default_rng(0).integers(1, 256, 2000, dtype=np.uint8)), "binary"),
        (b"\x1f\x8b\x08\x00garbage", "binary"),
    ],
)
def test_unusable_ratings_file_raises_naming_file(tmp_path: Path, content: bytes, message: str) -> None:
    with pytest.raises(IngestError, match=message) as exc:
        run(tmp_path, content)
    assert str(tmp_path / "ratings.csv") in str(exc.value)


def test_unusable_items_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"items\.csv.*empty"):
        run(tmp_path, HEADER + "1,1,4,1\n", b"")
    with pytest.raises(IngestError, match=r"r\.xlsx.*unknown format"):
        run(tmp_path, HEADER, rname="r.xlsx")
    with pytest.raises(IngestError, match=r"nope\.csv.*cannot be read"):
        ingest(tmp_path / "nope.csv", write(tmp_path / "items.csv", ITEMS_CSV))
    with pytest.raises(IngestError, match=r"r\.parquet.*Parquet"):
        run(tmp_path, HEADER + "1,1,4,1\n", rname="r.parquet")


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        IngestConfig(rating_min=5, rating_max=1)
    with pytest.raises(ValueError):
        IngestConfig(format="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        IngestConfig(max_text_chars=0)
    assert issubclass(IngestError, ValueError)


# ---------------------------------------------------------------------------------------------- hash and output


def test_content_hash_is_order_independent_and_data_sensitive(tmp_path: Path) -> None:
    rows = ["1,1,4,10", "2,2,3,20", "1,3,5,30", "3,1,1,"]
    (tmp_path / "a").mkdir()
    a = run(tmp_path / "a", HEADER + "\n".join(rows) + "\n")
    shuffled_items = "item_id,title,text\n3,Gamma,third film\n1,Alpha,first film\n2,Beta,second film\n"
    (tmp_path / "b").mkdir()
    b = run(tmp_path / "b", HEADER + "\n".join(reversed(rows)) + "\n", shuffled_items)
    assert a.content_hash == b.content_hash
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    pd.testing.assert_frame_equal(a.items, b.items)
    (tmp_path / "c").mkdir()
    c = run(tmp_path / "c", HEADER + "\n".join(["1,1,4.5,10"] + rows[1:]) + "\n")
    assert c.content_hash != a.content_hash
    (tmp_path / "d").mkdir()
    d = run(tmp_path / "d", HEADER + "\n".join(rows) + "\n", ITEMS_CSV.replace("third film", "third  film"))
    assert d.content_hash != a.content_hash


def test_write_parquet_atomic(tmp_path: Path) -> None:
    r = run(tmp_path, HEADER + "1,1,4,10\n1,2,3,\n1,2,x,\n")
    out = write_parquet_atomic(r.ratings, tmp_path / "out" / "ratings.parquet", RATINGS_SCHEMA)
    assert out == tmp_path / "out" / "ratings.parquet"
    table = pq.read_table(out)
    assert table.schema.equals(RATINGS_SCHEMA)
    assert table.column("timestamp").to_pylist() == [10, None]
    write_parquet_atomic(r.quarantine, tmp_path / "out" / "q.parquet", QUARANTINE_SCHEMA)
    assert pq.read_table(tmp_path / "out" / "q.parquet").column("reason").to_pylist() == [NON_NUMERIC_RATING]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["q.parquet", "ratings.parquet"]
    with pytest.raises(ValueError):
        write_parquet_atomic(r.ratings.drop(columns="rating"), tmp_path / "out" / "bad.parquet", RATINGS_SCHEMA)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["q.parquet", "ratings.parquet"]


# ----------------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (ML100K / "u.data").exists() or not (ML100K / "items_text.tsv").exists(),
                    reason="ML-100K not present")
def test_real_movielens_100k() -> None:
    r = ingest(ML100K / "u.data", ML100K / "items_text.tsv")
    check_accounting(r)
    c = r.counts["ratings"]
    assert c["rows_read"] == 100_000 == c["rows_accepted"] + c["rows_quarantined"]
    assert r.counts["items"]["rows_read"] == 1682
    assert r.counts["items"]["empty_text"] == 91
    assert (r.items["text"] == "").sum() == 91
    assert r.ratings["rating"].between(1, 5).all()


# ------------------------------------------------------------------------------------ files as people have them


def test_header_only_and_empty_items_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"items\.csv: has no data rows"):
        run(tmp_path, HEADER + "1,1,4,1\n", "item_id,title,text\r\n")
    with pytest.raises(IngestError, match=r"items\.csv: is empty"):
        run(tmp_path, HEADER + "1,1,4,1\n", "\ufeff\r\n")
    with pytest.raises(IngestError, match=r"items\.csv: no valid rows.*empty_id=1"):
        run(tmp_path, HEADER + "1,1,4,1\n", "item_id,text\n ,orphan text\n")


def test_unknown_columns_are_named_and_extra_columns_are_ignored(tmp_path: Path) -> None:
    with pytest.raises(IngestError) as exc:
        run(tmp_path, "uid,iid,stars\n1,1,4\n")
    message = str(exc.value)
    assert str(tmp_path / "ratings.csv") in message
    assert "'user_id'" in message and "'item_id'" in message and "'rating'" in message  # the missing ones
    assert "['uid', 'iid', 'stars']" in message  # and what the file has instead
    r = run(tmp_path, "user_id,genre,item_id,rating,comment\n1,drama,1,4,nice\n")  # unknown extra columns: ignored
    assert r.ratings[["user_id", "item_id"]].values.tolist() == [["1", "1"]]


def test_tsv_declared_for_a_csv_name_and_never_one_column(tmp_path: Path) -> None:
    ratings = "user_id\titem_id\trating\n1\t1\t4\n2\t2\t3\n"
    items = "item_id\ttitle\ttext\n1\tA, the\tsome, text\n2\tB\tmore\n"
    r = run(tmp_path, ratings, items, config=IngestConfig(format="tsv"))
    assert r.ratings["rating"].tolist() == [4.0, 3.0] and r.items["title"].tolist() == ["A, the", "B"]
    # Declared as TSV but comma-separated: the header is one column, which is an error naming what is missing.
    with pytest.raises(IngestError, match=r"ratings\.csv: missing required column\(s\) 'user_id', 'item_id', "
                                          r"'rating'; found columns \['user_id,item_id,rating'\]"):
        run(tmp_path, "user_id,item_id,rating\n1,1,4\n", items, config=IngestConfig(format="tsv"))
    # Separated by spaces (no supported delimiter): never read as one column holding everything.
    with pytest.raises(IngestError, match=r"ratings\.csv: missing required column"):
        run(tmp_path, "user_id item_id rating\n1 1 4\n")


def test_undecodable_byte_names_file_and_line(tmp_path: Path) -> None:
    data = (HEADER + "1,1,4,1\n1,2,4,1\n").encode() + b"1,3,\xff,1\n"
    for config in (IngestConfig(encoding="utf-8"), IngestConfig(encoding="utf-8", stream_min_bytes=0,
                                                                stream_block_bytes=8)):
        with pytest.raises(IngestError, match=r"ratings\.csv: cannot be decoded as utf-8 (near line|at line) 4"):
            run(tmp_path, data, config=config)
    r = run(tmp_path, data)  # auto: Latin-1, and the byte is a character of a non-numeric rating
    assert r.counts["ratings"]["encoding"] == "latin-1"
    assert only_quarantined(r)[["line", "reason"]].values.tolist() == [[4, NON_NUMERIC_RATING]]


@pytest.mark.parametrize("streamed", [False, True])
def test_unmatched_quote_names_file_and_line(tmp_path: Path, streamed: bool) -> None:
    ratings = HEADER + '"multi\nline",1,4,1\n2,1,4,1\n3,"never closed,4,1\n4,1,4,1\n'
    config = IngestConfig(stream_min_bytes=0, stream_block_bytes=5) if streamed else IngestConfig()
    with pytest.raises(IngestError, match=r"ratings\.csv: line 5: a quoted field opened in this record is never "
                                          r"closed"):
        run(tmp_path, ratings, config=config)


def test_row_wider_than_header_is_malformed_whatever_its_extra_fields(tmp_path: Path) -> None:
    r = run(tmp_path, HEADER + "1,1,4,10,,x\n1,2,4,10,\n1,3,4,10" + "," * 30 + "y\n2,2,4,1\n")
    q = only_quarantined(r)
    assert q[["line", "reason"]].values.tolist() == [[2, MALFORMED_ROW], [4, MALFORMED_ROW]]
    assert r.counts["ratings"]["rows_read"] == 4 and len(r.ratings) == 2  # a trailing empty field is tolerated


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [("1,A,a,extra", MALFORMED_ROW), (",A,no id", EMPTY_ID), ("  ,A,blank id", EMPTY_ID),
     ("2,B2,again", DUPLICATE_ITEM)],
)
def test_bad_item_row_is_quarantined_and_counted(tmp_path: Path, bad_row: str, reason: str) -> None:
    items = "item_id,title,text\n2,B,first\n" + bad_row + "\n3,C,third\n2,B,last\n"
    r = run(tmp_path, HEADER + "1,2,4,1\n1,3,4,1\n", items)
    q = only_quarantined(r, "items")
    assert list(zip(q["reason"], q["line"])) == [(DUPLICATE_ITEM, 2), (reason, 3)]  # line 2: superseded by line 5
    c = r.counts["items"]
    assert c["rows_read"] == 4 == c["rows_accepted"] + c["rows_quarantined"]
    assert c["reasons"][reason] == (2 if reason == DUPLICATE_ITEM else 1)


def test_parquet_float_ids_are_converted_value_by_value(tmp_path: Path) -> None:
    ratings = pa.table({"user_id": [1.0, 2.0, 3.0, 4.0], "item_id": [1.0, 2.5, 1e20, float("inf")],
                        "rating": [4.0, 4.0, 4.0, 4.0]})
    pq.write_table(ratings, tmp_path / "r.parquet")
    write(tmp_path / "items.csv", "item_id,text\n1,one\n2.5,two and a half\n")
    whole = ingest(tmp_path / "r.parquet", tmp_path / "items.csv")
    check_accounting(whole)
    assert whole.ratings["item_id"].tolist() == ["1", "2.5"]  # 1.0 -> "1" whatever the other values are
    q = only_quarantined(whole)
    assert q[["line", "reason"]].values.tolist() == [[3, UNKNOWN_ITEM], [4, EMPTY_ID]]  # inf is no id
    streamed = ingest(tmp_path / "r.parquet", tmp_path / "items.csv", IngestConfig(stream_min_bytes=0,
                                                                                   stream_batch_rows=1))
    pd.testing.assert_frame_equal(whole.ratings, streamed.ratings)
    pd.testing.assert_frame_equal(whole.quarantine, streamed.quarantine)


BIG_ITEMS_SCRIPT = r"""
import json, resource, sys
from pathlib import Path
from convmf_core.ingest import ingest
d = Path(sys.argv[1])
big = ("word, \"quoted\" and\nnewline " * 400_000)[:10 * 2**20].replace('"', '""')
with open(d / "items.csv", "w") as fh:  # two 10 MB descriptions; the second is superseded by a later row
    fh.write('item_id,title,text\n1,Big,"' + big + '"\n3,Big again,"' + big + '"\n2,Small,short\n3,C,new\n')
(d / "ratings.csv").write_text("user_id,item_id,rating\n1,1,4\n1,2,3\n1,3,5\n")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = ingest(d / "ratings.csv", d / "items.csv")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
q = r.quarantine
second = 3 + big.count(chr(10))  # the line on which the second big record starts
print(json.dumps({"second": second, "delta_mb": (peak - base) / 1024, "lengths": r.items["text"].str.len().tolist(),
                  "truncated": r.counts["items"]["text_truncated"], "q": q[["line", "reason"]].values.tolist(),
                  "raw_len": q["raw"].str.len().tolist(), "mb": (d / "items.csv").stat().st_size / 2**20}))
"""


def test_ten_megabyte_description_is_truncated_in_bounded_memory(tmp_path: Path) -> None:
    """Measured in a fresh interpreter: the growth of its peak RSS while ingesting two 10 MB descriptions."""
    out = subprocess.run([sys.executable, "-c", BIG_ITEMS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1], timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["mb"] > 20
    assert m["lengths"] == [20_000, 5, 3]  # cut to IngestConfig.max_text_chars (item 1), items 2 and 3 as given
    assert m["truncated"] == 1
    assert m["q"] == [[m["second"], DUPLICATE_ITEM]]  # the superseded big row, at the line where it starts
    assert m["raw_len"][0] <= 4096 + len("...[truncated]")  # the quarantine keeps a bounded excerpt
    assert m["delta_mb"] < 400, m  # about 10x the file at most (measured: ~100-200 MB for 21 MB)


# ------------------------------------------------------------------------------------------------------ streaming


def _stream_cases() -> dict[str, tuple[str, bytes, str, bytes, IngestConfig]]:
    """Ratings files with every bad-row kind, duplicates far apart, blank lines and records spanning lines."""
    rows = ["1,1,4,10", "", '"u\n1",2,3,5', "1,1,5,5", "1,2,x,1", "2,3,4,", "2,3,3,", "1,2,4,40,,x", "1,99,4,1",
            ",1,4,1", "1,1,6,1", '"multi\nline\nuser",1,2,3', "1,1,4,10", "3,2,2,yesterday", "1,2", "2,3,5,"]
    csv_text = "\ufeff" + "\r\n".join([HEADER.strip()] + rows) + "\r\n"
    u_data = "1\t1\t5\t10\r\n1\t2\t3\t11\n\n2\t2\t4\n1\t1\t2\t20\n9\t9\t9\t9\n1\t1\t5\t20\n2\t2\t4\t1\n"
    u_item = ("1|Misérables (1995)|x||u|" + "|".join("0" * 19) + "\n2|B|x||u|" + "|".join("0" * 19) + "\n")
    parquet = io.BytesIO()
    pq.write_table(pa.table({
        "user_id": pa.array([1, 2, 3, 4, 1, 1, 2], pa.int64()),
        "item_id": pa.array([1.0, 2.0, 2.5, float("nan"), 1.0, 1.0, 2.0]),
        "rating": pa.array([4.0, float("nan"), 2.5, 3.0, 5.0, 4.0, 9.0], pa.float32()),
        "timestamp": pa.array([1_000_000_000, None, 5, 6, 1, 1_000_000_000, 3], pa.timestamp("s"))}), parquet)
    items = ITEMS_CSV.encode()
    return {
        "csv-bom-crlf-quoted": ("ratings.csv", csv_text.encode(), "items.csv", items, IngestConfig()),
        "tsv-latin1": ("r.tsv",
                       "user_id\titem_id\trating\n1\t1\t4\n1\t1\t3\n\nJosé\t2\t1\n2\t3\tx\n".encode("latin-1"),
                       "items.csv", items, IngestConfig()),
        "csv-utf16": ("r.csv", "user_id,item_id,rating\r\n1,1,4\r\n1,1,3\r\n\r\n2,2,1\r\n2,3,é\r\n".encode("utf-16"),
                      "items.csv", items, IngestConfig()),
        "movielens-100k": ("u.data", u_data.encode(), "u.item", u_item.encode("latin-1"), IngestConfig()),
        "movielens-1m": ("ratings.dat", b"1::1::5::978300760\n1::2::3::978302109\n2::1::4::9\n2::1::x::9\n"
                         b"1::1::5::978300760\n", "movies.dat", b"1::One (1975)::Drama\n2::Two: Two (1996)::War\n",
                         IngestConfig()),
        "movielens-latest": ("ratings.csv", b"userId,movieId,rating,timestamp\n1,1,4.0,9\n1,3,0.5,9\n1,3,1.5,9\n"
                             b"2,2,0.0,1\n", "movies.csv", b'movieId,title,genres\n1,"A, The",Comedy\n3,B,Drama\n'
                             b"2,C,Drama\n", IngestConfig(rating_min=0.5)),
        "parquet": ("r.parquet", parquet.getvalue(), "items.csv", items, IngestConfig()),
        "jsonl (read whole)": ("r.jsonl", b'{"user_id":1,"item_id":1,"rating":4}\n\n{"user_id":1,"item_id":1,'
                               b'"rating":3}\n{bad\n', "items.csv", items, IngestConfig()),
    }


@pytest.mark.parametrize("case", list(_stream_cases()))
def test_streaming_gives_the_same_outcome_as_reading_whole(tmp_path: Path, case: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    rname, ratings, iname, items, config = _stream_cases()[case]
    rpath, ipath = write(tmp_path / rname, ratings), write(tmp_path / iname, items)
    whole = ingest(rpath, ipath, config)
    check_accounting(whole)
    assert whole.counts["ratings"]["rows_quarantined"] > 0
    batches: list[int] = []
    add = ingest_module._RatingsAccumulator.add

    def counting_add(self, src):  # type: ignore[no-untyped-def]
        batches.append(len(src.data))
        return add(self, src)

    monkeypatch.setattr(ingest_module._RatingsAccumulator, "add", counting_add)
    for block in (1, 7, 64):
        batches.clear()
        streamed = ingest(rpath, ipath, replace(config, stream_min_bytes=0, stream_block_bytes=block,
                                                stream_batch_rows=2))
        check_accounting(streamed)
        if case != "jsonl (read whole)" and block < 64:
            assert len(batches) > 1, batches  # really read in several batches
        pd.testing.assert_frame_equal(whole.ratings, streamed.ratings)
        pd.testing.assert_frame_equal(whole.items, streamed.items)
        pd.testing.assert_frame_equal(whole.quarantine, streamed.quarantine)  # lines, reasons and raw text
        assert whole.counts == streamed.counts
        assert whole.content_hash == streamed.content_hash


def test_files_from_the_size_threshold_on_are_streamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ratings = HEADER + "".join(f"{u},{1 + u % 3},{1 + u % 5},{u}\n" for u in range(200)) + "1,1,9,1\n1,2,4,999\n"
    rpath, ipath = write(tmp_path / "ratings.csv", ratings), write(tmp_path / "items.csv", ITEMS_CSV)
    size = rpath.stat().st_size
    calls: list[str] = []
    stream = ingest_module._stream_ratings
    monkeypatch.setattr(ingest_module, "_stream_ratings", lambda *a: calls.append("stream") or stream(*a))
    small = ingest(rpath, ipath, IngestConfig(stream_min_bytes=size + 1))
    assert calls == []
    big = ingest(rpath, ipath, IngestConfig(stream_min_bytes=size, stream_block_bytes=100))
    assert calls == ["stream"]
    pd.testing.assert_frame_equal(small.quarantine, big.quarantine)
    assert small.content_hash == big.content_hash
    assert only_quarantined(big)[["line", "reason"]].values.tolist() == [[3, DUPLICATE_SUPERSEDED],
                                                                         [202, RATING_OUT_OF_SCALE]]


def test_stream_config_validation() -> None:
    for bad in (dict(stream_min_bytes=-1), dict(stream_block_bytes=0), dict(stream_batch_rows=0)):
        with pytest.raises(ValueError, match="stream_"):
            IngestConfig(**bad)


# ------------------------------------------------------------------------------------------ built-in catalogue


def test_builtin_catalogue_folder_carries_the_generator_version(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A home written by an older generator (no version in the folder name) is not served again; the current
    version's folder is written once and reused."""
    import logging

    import tasks.ingest as ingest_tasks
    from convmf_core.synthetic import CATALOGUE_VERSION

    monkeypatch.setattr(ingest_tasks, "get_run_logger", lambda: logging.getLogger("test"))  # no Prefect run here
    old = tmp_path / "builtin" / "users30-items20-seed0"
    old.mkdir(parents=True)
    write(old / "ratings.csv", "user_id,item_id,rating\nold,old,1\n")
    write(old / "items.csv", "item_id,title,description\nold,Old,an old catalogue\n")

    ratings, items = ingest_tasks.builtin_catalogue.fn(30, 20, 0, tmp_path)
    directory = ingest_tasks.builtin_catalogue_dir(tmp_path, 30, 20, 0)
    assert directory.name == f"v{CATALOGUE_VERSION}-users30-items20-seed0"
    assert (ratings.parent, items.parent) == (directory, directory)
    assert "old" not in pd.read_csv(ratings, dtype=str)["user_id"].tolist()
    stamp = ratings.stat().st_mtime_ns
    assert ingest_tasks.builtin_catalogue.fn(30, 20, 0, tmp_path) == (ratings, items)  # reused, not rewritten
    assert ratings.stat().st_mtime_ns == stamp
