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

Errors name the file, and the line where there is one (a byte that cannot be decoded, a quote never closed). A row
with more fields than the header is ``malformed_row`` when any extra field is non-empty (up to 64 extra fields
are looked at).

Large ratings files (``IngestConfig.stream_min_bytes``, 64 MiB by default) are read in batches: text is decoded
incrementally (``auto`` first checks that the whole file is UTF-8, else reads it as Latin-1, as for a small file)
and cut at line ends into batches of about ``stream_block_bytes``; a delimited batch that ends inside a quoted
field is extended until it parses, and the header is put before every batch, so each batch is parsed by the same
code and gives the records, lines and raw text of a whole-file parse. Parquet is read with
``ParquetFile.iter_batches``. Every batch gets the same row checks; only the valid rows' ids (Arrow strings),
rating, time and line are kept, and superseded duplicates are resolved over all batches at the end (their raw text
is read again from the file). The outcome is the same as reading the file whole (tested on every format). JSON
lines are always read whole (their columns are the keys of all lines).
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
from typing import Any, Callable, Iterator, Literal, get_args

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
_HASH_ROWS = 1 << 20  # rows per slice of a string column when hashing
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

    Ratings files of at least ``stream_min_bytes`` are read in batches (text: about ``stream_block_bytes`` of text
    per batch, cut at record boundaries; Parquet: ``stream_batch_rows`` rows per batch) so memory stays bounded by
    the accepted rows, not the file; each batch goes through the same parsing and validation code as a small file,
    and the outcome (rows, quarantine, counts, hash) is the same. JSON lines and item files are always read whole.
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
    stream_min_bytes: int = 64 * 2**20  # ~2.5M CSV ratings; read whole, such a file takes ~1 GB
    stream_block_bytes: int = 16 * 2**20
    stream_batch_rows: int = 1_000_000

    def __post_init__(self) -> None:
        """Reject settings that cannot work."""
        lo, hi = float(self.rating_min), float(self.rating_max)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"rating scale must be finite with rating_min < rating_max, got [{lo}, {hi}]")
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; expected one of {FORMATS}")
        if int(self.max_text_chars) < 1:
            raise ValueError(f"max_text_chars must be positive, got {self.max_text_chars}")
        if int(self.stream_min_bytes) < 0 or int(self.stream_block_bytes) < 1 or int(self.stream_batch_rows) < 1:
            raise ValueError(f"stream_min_bytes must be >= 0, stream_block_bytes and stream_batch_rows positive; got "
                             f"{self.stream_min_bytes}, {self.stream_block_bytes}, {self.stream_batch_rows}")
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
    last: np.ndarray | None = None  # int64, last physical line of each record when it may span lines
    header_lines: int = 1  # physical lines of the header record (delimited text)


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
    last: np.ndarray | None = None


class _Unterminated(IngestError):
    """A quoted field runs to the end of the text (internal: a batch cut inside a record is extended)."""


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


def _encodings(head: bytes, encoding: str) -> list[str]:
    """Codecs to try in turn (``auto``: UTF-16 with its BOM, else UTF-8 with or without BOM, else Latin-1)."""
    if encoding == "auto":
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return ["utf-16"]
        return ["utf-8-sig", "latin-1"]
    return ["utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding]


def _reject_binary(head: bytes, path: Path, role: str, codec: str) -> None:
    """IngestError when the first bytes show a compressed/binary file (magic numbers, NUL bytes in 8-bit text)."""
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            raise IngestError(f"{role} file {path}: is binary ({what}), not text; convert or decompress it first")
    wide = codecs.lookup(codec).name.startswith(("utf-16", "utf-32"))
    if not wide and b"\x00" in head[:65536]:
        raise IngestError(f"{role} file {path}: is binary (holds NUL bytes), not text")


def _reject_controls(sample: str, path: Path, role: str) -> None:
    """IngestError when the first decoded characters are mostly control characters (binary read as text)."""
    sample = sample[:65536]
    controls = len(re.findall(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]", sample))
    if controls > 0.05 * max(len(sample), 1):
        raise IngestError(f"{role} file {path}: looks binary ({controls} control characters in the first "
                          f"{len(sample)}), not text")


def _public_encoding(codec: str) -> str:
    return "utf-8" if codec == "utf-8-sig" else codec


def _decode(data: bytes, path: Path, role: str, encoding: str) -> tuple[str, str]:
    """Decode ``data``; reject binary content. Returns (text with '\\n' line ends, encoding used)."""
    candidates = _encodings(data, encoding)
    _reject_binary(data, path, role, candidates[0])
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
        line = data.count(b"\n", 0, err.start) + 1
        raise IngestError(f"{role} file {path}: cannot be decoded as {encoding} at line {line} ({err})")
    _reject_controls(text, path, role)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise IngestError(f"{role} file {path}: is empty")
    return text, _public_encoding(used)


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


_EXTRA_FIELDS = 64  # fields beyond the header's read when a row has too many (a non-empty one makes it malformed;
#                     a row with more fields whose first 64 extra ones are all empty is not seen as malformed)


def _read_fields(text: str, width: int, options: dict[str, Any], nrows: int | None = None) -> pd.DataFrame:
    """All records of ``text`` as columns 0.. of strings: the header's ``width`` plus one, or more (up to
    ``width + _EXTRA_FIELDS``) when a row has more fields."""
    try:
        return pd.read_csv(io.StringIO(text), names=list(range(width + 1)), nrows=nrows, **options)
    except pd.errors.ParserError as exc:
        saw = re.search(r"Expected \d+ fields in line \d+, saw (\d+)", str(exc))
        if saw is None:
            raise
        # usecols refuses more names than the widest row has, and says how many that is: then ask for those.
        wide = list(range(width + _EXTRA_FIELDS))
        try:
            return pd.read_csv(io.StringIO(text), names=wide, usecols=wide, low_memory=False, nrows=nrows, **options)
        except ValueError as again:  # pandas' ParserError is a ValueError too
            found = re.search(r"Too many columns specified: expected \d+ and found (\d+)", str(again))
            if found is None:
                raise
            wide = list(range(max(width + 1, int(found.group(1)))))
            return pd.read_csv(io.StringIO(text), names=wide, usecols=wide, low_memory=False, nrows=nrows, **options)


def _record_line(text: str, record: int, width: int, options: dict[str, Any]) -> int:
    """The physical line on which record ``record`` (0-based, the header is record 0) of ``text`` starts."""
    try:
        head = _read_fields(text, width, options, nrows=record)
    except (pd.errors.ParserError, ValueError):
        return record + 1  # as if no field held a newline
    newlines = sum(int(head[c].str.count("\n").sum()) for c in head.columns)
    return record + newlines + 1


def _parse_delimited(text: str, path: Path, role: str, sep: str, quoting: int, line_offset: int = 0) -> _Rows:
    """Split a delimited text with a header row (pandas' C parser, every field read as a string).

    ``line_offset`` is added to the line numbers (a batch of a larger file, with the header prepended). Raises
    :class:`_Unterminated` when a quoted field is still open at the end of the text.
    """
    header_line = text.split("\n", 1)[0]
    width = max(len(_header_fields(header_line, sep, quoting)), 1)
    # One column more than the header: a non-empty value there marks a row with too many fields. A row with even
    # more fields makes the parser fail; then up to _EXTRA_FIELDS more columns are read (usecols tolerates rows
    # wider than that), and any non-empty one marks the row.
    options: dict[str, Any] = dict(sep=sep, header=None, dtype=str, na_filter=False, index_col=False,
                                   skip_blank_lines=False, quoting=quoting, engine="c")
    try:
        frame = _read_fields(text, width, options)
    except (pd.errors.ParserError, ValueError) as exc:
        message = f"{role} file {path}: cannot be parsed as delimited text ({str(exc).strip()})"
        open_quote = re.search(r"EOF inside string starting at row (\d+)", str(exc))
        if open_quote:
            line = _record_line(text, int(open_quote.group(1)), width, options) + line_offset
            raise _Unterminated(f"{role} file {path}: line {line}: a quoted field opened in this record is never "
                                f"closed (an unmatched '\"')") from exc
        raise IngestError(message) from exc
    if len(frame) == 0:
        raise IngestError(f"{role} file {path}: is empty")
    ncols = frame.shape[1]
    cols = [frame[c] for c in range(ncols)]
    # Line numbers: each record starts one line after the previous one ended; quoted fields may hold newlines.
    nl = np.zeros(len(frame), dtype=np.int64)
    if quoting != csv.QUOTE_NONE and '"' in text:
        for col in cols:
            nl += col.str.count("\n").to_numpy(dtype=np.int64)
    start = 1 + np.arange(len(frame), dtype=np.int64) + np.concatenate([[0], np.cumsum(nl)[:-1]])
    end = start + nl
    header_lines = int(nl[0]) + 1
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
    for c in range(ncols):
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
    malformed = np.zeros(len(body), dtype=bool)
    for c in range(width, ncols):
        malformed |= (body[c] != "").to_numpy(dtype=bool)
    data = {name: body[i] for i, name in enumerate(names)}

    def raw(pos: np.ndarray) -> list[str]:
        return [lines.get(int(start[i]), int(end[i])) for i in pos]

    return _Rows(columns=names, get=lambda name, kind: data[name], n=len(body), line=start + line_offset,
                 malformed=malformed, raw=raw, blank_lines=n_blank, last=end + line_offset, header_lines=header_lines)


def _str_series(values: pa.Array | pa.ChunkedArray) -> pd.Series:
    """An Arrow string array as a pandas Series of the default string dtype."""
    return pd.Series(values, dtype="str")


def _split_lines(text: str, sep: str, names: list[str], greedy_middle: bool = False, line_offset: int = 0) -> _Rows:
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
    lineno = np.arange(1 + line_offset, len(everything) + 1 + line_offset, dtype=np.int64)[~blank]
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
        return _no_surrogates(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if id_like:  # 7.0 -> "7"; NaN / infinity are no id
            return (str(int(value)) if value.is_integer() else repr(value)) if math.isfinite(value) else None
        return repr(value)
    return _no_surrogates(json.dumps(value, ensure_ascii=False, default=str))


def _no_surrogates(text: str) -> str:
    """``text`` with lone surrogates (JSON escapes such as ``"\\ud800"``, not valid Unicode) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


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


def _arrow_text(col: pa.ChunkedArray | pa.Array, kind: str) -> pd.Series:
    """An Arrow column as strings (ids: integral floats without ".0", NaN none; date-times: epoch seconds).

    Every value is converted on its own, so a batch of a file gives the same strings as the whole file."""
    try:
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
            col = pc.if_else(pc.is_finite(col), col, pa.scalar(None, t))  # NaN / infinity -> null (an empty id)
        return _str_series(pc.cast(col, pa.string()))
    except (pa.ArrowException, ValueError, OverflowError):
        return pd.Series([_json_text(v, kind == "id") for v in _pylist(col)], dtype="str")


def _pylist(col: pa.ChunkedArray | pa.Array) -> list[Any]:
    """Python values of an Arrow column; a value Python cannot hold (a date-time out of range) as its text."""
    try:
        return col.to_pylist()
    except (pa.ArrowException, ValueError, OverflowError):
        return [_scalar_text(v) for v in col]


def _scalar_text(value: pa.Scalar) -> Any:
    """A Python value of an Arrow scalar; Arrow's text for one Python cannot hold (a date-time out of range)."""
    try:
        return value.as_py()
    except (pa.ArrowException, ValueError, OverflowError):
        try:
            return pa.array([value], value.type).cast(pa.string())[0].as_py()
        except (pa.ArrowException, ValueError, OverflowError):
            return f"<{value.type} value>"


def _parquet_rows(table: pa.Table, line_offset: int = 0) -> _Rows:
    """Records of a Parquet table (or one batch of it, ``line_offset`` rows into the file)."""

    def raw(pos: np.ndarray) -> list[str]:
        out = []
        for i in pos:
            row = {name: _scalar_text(table.column(name)[int(i)]) for name in table.column_names}
            out.append(json.dumps(row, ensure_ascii=False, default=str))
        return out

    n = table.num_rows
    return _Rows(columns=list(table.column_names), get=lambda name, kind: _arrow_text(table.column(name), kind),
                 n=n, line=np.arange(1 + line_offset, n + 1 + line_offset, dtype=np.int64),
                 malformed=np.zeros(n, dtype=bool), raw=raw)


def _parse_parquet(data: bytes, path: Path, role: str) -> _Rows:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IngestError(f"{role} file {path}: is not a readable Parquet file ({exc})") from exc
    return _parquet_rows(table)


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


_ML_SEPARATOR = {"ml100k-data": "\t", "ml1m-ratings": "::"}


def _delimiter(header_line: str, layout: str, role: str, config: IngestConfig) -> str:
    """The separator of a delimited layout: declared (tsv, MovieLens) or sniffed from the header line (csv)."""
    if layout == "mllatest-ratings":
        return ","
    default = "\t" if layout == "tsv" else ","
    if config.format == "tsv":
        return default
    return _sniff_delimiter(header_line, list(_required(role, config).values()), default)


def _columns(layout: str, role: str, config: IngestConfig) -> tuple[dict[str, ColumnSpec], dict[str, ColumnSpec]]:
    """(required, optional) source columns per canonical column of a ratings layout or a generic items layout."""
    if layout in ("ml100k-data", "ml1m-ratings"):
        return {c: c for c in RATINGS_SCHEMA.names}, {}
    if layout == "mllatest-ratings":
        return {"user_id": "userId", "item_id": "movieId", "rating": "rating"}, {"timestamp": "timestamp"}
    return _required(role, config), _optional(role, config)


def _load(path: Path, role: str, config: IngestConfig) -> _Source:
    """Read one file into canonical string columns."""
    data = _read_bytes(path, role)
    fmt, layout = _resolve_layout(path, role, config, data[:65536])
    encoding: str | None = None
    if layout == "parquet":
        rows = _parse_parquet(data, path, role)
        frame = _canonical(rows, path, role, *_columns(layout, role, config))
    else:
        text, encoding = _decode(data, path, role, config.encoding)
        if layout == "jsonl":
            rows = _parse_jsonl(text)
            frame = _canonical(rows, path, role, *_columns(layout, role, config))
        elif layout in ("csv", "tsv", "mllatest-ratings"):
            sep = _delimiter(text.split("\n", 1)[0], layout, role, config)
            rows = _parse_delimited(text, path, role, sep, csv.QUOTE_MINIMAL)
            frame = _canonical(rows, path, role, *_columns(layout, role, config))
        elif layout in ("ml100k-data", "ml1m-ratings"):
            rows = _split_lines(text, _ML_SEPARATOR[layout], list(RATINGS_SCHEMA.names))
            frame = _canonical(rows, path, role, *_columns(layout, role, config))
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
    return _source(rows, frame, path, role, fmt, encoding)


def _source(rows: _Rows, frame: pd.DataFrame, path: Path, role: str, fmt: str, encoding: str | None) -> _Source:
    return _Source(path=path, role=role, fmt=fmt, encoding=encoding, data=frame, line=rows.line,
                   malformed=np.asarray(rows.malformed, dtype=bool), raw=rows.raw, blank_lines=rows.blank_lines,
                   last=rows.last)


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


def _check_ratings(src: _Source, item_ids: pd.Index, config: IngestConfig
                   ) -> tuple[np.ndarray, pd.Series, pd.Series, np.ndarray, np.ndarray]:
    """The row-by-row checks of ratings (every reason but duplicates): (reason, user, item, rating, seconds)."""
    d = src.data
    reason = np.zeros(len(d), dtype=np.int8)
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
    return reason, user, item, rating, seconds


def _clip_raw(records: list[str]) -> list[str]:
    return [r if len(r) <= _RAW_MAX_CHARS else r[:_RAW_MAX_CHARS] + "...[truncated]" for r in records]


def _quarantine_frame(path: Path, line: np.ndarray, codes: list[str], raw: list[str]) -> pd.DataFrame:
    return pd.DataFrame({
        "source_file": pd.Series([str(path)] * len(line), dtype="str"),
        "line": np.asarray(line, dtype=np.int64),
        "reason": pd.Series(codes, dtype="str"),
        "raw": pd.Series(_clip_raw(raw), dtype="str"),
    })


def _quarantine(src: _Source, reason: np.ndarray) -> pd.DataFrame:
    pos = np.flatnonzero(reason)
    return _quarantine_frame(src.path, src.line[pos], [REASON_CODES[k - 1] for k in reason[pos].tolist()],
                             src.raw(pos))


def _counts(path: Path, fmt: str, encoding: str | None, per_code: np.ndarray, rows_read: int, blank_lines: int,
            codes: tuple[str, ...]) -> dict[str, Any]:
    """One file's entry of ``IngestResult.counts`` (``per_code[k]``: rows with reason k, 1-based)."""
    quarantined = int(per_code[1:].sum())
    return {
        "file": str(path), "format": fmt, "encoding": encoding, "rows_read": int(rows_read),
        "rows_accepted": int(rows_read) - quarantined, "rows_quarantined": quarantined, "blank_lines": int(blank_lines),
        "reasons": {code: int(per_code[REASON_CODES.index(code) + 1]) for code in codes},
    }


def _per_code(reason: np.ndarray) -> np.ndarray:
    return np.bincount(reason.astype(np.int64), minlength=len(REASON_CODES) + 1)


def _file_counts(src: _Source, reason: np.ndarray, codes: tuple[str, ...]) -> dict[str, Any]:
    return _counts(src.path, src.fmt, src.encoding, _per_code(reason), len(reason), src.blank_lines, codes)


def _no_valid_rows(role: str, path: Path, counts: dict[str, Any]) -> IngestError:
    why = ", ".join(f"{k}={v}" for k, v in counts["reasons"].items() if v)
    return IngestError(f"{role} file {path}: no valid rows (0 of {counts['rows_read']} accepted; {why})")


def _concat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    """Concatenate and empty ``parts`` (so that the pieces can be freed)."""
    out = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
    parts.clear()
    return out


def _dictionary_chunks(values: pd.Series) -> list[pa.DictionaryArray]:
    """``values`` (strings) dictionary-encoded, as a list of Arrow chunks."""
    encoded = pc.dictionary_encode(pa.array(values, type=pa.string()))
    return list(encoded.chunks) if isinstance(encoded, pa.ChunkedArray) else [encoded]


def _sorted_codes(parts: list[pa.DictionaryArray]) -> tuple[np.ndarray, pa.Array]:
    """(code of each value, the distinct values in ascending order) of dictionary-encoded batches: codes order as
    the values do (Unicode code points, as pandas sorts strings)."""
    if not parts:
        return np.zeros(0, np.int32), pa.array([], pa.string())
    encoded = pa.chunked_array(parts, pa.dictionary(pa.int32(), pa.string())).unify_dictionaries().combine_chunks()
    parts.clear()
    dictionary = encoded.dictionary
    order = pc.sort_indices(dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int32 if len(order) < 2**31 else np.int64)
    rank[order] = np.arange(len(order), dtype=rank.dtype)
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    return codes, dictionary.take(pa.array(order))


RawFetcher = Callable[[np.ndarray, np.ndarray], list[str]]  # (first lines, last lines), ascending -> records


class _RatingsAccumulator:
    """Validates ratings batch by batch, keeping only what the result needs (internal).

    Each batch gets the row checks of :func:`_check_ratings`; its rejected rows go to the quarantine at once, its
    valid rows are kept compactly (ids dictionary-encoded per batch, rating, seconds, line; the few records that
    span lines apart). Duplicates are resolved over all batches in :meth:`finish`, so a pair repeated in two
    batches is treated as in one file.
    """

    def __init__(self, path: Path, item_ids: pd.Index, config: IngestConfig) -> None:
        self.path, self.item_ids, self.config = path, item_ids, config
        self.per_code = np.zeros(len(REASON_CODES) + 1, dtype=np.int64)
        self.rows_read = 0
        self.blank_lines = 0
        self.quarantine: list[pd.DataFrame] = []
        self.user: list[pa.DictionaryArray] = []
        self.item: list[pa.DictionaryArray] = []
        self.rating: list[np.ndarray] = []
        self.seconds: list[np.ndarray] = []
        self.line: list[np.ndarray] = []
        self.multiline: list[tuple[np.ndarray, np.ndarray]] = []  # (line, last line) of records spanning lines

    def add(self, src: _Source) -> None:
        """Check one batch of records."""
        reason, user, item, rating, seconds = _check_ratings(src, self.item_ids, self.config)
        self.per_code += _per_code(reason)
        self.rows_read += len(reason)
        self.blank_lines += src.blank_lines
        if reason.any():
            self.quarantine.append(_quarantine(src, reason))
        ok = reason == 0
        self.user.extend(_dictionary_chunks(user[ok]))
        self.item.extend(_dictionary_chunks(item[ok]))
        self.rating.append(rating[ok].astype(np.float32))
        self.seconds.append(seconds[ok])
        self.line.append(src.line[ok])
        if src.last is not None:
            spans = ok & (src.last != src.line)
            if spans.any():
                self.multiline.append((src.line[spans], src.last[spans]))

    def _last_lines(self, first: np.ndarray) -> np.ndarray:
        """The last physical line of the records starting on lines ``first``."""
        last = first.copy()
        if self.multiline:
            starts = np.concatenate([m[0] for m in self.multiline])
            ends = np.concatenate([m[1] for m in self.multiline])
            at = np.clip(np.searchsorted(starts, first), 0, len(starts) - 1)
            hit = starts[at] == first
            last[hit] = ends[at[hit]]
        return last

    def finish(self, fmt: str, encoding: str | None, fetch_raw: RawFetcher
               ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
        """(accepted ratings sorted by (user_id, item_id), quarantine by line, counts) over all batches.

        Of the valid rows of a (user, item) pair the newest is kept (no timestamp = oldest; ties: the last line);
        the others are ``duplicate_superseded``, their raw records fetched with ``fetch_raw``.
        """
        # Sorted codes: ordering by (user code, item code) is ordering by (user_id, item_id). Arrays are freed as
        # soon as they are used up (this is the peak of a large ingest).
        u_code, u_uniq = _sorted_codes(self.user)
        i_code, i_uniq = _sorted_codes(self.item)
        n_items = max(len(i_uniq), 1)
        pair = u_code.astype(np.int64) * n_items + i_code
        del u_code, i_code
        seconds = _concat(self.seconds, np.float64)
        newest = np.where(np.isnan(seconds), -np.inf, seconds)
        # By pair, then age, then position in the file (lexsort is stable and the rows are in file order).
        order = np.lexsort((newest, pair))
        del newest
        pair = pair[order]
        keep = np.ones(len(order), dtype=bool)
        keep[:-1] = pair[1:] != pair[:-1]  # the last row of each pair in that order wins
        pair = pair[keep]
        kept, superseded = order[keep], np.sort(order[~keep])
        del order, keep
        line = _concat(self.line, np.int64)
        superseded_line = line[superseded]
        del line
        ratings = pd.DataFrame({
            "user_id": _str_series(u_uniq.take(pa.array(pair // n_items))),
            "item_id": _str_series(i_uniq.take(pa.array(pair % n_items))),
            "rating": _concat(self.rating, np.float32)[kept],
            "timestamp": pd.array(seconds[kept], dtype="Float64").astype("Int64"),
        })
        del pair, seconds, kept
        ratings = conform_frame(ratings, RATINGS_SCHEMA)
        self.per_code[REASON_CODES.index(DUPLICATE_SUPERSEDED) + 1] += len(superseded)
        parts = self.quarantine
        if len(superseded):
            parts = parts + [_quarantine_frame(self.path, superseded_line, [DUPLICATE_SUPERSEDED] * len(superseded),
                                               fetch_raw(superseded_line, self._last_lines(superseded_line)))]
        if parts:
            quarantine = pd.concat(parts, ignore_index=True)
            quarantine = quarantine.iloc[np.argsort(quarantine["line"].to_numpy(), kind="stable")]
            quarantine = quarantine.reset_index(drop=True)
        else:
            quarantine = _quarantine_frame(self.path, np.zeros(0, np.int64), [], [])
        counts = _counts(self.path, fmt, encoding, self.per_code, self.rows_read, self.blank_lines, RATING_REASONS)
        return ratings, quarantine, counts


# ------------------------------------------------------------------------------------------------------- streaming


def _open_error(path: Path, role: str, exc: OSError) -> IngestError:
    return IngestError(f"{role} file {path}: cannot be read ({exc.strerror or exc})")


def _head(path: Path, role: str, size: int = 4 * 65536) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError as exc:
        raise _open_error(path, role, exc) from exc


def _stream_codec(path: Path, role: str, encoding: str, head: bytes, block: int) -> str:
    """The codec for a large text file, with the small-file checks on its first bytes; ``auto`` reads the file
    once to check that it is UTF-8 throughout (else Latin-1, as for a small file)."""
    candidates = _encodings(head, encoding)
    _reject_binary(head, path, role, candidates[0])
    codec = candidates[0]
    if len(candidates) > 1:
        decoder = codecs.getincrementaldecoder(codec)()
        try:
            with open(path, "rb") as fh:
                while block_bytes := fh.read(max(block, 1 << 20)):
                    decoder.decode(block_bytes)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            codec = candidates[1]
        except OSError as exc:
            raise _open_error(path, role, exc) from exc
    try:
        sample = codecs.getincrementaldecoder(codec)().decode(head, final=len(head) < 4 * 65536)
    except UnicodeDecodeError:
        sample = ""  # reported with its line when the batch is read
    _reject_controls(sample, path, role)
    return codec


def _text_chunks(path: Path, role: str, codec: str, block: int) -> Iterator[str]:
    """The decoded text of a file with '\\n' line ends, in pieces of about ``block`` characters that each end with
    a line end (but the last); concatenated they are exactly what :func:`_decode` returns for the whole file."""
    decoder = codecs.getincrementaldecoder(codec)()
    carry, lines = "", 0
    try:
        with open(path, "rb") as fh:
            while True:
                data = fh.read(block)
                final = not data
                try:
                    text = carry + decoder.decode(data, final=final)
                except UnicodeDecodeError as exc:
                    at = lines + carry.count("\n") + data.count(b"\n", 0, max(exc.start, 0)) + 1
                    raise IngestError(f"{role} file {path}: cannot be decoded as {_public_encoding(codec)} near line "
                                      f"{at} ({exc})") from exc
                hold = ""
                if not final and text.endswith("\r"):  # maybe the first half of "\r\n"
                    text, hold = text[:-1], "\r"
                if "\r" in text:
                    text = text.replace("\r\n", "\n").replace("\r", "\n")
                if final:
                    if text:
                        yield text
                    return
                cut = text.rfind("\n") + 1
                carry = text[cut:] + hold
                if cut:
                    lines += text.count("\n", 0, cut)
                    yield text[:cut]
    except OSError as exc:
        raise _open_error(path, role, exc) from exc


def _delimited_batches(path: Path, role: str, codec: str, layout: str, config: IngestConfig,
                       quoting: int = csv.QUOTE_MINIMAL) -> Iterator[_Rows]:
    """Batches of a delimited text with a header: whole records, the header prepended to each batch after the first.

    A batch is parsed by :func:`_parse_delimited`; when it ends inside a quoted field (a record holding newlines cut
    at the batch end, or a stray quote) it is extended with the following text, doubling, until it parses, so every
    batch boundary is a record boundary of the whole file and the records are those of a whole-file parse.
    """
    chunks = _text_chunks(path, role, codec, config.stream_block_bytes)
    prefix: str | None = None  # the header record's lines, once known
    sep = ","
    base = 0  # physical lines before the pending text
    pending: list[str] = []
    pending_chars, need = 0, 0
    chunk = next(chunks, None)
    while chunk is not None:
        pending.append(chunk)
        pending_chars += len(chunk)
        chunk = next(chunks, None)
        at_end = chunk is None
        if pending_chars < need and not at_end:
            continue
        body = "".join(pending)
        if prefix is None:
            sep = _delimiter(body.split("\n", 1)[0], layout, role, config)
        try:
            if prefix is None:
                rows = _parse_delimited(body, path, role, sep, quoting)
            else:
                rows = _parse_delimited(prefix + body, path, role, sep, quoting, line_offset=base - prefix.count("\n"))
        except _Unterminated:
            if at_end:
                raise
            pending, need = [body], 2 * len(body)
            continue
        if prefix is None:
            prefix = "".join(line + "\n" for line in body.split("\n", rows.header_lines)[:rows.header_lines])
        base += body.count("\n")
        pending, pending_chars, need = [], 0, 0
        yield rows


def _parquet_file(path: Path, role: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IngestError(f"{role} file {path}: is not a readable Parquet file ({exc})") from exc


def _parquet_batches(path: Path, role: str, batch_rows: int) -> Iterator[tuple[pa.Table, int]]:
    """(table, rows before it) per batch of a Parquet file."""
    offset = 0
    batches = _parquet_file(path, role).iter_batches(batch_size=batch_rows)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise IngestError(f"{role} file {path}: is not a readable Parquet file ({exc})") from exc
        if batch is None:
            return
        yield pa.Table.from_batches([batch]), offset
        offset += batch.num_rows


def _fetch_text_records(path: Path, role: str, codec: str, block: int) -> RawFetcher:
    """Records of a text file by line range, read again from the file (physical lines first..last)."""

    def fetch(first: np.ndarray, last: np.ndarray) -> list[str]:
        out: list[str] = []
        k = 0
        window: list[str] = []
        window_start = 1  # line number of window[0]
        for chunk in _text_chunks(path, role, codec, block):
            if k == len(first):
                break
            lines = chunk.split("\n")
            if chunk.endswith("\n"):
                lines.pop()
            window = window + lines if window else lines
            window_end = window_start + len(window) - 1
            while k < len(first) and last[k] <= window_end:
                a, b = int(first[k]) - window_start, int(last[k]) - window_start
                out.append("\n".join(window[a:b + 1]))
                k += 1
            drop = (int(first[k]) - window_start) if k < len(first) else len(window)
            drop = max(0, min(drop, len(window)))
            window = window[drop:]
            window_start += drop
        out.extend("" for _ in range(len(first) - k))  # beyond the end: cannot happen for lines that were read
        return out

    return fetch


def _fetch_parquet_records(path: Path, role: str, batch_rows: int) -> RawFetcher:
    """Records of a Parquet file by row number, read again from the file."""

    def fetch(first: np.ndarray, last: np.ndarray) -> list[str]:
        out: list[str] = []
        k = 0
        for table, offset in _parquet_batches(path, role, batch_rows):
            end = offset + table.num_rows
            j = int(np.searchsorted(first, end, side="right"))
            if j > k:
                out.extend(_parquet_rows(table, offset).raw(first[k:j] - 1 - offset))
                k = j
            if k == len(first):
                break
        return out

    return fetch


def _stream_ratings(path: Path, config: IngestConfig, acc: _RatingsAccumulator) -> tuple[str, str | None, RawFetcher]:
    """Feed a large ratings file to ``acc`` batch by batch; returns (format, encoding, raw fetcher)."""
    role = "ratings"
    head = _head(path, role)
    fmt, layout = _resolve_layout(path, role, config, head[:65536])
    if layout == "jsonl":  # read whole: its columns are the union of the keys of all lines
        src = _load(path, role, config)
        acc.add(src)
        return src.fmt, src.encoding, _fetch_from(src)
    required, optional = _columns(layout, role, config)
    n = 0
    if layout == "parquet":
        for table, offset in _parquet_batches(path, role, config.stream_batch_rows):
            rows = _parquet_rows(table, offset)
            acc.add(_source(rows, _canonical(rows, path, role, required, optional), path, role, fmt, None))
            n += rows.n
        if n == 0:
            raise IngestError(f"{role} file {path}: has no data rows")
        return fmt, None, _fetch_parquet_records(path, role, config.stream_batch_rows)
    if len(head) < 4 * 65536 and not head.strip():  # the whole file is blank (as _read_bytes says)
        raise IngestError(f"{role} file {path}: is empty")
    codec = _stream_codec(path, role, config.encoding, head, config.stream_block_bytes)
    encoding = _public_encoding(codec)
    text_seen = False
    if layout in ("ml100k-data", "ml1m-ratings"):
        base = 0
        for chunk in _text_chunks(path, role, codec, config.stream_block_bytes):
            text_seen = text_seen or bool(chunk.strip())
            rows = _split_lines(chunk, _ML_SEPARATOR[layout], list(RATINGS_SCHEMA.names), line_offset=base)
            base += chunk.count("\n")
            acc.add(_source(rows, _canonical(rows, path, role, required, optional), path, role, fmt, encoding))
            n += rows.n
    else:
        for rows in _delimited_batches(path, role, codec, layout, config):
            text_seen = True
            acc.add(_source(rows, _canonical(rows, path, role, required, optional), path, role, fmt, encoding))
            n += rows.n
    if n == 0:
        raise IngestError(f"{role} file {path}: " + ("has no data rows" if text_seen else "is empty"))
    return fmt, encoding, _fetch_text_records(path, role, codec, config.stream_block_bytes)


def _fetch_from(src: _Source) -> RawFetcher:
    """Records of an in-memory source by first line."""
    return lambda first, last: src.raw(np.searchsorted(src.line, first))


def _ingest_ratings(path: Path, config: IngestConfig, item_ids: pd.Index
                    ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Read and validate a ratings file: whole when small, in batches from ``config.stream_min_bytes`` on."""
    role = "ratings"
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _open_error(path, role, exc) from exc
    acc = _RatingsAccumulator(path, item_ids, config)
    if size < config.stream_min_bytes or not path.is_file():
        src = _load(path, role, config)
        acc.add(src)
        fmt, encoding, fetch = src.fmt, src.encoding, _fetch_from(src)
    else:
        fmt, encoding, fetch = _stream_ratings(path, config, acc)
    return acc.finish(fmt, encoding, fetch)


# --------------------------------------------------------------------------------------------------------- hashing


def _hash_frame(h: Any, name: str, frame: pd.DataFrame, schema: pa.Schema) -> None:
    h.update(f"|table:{name}:{len(frame)}".encode())
    for f in schema:
        col = frame[f.name]
        h.update(f"|col:{f.name}".encode())
        if pa.types.is_string(f.type):
            for lo in range(0, len(col), _HASH_ROWS):  # in slices: the same bytes, bounded memory
                part = col.iloc[lo:lo + _HASH_ROWS]
                tokens = (part.str.len().astype("Int64").astype("str") + ":" + part).fillna("~")
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
        raise _no_valid_rows("items", items_src.path, item_counts)
    ratings, ratings_quarantine, rating_counts = _ingest_ratings(Path(ratings_path), config, pd.Index(items["item_id"]))
    if len(ratings) == 0:
        raise _no_valid_rows("ratings", Path(ratings_path), rating_counts)
    quarantine = pd.concat([ratings_quarantine, _quarantine(items_src, item_reason)], ignore_index=True)
    quarantine = conform_frame(quarantine, QUARANTINE_SCHEMA)
    totals = {code: rating_counts["reasons"].get(code, 0) + item_counts["reasons"].get(code, 0)
              for code in REASON_CODES}
    counts = {"ratings": rating_counts, "items": item_counts, "reasons": totals}
    return IngestResult(ratings=ratings, items=items, quarantine=quarantine, counts=counts,
                        content_hash=_content_hash(ratings, items))


def write_parquet_atomic(frame: pd.DataFrame, path: Path, schema: pa.Schema | None = None) -> Path:
    """Write ``frame`` (without its index) to Parquet at ``path`` atomically: a temporary file in the same directory,
    fsynced, then ``os.replace``. With ``schema`` the frame is conformed to it first. Returns ``path``."""
    table = frame_to_table(frame, schema) if schema is not None else pa.Table.from_pandas(frame, preserve_index=False)
    return write_file_atomic(path, lambda fh: pq.write_table(table, fh))
