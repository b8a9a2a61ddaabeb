"""Tests of convmf_core.ingest: formats, bad-row quarantine, row accounting, errors, hashing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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
def test_bad_rating_row_is_quarantined(tmp_path: Path, bad_row: str, reason: str) -> None:
    r = run(tmp_path, HEADER + "1,1,4,10\n" + bad_row + "\n3,3,2,30\n")
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
