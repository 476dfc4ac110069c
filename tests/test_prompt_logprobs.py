"""vLLM's `prompt_logprobs` on /v1/completions.

The real engine on the tiny random model behind its own server (the same small engine as
test_return_token_ids.py: one prompt bucket, two slots; nothing compiles after warm-up).
The values are checked against echo + logprobs for the same prompt, the ranks against a
full forward pass on the host; then the shape (null first, one entry per prompt token),
without echo, with max_tokens 0, n=2, the field absent, and the 400s. The `suffix` case
runs on outputs.py directly (the tiny model has no FIM tokens).
"""

import json

import numpy as np
import pytest

from pgpt_jax.model import forward, init_cache
from test_outputs import TOK, make
from test_return_token_ids import completion, post, small_server
from test_server import NO_EOS
from test_server_helpers import error_of

PROMPT = "Once upon a time, in a land far away"
TOL = 1e-6  # the program's logits and a host forward pass differ by float rounding


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Logits f64[T, V] of a full forward pass over PROMPT, control tokens -inf."""
    ids = TOK.encode(PROMPT)
    cfg = tiny_model.config
    logits, _ = forward(tiny_model, np.array([ids]), np.arange(len(ids))[None], init_cache(cfg, 1, len(ids)))
    logits = np.asarray(logits[0], np.float64)  # position i predicts token i + 1
    logits[:, list(cfg.never_emitted)] = -np.inf
    return logits


@pytest.fixture(scope="module")
def srv(tiny_model, reference):
    # `reference` first: its compiles happen before warm-up and are not counted as the server's.
    yield from small_server(tiny_model)


def prompt_ids(srv, text: str = PROMPT) -> list[int]:
    return completion(srv, prompt=text, max_tokens=0, return_token_ids=True)["choices"][0]["prompt_token_ids"]


def test_values_equal_echo_logprobs_and_entries_hold_the_token_and_top_k(srv):
    k = 3
    ids = prompt_ids(srv)
    echo = completion(srv, prompt=PROMPT, max_tokens=0, echo=True, logprobs=k)["choices"][0]["logprobs"]
    (c,) = completion(srv, prompt=PROMPT, max_tokens=0, prompt_logprobs=k)["choices"]
    pl = c["prompt_logprobs"]
    assert len(pl) == len(ids) and pl[0] is None
    for i in range(1, len(ids)):
        entry = pl[i]
        own = entry[str(ids[i])]
        assert own["logprob"] == pytest.approx(echo["token_logprobs"][i], abs=1e-5)
        assert own["decoded_token"] == TOK.decode([ids[i]])
        assert next(iter(entry)) == str(ids[i])  # the prompt token comes first, as in vLLM
        echo_top = echo["top_logprobs"][i]  # the same top k plus the token, keyed by token text
        assert sorted(TOK.token_str(int(t)) for t in entry) == sorted(echo_top)
        for t, v in entry.items():
            assert v["decoded_token"] == TOK.decode([int(t)])
            assert v["logprob"] == pytest.approx(echo_top[TOK.token_str(int(t))], abs=1e-5)
        if len(entry) == k + 1:  # the prompt token is outside the top k, which rank 1..k
            assert own["rank"] > k
            assert sorted(v["rank"] for t, v in entry.items() if t != str(ids[i])) == list(range(1, k + 1))
        else:
            assert len(entry) == k and sorted(v["rank"] for v in entry.values()) == list(range(1, k + 1))
        by_logprob = sorted(entry.values(), key=lambda v: -v["logprob"])
        assert [v["rank"] for v in by_logprob] == sorted(v["rank"] for v in entry.values())


def test_ranks_match_a_full_forward_pass(srv, reference):
    ids = prompt_ids(srv)
    assert ids == TOK.encode(PROMPT)
    (c,) = completion(srv, prompt=PROMPT, max_tokens=0, prompt_logprobs=0)["choices"]
    pl = c["prompt_logprobs"]
    checked = 0
    for i in range(1, len(ids)):
        (entry,) = pl[i].values()  # prompt_logprobs 0: the prompt token alone
        row, own = reference[i - 1], reference[i - 1, ids[i]]
        # Float noise: tokens within TOL of the prompt token's logit may fall either side.
        lo, hi = 1 + int(np.sum(row > own + TOL)), int(np.sum(row > own - TOL))  # hi: not counting itself
        assert lo <= entry["rank"] <= hi, (i, entry, lo, hi)
        if lo == hi:
            assert entry["rank"] == 1 + int(np.sum(row > own))
            checked += 1
    assert checked >= 3


def test_without_echo_with_generation_and_n2_every_choice_carries_the_list(srv):
    ids = prompt_ids(srv)
    body = completion(srv, prompt=PROMPT, max_tokens=4, n=2, seed=1, logit_bias=NO_EOS, prompt_logprobs=2)
    a, b = body["choices"]
    assert a["prompt_logprobs"] == b["prompt_logprobs"] and len(a["prompt_logprobs"]) == len(ids)
    assert a["logprobs"] is None and not a["text"].startswith(PROMPT)  # no echo, no logprobs asked
    assert body["usage"]["completion_tokens"] == 8
    assert list(a) == ["text", "index", "logprobs", "finish_reason", "prompt_logprobs"]
    # With echo and logprobs as well: both answers, each as asked.
    (c,) = completion(srv, prompt=PROMPT, max_tokens=2, echo=True, logprobs=1, prompt_logprobs=2,
                      logit_bias=NO_EOS)["choices"]
    assert c["prompt_logprobs"] == a["prompt_logprobs"]
    assert c["text"].startswith(PROMPT) and len(c["logprobs"]["tokens"]) == len(ids) + 2


def test_two_prompts_each_get_their_own_list(srv):
    other = "The end"
    body = completion(srv, prompt=[PROMPT, other], max_tokens=0, prompt_logprobs=1)
    first, second = (c["prompt_logprobs"] for c in body["choices"])
    assert len(first) == len(prompt_ids(srv)) and len(second) == len(prompt_ids(srv, other))


def test_absent_or_null_field_leaves_the_answer_unchanged(srv):
    body = dict(prompt=PROMPT, max_tokens=5, temperature=0.0, logit_bias=NO_EOS, echo=True, logprobs=2)
    plain = completion(srv, **body)
    nulled = completion(srv, prompt_logprobs=None, **body)
    for r in (plain, nulled):
        r.pop("id"), r.pop("created")
    assert json.dumps(plain) == json.dumps(nulled)
    assert "prompt_logprobs" not in plain["choices"][0]


@pytest.mark.parametrize("value", [-1, 6, 100, 1.5, "1", True, [], {}])
def test_bad_values_are_400s_naming_prompt_logprobs(srv, value):
    r = post(srv, "/v1/completions", prompt=PROMPT, prompt_logprobs=value)
    assert r.status_code == 400 and error_of(r)["param"] == "prompt_logprobs", r.text


@pytest.mark.parametrize("value", [0, 1])
def test_streaming_with_prompt_logprobs_is_a_400(srv, value):
    r = post(srv, "/v1/completions", prompt=PROMPT, stream=True, prompt_logprobs=value)
    assert r.status_code == 400 and error_of(r)["param"] == "prompt_logprobs", r.text


def test_chat_does_not_take_prompt_logprobs(srv):
    r = post(srv, "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], prompt_logprobs=1)
    assert r.status_code == 400 and error_of(r)["param"] == "prompt_logprobs"


@pytest.mark.parametrize("order", ["psm", "spm"])
def test_with_a_suffix_the_list_covers_the_users_prompt(order):
    """A FIM prompt, <|fim_prefix|> prompt <|fim_suffix|> suffix <|fim_middle|> or (suffix-prefix-
    middle) <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prompt: the list covers the user's
    prompt (what echo returns), its first token null, the rest read from the prefill's outputs
    at the user tokens' place in the arrangement."""
    from pgpt_jax.request import fim_prompt

    user = TOK.encode("def f(")
    arranged = fim_prompt(user, TOK.encode("):"), True, order)
    out = make("", max_tokens=0, prompt_logprobs=1)
    out.request.prompt, out.request.echo_prompt = arranged, user
    start = out.request.echo_start
    assert start == (1 if order == "psm" else len(arranged) - len(user))
    T = len(arranged)
    lp = -np.arange(1, T, dtype=np.float32)  # logprob of arranged token j + 1 is -(j + 1)
    top_ids, top_lps = np.full((T - 1, 1), 0, np.int32), np.full((T - 1, 1), -0.25, np.float32)  # "!"
    out.set_prompt_logprobs(lp, top_ids, top_lps, np.arange(10, 10 + T - 1, dtype=np.int32))
    pl = out.result().prompt_logprobs
    assert len(pl) == len(user) and pl[0] is None
    for i in range(1, len(user)):
        j = start + i  # the user's token i in the arrangement
        own = {"logprob": float(-j), "rank": 10 + j - 1, "decoded_token": TOK.decode([user[i]])}
        assert pl[i] == {str(user[i]): own, "0": {"logprob": -0.25, "rank": 1, "decoded_token": "!"}}
