"""outputs.py on hand-made token streams (no device): stop strings with hold-back, split UTF-8
characters, EOS and length finishes, best_of ranking, text offsets and echo logprobs."""

import numpy as np

from pgpt_jax.outputs import RequestOutput
from pgpt_jax.request import Request
from pgpt_jax.tokenizer import get_tokenizer

TOK = get_tokenizer()
EOS = TOK.eos_id
NO_TOP = (np.zeros(0, np.int32), np.zeros(0, np.float32))


def feed(out: RequestOutput, ids, choice=0, lp=-1.0):
    """Adds tokens to one choice; returns the deltas streamed after each token."""
    c = out.choices[choice]
    streamed = []
    for t in ids:
        if c.finish is not None:
            break
        out.add_token(c, t, lp, *NO_TOP)
        streamed.append(out.deltas())
    return streamed


def make(prompt="Hi", **kw):
    request = Request(prompt=TOK.encode(prompt), **kw)
    return RequestOutput(request, TOK, max_new=request.max_new(128), context_length=128)


def test_stop_string_across_tokens_is_held_back_then_cut():
    out = make(max_tokens=10, stop=["! END"], stream=True)
    streamed = feed(out, TOK.encode("Hello, world! END here"))
    texts = ["".join(d.text for d in ds) for ds in streamed]
    # After " world!" the "!" could begin "! END": it is held back, and never sent.
    assert texts == ["Hello", ",", " world", "", ""]
    c = out.choices[0]
    assert c.finish == "stop" and c.text == "Hello, world" and streamed[-1][-1].finish_reason == "stop"
    assert c.token_ids == TOK.encode("Hello, world")  # tokens of the cut text only
    assert out.result().choices[0].text == "Hello, world"


def test_a_character_split_over_tokens_is_never_streamed_in_halves():
    out = make(max_tokens=10, stream=True)
    streamed = feed(out, TOK.encode(" 👍 é"))
    texts = ["".join(d.text for d in ds) for ds in streamed]
    # b" \xf0\x9f\x91" + b"\x8d" + b" \xc3\xa9": the first token ends inside the emoji.
    assert texts == [" ", "👍", " é"]
    assert "".join(texts) == " 👍 é" == out.choices[0].text


def test_eos_ends_with_stop_and_returns_no_text_length_at_max_tokens():
    out = make(max_tokens=3)
    feed(out, [TOK.encode(" a")[0], EOS])
    assert out.choices[0].finish == "stop" and out.choices[0].text == " a" and out.choices[0].generated == 2
    out = make(max_tokens=3)
    feed(out, TOK.encode(" one two three four"))
    assert out.choices[0].finish == "length" and out.choices[0].text == " one two three"
    # An unfinished character at the end shows as U+FFFD rather than vanishing.
    out = make(max_tokens=1)
    feed(out, TOK.encode("👍")[:1])
    assert out.choices[0].text == "\ufffd"


def test_best_of_returns_the_highest_mean_logprob_and_counts_every_token():
    out = make(max_tokens=2, n=2, best_of=3)
    for i, lp in enumerate((-3.0, -0.5, -1.0)):
        feed(out, TOK.encode(" x y"), choice=i, lp=lp)
    res = out.result()
    assert [c.index for c in res.choices] == [0, 1]
    assert [c.text for c in res.choices] == [" x y", " x y"] and res.completion_tokens == 6
    ranked = sorted(out.choices, key=lambda c: -c.logprob_sum / c.generated)[:2]
    assert [c.index for c in ranked] == [1, 2]


def test_text_offsets_follow_the_prompt_and_echo_logprobs_start_null():
    prompt = "Score me"
    out = make(prompt, max_tokens=2, logprobs=1, echo=True)
    ids = out.request.prompt
    out.set_prompt_logprobs(np.array([-2.0] * (len(ids) - 1)), np.zeros((len(ids) - 1, 1), np.int32),
                            np.full((len(ids) - 1, 1), -0.5, np.float32))
    feed(out, TOK.encode(" ok now"))
    (c,) = out.result().choices
    assert c.text == prompt + " ok now"
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [0, len(TOK.decode(ids[:1])), len(prompt), len(prompt) + len(" ok")]
    assert lp.tokens == [TOK.token_str(t) for t in ids + TOK.encode(" ok now")]
    assert lp.top_logprobs[1] == {TOK.token_str(0): -0.5, TOK.token_str(ids[1]): -2.0}  # top k plus the token
