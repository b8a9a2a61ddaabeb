"""A planted-structure catalogue: ratings that depend on what the item descriptions say.

Every item has a mixture over ``n_topics`` latent topics (Dirichlet with a small concentration, so mostly one or
two dominant topics). Topic ``t`` is the ``t``-th theme of :data:`TOPIC_THEMES` (space, crime, romance, war, ...,
like film or book genres), and its word list is ``words_per_topic`` words of that theme, picked with the seeded
generator. The theme words are real, common, lower-case English words (no stop word, no filler word, no word in
two themes), so pretrained word vectors such as GloVe know them and place the words of a theme near each other.
An item's description is drawn from the word lists of its topics, mixed with shared filler words
(:data:`FILLER_WORDS`) and a little off-topic noise, so the text reveals the topics; its title is made of one or
two words of its dominant topic ("The Galaxy of the Comet", "Murder and Ransom", "The Haunted"). Every user has a
preference vector over the topics and a rating is

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

__all__ = [
    "CATALOGUE_VERSION",
    "FILLER_WORDS",
    "MAX_WORDS_PER_TOPIC",
    "TOPIC_THEMES",
    "SyntheticConfig",
    "SyntheticData",
    "generate_catalogue",
    "write_catalogue",
]

# Bumped whenever the same config and seed would give a different catalogue (2: real English topic words).
CATALOGUE_VERSION = 2

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


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# The topics' words: one theme per topic, in this order (topic t of a catalogue is theme t). Every word is a common,
# lower-case English word that GloVe 6B knows; none is a stop word (convmf_core.text.ENGLISH_STOP_WORDS) or a filler
# word, and no word is in two themes. The first themes are the most distinct from each other (defaults use 8).
TOPIC_THEMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("space", _words("""
        space planet planets galaxy galaxies alien aliens spaceship astronaut astronauts orbit orbital rocket
        rockets asteroid asteroids comet comets telescope satellite satellites cosmos moon meteor gravity lunar
        solar spacecraft universe shuttle crater eclipse cosmic astronomer astronomers astronomy
        extraterrestrial interstellar supernova nebula cosmonaut""")),
    ("crime", _words("""
        detective detectives murder murders police heist gangster robbery thief thieves crime crimes criminal
        criminals investigation suspect suspects witness prosecutor homicide kidnapping ransom fraud gangsters
        mob burglar smuggler evidence inspector lawyer courtroom convict arrest killer corruption informant gang
        cartel hostage burglary robber robbers alibi""")),
    ("romance", _words("""
        love romance kiss kissing wedding bride groom marriage marry married lover lovers passion affair
        valentine sweetheart boyfriend girlfriend husband wife honeymoon courtship romantic fiance fiancee
        divorce jealousy heartbreak desire embrace beloved admirer suitor intimacy seduction longing affection
        dating mistress""")),
    ("war", _words("""
        war wars battle battles battlefield army armies troops tank tanks invasion bomb bombs enemy regiment
        battalion infantry artillery trenches sniper rifle grenade combat military sergeant lieutenant colonel
        platoon warfare airstrike bombing casualties ceasefire siege commander wounded ammunition warship
        missile surrender soldiers wartime""")),
    ("horror", _words("""
        ghost ghosts vampire vampires zombie zombies monster monsters demon demons haunted curse nightmare
        horror terror corpse graveyard creepy scream evil possessed werewolf devil spooky undead satanic
        haunting phantom eerie sinister macabre occult supernatural paranormal scary terrifying gruesome
        creature""")),
    ("western", _words("""
        cowboy ranch ranches rancher ranchers rodeo saloon sheriff outlaw outlaws horse horses stallion pony
        saddle rider riders herd cattle wagon wagons stagecoach frontier settlers prairie homestead bandit
        bandits revolver horseback mustang ranching mule mules trail horsemen dusty""")),
    ("sports", _words("""
        football soccer baseball basketball tennis golf hockey rugby cricket coach coaches team teams player
        players championship championships tournament league stadium athlete athletes goal playoff playoffs
        trophy medal boxing boxer wrestling referee quarterback pitcher rookie sprinter marathon cyclist striker
        goalkeeper touchdown umpire teammate""")),
    ("comedy", _words("""
        comedy comedies comedic comedian comedians joke jokes laugh laughs laughter funny hilarious humor
        humorous clown clowns prank pranks parody satire sitcom slapstick gag gags silly goofy wacky quirky
        comic sketch spoof farce antics amusing witty sarcastic banter absurd""")),
    ("fantasy", _words("""
        wizard magic magical magician dragon dragons sorcerer witch witches witchcraft elves dwarf troll fairy
        fairies unicorn enchanted sword swords wand prophecy mythical myth myths legends mythology folklore
        realm magicians mystical mystic charms fable fables spirits""")),
    ("music", _words("""
        song songs singer singers band bands guitar piano concert concerts melody rock jazz album albums
        orchestra symphony violin drummer drums lyrics rhythm tune chorus choir opera composer musician
        musicians guitarist pianist saxophone trumpet ballad rapper songwriter vocals bassist harmony tempo
        cello flute""")),
    ("animals", _words("""
        wolf wolves bear bears lion lions tiger elephant elephants eagle deer rabbit rabbits owl dolphin
        dolphins whale whales shark sharks dog dogs cat cats puppy kitten bird birds snake snakes monkey monkeys
        gorilla zebra leopard cheetah jungle wildlife safari penguin turtle squirrel hawk crocodile rhino
        antelope frog butterfly""")),
    ("royalty", _words("""
        king queen prince princes princess emperor empress throne crown crowned royal palace duke duchess
        monarch monarchs monarchy dynasty empire nobleman nobles nobility aristocrat aristocracy coronation
        reign heir lord lady baron countess knight knights medieval pharaoh sultan regent abdication royalty
        majesty feudal""")),
    ("food", _words("""
        chef chefs kitchen recipe recipes restaurant restaurants cooking cook baking bakery cake cakes bread
        soup wine dinner meal meals pasta cheese chocolate dessert desserts pizza salad feast cuisine flavor
        flavors spices sauce oven tasting menu waiter vineyard cookbook banquet pastry cookies grill roast steak
        noodles delicious tasty butter sugar flour vegetables""")),
    ("sea", _words("""
        pirate pirates ship ships shipwreck sailor sailors sail sails sailing sailed boat boats sea seas waves
        deck crew fleet admiral vessel vessels navy naval maritime nautical lighthouse treasure cargo ferry
        yacht yachts schooner lifeboat overboard fishermen""")),
    ("school", _words("""
        student students classroom classrooms homework exam exams teenager teenagers prom campus college
        colleges university professor professors graduation semester tutor freshman freshmen sophomore dorm
        diploma textbook textbooks essay lecture lectures scholarship classmate classmates pupils curriculum
        undergraduate tuition kindergarten academic""")),
    ("medicine", _words("""
        hospital hospitals nurse nurses surgeon surgeons patient patients surgery disease diseases virus cancer
        illness diagnosis clinic clinics ambulance medicine medicines emergency vaccine vaccines epidemic
        pandemic infection infections symptoms physician physicians therapy treatment transplant medical
        pharmacy prescription injury fever paramedic cardiac coma antibiotics chemotherapy""")),
)

# The largest ``words_per_topic``: the size of the smallest theme.
MAX_WORDS_PER_TOPIC: int = min(len(words) for _, words in TOPIC_THEMES)

# Title patterns over two distinct words ``a``, ``b`` of the item's dominant topic (capitalised).
_TITLE_PATTERNS = ("The {a} {b}", "{a} and {b}", "The {a} of the {b}", "{a} {b}", "The {a}")


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
            f"n_topics <= {len(TOPIC_THEMES)} (the number of TOPIC_THEMES)": self.n_topics <= len(TOPIC_THEMES),
            f"words_per_topic <= {MAX_WORDS_PER_TOPIC} (the size of the smallest theme)":
                self.words_per_topic <= MAX_WORDS_PER_TOPIC,
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
    ``user_preferences`` [n_users, n_topics] belongs to raw id ``k + 1``. ``topic_words[t]`` is topic ``t``'s list
    and ``topic_names[t]`` the name of its theme (``TOPIC_THEMES[t]``), e.g. "crime".
    """

    ratings: pd.DataFrame
    items: pd.DataFrame
    item_topics: np.ndarray
    user_preferences: np.ndarray
    topic_words: tuple[tuple[str, ...], ...]
    topic_names: tuple[str, ...]
    config: SyntheticConfig


def _make_topic_words(rng: np.random.Generator, n_topics: int, words_per_topic: int) -> tuple[tuple[str, ...], ...]:
    """Topic ``t``'s words: ``words_per_topic`` distinct words of theme ``t``, drawn with ``rng``, in theme order."""
    topics = []
    for _, words in TOPIC_THEMES[:n_topics]:
        picked = np.sort(rng.choice(len(words), size=words_per_topic, replace=False))
        topics.append(tuple(words[i] for i in picked.tolist()))
    return tuple(topics)


def _titles(rng: np.random.Generator, dominant: np.ndarray, topic_words: tuple[tuple[str, ...], ...]) -> list[str]:
    """A title per item from one or two distinct words of its dominant topic in a short pattern ("The Galaxy of
    the Comet"); a title that is already taken gets " 2", " 3", ... (a sequel), so titles are unique."""
    n_items = len(dominant)
    wpt = len(topic_words[0])
    first = rng.integers(0, wpt, size=n_items)
    second = (first + 1 + rng.integers(0, wpt - 1, size=n_items)) % wpt
    pattern = rng.integers(0, len(_TITLE_PATTERNS), size=n_items)
    titles: list[str] = []
    seen: dict[str, int] = {}
    for t, a, b, p in zip(dominant.tolist(), first.tolist(), second.tolist(), pattern.tolist()):
        title = _TITLE_PATTERNS[p].format(a=topic_words[t][a].capitalize(), b=topic_words[t][b].capitalize())
        n = seen.get(title, 0) + 1
        seen[title] = n
        titles.append(title if n == 1 else f"{title} {n}")
    return titles


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

    # Titles: words of the dominant topic in a short pattern.
    titles = _titles(rng_titles, item_topics.argmax(axis=1), topic_words)

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
        topic_names=tuple(name for name, _ in TOPIC_THEMES[:n_topics]),
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
