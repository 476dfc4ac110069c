"""Speculative decoding without a draft model: n-gram (prompt-lookup) proposals, on the host.

A running row proposes the tokens that followed the latest earlier occurrence of its last n
tokens in its prompt + output, trying n from `max_n` down to `min_n` (vLLM's
`prompt_lookup_max` / `prompt_lookup_min`). Where the continuation reaches the end of the
sequence it goes on as a copy that overlaps itself (the match says the text repeats with
period `len - n - i`), so a loop shorter than k still proposes k tokens.

`Speculative` is the engine's setting (`--speculative ngram:K[:MIN-MAX]`); the planner asks
`propose` for each row, the device verifies (programs.verify). Plain numpy, no JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Speculative:
    """k proposals a row at most, from n-grams of min_n..max_n tokens."""

    k: int
    min_n: int = 1
    max_n: int = 3

    def __post_init__(self):
        if self.k < 1 or self.min_n < 1 or self.max_n < self.min_n:
            raise ValueError(f"speculative: need k >= 1 and 1 <= min_n <= max_n, got {self}")


def parse(text: Optional[str]) -> Optional[Speculative]:
    """"ngram:4" or "ngram:4:1-3" (k, then n-gram sizes min-max) -> Speculative; None, "" or
    "off" -> None. Raises ValueError with the expected form."""
    if text is None or text in ("", "off"):
        return None
    parts = text.split(":")
    try:
        if parts[0] != "ngram" or len(parts) not in (2, 3):
            raise ValueError
        k = int(parts[1])
        if len(parts) == 2:
            return Speculative(k)
        lo, hi = (int(p) for p in parts[2].split("-"))
        return Speculative(k, lo, hi)
    except ValueError:
        raise ValueError(f"--speculative {text!r}: expected ngram:K or ngram:K:MIN-MAX "
                         "(K proposals a row, n-grams of MIN..MAX tokens), e.g. ngram:4 or ngram:4:1-3") from None


def propose(ids: np.ndarray, k: int, min_n: int, max_n: int) -> np.ndarray:
    """ids i32[n] (prompt + output) -> up to k proposed next tokens, i32[<= k] (empty: no match).

    For n = max_n .. min_n: the latest start i < len - n with ids[i:i+n] == ids[-n:] (so at
    least one token follows it); the proposal is ids[i+n], ids[i+n+1], ..., repeating the
    last `len - n - i` tokens once it reaches the end."""
    size = len(ids)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        tail = ids[size - n:]
        hit = ids[: size - n] == tail[0]
        for j in range(1, n):
            hit &= ids[j: size - n + j] == tail[j]
        starts = np.flatnonzero(hit)
        if starts.size:
            i = int(starts[-1])
            period = size - n - i
            return ids[i + n + np.arange(k) % period]
    return ids[:0]
