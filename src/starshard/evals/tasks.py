"""RULER-style long-context tasks, generated offline and deterministically from a seed.

Every task hides one or more *needles* (short sentences holding the answers) in a haystack of
filler sentences, then asks for them. :func:`make_sample` sizes the haystack with the model's
tokenizer so that ``len(tokenizer(context + query)["input_ids"])`` is as close to the target as a
filler sentence allows (a few tokens) and never above it.

Tasks (see :data:`TASKS`):

- ``passkey``: a 5-digit pass key in repeated filler ("The grass is green. The sky is blue. ...").
- ``niah_single`` (number values), ``niah_single_word``, ``niah_single_uuid``: RULER's single
  needle, "One of the special magic numbers for <key> is: <value>.".
- ``niah_multikey``: 4 needles with different keys; one key is asked for (the others distract).
- ``niah_multivalue``: one key with 4 values; all 4 are asked for.
- ``niah_multiquery``: 4 needles with different keys; all 4 are asked for.

The niah tasks take ``value_type`` ("number", "word", "uuid") as an option of :func:`make_sample`.
The haystack is RULER's "noise" haystack (the same repeated filler as passkey).

Depth: the first answer's needle sits at ``depth``, the share of the context's characters before
it (to the nearest sentence boundary; the short instruction comes first, so 0 means just after
it); other needles sit at depths drawn from the seed. The default depth comes from the
seed through the golden-ratio sequence, so consecutive seeds spread their needles evenly
over the context.
"""
from __future__ import annotations

import random
import uuid
from dataclasses import asdict, dataclass, field

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")

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

VALUE_TYPES = {"number": ("number", "numbers"), "word": ("word", "words"),
               "uuid": ("uuid", "uuids")}
GOLDEN = 0.6180339887498949


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


@dataclass
class _Spec:
    """What a generator returns: everything but the filler."""
    preamble: str
    needles: list[tuple[str, float]]   # (sentence, depth in the context); needle 0 holds answers[0]
    query: str
    prefill: str
    answers: list[str]
    metadata: dict


# ----------------------------------------------------------------------------- generators

def passkey(rng: random.Random, depth: float) -> _Spec:
    key = str(rng.randint(10000, 99999))
    return _Spec(
        preamble="There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information there.",
        needles=[(f"The pass key is {key}. Remember it. {key} is the pass key.", depth)],
        query="What is the pass key?",
        prefill="The pass key is",
        answers=[key],
        metadata={})


def _distinct(rng: random.Random, n: int, draw) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = draw()
        if x not in out:
            out.append(x)
    return out


def _value(rng: random.Random, value_type: str) -> str:
    if value_type == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if value_type == "word":
        return rng.choice(VALUE_WORDS)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def niah(rng: random.Random, depth: float, *, num_keys: int = 1, num_values: int = 1,
         num_queries: int = 1, value_type: str = "number") -> _Spec:
    """RULER's needle-in-a-haystack: ``num_keys`` keys with ``num_values`` values each; the
    first ``num_queries`` keys are asked for."""
    if value_type not in VALUE_TYPES:
        raise ValueError(f"value_type must be one of {sorted(VALUE_TYPES)}, got {value_type!r}")
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
    return _Spec(
        preamble=f"Some special magic {many} are hidden within the following text. Make sure to "
                 f"memorize it. I will quiz you about the {many} afterwards.",
        needles=needles, query=query, prefill=prefill, answers=answers,
        metadata={"value_type": value_type, "keys": keys, "queried_keys": asked})


def _niah(value_type="number", **shape):
    def gen(rng, depth, value_type=value_type):
        return niah(rng, depth, value_type=value_type, **shape)
    return gen


TASKS = {
    "passkey": passkey,
    "niah_single": _niah("number"),
    "niah_single_word": _niah("word"),
    "niah_single_uuid": _niah("uuid"),
    "niah_multikey": _niah(num_keys=4),
    "niah_multivalue": _niah(num_values=4),
    "niah_multiquery": _niah(num_keys=4, num_queries=4),
}


# ----------------------------------------------------------------------------- sizing

def _num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _assemble(spec: _Spec, n: int) -> str:
    """The context with ``n`` filler sentences and each needle at the sentence boundary where the
    share of the context's characters before it is nearest its depth."""
    head = spec.preamble + "\n"
    pieces = [FILLER[i % len(FILLER)] for i in range(n)]
    total = len(head) + sum(len(p) + 1 for p in pieces) + sum(len(t) + 1 for t, _ in spec.needles)
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
                offset += len(pieces[i]) + 1
        pieces.insert(best, text)
        first = best + 1
    return head + " ".join(pieces) + "\n"


def _fit(spec: _Spec, target: int, tokenizer) -> tuple[str, int, int]:
    """The largest filler count whose prompt fits in ``target`` tokens (binary search)."""
    def count(n):
        return _num_tokens(tokenizer, _assemble(spec, n) + spec.query)

    base = count(0)
    if base > target:
        raise ValueError(f"target_tokens={target} is too small: the prompt without filler "
                         f"already has {base} tokens")
    lo, hi = 0, max(1, target // 8)
    while count(hi) <= target:     # grow the bracket
        lo, hi = hi, hi * 2
        if hi > 64 * (target + 64):
            raise ValueError("the tokenizer gives filler text no tokens; cannot size the prompt")
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


def make_sample(task: str, target_tokens: int, tokenizer, seed: int = 0,
                depth: float | None = None, **options) -> Sample:
    """Generate one sample of ``task`` sized to ``target_tokens`` with ``tokenizer`` (any callable
    returning ``{"input_ids": [...]}``, e.g. a Hugging Face tokenizer).

    ``options`` go to the generator (``value_type`` for the niah tasks). The same arguments give
    the same sample."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
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
    context, n_filler, n_tokens = _fit(spec, target_tokens, tokenizer)
    needle_depths = [context.index(text) / len(context) for text, _ in spec.needles]
    meta = dict(spec.metadata, needles=[t for t, _ in spec.needles], needle_depths=needle_depths,
                num_filler=n_filler, num_tokens=n_tokens)
    return Sample(task=task, target_len=target_tokens, seed=seed, context=context,
                  query=spec.query, prefill=spec.prefill, answers=list(spec.answers),
                  depth=float(depth), metadata=meta)
