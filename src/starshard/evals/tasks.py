"""RULER-style long-context tasks, generated offline and deterministically from a seed.

A task's context is a haystack (filler sentences, a word list, a JSON object) sized with the
model's tokenizer, with *needles* (short sentences holding the answers) placed in it where the
task has any. :func:`make_sample` makes ``len(tokenizer(context + query)["input_ids"])`` as close
to the target as one piece of the haystack allows (a sentence, a list item, a key-value pair) and
never above it. Every sample carries ``prefill``, the answer's opening words, for the assistant
turn, and ``answers``, the strings a correct answer holds (see :mod:`starshard.evals.scoring`:
all of them must appear).

Tasks (see :data:`TASKS`):

- ``passkey``: a 5-digit pass key in repeated filler ("The grass is green. The sky is blue. ...").
- ``niah_single`` (number values), ``niah_single_word``, ``niah_single_uuid``: RULER's single
  needle, "One of the special magic numbers for <key> is: <value>.".
- ``niah_multikey``: 4 needles with different keys; one key is asked for (the others distract).
- ``niah_multivalue``: one key with 4 values; all 4 are asked for.
- ``niah_multiquery``: 4 needles with different keys; all 4 are asked for.
- ``<niah task>_prose`` (``niah_single_prose``, ..., ``niah_multiquery_prose``): the same over
  the real-prose haystack instead of the noise one.
- ``vt``: variable tracking. Chains of assignments ("VAR QKTZB = 48213." then
  "VAR MXRPL = QKTZB." ...), ``num_chains`` chains (default 3: one asked for, the others
  distract) of ``num_hops`` hops (default 4) spread over the haystack; the answer is every
  variable of the asked chain (``num_hops + 1`` names of 5 upper-case consonants).
- ``cwe``: common words extraction. A numbered list of words ("1. tuple 2. scope ..."):
  ``num_common`` (10) words appear ``common_freq`` times each, the others ``uncommon_freq`` (3)
  times; the answer is the 10 common words. ``common_freq`` defaults to RULER's 30, lowered in
  short prompts so that the common words still fit: ``min(30, uncommon_freq + 1 + n // 10)`` for
  ``n`` uncommon words. The words are those of the prose haystack (about 1,900); when a long
  prompt needs more uncommon words than that they repeat, still less often than a common word.
- ``fwe``: frequent words extraction. A text of coded words (``word_len`` random letters) whose
  counts follow Zipf's law (``alpha`` 2: the word of rank k appears ``n * k**-alpha / sum``
  times); the answer is the ``num_answers`` (3) most frequent, strictly more frequent than the
  next one.
- ``kv_retrieval``: InfiniteBench's key-value retrieval. A JSON object of uuid keys and uuid
  values; the value of one key is asked for.

Options (keyword arguments of :func:`make_sample`): ``haystack`` ("noise" or "prose") for
passkey, the niah tasks and vt; ``value_type`` ("number", "word", "uuid"), ``num_keys``,
``num_values`` and ``num_queries`` for the niah tasks; ``num_chains``, ``num_hops`` for vt;
``num_common``, ``common_freq``, ``uncommon_freq`` for cwe; ``num_answers``, ``alpha``,
``word_len``, ``vocab_size`` for fwe. A task's name fixes some of them (``niah_multikey`` is
``num_keys=4``); passing one overrides it.

Haystacks: "noise" is RULER's noise haystack, the same five filler sentences repeated. "prose" is
real English: sentences of the Python documentation that ships with CPython, cleaned of markup and
code and ordered by the seed (see :mod:`starshard.evals.haystack`). No prose sentence holds a
digit, a run of three capitals, a value word (:data:`VALUE_WORDS`) or the needles' words, so a
value found in the context is the needle's.

Depth: the first answer's needle sits at ``depth``, the share of the context's characters before
it (to the nearest piece boundary; the short instruction comes first, so 0 means just after it);
other needles sit at depths drawn from the seed (vt: the asked chain's later assignments between
``depth`` and the end, in order; kv_retrieval: the asked pair is the needle). The default depth
comes from the seed through the golden-ratio sequence, so consecutive seeds spread their needles
evenly over the context. cwe and fwe have no needle: they ignore ``depth`` (the sample still
records it) and their ``metadata["needle_depths"]`` is empty.
"""
from __future__ import annotations

import inspect
import json
import random
import string
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from typing import Callable

from . import haystack as _haystack

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
HAYSTACKS = ("noise", "prose")

# Key words (keys are "adjective-noun") and value words: disjoint from each other and from the
# filler and prompt text, so that an answer found in the context is the needle's.
KEY_ADJECTIVES = ("quick", "lazy", "brave", "calm", "eager", "fancy", "gentle", "happy", "jolly",
                  "kind", "lively", "proud", "silly", "witty", "zealous", "ancient", "bitter",
                  "clever", "damp", "fierce", "grumpy", "hollow", "icy", "noisy", "polite",
                  "rapid", "shy", "tame", "vast", "wild")
KEY_NOUNS = ("fox", "tiger", "otter", "falcon", "badger", "beetle", "camel", "donkey", "eagle",
             "ferret", "gecko", "heron", "iguana", "jackal", "koala", "lemur", "moose", "newt",
             "ocelot", "panda", "quail", "rabbit", "salmon", "toucan", "urchin", "viper",
             "walrus", "yak", "zebra", "lobster")
VALUE_WORDS = ("lantern", "violin", "harbor", "compass", "meadow", "pebble", "saddle", "trumpet",
               "velvet", "whistle", "anchor", "biscuit", "candle", "dagger", "feather", "goblet",
               "hammock", "igloo", "jigsaw", "kettle", "ladder", "mitten", "napkin", "orchard",
               "pillow", "quiver", "ribbon", "spindle", "thimble", "umbrella", "saxophone",
               "tambourine", "cobweb", "doorbell", "envelope", "flannel", "gazebo", "hatchet",
               "inkwell", "jukebox", "kazoo", "locket", "marble", "nutmeg", "oatmeal", "paddle",
               "quilt", "rudder", "satchel", "teapot", "ukulele", "vase", "wardrobe",
               "xylophone", "yoyo", "zipper", "bucket", "chimney", "drumstick", "easel")
CONSONANTS = "BCDFGHJKLMNPQRSTVWXZ"   # vt's names: no vowel, so no English word by chance

VALUE_TYPES = {"number": ("number", "numbers"), "word": ("word", "words"),
               "uuid": ("uuid", "uuids")}
GOLDEN = 0.6180339887498949

# a prose sentence holding one of these (case-insensitive) could pass for a needle's text
_NOT_IN_PROSE = VALUE_WORDS + ("magic", "pass key")


@dataclass
class Sample:
    """One prompt: ``context`` then ``query``; the answer opens with ``prefill``."""
    task: str
    target_len: int
    seed: int
    context: str
    query: str
    prefill: str
    answers: list[str]
    depth: float
    metadata: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The user turn: ``context + query`` (the text whose length was sized)."""
        return self.context + self.query

    def to_dict(self) -> dict:
        return asdict(self)


def _noise(n: int) -> list[str]:
    return [FILLER[i % len(FILLER)] for i in range(n)]


@dataclass
class _Spec:
    """What a generator returns. The context is ``preamble``, a newline, then ``pieces(n)`` (the
    sized part: ``n`` filler sentences, list items, ...) joined by ``sep`` inside ``brackets``
    with the needles inserted at their depths, then a newline; ``n >= min_pieces``."""
    preamble: str
    needles: list[tuple[str, float]]   # (text, depth in the context); needle 0 holds answers[0]
    query: str
    prefill: str
    answers: list[str]
    metadata: dict
    pieces: Callable[[int], list[str]] = _noise
    sep: str = " "
    brackets: tuple[str, str] = ("", "")
    min_pieces: int = 0


# ----------------------------------------------------------------------------- helpers

def _int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _distinct(rng: random.Random, n: int, draw, avoid: str = "") -> list[str]:
    """``n`` distinct draws, none of them (lower-cased) inside the text ``avoid``."""
    out: dict[str, None] = {}
    while len(out) < n:
        x = draw()
        if not (avoid and x.lower() in avoid):
            out[x] = None
    return list(out)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _value(rng: random.Random, value_type: str) -> str:
    if value_type == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if value_type == "word":
        return rng.choice(VALUE_WORDS)
    return _uuid(rng)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@lru_cache(maxsize=None)
def _prose() -> tuple[tuple[str, ...], ...]:
    """The prose paragraphs without the sentences that hold a word of :data:`_NOT_IN_PROSE`."""
    paragraphs = (tuple(s for s in p if not any(w in s.lower() for w in _NOT_IN_PROSE))
                  for p in _haystack.prose_paragraphs())
    return tuple(p for p in paragraphs if p)


def _filler(rng: random.Random, haystack: str) -> tuple[Callable[[int], list[str]], dict]:
    """The filler pieces for ``haystack`` and what the sample records about it."""
    if haystack == "noise":
        return _noise, {"haystack": "noise"}
    if haystack == "prose":
        return (_haystack.prose_stream(rng, _prose()),
                {"haystack": "prose", "haystack_source": _haystack.prose_source()})
    raise ValueError(f"haystack must be one of {list(HAYSTACKS)}, got {haystack!r}")


# ----------------------------------------------------------------------------- generators

def passkey(rng: random.Random, depth: float, *, haystack: str = "noise") -> _Spec:
    key = str(rng.randint(10000, 99999))
    pieces, meta = _filler(rng, haystack)
    return _Spec(
        # RULER's passkey prompt without its "I will quiz you ..." sentence and with the question
        # pointing at the text: the embedded 135M model then finds mid-context keys (measured:
        # 6/6 at 2k, against 1/5 with RULER's wording)
        preamble="There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize it.",
        needles=[(f"The pass key is {key}. Remember it. {key} is the pass key.", depth)],
        query="What is the pass key in the text above? Answer with the 5-digit number.",
        prefill="The pass key is",
        answers=[key],
        metadata=meta, pieces=pieces)


def niah(rng: random.Random, depth: float, *, num_keys: int = 1, num_values: int = 1,
         num_queries: int = 1, value_type: str = "number", haystack: str = "noise") -> _Spec:
    """RULER's needle-in-a-haystack: ``num_keys`` keys with ``num_values`` values each; the
    first ``num_queries`` keys are asked for."""
    if value_type not in VALUE_TYPES:
        raise ValueError(f"value_type must be one of {sorted(VALUE_TYPES)}, got {value_type!r}")
    _int("num_keys", num_keys, 1, 100)
    _int("num_values", num_values, 1, 100)
    _int("num_queries", num_queries, 1, num_keys)
    if value_type == "word" and num_keys * num_values > len(VALUE_WORDS):
        raise ValueError(f"num_keys * num_values must be at most {len(VALUE_WORDS)} (the value "
                         f"words) for value_type='word', got {num_keys * num_values}")
    one, many = VALUE_TYPES[value_type]
    keys = _distinct(rng, num_keys,
                     lambda: f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}")
    values = _distinct(rng, num_keys * num_values, lambda: _value(rng, value_type))
    needles, answers = [], []
    for i, key in enumerate(keys):
        for j in range(num_values):
            v = values[i * num_values + j]
            d = depth if (i, j) == (0, 0) else rng.random()
            needles.append((f"One of the special magic {many} for {key} is: {v}.", d))
            if i < num_queries:
                answers.append(v)
    asked = keys[:num_queries]
    if len(answers) == 1:
        query = f"What is the special magic {one} for {asked[0]} mentioned in the provided text?"
        prefill = f"The special magic {one} for {asked[0]} mentioned in the provided text is"
    else:
        query = (f"What are all the special magic {many} for {_join(asked)} mentioned in the "
                 f"provided text?")
        prefill = f"The special magic {many} for {_join(asked)} mentioned in the provided text are"
    pieces, meta = _filler(rng, haystack)
    return _Spec(
        preamble=f"Some special magic {many} are hidden within the following text. Make sure to "
                 f"memorize it. I will quiz you about the {many} afterwards.",
        needles=needles, query=query, prefill=prefill, answers=answers, pieces=pieces,
        metadata=dict(meta, value_type=value_type, keys=keys, queried_keys=asked))


def vt(rng: random.Random, depth: float, *, num_chains: int = 3, num_hops: int = 4,
       haystack: str = "noise") -> _Spec:
    """Variable tracking: ``num_chains`` chains of ``num_hops`` assignments each from a 5-digit
    value; the first chain (its first assignment at ``depth``) is asked for."""
    _int("num_chains", num_chains, 1, 50)
    _int("num_hops", num_hops, 1, 50)
    length = num_hops + 1
    names = _distinct(rng, num_chains * length,
                      lambda: "".join(rng.choice(CONSONANTS) for _ in range(5)))
    values = _distinct(rng, num_chains, lambda: str(rng.randint(10000, 99999)))
    needles = []
    for c in range(num_chains):
        chain = names[c * length:(c + 1) * length]
        if c == 0:   # the asked chain starts at depth, its later hops follow it in order
            depths = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in range(num_hops))
        else:
            depths = sorted(rng.random() for _ in range(length))
        needles.append((f"VAR {chain[0]} = {values[c]}.", depths[0]))
        needles += [(f"VAR {b} = {a}.", d) for a, b, d in zip(chain, chain[1:], depths[1:])]
    pieces, meta = _filler(rng, haystack)
    return _Spec(
        preamble="Memorize and track the chain(s) of variable assignment hidden in the following "
                 "text.",
        needles=needles,
        query=f"Find all variables that are assigned the value {values[0]} in the text above, "
              f"directly or through another variable.",
        prefill=f"The {length} variables assigned the value {values[0]} are:",
        answers=names[:length], pieces=pieces,
        metadata=dict(meta, value=values[0], chains=[names[c * length:(c + 1) * length]
                                                     for c in range(num_chains)]))


@lru_cache(maxsize=None)
def _cwe_words(instructions: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """The prose words not inside ``instructions``, and those of them inside no other one (a
    common word must not be found inside another word of the list an answer may repeat)."""
    words = tuple(w for w in _haystack.prose_words() if w not in instructions)
    inner = {w[i:j] for w in words for i in range(len(w)) for j in range(i + 1, len(w) + 1)
             if j - i < len(w)}
    return words, frozenset(w for w in words if w not in inner)


def cwe(rng: random.Random, depth: float, *, num_common: int = 10, common_freq: int | None = None,
        uncommon_freq: int = 3) -> _Spec:
    """Common words extraction: a numbered list where ``num_common`` words appear
    ``common_freq`` times each and ``n`` others ``uncommon_freq`` times; ``n`` is sized."""
    _int("num_common", num_common, 1, 50)
    _int("uncommon_freq", uncommon_freq, 1, 1000)
    if common_freq is not None:
        _int("common_freq", common_freq, uncommon_freq + 1, 100_000)
    preamble = ("Below is a numbered list of words. In these words, some appear more often than "
                "others. Memorize the ones that appear most often.")
    query = f"What are the {num_common} most common words in the list above?"
    prefill = f"The {num_common} most common words in the list are:"
    words, safe = _cwe_words(" ".join((preamble, query, prefill)).lower())
    order = rng.sample(words, len(words))
    common = [w for w in order if w in safe][:num_common]
    uncommon = [w for w in order if w not in common]
    base = rng.getrandbits(64)
    meta = {"common_words": common, "uncommon_freq": uncommon_freq}

    def pieces(n: int) -> list[str]:
        freq = common_freq or min(max(30, uncommon_freq + 1), uncommon_freq + 1 + n // num_common)
        if uncommon_freq * -(-n // len(uncommon)) >= freq:
            raise ValueError(f"cwe: the word list has only {len(uncommon)} uncommon words; "
                             f"{n} would repeat them as often as a common word")
        items = common * freq + [uncommon[i % len(uncommon)] for i in range(n)] * uncommon_freq
        random.Random(f"{base}/{n}").shuffle(items)
        meta["common_freq"] = freq     # the last call is the sized prompt's
        return [f"{i}. {w}" for i, w in enumerate(items, 1)]

    return _Spec(preamble=preamble, needles=[], query=query, prefill=prefill,
                 answers=common, metadata=meta, pieces=pieces)


def fwe(rng: random.Random, depth: float, *, num_answers: int = 3, alpha: float = 2.0,
        word_len: int = 6, vocab_size: int = 2000) -> _Spec:
    """Frequent words extraction: ``n`` coded words, the word of rank k drawn
    ``floor(n * k**-alpha / sum_j j**-alpha)`` times; the top ``num_answers`` are asked for."""
    _int("num_answers", num_answers, 1, 50)
    _int("word_len", word_len, 3, 20)
    _int("vocab_size", vocab_size, num_answers + 1, min(100_000, 26 ** word_len // 4))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 10:
        raise ValueError(f"alpha must be a number in (0, 10], got {alpha!r}")
    preamble = ("Read the following coded text and track the frequency of each coded word. Find "
                "the words that appear most often.")
    query = f"What are the {num_answers} most frequently appearing coded words in the text above?"
    prefill = f"The {num_answers} most frequent coded words in the text are:"
    avoid = " ".join((preamble, query, prefill)).lower()
    vocab = _distinct(rng, vocab_size, lambda: "".join(
        rng.choice(string.ascii_lowercase) for _ in range(word_len)), avoid=avoid)
    weights = [k ** -alpha for k in range(1, vocab_size + 1)]
    total = sum(weights)
    shares = [w / total for w in weights]
    # from this many words on, the last answer is drawn at least once more than the next word
    gap = shares[num_answers - 1] - shares[num_answers]
    min_words = int(1 / gap) + 1
    if min_words > 10_000_000:
        raise ValueError(f"alpha={alpha} is too flat to tell the top {num_answers} words apart")
    base = rng.getrandbits(64)

    def pieces(n: int) -> list[str]:
        words = [w for w, s in zip(vocab, shares) for _ in range(int(n * s))]
        random.Random(f"{base}/{n}").shuffle(words)
        return words

    return _Spec(preamble=preamble, needles=[], query=query, prefill=prefill,
                 answers=vocab[:num_answers], pieces=pieces, min_pieces=min_words,
                 metadata={"alpha": alpha, "ranked_words": vocab[:num_answers + 2]})


def _pair(key: str, value: str) -> str:
    return f"{json.dumps(key)}: {json.dumps(value)}"


def kv_retrieval(rng: random.Random, depth: float) -> _Spec:
    """InfiniteBench's key-value retrieval: a JSON object of uuids; the asked pair at ``depth``."""
    key, value = _uuid(rng), _uuid(rng)
    other = random.Random(rng.getrandbits(64))
    pairs: list[str] = []

    def pieces(n: int) -> list[str]:   # a prefix of one stream, whatever the order of calls
        while len(pairs) < n:
            k, v = _uuid(other), _uuid(other)
            if not {k, v} & {key, value}:
                pairs.append(_pair(k, v))
        return pairs[:n]

    return _Spec(
        preamble="Extract the value corresponding to the specified key in the JSON object below.",
        needles=[(_pair(key, value), depth)],
        query=f'What is the value associated with the key "{key}" in the JSON object above?',
        prefill=f'The value associated with the key "{key}" is',
        answers=[value], metadata={"key": key}, pieces=pieces, sep=", ", brackets=("{", "}"))


_NIAH = {
    "niah_single": partial(niah),
    "niah_single_word": partial(niah, value_type="word"),
    "niah_single_uuid": partial(niah, value_type="uuid"),
    "niah_multikey": partial(niah, num_keys=4),
    "niah_multivalue": partial(niah, num_values=4),
    "niah_multiquery": partial(niah, num_keys=4, num_queries=4),
}
TASKS: dict[str, Callable[..., _Spec]] = {
    "passkey": passkey,
    **_NIAH,
    **{f"{name}_prose": partial(gen, haystack="prose") for name, gen in _NIAH.items()},
    "vt": vt,
    "cwe": cwe,
    "fwe": fwe,
    "kv_retrieval": kv_retrieval,
}


# ----------------------------------------------------------------------------- sizing

def _num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _assemble(spec: _Spec, n: int) -> str:
    """The context with ``n`` pieces and each needle at the piece boundary where the share of the
    context's characters before it is nearest its depth."""
    head = spec.preamble + "\n" + spec.brackets[0]
    pieces, step = list(spec.pieces(n)), len(spec.sep)
    total = (len(head) + sum(len(p) + step for p in pieces)
             + sum(len(t) + step for t, _ in spec.needles))
    first = 0                                   # needles go in by depth, each after the last one
    for text, d in sorted(spec.needles, key=lambda nd: nd[1]):
        offset, best, best_err = len(head), first, None
        for i in range(len(pieces) + 1):
            if i >= first:
                err = abs(offset - d * total)
                if best_err is not None and err > best_err:
                    break                       # offsets only grow: past the best boundary
                best, best_err = i, err
            if i < len(pieces):
                offset += len(pieces[i]) + step
        pieces.insert(best, text)
        first = best + 1
    return head + spec.sep.join(pieces) + spec.brackets[1] + "\n"


def _fit(spec: _Spec, target: int, tokenizer) -> tuple[str, int, int]:
    """The largest piece count whose prompt fits in ``target`` tokens. Tokens grow about linearly
    with the pieces, so a few secant steps land near it, a gallop from there brackets it and a
    bisection pins it down: a plain bisection's answer in about half the tokenizer calls."""
    counts: dict[int, int] = {}

    def count(n):
        if n not in counts:
            counts[n] = _num_tokens(tokenizer, _assemble(spec, n) + spec.query)
        return counts[n]

    first = spec.min_pieces
    base = count(first)
    if base > target:
        raise ValueError(f"target_tokens={target} is too small: the smallest prompt of this "
                         f"task already has {base} tokens")
    n = max(first + 1, target // 8)
    for _ in range(3):             # secant steps through (first, base)
        c = count(n)
        if c <= base:
            break
        n = max(first, first + int((target - base) * (n - first) / (c - base)))
    if count(n) <= target:         # gallop up from n ...
        lo, step = n, 1
        while count(lo + step) <= target:
            lo, step = lo + step, step * 2
            if step > 64 * (target + 64):
                raise ValueError("the tokenizer gives filler text no tokens; cannot size the "
                                 "prompt")
        hi = lo + step
    else:                          # ... or down (count(first) <= target stops it)
        hi, step = n, 1
        while count(max(first, hi - step)) > target:
            hi, step = max(first, hi - step), step * 2
        lo = max(first, hi - step)
    while hi - lo > 1:             # invariant: count(lo) <= target < count(hi)
        mid = (lo + hi) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid
    return _assemble(spec, lo), lo, count(lo)


def default_depth(seed: int) -> float:
    """Depth for ``seed``: the golden-ratio sequence, evenly spread over consecutive seeds."""
    return (0.5 + seed * GOLDEN) % 1.0


def task_options(task: str) -> dict:
    """The options ``task`` takes, with its defaults (``make_sample``'s ``**options``)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    params = list(inspect.signature(TASKS[task]).parameters.values())[2:]
    return {p.name: p.default for p in params}


def make_sample(task: str, target_tokens: int, tokenizer, seed: int = 0,
                depth: float | None = None, **options) -> Sample:
    """Generate one sample of ``task`` sized to ``target_tokens`` with ``tokenizer`` (any callable
    returning ``{"input_ids": [...]}``, e.g. a Hugging Face tokenizer).

    ``options`` go to the task's generator (see :func:`task_options`). The same arguments give
    the same sample."""
    known = task_options(task)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for task {task!r}; it takes "
                         f"{sorted(known) or 'none'}")
    if isinstance(target_tokens, bool) or not isinstance(target_tokens, int) or target_tokens <= 0:
        raise ValueError(f"target_tokens must be a positive integer, got {target_tokens!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if depth is None:
        depth = default_depth(seed)
    elif not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    if not callable(tokenizer):
        raise ValueError("tokenizer must be callable, returning {'input_ids': [...]}")

    rng = random.Random(f"{task}/{seed}")
    spec = TASKS[task](rng, float(depth), **options)
    context, n_pieces, n_tokens = _fit(spec, target_tokens, tokenizer)
    needle_depths = [context.index(text) / len(context) for text, _ in spec.needles]
    meta = dict(spec.metadata, needles=[t for t, _ in spec.needles], needle_depths=needle_depths,
                num_filler=n_pieces, num_tokens=n_tokens)
    return Sample(task=task, target_len=target_tokens, seed=seed, context=context,
                  query=spec.query, prefill=spec.prefill, answers=list(spec.answers),
                  depth=float(depth), metadata=meta)
