"""The real-prose haystack (starshard.evals.haystack): cleaning and ordering."""
import random
import re

from starshard.evals.haystack import (clean_prose, prose_paragraphs, prose_source, prose_stream,
                                      prose_words)

PAGE = """\
The "while" statement
*********************

The "while" statement is used for repeated execution as long as an
expression is true:

   while_stmt ::= "while" assignment_expression ":" suite
                  ["else" ":" suite]

This repeatedly tests the expression and, if it is true, executes the
first suite; if the expression is false (which may be the first time
it is tested) the suite of the “else” clause is executed and the loop
terminates.  A "break" statement executed in the first suite
terminates the loop without executing the clause's suite.[1]

   >>> while x < 10:
   ...     x += 1

* A *very* long bullet that wraps onto a second line and still reads as
  plain English prose.

object.__len__(self)

   Called to implement the built-in function "len()".  Should return
   the length of the object, an integer ">=" 0.  Also see the non-
   negative rule, which the checker enforces in the middle layer.  The
   CPU enforces it too, in the lower layer of the interpreter.

Changed in version 3.8: Added the walrus operator to the statement.
"""


def test_clean_prose_keeps_plain_sentences_only():
    got = clean_prose(PAGE)
    assert got == [
        ["This repeatedly tests the expression and, if it is true, executes the first suite; if "
         "the expression is false (which may be the first time it is tested) the suite of the "
         "\"else\" clause is executed and the loop terminates.",
         "A \"break\" statement executed in the first suite terminates the loop without "
         "executing the clause's suite."],
        ["A very long bullet that wraps onto a second line and still reads as plain English "
         "prose."],
        ["Called to implement the built-in function \"len()\".",
         "Also see the non-negative rule, which the checker enforces in the middle layer."],
    ]
    # gone: the heading, the colon-ended lead-in, grammar, code, the definition term, the
    # sentence with a digit and a symbol, the one with capitals ("CPU"), the version note


def test_prose_paragraphs_follow_the_rules():
    paragraphs = prose_paragraphs()
    sentences = [s for p in paragraphs for s in p]
    assert len(sentences) > 500 and sum(map(len, sentences)) > 50_000
    assert len(set(sentences)) == len(sentences)
    for s in sentences:
        assert 40 <= len(s) <= 300 and s[0].isupper() and s.endswith(".")
        assert not re.search(r"[0-9]|[A-Z]{3}|[\[\]{}<>=*#@$%^`~|\\/+]", s), s
        assert s.isascii() and "  " not in s
    assert prose_paragraphs() is paragraphs                      # computed once
    assert prose_source().startswith("pydoc_data.topics (Python ")


def test_prose_words():
    words = prose_words()
    assert len(words) > 1000 and len(set(words)) == len(words)
    assert all(re.fullmatch(r"[a-z]{4,12}", w) for w in words)


def test_prose_stream_order():
    pool = [tuple(f"Sentence {c}{i}." for i in range(3)) for c in "abcdefgh"]
    size = 3 * len(pool)
    a = prose_stream(random.Random(1), pool)
    first = a(2 * size + 5)
    assert first[:size] != first[size:2 * size]                   # each pass shuffled anew
    assert sorted(first[:size]) == sorted(s for p in pool for s in p)
    for i in range(0, size, 3):                                   # paragraphs stay whole
        assert [s[-3] for s in first[i:i + 3]] == [first[i][-3]] * 3
    assert a(7) == first[:7]                                      # prefixes, in any order of calls
    b = prose_stream(random.Random(1), pool)
    assert b(7) == first[:7] and b(2 * size + 5) == first
    assert prose_stream(random.Random(2), pool)(size) != first[:size]
    real = prose_stream(random.Random(0))(50)
    assert len(real) == 50 and all(s in {x for p in prose_paragraphs() for x in p} for s in real)
