"""The deterministic tokenizer: usage counts and stream pieces without any vocabulary.

A token is a run of word characters or one other non-space character, which is close
enough to BPE counts for cost demos and, above all, gives the same number every time.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\w+|[^\w\s]")
# Pieces keep their leading whitespace so that joining them gives the text back exactly.
_PIECE = re.compile(r"\s*(?:\w+|[^\w\s]+)|\s+")
_LINE = re.compile(r"[^\n]*\n|[^\n]+")


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def pieces(text: str) -> list[str]:
    """``text`` cut into word-ish stream pieces; ``"".join(pieces(t)) == t``."""
    return _PIECE.findall(text)


def lines(text: str) -> list[str]:
    """``text`` cut after each newline (kept); ``"".join(lines(t)) == t``."""
    return _LINE.findall(text)
