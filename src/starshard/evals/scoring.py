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
    """1.0 iff every expected string appears in ``prediction`` (case-insensitive), else 0.0."""
    pred = (prediction or "").lower()
    return float(all(a in pred for a in _check(answers)))


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """The fraction of expected strings that appear in ``prediction`` (case-insensitive)."""
    pred = (prediction or "").lower()
    answers = _check(answers)
    return sum(a in pred for a in answers) / len(answers)


# Task name -> metric. Retrieval and aggregation tasks need every answer, as in RULER (vt, cwe
# and fwe too); QA-like tasks (added later) take part.
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
