"""The offline GPT-2 tokenizer: known ids, special tokens, FIM, streaming detokenization."""

import pytest

from pgpt_jax import tokenizer as tokmod
from pgpt_jax.config import EOS_ID, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from pgpt_jax.tokenizer import IncrementalDetokenizer, Tokenizer, get_tokenizer

# Each of these characters is split over several GPT-2 tokens (checked below).
MULTIBYTE = "Hi 😀🎉 你好，世界! naïve 🤖 Ελληνικά 🇯🇵 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_known_ids_and_sizes(tok):
    assert tok.encode("hello world") == [31373, 995]
    assert tok.decode([31373, 995]) == "hello world"
    assert (tok.eos_id, tok.vocab_size, tok.fim) == (50256, 50257, False)
    assert get_tokenizer() is tok  # cached


def test_pattern_is_tiktokens_gpt2():
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    assert tokmod.GPT2_PAT_STR == openai_public.r50k_pat_str


def test_endoftext_is_special(tok):
    assert tok.encode("<|endoftext|>") == [EOS_ID]
    assert tok.encode("a<|endoftext|>b") == [64, EOS_ID, 65]
    assert tok.decode([64, EOS_ID, 65]) == "a<|endoftext|>b"
    assert tok.token_str(EOS_ID) == "<|endoftext|>"


def test_fim_tokens_only_with_fim(tok):
    text = "<|fim_prefix|>def f(<|fim_suffix|>):<|fim_middle|>"
    plain = tok.encode(text)
    assert not {FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE} & set(plain)
    assert tok.decode(plain) == text  # ordinary text without FIM
    fim = get_tokenizer(fim=True)
    assert (fim.fim, fim.vocab_size, fim.eos_id) == (True, 50260, EOS_ID)
    # User text cannot forge control tokens, even on a FIM model: only <|endoftext|> is parsed.
    ids = fim.encode(text)
    assert ids == plain and not {FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE} & set(ids)
    assert fim.decode([FIM_PREFIX, *fim.encode("def f("), FIM_SUFFIX]) == "<|fim_prefix|>def f(<|fim_suffix|>"
    assert fim.encode("hello world<|endoftext|>") == [31373, 995, EOS_ID]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.token_bytes(FIM_PREFIX)


def test_decode_roundtrip(tok):
    for text in ["", " leading and trailing  ", "tabs\tand\nnewlines\r\n", "I'm here, we'll see",
                 "12345 numbers 3.14", MULTIBYTE, "<|endoftext|>twice<|endoftext|>"]:
        assert tok.decode(tok.encode(text)) == text


def test_incremental_detokenizer_never_splits_a_character(tok):
    ids = tok.encode(MULTIBYTE)
    partial = [i for i in ids if tok.token_str(i).startswith("bytes:")]
    assert len(partial) >= 5  # the text really exercises split characters
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add([i]) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some tokens completed nothing and were held
    assert "".join(pieces) + detok.flush() == MULTIBYTE


def test_incremental_detokenizer_chunks_and_flush(tok):
    ids = tok.encode(MULTIBYTE)
    detok = IncrementalDetokenizer(tok)
    out = "".join(detok.add(ids[i:i + 3]) for i in range(0, len(ids), 3))
    assert out + detok.flush() == MULTIBYTE
    # A stream cut inside a character: the held bytes come out as one replacement char.
    emoji = tok.encode("😀")
    assert len(emoji) > 1
    detok = IncrementalDetokenizer(tok)
    assert detok.add(emoji[:-1]) == ""
    assert detok.flush() == "\ufffd"
    assert detok.add(tok.encode("ok")) == "ok"  # flush reset the decoder


def test_token_str_of_partial_bytes(tok):
    first, second = tok.encode("“")  # U+201C = e2 80 9c, split in two tokens
    assert tok.token_bytes(first) + tok.token_bytes(second) == "“".encode()
    assert tok.token_str(first) == "bytes:\\xe2\\x80"
    assert tok.token_str(second) == "bytes:\\x9c"
    space_emoji = tok.encode(" 😀")[0]
    assert tok.token_bytes(space_emoji) == b" \xf0\x9f\x98"
    assert tok.token_str(space_emoji) == "bytes: \\xf0\\x9f\\x98"
    assert tok.token_str(tok.encode(" world")[0]) == " world"


def test_corrupt_ranks_file_is_refused(monkeypatch):
    monkeypatch.setattr(tokmod, "RANKS_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="gpt2.tiktoken: sha256 is 306cd27f.*corrupt"):
        Tokenizer()


# -- the code models' space-run tokens ---------------------------------------------------

CODE_SNIPPET = (
    "class Box:\n    def __init__(self, x):\n        if x:\n            self.x = x  # set\n\n"
    "    def get(self):\n\treturn self.x    \n\n\n" + " " * 40 + "deep\n  \n"
)


def test_space_runs_are_one_token_each():
    from pgpt_jax.config import CODE_VOCAB, SPACE_RUNS, SPACE_TOKEN_BASE

    code = get_tokenizer(fim=True, spaces=True)
    assert code.vocab_size == CODE_VOCAB == SPACE_TOKEN_BASE + len(SPACE_RUNS)
    for n in SPACE_RUNS:
        (only,) = code.encode(" " * n)  # a whole run is one token
        assert only == SPACE_TOKEN_BASE + n - 2 and code.token_bytes(only) == b" " * n
    # Indentation: the newline, one run token, then " word" (the pattern gives the run's last space to the word).
    ids = code.encode("\n        return")
    assert [code.token_bytes(i) for i in ids] == [b"\n", b" " * 7, b" return"]
    plain = get_tokenizer(fim=True)
    assert len(plain.encode("\n        return")) == 9  # GPT-2 alone: one token per space
    with pytest.raises(ValueError, match="needs fim"):
        Tokenizer(fim=False, spaces=True)


def test_space_tokens_round_trip_exactly_and_leave_other_text_as_gpt2():
    import pathlib
    import sysconfig

    code, plain = get_tokenizer(fim=True, spaces=True), get_tokenizer(fim=True)
    texts = [CODE_SNIPPET, "Hello  world", " " * 100, "\t\t x\u00e9\U0001F600  \n"]
    texts += [p.read_text(encoding="utf-8") for p in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("json/*.py"))]
    for text in texts:
        ids = code.encode(text)
        assert code.decode(ids) == text
        det = IncrementalDetokenizer(code)  # streaming gives the same text, token by token
        assert "".join(det.add([i]) for i in ids) + det.flush() == text
        assert len(ids) <= len(plain.encode(text))
    single_spaced = "The json module: dump(obj, fp) writes JSON.\nSecond line, one space each."
    assert code.encode(single_spaced) == plain.encode(single_spaced)  # GPT-2's ids where no run occurs
    source = texts[-1]
    assert len(code.encode(source)) < 0.8 * len(plain.encode(source))  # indentation no longer a token per space
