"""Tests of convmf_core.text: tokenizer, vocabulary, ragged documents, encoding and word vectors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from convmf_core.config import TextConfig
from convmf_core.text import (
    ENGLISH_STOP_WORDS,
    Documents,
    Vocabulary,
    build_vocabulary,
    encode_documents,
    load_word_vectors,
    tokenize,
)

NO_FILTER = TextConfig(max_length=300, max_df=1.0, vocab_size=100, remove_stop_words=False)


# --- tokenizer -----------------------------------------------------------------------------------------------------


def test_tokenize_lowercases_and_splits_on_punctuation() -> None:
    assert tokenize("Hello, WORLD! It's a well-known fact.") == ["hello", "world", "it's", "a", "well", "known", "fact"]


def test_tokenize_apostrophes_only_internal() -> None:
    assert tokenize("'quoted' don't rock'n'roll dogs'") == ["quoted", "don't", "rock'n'roll", "dogs"]
    assert tokenize("don\u2019t") == ["don't"]  # typographic apostrophe


def test_tokenize_unicode_digits_and_underscore() -> None:
    assert tokenize("Café Naïve 3D 1999 snake_case") == ["café", "naïve", "3d", "1999", "snake", "case"]


@pytest.mark.parametrize("missing", [None, "", "   ", float("nan"), np.nan, "!!! ..."])
def test_tokenize_missing_text(missing: object) -> None:
    assert tokenize(missing) == []  # type: ignore[arg-type]


def test_stop_word_list_is_plausible() -> None:
    assert 250 <= len(ENGLISH_STOP_WORDS) <= 450
    assert {"the", "and", "of", "a", "is", "don't"} <= ENGLISH_STOP_WORDS
    assert "english" not in ENGLISH_STOP_WORDS
    assert all(w == w.lower() and tokenize(w) == [w] for w in ENGLISH_STOP_WORDS)


# --- vocabulary ----------------------------------------------------------------------------------------------------


def test_stop_words_really_removed() -> None:
    texts = ["The cat and the hat", "A dog of the house", "English words"]
    vocab = build_vocabulary(texts, TextConfig(max_df=1.0))
    assert not set(vocab.words) & ENGLISH_STOP_WORDS
    assert {"cat", "hat", "dog", "house", "english", "words"} == set(vocab.words)
    kept = build_vocabulary(texts, TextConfig(max_df=1.0, remove_stop_words=False))
    assert {"the", "and", "a", "of"} <= set(kept.words)


def test_max_df_drops_words_above_share() -> None:
    texts = ["common alpha", "common beta", "common alpha", "common gamma"]
    vocab = build_vocabulary(texts, TextConfig(max_df=0.5, remove_stop_words=False))
    assert "common" not in vocab.words  # in every document
    assert "alpha" in vocab.words  # share exactly 0.5 is not above max_df
    assert {"beta", "gamma"} <= set(vocab.words)
    assert "common" in build_vocabulary(texts, TextConfig(max_df=1.0, remove_stop_words=False)).words


def test_vocab_size_keeps_highest_tfidf_in_order() -> None:
    # df: apple 2, banana 2, cherry 1, date 1, egg 1; |d| = 3, 2, 2, 1; N = 4.
    texts = ["apple apple banana", "apple cherry", "banana date", "egg"]
    idf = lambda df: math.log(5 / (1 + df)) + 1  # noqa: E731
    scores = {
        "apple": (2 / 3 + 1 / 2) * idf(2),
        "banana": (1 / 3 + 1 / 2) * idf(2),
        "cherry": 1 / 2 * idf(1),
        "date": 1 / 2 * idf(1),
        "egg": 1 * idf(1),
    }
    expected = sorted(scores, key=lambda w: (-scores[w], w))
    assert expected == ["egg", "apple", "banana", "cherry", "date"]  # egg: rarest word, highest tf-idf
    full = build_vocabulary(texts, NO_FILTER)
    assert full.words == tuple(expected)  # tie cherry/date broken alphabetically
    top3 = build_vocabulary(texts, TextConfig(max_df=1.0, vocab_size=3, remove_stop_words=False))
    assert top3.words == ("egg", "apple", "banana")  # a frequency ranking would have dropped egg
    assert top3.index("egg") == 1 and top3.index("banana") == 3


def test_truncation_to_max_length_happens_before_filtering() -> None:
    texts = ["the the the zebra", "lion", "tiger"]
    short = build_vocabulary(texts, TextConfig(max_length=3, max_df=1.0))
    assert "zebra" not in short.words  # the first three raw words are stop words
    assert set(short.words) == {"lion", "tiger"}
    longer = build_vocabulary(texts, TextConfig(max_length=4, max_df=1.0))
    assert "zebra" in longer.words


def test_build_vocabulary_empty_inputs() -> None:
    assert len(build_vocabulary([])) == 0
    empty = build_vocabulary([None, "", float("nan"), "the of and"])  # type: ignore[list-item]
    assert empty.words == () and empty.size_with_padding == 1
    assert build_vocabulary(["same", "same"], TextConfig(max_df=0.5)).words == ()  # everything above max_df


def test_build_vocabulary_is_deterministic_and_order_independent_of_ties() -> None:
    texts = ["b a", "c d", "e f"]
    v1 = build_vocabulary(texts, NO_FILTER)
    v2 = build_vocabulary(list(reversed(texts)), NO_FILTER)
    assert v1.words == v2.words == ("a", "b", "c", "d", "e", "f")


def test_vocabulary_lookup_and_round_trip() -> None:
    cfg = TextConfig(max_length=50, max_df=0.4, vocab_size=10, remove_stop_words=False)
    vocab = Vocabulary(("cat", "hat", "dog"), cfg)
    assert len(vocab) == 3 and vocab.size_with_padding == 4
    assert [vocab.index(w) for w in ("cat", "hat", "dog")] == [1, 2, 3]
    assert vocab.index("zebra") == -1 and vocab.index("Cat") == -1
    assert vocab.word(2) == "hat"
    with pytest.raises(IndexError):
        vocab.word(0)
    data = json.loads(json.dumps(vocab.to_dict()))
    back = Vocabulary.from_dict(data)
    assert back == vocab and back.config == cfg and back.index("dog") == 3
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(("a", "b", "a"))
    with pytest.raises(ValueError, match="format"):
        Vocabulary.from_dict({"words": ["a"]})


# --- encoding ------------------------------------------------------------------------------------------------------


def test_encode_deletes_oov_words_without_unk() -> None:
    vocab = Vocabulary(("cat", "hat"))
    docs = encode_documents(["the cat sat on a mat with the hat"], vocab)
    assert docs.get(0).tolist() == [1, 2]  # no UNK id, no gaps
    assert docs.ids.min() >= 1


def test_encode_keeps_capitalised_and_punctuated_words() -> None:
    vocab = Vocabulary(("cat", "hat", "don't"))
    docs = encode_documents(["CAT, Hat! (cat.) Don't"], vocab)
    assert docs.get(0).tolist() == [1, 2, 1, 3]


def test_encode_truncates_raw_words_before_deleting() -> None:
    vocab = Vocabulary(("cat",))
    docs = encode_documents(["dog dog cat", "cat dog dog"], vocab, max_length=2)
    assert docs.lengths().tolist() == [0, 1]


def test_encode_empty_and_missing_texts() -> None:
    vocab = Vocabulary(("cat",))
    docs = encode_documents([None, "", float("nan"), "cat", "dog"], vocab)  # type: ignore[list-item]
    assert len(docs) == 5
    assert docs.lengths().tolist() == [0, 0, 0, 1, 0]
    assert docs.has_text().tolist() == [False, False, False, True, False]
    assert len(encode_documents([], vocab)) == 0


def test_build_then_encode_round_trip() -> None:
    texts = ["Space pirates attack!", "A love story in Paris.", "Pirates of Paris"]
    vocab = build_vocabulary(texts, TextConfig(max_df=1.0))
    docs = encode_documents(texts, vocab)
    decoded = [[vocab.word(i) for i in docs.get(k)] for k in range(len(docs))]
    assert decoded == [["space", "pirates", "attack"], ["love", "story", "paris"], ["pirates", "paris"]]


# --- ragged documents ----------------------------------------------------------------------------------------------


@pytest.fixture()
def docs() -> Documents:
    return Documents.from_lists([[1, 2, 3], [], [4], [5, 6]])


def test_documents_basics(docs: Documents) -> None:
    assert len(docs) == 4
    assert docs.lengths().tolist() == [3, 0, 1, 2]
    assert docs.get(0).tolist() == [1, 2, 3] and docs.get(1).tolist() == [] and docs.get(-1).tolist() == [5, 6]
    assert docs.has_text().tolist() == [True, False, True, True]
    assert docs.ids.dtype == np.int64 and docs.offsets.dtype == np.int64
    with pytest.raises(IndexError):
        docs.get(4)


def test_documents_subset(docs: Documents) -> None:
    sub = docs.subset(np.array([3, 0, 0, 1]))
    assert sub.to_lists() == [[5, 6], [1, 2, 3], [1, 2, 3], []]
    assert sub.offsets.tolist() == [0, 2, 5, 8, 8]
    assert docs.subset(np.array([False, True, True, False])).to_lists() == [[], [4]]
    assert len(docs.subset(np.array([], dtype=np.int64))) == 0
    with pytest.raises(IndexError):
        docs.subset(np.array([4]))


def test_documents_padded_batch(docs: Documents) -> None:
    batch, lengths = docs.padded_batch(np.array([0, 3]))
    assert batch.dtype == torch.long and lengths.dtype == torch.long
    assert batch.tolist() == [[1, 2, 3], [5, 6, 0]]
    assert lengths.tolist() == [3, 2]
    batch, lengths = docs.padded_batch(np.array([1, 2]))  # trimmed to this batch's longest document
    assert batch.tolist() == [[0], [4]] and lengths.tolist() == [0, 1]
    batch, _ = docs.padded_batch(np.array([2]), min_length=5)
    assert batch.tolist() == [[4, 0, 0, 0, 0]]
    batch, lengths = docs.padded_batch(np.array([1]))
    assert batch.shape == (1, 1) and batch.sum() == 0 and lengths.tolist() == [0]


def test_documents_validation() -> None:
    with pytest.raises(ValueError, match="start at 0"):
        Documents(np.array([1, 2]), np.array([1, 2]))
    with pytest.raises(ValueError, match="end at len"):
        Documents(np.array([1, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="non-decreasing"):
        Documents(np.array([1, 2]), np.array([0, 2, 1, 2]))
    with pytest.raises(ValueError, match=">= 1"):
        Documents(np.array([0, 2]), np.array([0, 2]))
    with pytest.raises(ValueError, match="n_docs"):
        Documents(np.array([], dtype=np.int64), np.array([], dtype=np.int64))


def test_documents_empty_and_concat(docs: Documents) -> None:
    empty = Documents.empty(3)
    assert len(empty) == 3 and empty.lengths().tolist() == [0, 0, 0]
    both = Documents.concat([docs, empty, Documents.from_lists([[7]])])
    assert both.to_lists() == [[1, 2, 3], [], [4], [5, 6], [], [], [], [7]]
    assert Documents.concat([docs]) == docs
    assert len(Documents.concat([])) == 0


# --- word vectors --------------------------------------------------------------------------------------------------


def test_load_word_vectors_glove_format(tmp_path) -> None:
    path = tmp_path / "vec.txt"
    path.write_text("cat 1.0 2.0 3.0\nbroken 1.0\nhat 0.5 -0.5 0.0\nzebra 9 9 9\ncat 7 7 7\nbad x y z\n", encoding="utf-8")
    vocab = Vocabulary(("cat", "dog", "hat", "bad"))
    matrix, share = load_word_vectors(path, vocab, 3, seed=1)
    assert matrix.shape == (5, 3) and matrix.dtype == np.float32
    assert np.all(matrix[0] == 0)  # padding row
    assert matrix[vocab.index("cat")].tolist() == [1.0, 2.0, 3.0]  # the first occurrence wins
    assert matrix[vocab.index("hat")].tolist() == [0.5, -0.5, 0.0]
    assert share == pytest.approx(2 / 4)  # "bad" had a malformed vector
    dog = matrix[vocab.index("dog")]
    assert np.any(dog != 0) and np.all(np.abs(dog) < 1.0)  # small random init
    again, _ = load_word_vectors(path, vocab, 3, seed=1)
    assert np.array_equal(matrix, again)
    other, _ = load_word_vectors(path, vocab, 3, seed=2)
    assert not np.array_equal(other[vocab.index("dog")], dog)


def test_load_word_vectors_word2vec_header_and_case(tmp_path) -> None:
    path = tmp_path / "w2v.txt"
    path.write_text("2 2\nParis 1 1\ndog 2 2\n", encoding="utf-8")
    vocab = Vocabulary(("paris", "dog"))
    matrix, share = load_word_vectors(path, vocab, 2)
    assert share == 1.0
    assert matrix[1].tolist() == [1.0, 1.0] and matrix[2].tolist() == [2.0, 2.0]


def test_load_word_vectors_dimension_mismatch(tmp_path) -> None:
    path = tmp_path / "vec.txt"
    path.write_text("cat 1 2 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="dimension 3.*expected 4"):
        load_word_vectors(path, Vocabulary(("cat",)), 4)
    header = tmp_path / "header.txt"
    header.write_text("1 3\ncat 1 2 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="dimension 3"):
        load_word_vectors(header, Vocabulary(("cat",)), 2)


# --- sharded vocabulary and encoding (issue 4) -----------------------------------------------------------------------


def _corpus(n_docs: int, seed: int) -> list[str | None]:
    """Random descriptions over a small word list: many equal counts (ties in tf-idf), stop words, repeats,
    punctuation and case, a few missing or empty texts."""
    rng = np.random.default_rng(seed)
    lexicon = [f"w{i}" for i in range(60)] + ["The", "and", "of", "Don't", "café", "x-ray"]
    texts: list[str | None] = []
    for d in range(n_docs):
        if d % 17 == 5:
            texts.append(None if d % 2 else "")
            continue
        words = rng.choice(lexicon, size=int(rng.integers(1, 40)), p=None)
        texts.append(", ".join(words) + ("!" if d % 3 else ""))
    return texts


def _shards(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


@pytest.mark.parametrize("config", [TextConfig(), TextConfig(max_length=12, max_df=0.3, vocab_size=25),
                                    NO_FILTER])
@pytest.mark.parametrize("shard_size", [1, 7, 50, 1000])
def test_sharded_vocabulary_is_identical_to_the_single_process_one(config: TextConfig, shard_size: int) -> None:
    from convmf_core.text import count_terms, merge_term_counts, vocabulary_from_counts

    texts = _corpus(233, seed=shard_size)
    whole = build_vocabulary(texts, config)
    parts = [count_terms(texts[a:b], config) for a, b in _shards(len(texts), shard_size)]
    merged = merge_term_counts(parts)
    sharded = vocabulary_from_counts(merged, config)
    assert sharded.words == whole.words and sharded.config == whole.config
    assert len(whole) > 0
    assert len(merged) == len(texts)
    # The merged counts are the unsharded counts (same pairs, same order), not just the same ranking.
    single = count_terms(texts, config)
    assert list(merged.words[merged.codes]) == list(single.words[single.codes])
    assert np.array_equal(merged.counts, single.counts) and np.array_equal(merged.doc_n_words, single.doc_n_words)
    # Encoding shard by shard with that vocabulary and concatenating gives the single-process documents.
    docs = Documents.concat([encode_documents(texts[a:b], whole, config.max_length)
                             for a, b in _shards(len(texts), shard_size)])
    assert docs == encode_documents(texts, whole, config.max_length)


def test_term_counts_edge_cases() -> None:
    from convmf_core.text import count_terms, merge_term_counts, vocabulary_from_counts

    empty = merge_term_counts([])
    assert len(empty) == 0 and len(vocabulary_from_counts(empty)) == 0
    only_stop = count_terms(["the and of", None, ""])
    assert len(only_stop) == 3 and only_stop.codes.size == 0 and only_stop.doc_n_words.tolist() == [0, 0, 0]
    merged = merge_term_counts([only_stop, count_terms(["zebra zebra lion"]), count_terms([])])
    assert len(merged) == 4 and vocabulary_from_counts(merged, NO_FILTER).words == ("zebra", "lion")
