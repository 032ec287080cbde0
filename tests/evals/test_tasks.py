"""RULER-style task generators and scoring (CPU, offline, fast)."""
import re

import pytest

from starshard.evals import (TASKS, Sample, make_sample, score, string_match_all,
                             string_match_part)
from starshard.star.testing import tiny_tokenizer


class WhitespaceTokenizer:
    """One token per whitespace-separated word."""

    def __call__(self, text):
        return {"input_ids": list(range(len(text.split())))}


@pytest.fixture(scope="module", params=["tiny", "whitespace"])
def tok(request):
    return tiny_tokenizer() if request.param == "tiny" else WhitespaceTokenizer()


def n_tokens(tok, s):
    return len(tok(s.context + s.query)["input_ids"])


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("target", [500, 2000, 4000])
def test_length_within_tolerance(tok, task, target):
    s = make_sample(task, target, tok, seed=7)
    n = n_tokens(tok, s)
    assert n <= target
    assert target - n <= max(0.02 * target, 20)
    assert s.metadata["num_tokens"] == n and s.target_len == target


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_at_depth(tok, task, depth):
    s = make_sample(task, 1000, tok, seed=3, depth=depth)
    assert s.depth == depth
    for a in s.answers:                          # in the context, not in the question
        assert a in s.context
        assert a not in s.query and a not in s.prefill
    pos = s.context.index(s.answers[0])          # the first answer's needle sits at the depth
    assert abs(pos / len(s.context) - depth) < 0.1


def test_depth_default_spreads_over_seeds(tok):
    depths = [make_sample("passkey", 500, tok, seed=i).depth for i in range(10)]
    assert all(0.0 <= d <= 1.0 for d in depths)
    # every tenth of the context gets a needle from ten consecutive seeds
    assert len({int(d * 10) for d in depths}) >= 8


def test_shapes_of_the_tasks(tok):
    s = make_sample("passkey", 500, tok, seed=0)
    assert re.fullmatch(r"\d{5}", s.answers[0]) and s.prefill == "The pass key is"
    assert "The grass is green. The sky is blue." in s.context
    assert re.fullmatch(r"\d{7}", make_sample("niah_single", 500, tok, 0).answers[0])
    word = make_sample("niah_single_word", 500, tok, 0).answers[0]
    assert word.isalpha()
    u = make_sample("niah_single_uuid", 500, tok, 0).answers[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", u)
    assert make_sample("niah_single", 500, tok, 0, value_type="uuid").answers[0].count("-") == 4

    mk = make_sample("niah_multikey", 1000, tok, 1)
    assert len(mk.answers) == 1 and len(mk.metadata["keys"]) == 4
    assert mk.context.count("One of the special magic numbers for") == 4
    assert mk.metadata["queried_keys"][0] in mk.query
    mv = make_sample("niah_multivalue", 1000, tok, 1)
    assert len(mv.answers) == 4 and len(set(mv.answers)) == 4 and len(mv.metadata["keys"]) == 1
    mq = make_sample("niah_multiquery", 1000, tok, 1)
    assert len(mq.answers) == 4 and all(k in mq.query for k in mq.metadata["keys"])
    for s in (mk, mv, mq):
        needle = "One of the special magic numbers for {} is: {}."
        key = s.metadata["queried_keys"][0]
        assert needle.format(key, s.answers[0]) in s.context


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic(tok, task):
    a = make_sample(task, 800, tok, seed=5)
    b = make_sample(task, 800, tok, seed=5)
    assert isinstance(a, Sample) and a == b
    answers = {tuple(make_sample(task, 800, tok, seed=i).answers) for i in range(5)}
    assert len(answers) == 5                     # different seeds, different answers


def test_scoring_accepts_and_rejects(tok):
    s = make_sample("passkey", 500, tok, seed=2)
    key = s.answers[0]
    assert score(s, key) == 1.0
    assert score(s, f"{s.prefill} {key}. Remember it.") == 1.0
    off = key[:-1] + str((int(key[-1]) + 1) % 10)   # one digit off
    assert score(s, f"The pass key is {off}.") == 0.0
    assert score(s, "") == 0.0

    u = make_sample("niah_single_uuid", 500, tok, seed=2)
    other = make_sample("niah_single_uuid", 500, tok, seed=3).answers[0]
    assert score(u, f"The special magic uuid is: {u.answers[0].upper()}.") == 1.0  # case-insens.
    assert score(u, other) == 0.0

    w = make_sample("niah_single_word", 500, tok, seed=2)
    assert score(w, f"It is {w.answers[0].capitalize()}.") == 1.0

    mv = make_sample("niah_multivalue", 500, tok, seed=2)
    assert score(mv, "The numbers are " + ", ".join(mv.answers)) == 1.0
    assert score(mv, "The numbers are " + ", ".join(mv.answers[:3])) == 0.0


def test_string_match_functions():
    assert string_match_all("The answer: ABC and def", ["abc", "DEF"]) == 1.0
    assert string_match_all("abc", ["abc", "def"]) == 0.0
    assert string_match_part("abc", ["abc", "def"]) == 0.5
    assert string_match_part("ABC def", ["abc", "def", "ghi", "jkl"]) == 0.5
    assert string_match_part("nothing", ["abc"]) == 0.0
    with pytest.raises(ValueError, match="answers"):
        string_match_all("x", [])


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="task"):
        make_sample("no_such_task", 500, tok)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="target_tokens"):
            make_sample("passkey", bad, tok)
    with pytest.raises(ValueError, match="target_tokens"):  # smaller than the bare prompt
        make_sample("niah_multiquery", 10, tok)
    with pytest.raises(ValueError, match="depth"):
        make_sample("passkey", 500, tok, depth=1.5)
    with pytest.raises(ValueError, match="seed"):
        make_sample("passkey", 500, tok, seed="a")
    with pytest.raises(ValueError, match="value_type"):
        make_sample("niah_single", 500, tok, value_type="color")
    s = make_sample("passkey", 500, tok)
    s.task = "unknown"
    with pytest.raises(ValueError, match="scorer"):
        score(s, "x")
