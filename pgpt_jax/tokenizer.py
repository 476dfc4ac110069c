"""GPT-2 tokenizer: tiktoken's `gpt2` encoding, built offline from `assets/gpt2.tiktoken`.

The engine speaks token ids; this module is used at the edges (server, generate, cli) to
turn text into ids and back. Models trained with fill-in-the-middle get three more special
tokens (`config.FIM_TOKENS`), which live in the padded part of the vocabulary; code models
also get BPE tokens for runs of spaces (`config.SPACE_RUNS`, as OpenAI's Codex tokenizer
has), which keep Python's indentation to one token a line. They are ordinary merges (two
spaces, then longer runs), so decoding stays byte concatenation and every text round-trips
exactly; on text without runs of spaces the ids are GPT-2's.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import importlib.resources
from base64 import b64decode
from collections.abc import Iterable

import tiktoken

from pgpt_jax.config import EOS_ID, FIM_TOKENS, SPACE_RUNS, SPACE_TOKEN_BASE, GPTConfig

RANKS_FILE = "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's r50k/gpt2 pat_str, written out so that the encoding does not depend on the
# layout of tiktoken_ext (a test checks it still equals tiktoken's own).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"


def _load_ranks() -> dict[bytes, int]:
    """The 50,256 BPE merges (`base64-token rank` per line), checked against their sha256."""
    ref = importlib.resources.files("pgpt_jax") / "assets" / RANKS_FILE
    data = ref.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(
            f"{ref}: sha256 is {digest}, expected {RANKS_SHA256}; the GPT-2 BPE file is corrupt "
            "or was replaced (reinstall pgpt-jax, or restore it from tiktoken's gpt2 encoding)"
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[b64decode(token)] = int(rank)
    return ranks


def _space_ranks() -> dict[bytes, int]:
    """Runs of 2..33 spaces. BPE merges the lowest rank first, so a run of n spaces becomes
    pairs, then the longest runs in the table: one token for n <= 33."""
    return {b" " * n: SPACE_TOKEN_BASE + i for i, n in enumerate(SPACE_RUNS)}


class Tokenizer:
    """Text <-> GPT-2 token ids; `<|endoftext|>` (and the FIM tokens when `fim`) are special;
    `spaces` adds the space-run tokens of code models (after the FIM tokens, so it needs `fim`)."""

    def __init__(self, fim: bool = False, spaces: bool = False):
        if spaces and not fim:
            raise ValueError("the space-run tokens follow the FIM tokens: spaces needs fim")
        self.fim, self.spaces = fim, spaces
        self.eos_id = EOS_ID
        special = {ENDOFTEXT: EOS_ID, **(FIM_TOKENS if fim else {})}
        ranks = {**_load_ranks(), **(_space_ranks() if spaces else {})}
        self.vocab_size = len(ranks) + len(special)
        self._enc = tiktoken.Encoding(
            name="gpt2_fim_spaces" if spaces else "gpt2_fim" if fim else "gpt2",
            pat_str=GPT2_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=special,
            explicit_n_vocab=self.vocab_size,
        )

    def encode(self, text: str) -> list[int]:
        """Text -> ids. `<|endoftext|>` in the text is the EOS token (OpenAI allows it in prompts);
        no other special token is parsed from text: "<|fim_prefix|>" typed by a user is plain
        text, so user text cannot forge control tokens (those come only from `suffix`)."""
        return self._enc.encode(text, allowed_special={ENDOFTEXT}, disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return self._enc.decode_single_token_bytes(token_id)

    def token_str(self, token_id: int) -> str:
        """The token's text for OpenAI logprobs, or, when the token holds only part of a UTF-8
        character, OpenAI's `bytes:` form: printable ASCII as is, other bytes as `\\xNN`
        (b" \\xf0\\x9f" -> "bytes: \\xf0\\x9f")."""
        b = self.token_bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(chr(x) if 0x20 <= x < 0x7F and x != 0x5C else f"\\x{x:02x}" for x in b)


@functools.lru_cache(maxsize=None)
def get_tokenizer(fim: bool = False, spaces: bool = False) -> Tokenizer:
    """One tokenizer per kind per process: building the BPE table takes ~0.1 s."""
    return Tokenizer(fim=fim, spaces=spaces)


def tokenizer_for(config: GPTConfig) -> Tokenizer:
    """The tokenizer a model was trained with."""
    return get_tokenizer(fim=config.fim, spaces=config.space_tokens)


class IncrementalDetokenizer:
    """Streams text token by token without ever emitting half a UTF-8 character.

    An emoji or CJK character is often split over two or three tokens; the incremental
    decoder holds the first bytes until the character is complete.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, ids: Iterable[int]) -> str:
        """The text completed by these tokens (possibly "")."""
        data = b"".join(self._tok.token_bytes(int(i)) for i in ids)
        return self._decoder.decode(data)

    def flush(self) -> str:
        """Whatever is held (an unfinished character becomes U+FFFD); resets the decoder."""
        return self._decoder.decode(b"", final=True)
