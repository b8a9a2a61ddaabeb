"""Ingest ratings and item descriptions handed in by users: read, validate, quarantine bad rows.

:func:`ingest` reads one ratings file and one items file, checks every row with vectorised pandas operations and
returns an :class:`IngestResult`: the accepted ratings and items typed per ``RATINGS_SCHEMA`` / ``ITEMS_SCHEMA``,
the rejected rows per ``QUARANTINE_SCHEMA`` (each with one reason code from :data:`REASON_CODES`), row counts and a
content hash. Input that cannot be ingested at all raises :class:`IngestError`, whose message names the file.

Formats (``IngestConfig.format``):

* ``csv`` / ``tsv``: a header row, RFC 4180 quoting (delimiters, quotes and newlines inside quoted fields), any of
  LF / CRLF / CR line ends, an optional UTF-8 byte-order mark. With ``format="auto"`` or ``"csv"`` the delimiter is
  sniffed from the header (``,`` tab ``;`` ``|``, preferring the one that yields the required column names), so
  tab-separated data handed in as ``.csv`` is not read as a single column.
* ``jsonl``: one JSON object per line.
* ``parquet``.
* ``movielens-100k``: ``u.data`` (tab-separated ``user item rating timestamp``, no header) with ``u.item``
  (``|``-separated, Latin-1, ``id|title|release date|video release date|IMDb URL|19 genre flags``) or with
  ``items_text.tsv`` (header ``item_id title imdb_id imdb_description tmdb_overview``, no quoting), chosen when the
  items file name ends with ``items_text.tsv``.
* ``movielens-1m``: ``ratings.dat`` / ``movies.dat`` (``::``-separated, no header, ``movies.dat`` is Latin-1).
* ``movielens-latest``: ``ratings.csv`` (``userId,movieId,rating,timestamp``) / ``movies.csv``
  (``movieId,title,genres``).

MovieLens item files other than ``items_text.tsv`` carry no description: their ``text`` is the title followed by the
genre names (``"Toy Story (1995) Animation Children's Comedy"``). ``items_text.tsv``'s text is
``imdb_description + " " + tmdb_overview`` (either may be empty).

With ``format="auto"`` the format is chosen per file from its name (``u.data`` and the ML-100K splits ``u1.base``...,
``u.item``, ``items_text.tsv``, ``ratings.dat``, ``movies.dat``, ``ratings.csv`` / ``movies.csv`` whose header is
MovieLens's), else from its extension (``.csv``, ``.tsv``/``.tab``, ``.jsonl``/``.ndjson``/``.json``,
``.parquet``/``.pq``), else (``.txt``, ``.dat``, no extension) from its content.

What ``quarantine.line`` means: in text files, the 1-based physical line on which the record starts (the header is
line 1, blank lines count, a record whose quoted field holds newlines spans several lines and is reported at its
first). It is exact, except after a malformed row that holds newlines in quoted fields beyond the header's columns,
where later lines may be off. In Parquet files it is the 1-based row number.

Row accounting: blank lines are not rows; every other record is read and either accepted or quarantined, so for
each file ``rows_read == rows_accepted + rows_quarantined``.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from convmf_core.atomic import write_file_atomic
from convmf_core.schemas import ITEMS_SCHEMA, QUARANTINE_SCHEMA, RATINGS_SCHEMA, conform_frame, frame_to_table

Format = Literal["auto", "csv", "tsv", "jsonl", "parquet", "movielens-100k", "movielens-1m", "movielens-latest"]
FORMATS: tuple[str, ...] = get_args(Format)
ColumnSpec = str | tuple[str, ...]

# Reason codes (one per quarantined row; the first that applies, in this order).
MALFORMED_ROW = "malformed_row"  # cannot be split into the expected fields: invalid JSON / not an object, a field
#                                  beyond the header's columns, a MovieLens line with the wrong number of fields
EMPTY_ID = "empty_id"  # user or item id absent, null or blank
MISSING_FIELD = "missing_field"  # the rating is absent, null or blank
NON_NUMERIC_RATING = "non_numeric_rating"  # the rating is not a number (or is NaN)
RATING_OUT_OF_SCALE = "rating_out_of_scale"  # outside [rating_min, rating_max] (or infinite)
BAD_TIMESTAMP = "bad_timestamp"  # present but neither epoch seconds >= 0 nor an ISO 8601 date-time
UNKNOWN_ITEM = "unknown_item"  # the item has no accepted row in the items file
DUPLICATE_SUPERSEDED = "duplicate_superseded"  # another rating of the same (user, item) is newer or later in the file
DUPLICATE_ITEM = "duplicate_item"  # a later row of the items file has the same item id

RATING_REASONS: tuple[str, ...] = (
    MALFORMED_ROW, EMPTY_ID, MISSING_FIELD, NON_NUMERIC_RATING, RATING_OUT_OF_SCALE, BAD_TIMESTAMP, UNKNOWN_ITEM,
    DUPLICATE_SUPERSEDED,
)
ITEM_REASONS: tuple[str, ...] = (MALFORMED_ROW, EMPTY_ID, DUPLICATE_ITEM)
REASON_CODES: tuple[str, ...] = RATING_REASONS + (DUPLICATE_ITEM,)

_ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_SNIFF_DELIMITERS = (",", "\t", ";", "|")
_RAW_MAX_CHARS = 4096  # quarantine.raw keeps at most this many characters of a record
_MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z
_HASH_TAG = b"convmf-ingest-v1"
_MAGIC = {b"PAR1": "a Parquet file", b"\x1f\x8b": "gzip-compressed", b"PK\x03\x04": "a zip archive"}


class IngestError(ValueError):
    """Input that cannot be ingested at all (unreadable, binary, wrong columns, unknown format, no valid rows).

    The message always names the file."""


@dataclass(frozen=True)
class IngestConfig:
    """How to read and validate the input files.

    ``*_col`` options name the source column for each field; a tuple lists candidates (the first present wins).
    Names match exactly, else ignoring case and surrounding spaces. They apply to csv/tsv/jsonl/parquet input;
    MovieLens layouts have fixed columns. ``timestamp`` and ``title`` columns are optional.
    ``encoding="auto"`` decodes UTF-8 (BOM stripped; UTF-16 when it has a BOM) and falls back to Latin-1.
    """

    rating_min: float = 1.0
    rating_max: float = 5.0
    format: Format = "auto"
    user_col: ColumnSpec = "user_id"
    item_col: ColumnSpec = "item_id"
    rating_col: ColumnSpec = "rating"
    timestamp_col: ColumnSpec = "timestamp"
    text_col: ColumnSpec = ("text", "description")
    title_col: ColumnSpec = "title"
    max_text_chars: int = 20_000
    encoding: str = "auto"

    def __post_init__(self) -> None:
        """Reject settings that cannot work."""
        lo, hi = float(self.rating_min), float(self.rating_max)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"rating scale must be finite with rating_min < rating_max, got [{lo}, {hi}]")
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; expected one of {FORMATS}")
        if int(self.max_text_chars) < 1:
            raise ValueError(f"max_text_chars must be positive, got {self.max_text_chars}")
        for name in ("user_col", "item_col", "rating_col", "timestamp_col", "text_col", "title_col"):
            if not _candidates(getattr(self, name)):
                raise ValueError(f"{name} must name at least one column")
        if self.encoding != "auto":
            try:
                codecs.lookup(self.encoding)
            except LookupError as exc:
                raise ValueError(f"unknown encoding {self.encoding!r}") from exc


@dataclass(frozen=True, eq=False)
class IngestResult:
    """What :func:`ingest` accepted and rejected.

    ``ratings`` (per ``RATINGS_SCHEMA``) is sorted by (user_id, item_id) and ``items`` (per ``ITEMS_SCHEMA``) by
    item_id, so the same data in another row order gives equal frames and an equal ``content_hash`` (sha256 over
    the accepted ratings and items, used as a cache key). ``quarantine`` follows ``QUARANTINE_SCHEMA``, ratings file
    first, by line. ``counts`` has one entry per file (``"ratings"``, ``"items"``) with ``file``, ``format``,
    ``encoding``, ``rows_read``, ``rows_accepted``, ``rows_quarantined``, ``blank_lines`` and ``reasons`` (count per
    reason code); the items entry also has ``empty_text`` (accepted items without text) and ``text_truncated``.
    ``counts["reasons"]`` totals the reasons over both files.
    """

    ratings: pd.DataFrame
    items: pd.DataFrame
    quarantine: pd.DataFrame
    counts: dict[str, Any]
    content_hash: str


# --------------------------------------------------------------------------------------------------------- reading


@dataclass
class _Rows:
    """Records of one file, before validation (internal)."""

    columns: list[str]  # source column names available
    get: Callable[[str, str], pd.Series]  # (column, kind in {"id", "value"}) -> str Series, NaN where absent
    n: int
    line: np.ndarray  # int64, 1-based line (or row) number of each record
    malformed: np.ndarray  # bool
    raw: Callable[[np.ndarray], list[str]]  # positions -> the records as text
    blank_lines: int = 0


@dataclass
class _Source:
    """One file's records with canonical columns (internal)."""

    path: Path
    role: str
    fmt: str
    encoding: str | None
    data: pd.DataFrame  # canonical columns, str dtype
    line: np.ndarray
    malformed: np.ndarray
    raw: Callable[[np.ndarray], list[str]]
    blank_lines: int


def _candidates(spec: ColumnSpec) -> tuple[str, ...]:
    return (spec,) if isinstance(spec, str) else tuple(spec)


def _match_column(columns: list[str], spec: ColumnSpec) -> str | None:
    """The first candidate of ``spec`` present in ``columns`` (exactly, else case- and space-insensitively)."""
    cands = _candidates(spec)
    for c in cands:
        if c in columns:
            return c
    folded: dict[str, str] = {}
    for col in columns:
        folded.setdefault(str(col).strip().casefold(), col)
    for c in cands:
        hit = folded.get(c.strip().casefold())
        if hit is not None:
            return hit
    return None


def _describe(spec: ColumnSpec) -> str:
    cands = _candidates(spec)
    return repr(cands[0]) if len(cands) == 1 else "(" + " or ".join(repr(c) for c in cands) + ")"


def _read_bytes(path: Path, role: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IngestError(f"{role} file {path}: cannot be read ({exc.strerror or exc})") from exc
    if not data.strip():
        raise IngestError(f"{role} file {path}: is empty")
    return data


def _detect_format(path: Path, role: str, head: bytes) -> str:
    name = path.name.lower()
    first = head.split(b"\n", 1)[0].removeprefix(b"\xef\xbb\xbf").strip().lower().replace(b'"', b"")
    if role == "ratings":
        if re.fullmatch(r"u[0-9ab]?\.(data|base|test)", name):
            return "movielens-100k"
        if name == "ratings.dat":
            return "movielens-1m"
        if name == "ratings.csv" and first.startswith(b"userid,movieid"):
            return "movielens-latest"
    else:
        if name == "u.item" or name.endswith("items_text.tsv"):
            return "movielens-100k"
        if name == "movies.dat":
            return "movielens-1m"
        if name == "movies.csv" and first.startswith(b"movieid,title"):
            return "movielens-latest"
    ext = path.suffix.lower()
    by_ext = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
              ".parquet": "parquet", ".pq": "parquet"}
    if ext in by_ext:
        return by_ext[ext]
    if ext in ("", ".txt", ".dat", ".data"):
        if head.startswith(b"PAR1"):
            return "parquet"
        if head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"{":
            return "jsonl"
        return "csv"
    raise IngestError(f"{role} file {path}: unknown format (extension {ext!r}); name a format in IngestConfig(format=...)"
                      f" from {FORMATS[1:]}")


def _resolve_layout(path: Path, role: str, config: IngestConfig, head: bytes) -> tuple[str, str]:
    """(public format, layout) of one file."""
    fmt = _detect_format(path, role, head) if config.format == "auto" else config.format
    if fmt in ("csv", "tsv", "jsonl", "parquet"):
        return fmt, fmt
    ratings = role == "ratings"
    if fmt == "movielens-100k":
        if ratings:
            return fmt, "ml100k-data"
        return fmt, "ml100k-text" if path.name.lower().endswith("items_text.tsv") else "ml100k-item"
    if fmt == "movielens-1m":
        return fmt, "ml1m-ratings" if ratings else "ml1m-movies"
    return fmt, "mllatest-ratings" if ratings else "mllatest-movies"


def _decode(data: bytes, path: Path, role: str, encoding: str) -> tuple[str, str]:
    """Decode ``data``; reject binary content. Returns (text with '\\n' line ends, encoding used)."""
    for magic, what in _MAGIC.items():
        if data.startswith(magic):
            raise IngestError(f"{role} file {path}: is binary ({what}), not text; convert or decompress it first")
    if encoding == "auto":
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            candidates = ["utf-16"]
        else:
            candidates = ["utf-8-sig", "latin-1"]
    else:
        candidates = ["utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding]
    wide = codecs.lookup(candidates[0]).name.startswith(("utf-16", "utf-32"))
    if not wide and b"\x00" in data[:65536]:
        raise IngestError(f"{role} file {path}: is binary (holds NUL bytes), not text")
    text: str | None = None
    used = candidates[0]
    for enc in candidates:
        try:
            text = data.decode(enc)
            used = enc
            break
        except UnicodeDecodeError as exc:
            err = exc
    if text is None:
        raise IngestError(f"{role} file {path}: cannot be decoded as {encoding} ({err})")
    sample = text[:65536]
    controls = len(re.findall(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]", sample))
    if controls > 0.05 * max(len(sample), 1):
        raise IngestError(f"{role} file {path}: looks binary ({controls} control characters in the first "
                          f"{len(sample)}), not text")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise IngestError(f"{role} file {path}: is empty")
    return text, ("utf-8" if used == "utf-8-sig" else used)


class _LineIndex:
    """Raw text of physical lines of a (newline-normalised) text, built on first use."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._bytes: bytes | None = None
        self._starts: np.ndarray | None = None
        self._ends: np.ndarray | None = None

    def get(self, first: int, last: int) -> str:
        """Lines ``first`` to ``last`` (1-based, inclusive) joined by newlines."""
        if self._bytes is None:
            self._bytes = self._text.encode("utf-8", "surrogatepass")
            nl = np.flatnonzero(np.frombuffer(self._bytes, dtype=np.uint8) == 10)
            self._starts = np.concatenate([[0], nl + 1])
            self._ends = np.concatenate([nl, [len(self._bytes)]])
        assert self._starts is not None and self._ends is not None
        last = min(last, len(self._starts))
        return self._bytes[self._starts[first - 1]:self._ends[last - 1]].decode("utf-8", "surrogatepass")


def _header_fields(header_line: str, sep: str, quoting: int) -> list[str]:
    try:
        return next(csv.reader([header_line[:65536]], delimiter=sep, quoting=quoting))
    except (csv.Error, StopIteration):
        return [header_line]


def _sniff_delimiter(header_line: str, required: list[ColumnSpec], default: str) -> str:
    """The delimiter whose split of the header finds most required columns (then: splits at all, then default)."""
    best, best_key = default, (-1, False, False)
    for sep in _SNIFF_DELIMITERS:
        fields = [f.strip() for f in _header_fields(header_line, sep, csv.QUOTE_MINIMAL)]
        key = (sum(_match_column(fields, s) is not None for s in required), len(fields) > 1, sep == default)
        if key > best_key:
            best, best_key = sep, key
    return best


def _parse_delimited(text: str, path: Path, role: str, sep: str, quoting: int) -> _Rows:
    """Split a delimited text with a header row (pandas' C parser, every field read as a string)."""
    header_line = text.split("\n", 1)[0]
    width = max(len(_header_fields(header_line, sep, quoting)), 1)
    # One column more than the header: a non-empty value there marks a row with too many fields. Rows with even
    # more fields make the parser fail unless usecols is given, and usecols fails when no row is that wide, hence
    # the second attempt.
    positions = list(range(width + 1))
    options: dict[str, Any] = dict(sep=sep, header=None, names=positions, dtype=str, na_filter=False, index_col=False,
                                   skip_blank_lines=False, quoting=quoting, engine="c")
    try:
        try:
            frame = pd.read_csv(io.StringIO(text), **options)
        except pd.errors.ParserError as exc:
            if "Expected" not in str(exc):
                raise
            frame = pd.read_csv(io.StringIO(text), usecols=positions, low_memory=False, **options)
    except (pd.errors.ParserError, ValueError) as exc:
        raise IngestError(f"{role} file {path}: cannot be parsed as delimited text ({str(exc).strip()})") from exc
    if len(frame) == 0:
        raise IngestError(f"{role} file {path}: is empty")
    cols = [frame[c] for c in range(width + 1)]
    # Line numbers: each record starts one line after the previous one ended; quoted fields may hold newlines.
    nl = np.zeros(len(frame), dtype=np.int64)
    if quoting != csv.QUOTE_NONE and '"' in text:
        for col in cols:
            nl += col.str.count("\n").to_numpy(dtype=np.int64)
    start = 1 + np.arange(len(frame), dtype=np.int64) + np.concatenate([[0], np.cumsum(nl)[:-1]])
    end = start + nl
    lines = _LineIndex(text)
    # Header names (deduplicated: a repeated name gets a ".k" suffix, as pandas does).
    names: list[str] = []
    seen: Counter[str] = Counter()
    for value in frame.iloc[0, :width].tolist():
        name = str(value).strip()
        names.append(name if not seen[name] else f"{name}.{seen[name]}")
        seen[name] += 1
    body = frame.iloc[1:].reset_index(drop=True)
    start, end = start[1:], end[1:]
    # Blank lines come back as rows of empty fields: drop them (they are not rows).
    empty = np.ones(len(body), dtype=bool)
    for c in range(width + 1):
        empty &= (body[c].str.strip() == "").to_numpy(dtype=bool)
    if empty.any():
        cand = np.flatnonzero(empty)
        blank = np.array([lines.get(int(start[i]), int(end[i])).strip() == "" for i in cand], dtype=bool)
        keep = np.ones(len(body), dtype=bool)
        keep[cand[blank]] = False
        n_blank = int(blank.sum())
        if n_blank:
            body = body[keep].reset_index(drop=True)
            start, end = start[keep], end[keep]
    else:
        n_blank = 0
    malformed = (body[width] != "").to_numpy(dtype=bool)
    data = {name: body[i] for i, name in enumerate(names)}

    def raw(pos: np.ndarray) -> list[str]:
        return [lines.get(int(start[i]), int(end[i])) for i in pos]

    return _Rows(columns=names, get=lambda name, kind: data[name], n=len(body), line=start, malformed=malformed,
                 raw=raw, blank_lines=n_blank)


def _str_series(values: pa.Array | pa.ChunkedArray) -> pd.Series:
    """An Arrow string array as a pandas Series of the default string dtype."""
    return pd.Series(values, dtype="str")


def _split_lines(text: str, sep: str, names: list[str], greedy_middle: bool = False) -> _Rows:
    """Split a headerless, unquoted text into ``names`` fields per line (MovieLens layouts), with Arrow kernels.

    A line with another number of fields is malformed; with ``greedy_middle`` (three fields) the middle one may
    hold the separator (``movies.dat`` titles).
    """
    raw_lines = text.split("\n")
    if raw_lines and raw_lines[-1] == "":
        raw_lines.pop()
    everything = pa.array(raw_lines, pa.large_string())
    del raw_lines
    blank = pc.equal(pc.utf8_trim_whitespace(everything), "").to_numpy(zero_copy_only=False)
    lineno = np.arange(1, len(everything) + 1, dtype=np.int64)[~blank]
    lines = everything.filter(pa.array(~blank))
    count = pc.count_substring(lines, sep).to_numpy(zero_copy_only=False)
    n = len(names)
    malformed = (count < n - 1) if greedy_middle else (count != n - 1)
    # Malformed lines are split as if empty, so that every line yields n fields.
    safe = pc.if_else(pa.array(malformed), pa.scalar(sep * (n - 1), pa.large_string()), lines)
    if greedy_middle:  # few lines (movies.dat): pandas' partition is fast enough
        assert n == 3
        head = _str_series(safe).str.partition(sep)
        tail = head[2].str.rpartition(sep)
        fields = [head[0], tail[0], tail[2]]
    else:
        parts = pc.split_pattern(safe, sep, max_splits=n - 1)
        fields = [_str_series(pc.list_element(parts, i)) for i in range(n)]
    data = {name: field.reset_index(drop=True) for name, field in zip(names, fields)}

    def raw(pos: np.ndarray) -> list[str]:
        return lines.take(pa.array(pos, pa.int64())).to_pylist()

    return _Rows(columns=list(names), get=lambda name, kind: data[name], n=len(lines), line=lineno,
                 malformed=malformed, raw=raw, blank_lines=int(blank.sum()))


def _json_text(value: Any, id_like: bool) -> str | None:
    """A JSON value as the text it would have in a CSV file (None for null)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if id_like:  # 7.0 -> "7"; NaN / infinity are no id
            return (str(int(value)) if value.is_integer() else repr(value)) if math.isfinite(value) else None
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


def _parse_jsonl(text: str) -> _Rows:
    """One JSON object per line; lines that are not JSON objects are malformed."""
    all_lines = text.split("\n")
    if all_lines and all_lines[-1] == "":
        all_lines.pop()  # the text ends with a newline
    idx = [i for i, line in enumerate(all_lines) if line.strip()]
    blank_lines = len(all_lines) - len(idx)
    body = [all_lines[i] for i in idx]
    records: list[Any]
    try:  # fast path: the whole file as one JSON array of one-element arrays, one per line
        wrapped = json.loads("[[" + "],[".join(body) + "]]")
        if len(wrapped) != len(body) or any(len(w) != 1 for w in wrapped):
            raise ValueError("a line does not hold exactly one JSON value")
        records = [w[0] for w in wrapped]
    except ValueError:
        records = []
        for line in body:
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append(None)
    malformed = np.array([not isinstance(r, dict) for r in records], dtype=bool)
    dicts: list[dict] = [r if isinstance(r, dict) else {} for r in records]
    columns: list[str] = list(dict.fromkeys(k for d in dicts for k in d))

    def get(name: str, kind: str) -> pd.Series:
        return pd.Series([_json_text(d.get(name), kind == "id") for d in dicts], dtype="str")

    def raw(pos: np.ndarray) -> list[str]:
        return [body[int(i)] for i in pos]

    return _Rows(columns=columns, get=get, n=len(body), line=np.asarray(idx, dtype=np.int64) + 1,
                 malformed=malformed, raw=raw, blank_lines=blank_lines)


def _arrow_text(col: pa.ChunkedArray, kind: str) -> pd.Series:
    """An Arrow column as strings (ids: integral floats without ".0"; date-times: epoch seconds)."""
    t = col.type
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
        t = col.type
    if pa.types.is_date(t):
        col = col.cast(pa.timestamp("s"))
        t = col.type
    if pa.types.is_timestamp(t):
        col = pc.cast(col, pa.timestamp("s", tz=t.tz), safe=False).cast(pa.int64())
    elif kind == "id" and pa.types.is_floating(t):  # e.g. integer ids with missing values written by pandas
        finite = pc.is_finite(col)
        values = pc.filter(col, finite)
        if len(values) == 0 or pc.all(pc.equal(pc.floor(values), values)).as_py():
            col = pc.if_else(finite, col, pa.scalar(None, t)).cast(pa.int64())  # NaN -> null (an empty id)
    try:
        return _str_series(pc.cast(col, pa.string()))
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return pd.Series([_json_text(v, kind == "id") for v in col.to_pylist()], dtype="str")


def _parse_parquet(data: bytes, path: Path, role: str) -> _Rows:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IngestError(f"{role} file {path}: is not a readable Parquet file ({exc})") from exc

    def raw(pos: np.ndarray) -> list[str]:
        return [json.dumps(table.slice(int(i), 1).to_pylist()[0], ensure_ascii=False, default=str) for i in pos]

    return _Rows(columns=list(table.column_names), get=lambda name, kind: _arrow_text(table.column(name), kind),
                 n=table.num_rows, line=np.arange(1, table.num_rows + 1, dtype=np.int64),
                 malformed=np.zeros(table.num_rows, dtype=bool), raw=raw)


def _genre_text(title: pd.Series, genres: pd.Series) -> pd.Series:
    """MovieLens text fallback: title followed by the genre names."""
    g = genres.fillna("").str.replace("(no genres listed)", "", regex=False).str.split("|").str.join(" ")
    return (title.fillna("").str.strip() + " " + g.str.split().str.join(" ")).str.strip()


def _required(role: str, config: IngestConfig) -> dict[str, ColumnSpec]:
    if role == "ratings":
        return {"user_id": config.user_col, "item_id": config.item_col, "rating": config.rating_col}
    return {"item_id": config.item_col, "text": config.text_col}


def _optional(role: str, config: IngestConfig) -> dict[str, ColumnSpec]:
    return {"timestamp": config.timestamp_col} if role == "ratings" else {"title": config.title_col}


_KIND = {"user_id": "id", "item_id": "id"}


def _canonical(rows: _Rows, path: Path, role: str, required: dict[str, ColumnSpec],
               optional: dict[str, ColumnSpec]) -> pd.DataFrame:
    """Pick and rename the source columns; missing required columns raise IngestError naming them."""
    picked = {canon: _match_column(rows.columns, spec) for canon, spec in required.items()}
    missing = [_describe(required[c]) for c, col in picked.items() if col is None]
    if missing:
        shown = rows.columns[:20]
        raise IngestError(f"{role} file {path}: missing required column(s) {', '.join(missing)}; found columns "
                          f"{shown}{' ...' if len(rows.columns) > 20 else ''}")
    for canon, spec in optional.items():
        picked[canon] = _match_column(rows.columns, spec)
    out: dict[str, pd.Series] = {}
    for canon, col in picked.items():
        if col is None:
            out[canon] = pd.Series([pd.NA] * rows.n, dtype="str")
        else:
            out[canon] = rows.get(col, _KIND.get(canon, "value")).reset_index(drop=True)
    return pd.DataFrame(out)


def _load(path: Path, role: str, config: IngestConfig) -> _Source:
    """Read one file into canonical string columns."""
    data = _read_bytes(path, role)
    fmt, layout = _resolve_layout(path, role, config, data[:65536])
    encoding: str | None = None
    if layout == "parquet":
        rows = _parse_parquet(data, path, role)
        frame = _canonical(rows, path, role, _required(role, config), _optional(role, config))
    else:
        text, encoding = _decode(data, path, role, config.encoding)
        if layout == "jsonl":
            rows = _parse_jsonl(text)
            frame = _canonical(rows, path, role, _required(role, config), _optional(role, config))
        elif layout in ("csv", "tsv"):
            default = "\t" if layout == "tsv" else ","
            required = _required(role, config)
            header_line = text.split("\n", 1)[0]
            sep = default if config.format == "tsv" else _sniff_delimiter(header_line, list(required.values()),
                                                                          default)
            rows = _parse_delimited(text, path, role, sep, csv.QUOTE_MINIMAL)
            frame = _canonical(rows, path, role, required, _optional(role, config))
        elif layout in ("ml100k-data", "ml1m-ratings"):
            rows = _split_lines(text, "\t" if layout == "ml100k-data" else "::",
                                ["user_id", "item_id", "rating", "timestamp"])
            frame = _canonical(rows, path, role, {c: c for c in rows.columns}, {})
        elif layout == "mllatest-ratings":
            rows = _parse_delimited(text, path, role, ",", csv.QUOTE_MINIMAL)
            frame = _canonical(rows, path, role, {"user_id": "userId", "item_id": "movieId", "rating": "rating"},
                               {"timestamp": "timestamp"})
        elif layout == "ml100k-item":
            names = ["item_id", "title", "release_date", "video_release_date", "imdb_url"] + [
                f"g{i}" for i in range(len(_ML100K_GENRES))]
            rows = _split_lines(text, "|", names)
            base = _canonical(rows, path, role, {"item_id": "item_id", "title": "title"}, {})
            genres = pd.Series([""] * rows.n, dtype="str")
            for i, genre in enumerate(_ML100K_GENRES):
                flag = (rows.get(f"g{i}", "value").str.strip() == "1").to_numpy(dtype=bool)
                genres = genres + pd.Series(np.where(flag, "|" + genre, ""), dtype="str")
            frame = base.assign(text=_genre_text(base["title"], genres))
        elif layout in ("ml1m-movies", "mllatest-movies"):
            if layout == "ml1m-movies":
                rows = _split_lines(text, "::", ["item_id", "title", "genres"], greedy_middle=True)
                base = _canonical(rows, path, role, {"item_id": "item_id", "title": "title", "genres": "genres"}, {})
            else:
                rows = _parse_delimited(text, path, role, ",", csv.QUOTE_MINIMAL)
                base = _canonical(rows, path, role, {"item_id": "movieId", "title": "title", "genres": "genres"}, {})
            frame = base.assign(text=_genre_text(base["title"], base["genres"])).drop(columns="genres")
        elif layout == "ml100k-text":
            rows = _parse_delimited(text, path, role, "\t", csv.QUOTE_NONE)
            base = _canonical(rows, path, role, {"item_id": "item_id", "title": "title",
                                                 "imdb_description": "imdb_description",
                                                 "tmdb_overview": "tmdb_overview"}, {})
            text_col = (base["imdb_description"].fillna("").str.strip() + " "
                        + base["tmdb_overview"].fillna("").str.strip()).str.strip()
            frame = base[["item_id", "title"]].assign(text=text_col)
        else:  # pragma: no cover - _resolve_layout returns only the layouts above
            raise IngestError(f"{role} file {path}: unknown format {layout!r}")
    if rows.n == 0:
        raise IngestError(f"{role} file {path}: has no data rows")
    return _Source(path=path, role=role, fmt=fmt, encoding=encoding, data=frame, line=rows.line,
                   malformed=np.asarray(rows.malformed, dtype=bool), raw=rows.raw, blank_lines=rows.blank_lines)


# ------------------------------------------------------------------------------------------------------ validation


def _flag(reason: np.ndarray, mask: np.ndarray, code: str) -> None:
    """Give ``code`` to rows in ``mask`` that have no reason yet (``reason`` holds 1-based REASON_CODES indices)."""
    reason[mask & (reason == 0)] = REASON_CODES.index(code) + 1


def _bool(series: pd.Series) -> np.ndarray:
    return series.to_numpy(dtype=bool, na_value=False)


def _blank(stripped: pd.Series) -> np.ndarray:
    """True where absent or empty (of an already stripped Series)."""
    return _bool(stripped.isna() | (stripped == ""))


def _to_float(stripped: pd.Series) -> np.ndarray:
    """Parse numbers (NaN where blank or not a number): Arrow's parser, else pandas' when a value fails it."""
    values = stripped.where(stripped != "")
    try:
        return pc.cast(pa.array(values, from_pandas=True), pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _parse_timestamps(ts: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(seconds as float64, NaN where absent or bad; bad mask) from epoch seconds or ISO 8601 strings."""
    ts = ts.str.strip()
    present = ~_blank(ts)
    num = _to_float(ts)
    seconds = np.floor(num)
    ok = present & np.isfinite(num) & (num >= 0) & (num <= _MAX_TIMESTAMP)
    textual = present & np.isnan(num)
    if textual.any():
        dt = pd.to_datetime(ts[textual], format="ISO8601", utc=True, errors="coerce")
        sec = ((dt - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(
            dtype=np.float64, na_value=np.nan)
        seconds[textual] = sec
        ok[textual] = np.isfinite(sec) & (sec >= 0) & (sec <= _MAX_TIMESTAMP)
    seconds[~ok] = np.nan
    return seconds, present & ~ok


def _validate_items(src: _Source, config: IngestConfig) -> tuple[pd.DataFrame, np.ndarray, dict[str, int]]:
    d = src.data
    reason = np.zeros(len(d), dtype=np.int8)
    item = d["item_id"].str.strip()
    _flag(reason, src.malformed, MALFORMED_ROW)
    _flag(reason, _blank(item), EMPTY_ID)
    ok = np.flatnonzero(reason == 0)
    repeated = np.zeros(len(d), dtype=bool)
    repeated[ok[item.iloc[ok].duplicated(keep="last").to_numpy(dtype=bool)]] = True
    _flag(reason, repeated, DUPLICATE_ITEM)
    accepted = reason == 0
    text = d["text"].fillna("").str.strip()
    long = _bool(text.str.len() > config.max_text_chars)
    if long.any():
        text = text.where(~long, text.str.slice(0, config.max_text_chars))
    title = d["title"].str.strip()
    title = title.where(~_blank(title))
    items = pd.DataFrame({"item_id": item[accepted], "title": title[accepted], "text": text[accepted]})
    items = conform_frame(items.sort_values("item_id", kind="stable").reset_index(drop=True), ITEMS_SCHEMA)
    extra = {"empty_text": int((items["text"] == "").sum()), "text_truncated": int((long & accepted).sum())}
    return items, reason, extra


def _validate_ratings(src: _Source, item_ids: pd.Series, config: IngestConfig) -> tuple[pd.DataFrame, np.ndarray]:
    d = src.data
    n = len(d)
    reason = np.zeros(n, dtype=np.int8)
    user = d["user_id"].str.strip()
    item = d["item_id"].str.strip()
    rating_s = d["rating"].str.strip()
    _flag(reason, src.malformed, MALFORMED_ROW)
    _flag(reason, _blank(user) | _blank(item), EMPTY_ID)
    _flag(reason, _blank(rating_s), MISSING_FIELD)
    rating = _to_float(rating_s)
    _flag(reason, np.isnan(rating), NON_NUMERIC_RATING)
    with np.errstate(invalid="ignore"):
        in_scale = (rating >= config.rating_min) & (rating <= config.rating_max)
    _flag(reason, ~in_scale, RATING_OUT_OF_SCALE)
    seconds, bad_ts = _parse_timestamps(d["timestamp"])
    _flag(reason, bad_ts, BAD_TIMESTAMP)
    _flag(reason, ~_bool(item.isin(item_ids)), UNKNOWN_ITEM)
    # Duplicates among otherwise valid rows: keep the newest (no timestamp = oldest), ties -> the last in the file.
    ok = np.flatnonzero(reason == 0)
    key = np.where(np.isnan(seconds[ok]), -np.inf, seconds[ok])
    order = ok[np.lexsort((ok, key))]
    pairs = pd.DataFrame({"u": user.iloc[order].reset_index(drop=True), "i": item.iloc[order].reset_index(drop=True)})
    superseded = np.zeros(n, dtype=bool)
    superseded[order[pairs.duplicated(keep="last").to_numpy(dtype=bool)]] = True
    _flag(reason, superseded, DUPLICATE_SUPERSEDED)
    accepted = reason == 0
    ratings = pd.DataFrame({
        "user_id": user[accepted].reset_index(drop=True), "item_id": item[accepted].reset_index(drop=True),
        "rating": rating[accepted].astype(np.float32),
        "timestamp": pd.array(seconds[accepted], dtype="Float64").astype("Int64"),
    })
    ratings = ratings.sort_values(["user_id", "item_id"], kind="stable").reset_index(drop=True)
    return conform_frame(ratings, RATINGS_SCHEMA), reason


def _quarantine(src: _Source, reason: np.ndarray) -> pd.DataFrame:
    pos = np.flatnonzero(reason)
    raw = [r if len(r) <= _RAW_MAX_CHARS else r[:_RAW_MAX_CHARS] + "...[truncated]" for r in src.raw(pos)]
    return pd.DataFrame({
        "source_file": pd.Series([str(src.path)] * len(pos), dtype="str"),
        "line": src.line[pos].astype(np.int64),
        "reason": pd.Series([REASON_CODES[k - 1] for k in reason[pos].tolist()], dtype="str"),
        "raw": pd.Series(raw, dtype="str"),
    })


def _file_counts(src: _Source, reason: np.ndarray, codes: tuple[str, ...]) -> dict[str, Any]:
    per_code = np.bincount(reason.astype(np.int64), minlength=len(REASON_CODES) + 1)
    quarantined = int(per_code[1:].sum())
    return {
        "file": str(src.path), "format": src.fmt, "encoding": src.encoding, "rows_read": len(reason),
        "rows_accepted": len(reason) - quarantined, "rows_quarantined": quarantined,
        "blank_lines": src.blank_lines,
        "reasons": {code: int(per_code[REASON_CODES.index(code) + 1]) for code in codes},
    }


def _no_valid_rows(src: _Source, counts: dict[str, Any]) -> IngestError:
    why = ", ".join(f"{k}={v}" for k, v in counts["reasons"].items() if v)
    return IngestError(f"{src.role} file {src.path}: no valid rows (0 of {counts['rows_read']} accepted; {why})")


# --------------------------------------------------------------------------------------------------------- hashing


def _hash_frame(h: Any, name: str, frame: pd.DataFrame, schema: pa.Schema) -> None:
    h.update(f"|table:{name}:{len(frame)}".encode())
    for f in schema:
        col = frame[f.name]
        h.update(f"|col:{f.name}".encode())
        if pa.types.is_string(f.type):
            tokens = (col.str.len().astype("Int64").astype("str") + ":" + col).fillna("~")
            h.update("".join(tokens.tolist()).encode("utf-8", "surrogatepass"))
        else:
            mask = col.isna().to_numpy(dtype=bool)
            values = col.to_numpy(dtype=np.float32 if pa.types.is_float32(f.type) else np.int64,
                                  na_value=0)
            h.update(np.packbits(mask).tobytes())
            h.update(values.astype(values.dtype.newbyteorder("<")).tobytes())


def _content_hash(ratings: pd.DataFrame, items: pd.DataFrame) -> str:
    """sha256 over the accepted ratings and items in canonical order (both frames are sorted by their ids)."""
    h = hashlib.sha256(_HASH_TAG)
    _hash_frame(h, "ratings", ratings, RATINGS_SCHEMA)
    _hash_frame(h, "items", items, ITEMS_SCHEMA)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ public API


def ingest(ratings_path: str | os.PathLike[str], items_path: str | os.PathLike[str],
           config: IngestConfig = IngestConfig()) -> IngestResult:
    """Read, validate and type one ratings file and one items file (see the module docstring for the formats).

    Bad rows are quarantined with a reason code (:data:`REASON_CODES`); ratings of items without an accepted items
    row are ``unknown_item``; for repeated (user, item) pairs the newest rating by timestamp (else the last in the
    file) is kept and the others are ``duplicate_superseded``; for repeated item ids the last row is kept. Items
    with an empty description are accepted with ``text=""`` and counted under ``empty_text``; descriptions longer
    than ``config.max_text_chars`` are truncated and counted under ``text_truncated``.

    Raises IngestError (naming the file) for an unreadable, empty, header-only or binary file, an unknown format,
    missing required columns, or a file with no valid rows.
    """
    items_src = _load(Path(items_path), "items", config)
    items, item_reason, item_extra = _validate_items(items_src, config)
    item_counts = _file_counts(items_src, item_reason, ITEM_REASONS) | item_extra
    if len(items) == 0:
        raise _no_valid_rows(items_src, item_counts)
    ratings_src = _load(Path(ratings_path), "ratings", config)
    ratings, rating_reason = _validate_ratings(ratings_src, items["item_id"], config)
    rating_counts = _file_counts(ratings_src, rating_reason, RATING_REASONS)
    if len(ratings) == 0:
        raise _no_valid_rows(ratings_src, rating_counts)
    quarantine = pd.concat([_quarantine(ratings_src, rating_reason), _quarantine(items_src, item_reason)],
                           ignore_index=True)
    quarantine = conform_frame(quarantine, QUARANTINE_SCHEMA)
    totals = {code: rating_counts["reasons"].get(code, 0) + item_counts["reasons"].get(code, 0)
              for code in REASON_CODES}
    counts = {"ratings": rating_counts, "items": item_counts, "reasons": totals}
    return IngestResult(ratings=ratings, items=items, quarantine=quarantine, counts=counts,
                        content_hash=_content_hash(ratings, items))


def write_parquet_atomic(frame: pd.DataFrame, path: Path, schema: pa.Schema | None = None) -> Path:
    """Write ``frame`` (without its index) to Parquet at ``path`` atomically: a temporary file in the same directory,
    fsynced, then ``os.replace``. With ``schema`` the frame is conformed to it first. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = frame_to_table(frame, schema) if schema is not None else pa.Table.from_pandas(frame, preserve_index=False)
    return write_file_atomic(path, lambda fh: pq.write_table(table, fh))
