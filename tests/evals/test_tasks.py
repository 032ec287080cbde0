"""RULER-style task generators and scoring (CPU, offline, fast)."""
import collections
import json
import random
import re

import pytest

from starshard.evals import (SCORERS, TASKS, Sample, make_sample, score, string_match_all,
                             string_match_part)
from starshard.evals import tasks as T
from starshard.evals.haystack import prose_paragraphs
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


NEEDLE_TASKS = sorted(t for t in TASKS if t not in ("cwe", "fwe"))
PROSE_TASKS = sorted(t for t in TASKS if t.endswith("_prose"))
NUMBERED = re.compile(r"(\d+)\. ([a-z]+)")
VAR = re.compile(r"VAR ([A-Z]+) = ([A-Z]+|\d+)\.")


def body(s):
    """The sized part of the context: what follows the one-line instruction."""
    head, rest = s.context.split("\n", 1)
    return rest.rstrip("\n")


def test_task_names():
    assert set(TASKS) == {
        "passkey", "niah_single", "niah_single_word", "niah_single_uuid", "niah_multikey",
        "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "kv_retrieval",
        *(f"{t}_prose" for t in ("niah_single", "niah_single_word", "niah_single_uuid",
                                 "niah_multikey", "niah_multivalue", "niah_multiquery"))}
    assert set(SCORERS) == set(TASKS)
    assert T.task_options("niah_multikey")["num_keys"] == 4
    assert T.task_options("niah_single_prose")["haystack"] == "prose"
    assert T.task_options("kv_retrieval") == {}


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("target", [500, 2000, 4000])
def test_length_within_tolerance(tok, task, target):
    s = make_sample(task, target, tok, seed=7)
    n = n_tokens(tok, s)
    assert n <= target
    assert target - n <= max(0.02 * target, 64)
    assert s.metadata["num_tokens"] == n and s.target_len == target
    # as close as one piece allows: one more piece (sentence, list item, pair) is too many
    spec = TASKS[task](random.Random(f"{task}/7"), s.depth)
    assert T._assemble(spec, s.metadata["num_filler"]) == s.context
    assert len(tok(T._assemble(spec, s.metadata["num_filler"] + 1) + s.query)["input_ids"]) > target


@pytest.mark.parametrize("task", sorted(TASKS))
def test_answers_in_context_not_in_question(tok, task):
    for seed in range(3):
        s = make_sample(task, 1000, tok, seed=seed)
        assert s.prefill and s.answers and len(set(s.answers)) == len(s.answers)
        for a in s.answers:
            assert a in s.context
            for text in (s.query, s.prefill, s.context.split("\n")[0]):
                assert a.lower() not in text.lower()


@pytest.mark.parametrize("task", NEEDLE_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_at_depth(tok, task, depth):
    s = make_sample(task, 1000, tok, seed=3, depth=depth)
    assert s.depth == depth
    pos = s.context.index(s.answers[0])          # the first answer's needle sits at the depth
    assert abs(pos / len(s.context) - depth) < 0.1
    assert abs(s.metadata["needle_depths"][0] - depth) < 0.1


def test_depth_default_spreads_over_seeds(tok):
    for task in ("passkey", "vt", "kv_retrieval", "niah_single_prose"):
        depths = [make_sample(task, 500, tok, seed=i).metadata["needle_depths"][0]
                  for i in range(10)]
        # every tenth of the context gets a needle from ten consecutive seeds
        assert len({int(d * 10) for d in depths}) >= 7, (task, depths)


def test_depth_ignored_without_needle(tok):
    for task in ("cwe", "fwe"):
        a = make_sample(task, 500, tok, seed=1, depth=0.1)
        b = make_sample(task, 500, tok, seed=1, depth=0.9)
        assert a.context == b.context and a.metadata["needle_depths"] == []


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
    assert len(make_sample("niah_multikey", 1000, tok, 1, num_keys=6).metadata["keys"]) == 6


@pytest.mark.parametrize("task", PROSE_TASKS)
def test_prose_haystack(tok, task):
    s = make_sample(task, 2000, tok, seed=4)
    assert s.metadata["haystack"] == "prose" and "pydoc_data" in s.metadata["haystack_source"]
    noise = make_sample(task.removesuffix("_prose"), 2000, tok, seed=4)
    assert noise.metadata["haystack"] == "noise"
    assert not any(f in s.context for f in T.FILLER)
    # the haystack is prose sentences and the needles, nothing else
    text = body(s)
    for needle in s.metadata["needles"]:
        assert text.count(needle) == 1
        text = text.replace(needle, "|")
    for sentence in sorted({x for p in prose_paragraphs() for x in p}, key=len, reverse=True):
        text = text.replace(sentence, "|")
    assert set(text) == {"|", " "} and text.count("|") == s.metadata["num_filler"] + len(
        s.metadata["needles"])
    # every answer occurs in its needle and nowhere else
    for a in s.answers:
        assert s.context.count(a) == sum(n.count(a) for n in s.metadata["needles"])


def test_prose_option_and_order(tok):
    a = make_sample("passkey", 1500, tok, seed=1, haystack="prose")
    b = make_sample("passkey", 1500, tok, seed=2, haystack="prose")
    assert a.metadata["haystack"] == "prose" and "The grass is green." not in a.context
    assert body(a).split(". ")[:3] != body(b).split(". ")[:3]   # the seed orders the prose
    v = make_sample("vt", 1500, tok, seed=1, haystack="prose")
    assert len(VAR.findall(v.context)) == 15


def test_vt_chain_by_parsing(tok):
    for seed, target in ((0, 500), (1, 2000), (2, 4000)):
        s = make_sample("vt", target, tok, seed=seed)
        statements = VAR.findall(s.context)
        assert len(statements) == 3 * 5
        value_of = {}
        for name, rhs in statements:               # in text order: each reference is defined
            assert name not in value_of
            value_of[name] = rhs if rhs.isdigit() else value_of[rhs]
        asked = re.search(r"the value (\d+)", s.query).group(1)
        assert sorted(n for n, v in value_of.items() if v == asked) == sorted(s.answers)
        assert len(set(value_of.values())) == 3     # two distractor chains
        for name in value_of:                       # the names occur only in their statements
            assert s.context.count(name) == sum(name in (a, b) for a, b in statements)
            assert set(name) <= set(T.CONSONANTS) and len(name) == 5
        assert f"The 5 variables assigned the value {asked} are:" == s.prefill
    s = make_sample("vt", 1000, tok, seed=0, num_chains=1, num_hops=2)
    assert len(VAR.findall(s.context)) == 3 and len(s.answers) == 3


def check_cwe(s, num_common=10):
    items = NUMBERED.findall(body(s))
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
    assert " ".join(f"{i}. {w}" for i, w in items) == body(s)
    counts = collections.Counter(w for _, w in items).most_common()
    top = [w for w, _ in counts[:num_common]]
    assert sorted(top) == sorted(s.answers)
    assert counts[num_common - 1][1] > counts[num_common][1]   # no tie at the cut
    others = {w for w, _ in counts} - set(s.answers)
    for a in s.answers:                                  # no answer hides in another word
        assert not any(a in o for o in others)
    return dict(counts)


def test_cwe_counts(tok):
    for seed, target in ((0, 500), (1, 2000), (2, 4000)):
        s = make_sample("cwe", target, tok, seed=seed)
        counts = check_cwe(s)
        assert {counts[a] for a in s.answers} == {s.metadata["common_freq"]}
        assert max(c for w, c in counts.items() if w not in s.answers) == 3
    # long enough for RULER's 30 repeats; the whitespace tokenizer counts 2 tokens an item
    s = make_sample("cwe", 4000, WhitespaceTokenizer(), seed=0)
    assert s.metadata["common_freq"] == 30
    s = make_sample("cwe", 3000, tok, seed=0, num_common=5, common_freq=12, uncommon_freq=2)
    counts = check_cwe(s, 5)
    assert {counts[a] for a in s.answers} == {12} and len(s.answers) == 5


def test_cwe_word_list_repeats_when_long():
    s = make_sample("cwe", 60_000, WhitespaceTokenizer(), seed=0)   # more than the word list
    counts = check_cwe(s)
    assert max(c for w, c in counts.items() if w not in s.answers) > 3


def test_fwe_counts(tok):
    for seed, target in ((0, 500), (1, 2000), (2, 4000)):
        s = make_sample("fwe", target, tok, seed=seed)
        words = body(s).split(" ")
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in words)
        counts = collections.Counter(words).most_common()
        assert sorted(w for w, _ in counts[:3]) == sorted(s.answers)
        assert counts[2][1] > counts[3][1]
        n, share = s.metadata["num_filler"], 1 / sum(k ** -2.0 for k in range(1, 2001))
        assert len(words) <= n
        assert counts[0][1] == pytest.approx(n * share, abs=1)        # Zipf, alpha 2
        assert counts[1][1] == pytest.approx(n * share / 4, abs=1)
    s = make_sample("fwe", 2000, tok, seed=0, num_answers=5, word_len=4, alpha=1.5)
    counts = collections.Counter(body(s).split(" ")).most_common()
    assert sorted(w for w, _ in counts[:5]) == sorted(s.answers) and counts[4][1] > counts[5][1]


def test_kv_retrieval_json(tok):
    for seed, target in ((0, 500), (1, 2000), (2, 4000)):
        s = make_sample("kv_retrieval", target, tok, seed=seed)
        data = json.loads(body(s))
        key = re.search(r'key "([0-9a-f-]{36})"', s.query).group(1)
        assert key == s.metadata["key"] and data[key] == s.answers[0]
        assert len(data) == s.metadata["num_filler"] + 1 == len(set(data.values()))
        assert s.context.count(s.answers[0]) == 1 and s.context.count(key) == 1
        keys = list(data)
        assert abs(keys.index(key) / len(keys) - s.depth) < 0.1
        assert key in s.prefill and s.answers[0] not in s.prefill


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic(tok, task):
    a = make_sample(task, 800, tok, seed=5)
    b = make_sample(task, 800, tok, seed=5)
    assert isinstance(a, Sample) and a == b
    answers = {tuple(make_sample(task, 800, tok, seed=i).answers) for i in range(5)}
    assert len(answers) == 5                     # different seeds, different answers
    assert make_sample(task, 800, tok, seed=6).context != a.context


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
    assert score(mv, "The numbers are " + ", ".join(mv.answers[:3])) == 3 / len(mv.answers)


def test_scoring_new_tasks(tok):
    v = make_sample("vt", 1000, tok, seed=2)
    assert score(v, " " + ", ".join(reversed(v.answers)) + ".") == 1.0
    assert score(v, " ".join(a.lower() for a in v.answers)) == 1.0
    distractor = v.metadata["chains"][1]
    # one name missing
    assert score(v, " ".join(v.answers[:-1] + distractor)) == pytest.approx(1 - 1 / len(v.answers))

    c = make_sample("cwe", 1000, tok, seed=2)
    assert score(c, " " + " ".join(f"{i}. {w}" for i, w in enumerate(c.answers, 1))) == 1.0
    assert score(c, " ".join(c.answers[:-1])) == pytest.approx(1 - 1 / len(c.answers))
    counts = collections.Counter(w for _, w in NUMBERED.findall(c.context))
    rare = [w for w, _ in counts.most_common()[10:13]]
    assert score(c, " ".join(c.answers[:-1] + rare)) == pytest.approx(1 - 1 / len(c.answers))

    f = make_sample("fwe", 1000, tok, seed=2)
    assert score(f, " " + ", ".join(f.answers).upper()) == 1.0
    fourth = collections.Counter(body(f).split()).most_common()[3][0]
    assert score(f, " ".join(f.answers[:2] + [fourth])) == pytest.approx(2 / len(f.answers))

    k = make_sample("kv_retrieval", 1000, tok, seed=2)
    assert score(k, f' "{k.answers[0]}".') == 1.0
    data = json.loads(body(k))
    wrong = next(v for v in data.values() if v != k.answers[0])   # a distractor's value
    assert score(k, f' "{wrong}".') == 0.0
    assert score(k, f' "{k.answers[0][:-1]}".') == 0.0

    p = make_sample("niah_multiquery_prose", 1000, tok, seed=2)
    assert score(p, " " + " and ".join(p.answers)) == 1.0
    assert score(p, " " + " and ".join(p.answers[1:])) == pytest.approx(1 - 1 / len(p.answers))


def test_string_match_functions():
    """RULER's metrics: string_match_all is the share of the expected strings present,
    string_match_part whether any is present (case-insensitive substrings)."""
    assert string_match_all("The answer: ABC and def", ["abc", "DEF"]) == 1.0
    assert string_match_all("abc", ["abc", "def"]) == 0.5
    assert string_match_all("ABC def", ["abc", "def", "ghi", "jkl"]) == 0.5
    assert string_match_all("nothing", ["abc", "def"]) == 0.0
    assert string_match_part("abc", ["abc", "def"]) == 1.0
    assert string_match_part("xx DEF", ["abc", "def", "ghi"]) == 1.0
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
    for task in ("vt", "cwe", "fwe", "kv_retrieval", "niah_single_prose"):
        with pytest.raises(ValueError, match="target_tokens"):
            make_sample(task, 20, tok)
    with pytest.raises(ValueError, match="depth"):
        make_sample("passkey", 500, tok, depth=1.5)
    with pytest.raises(ValueError, match="seed"):
        make_sample("passkey", 500, tok, seed="a")
    with pytest.raises(ValueError, match="value_type"):
        make_sample("niah_single", 500, tok, value_type="color")
    with pytest.raises(ValueError, match="haystack"):
        make_sample("niah_single", 500, tok, haystack="essay")
    with pytest.raises(ValueError, match=r"unknown option.*'colour'.*takes"):
        make_sample("vt", 500, tok, colour=1)
    with pytest.raises(ValueError, match="unknown option"):
        make_sample("kv_retrieval", 500, tok, haystack="prose")
    bad_options = [("niah_multikey", {"num_queries": 5}), ("niah_single", {"num_keys": 0}),
                   ("niah_single_word", {"num_values": 61}), ("vt", {"num_chains": 0}),
                   ("vt", {"num_hops": 1.5}), ("cwe", {"num_common": 0}),
                   ("cwe", {"common_freq": 3}), ("cwe", {"uncommon_freq": True}),
                   ("fwe", {"alpha": 0}), ("fwe", {"alpha": "2"}), ("fwe", {"num_answers": 0}),
                   ("fwe", {"vocab_size": 3}), ("fwe", {"word_len": 2})]
    for task, opts in bad_options:
        (name,) = opts
        with pytest.raises(ValueError, match=name):
            make_sample(task, 2000, tok, **opts)
    s = make_sample("passkey", 500, tok)
    s.task = "unknown"
    with pytest.raises(ValueError, match="scorer"):
        score(s, "x")
