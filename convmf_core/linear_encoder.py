"""The ``linear`` text encoder: fixed document vectors and a ridge map refitted in closed form each outer iteration.

Document vector (computed once per fit; the vocabulary's ids, tf-idf as :func:`convmf_core.text.build_vocabulary`):

    x_j = sum_w tfidf(w, j) g_w / sum_w tfidf(w, j)      over the words w of item j that have a pretrained vector g_w
    tfidf(w, j) = count(w, j) / |j| * idf(w),   idf(w) = ln((1 + N) / (1 + df(w))) + 1

optionally followed by ``svd_dim`` components of a truncated SVD of the row-normalised tf-idf matrix (LSA), which
are the only features when no word vectors are available. Features are standardised over the items with text (the
word-vector part over the items with at least one word that has a vector). A document with no such word gets the
standardised value 0 (the mean document) in the word-vector part, as a document with no text does in every part: it
carries no information there, and the zero vector of the raw mean would be an arbitrary point far from the others.

Prior map, replacing the CNN's eq. 9 by a problem with a closed form: with t_j = [v_j, c_j] (c_j with the bias
channel), over the rated items with text F,

    (W, b) = argmin  sum_{j in F} w_j || t_j - W^T x_j - b ||^2 + alpha ||W||_F^2
    W = (X_c^T D X_c + alpha I)^-1 X_c^T D T_c,   b = t_bar - W^T x_bar        (eq. 9')

with D = diag(w_j), X_c, T_c centred by their w-weighted means x_bar, t_bar. The weights (ConvMF's item weights
w_j, or 1) are rescaled to mean 1 over the fitted items first, so alpha means the same with or without them. The
prior of eq. 8 is then theta_j = W^T x_j + b for every item with text, rated or not. One (f x f) solve: about a
millisecond on ML-100K.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from convmf_core.config import LinearEncoderConfig
from convmf_core.encoders import TextEncoder, heldout_split, r2_scores
from convmf_core.text import Documents

def inverse_document_frequency(documents: Documents, n_words: int) -> torch.Tensor:
    """idf(w) = ln((1 + N) / (1 + df(w))) + 1 for word ids 0..n_words (N = documents with text; id 0 unused)."""
    df = np.zeros(n_words + 1, dtype=np.float64)
    doc_of = np.repeat(np.arange(len(documents)), documents.lengths())
    pairs = np.unique(doc_of * (n_words + 1) + documents.ids)  # distinct (document, word)
    np.add.at(df, pairs % (n_words + 1), 1.0)
    n = float(documents.has_text().sum())
    return torch.as_tensor(np.log((1.0 + n) / (1.0 + df)) + 1.0, dtype=torch.float32)


def _token_weights(documents: Documents, idf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(document of each token, word id of each token, tfidf weight idf(w) / |j| of each token)."""
    lengths = documents.lengths()
    doc = torch.as_tensor(np.repeat(np.arange(len(documents)), lengths))
    ids = torch.as_tensor(documents.ids)
    weight = idf[ids] / torch.as_tensor(np.repeat(lengths, lengths), dtype=torch.float32).clamp_min(1.0)
    return doc, ids, weight


class DocumentFeatures:
    """x_j for any document encoded with the training vocabulary: word vectors, idf, SVD basis, standardisation."""

    def __init__(self, word_matrix: torch.Tensor | None, word_found: torch.Tensor | None, idf: torch.Tensor,
                 svd_basis: torch.Tensor | None, mean: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> None:
        self.word_matrix, self.word_found, self.idf, self.svd_basis = word_matrix, word_found, idf, svd_basis
        self.mean, self.scale = mean, scale

    @classmethod
    def fit(cls, documents: Documents, n_words: int, word_matrix: np.ndarray | None, word_found: np.ndarray | None,
            svd_dim: int, seed: int) -> "DocumentFeatures":
        """Features of the training documents' vocabulary: idf from ``documents``, the SVD basis when ``svd_dim``."""
        idf = inverse_document_frequency(documents, n_words)
        wm = None if word_matrix is None else torch.as_tensor(np.asarray(word_matrix, dtype=np.float32))
        found = None if word_found is None else torch.as_tensor(np.asarray(word_found, dtype=bool))
        basis = None
        if svd_dim > 0:
            rows = cls(None, None, idf, None)._tfidf_rows(documents)
            q = min(svd_dim, n_words, max(1, int(documents.has_text().sum())) - 1)
            if q >= 1:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    _, _, basis = torch.svd_lowrank(rows, q=q, niter=4)
        out = cls(wm, found, idf, basis)
        x, valid = out._raw_and_valid(documents)
        valid = valid.float()
        count = valid.sum(0)
        out.mean = (x * valid).sum(0) / count.clamp_min(1.0)  # 0 for a column no document informs
        var = (((x - out.mean) * valid) ** 2).sum(0) / (count - 1.0).clamp_min(1.0)
        out.scale = torch.where(count > 1, var.sqrt().clamp_min(1e-6), torch.ones_like(var))
        return out

    @property
    def n_features(self) -> int:
        """Length of x_j."""
        return (0 if self.word_matrix is None else int(self.word_matrix.shape[1])) + \
            (0 if self.svd_basis is None else int(self.svd_basis.shape[1]))

    def _tfidf_rows(self, documents: Documents) -> torch.Tensor:
        """The L2-normalised tf-idf rows as a sparse (n_docs x n_words + 1) tensor."""
        doc, ids, weight = _token_weights(documents, self.idf)
        m = torch.sparse_coo_tensor(torch.stack([doc, ids]), weight, (len(documents), self.idf.shape[0]),
                                check_invariants=False).coalesce()
        norms = torch.zeros(len(documents)).index_add_(0, m.indices()[0], m.values() ** 2).sqrt().clamp_min(1e-12)
        return torch.sparse_coo_tensor(m.indices(), m.values() / norms[m.indices()[0]], m.shape,
                                       check_invariants=False).coalesce()

    def _raw_and_valid(self, documents: Documents) -> tuple[torch.Tensor, torch.Tensor]:
        """Unstandardised features (n_docs x n_features; zeros for documents with no word) and where each carries
        information (bool): word-vector columns where the document has a word with a vector, SVD columns where it
        has text."""
        parts, valid = [], []
        if self.word_matrix is not None:
            doc, ids, weight = _token_weights(documents, self.idf)
            weight = weight * self.word_found[ids]  # words without a vector do not count
            total = torch.zeros(len(documents)).index_add_(0, doc, weight)
            summed = torch.zeros(len(documents), self.word_matrix.shape[1]).index_add_(
                0, doc, weight.unsqueeze(1) * self.word_matrix[ids])
            parts.append(summed / total.clamp_min(1e-12).unsqueeze(1))  # x_j: the tf-idf-weighted mean vector
            valid.append((total > 0).unsqueeze(1).expand(-1, self.word_matrix.shape[1]))
        if self.svd_basis is not None:
            parts.append(torch.sparse.mm(self._tfidf_rows(documents), self.svd_basis))
            has_text = torch.as_tensor(documents.has_text())
            valid.append(has_text.unsqueeze(1).expand(-1, self.svd_basis.shape[1]))
        if not parts:
            return torch.zeros(len(documents), 0), torch.zeros(len(documents), 0, dtype=torch.bool)
        return torch.cat(parts, 1), torch.cat(valid, 1)

    def raw(self, documents: Documents) -> torch.Tensor:
        """Unstandardised features (n_docs x n_features); zeros for documents with no word."""
        return self._raw_and_valid(documents)[0]

    def __call__(self, documents: Documents) -> torch.Tensor:
        """Standardised features: zero rows for documents with no word, zero word-vector columns for documents with
        no word that has a vector (module docstring)."""
        x, valid = self._raw_and_valid(documents)
        return (x - self.mean) / self.scale * valid

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors by name (absent parts left out)."""
        state = {"idf": self.idf, "mean": self.mean, "scale": self.scale}
        if self.word_matrix is not None:
            state.update(word_matrix=self.word_matrix, word_found=self.word_found)
        if self.svd_basis is not None:
            state["svd_basis"] = self.svd_basis
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "DocumentFeatures":
        """Inverse of :meth:`state_dict`."""
        return cls(state.get("word_matrix"), state.get("word_found"), state["idf"], state.get("svd_basis"),
                   state["mean"], state["scale"])


def fit_ridge_map(x: torch.Tensor, t: torch.Tensor, alpha: float,
                  weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """eq. 9' (module docstring): (W, b) minimising sum_j w_j ||t_j - W^T x_j - b||^2 + alpha ||W||^2, in float64,
    with ``weights`` rescaled to mean 1 first (w_j = n weights_j / sum(weights); None: all 1); b is not penalised."""
    x, t = x.double(), t.double()
    w = torch.ones(len(x), dtype=torch.float64) if weights is None else weights.double()
    w = w / w.sum().clamp_min(1e-12)
    x_bar, t_bar = w @ x, w @ t
    xc, tc = x - x_bar, t - t_bar
    gram = xc.T @ (w.unsqueeze(1) * xc) * len(x) + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    W = torch.linalg.solve(gram, xc.T @ (w.unsqueeze(1) * tc) * len(x))  # (X_c^T D X_c + alpha I)^-1 X_c^T D T_c
    # contiguous: torch.linalg.solve returns a column-major W, and a matmul with it rounds differently from one with
    # the same values in row-major order (a saved and reloaded model, whose tensors are made contiguous, would embed
    # documents ~1e-8 apart from the model that saved it)
    return W.float().contiguous(), (t_bar - x_bar @ W).float()


class LinearEncoder(TextEncoder):
    """Document vectors (module docstring) and a ridge map to [v_j, c_j], refitted in closed form (eq. 9')."""

    def __init__(self, features: DocumentFeatures, documents: Documents | None, n_factors: int, bias_channel: bool,
                 config: LinearEncoderConfig, device: torch.device | str = "cpu") -> None:
        self.features, self.config = features, config
        self.n_factors, self.output_dim = n_factors, n_factors + int(bias_channel)
        self.device = torch.device(device)
        self._x = None if documents is None else features(documents)  # training documents' features
        self.weight = torch.zeros(features.n_features, self.output_dim)
        self.intercept = torch.zeros(self.output_dim)

    def fit(self, targets: torch.Tensor, items: np.ndarray, weights: torch.Tensor | None,
            generator: torch.Generator, epochs: int | None, step: int) -> dict[str, float]:
        idx = torch.as_tensor(items)
        t = targets.detach().cpu()[idx]
        self.weight, self.intercept = fit_ridge_map(self._x[idx], t, self.config.alpha,
                                                    None if weights is None else weights.detach().cpu()[idx])
        fitted = self._x[idx] @ self.weight + self.intercept
        r2 = r2_scores(t, fitted, t.mean(0), self.n_factors)
        return {"prior_train_r2": r2["prior_heldout_r2"]}  # in-sample: the fit's own items

    def prior(self) -> torch.Tensor:
        return (self._x @ self.weight + self.intercept).to(self.device)

    def embed(self, documents: Documents) -> torch.Tensor:
        return self.features(documents) @ self.weight + self.intercept

    def heldout_r2(self, targets: torch.Tensor, items: np.ndarray, generator: torch.Generator) -> dict[str, float]:
        t_all = targets.detach().cpu()
        truth, pred, ref = [], [], []
        for fold in heldout_split(np.asarray(items), self.config.heldout_folds, generator):
            rest = np.setdiff1d(items, fold)
            W, b = fit_ridge_map(self._x[torch.as_tensor(rest)], t_all[torch.as_tensor(rest)], self.config.alpha)
            truth.append(t_all[torch.as_tensor(fold)])
            pred.append(self._x[torch.as_tensor(fold)] @ W + b)
            ref.append(t_all[torch.as_tensor(rest)].mean(0).expand(len(fold), -1))
        return r2_scores(torch.cat(truth), torch.cat(pred), torch.cat(ref), self.n_factors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"features.{k}": v for k, v in self.features.state_dict().items()},
                "weight": self.weight, "intercept": self.intercept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weight, self.intercept = state["weight"], state["intercept"]
        feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        if feats:
            self.features = DocumentFeatures.from_state(feats)
