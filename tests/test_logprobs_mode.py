"""`logprobs_mode` (vLLM's names) on /v1/completions and /v1/chat/completions.

The real engine on the tiny random model behind its own small server (test_return_token_ids.py's:
nothing compiles after warm-up, whichever mode a request asks for). Processed logprobs are
checked against the distribution the token was drawn from, computed on the host from a full
forward pass: log_softmax((logits + bias) / T); raw ones against log_softmax(logits). Then:
a dominant bias (processed ~0, raw not), the same tokens in both modes, the default, a nucleus
that cuts alternatives, echo's prompt entries (always raw), chat, the server-wide default and
the 400s. sampling.py's own tests check top_p and penalties row by row on hand-made logits.
"""

import json

import numpy as np
import pytest

from pgpt_jax.cli import build_parser, limits_from_args
from pgpt_jax.model import forward, init_cache
from pgpt_jax.request import Limits
from server.chat_protocol import parse_chat
from server.protocol import ModelInfo, parse_completion
from test_outputs import TOK
from test_return_token_ids import chat, completion, post, small_server
from test_server import EOS, NO_EOS
from test_server_helpers import error_of

PROMPT = "Once upon a time, in a land far away"
PROCESSED = "processed_logprobs"
TOL = 1e-4  # the program's logits and a host forward pass differ by float rounding


@pytest.fixture(scope="module")
def last_logits(tiny_model):
    """f64[V]: the logits after PROMPT (what the first completion token is drawn from)."""
    ids = TOK.encode(PROMPT)
    logits, _ = forward(tiny_model, np.array([ids]), np.arange(len(ids))[None],
                        init_cache(tiny_model.config, 1, len(ids)))
    return np.asarray(logits[0, -1], np.float64)


@pytest.fixture(scope="module")
def srv(tiny_model, last_logits):
    # `last_logits` first: its compiles happen before warm-up and are not counted as the server's.
    yield from small_server(tiny_model)


def log_softmax(z):
    z = z - z[np.isfinite(z)].max()
    return z - np.log(np.exp(z).sum())


def first_token(srv, k: int, **body) -> tuple[str, float, dict]:
    (c,) = completion(srv, prompt=PROMPT, max_tokens=1, logprobs=k, seed=3, **body)["choices"]
    lp = c["logprobs"]
    return lp["tokens"][0], lp["token_logprobs"][0], lp["top_logprobs"][0]


def expected_top(reference, k: int, token: str) -> dict:
    """{token text: logprob} of the k most likely tokens of `reference`, plus `token`'s."""
    order = np.argsort(-reference, kind="stable")[:k]
    want = {TOK.token_str(int(t)): reference[t] for t in order}
    want.setdefault(token, reference[TOK.encode(token)[0]] if token else None)
    return want


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_processed_logprobs_are_log_softmax_of_the_biased_logits_over_temperature(srv, last_logits,
                                                                                  temperature):
    k = 5
    token, lp, top = first_token(srv, k, temperature=temperature, logit_bias=NO_EOS, logprobs_mode=PROCESSED)
    z = last_logits.copy()
    z[EOS] -= 100
    reference = log_softmax(z / temperature)
    assert lp == pytest.approx(reference[TOK.encode(token)[0]], abs=TOL)
    want = expected_top(reference, k, token)
    assert set(top) == set(want)
    for t, v in top.items():
        assert v == pytest.approx(want[t], abs=TOL), t
    # Raw, same seed: the same token, the model's own numbers (no bias, no temperature).
    raw_token, raw_lp, raw_top = first_token(srv, k, temperature=temperature, logit_bias=NO_EOS,
                                             logprobs_mode="raw_logprobs")
    assert raw_token == token
    raw = log_softmax(last_logits)
    assert raw_lp == pytest.approx(raw[TOK.encode(token)[0]], abs=TOL)
    assert abs(raw_lp - lp) > 10 * TOL  # the modes differ (by little: the random model's logits are flat)
    assert set(raw_top) == set(expected_top(raw, k, token))


def test_a_dominant_bias_gives_processed_logprobs_of_zero_and_raw_ones_far_below(srv):
    forced = TOK.encode(" dragon")[0]
    body = dict(prompt=PROMPT, max_tokens=4, logprobs=2, seed=5, logit_bias={str(forced): 100})
    processed = completion(srv, logprobs_mode=PROCESSED, **body)["choices"][0]["logprobs"]
    raw = completion(srv, **body)["choices"][0]["logprobs"]
    assert processed["tokens"] == raw["tokens"] == [" dragon"] * 4
    assert processed["token_logprobs"] == pytest.approx([0.0] * 4, abs=1e-5)
    assert all(lp < -5 for lp in raw["token_logprobs"])  # about log(1 / 50257) under random weights
    for top in processed["top_logprobs"]:
        assert top[" dragon"] == pytest.approx(0.0, abs=1e-5)
        assert all(v < -50 for t, v in top.items() if t != " dragon")  # 100 nats of bias behind


def test_default_is_raw_and_unchanged(srv):
    body = dict(prompt=PROMPT, max_tokens=5, seed=11, logprobs=3, echo=True, logit_bias=NO_EOS,
                temperature=1.5)
    plain = completion(srv, **body)
    raw = completion(srv, logprobs_mode="raw_logprobs", **body)
    nulled = completion(srv, logprobs_mode=None, **body)
    for r in (plain, raw, nulled):
        r.pop("id"), r.pop("created")
    assert json.dumps(plain) == json.dumps(raw) == json.dumps(nulled)
    processed = completion(srv, logprobs_mode=PROCESSED, **body)
    assert processed["choices"][0]["text"] == plain["choices"][0]["text"]  # same seed, same tokens
    assert processed["choices"][0]["logprobs"] != plain["choices"][0]["logprobs"]


def test_prompt_entries_stay_raw_with_echo_and_prompt_logprobs(srv):
    body = dict(prompt=PROMPT, max_tokens=2, echo=True, logprobs=2, prompt_logprobs=2, seed=2,
                temperature=2.0, logit_bias=NO_EOS)
    raw = completion(srv, **body)["choices"][0]
    processed = completion(srv, logprobs_mode=PROCESSED, **body)["choices"][0]
    n = len(TOK.encode(PROMPT))
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert processed["logprobs"][key][:n] == raw["logprobs"][key][:n]
    assert processed["prompt_logprobs"] == raw["prompt_logprobs"]
    assert processed["logprobs"]["token_logprobs"][n:] != raw["logprobs"]["token_logprobs"][n:]


def test_alternatives_outside_the_nucleus_are_left_out(srv):
    # top_p 0: a nucleus of one token, drawn with probability 1; the others have logprob -inf.
    token, lp, top = first_token(srv, 5, top_p=0.0, logit_bias=NO_EOS, logprobs_mode=PROCESSED)
    assert lp == pytest.approx(0.0, abs=1e-6)
    assert top == {token: pytest.approx(0.0, abs=1e-6)}
    _, _, raw_top = first_token(srv, 5, top_p=0.0, logit_bias=NO_EOS)
    assert len(raw_top) == 5  # raw: the five most likely, as ever


def test_greedy_processed_is_the_temperature_one_distribution_after_bias(srv, last_logits):
    token, lp, top = first_token(srv, 3, temperature=0.0, top_p=0.5, logit_bias=NO_EOS, logprobs_mode=PROCESSED)
    z = last_logits.copy()
    z[EOS] -= 100
    reference = log_softmax(z)  # temperature 1, the whole vocabulary (top_p does not apply to argmax)
    assert TOK.encode(token)[0] == int(np.argmax(z))
    assert lp == pytest.approx(reference.max(), abs=TOL)
    assert len(top) == 3 and all(v == pytest.approx(expected_top(reference, 3, token)[t], abs=TOL)
                                 for t, v in top.items())


def test_chat_reports_processed_logprobs(srv):
    forced = TOK.encode(" dragon")[0]
    body = dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=3, logprobs=True, top_logprobs=2,
                seed=1, logit_bias={str(forced): 100})
    processed = chat(srv, logprobs_mode=PROCESSED, **body)["choices"][0]["logprobs"]["content"]
    raw = chat(srv, **body)["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in processed] == [c["token"] for c in raw] == [" dragon"] * 3
    for p, r in zip(processed, raw):
        assert p["logprob"] == pytest.approx(0.0, abs=1e-5) and r["logprob"] < -5
        assert p["top_logprobs"][0]["token"] == " dragon" and len(p["top_logprobs"]) == 2


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("value", ["processed", "raw_logits", "", 1, True])
def test_unknown_modes_are_400s_naming_logprobs_mode(srv, path, value):
    body = dict(prompt=PROMPT) if "chat" not in path else dict(messages=[{"role": "user", "content": "Hi"}])
    r = post(srv, path, logprobs_mode=value, **body)
    assert r.status_code == 400 and error_of(r)["param"] == "logprobs_mode", r.text


def test_the_server_wide_default_comes_from_the_flag():
    args = build_parser().parse_args(["serve", "--logprobs-mode", PROCESSED])
    limits = limits_from_args(args)
    assert limits.logprobs_mode == PROCESSED
    info = ModelInfo("m", 50257, 128, False, limits, TOK)
    assert parse_completion({"model": "m", "prompt": "a"}, info).requests[0].logprobs_mode == PROCESSED
    asked = parse_completion({"model": "m", "prompt": "a", "logprobs_mode": "raw_logprobs"}, info)
    assert asked.requests[0].logprobs_mode == "raw_logprobs"
    chat_job = parse_chat({"model": "m", "messages": [{"role": "user", "content": "a"}]}, info)
    assert chat_job.requests[0].logprobs_mode == PROCESSED
    assert limits_from_args(build_parser().parse_args(["serve"])).logprobs_mode == "raw_logprobs"
    with pytest.raises(ValueError, match="logprobs_mode"):
        Limits(logprobs_mode="raw_logits")
