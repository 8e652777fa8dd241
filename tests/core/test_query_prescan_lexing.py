"""`prescan` reads comments as sqlglot reads them (edge review of issue 10, item 8).

A quote inside a comment must not start a literal for `prescan`: it would hide everything up
to the next quote (or the end of the text) from the counts, while sqlglot, skipping the
comment, parses all of it. `-- '` then 16 KiB of conditions compiled for 200+ ms, ten times
the bound `prescan` exists to keep.
"""

from __future__ import annotations

import random

import pytest
import sqlglot
from sqlglot.errors import SqlglotError
from sqlglot.tokens import TokenType

from syncd.core.query import MAX_NESTING, _lex, prescan
from syncd.errors import LimitExceeded, SubscriptionError

BASE = "SELECT * FROM item WHERE "
MANY_ORS = " OR ".join(f"owner = 'n{i}'" for i in range(800))
DEEP = "(" * (MAX_NESTING + 10) + "id = 1" + ")" * (MAX_NESTING + 10)


def scan(sql: str) -> None:
    prescan(sql, max_bytes=16 << 10, max_terms=64)


@pytest.mark.parametrize(
    "hider",
    [
        "-- '\n",
        "-- '\r",
        "/* ' */ ",
        "/*+ ' */ ",
        "{# ' #} ",
        "/* /* */ ' */ ",  # nested: the quote is still inside the comment
        "{# {# #} ' #} ",
        "{{-- ",  # "{{-" then "-" for sqlglot: no comment at all
    ],
    ids=[
        "line-lf",
        "line-cr",
        "block",
        "hint",
        "jinja",
        "nested-block",
        "nested-jinja",
        "operator-then-dash",
    ],
)
@pytest.mark.parametrize(
    ("body", "error"),
    [(MANY_ORS, LimitExceeded), (DEEP, SubscriptionError)],
    ids=["conditions", "nesting"],
)
def test_a_quote_in_a_comment_hides_nothing(hider: str, body: str, error: type[Exception]) -> None:
    """What follows a comment holding a quote (or a "--" that is no comment) is counted, as
    sqlglot parses it."""
    with pytest.raises(error):
        scan(BASE + hider + body)


def test_comments_and_quoted_comment_markers_still_pass() -> None:
    """Ordinary comments, and comment markers inside literals, change nothing."""
    scan(BASE + "owner = '--' /* why: 'x' */ AND id = 1 -- trailing, it's fine")
    scan(BASE + "owner = '/*' AND id = 2")
    scan('SELECT * FROM "item--x" WHERE id = 3')


def _sqlglot_counts(sql: str) -> tuple[int, int] | None:
    """(tokens, deepest parenthesis) as sqlglot's tokenizer sees `sql`, or None if it fails."""
    try:
        tokens = sqlglot.tokenize(sql)
    except SqlglotError:
        return None
    depth = deepest = 0
    for token in tokens:
        if token.token_type is TokenType.L_PAREN:
            depth += 1
            deepest = max(deepest, depth)
        elif token.token_type is TokenType.R_PAREN:
            depth -= 1
    return len(tokens), deepest


def _prescan_counts(sql: str) -> tuple[int, int]:
    depth = deepest = count = 0
    for token, _ in _lex(sql):
        count += 1
        if token == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif token == ")":
            depth -= 1
    return count, deepest


def test_prescan_never_sees_less_than_sqlglot() -> None:
    """Random texts of comment markers, quotes and parentheses: `prescan` counts at least as
    many tokens, and at least as deep a nesting, as sqlglot's tokenizer finds."""
    rng = random.Random(20261202)
    alphabet = ["'", '"', "--", "-", "/*", "*/", "/", "*", "+", "{#", "#}", "{", "#", "}"]
    # Words stand alone: "1a" is one word here, a number and a name for sqlglot.
    alphabet += ["(", ")", "(", ")", " a ", " 1 ", " ", "\n", "\r", "''", "N'"]
    # sqlglot's operators that end in "-" ("{{-", "{%-", "-|-") win over a "--" after them.
    alphabet += ["{{", "{%", "%", "|", "}}", "/*+", '""', ";", ","]
    checked = 0
    for _ in range(4000):
        sql = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        theirs = _sqlglot_counts(sql)
        if theirs is None:
            continue
        checked += 1
        ours = _prescan_counts(sql)
        assert ours[0] >= theirs[0] and ours[1] >= theirs[1], (sql, ours, theirs)
    assert checked > 1000
