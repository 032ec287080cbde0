"""Scoring as RULER does it: expected strings searched for in the prediction, case-insensitive."""
from __future__ import annotations

from typing import Callable, Sequence


def _check(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        answers = [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("answers must not be empty")
    return [str(a).lower() for a in answers]


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string_match_all: the share of expected strings that appear in ``prediction``
    (case-insensitive); 1.0 only when every one does."""
    pred = (prediction or "").lower()
    answers = _check(answers)
    return sum(a in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string_match_part: 1.0 if any expected string appears in ``prediction``
    (case-insensitive), else 0.0."""
    pred = (prediction or "").lower()
    return float(any(a in pred for a in _check(answers)))


# Task name -> metric, as RULER maps them: the retrieval and aggregation tasks score the share of
# their answers found (a sample is "correct" only with all of them); QA-like tasks would take part.
SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    task: string_match_all for task in (
        "passkey",
        "niah_single", "niah_single_word", "niah_single_uuid",
        "niah_multikey", "niah_multivalue", "niah_multiquery",
        "niah_single_prose", "niah_single_word_prose", "niah_single_uuid_prose",
        "niah_multikey_prose", "niah_multivalue_prose", "niah_multiquery_prose",
        "vt", "cwe", "fwe", "kv_retrieval")
}


def score(sample, prediction: str) -> float:
    """Score ``prediction`` (the model's answer, with or without the prefill) for ``sample``."""
    try:
        metric = SCORERS[sample.task]
    except KeyError:
        raise ValueError(f"no scorer for task {sample.task!r}; known: {sorted(SCORERS)}") from None
    return metric(prediction, sample.answers)
