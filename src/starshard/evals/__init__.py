"""Long-context evaluation: RULER-style task generators and scoring.

>>> from starshard.evals import make_sample, score
>>> s = make_sample("passkey", 2000, tokenizer, seed=0)
>>> score(s, "The pass key is " + s.answers[0])
1.0
"""
from .scoring import SCORERS, score, string_match_all, string_match_part
from .tasks import TASKS, Sample, make_sample

__all__ = ["Sample", "TASKS", "make_sample", "SCORERS", "score", "string_match_all",
           "string_match_part"]
