"""Declared Arrow schemas of the tables the pipeline exchanges, and helpers to conform pandas frames to them.

Raw ids are kept as strings (MovieLens ids are integers, users' ids may be any text); the core maps them to dense
indices later (``convmf_core.data.IdMap``). In pandas, ``string`` fields use the default string dtype (``"str"``,
missing values are NaN), ``float32`` stays ``float32`` and a nullable ``int64`` becomes the nullable ``"Int64"``.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

RATINGS_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("rating", pa.float32(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=True),  # seconds since the Unix epoch (UTC), when known
    ]
)
"""One accepted rating per (user_id, item_id)."""

ITEMS_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=True),
        pa.field("text", pa.string(), nullable=False),  # the item description; may be "" (no text)
    ]
)
"""One item per item_id with its description text."""

QUARANTINE_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("source_file", pa.string(), nullable=False),
        # 1-based physical line where the record starts in a text file (the header is line 1); for Parquet, the
        # 1-based row number.
        pa.field("line", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.string(), nullable=False),  # the offending record as text
    ]
)
"""Rejected input rows, each with a reason code."""


def pandas_dtype(field: pa.Field) -> str:
    """The pandas dtype used in frames for an Arrow field of one of the declared schemas."""
    t = field.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_float32(t):
        return "float32"
    if pa.types.is_float64(t):
        return "float64"
    if pa.types.is_int64(t):
        return "Int64" if field.nullable else "int64"
    if pa.types.is_int32(t):
        return "Int32" if field.nullable else "int32"
    if pa.types.is_boolean(t):
        return "boolean" if field.nullable else "bool"
    raise TypeError(f"no pandas dtype declared for Arrow type {t} (field {field.name!r})")


def empty_frame(schema: pa.Schema) -> pd.DataFrame:
    """An empty DataFrame with the columns and dtypes of ``schema``."""
    return pd.DataFrame({f.name: pd.Series([], dtype=pandas_dtype(f)) for f in schema})


def conform_frame(frame: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    """Return a copy of ``frame`` with exactly the schema's columns, in order, cast to the schema's dtypes.

    Raises ValueError when a column is missing or a non-nullable column holds missing values.
    """
    missing = [f.name for f in schema if f.name not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {missing} required by the schema")
    out: dict[str, pd.Series] = {}
    for f in schema:
        col = frame[f.name]
        if not f.nullable and bool(col.isna().any()):
            raise ValueError(f"column {f.name!r} is not nullable but holds missing values")
        out[f.name] = col.astype(pandas_dtype(f))
    return pd.DataFrame(out, index=frame.index)


def frame_to_table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """Convert ``frame`` to an Arrow table with exactly ``schema`` (see :func:`conform_frame`), without the index."""
    conformed = conform_frame(frame, schema)
    return pa.Table.from_pandas(conformed, schema=schema, preserve_index=False)
