"""The derived description: each clause appears exactly when the data supports it."""

from __future__ import annotations

import pytest

from headvis.features import derive_description
from headvis.features.describe import quote_token


def describe(**kwargs) -> str:
    base = dict(n_tokens=32768, count=131, max_activation=7.3129, top_tokens=[], top_examples=[])
    return derive_description(**{**base, **kwargs})


def test_full_description():
    text = describe(count=200, top_tokens=[(" the", 76), (" a", 24), (" an", 9), (" of", 5)],
                    top_examples=[(" the", " of")] * 5 + [(" a", " of"), (" the", " in"), (" the", None)])
    assert text == ('fires on " the" (38%), " a" (12%); strongest on " the" (7 of 8 top examples), '
                    'after " of" (6 of 8); max 7.31; active on 0.61% of 32,768 tokens')


def test_dead():
    assert describe(count=0, n_tokens=1234) == "never active in 1,234 tokens"


def test_minor_tokens_are_not_named():
    text = describe(count=1000, top_tokens=[("x", 40), ("y", 30)], top_examples=[("x", "a"), ("y", "b")])
    assert text.startswith('fires on many tokens, most often "x" (4%); max 7.31; active on 3.1% of')
    # neither the centre nor the token before is shared by two examples


def test_after_without_a_common_centre():
    text = describe(top_tokens=[("p", 131)], top_examples=[("p", "q"), ("r", "q"), ("s", "q"), ("t", "u")])
    assert 'strongest on' not in text
    assert 'top examples after "q" (3 of 4 top examples)' in text


def test_single_example():
    assert 'strongest on "x" (1 of 1 top examples); max' in describe(top_tokens=[("x", 131)], top_examples=[("x", None)])


def test_inexact_counts_are_lower_bounds():
    assert describe(top_tokens=[("z", 131)], exact=False).startswith('fires on "z" (>=100%)')


@pytest.mark.parametrize("token, shown", [(" the", '" the"'), ("\n", '"\\n"'), ('"', '"\\""'), ("é", '"é"')])
def test_tokens_are_quoted_visibly(token, shown):
    assert quote_token(token) == shown
