"""Structured output: constraints (JSON schema, regex, choice, lark grammar) compiled for a
tokenizer, and per-choice matchers that say which tokens may come next as a packed bitmask.

The one module that knows the grammar engine (llguidance; docs/architecture.md says why it,
not xgrammar or outlines-core). Everything else sees `compile` -> `Grammar`, `Grammar.matcher()`
-> `Matcher` (`fill`, `advance`, `can_end`, `stopped`) and `ValueError`s with a message a
client can read.

A mask row is u32[V / 32] over the padded vocabulary V: bit j of word w allows token
32 w + j. EOS is allowed exactly where the grammar may end; ids past the tokenizer's
vocabulary (padding) never are.

Compiled grammars are cached by (kind, hash of the spec, tokenizer) in a bounded LRU, so a
schema sent again compiles nothing; a matcher is cheap to make from a cached grammar.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

KINDS = ("json", "regex", "choice", "grammar", "json_object")
CACHE_SIZE = 256  # compiled grammars kept (each a few KB of grammar text plus its lexer state)
_JSON_DEFAULTS = {"whitespace_flexible": False}  # compact JSON: fewer tokens, what clients parse anyway


def mask_words(vocab: int) -> int:
    """Words of a mask row for a padded vocabulary of `vocab` tokens: ceil(vocab / 32)."""
    return -(-vocab // 32)


class Grammar:
    """A compiled constraint for one tokenizer: makes matchers."""

    def __init__(self, lltok, grammar: str, vocab: int):
        self._lltok, self._grammar, self.vocab = lltok, grammar, vocab

    def matcher(self) -> "Matcher":
        import llguidance

        m = llguidance.LLMatcher(self._lltok, self._grammar)
        if m.is_error():
            raise ValueError(m.get_error())
        return Matcher(m, self.vocab)


class Matcher:
    """Where one choice stands in its grammar: which tokens may come next, and whether it may end."""

    def __init__(self, matcher, vocab: int):
        self._m, self.vocab = matcher, vocab

    def fill(self, row: np.ndarray) -> None:
        """Writes the allowed next tokens into row u32[V / 32] (any 4-byte integer view)."""
        import llguidance.numpy as llnp

        llnp.fill_next_token_bitmask(self._m, row.reshape(1, -1).view(np.int32), 0)

    def mask(self) -> np.ndarray:
        """The allowed next tokens as a fresh u32[V / 32]."""
        row = np.zeros((mask_words(self.vocab),), np.uint32)
        self.fill(row)
        return row

    def advance(self, token: int) -> bool:
        """Consumes a sampled token; False when the grammar did not allow it (the matcher is then
        in error and allows nothing more)."""
        return bool(self._m.consume_token(int(token))) and not self._m.is_error()

    def can_end(self) -> bool:
        """The text so far is a whole match: EOS may come next."""
        return bool(self._m.is_accepting())

    def stopped(self) -> bool:
        """Nothing but EOS may come next: the choice is complete."""
        return bool(self._m.is_stopped())

    def error(self) -> str:
        return self._m.get_error() if self._m.is_error() else ""


# --------------------------------------------------------------------------- compiling

_lock = threading.Lock()
_cache: "OrderedDict[tuple, Grammar]" = OrderedDict()
_tokenizers: dict = {}  # (id of the tiktoken Encoding, vocab, eos) -> (encoding, LLTokenizer)
stats = {"compiled": 0, "cached": 0}


def spec_key(kind: str, spec: Any) -> str:
    """A stable hash of a constraint: its kind and canonical JSON."""
    text = json.dumps([kind, spec], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def compile(kind: str, spec: Any, tokenizer, vocab: int) -> Grammar:  # noqa: A001 (the module's verb)
    """Compiles `spec` of `kind` (KINDS) for `tokenizer` (its tiktoken Encoding `_enc`, EOS
    `eos_id`) over a padded vocabulary of `vocab`; cached. Raises ValueError with the grammar
    engine's message for an invalid or unsupported spec.

      json         a JSON schema (dict, or its JSON text)
      json_object  any JSON object (spec ignored)
      regex        a regular expression the whole output must match
      choice       a list of strings: the output is exactly one of them
      grammar      a Lark grammar (llguidance's dialect)
    """
    if kind not in KINDS:
        raise ValueError(f"unknown constraint kind {kind!r}; known: {', '.join(KINDS)}")
    mask_words(vocab)
    lltok = _lltokenizer(tokenizer, vocab)
    key = (kind, spec_key(kind, spec), id(lltok))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            stats["cached"] += 1
            return _cache[key]
    grammar = Grammar(lltok, _grammar_text(kind, spec), vocab)
    _check(grammar)
    with _lock:
        stats["compiled"] += 1
        _cache[key] = grammar
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return grammar


def _grammar_text(kind: str, spec: Any) -> str:
    import llguidance

    G = llguidance.LLMatcher
    if kind in ("json", "json_object"):
        if kind == "json_object":
            spec = {"type": "object"}
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError as exc:
                raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(spec, (dict, bool)):
            raise ValueError("a JSON schema must be an object")
        return _call(G.grammar_from_json_schema, spec, defaults=_JSON_DEFAULTS)
    if kind == "regex":
        if not isinstance(spec, str):
            raise ValueError("a regex must be a string")
        return _call(G.grammar_from_regex, spec)
    if kind == "choice":
        if not isinstance(spec, (list, tuple)) or not spec or not all(isinstance(s, str) and s for s in spec):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        return _call(G.grammar_from_regex, "(" + "|".join(_escape(s) for s in spec) + ")")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("a grammar must be a non-empty string (Lark syntax)")
    return _call(G.grammar_from_lark, spec)


def _escape(text: str) -> str:
    """A regex that matches `text` literally: llguidance's regex syntax is Rust's, whose
    meta characters are escaped; everything else stands for itself."""
    return "".join("\\" + c if c in _META else c for c in text)


_META = set("\\.+*?()|[]{}^$#&-~")


def _call(fn, *args, **kwargs) -> str:
    try:
        return fn(*args, **kwargs)
    except ValueError:
        raise
    except Exception as exc:  # llguidance raises its own types for a spec it cannot read
        raise ValueError(str(exc)) from None


def _check(grammar: Grammar) -> None:
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar._grammar, grammar._lltok)
    if is_error:
        raise ValueError("; ".join(messages) or "invalid grammar")


def _lltokenizer(tokenizer, vocab: int):
    import llguidance.tiktoken

    enc = tokenizer._enc
    key = (id(enc), vocab, tokenizer.eos_id)
    with _lock:
        hit = _tokenizers.get(key)
    if hit is not None and hit[0] is enc:
        return hit[1]
    lltok = llguidance.tiktoken.lltokenizer_from_encoding(enc, n_vocab=vocab, eos_token=tokenizer.eos_id)
    with _lock:
        _tokenizers[key] = (enc, lltok)
    return lltok
