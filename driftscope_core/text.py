"""User text as the pack shows it: which characters may not reach a table, a CSV cell or an error
message raw, and how messages quote user text (shortened, escaped)."""
from __future__ import annotations

import re

# Control characters (C0, DEL, C1), line and paragraph separators, and the bidirectional
# formatting characters (U+202E RIGHT-TO-LEFT OVERRIDE and its kin, which reorder what a
# terminal or a cell shows while staying invisible). Emoji and other printable text are fine.
HIDDEN_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
QUOTE_LIMIT = 60  # characters of user text quoted in an error message


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """`text` with every hidden character (HIDDEN_CHARS) written as an escape such as \\x00,
    \\x1b or \\u202e; everything else unchanged. For tables, CSV cells and messages."""
    return HIDDEN_CHARS.sub(_escape, text)


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """User text for an error message: in quotes, hidden characters escaped, and past `limit`
    characters cut with an ellipsis and the full length noted, so a message stays short."""
    text = str(text)
    head = visible(text[:limit])
    if len(text) <= limit and len(head) <= limit:
        return f"'{head}'"
    return f"'{head[:limit]}…' ({len(text):,} characters)"
