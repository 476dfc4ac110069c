"""vLLM's `return_token_ids` on /v1/completions and /v1/chat/completions.

The real engine on the tiny random model, behind its own server with the fewest shapes (one
prompt bucket, two slots), checked against the tokenizer: the ids decode to the text
returned, the prompt's ids are its encoding, streamed ids add up to the non-streamed ones,
and a stop string trims the ids with the text. Without the field the answers keep their
keys. The `suffix` case runs on the fake engine (the tiny model has no FIM tokens), and
outputs.py's `Delta.token_ids` on hand-made token streams.
"""

import json

import httpx
import pytest

from pgpt_jax.config import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from pgpt_jax.engine import Engine
from pgpt_jax.tokenizer import get_tokenizer
from server.app import create_app
from test_outputs import TOK, feed, make
from test_server import CONTEXT, MODEL, NO_EOS
from test_server_helpers import FakeEngine, ServerThread, error_of

PROMPT = "Once upon a time"
COMPLETION_KEYS = ["text", "index", "logprobs", "finish_reason"]
CHAT_KEYS = ["index", "message", "logprobs", "finish_reason"]
RESPONSE_KEYS = ["id", "object", "created", "model", "choices", "usage"]


def small_server(model):
    """A server on the real engine with the fewest shapes: two slots and one bucket (one
    prefill, two decode programs; n=2 still runs side by side). Yields it with `.http`, a
    client; at the end, checks that no request compiled a program after warm-up."""
    engine = Engine(model, get_tokenizer(), slots=2, decode_steps=4, min_bucket=CONTEXT)
    engine.warmup()
    compiled = engine.compile_count
    with ServerThread(create_app(engine, served_model_name=MODEL)) as s:
        s.http = httpx.Client(base_url=s.base_url, timeout=60)
        yield s
        s.http.close()
    assert engine.compile_count == compiled, "a request shape compiled a new program after warm-up"


@pytest.fixture(scope="module")
def srv(tiny_model):
    yield from small_server(tiny_model)


def post(srv, path: str, **body) -> httpx.Response:
    return srv.http.post(path, json={"model": MODEL, **body})


def completion(srv, **body) -> dict:
    r = post(srv, "/v1/completions", **body)
    assert r.status_code == 200, r.text
    return r.json()


def chat(srv, **body) -> dict:
    r = post(srv, "/v1/chat/completions", **body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(srv, path: str, **body) -> list[dict]:
    """The chunks of a stream, [DONE] checked and dropped."""
    with srv.http.stream("POST", path, json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def streamed_ids(chunks: list[dict]) -> dict[int, list[int]]:
    ids: dict[int, list[int]] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            ids.setdefault(c["index"], []).extend(c["token_ids"])
    return ids


# ----------------------------------------------------------------------------- completions


def test_ids_decode_to_the_text_and_the_prompt_ids_are_its_encoding(srv):
    body = completion(srv, prompt=PROMPT, max_tokens=12, seed=3, logit_bias=NO_EOS, return_token_ids=True)
    (c,) = body["choices"]
    assert list(c) == COMPLETION_KEYS + ["prompt_token_ids", "token_ids"]
    assert c["prompt_token_ids"] == TOK.encode(PROMPT)
    assert len(c["token_ids"]) == 12 == body["usage"]["completion_tokens"]
    assert TOK.decode(c["token_ids"]) == c["text"]
    ids = [15496, 11, 995]  # a prompt of token ids comes back as sent
    assert completion(srv, prompt=ids, max_tokens=2, return_token_ids=True)["choices"][0]["prompt_token_ids"] == ids


def test_echo_keeps_its_text_and_token_ids_are_the_completion_only(srv):
    body = completion(srv, prompt=PROMPT, max_tokens=6, echo=True, logprobs=1, seed=3, logit_bias=NO_EOS,
                      return_token_ids=True)
    (c,) = body["choices"]
    prompt_ids = TOK.encode(PROMPT)
    assert c["text"].startswith(PROMPT) and c["prompt_token_ids"] == prompt_ids
    assert TOK.decode(c["token_ids"]) == c["text"][len(PROMPT):] and len(c["token_ids"]) == 6
    assert len(c["logprobs"]["tokens"]) == len(prompt_ids) + 6  # echo's logprobs still cover both


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_ids_add_up_to_the_non_streamed_ones(srv, echo):
    kw = dict(prompt=PROMPT, max_tokens=12, n=2, seed=5, temperature=0.9, logprobs=1, logit_bias=NO_EOS,
              echo=echo, return_token_ids=True)
    full = completion(srv, **kw)
    chunks = stream(srv, "/v1/completions", stream_options={"include_usage": True}, **kw)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    prompt_ids, first = TOK.encode(PROMPT), {}
    for chunk in chunks[:-1]:
        (c,) = chunk["choices"]
        assert list(c) == COMPLETION_KEYS + ["prompt_token_ids", "token_ids"]
        is_first = c["index"] not in first
        if is_first:
            first[c["index"]] = c["prompt_token_ids"]
        else:
            assert c["prompt_token_ids"] is None  # vLLM's: the prompt's ids on a choice's first chunk only
        echoed = len(prompt_ids) if echo and is_first else 0
        lp_tokens = c["logprobs"]["tokens"] if c["logprobs"] else []
        assert len(lp_tokens) == echoed + len(c["token_ids"])  # the ids are the tokens the chunk's text holds
    assert first == {0: prompt_ids, 1: prompt_ids}
    assert streamed_ids(chunks[:-1]) == {c["index"]: c["token_ids"] for c in full["choices"]}
    assert full["choices"][0]["token_ids"] != full["choices"][1]["token_ids"]  # each choice its own
    assert len(chunks) > 4  # streamed as made, not in one piece


def test_a_stop_string_trims_the_ids_with_the_text(srv):
    kw = dict(prompt=PROMPT, max_tokens=24, seed=11, logit_bias=NO_EOS, return_token_ids=True)
    free = completion(srv, **kw)["choices"][0]
    ids, text = free["token_ids"], free["text"]
    stop = TOK.decode(ids[8:10])
    cut = text.find(stop)
    assert cut > 0
    starts = [len(TOK.decode(ids[:i])) for i in range(len(ids))]  # where each token's text begins
    kept = ids[:sum(s < cut for s in starts)]  # the tokens whose text was returned
    stopped = completion(srv, stop=stop, **kw)["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == text[:cut]
    assert stopped["token_ids"] == kept and TOK.decode(kept).startswith(stopped["text"])
    chunks = stream(srv, "/v1/completions", stop=stop, **kw)
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == text[:cut]
    assert streamed_ids(chunks) == {0: kept}


def test_every_prompt_and_choice_gets_its_own_ids(srv):
    prompts = ["Hello", "Goodbye there"]
    body = completion(srv, prompt=prompts, n=2, max_tokens=5, seed=7, logit_bias=NO_EOS, return_token_ids=True)
    cs = body["choices"]
    assert [c["index"] for c in cs] == [0, 1, 2, 3]
    assert [c["prompt_token_ids"] for c in cs] == [TOK.encode(p) for p in prompts for _ in range(2)]
    for c in cs:
        assert TOK.decode(c["token_ids"]) == c["text"] and len(c["token_ids"]) == 5
    assert len({tuple(c["token_ids"]) for c in cs}) == 4


def test_best_of_returns_the_chosen_candidates_ids(srv):
    kw = dict(prompt=PROMPT, max_tokens=5, seed=9, logit_bias=NO_EOS, return_token_ids=True)
    candidates = [c["token_ids"] for c in completion(srv, n=3, **kw)["choices"]]  # the same three, all returned
    body = completion(srv, best_of=3, **kw)
    (c,) = body["choices"]
    assert c["token_ids"] in candidates and TOK.decode(c["token_ids"]) == c["text"]
    assert body["usage"]["completion_tokens"] == 15


def test_without_the_field_no_key_is_added(srv):
    kw = dict(prompt=PROMPT, max_tokens=4, temperature=0)
    plain = completion(srv, **kw)
    for flag in ({"return_token_ids": False}, {"return_token_ids": None}, {}):
        body = completion(srv, **kw, **flag)
        assert list(body) == RESPONSE_KEYS and list(body["choices"][0]) == COMPLETION_KEYS
        assert {**body, "id": "", "created": 0} == {**plain, "id": "", "created": 0}
        for chunk in stream(srv, "/v1/completions", **kw, **flag):
            assert list(chunk) == RESPONSE_KEYS[:-1] and list(chunk["choices"][0]) == COMPLETION_KEYS
        msgs = [{"role": "user", "content": "Hi"}]
        body = chat(srv, messages=msgs, max_tokens=3, **flag)
        assert list(body) == RESPONSE_KEYS and list(body["choices"][0]) == CHAT_KEYS
        for chunk in stream(srv, "/v1/chat/completions", messages=msgs, max_tokens=3, **flag):
            assert list(chunk) == RESPONSE_KEYS[:-1]
            assert list(chunk["choices"][0]) == ["index", "delta", "logprobs", "finish_reason"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_value_that_is_not_a_boolean_is_a_400_naming_the_field(srv, path):
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    for value in ("yes", "true", 1, 0, [], {}):
        r = post(srv, path, max_tokens=1, return_token_ids=value, **body)
        assert r.status_code == 400, (value, r.text)
        err = error_of(r)
        assert err["param"] == "return_token_ids" and "return_token_ids" in err["message"], err


# ----------------------------------------------------------------------------- chat


def test_chat_puts_the_prompt_ids_on_the_response_and_token_ids_on_each_choice(srv):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    kw = dict(messages=msgs, max_tokens=10, n=2, seed=4, logit_bias=NO_EOS, return_token_ids=True)
    full = chat(srv, **kw)
    prompt_ids = TOK.encode("System: Be brief.\n\nUser: Say hi\n\nAssistant:")  # protocol.chat_prompt's template
    assert list(full) == RESPONSE_KEYS + ["prompt_token_ids"] and full["prompt_token_ids"] == prompt_ids
    for c in full["choices"]:
        assert list(c) == CHAT_KEYS + ["token_ids"] and c["finish_reason"] == "length"
        # The reply's leading whitespace is dropped from the text, not from the ids.
        assert TOK.decode(c["token_ids"]).lstrip() == c["message"]["content"] and len(c["token_ids"]) == 10
    chunks = stream(srv, "/v1/chat/completions", **kw)
    seen = set()
    for chunk in chunks:
        (c,) = chunk["choices"]
        if c["index"] in seen:
            assert "prompt_token_ids" not in chunk and "role" not in c["delta"]
        else:
            seen.add(c["index"])
            assert chunk["prompt_token_ids"] == prompt_ids and c["delta"]["role"] == "assistant"
    assert seen == {0, 1}
    assert streamed_ids(chunks) == {c["index"]: c["token_ids"] for c in full["choices"]}


# ----------------------------------------------------------------------------- suffix (fake engine)


def test_with_a_suffix_the_prompt_ids_are_the_users_prompt_not_the_fim_arrangement():
    engine = FakeEngine(fim=True)
    with ServerThread(create_app(engine, served_model_name="fake")) as s:
        r = httpx.post(s.base_url + "/v1/completions", timeout=30, json={
            "model": "fake", "prompt": "def f(x):", "suffix": "\n    return y", "max_tokens": 3,
            "return_token_ids": True})
    assert r.status_code == 200, r.text
    tok = engine.tokenizer
    sent = engine.submitted[-1].prompt
    assert sent == [FIM_PREFIX, *tok.encode("def f(x):"), FIM_SUFFIX, *tok.encode("\n    return y"), FIM_MIDDLE]
    body = r.json()
    assert body["choices"][0]["prompt_token_ids"] == tok.encode("def f(x):")
    assert body["usage"]["prompt_tokens"] == len(sent)  # usage still counts what the model read


# ----------------------------------------------------------------------------- outputs.py


def test_delta_token_ids_go_out_with_their_text_and_a_stop_string_cuts_them():
    out = make(max_tokens=10, stop=["! END"], stream=True)
    ids = TOK.encode("Hello, world! END here")
    streamed = feed(out, ids)
    per_step = [[t for d in ds for t in d.token_ids] for ds in streamed]
    # "!" could begin "! END": held back with its text, then cut with it.
    assert per_step == [ids[:1], ids[1:2], ids[2:3], [], []]
    assert out.result().choices[0].token_ids == ids[:3]


def test_delta_token_ids_add_up_to_the_choice_across_a_split_character_and_echo():
    ids = TOK.encode(" héllo 🎉 ok")  # the emoji is three tokens, none a character alone
    out = make(prompt="Hi", max_tokens=len(ids), echo=True, logprobs=0, stream=True)
    deltas = [d for ds in feed(out, ids) for d in ds]
    assert deltas[0].text.startswith("Hi") and deltas[-1].finish_reason == "length"
    text, sent = "", []
    for i, d in enumerate(deltas):
        text += d.text[len("Hi"):] if i == 0 else d.text
        sent += d.token_ids
        assert len(d.token_ids) == (len(d.logprobs.tokens) if d.logprobs else 0)  # no prompt tokens: none set
        assert TOK.decode(sent).startswith(text)  # the ids go out with (or ahead of) their text
    assert sent == ids == out.result().choices[0].token_ids
