"""A planted-structure catalogue: ratings that depend on what the item descriptions say.

Every item has a mixture over ``n_topics`` latent topics (Dirichlet with a small concentration, so mostly one or
two dominant topics). Its description is drawn from the word lists of its topics, mixed with shared filler words
and a little off-topic noise, so the text reveals the topics. Every user has a preference vector over the topics
and a rating is

    clip(round(rating_mean + preference_scale * user_pref . item_topics + user_bias + item_bias + noise), 1, 5)

so a model that reads the text can place an item with no ratings (cold start) near the items of the same topics.
Which items a user rates is drawn without replacement, weighted by a long-tailed item popularity.

The catalogue serves two purposes: tests show that ConvMF beats plain matrix factorisation on cold-start items,
and the pipeline uses it as its built-in default data set (no download), written by :func:`write_catalogue`.
Everything is vectorised numpy driven by one ``numpy.random.Generator`` tree seeded from ``SyntheticConfig.seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from convmf_core.atomic import write_file_atomic

__all__ = ["FILLER_WORDS", "SyntheticConfig", "SyntheticData", "generate_catalogue", "write_catalogue"]

# Common, neutral content words shared by all descriptions (none is an English stop word).
FILLER_WORDS: tuple[str, ...] = (
    "story", "world", "life", "people", "journey", "house", "city", "family", "night", "friend",
    "road", "music", "light", "water", "heart", "secret", "summer", "winter", "village", "letter",
    "garden", "window", "river", "stranger", "dream", "memory", "promise", "morning", "evening", "island",
    "machine", "picture", "kingdom", "season", "market", "border", "station", "mirror", "legacy", "voyage",
    "street", "country", "school", "mother", "father", "brother", "sister", "child", "woman", "doctor",
    "teacher", "soldier", "captain", "forest", "mountain", "ocean", "bridge", "castle", "train", "harbor",
    "painting", "lesson", "meeting", "holiday", "journal", "neighbor", "stone", "silver", "shadow", "voice",
)

# Letters of the made-up topic words: consonant-vowel syllables from these sets spell pronounceable words that are
# neither English stop words nor filler words (the consonants leave out c, d, f, h, s, w, y used by most of them).
_CONSONANTS = "bgklmnprtvz"
_VOWELS = "aeiou"
_ENDINGS = ("", "", "", "n", "r", "l")


@dataclass(frozen=True)
class SyntheticConfig:
    """Size, structure and noise of a synthetic catalogue; every default gives a small, quick data set.

    Shares are fractions of ``n_items``: ``share_without_text`` items get an empty description (they are rated),
    ``share_unrated`` items are described but have no ratings at all (cold-start items). Every other item gets at
    least one rating. ``ratings_per_user`` is the mean of a lognormal count per user (at least
    ``min_ratings_per_user``, at most the number of ratable items). ``topic_word_share`` of the description words
    come from the item's topics (the rest are filler words); ``off_topic_share`` of those are drawn from a random
    topic instead (text noise). Timestamps are uniform in ``[start_timestamp, start_timestamp + time_span_days)``.
    """

    n_users: int = 300
    n_items: int = 400
    n_topics: int = 8
    ratings_per_user: float = 40.0
    ratings_per_user_sigma: float = 0.7
    min_ratings_per_user: int = 3
    words_per_description: int = 40
    words_per_topic: int = 25
    n_filler_words: int = 60
    topic_word_share: float = 0.6
    off_topic_share: float = 0.1
    topic_alpha: float = 0.1
    share_without_text: float = 0.05
    share_unrated: float = 0.05
    rating_mean: float = 3.6
    preference_scale: float = 1.2
    user_bias_std: float = 0.3
    item_bias_std: float = 0.25
    rating_noise_std: float = 0.5
    popularity_sigma: float = 1.0
    seed: int = 0
    start_timestamp: int = 1_700_000_000
    time_span_days: float = 60.0

    def __post_init__(self) -> None:
        checks = {
            "n_users >= 1": self.n_users >= 1,
            "n_items >= 1": self.n_items >= 1,
            "n_topics >= 1": self.n_topics >= 1,
            "ratings_per_user > 0": self.ratings_per_user > 0,
            "ratings_per_user_sigma >= 0": self.ratings_per_user_sigma >= 0,
            "min_ratings_per_user >= 1": self.min_ratings_per_user >= 1,
            "words_per_description >= 1": self.words_per_description >= 1,
            "words_per_topic >= 2": self.words_per_topic >= 2,
            f"1 <= n_filler_words <= {len(FILLER_WORDS)}": 1 <= self.n_filler_words <= len(FILLER_WORDS),
            "0 <= topic_word_share <= 1": 0.0 <= self.topic_word_share <= 1.0,
            "0 <= off_topic_share <= 1": 0.0 <= self.off_topic_share <= 1.0,
            "topic_alpha > 0": self.topic_alpha > 0,
            "0 <= share_without_text < 1": 0.0 <= self.share_without_text < 1.0,
            "0 <= share_unrated < 1": 0.0 <= self.share_unrated < 1.0,
            "share_without_text + share_unrated < 1": self.share_without_text + self.share_unrated < 1.0,
            "standard deviations >= 0": min(self.user_bias_std, self.item_bias_std, self.rating_noise_std,
                                            self.popularity_sigma) >= 0,
            "time_span_days > 0": self.time_span_days > 0,
            "start_timestamp >= 0": self.start_timestamp >= 0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid SyntheticConfig: {', '.join(failed)}")
        if self.n_items - round(self.n_items * self.share_without_text) - round(self.n_items * self.share_unrated) < 1:
            raise ValueError("invalid SyntheticConfig: no item is left to be rated")


@dataclass(frozen=True, eq=False)
class SyntheticData:
    """A generated catalogue and its ground truth.

    ``ratings``: user_id int64, item_id int64, rating float32 (1..5), timestamp int64 (unix seconds), one row per
    (user, item). ``items``: item_id int64, title str, description str ("" for items without text), one row per
    item. Raw ids are ``1..n_users`` and ``1..n_items``; row ``k`` of ``item_topics`` [n_items, n_topics] and
    ``user_preferences`` [n_users, n_topics] belongs to raw id ``k + 1``. ``topic_words[t]`` is topic ``t``'s list.
    """

    ratings: pd.DataFrame
    items: pd.DataFrame
    item_topics: np.ndarray
    user_preferences: np.ndarray
    topic_words: tuple[tuple[str, ...], ...]
    config: SyntheticConfig


def _make_topic_words(rng: np.random.Generator, n_topics: int, words_per_topic: int) -> tuple[tuple[str, ...], ...]:
    """Distinct pronounceable made-up words (three consonant-vowel syllables, sometimes a final consonant)."""
    needed = n_topics * words_per_topic
    forbidden = set(FILLER_WORDS)
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < needed:
        batch = 2 * (needed - len(words)) + 16
        cons = rng.integers(0, len(_CONSONANTS), size=(batch, 3))
        vows = rng.integers(0, len(_VOWELS), size=(batch, 3))
        ends = rng.integers(0, len(_ENDINGS), size=batch)
        for b in range(batch):
            word = "".join(_CONSONANTS[cons[b, s]] + _VOWELS[vows[b, s]] for s in range(3)) + _ENDINGS[ends[b]]
            if word not in seen and word not in forbidden:
                seen.add(word)
                words.append(word)
                if len(words) == needed:
                    break
    return tuple(tuple(words[t * words_per_topic:(t + 1) * words_per_topic]) for t in range(n_topics))


def _sample_categorical_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs`` (rows sum to 1): the column index, vectorised via cumulative sums."""
    cum = np.cumsum(probs, axis=1)
    u = rng.random(len(probs))[:, None] * cum[:, -1:]
    return np.minimum((u >= cum).sum(axis=1), probs.shape[1] - 1)


def _sample_pairs(rng: np.random.Generator, counts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For user ``u``, ``counts[u]`` distinct columns drawn without replacement with probability ~ ``weights``.

    Gumbel top-k: the ``k`` largest of ``log w + Gumbel`` are a weighted sample without replacement. Users are
    processed in chunks so that at most a few million keys are held at once.
    """
    n_users, n_cols = len(counts), len(weights)
    log_w = np.log(weights).astype(np.float32)
    chunk = max(1, 2_000_000 // n_cols)
    users: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    for start in range(0, n_users, chunk):
        k = counts[start:start + chunk]
        keys = log_w[None, :] + rng.gumbel(size=(len(k), n_cols)).astype(np.float32)
        k_max = int(k.max())
        if k_max < n_cols:
            top = np.argpartition(-keys, k_max - 1, axis=1)[:, :k_max]
        else:
            top = np.broadcast_to(np.arange(n_cols), keys.shape)
        top_keys = np.take_along_axis(keys, top, axis=1)
        order = np.argsort(-top_keys, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        keep = np.arange(top.shape[1])[None, :] < k[:, None]
        rows = np.broadcast_to(np.arange(start, start + len(k))[:, None], top.shape)
        users.append(rows[keep])
        cols.append(top[keep])
    return np.concatenate(users).astype(np.int64), np.concatenate(cols).astype(np.int64)


def _descriptions(
    rng: np.random.Generator,
    config: SyntheticConfig,
    item_topics: np.ndarray,
    has_text: np.ndarray,
    topic_words: tuple[tuple[str, ...], ...],
) -> list[str]:
    """Descriptions: filler words and words of the item's topics (some from random topics); "" where no text."""
    n_items, n_topics, wpt = config.n_items, config.n_topics, config.words_per_topic
    mean = float(config.words_per_description)
    min_words = int(min(5, config.words_per_description))
    extra = max(mean - min_words, 0.0)
    # Negative binomial (n=4): mean ``extra``, a long right tail like real blurbs.
    lengths = min_words + (rng.negative_binomial(4, 4.0 / (4.0 + extra), size=n_items) if extra > 0 else 0)
    lengths = np.where(has_text, lengths, 0).astype(np.int64)
    total = int(lengths.sum())
    item_of_word = np.repeat(np.arange(n_items), lengths)
    is_topic_word = rng.random(total) < config.topic_word_share
    topic = _sample_categorical_rows(rng, item_topics[item_of_word])
    off_topic = rng.random(total) < config.off_topic_share
    topic = np.where(off_topic, rng.integers(0, n_topics, size=total), topic)
    word_in_topic = rng.integers(0, wpt, size=total)
    filler = rng.integers(0, config.n_filler_words, size=total)
    vocab = np.array([w for words in topic_words for w in words] + list(FILLER_WORDS[:config.n_filler_words]))
    word_ids = np.where(is_topic_word, topic * wpt + word_in_topic, n_topics * wpt + filler)
    tokens = vocab[word_ids].tolist()
    ends = np.cumsum(lengths)
    starts = ends - lengths
    return [" ".join(tokens[s:e]) for s, e in zip(starts.tolist(), ends.tolist())]


def generate_catalogue(config: SyntheticConfig = SyntheticConfig()) -> SyntheticData:
    """Generate a catalogue (ratings, items with titles and descriptions) and its ground truth; deterministic."""
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(8)]
    rng_words, rng_latent, rng_roles, rng_text, rng_titles, rng_pick, rng_rate, rng_time = streams
    n_users, n_items, n_topics = config.n_users, config.n_items, config.n_topics

    topic_words = _make_topic_words(rng_words, n_topics, config.words_per_topic)

    # Latent structure.
    item_topics = rng_latent.dirichlet(np.full(n_topics, config.topic_alpha), size=n_items)
    bad = ~np.isfinite(item_topics).all(axis=1) | (item_topics.sum(axis=1) <= 0)
    if bad.any():  # a tiny alpha can underflow to an all-zero row: make it a pure random topic
        item_topics[bad] = np.eye(n_topics)[rng_latent.integers(0, n_topics, size=int(bad.sum()))]
    item_topics /= item_topics.sum(axis=1, keepdims=True)
    user_preferences = rng_latent.normal(0.0, 1.0, size=(n_users, n_topics))
    user_bias = rng_latent.normal(0.0, config.user_bias_std, size=n_users)
    item_bias = rng_latent.normal(0.0, config.item_bias_std, size=n_items)
    popularity = rng_latent.lognormal(0.0, config.popularity_sigma, size=n_items)

    # Item roles: unrated (described, cold start), without text (rated), ordinary.
    n_unrated = int(round(n_items * config.share_unrated))
    n_no_text = int(round(n_items * config.share_without_text))
    perm = rng_roles.permutation(n_items)
    unrated = np.zeros(n_items, dtype=bool)
    unrated[perm[:n_unrated]] = True
    has_text = np.ones(n_items, dtype=bool)
    has_text[perm[n_unrated:n_unrated + n_no_text]] = False

    descriptions = _descriptions(rng_text, config, item_topics, has_text, topic_words)

    # Titles: two distinct words of the dominant topic and a number.
    dominant = item_topics.argmax(axis=1)
    first = rng_titles.integers(0, config.words_per_topic, size=n_items)
    second = (first + 1 + rng_titles.integers(0, config.words_per_topic - 1, size=n_items)) % config.words_per_topic
    number = rng_titles.integers(1, 100, size=n_items)
    titles = [
        f"{topic_words[t][a].capitalize()} {topic_words[t][b].capitalize()} {n}"
        for t, a, b, n in zip(dominant.tolist(), first.tolist(), second.tolist(), number.tolist())
    ]

    # Who rates what: a lognormal count per user, items by popularity without replacement.
    ratable = np.flatnonzero(~unrated)
    sigma = config.ratings_per_user_sigma
    counts = rng_pick.lognormal(np.log(config.ratings_per_user) - sigma**2 / 2, sigma, size=n_users)
    counts = np.clip(np.rint(counts), config.min_ratings_per_user, None)
    counts = np.minimum(counts, len(ratable)).astype(np.int64)
    user_idx, col = _sample_pairs(rng_pick, counts, popularity[ratable])
    item_idx = ratable[col]
    # Every ratable item gets at least one rating, so only the planted cold-start items are unrated.
    missing = ratable[np.bincount(item_idx, minlength=n_items)[ratable] == 0]
    if len(missing):
        user_idx = np.concatenate([user_idx, rng_pick.integers(0, n_users, size=len(missing))])
        item_idx = np.concatenate([item_idx, missing])

    affinity = np.einsum("ij,ij->i", user_preferences[user_idx], item_topics[item_idx])
    raw = (
        config.rating_mean
        + config.preference_scale * affinity
        + user_bias[user_idx]
        + item_bias[item_idx]
        + rng_rate.normal(0.0, config.rating_noise_std, size=len(user_idx))
    )
    rating = np.clip(np.rint(raw), 1, 5).astype(np.float32)
    span = max(int(config.time_span_days * 86_400), 1)
    timestamp = config.start_timestamp + rng_time.integers(0, span, size=len(user_idx))

    ratings = pd.DataFrame(
        {
            "user_id": (user_idx + 1).astype(np.int64),
            "item_id": (item_idx + 1).astype(np.int64),
            "rating": rating,
            "timestamp": timestamp.astype(np.int64),
        }
    )
    ratings = ratings.sort_values(["timestamp", "user_id", "item_id"], kind="stable", ignore_index=True)
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, n_items + 1, dtype=np.int64),
            "title": pd.Series(titles, dtype="str"),
            "description": pd.Series(descriptions, dtype="str"),
        }
    )
    return SyntheticData(
        ratings=ratings,
        items=items,
        item_topics=item_topics,
        user_preferences=user_preferences,
        topic_words=topic_words,
        config=config,
    )


def _write_csv_atomically(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` as CSV to ``path`` atomically (temporary file + rename)."""
    write_file_atomic(path, lambda fh: frame.to_csv(fh, index=False), text=True)


def write_catalogue(data: SyntheticData, directory: Path) -> dict[str, Path]:
    """Write ``ratings.csv`` and ``items.csv`` (header rows) into ``directory``; return ``{"ratings", "items"}`` paths.

    Each file is written atomically. An empty description is an empty CSV field, which ``pandas.read_csv`` reads
    as NaN unless given ``keep_default_na=False`` (or followed by ``fillna("")``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"ratings": directory / "ratings.csv", "items": directory / "items.csv"}
    _write_csv_atomically(data.ratings, paths["ratings"])
    _write_csv_atomically(data.items, paths["items"])
    return paths
