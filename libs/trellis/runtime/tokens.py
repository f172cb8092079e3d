"""The one token estimate every service uses where it cannot count (no tokenizer).

The planner's budget reservations and rate limits, and a session's context budget (the
executor decides a fold with it, the planner picks the turns to fold with it), agree
because they count the same way.
"""

from __future__ import annotations

import math

#: About four characters per token: the usual rule of thumb for BPE vocabularies.
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """The tokens ``text`` is estimated to take (``CHARS_PER_TOKEN``)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)
