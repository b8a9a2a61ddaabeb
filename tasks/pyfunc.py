"""The served model: a pyfunc that MLflow loads *from code* (``tasks/mlflow_model.py``), so nothing is unpickled.

The model bundle directory (:mod:`convmf_core.persistence`) travels as the artifact ``bundle``; the training
ratings' (user, item) pairs, when given, travel as the artifact ``seen`` (``seen.parquet``, raw ids) so that
top-N lists leave out what a user has already rated.

Request shapes accepted by :class:`ConvMFPyfunc` (a pandas DataFrame, or the serving equivalent):

* **top-N**: column ``user_id`` and optionally ``n`` (default 10, 1..1000) -> one row per recommendation,
  columns ``user_id, rank, item_id, score`` (rank 1 = best). A user listed twice gets one list (the largest n).
* **rating prediction**: columns ``user_id`` and ``item_id`` -> the request rows plus ``prediction``.

The presence of an ``item_id`` column selects rating prediction. Ids may be ints or strings either way: they are
converted to the type of the model's id maps (``"42"`` finds user 42; ``7`` finds user ``"7"``).

Unknown ids (``params={"unknown_ids": "fallback"}``, the default): an unknown user is scored as the *average
known user* (the mean of the user factor rows, bias column included), so its top-N list is the items with the
highest mean predicted rating; an unknown item in a rating request is likewise the average item. With
``params={"unknown_ids": "error"}`` any unknown id is refused instead. Malformed input (no ``user_id``, ids that
cannot be converted, a bad ``n``) raises :class:`~mlflow.exceptions.MlflowException` with
``INVALID_PARAMETER_VALUE``, which MLflow's scoring server turns into HTTP 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import DataType
from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

from convmf_core.data import CSR, IdMap, Ratings
from convmf_core.persistence import load_model
from convmf_core.topn import top_n

DEFAULT_N = 10
MAX_N = 1000
UNKNOWN_IDS_MODES = ("fallback", "error")




def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _id_kind(id_map: IdMap) -> str:
    """``"int"`` or ``"str"`` when every raw id of the map is of that type, else ``"mixed"``."""
    kind = id_map.raw_ids.dtype.kind
    if kind in "iu":
        return "int"
    if kind in "US" or all(isinstance(v, str) for v in id_map.raw_ids):
        return "str"
    return "mixed"


def _coerce_ids(values: pd.Series, kind: str, column: str) -> np.ndarray:
    """Request ids converted to the id map's type (``kind`` from :func:`_id_kind`); a mixed map takes them as is."""
    if values.isna().any():
        raise _bad_input(f"column '{column}' has missing values")
    if pd.api.types.is_bool_dtype(values) or (
            values.dtype == object and any(isinstance(v, (bool, np.bool_)) for v in values)):
        raise _bad_input(f"column '{column}' holds booleans, not ids")
    if kind == "mixed":
        return np.asarray(values.to_numpy(), dtype=object)
    if kind == "int":
        if pd.api.types.is_integer_dtype(values):
            return values.to_numpy(dtype=np.int64)
        as_text = values if pd.api.types.is_float_dtype(values) else values.astype(str).str.strip()
        numbers = pd.to_numeric(as_text, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(numbers) | (numbers != np.round(numbers))
        if bad.any():
            examples = values[bad].head(3).tolist()
            raise _bad_input(f"column '{column}' must hold integer ids for this model, got e.g. {examples}")
        return numbers.astype(np.int64)
    if pd.api.types.is_float_dtype(values):
        numbers = values.to_numpy(dtype=np.float64)
        if (numbers != np.round(numbers)).any():
            raise _bad_input(f"column '{column}' holds non-integral numbers, not ids")
        values = pd.Series(numbers.astype(np.int64), index=values.index)
    converted = [str(v) if isinstance(v, (int, np.integer)) else v for v in values]
    if not all(isinstance(v, str) for v in converted):
        bad = [v for v in converted if not isinstance(v, str)][:3]
        raise _bad_input(f"column '{column}' must hold string or integer ids, got e.g. {bad}")
    return np.asarray(converted, dtype=object)


@dataclass(frozen=True)
class _Scorer:
    """What the pyfunc needs at predict time: factor matrices with one extra "average" row each."""

    user_map: IdMap
    item_map: IdMap
    users: torch.Tensor  # [n_users + 1, d]; the last row is the average user
    items: torch.Tensor  # [n_items + 1, d]; the last row is the average item
    offset: float
    clip: tuple[float, float] | None
    exclude: CSR | None  # rows: n_users + 1 (the average user excludes nothing)
    user_kind: str  # "int", "str" or "mixed": how request ids are converted
    item_kind: str

    @classmethod
    def load(cls, bundle_dir: Path, seen_path: Path | None) -> "_Scorer":
        """Load the bundle (checksums verified, no unpickling) and the optional seen pairs."""
        bundle = load_model(bundle_dir)
        if bundle.user_map is None or bundle.item_map is None:
            raise MlflowException(f"the model bundle {bundle_dir} has no id maps; save it with user_map and item_map")
        factors = bundle.model.scoring_factors()
        users = torch.cat([factors.user, factors.user.mean(dim=0, keepdim=True)])
        items = torch.cat([factors.item, factors.item.mean(dim=0, keepdim=True)])
        n_users, n_items = int(factors.user.shape[0]), int(factors.item.shape[0])
        exclude = None
        if seen_path is not None:
            seen = pd.read_parquet(seen_path, columns=["user_id", "item_id"])
            u = bundle.user_map.to_index(seen["user_id"].to_numpy(), unknown="minus_one")
            i = bundle.item_map.to_index(seen["item_id"].to_numpy(), unknown="minus_one")
            keep = (u >= 0) & (i >= 0)
            exclude = Ratings(u[keep], i[keep], np.ones(int(keep.sum()), dtype=np.float32),
                              n_users + 1, n_items).csr()
        return cls(bundle.user_map, bundle.item_map, users, items, float(factors.offset), factors.clip, exclude,
                   _id_kind(bundle.user_map), _id_kind(bundle.item_map))

    def indices(self, values: pd.Series, column: str, unknown_ids: str) -> np.ndarray:
        """Dense indices of the request's ``user_id`` or ``item_id`` values; unknown ids get the "average" row."""
        id_map, kind = (self.user_map, self.user_kind) if column == "user_id" else (self.item_map, self.item_kind)
        idx = id_map.to_index(_coerce_ids(values, kind, column), unknown="minus_one")
        missing = idx < 0
        if missing.any():
            if unknown_ids == "error":
                examples = values[missing].head(5).tolist()
                raise _bad_input(f"{int(missing.sum())} unknown {column}(s), e.g. {examples}")
            idx[missing] = len(id_map)
        return idx

    def rate(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Predicted ratings of (user, item) index pairs, as Recommender.predict computes them."""
        u = torch.as_tensor(users, dtype=torch.int64)
        i = torch.as_tensor(items, dtype=torch.int64)
        pred = (self.users[u] * self.items[i]).sum(dim=1) + self.offset
        if self.clip is not None:
            pred = pred.clamp(*self.clip)
        return pred.numpy().astype(np.float32)

    def recommend(self, users: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n`` item indices and scores per user index (``-1`` / ``-inf`` padding), seen items excluded."""
        result = top_n(self.users, self.items[:-1], users, n, offset=self.offset, exclude=self.exclude)
        return result.items, result.scores


class ConvMFPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc serving a ConvMF/PMF/SGDMF bundle on raw ids; see the module docstring for the request shapes."""

    def __init__(self) -> None:
        self._scorer: _Scorer | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the ``bundle`` artifact (and the optional ``seen`` artifact) once per process."""
        seen = context.artifacts.get("seen")
        self._scorer = _Scorer.load(Path(context.artifacts["bundle"]), Path(seen) if seen else None)

    def predict(self, context: mlflow.pyfunc.PythonModelContext | None, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Top-N lists (no ``item_id`` column) or rating predictions (``user_id`` and ``item_id`` columns)."""
        if self._scorer is None:
            raise MlflowException("the model is not loaded: load it with mlflow.pyfunc.load_model")
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if not isinstance(model_input, pd.DataFrame):
            raise _bad_input(f"expected a DataFrame with a 'user_id' column, got {type(model_input).__name__}")
        if "user_id" not in model_input.columns:
            raise _bad_input(f"the input needs a 'user_id' column; got columns {list(model_input.columns)}")
        unknown_ids = (params or {}).get("unknown_ids") or "fallback"
        if unknown_ids not in UNKNOWN_IDS_MODES:
            raise _bad_input(f"params.unknown_ids must be one of {UNKNOWN_IDS_MODES}, got {unknown_ids!r}")
        if "item_id" in model_input.columns:
            return self._predict_ratings(model_input, unknown_ids)
        return self._recommend(model_input, unknown_ids)

    def _predict_ratings(self, frame: pd.DataFrame, unknown_ids: str) -> pd.DataFrame:
        s = self._scorer
        users = s.indices(frame["user_id"], "user_id", unknown_ids)
        items = s.indices(frame["item_id"], "item_id", unknown_ids)
        return pd.DataFrame({"user_id": _raw(s.user_map, users, frame["user_id"]),
                             "item_id": _raw(s.item_map, items, frame["item_id"]),
                             "prediction": s.rate(users, items)}, index=frame.index)

    def _recommend(self, frame: pd.DataFrame, unknown_ids: str) -> pd.DataFrame:
        s = self._scorer
        n = _request_n(frame)
        users = s.indices(frame["user_id"], "user_id", unknown_ids)
        raw_users = _raw(s.user_map, users, frame["user_id"])
        # One list per distinct request id (the largest n asked for it), in order of first appearance.
        order = pd.DataFrame({"key": raw_users.to_numpy(dtype=object), "idx": users, "n": n})
        per_user = order.groupby("key", sort=False).agg(idx=("idx", "first"), n=("n", "max"))
        columns = {"user_id": pd.Series([], dtype=object), "rank": pd.Series([], dtype=np.int64),
                   "item_id": pd.Series([], dtype=object), "score": pd.Series([], dtype=np.float32)}
        if per_user.empty:
            return pd.DataFrame(columns)
        # np.array copies: pandas' copy-on-write hands out read-only arrays, which torch warns about.
        items, scores = s.recommend(np.array(per_user["idx"], dtype=np.int64), int(per_user["n"].max()))
        ranks = np.broadcast_to(np.arange(1, items.shape[1] + 1), items.shape)
        keep = (items >= 0) & (ranks <= per_user["n"].to_numpy()[:, None])
        row = np.broadcast_to(np.arange(len(per_user))[:, None], items.shape)[keep]
        return pd.DataFrame({"user_id": pd.Series(per_user.index.to_numpy()[row], dtype=object).infer_objects(),
                             "rank": ranks[keep].astype(np.int64),
                             "item_id": s.item_map.to_raw(items[keep]),
                             "score": scores[keep].astype(np.float32)})


def _raw(id_map: IdMap, idx: np.ndarray, request: pd.Series) -> pd.Series:
    """Canonical raw ids (the map's own values, so ``"42"`` comes back as 42); an unknown id keeps its request value."""
    out = np.asarray(request.to_numpy(), dtype=object).copy()
    known = idx < len(id_map)
    out[known] = id_map.to_raw(idx[known])
    return pd.Series(out, index=request.index, dtype=object).infer_objects()


def _request_n(frame: pd.DataFrame) -> np.ndarray:
    if "n" not in frame.columns:
        return np.full(len(frame), DEFAULT_N, dtype=np.int64)
    missing = pd.isna(frame["n"]).to_numpy()
    n = pd.to_numeric(frame["n"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(n) & ~missing  # present but not a number
    n = np.where(missing, DEFAULT_N, n)
    bad |= (n != np.round(n)) | (n < 1) | (n > MAX_N)
    if bad.any():
        raise _bad_input(f"n must be an integer in 1..{MAX_N}, got e.g. {frame['n'][bad].head(3).tolist()}")
    return n.astype(np.int64)

def model_signature() -> ModelSignature:
    """The pyfunc's signature: ``user_id`` required; ``item_id`` and ``n`` optional; param ``unknown_ids``.

    Ids are ``AnyType`` so that MLflow passes ints and strings through unchanged and the model converts them to its
    id maps' type; ``n`` is a long, so MLflow refuses a non-integer ``n`` before the model sees it.
    """
    inputs = Schema([ColSpec(AnyType(), "user_id"), ColSpec(AnyType(), "item_id", required=False),
                     ColSpec(DataType.long, "n", required=False)])
    outputs = Schema([ColSpec(AnyType(), "user_id"), ColSpec(AnyType(), "item_id"),
                      ColSpec(DataType.long, "rank", required=False), ColSpec(DataType.float, "score", required=False),
                      ColSpec(DataType.float, "prediction", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("unknown_ids", DataType.string, "fallback")]))
