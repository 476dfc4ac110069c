"""vLLM's `/tokenize` and `/detokenize` over the fake engine (no compiles: these run in seconds).

The ids must be the ones the completions and chat routes would send the engine, so each
check compares with the tokenizer itself or with what the fake engine received.
"""

import dataclasses
import threading

import httpx
import pytest

from pgpt_jax.config import EOS_ID, FIM_PREFIX
from server import chat_protocol
from server.app import create_app
from test_server_fake import KEY, MODEL, headers, post
from test_server_helpers import FakeEngine, ServerThread, error_of, wait_for

TEXT = "Hello, world!<|endoftext|> héllo 🎉\n  tabs\tand  spaces"


@pytest.fixture(scope="module")
def server():
    engine = FakeEngine()
    with ServerThread(create_app(engine, served_model_name=MODEL, api_key=KEY)) as s:
        s.engine = engine
        yield s


def test_round_trip_and_counts(server):
    tok = server.engine.tokenizer
    r = post(server, "/tokenize", {"model": MODEL, "prompt": TEXT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {"count": len(tok.encode(TEXT)), "max_model_len": 128, "tokens": tok.encode(TEXT),
                    "token_strs": None}
    assert EOS_ID in body["tokens"]  # <|endoftext|> in the text is the EOS token, as in a completions prompt
    r = post(server, "/detokenize", {"model": MODEL, "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": TEXT}


def test_same_ids_as_the_completions_route(server):
    post(server, "/v1/completions", {"model": MODEL, "prompt": TEXT, "max_tokens": 1})
    sent = server.engine.submitted[-1].prompt
    assert post(server, "/tokenize", {"model": MODEL, "prompt": TEXT}).json()["tokens"] == list(sent)


def test_token_strs(server):
    r = post(server, "/tokenize", {"model": MODEL, "prompt": "Hello world 🎉", "return_token_strs": True})
    body = r.json()
    # The logprobs' strings: a token holding part of a UTF-8 character is written as bytes.
    assert body["token_strs"] == ["Hello", " world", "bytes: \\xf0\\x9f", "bytes:\\x8e", "bytes:\\x89"]
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) == 5
    for flag in (False, None):
        assert post(server, "/tokenize", {"model": MODEL, "prompt": "a", "return_token_strs": flag}).json()[
            "token_strs"] is None


def test_chat_messages_match_the_chat_route(server):
    messages = [{"role": "system", "content": "Be terse."},
                {"role": "user", "content": [{"type": "text", "text": "Hi <|endoftext|>"}]}]
    post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1})
    sent = list(server.engine.submitted[-1].prompt)
    r = post(server, "/tokenize", {"model": MODEL, "messages": messages})
    assert r.status_code == 200 and r.json()["tokens"] == sent and r.json()["count"] == len(sent)
    text = "System: Be terse.\n\nUser: Hi <|endoftext|>\n\n"
    assert server.engine.tokenizer.decode(sent) == text + "Assistant:"
    r = post(server, "/tokenize", {"model": MODEL, "messages": messages, "add_generation_prompt": False,
                                   "add_special_tokens": True, "return_token_strs": True})
    assert r.json()["tokens"] == server.engine.tokenizer.encode(text)
    assert "".join(r.json()["token_strs"]) == text


def test_add_special_tokens_changes_nothing(server):
    ids = post(server, "/tokenize", {"model": MODEL, "prompt": "hi there"}).json()["tokens"]
    for flag in (True, False):
        r = post(server, "/tokenize", {"model": MODEL, "prompt": "hi there", "add_special_tokens": flag})
        assert r.json()["tokens"] == ids  # GPT-2 has no BOS token to add


def test_model_is_optional_but_checked(server):
    assert post(server, "/tokenize", {"prompt": "a"}).json()["tokens"] == [64]
    assert post(server, "/detokenize", {"tokens": [64]}).json() == {"prompt": "a"}
    for path, body in (("/tokenize", {"prompt": "a"}), ("/tokenize", {"messages": [{"role": "user", "content": "a"}]}),
                       ("/detokenize", {"tokens": [64]})):
        r = post(server, path, {**body, "model": "other"})
        assert r.status_code == 404, (path, r.text)
        err = error_of(r)
        assert err["code"] == "model_not_found" and err["param"] == "model"


def test_special_tokens_other_than_endoftext_are_text():
    engine = FakeEngine(fim=True)  # a tokenizer that knows the FIM tokens
    tok = engine.tokenizer
    with ServerThread(create_app(engine, served_model_name=MODEL)) as s:
        r = httpx.post(s.base_url + "/tokenize", json={"prompt": "<|fim_prefix|>x<|endoftext|>"})
        ids = r.json()["tokens"]
        assert FIM_PREFIX not in ids and ids == tok.encode("<|fim_prefix|>x") + [EOS_ID]
        assert len(ids) > 3  # "<|fim_prefix|>" is several plain-text tokens
        # The other way, an id is its text, control tokens included.
        r = httpx.post(s.base_url + "/detokenize", json={"tokens": [FIM_PREFIX, 87, EOS_ID]})
        assert r.json() == {"prompt": "<|fim_prefix|>x<|endoftext|>"}


def test_bad_token_ids_are_400_naming_tokens(server):
    for tokens in ([1, 50257], [-1], [10**12]):
        r = post(server, "/detokenize", {"model": MODEL, "tokens": tokens})
        assert r.status_code == 400, (tokens, r.text)
        err = error_of(r)
        assert err["param"] == "tokens" and "outside the vocabulary [0, 50257)" in err["message"]
    for tokens in ([True], ["1"], [1.5], "1 2", None):
        r = post(server, "/detokenize", {"model": MODEL, "tokens": tokens})
        assert r.status_code == 400 and error_of(r)["param"].startswith("tokens"), (tokens, r.text)
    r = post(server, "/detokenize", {"model": MODEL})
    assert r.status_code == 400 and error_of(r)["param"] == "tokens"
    assert post(server, "/detokenize", {"model": MODEL, "tokens": []}).json() == {"prompt": ""}


def test_padded_vocabulary_ids_have_no_text():
    # A checkpoint may have 50304 embedding rows; ids past the tokenizer's 50257 are not text.
    engine = FakeEngine()
    engine.config = dataclasses.replace(engine.config, vocab_size=50304)
    with ServerThread(create_app(engine, served_model_name=MODEL)) as s:
        r = httpx.post(s.base_url + "/detokenize", json={"tokens": [50300]})
        assert r.status_code == 400 and error_of(r)["param"] == "tokens"


def test_invalid_bodies_are_400(server):
    cases = [
        ("/tokenize", {"model": MODEL, "prompt": "a", "prompts": "b"}, "prompts"),  # unknown field
        ("/tokenize", {"model": MODEL, "prompt": "a", "add_generation_prompt": True}, "add_generation_prompt"),
        ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "echo": True}, "echo"),
        ("/detokenize", {"model": MODEL, "tokens": [1], "skip_special_tokens": True}, "skip_special_tokens"),
        ("/tokenize", {"model": MODEL}, "prompt"),  # neither prompt nor messages
        ("/tokenize", {"model": MODEL, "prompt": ["a", "b"]}, "prompt"),  # one string only
        ("/tokenize", {"model": MODEL, "prompt": "a", "messages": []}, "messages"),  # both
        ("/tokenize", {"model": MODEL, "messages": []}, "messages"),
        ("/tokenize", {"model": MODEL, "prompt": "a", "return_token_strs": 1}, "return_token_strs"),
        ("/tokenize", {"model": MODEL, "prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
    ]
    for path, body, param in cases:
        r = post(server, path, body)
        assert r.status_code == 400, (body, r.text)
        assert error_of(r)["param"] == param, (body, r.text)
    r = post(server, "/tokenize", {"model": MODEL, "prompt": "a", "prompts": "b"})
    assert error_of(r)["message"] == "Unrecognized request argument supplied: prompts"
    for content in (b"{not json", b"[]"):
        r = httpx.post(server.base_url + "/tokenize", content=content, headers=headers())
        assert r.status_code == 400 and error_of(r)


def test_empty_prompt_has_no_tokens(server):
    # Unlike /v1/completions, which sends <|endoftext|> for "", the text "" has no tokens.
    assert post(server, "/tokenize", {"prompt": ""}).json() == {"count": 0, "max_model_len": 128, "tokens": [],
                                                                "token_strs": None}


def test_api_key_is_required(server):
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]}),
                       ("/v1/tokenize", {"prompt": "a"}), ("/v1/detokenize", {"tokens": [1]})):
        r = post(server, path, body, headers={})
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key", path
        r = post(server, path, body, headers=headers("wrong"))
        assert r.status_code == 401, path
        assert post(server, path, body).status_code == 200, path


def test_v1_aliases_and_methods(server):
    assert post(server, "/v1/tokenize", {"prompt": "a"}).json()["tokens"] == [64]
    assert post(server, "/v1/detokenize", {"tokens": [64]}).json() == {"prompt": "a"}
    r = httpx.get(server.base_url + "/tokenize", headers=headers())
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


def test_503_while_the_model_loads():
    gate = threading.Event()
    engine = FakeEngine()
    app = create_app(served_model_name=MODEL, loader=lambda: gate.wait(30) and engine)
    with ServerThread(app) as s:
        for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
            r = httpx.post(s.base_url + path, json=body)
            assert r.status_code == 503 and error_of(r)["code"] == "model_not_ready", path
            assert r.headers["retry-after"] == "5"
        gate.set()
        assert wait_for(lambda: httpx.get(s.base_url + "/health").status_code == 200)
        assert httpx.post(s.base_url + "/tokenize", json={"prompt": "a"}).json()["tokens"] == [64]


class _ThreadRecorder:
    """The fake's tokenizer, noting the thread each encode and decode runs on."""

    def __init__(self, tokenizer):
        self.inner, self.threads = tokenizer, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text):
        self.threads.append(threading.current_thread())
        return self.inner.encode(text)

    def decode(self, ids):
        self.threads.append(threading.current_thread())
        return self.inner.decode(ids)


def test_tokenising_runs_off_the_event_loop():
    engine = FakeEngine()
    engine.tokenizer = recorder = _ThreadRecorder(engine.tokenizer)
    with ServerThread(create_app(engine, served_model_name=MODEL)) as s:
        assert httpx.post(s.base_url + "/tokenize", json={"prompt": "a b"}).status_code == 200
        assert httpx.post(s.base_url + "/detokenize", json={"tokens": [64]}).status_code == 200
        loop_thread = s.thread  # uvicorn's event loop runs in the ServerThread's thread
    assert len(recorder.threads) == 2 and loop_thread not in recorder.threads


def test_chat_prompt_default_is_the_chat_routes():
    messages = [chat_protocol.ChatMessage(role="user", content="x")]
    assert chat_protocol.chat_prompt(messages) == chat_protocol.chat_prompt(messages, add_generation_prompt=True)
    assert chat_protocol.chat_prompt(messages, add_generation_prompt=False) == "User: x\n\n"
