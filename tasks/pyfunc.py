"""The served model: a pyfunc that MLflow loads *from code* (``tasks/mlflow_model.py``), so nothing is unpickled.

The model bundle directory (:mod:`convmf_core.persistence`) travels as the artifact ``bundle``; the training
ratings' (user, item) pairs, when given, travel as the artifact ``seen`` (``seen.parquet``, raw ids) so that
top-N lists leave out what a user has already rated.

Request shapes accepted by :class:`ConvMFPyfunc` (a pandas DataFrame, or the serving equivalent: a JSON body with
``dataframe_split`` or ``dataframe_records``). Columns: ``user_id``, ``item_id``, ``rating``, ``n``,
``description``; a row with a ``description`` *describes an item*, every other row is a *user row*.

* **top-N**: user rows with ``user_id`` and optionally ``n`` (1..1000) -> one row per recommendation, columns
  ``user_id, rank, item_id, score`` (rank 1 = best). A user listed twice gets one list, of the largest ``n`` given
  on the user's rows (10 when no row gives one).
* **rating prediction**: user rows with ``user_id`` and ``item_id`` -> the request rows plus ``prediction``.
* **fold-in**: user rows with ``user_id``, ``item_id`` and ``rating`` (a user's recent ratings, several rows per
  user, optionally ``n``) -> each such user's top-N, as for top-N. The user's factors are solved by eq. 7 against
  the model's fixed V (:func:`convmf_core.foldin.fold_in_users`, one k x k solve per user), so a user the model has
  never seen gets recommendations at once. A *known* user's new ratings are added to what the model knows: the
  items the user rated in training keep the model's own prediction as their target and the current u_i is the
  prior mean (exactly eq. 7 on old and new ratings together when u_i is the eq. 7 solution of the old ones); an
  item rated again counts with its new rating only. Items rated in the request (and, for a known user, in training)
  are left out of the list. A pair rated twice in a request keeps its last rating. Ratings must lie in the model's
  rating range; a request holds at most 10,000 ratings.
* **new items**: rows with ``item_id`` and ``description`` (``user_id`` empty) describe items the model does not
  know, at most 1,000 a request. They are scored from their text, theta_j = cnn(W, X_j) with the model's vocabulary
  and CNN and item bias c_j = 0 (what the model holds for its own unrated items), and take part in the request's
  top-N lists, fold-in ratings and rating predictions. A description of an item the model knows is ignored (the
  trained v_j already holds its text and its ratings). Only ConvMF models have a text CNN.

Which shape: ratings present -> fold-in; else ``item_id`` on the user rows -> rating prediction; else top-N. Ids may
be ints or strings either way: they are converted to the type of the model's id maps (``"42"`` finds user 42; ``7``
finds user ``"7"``); a new item's id must convert too.

Unknown ids (``params={"unknown_ids": "fallback"}``, the default): an unknown user is scored as the *average
known user* (the mean of the user factor rows, bias column included), so its top-N list is the items with the
highest mean predicted rating; an unknown item in a rating request is likewise the average item, and a fold-in
rating of an unknown (and undescribed) item is ignored. With ``params={"unknown_ids": "error"}`` any unknown id is
refused instead (fold-in users excepted: being new is what fold-in is for). Malformed input (no ``user_id``, ids
that cannot be converted, a bad ``n`` or rating, a fold-in row without its rating, too many rows) raises
:class:`~mlflow.exceptions.MlflowException` with ``INVALID_PARAMETER_VALUE``, which MLflow's scoring server turns
into HTTP 400.
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
from convmf_core.foldin import FoldInError, ItemSide, NewItems, UserFactors, embed_new_items, fold_in_users
from convmf_core.models.als_mf import ALSFactorModel
from convmf_core.models.base import Recommender
from convmf_core.models.convmf import ConvMF
from convmf_core.persistence import load_model
from convmf_core.text import Vocabulary
from convmf_core.topn import top_n

DEFAULT_N = 10
MAX_N = 1000
MAX_FOLD_IN_RATINGS = 10_000
MAX_NEW_ITEMS = 1_000
UNKNOWN_IDS_MODES = ("fallback", "error")
_INT64_MAX = float(2 ** 63 - 1)


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
        bad = ~np.isfinite(numbers) | (numbers != np.round(numbers)) | (np.abs(numbers) >= _INT64_MAX)
        if bad.any():
            examples = values[bad].head(3).tolist()
            raise _bad_input(f"column '{column}' must hold integer ids for this model, got e.g. {examples}")
        return numbers.astype(np.int64)
    if pd.api.types.is_float_dtype(values):
        numbers = values.to_numpy(dtype=np.float64)
        if (numbers != np.round(numbers)).any() or (np.abs(numbers) >= _INT64_MAX).any():
            raise _bad_input(f"column '{column}' holds non-integral numbers, not ids")
        values = pd.Series(numbers.astype(np.int64), index=values.index)
    converted = [str(v) if isinstance(v, (int, np.integer)) else v for v in values]
    if not all(isinstance(v, str) for v in converted):
        bad = [v for v in converted if not isinstance(v, str)][:3]
        raise _bad_input(f"column '{column}' must hold string or integer ids, got e.g. {bad}")
    return np.asarray(converted, dtype=object)


def _csr_rows(csr: CSR | None, rows: np.ndarray, n_cols: int) -> CSR:
    """The rows ``rows`` of ``csr`` (an empty row for index ``-1`` or when ``csr`` is None), ``n_cols`` wide."""
    rows = np.asarray(rows, dtype=np.int64)
    if csr is None:
        return CSR(np.zeros(len(rows) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64),
                   np.zeros(0, dtype=np.float32), len(rows), n_cols)
    safe = np.where(rows >= 0, rows, 0)
    starts = csr.indptr[safe]
    counts = np.where(rows >= 0, csr.indptr[safe + 1] - starts, 0)
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    flat = np.arange(int(indptr[-1]), dtype=np.int64) + np.repeat(starts - indptr[:-1], counts)
    return CSR(indptr, csr.indices[flat], csr.data[flat], len(rows), n_cols)


@dataclass(frozen=True, eq=False)
class _NewCatalogue:
    """The items a request describes that the model does not know: their ids and scoring rows."""

    raw_ids: np.ndarray  # object, canonical (converted) ids
    items: NewItems | None

    def __len__(self) -> int:
        return int(len(self.raw_ids))


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
    model: Recommender | None = None
    vocabulary: Vocabulary | None = None
    rating_range: tuple[float, float] | None = None

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
        rating_range = getattr(bundle.model, "rating_range_", None)
        return cls(bundle.user_map, bundle.item_map, users, items, float(factors.offset), factors.clip, exclude,
                   _id_kind(bundle.user_map), _id_kind(bundle.item_map), bundle.model, bundle.vocabulary,
                   None if rating_range is None else (float(rating_range[0]), float(rating_range[1])))

    @property
    def n_items(self) -> int:
        """Items the model knows (the average row excluded)."""
        return int(self.items.shape[0]) - 1

    def indices(self, values: pd.Series, column: str, unknown_ids: str) -> np.ndarray:
        """Dense indices of the request's ``user_id`` or ``item_id`` values; unknown ids get the "average" row."""
        return self.resolve(values, column, unknown_ids)[0]

    def resolve(self, values: pd.Series, column: str, unknown_ids: str) -> tuple[np.ndarray, pd.Series]:
        """(:meth:`indices`, the canonical raw ids): the map's own values for known ids, the request's converted
        to the map's type for unknown ones (so ``"42"`` and ``42`` are the same new user)."""
        id_map, kind = (self.user_map, self.user_kind) if column == "user_id" else (self.item_map, self.item_kind)
        ids = _coerce_ids(values, kind, column)
        idx = id_map.to_index(ids, unknown="minus_one")
        missing = idx < 0
        if missing.any():
            if unknown_ids == "error":
                examples = values[missing].head(5).tolist()
                raise _bad_input(f"{int(missing.sum())} unknown {column}(s), e.g. {examples}")
            idx[missing] = len(id_map)
        return idx, _raw(id_map, idx, pd.Series(ids, index=values.index, dtype=object))

    def item_indices(self, values: pd.Series, new: _NewCatalogue) -> np.ndarray:
        """Indices of ``item_id`` values among the model's items (0..M-1) then the request's new items (M..);
        ``-1`` for an id neither knows."""
        ids = _coerce_ids(values, self.item_kind, "item_id")
        idx = self.item_map.to_index(ids, unknown="minus_one")
        if len(new) and (idx < 0).any():
            in_new = pd.Index(new.raw_ids).get_indexer(ids[idx < 0])
            idx[idx < 0] = np.where(in_new >= 0, in_new + self.n_items, -1)
        return idx

    def describe(self, frame: pd.DataFrame) -> _NewCatalogue:
        """The request's new items (``item_id``, ``description`` rows) embedded by the CNN; known ids are skipped."""
        empty = _NewCatalogue(np.zeros(0, dtype=object), None)
        if frame.empty:
            return empty
        if len(frame) > MAX_NEW_ITEMS:
            raise _bad_input(f"a request may describe at most {MAX_NEW_ITEMS} items, got {len(frame)}")
        if "item_id" not in frame.columns or frame["item_id"].isna().any():
            raise _bad_input("every row with a description needs an item_id")
        ids = _coerce_ids(frame["item_id"], self.item_kind, "item_id")
        if len(pd.unique(pd.Series(ids))) < len(ids):
            dupes = pd.Series(ids)[pd.Series(ids).duplicated()].head(3).tolist()
            raise _bad_input(f"item(s) described twice in one request: {dupes}")
        new = self.item_map.to_index(ids, unknown="minus_one") < 0
        if not new.any():
            return empty
        if not isinstance(self.model, ConvMF) or self.vocabulary is None:
            raise _bad_input(f"this model ({type(self.model).__name__}) has no text CNN and vocabulary: it cannot "
                             "score items from their description")
        try:
            items = embed_new_items(self.model, frame["description"].to_numpy(dtype=object)[new].tolist(),
                                    self.vocabulary)
        except FoldInError as exc:
            raise _bad_input(str(exc)) from exc
        return _NewCatalogue(np.asarray(ids[new], dtype=object), items)

    def item_rows(self, new: _NewCatalogue) -> torch.Tensor:
        """Scoring rows of the model's items followed by the request's new items (no average row)."""
        if not len(new):
            return self.items[:-1]
        return torch.cat([self.items[:-1], new.items.scoring_rows().to(self.items.dtype)])

    def item_raw(self, new: _NewCatalogue) -> np.ndarray:
        """Raw ids by index of :meth:`item_rows`."""
        if not len(new):
            return self.item_map.raw_ids
        return np.concatenate([np.asarray(self.item_map.raw_ids, dtype=object), new.raw_ids])

    def rate(self, users: np.ndarray, items: np.ndarray, new: _NewCatalogue | None = None) -> np.ndarray:
        """Predicted ratings of (user, item) index pairs, as Recommender.predict computes them.

        ``items`` index the model's items, ``n_items`` the average item, and (with ``new``) ``n_items + 1 + t`` the
        request's new item t."""
        table = self.items if new is None or not len(new) else torch.cat(
            [self.items, new.items.scoring_rows().to(self.items.dtype)])
        u = torch.as_tensor(users, dtype=torch.int64)
        i = torch.as_tensor(items, dtype=torch.int64)
        pred = (self.users[u] * table[i]).sum(dim=1) + self.offset
        if self.clip is not None:
            pred = pred.clamp(*self.clip)
        return pred.numpy().astype(np.float32)

    def recommend(self, users: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n`` item indices and scores per user index (``-1`` / ``-inf`` padding), seen items excluded."""
        result = top_n(self.users, self.items[:-1], users, n, offset=self.offset, exclude=self.exclude)
        return result.items, result.scores

    def recommend_rows(self, user_rows: torch.Tensor, exclude: CSR, new: _NewCatalogue,
                       n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n`` of explicit user scoring rows over the model's and the request's new items."""
        result = top_n(user_rows.to(self.items.dtype), self.item_rows(new), np.arange(len(user_rows)), n,
                       offset=self.offset, exclude=exclude)
        return result.items, result.scores

    def fold_in(self, known: np.ndarray, users: np.ndarray, items: np.ndarray, values: np.ndarray,
                new: _NewCatalogue) -> tuple[UserFactors, CSR]:
        """eq. 7 for the request's users (``known[b]``: model index of user b or -1) from their ratings (``users``
        index 0..B-1, ``items`` index :meth:`item_rows`); returns the factors and what to exclude per user."""
        if not isinstance(self.model, ALSFactorModel):
            raise _bad_input(f"this model ({type(self.model).__name__}) cannot fold users in: fold-in needs an ALS "
                             "model (ConvMF or PMF)")
        side = ItemSide.of(self.model)
        if len(new):
            side = side.with_items(new.items)
        B, n_cols = len(known), side.n_items
        previous = UserFactors.of_model(self.model, known)
        history = _csr_rows(self.exclude, known, n_cols)
        ratings = Ratings(users, items, values, B, n_cols)
        folded = fold_in_users(side, ratings, previous=previous, history=history)
        exclude = Ratings(np.concatenate([users, np.repeat(np.arange(B), np.diff(history.indptr))]),
                          np.concatenate([items, history.indices]),
                          np.ones(len(users) + len(history.indices), dtype=np.float32), B, n_cols).csr()
        return folded, exclude


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
        """Top-N lists, rating predictions or fold-in top-N lists, with optional new-item descriptions."""
        if self._scorer is None:
            raise MlflowException("the model is not loaded: load it with mlflow.pyfunc.load_model")
        if isinstance(model_input, dict):
            try:
                model_input = pd.DataFrame(model_input)
            except (ValueError, TypeError) as exc:
                raise _bad_input(f"the input cannot be read as a table: {exc}") from exc
        if not isinstance(model_input, pd.DataFrame):
            raise _bad_input(f"expected a DataFrame with a 'user_id' column, got {type(model_input).__name__}")
        if "user_id" not in model_input.columns:
            raise _bad_input(f"the input needs a 'user_id' column; got columns {list(model_input.columns)}")
        unknown_ids = (params or {}).get("unknown_ids") or "fallback"
        if unknown_ids not in UNKNOWN_IDS_MODES:
            raise _bad_input(f"params.unknown_ids must be one of {UNKNOWN_IDS_MODES}, got {unknown_ids!r}")
        frame, described = _split_rows(model_input)
        if frame.empty and not described.empty:
            raise _bad_input("the request describes items but has no user row: add rows with a user_id")
        new = self._scorer.describe(described)
        if "rating" in frame.columns and frame["rating"].notna().any():
            return self._fold_in(frame, new, unknown_ids)
        if "item_id" in frame.columns and frame["item_id"].notna().any():
            return self._predict_ratings(frame, new, unknown_ids)
        return self._recommend(frame, new, unknown_ids)

    def _predict_ratings(self, frame: pd.DataFrame, new: _NewCatalogue, unknown_ids: str) -> pd.DataFrame:
        s = self._scorer
        users, raw_users = s.resolve(frame["user_id"], "user_id", unknown_ids)
        idx = s.item_indices(frame["item_id"], new)  # model items 0..M-1, the request's new items M..
        unknown = idx < 0
        if unknown.any() and unknown_ids == "error":
            examples = frame["item_id"][unknown].head(5).tolist()
            raise _bad_input(f"{int(unknown.sum())} unknown item_id(s), e.g. {examples}")
        raw_items = np.asarray(frame["item_id"].to_numpy(), dtype=object).copy()  # unknown ids keep their value
        raw_items[~unknown] = np.asarray(s.item_raw(new), dtype=object)[idx[~unknown]]
        # rate() puts the average item at M (an unknown id's row) and the new items after it.
        rate_idx = np.where(unknown, s.n_items, np.where(idx >= s.n_items, idx + 1, idx))
        return pd.DataFrame({"user_id": raw_users,
                             "item_id": pd.Series(raw_items, index=frame.index, dtype=object).infer_objects(),
                             "prediction": s.rate(users, rate_idx, new)}, index=frame.index)

    def _recommend(self, frame: pd.DataFrame, new: _NewCatalogue, unknown_ids: str) -> pd.DataFrame:
        s = self._scorer
        n = _request_n(frame)
        users, raw_users = s.resolve(frame["user_id"], "user_id", unknown_ids)
        # One list per distinct request id (the largest n asked for it), in order of first appearance.
        order = pd.DataFrame({"key": raw_users.to_numpy(dtype=object), "idx": users, "n": n})
        per_user = order.groupby("key", sort=False).agg(idx=("idx", "first"), n=("n", "max"))
        per_user["n"] = per_user["n"].fillna(DEFAULT_N).astype(np.int64)
        if per_user.empty:
            return _empty_top_n()
        # np.array copies: pandas' copy-on-write hands out read-only arrays, which torch warns about.
        idx = np.array(per_user["idx"], dtype=np.int64)
        if len(new):
            exclude = _csr_rows(s.exclude, idx, s.n_items + len(new))
            items, scores = s.recommend_rows(s.users[torch.as_tensor(idx)], exclude, new, int(per_user["n"].max()))
        else:
            items, scores = s.recommend(idx, int(per_user["n"].max()))
        return _top_n_frame(per_user.index.to_numpy(), per_user["n"].to_numpy(), items, scores, s.item_raw(new))

    def _fold_in(self, frame: pd.DataFrame, new: _NewCatalogue, unknown_ids: str) -> pd.DataFrame:
        s = self._scorer
        if len(frame) > MAX_FOLD_IN_RATINGS:
            raise _bad_input(f"a fold-in request may hold at most {MAX_FOLD_IN_RATINGS} ratings, got {len(frame)}")
        for column in ("item_id", "rating"):
            if column not in frame.columns or frame[column].isna().any():
                raise _bad_input(f"a fold-in request needs user_id, item_id and rating on every user row; "
                                 f"{column} is missing on some")
        values = _request_ratings(frame["rating"], s.rating_range)
        n = _request_n(frame)
        user_idx, raw_users = s.resolve(frame["user_id"], "user_id", "fallback")  # new users are welcome here
        items = s.item_indices(frame["item_id"], new)
        if (items < 0).any() and unknown_ids == "error":
            examples = frame["item_id"][items < 0].head(5).tolist()
            raise _bad_input(f"{int((items < 0).sum())} unknown item_id(s) (neither known nor described), "
                             f"e.g. {examples}")
        keys = pd.Series(raw_users.to_numpy(dtype=object))
        codes, uniques = pd.factorize(keys, sort=False)
        per_user_n = pd.Series(n).groupby(codes).max().fillna(DEFAULT_N).to_numpy(dtype=np.int64)
        known = np.full(len(uniques), -1, dtype=np.int64)
        first = pd.Series(np.arange(len(codes))).groupby(codes).first().to_numpy()
        known_idx = user_idx[first]
        known[known_idx < len(s.user_map)] = known_idx[known_idx < len(s.user_map)]
        usable = items >= 0  # ratings of items nobody knows carry nothing the model can use (fallback mode)
        folded, exclude = s.fold_in(known, codes[usable].astype(np.int64), items[usable], values[usable], new)
        top_items, scores = s.recommend_rows(folded.scoring_rows(), exclude, new, int(per_user_n.max()))
        return _top_n_frame(np.asarray(uniques, dtype=object), per_user_n, top_items, scores, s.item_raw(new))


def _split_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(user rows, item-description rows): a row with a non-empty ``description`` describes an item."""
    if "description" not in frame.columns:
        return frame, frame.iloc[:0]
    text = frame["description"]
    values = text.to_numpy(dtype=object)
    wrong = text.notna().to_numpy() & ~np.array([isinstance(v, str) for v in values], dtype=bool)
    if wrong.any():
        raise _bad_input(f"description must be text, got e.g. {text[wrong].head(3).tolist()}")
    present = np.array([isinstance(v, str) and bool(v.strip()) for v in values], dtype=bool)
    described = frame[present]
    if described["user_id"].notna().any():
        raise _bad_input("a row with a description describes an item: leave its user_id empty and send the "
                         "user's ratings or request as separate rows")
    return frame[~present].drop(columns=["description"]), described


def _empty_top_n() -> pd.DataFrame:
    return pd.DataFrame({"user_id": pd.Series([], dtype=object), "rank": pd.Series([], dtype=np.int64),
                         "item_id": pd.Series([], dtype=object), "score": pd.Series([], dtype=np.float32)})


def _top_n_frame(user_ids: np.ndarray, n: np.ndarray, items: np.ndarray, scores: np.ndarray,
                 item_raw: np.ndarray) -> pd.DataFrame:
    """Long top-N table: row r of ``items``/``scores`` is user ``user_ids[r]``'s list, cut to ``n[r]``."""
    if len(user_ids) == 0:
        return _empty_top_n()
    ranks = np.broadcast_to(np.arange(1, items.shape[1] + 1), items.shape)
    keep = (items >= 0) & (ranks <= np.asarray(n)[:, None])
    row = np.broadcast_to(np.arange(len(user_ids))[:, None], items.shape)[keep]
    return pd.DataFrame({"user_id": pd.Series(np.asarray(user_ids, dtype=object)[row], dtype=object).infer_objects(),
                         "rank": ranks[keep].astype(np.int64),
                         "item_id": pd.Series(np.asarray(item_raw, dtype=object)[items[keep]],
                                              dtype=object).infer_objects(),
                         "score": scores[keep].astype(np.float32)})


def _raw(id_map: IdMap, idx: np.ndarray, request: pd.Series) -> pd.Series:
    """Canonical raw ids (the map's own values, so ``"42"`` comes back as 42); an unknown id keeps its request value."""
    out = np.asarray(request.to_numpy(), dtype=object).copy()
    known = idx < len(id_map)
    out[known] = id_map.to_raw(idx[known])
    return pd.Series(out, index=request.index, dtype=object).infer_objects()


def _numbers(values: pd.Series, what: str) -> np.ndarray:
    """A column as float64 (NaN where missing); booleans and non-numbers are refused."""
    objects = values.to_numpy(dtype=object)
    if pd.api.types.is_bool_dtype(values) or any(isinstance(v, (bool, np.bool_)) for v in objects):
        raise _bad_input(f"{what} must be a number, got a boolean")
    try:
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise _bad_input(f"{what} must be a number, got e.g. {objects[:3].tolist()}") from exc
    return numbers


def _request_n(frame: pd.DataFrame) -> np.ndarray:
    """Each row's ``n`` as float64, NaN where the row gives none (a user's list takes the largest ``n`` given on
    their rows, :data:`DEFAULT_N` when none is)."""
    if "n" not in frame.columns:
        return np.full(len(frame), np.nan)
    missing = pd.isna(frame["n"]).to_numpy()
    n = _numbers(frame["n"], "n")
    bad = np.isnan(n) & ~missing  # present but not a number
    bad |= ~missing & ((n != np.round(n)) | (n < 1) | (n > MAX_N))
    if bad.any():
        raise _bad_input(f"n must be an integer in 1..{MAX_N}, got e.g. {frame['n'][bad].head(3).tolist()}")
    return n


def _request_ratings(values: pd.Series, rating_range: tuple[float, float] | None) -> np.ndarray:
    ratings = _numbers(values, "rating")
    bad = ~np.isfinite(ratings)
    if rating_range is not None:
        bad |= (ratings < rating_range[0]) | (ratings > rating_range[1])
    if bad.any():
        scale = "" if rating_range is None else f" within the model's rating range {list(rating_range)}"
        raise _bad_input(f"rating must be a finite number{scale}, got e.g. {values[bad].head(3).tolist()}")
    return ratings.astype(np.float32)


def model_signature() -> ModelSignature:
    """The pyfunc's signature: ``user_id`` required; ``item_id``, ``rating``, ``n`` and ``description`` optional;
    param ``unknown_ids``.

    Ids are ``AnyType`` so that MLflow passes ints and strings through unchanged and the model converts them to its
    id maps' type. ``n`` and ``rating`` are ``AnyType`` too, checked by the model: MLflow would truncate ``n=2.5``
    to 2, refuse a request in which some rows (item descriptions, or users happy with the default) leave ``n``
    empty, and refuse integer ratings (``4``) in a DataFrame for a double column.
    """
    inputs = Schema([ColSpec(AnyType(), "user_id"), ColSpec(AnyType(), "item_id", required=False),
                     ColSpec(AnyType(), "rating", required=False), ColSpec(AnyType(), "n", required=False),
                     ColSpec(AnyType(), "description", required=False)])
    outputs = Schema([ColSpec(AnyType(), "user_id"), ColSpec(AnyType(), "item_id"),
                      ColSpec(DataType.long, "rank", required=False), ColSpec(DataType.float, "score", required=False),
                      ColSpec(DataType.float, "prediction", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("unknown_ids", DataType.string, "fallback")]))
