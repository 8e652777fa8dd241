"""SQL `LIKE` patterns, matched in time linear in the pattern times the text, never worse.

`%` matches any run of characters (possibly none), `_` exactly one character, and the escape
character (a backslash unless the query says `ESCAPE 'c'`, none with `ESCAPE ''`) makes the
character after it literal, as in PostgreSQL. A pattern is split at its `%`s into segments;
a text matches when it starts with the first segment, ends with the last, and holds the
others in order in between, each found at its leftmost place (leftmost is always right:
a later place only leaves less text for the segments after it). No backtracking, so a
pattern like `%a%a%a%a%b` costs at most (pattern length + 1) x (text length + 1) steps, not
an exponential number.

Used by `syncd.core.query` for `LIKE` and `ILIKE` (which lower-cases both sides first).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_ESCAPE", "MAX_PATTERN_CHARS", "LikePattern", "PatternError"]

#: The escape character when a query gives no `ESCAPE` clause (PostgreSQL's).
DEFAULT_ESCAPE = "\\"
#: Longest LIKE pattern, in characters (a literal's or a bound parameter's).
MAX_PATTERN_CHARS = 512

# A segment: a tuple of characters, None standing for `_` (any one character).
_Segment = tuple[str | None, ...]


class PatternError(ValueError):
    """The pattern is malformed (ends with the escape character) or too long."""


@dataclass(frozen=True, slots=True)
class LikePattern:
    """A compiled LIKE pattern.

    Attributes:
        text: the pattern as written.
        escape: the escape character, or "" for none.
        segments: the parts between `%`s (the first and last may be empty).
        prefix: the literal characters every match starts with (before any wildcard).
    """

    text: str
    escape: str
    segments: tuple[_Segment, ...]
    prefix: str
    # Each segment as a string when it has no `_` (found with str.find), else None.
    needles: tuple[str | None, ...]

    @classmethod
    def compile(cls, text: str, escape: str = DEFAULT_ESCAPE) -> LikePattern:
        """Compile `text` with `escape` ("" for none).

        Raises:
            PatternError: the pattern is over `MAX_PATTERN_CHARS`, ends with the escape
                character, or `escape` is more than one character.
        """
        if len(escape) > 1:
            raise PatternError(f"ESCAPE must be one character or '', not {escape!r}")
        if len(text) > MAX_PATTERN_CHARS:
            raise PatternError(
                f"the LIKE pattern is {len(text)} characters; the limit is {MAX_PATTERN_CHARS}"
            )
        segments: list[_Segment] = []
        current: list[str | None] = []
        at = 0
        while at < len(text):
            char = text[at]
            if escape and char == escape:
                if at + 1 == len(text):
                    raise PatternError(
                        f"the LIKE pattern {text!r} ends with its escape character {escape!r}"
                    )
                current.append(text[at + 1])
                at += 2
                continue
            if char == "%":
                segments.append(tuple(current))
                current = []
            elif char == "_":
                current.append(None)
            else:
                current.append(char)
            at += 1
        segments.append(tuple(current))
        prefix: list[str] = []
        for literal in segments[0]:
            if literal is None:
                break
            prefix.append(literal)
        needles = tuple(
            None if None in segment else "".join(c for c in segment if c is not None)
            for segment in segments
        )
        return cls(text, escape, tuple(segments), "".join(prefix), needles)

    def lower(self) -> LikePattern:
        """The same pattern with its literal characters lower-cased (for ILIKE)."""
        segments = tuple(
            tuple(None if c is None else c.lower() for c in segment) for segment in self.segments
        )
        needles = tuple(None if n is None else n.lower() for n in self.needles)
        return LikePattern(self.text, self.escape, segments, self.prefix.lower(), needles)

    @property
    def is_prefix(self) -> bool:
        """True for `'abc%'`: every text starting with `prefix` matches, and no other."""
        return (
            len(self.segments) == 2
            and not self.segments[1]
            and (len(self.prefix) == len(self.segments[0]))
        )

    def matches(self, text: str, steps: list[int] | None = None) -> bool:
        """Whether `text` matches.

        Args:
            steps: if given, `steps[0]` grows by the character comparisons made (tests use it
                to check the bound in the module docstring).
        """
        segments = self.segments
        if len(segments) == 1:
            return len(text) == len(segments[0]) and _at(segments[0], text, 0, steps)
        first, last = segments[0], segments[-1]
        if len(first) + len(last) > len(text):
            return False
        if not _at(first, text, 0, steps):
            return False
        end = len(text) - len(last)
        if not _at(last, text, end, steps):
            return False
        at = len(first)
        needles = self.needles
        for i in range(1, len(segments) - 1):
            segment = segments[i]
            found = _find(segment, needles[i], text, at, end, steps)
            if found < 0:
                return False
            at = found + len(segment)
        return True


def _at(segment: _Segment, text: str, start: int, steps: list[int] | None) -> bool:
    # Whether `segment` matches `text` at `start` (the caller checked there is room).
    if steps is not None:
        steps[0] += len(segment)
    for offset, char in enumerate(segment):
        if char is not None and text[start + offset] != char:
            return False
    return True


def _find(
    segment: _Segment, needle: str | None, text: str, start: int, end: int, steps: list[int] | None
) -> int:
    # The leftmost place at or after `start` where `segment` matches, ending by `end`; -1.
    size = len(segment)
    if needle is not None:
        if steps is not None:
            steps[0] += end - start  # str.find is linear (two-way search for long needles)
        return text.find(needle, start, end)
    for place in range(start, end - size + 1):
        if _at(segment, text, place, steps):
            return place
    return -1
