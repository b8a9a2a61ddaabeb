"""Item text: one tokenizer, the paper's vocabulary, ragged word-id documents and pretrained word vectors.

Preprocessing follows Kim et al. (RecSys 2016, section 4.1) and fixes the bugs of the authors' code:

* one tokenizer (:func:`tokenize`) is used both to build the vocabulary and to encode documents, so capitalised
  words and words with punctuation attached are not lost when encoding;
* stop words are really removed (:data:`ENGLISH_STOP_WORDS`, built in, nothing is downloaded);
* the vocabulary keeps the words with the highest corpus-level tf-idf (defined in :func:`build_vocabulary`),
  not the most frequent ones;
* words outside the vocabulary are deleted from a document (no UNK token).

Documents are stored ragged (:class:`Documents`: flat ids + offsets); a minibatch is padded only to its own
longest document (:meth:`Documents.padded_batch`). Word id 0 is reserved for padding.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from functools import cached_property
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from convmf_core.config import TextConfig

__all__ = [
    "ENGLISH_STOP_WORDS",
    "PAD_ID",
    "Documents",
    "TermCounts",
    "Vocabulary",
    "build_vocabulary",
    "count_terms",
    "encode_documents",
    "load_word_vectors",
    "merge_term_counts",
    "tokenize",
    "vocabulary_from_counts",
]

PAD_ID: int = 0
"""Word id reserved for padding; real words have ids ``1..len(vocabulary)``."""

# A word: a run of unicode letters/digits (``[^\W_]`` is ``\w`` without the underscore), optionally joined by
# single internal apostrophes ("don't", "rock'n'roll"). Leading/trailing apostrophes (quotes) are not kept.
_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
# Typographic apostrophes are mapped to the ASCII one before matching.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'", "`": "'"})

_VOCAB_FORMAT = "convmf-vocabulary"
_VOCAB_VERSION = 1

ENGLISH_STOP_WORDS: frozenset[str] = frozenset(
    """
    a about above across after afterwards again against all almost alone along already also although always am
    among amongst an and another any anybody anyhow anyone anything anyway anyways anywhere are aren't around as
    at back be became because become becomes becoming been before beforehand behind being below beside besides
    between beyond both but by can can't cannot could couldn't did didn't do does doesn't doing don't done down
    during each either else elsewhere enough etc even ever every everybody everyone everything everywhere except
    few for former formerly from further furthermore had hadn't has hasn't have haven't having he he'd he'll he's
    hence her here here's hereafter hereby herein hereupon hers herself him himself his how how's however i i'd
    i'll i'm i've ie if in indeed instead into is isn't it it's its itself just least less let let's many may
    me meanwhile might mightn't mine more moreover most mostly much must mustn't my myself namely neither never
    nevertheless next no nobody none noone nor not nothing now nowhere of off often on once one only onto or
    other others otherwise ought our ours ourselves out over own per perhaps please quite rather really same
    seem seemed seeming seems several shall shan't she she'd she'll she's should shouldn't since so some
    somebody somehow someone something sometime sometimes somewhat somewhere still such than that that's the
    their theirs them themselves then thence there there's thereafter thereby therefore therein thereupon these
    they they'd they'll they're they've this those though through throughout thru thus till to together too
    toward towards under unless until up upon us very via was wasn't we we'd we'll we're we've well were
    weren't what what's whatever when when's whence whenever where where's whereafter whereas whereby wherein
    whereupon wherever whether which while whither who who's whoever whole whom whose why why's will with
    within without won't would wouldn't yet you you'd you'll you're you've your yours yourself yourselves
    ain't d ll m o re s t ve y ma vs amid beneath whilst unto thee thou thy ye
    ago get gets getting got gotten go goes going gone make makes made say says said see seen
    take takes took come comes came give gives gave put
    """.split()
)
"""Built-in English stop words (function words, pronouns, auxiliaries and their contractions), lower case."""


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def _normalise(text: object) -> str | None:
    """The text as a lower-case NFC string, or ``None`` when it is missing (None, NaN, pandas NA)."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        try:
            missing = bool(text != text)  # NaN (float or numpy)
        except (TypeError, ValueError):  # pandas.NA: its comparison has no truth value
            missing = True
        if missing:
            return None
        text = str(text)
    if not text:
        return None
    return unicodedata.normalize("NFC", text).translate(_APOSTROPHES).lower()


def _tokens(text: object, max_length: int | None) -> list[str]:
    """The first ``max_length`` tokens of ``text`` (all when ``None``); the single tokenizer of this module."""
    norm = _normalise(text)
    if norm is None:
        return []
    if max_length is None:
        return _WORD_RE.findall(norm)
    max_length = max(int(max_length), 0)
    if len(norm) <= 16 * max_length:  # short text: findall is faster than iterating over match objects
        return _WORD_RE.findall(norm)[:max_length]
    return [m.group() for m in islice(_WORD_RE.finditer(norm), max_length)]


def tokenize(text: str | float | None) -> list[str]:
    """Split ``text`` into lower-case words.

    A word is a run of unicode letters or digits, with internal apostrophes allowed ("don't"); everything else
    (punctuation, whitespace, underscores, hyphens) separates words. Text is NFC-normalised and typographic
    apostrophes are read as ``'``. ``None``, NaN, pandas NA and the empty string give ``[]``. This is the one
    tokenizer used both by :func:`build_vocabulary` and by :func:`encode_documents`.
    """
    return _tokens(text, None)


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of words; the id of ``words[i]`` is ``i + 1`` (id 0 is the padding id :data:`PAD_ID`).

    ``config`` records the :class:`TextConfig` the vocabulary was built with (``None`` when unknown); it is saved by
    :meth:`to_dict`. :meth:`index` returns ``-1`` for a word not in the vocabulary.
    """

    words: tuple[str, ...]
    config: TextConfig | None = None

    def __post_init__(self) -> None:
        words = tuple(self.words)
        object.__setattr__(self, "words", words)
        for w in words:
            if not isinstance(w, str) or not w:
                raise ValueError(f"vocabulary words must be non-empty strings, got {w!r}")
        if len(set(words)) != len(words):
            dupes = sorted(w for w, n in Counter(words).items() if n > 1)[:5]
            raise ValueError(f"vocabulary has duplicate words, e.g. {dupes}")

    @cached_property
    def _ids(self) -> dict[str, int]:
        # cached_property writes straight into the instance __dict__, which a frozen dataclass allows.
        return {w: i + 1 for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        """Number of words, without the padding id."""
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self._ids

    @property
    def size_with_padding(self) -> int:
        """Rows an embedding table needs: ``len(self) + 1`` (row 0 is padding)."""
        return len(self.words) + 1

    def index(self, word: str) -> int:
        """The id (``>= 1``) of ``word``, or ``-1`` when it is not in the vocabulary (the lookup is exact)."""
        return self._ids.get(word, -1)

    def word(self, word_id: int) -> str:
        """The word of id ``word_id`` (``1..len(self)``); raises IndexError otherwise (including the padding id)."""
        if not 1 <= word_id <= len(self.words):
            raise IndexError(f"word id {word_id} is not in 1..{len(self.words)}")
        return self.words[word_id - 1]

    def lookup(self, tokens: Iterable[str]) -> list[int]:
        """Ids of the tokens that are in the vocabulary, in order; other tokens are deleted (no UNK)."""
        ids = self._ids
        return [i for i in map(ids.get, tokens) if i is not None]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the words in id order and the text settings used to build them."""
        return {
            "format": _VOCAB_FORMAT,
            "version": _VOCAB_VERSION,
            "words": list(self.words),
            "text_config": None if self.config is None else asdict(self.config),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Vocabulary":
        """Rebuild a vocabulary from :meth:`to_dict` output."""
        if data.get("format") != _VOCAB_FORMAT:
            raise ValueError(f"not a vocabulary dict (format={data.get('format')!r})")
        if data.get("version") != _VOCAB_VERSION:
            raise ValueError(f"unsupported vocabulary version {data.get('version')!r} (expected {_VOCAB_VERSION})")
        cfg = data.get("text_config")
        config = None if cfg is None else TextConfig(**cfg)
        return cls(tuple(data["words"]), config)


def _check_config(config: TextConfig) -> None:
    if config.max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {config.max_length}")
    if not 0.0 < config.max_df <= 1.0:
        raise ValueError(f"max_df must be a share in (0, 1], got {config.max_df}")
    if config.vocab_size < 0:
        raise ValueError(f"vocab_size must be >= 0, got {config.vocab_size}")


def build_vocabulary(texts: Sequence[str | None], config: TextConfig = TextConfig()) -> Vocabulary:
    """Build the paper's vocabulary from the item texts.

    Steps: :func:`tokenize` each text and keep its first ``config.max_length`` tokens (raw words, before any
    filtering); drop stop words (when ``config.remove_stop_words``); drop words whose document frequency share
    ``df(w) / N`` is above ``config.max_df``; rank the remaining words by the corpus-level tf-idf score

        score(w) = idf(w) * sum over documents d containing w of  count(w, d) / |d|
        idf(w)   = ln((1 + N) / (1 + df(w))) + 1                      (smoothed idf, always > 0)

    where ``N`` is the number of texts, ``df(w)`` the number of documents containing ``w`` and ``|d|`` the
    number of tokens of ``d`` left after stop-word and max_df removal; keep the ``config.vocab_size`` best.
    Words are ordered by score descending, ties broken alphabetically, so the result is deterministic.
    An empty corpus (or one with no words left) gives an empty vocabulary.
    """
    return vocabulary_from_counts(count_terms(texts, config), config)


# ----------------------------------------------------------------------------------------------------------------
# Sharded vocabulary: count the terms of item shards separately (in parallel), merge, then rank
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TermCounts:
    """What :func:`build_vocabulary` needs from a run of documents (one shard of a catalogue, or all of it).

    For every distinct (document, word) pair, in document order and, within a document, in the order of the word's
    first occurrence: ``codes`` (an index into ``words``) and ``counts`` (occurrences). ``doc_n_words[d]`` is the
    number of distinct words document ``d`` kept (after truncation to ``max_length`` and stop-word removal).
    Plain numpy arrays, so a shard's counts travel cheaply between processes.
    """

    words: np.ndarray  # object: the distinct words of these documents
    codes: np.ndarray  # int64, one per (document, word) pair
    counts: np.ndarray  # int64, one per (document, word) pair
    doc_n_words: np.ndarray  # int64, one per document

    def __len__(self) -> int:
        """Number of documents."""
        return int(self.doc_n_words.size)


def count_terms(texts: Sequence[str | None], config: TextConfig = TextConfig()) -> TermCounts:
    """Tokenize ``texts`` (first ``config.max_length`` raw tokens, stop words dropped) and count each document's
    words: the expensive, per-document part of :func:`build_vocabulary`, which can run on shards of a catalogue in
    parallel; :func:`merge_term_counts` puts the shards back together."""
    _check_config(config)
    stop = ENGLISH_STOP_WORDS if config.remove_stop_words else frozenset()
    pair_word: list[str] = []  # one entry per distinct (document, word)
    pair_count: list[int] = []
    doc_n_words: list[int] = []  # distinct words per document
    for text in texts:
        counts = Counter(_tokens(text, config.max_length))
        if stop:
            for w in stop & counts.keys():
                del counts[w]
        pair_word.extend(counts.keys())
        pair_count.extend(counts.values())
        doc_n_words.append(len(counts))
    codes, uniques = pd.factorize(np.asarray(pair_word, dtype=object), sort=False)
    return TermCounts(np.asarray(uniques, dtype=object), codes.astype(np.int64),
                      np.asarray(pair_count, dtype=np.int64), np.asarray(doc_n_words, dtype=np.int64))


def merge_term_counts(parts: Sequence[TermCounts]) -> TermCounts:
    """The counts of ``parts``' documents one after the other (shards in catalogue order). The pairs keep their
    order, so :func:`vocabulary_from_counts` adds the same numbers in the same order as for one unsharded count,
    and the vocabulary is identical to the single-process one."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return TermCounts(np.zeros(0, dtype=object), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
                          np.zeros(0, dtype=np.int64))
    global_codes, words = pd.factorize(np.concatenate([np.asarray(p.words, dtype=object) for p in parts]),
                                       sort=False)
    codes, start = [], 0
    for part in parts:  # each shard's local codes -> codes of the merged word list
        local_to_global = global_codes[start:start + len(part.words)].astype(np.int64)
        codes.append(local_to_global[part.codes])
        start += len(part.words)
    return TermCounts(np.asarray(words, dtype=object), np.concatenate(codes),
                      np.concatenate([p.counts for p in parts]), np.concatenate([p.doc_n_words for p in parts]))


def vocabulary_from_counts(terms: TermCounts, config: TextConfig = TextConfig()) -> Vocabulary:
    """The vocabulary of :func:`build_vocabulary` from the (merged) term counts of the whole corpus: drop words
    above ``config.max_df``, rank the rest by corpus-level tf-idf, keep the ``config.vocab_size`` best."""
    _check_config(config)
    n_docs = len(terms)
    if terms.codes.size == 0 or config.vocab_size == 0:
        return Vocabulary((), config)

    words = terms.codes
    vocab_words = terms.words  # object, not fixed-width str: one long token costs nothing
    n_words = vocab_words.size
    counts_arr = terms.counts.astype(np.float64)
    docs = np.repeat(np.arange(n_docs, dtype=np.int64), terms.doc_n_words)
    df = np.bincount(words, minlength=n_words)
    keep_word = df <= config.max_df * n_docs
    keep_pair = keep_word[words]
    doc_len = np.bincount(docs[keep_pair], weights=counts_arr[keep_pair], minlength=n_docs)
    tf = np.zeros_like(counts_arr)
    tf[keep_pair] = counts_arr[keep_pair] / doc_len[docs[keep_pair]]
    idf = np.log((1.0 + n_docs) / (1.0 + df)) + 1.0
    score = np.bincount(words, weights=tf, minlength=n_words) * idf

    candidates = np.flatnonzero(keep_word)
    if candidates.size == 0:
        return Vocabulary((), config)
    cand_words = vocab_words[candidates]
    alphabetical = np.argsort(cand_words, kind="stable")
    order = alphabetical[np.argsort(-score[candidates][alphabetical], kind="stable")]  # score desc, then word
    chosen = cand_words[order[: config.vocab_size]]
    return Vocabulary(tuple(str(w) for w in chosen), config)


# ----------------------------------------------------------------------------------------------------------------
# Ragged documents
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Documents:
    """Documents as word ids, stored ragged: document ``i`` is ``ids[offsets[i]:offsets[i + 1]]``.

    ``ids`` are int64 word ids (all ``>= 1``; 0 is padding and never stored); ``offsets`` is int64 of length
    ``n_docs + 1``, non-decreasing, starting at 0 and ending at ``len(ids)``. Equality compares the arrays.
    """

    ids: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        ids = np.ascontiguousarray(np.asarray(self.ids), dtype=np.int64)
        offsets = np.ascontiguousarray(np.asarray(self.offsets), dtype=np.int64)
        if ids.ndim != 1 or offsets.ndim != 1:
            raise ValueError(f"ids and offsets must be 1-d, got shapes {ids.shape} and {offsets.shape}")
        if offsets.size == 0:
            raise ValueError("offsets must have n_docs + 1 >= 1 entries, got an empty array")
        if offsets[0] != 0:
            raise ValueError(f"offsets must start at 0, got {int(offsets[0])}")
        if offsets[-1] != ids.size:
            raise ValueError(f"offsets must end at len(ids) = {ids.size}, got {int(offsets[-1])}")
        if offsets.size > 1 and (np.diff(offsets) < 0).any():
            raise ValueError("offsets must be non-decreasing")
        if ids.size and ids.min() < 1:
            raise ValueError(f"word ids must be >= 1 (0 is padding), got {int(ids.min())}")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "offsets", offsets)

    def __len__(self) -> int:
        """Number of documents."""
        return int(self.offsets.size - 1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Documents):
            return NotImplemented
        return np.array_equal(self.ids, other.ids) and np.array_equal(self.offsets, other.offsets)

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def empty(cls, n: int) -> "Documents":
        """``n`` documents with no words."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return cls(np.zeros(0, dtype=np.int64), np.zeros(n + 1, dtype=np.int64))

    @classmethod
    def from_lists(cls, docs: Iterable[Sequence[int]]) -> "Documents":
        """Build from one sequence of word ids per document."""
        lists = [list(d) for d in docs]
        lengths = np.fromiter((len(d) for d in lists), dtype=np.int64, count=len(lists))
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((i for d in lists for i in d), dtype=np.int64, count=int(offsets[-1]))
        return cls(flat, offsets)

    @classmethod
    def concat(cls, parts: Sequence["Documents"]) -> "Documents":
        """The documents of ``parts`` one after the other."""
        if not parts:
            return cls.empty(0)
        ids = np.concatenate([p.ids for p in parts])
        shifts = np.cumsum([0] + [p.ids.size for p in parts[:-1]])
        offsets = np.concatenate([np.zeros(1, dtype=np.int64)] + [p.offsets[1:] + s for p, s in zip(parts, shifts)])
        return cls(ids, offsets)

    def lengths(self) -> np.ndarray:
        """Number of words of each document (int64, length ``len(self)``)."""
        return np.diff(self.offsets)

    def has_text(self) -> np.ndarray:
        """Boolean mask of the documents with at least one word."""
        return self.lengths() > 0

    def get(self, i: int) -> np.ndarray:
        """The word ids of document ``i`` (a view; negative ``i`` counts from the end)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        i = int(i) % n
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def to_lists(self) -> list[list[int]]:
        """One list of word ids per document."""
        return [self.ids[a:b].tolist() for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def _positions(self, index: np.ndarray | Sequence[int]) -> np.ndarray:
        idx = np.asarray(index)
        n = len(self)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise ValueError(f"boolean index must have shape ({n},), got {idx.shape}")
            return np.flatnonzero(idx).astype(np.int64)
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"index must be integer or boolean, got dtype {idx.dtype}")
        idx = idx.astype(np.int64).ravel()
        if (idx < -n).any() or (idx >= n).any():
            raise IndexError(f"document index out of range for {n} documents")
        return np.where(idx < 0, idx + n, idx)

    def subset(self, index: np.ndarray | Sequence[int]) -> "Documents":
        """The documents at ``index`` (integer positions, repeats allowed, or a boolean mask), in that order."""
        pos = self._positions(index)
        starts = self.offsets[pos]
        lens = self.offsets[pos + 1] - starts
        offsets = np.zeros(pos.size + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        total = int(offsets[-1])
        gather = np.arange(total, dtype=np.int64) + np.repeat(starts - offsets[:-1], lens)
        return Documents(self.ids[gather], offsets)

    def padded_batch(
        self, index: np.ndarray | Sequence[int], min_length: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The documents at ``index`` as a LongTensor ``[B, L]`` right-padded with 0, and their lengths ``[B]``.

        ``L = max(longest document in the batch, min_length)``: a batch is padded to its own longest document
        (use ``min_length`` >= the widest convolution window so every document fits a filter).
        """
        sub = self.subset(index)
        lens = sub.lengths()
        width = max(int(lens.max()) if lens.size else 0, int(min_length))
        out = np.zeros((len(sub), width), dtype=np.int64)
        if sub.ids.size:
            rows = np.repeat(np.arange(len(sub), dtype=np.int64), lens)
            cols = np.arange(sub.ids.size, dtype=np.int64) - np.repeat(sub.offsets[:-1], lens)
            out[rows, cols] = sub.ids
        return torch.from_numpy(out), torch.from_numpy(lens.copy())


def encode_documents(texts: Sequence[str | None], vocabulary: Vocabulary, max_length: int = 300) -> Documents:
    """Encode texts as word ids: :func:`tokenize`, keep the first ``max_length`` raw tokens, map each token to its
    id and delete the tokens not in ``vocabulary`` (no UNK token, as the paper). Missing text gives an empty
    document (length 0)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    ids = vocabulary._ids
    flat: list[int] = []
    lengths: list[int] = []
    for text in texts:
        before = len(flat)
        flat.extend(i for i in map(ids.get, _tokens(text, max_length)) if i is not None)
        lengths.append(len(flat) - before)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
    return Documents(np.asarray(flat, dtype=np.int64), offsets)


# ----------------------------------------------------------------------------------------------------------------
# Pretrained word vectors (ConvMF+)
# ----------------------------------------------------------------------------------------------------------------


def load_word_vectors(
    path: str | Path, vocabulary: Vocabulary, dim: int, *, seed: int = 0, init_std: float = 0.1
) -> tuple[np.ndarray, float]:
    """Read GloVe / word2vec text vectors (``word v1 ... v_dim`` per line, optionally gzip-compressed ``.gz``)
    for the words of ``vocabulary``.

    Returns a float32 matrix ``[len(vocabulary) + 1, dim]`` whose row ``i`` is the vector of word id ``i`` (row 0,
    padding, is zero; words not in the file get ``N(0, init_std^2)`` values from ``numpy.random.default_rng(seed)``),
    and the share of vocabulary words found. A word2vec header line ``count dim`` is skipped; malformed lines are
    skipped. Lookup is exact first; else the lower-cased vocabulary word; else a file word matching the vocabulary
    word only after lower-casing. Raises ValueError if the file's dimension differs from ``dim`` or it holds no vectors.
    A thin wrapper over :func:`convmf_core.vectors.read_vectors_file` and
    :meth:`~convmf_core.vectors.WordVectors.for_vocabulary`, which also report the coverage in detail.
    """
    from convmf_core.vectors import read_vectors_file  # lazy: vectors.py refers back to Vocabulary

    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    vectors = read_vectors_file(path, dim, only=vocabulary.words)
    matrix, _, coverage = vectors.for_vocabulary(vocabulary, seed=seed, init_std=init_std)
    share = coverage.found / coverage.n_words if coverage.n_words else 0.0
    return matrix, share
