"""The real-prose haystack: English sentences from the documentation that ships with CPython.

No download is possible at run time, so the prose comes from the standard library's
``pydoc_data.topics`` (the text behind ``help("topics")``: the language reference rendered as
plain text, about 460k characters). :func:`clean_prose` keeps only plain English sentences from it:

- code blocks, grammar rules, tables, headings and definition terms are dropped, as is every
  sentence that is not 40 to 300 characters of plain text starting with a capital letter and
  ending with a period (a colon-ended sentence introduces a dropped code block);
- markup is undone: ``*emphasis*`` loses its stars, footnote marks ``[1]`` go, curly quotes
  become straight ones, words the line wrapping split at a hyphen are joined again; quoted identifiers (``"TypeError"``, ``"__len__()"``) and plain asides
  in parentheses stay, any other bracket, digit, slash, star or other symbol drops the sentence;
- no sentence holds a digit or a run of three capital letters, so no number, uuid or
  upper-case variable name drawn by a task can occur in the haystack by chance.

:func:`prose_paragraphs` gives about 1,400 distinct sentences (150k characters, about 32k tokens
of a BPE tokenizer) grouped in paragraphs in document order; a sentence repeated by another topic
is kept once. :func:`prose_stream` orders them for one sample: the paragraphs are shuffled by the
sample's random generator and, when a prompt needs more text than the pool holds, the next pass
over the pool is shuffled anew (so a 128k-token prompt reads the pool about four times, each
time in another order). The text depends on the Python version (the docs change between
releases); :func:`prose_source` names it, and the samples record it.
"""
from __future__ import annotations

import functools
import platform
import random
import re
from typing import Callable, Sequence

_ASCII = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'",
                        "\u2014": " - ", "\u2013": "-", "\u00a0": " "})
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[\"A-Z])")
_HYPHEN_WRAP = re.compile(r"([A-Za-z])- (?=[a-z])")   # "non-\nstring" wrapped at its hyphen
_LABEL = re.compile(r"^(?:\* |(?:Note|Warning|Caution|See also):\s+)+")
_FOOTNOTE = re.compile(r"\s*\[\d+\]")
_EMPHASIS = re.compile(r"\*([A-Za-z][A-Za-z -]*)\*")
_QUOTED_CODE = re.compile(r'"[A-Za-z_][A-Za-z_.]*(?:\(\))?"')
_ASIDE = re.compile(r"\([A-Za-z][A-Za-z ,;:'-]*\)")
# what is left once quoted identifiers and asides are masked must be plain text
_NOT_PLAIN = re.compile(r"[^A-Za-z ,.;:'?!-]|\.\.|::|^-|-$| '|' ")
_NEVER = re.compile(r"[0-9]|[A-Z]{3}")        # checked on the whole sentence, quotes included
_WORD = re.compile(r"(?<![\w\"'-])[a-z]{4,12}(?![\w\"'-])")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def clean_prose(text: str) -> list[list[str]]:
    """The plain English sentences of one plain-text documentation page, as paragraphs (lists of
    sentences; paragraphs left empty are dropped). See the module docstring for the rules."""
    paragraphs = []
    for para in _PARAGRAPH.split(text.translate(_ASCII)):
        lines = para.split("\n")
        if (len(lines) > 1 and not lines[0].lstrip().startswith("* ")
                and _indent(lines[1]) > _indent(lines[0])):
            lines = lines[1:]            # a definition's term (or a heading): its body is indented
        body = _LABEL.sub("", _HYPHEN_WRAP.sub(r"\1-", " ".join(line.strip() for line in lines)))
        body = _EMPHASIS.sub(r"\1", _FOOTNOTE.sub("", body))
        kept = []
        for s in _SENTENCE.split(body):
            s = " ".join(s.split())
            if not (40 <= len(s) <= 300 and s[0].isupper() and s.endswith(".")
                    and len(s.split()) >= 6) or _NEVER.search(s):
                continue
            if not _NOT_PLAIN.search(_ASIDE.sub("A", _QUOTED_CODE.sub("C", s[:-1]))):
                kept.append(s)
        if kept:
            paragraphs.append(kept)
    return paragraphs


@functools.lru_cache(maxsize=None)
def prose_paragraphs() -> tuple[tuple[str, ...], ...]:
    """Every paragraph of cleaned prose of ``pydoc_data.topics``, in document order; a sentence
    already seen (the topics overlap) is dropped."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:   # some trimmed Python builds leave it out
        raise ValueError("the prose haystack needs the standard library's pydoc_data package, "
                         "which this Python build lacks; use haystack='noise'") from e
    seen: set[str] = set()
    out = []
    for name in sorted(topics):
        for para in clean_prose(topics[name]):
            fresh = [s for s in para if s not in seen]
            seen.update(fresh)
            if fresh:
                out.append(tuple(fresh))
    return tuple(out)


def prose_source() -> str:
    """Where the prose comes from (the docs change between Python releases)."""
    return f"pydoc_data.topics (Python {platform.python_version()})"


@functools.lru_cache(maxsize=None)
def prose_words() -> tuple[str, ...]:
    """The distinct lower-case words (4 to 12 letters, not inside quotes or hyphenated) of the
    cleaned prose, in order of first occurrence: the word list of the ``cwe`` task."""
    words: dict[str, None] = {}
    for para in prose_paragraphs():
        for s in para:
            words.update(dict.fromkeys(_WORD.findall(_QUOTED_CODE.sub("", s))))
    return tuple(words)


def prose_stream(rng: random.Random,
                 paragraphs: Sequence[Sequence[str]] | None = None) -> Callable[[int], list[str]]:
    """``pieces(n)``: the first ``n`` sentences of ``paragraphs`` (default
    :func:`prose_paragraphs`) in an order drawn from ``rng``: paragraphs shuffled, sentences in
    order inside them, each new pass over the pool shuffled anew. ``pieces(n)`` is a prefix of
    ``pieces(n + 1)`` and depends only on ``rng``'s state at the call, not on the order of calls."""
    pool = [list(p) for p in (prose_paragraphs() if paragraphs is None else paragraphs) if p]
    if not pool:
        raise ValueError("no prose sentence to build a haystack from")
    order = random.Random(rng.getrandbits(64))
    sentences: list[str] = []

    def pieces(n: int) -> list[str]:
        while len(sentences) < n:
            for i in order.sample(range(len(pool)), len(pool)):
                sentences.extend(pool[i])
        return sentences[:n]
    return pieces
