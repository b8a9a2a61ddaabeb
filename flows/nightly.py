"""The nightly flow the schedule runs: training, then scoring with the champion that training leaves behind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from flows.params import NightlyParams
from flows.scoring import scoring_flow
from flows.training import TrainingResult, training_flow


@dataclass(frozen=True)
class NightlyResult:
    """The training result and the committed scores partition."""

    training: TrainingResult
    scores: Path


@flow(name="convmf-nightly", log_prints=True)
def nightly_flow(params: NightlyParams = NightlyParams()) -> NightlyResult:
    """Retrain (warm-started from the champion, judged on the days after a time cutoff; the new model becomes
    champion only if it is better), then score every user with the champion."""
    training = training_flow(params.training_params())  # nightly defaults: time-based split, warm start
    scores = scoring_flow(params.scoring_params())
    return NightlyResult(training, scores)
