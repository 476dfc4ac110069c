"""The HTTP layer's own behaviour, over the fake engine (no compiles: these run in seconds).

Loading and /health, authentication, bodies that are not JSON objects, 429 on a full
queue, an engine failure after the 200, clients that walk away, metrics, FIM arranging,
and the chat template. The real engine's answers are tested in test_server.py.
"""

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from pgpt_jax.checkpoint import EMBEDDED_NAME
from pgpt_jax.config import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from server import chat_protocol
from server.app import create_app
from server.http import HTTPSettings
from test_server_helpers import FakeEngine, ServerThread, error_of, wait_for

MODEL = "fake-model"
KEY = "sekret-key"


@pytest.fixture(scope="module")
def fake():
    engine = FakeEngine(delay=0.0)
    app = create_app(engine, served_model_name=MODEL, api_key=KEY, max_body_bytes=64 * 1024)
    with ServerThread(app) as s:
        s.engine = engine
        yield s
    assert engine.started and engine.stopped  # the lifespan started it and stopped it


def headers(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def post(s, path, body, **kw):
    kw.setdefault("headers", headers())
    return httpx.post(s.base_url + path, json=body, timeout=30, **kw)


def test_loading_then_ready():
    gate = threading.Event()
    engine = FakeEngine()

    def loader():
        gate.wait(30)
        return engine

    app = create_app(served_model_name=MODEL, loader=loader)
    with ServerThread(app) as s:
        r = httpx.get(s.base_url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(s.base_url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 503 and error_of(r)["code"] == "model_not_ready"
        assert httpx.get(s.base_url + "/v1/models").json()["data"][0]["id"] == MODEL
        gate.set()
        assert wait_for(lambda: httpx.get(s.base_url + "/health").status_code == 200)
        r = httpx.post(s.base_url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " the quick"
        assert engine.started
    assert engine.stopped


def test_load_failure_is_reported():
    def loader():
        raise RuntimeError("no such checkpoint")

    app = create_app(served_model_name=MODEL, loader=loader)
    with ServerThread(app) as s:
        assert wait_for(lambda: httpx.get(s.base_url + "/health").json()["status"] == "failed")
        r = httpx.get(s.base_url + "/health")
        assert r.status_code == 503 and "no such checkpoint" in r.json()["error"]


def test_auth(fake):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    r = post(fake, "/v1/completions", body, headers={})
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    for h in ({"Authorization": "Bearer nope"}, {"api-key": "nope"}, {"Authorization": KEY}):
        r = post(fake, "/v1/completions", body, headers=h)
        assert r.status_code == 401, h
    assert post(fake, "/v1/completions", body).status_code == 200
    assert post(fake, "/v1/completions", body, headers={"api-key": KEY}).status_code == 200
    assert httpx.get(fake.base_url + "/v1/models").status_code == 401
    assert httpx.get(fake.base_url + "/v1/models", headers=headers()).status_code == 200
    assert httpx.get(fake.base_url + "/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=fake.base_url + "/v1", api_key="wrong", max_retries=0).completions.create(
            model=MODEL, prompt="hi")


@pytest.mark.parametrize("content, ctype, status", [
    (b"{not json", "application/json", 400),
    (b'{"model": "fake-model", "prompt": "a"', "application/json", 400),
    (b"", "application/json", 400),
    (b"[]", "application/json", 400),
    (b'"a string"', "application/json", 400),
    (b"null", "application/json", 400),
    (b'{"model": "fake-model", "temperature": NaN}', "application/json", 400),
    (b'{"model": "fake-model", "temperature": Infinity}', "application/json", 400),
    (b"\xff\xfe\x00garbage", "application/json", 400),
    (b'{"model": "fake-model"}', "text/plain", 415),
    (b"model=fake-model&prompt=hi", "application/x-www-form-urlencoded", 415),
    (b'{"model": "fake-model", "prompt": "' + b"a" * (65 * 1024) + b'"}', "application/json", 413),
    (b"[" * 100000 + b"]" * 100000, "application/json", 413),
    (b"[" * 20000 + b"]" * 20000, "application/json", 400),  # deep nesting: RecursionError, not a 500
])
def test_malformed_bodies(fake, content, ctype, status):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(fake.base_url + path, content=content, timeout=30,
                       headers={**headers(), "Content-Type": ctype})
        assert r.status_code == status, (path, r.text)
        error_of(r)
    assert post(fake, "/v1/completions", {"model": MODEL, "max_tokens": 1}).status_code == 200


def test_unknown_routes_and_methods(fake):
    r = httpx.get(fake.base_url + "/v1/nothing-here", headers=headers())
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = httpx.get(fake.base_url + "/v1/completions", headers=headers())
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
    r = post(fake, "/openai/deployments/other/completions", {"prompt": "x"})
    assert r.status_code == 404 and error_of(r)["code"] == "DeploymentNotFound"
    r = httpx.get(fake.base_url + "/v1/models/other", headers=headers())
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"


def test_prompt_major_indices_and_usage(fake):
    r = post(fake, "/v1/completions", {"model": MODEL, "prompt": ["a", "b c", ""], "n": 2,
                                       "max_tokens": 3})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    # Choice i of every prompt starts at word i of the fake's sentence.
    assert [c["text"] for c in body["choices"]] == [" the quick brown", " quick brown fox"] * 3
    assert body["usage"] == {"prompt_tokens": 1 + 2 + 1, "completion_tokens": 3 * 2 * 3, "total_tokens": 22}


def test_n_above_best_of_cap_without_best_of(fake):
    # best_of is capped at 20, n at 128: n=30 alone asks for 30 choices, none ranked away.
    r = post(fake, "/v1/completions", {"model": MODEL, "prompt": "a", "n": 30, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 30
    r = post(fake, "/v1/completions", {"model": MODEL, "prompt": "a", "n": 30, "best_of": 30, "max_tokens": 1})
    assert r.status_code == 400 and error_of(r)["param"] == "best_of"
    r = post(fake, "/v1/completions", {"model": MODEL, "prompt": "a", "n": 129, "max_tokens": 1})
    assert r.status_code == 400 and error_of(r)["param"] == "n"


def test_streamed_indices_and_usage_chunk(fake):
    client = openai.OpenAI(base_url=fake.base_url + "/v1", api_key=KEY, max_retries=0)
    chunks = list(client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    texts = {}
    for c in chunks[:-1]:
        assert c.usage is None and len(c.choices) == 1
        texts[c.choices[0].index] = texts.get(c.choices[0].index, "") + c.choices[0].text
    assert texts == {0: " the quick", 1: " quick brown", 2: " the quick", 3: " quick brown"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_queue_full_is_429():
    engine = FakeEngine(max_queue=2, delay=0.02)
    app = create_app(engine, served_model_name=MODEL)
    with ServerThread(app) as s:
        url = s.base_url + "/v1/completions"
        with httpx.stream("POST", url, json={"model": MODEL, "prompt": "a", "max_tokens": 100, "stream": True}):
            # One place in the queue left: a two-prompt request is refused whole (none of it runs).
            r = httpx.post(url, json={"model": MODEL, "prompt": ["a", "b"], "max_tokens": 100})
            assert r.status_code == 429 and error_of(r)["code"] == "queue_full"
            assert r.headers["retry-after"] == "1"
            assert len(engine.submitted) == 1 and engine.aborted == 0
        client = openai.OpenAI(base_url=s.base_url + "/v1", api_key="x", max_retries=0)
        assert wait_for(lambda: engine.active_slots == 0)
        assert client.completions.create(model=MODEL, prompt="a", max_tokens=1).choices[0].text == " the"


def test_engine_failure_after_200(fake):
    client = openai.OpenAI(base_url=fake.base_url + "/v1", api_key=KEY, max_retries=0)
    stream = client.completions.create(model=MODEL, prompt="a", max_tokens=5, stream=True, seed=FakeEngine.FAIL_SEED)
    with pytest.raises(openai.APIError, match="fake engine failure"):
        for _ in stream:
            pass
    r = post(fake, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 5, "seed": FakeEngine.FAIL_SEED})
    assert r.status_code == 500 and error_of(r)["type"] == "server_error"


def test_disconnects_abort_engine_work():
    engine = FakeEngine(delay=0.05)
    app = create_app(engine, served_model_name=MODEL)
    with ServerThread(app) as s:
        url = s.base_url + "/v1/completions"
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={"model": MODEL, "prompt": "a", "max_tokens": 100}, timeout=0.3)
        assert wait_for(lambda: engine.aborted == 1 and engine.active_slots == 0)
        with httpx.stream("POST", url, json={"model": MODEL, "prompt": "a", "max_tokens": 100, "n": 3,
                                             "stream": True}) as r:
            # A make test run once saw 0 active slots after the first line: say what that line was.
            assert r.status_code == 200, r.read()
            first = next(r.iter_lines())
            assert engine.active_slots == 3, first
        assert wait_for(lambda: engine.aborted == 2 and engine.active_slots == 0)
        r = httpx.post(url, json={"model": MODEL, "prompt": "a", "max_tokens": 2})
        assert r.json()["choices"][0]["text"] == " the quick"


@pytest.mark.parametrize("order", ["psm", "spm"])
def test_suffix_arranges_fim_prompt_in_the_models_order(order):
    engine = FakeEngine(fim=True, fim_order=order)
    with ServerThread(create_app(engine, served_model_name=MODEL)) as s:
        r = httpx.post(s.base_url + "/v1/completions", json={"model": MODEL, "prompt": "def f(", "suffix": "):",
                                                             "max_tokens": 1, "echo": True})
        assert r.status_code == 200
        sent = engine.submitted[-1]
        tok = engine.tokenizer
        prefix, suffix = tok.encode("def f("), tok.encode("):")
        assert sent.prompt == ([FIM_PREFIX, *prefix, FIM_SUFFIX, *suffix, FIM_MIDDLE] if order == "psm" else
                               [FIM_PREFIX, FIM_SUFFIX, *suffix, FIM_MIDDLE, *prefix])
        assert sent.echo_prompt == prefix  # echo shows the prompt as sent, whatever the order
        assert r.json()["choices"][0]["text"] == "def f( the"


def test_suffix_without_fim_is_400(fake):
    r = post(fake, "/v1/completions", {"model": MODEL, "prompt": "a", "suffix": "b"})
    assert r.status_code == 400 and error_of(r)["param"] == "suffix"
    assert post(fake, "/v1/completions", {"model": MODEL, "prompt": "a", "suffix": "", "max_tokens": 1}).status_code == 200


def test_chat_template_and_stops(fake):
    client = openai.OpenAI(base_url=fake.base_url + "/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, max_tokens=2, messages=[{"role": "system", "content": "Be terse."},
                                             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert reply.choices[0].message.content == "the quick"  # leading space dropped
    sent = fake.engine.submitted[-1]
    assert fake.engine.tokenizer.decode(sent.prompt) == "System: Be terse.\n\nUser: Hi\n\nAssistant:"
    assert list(sent.stop) == list(chat_protocol.CHAT_STOPS)
    # The client's 4 stops and the template's turn markers all apply (Limits.max_template_stops).
    client.chat.completions.create(model=MODEL, max_tokens=1, stop=["a", "b", "c", "d"],
                                   messages=[{"role": "user", "content": "x"}])
    assert list(fake.engine.submitted[-1].stop) == ["a", "b", "c", "d", *chat_protocol.CHAT_STOPS]


def test_metrics(fake):
    post(fake, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2, "stream": True})
    post(fake, "/v1/completions", {"model": MODEL, "temperature": 7})
    text = httpx.get(fake.base_url + "/metrics", headers=headers()).text
    for name in ("pgpt_http_requests_total", "pgpt_prompt_tokens_total", "pgpt_generation_tokens_total",
                 "pgpt_engine_queue_depth", "pgpt_engine_active_slots", "pgpt_engine_compile_count",
                 "pgpt_engine_prefix_cache_hit_rate", "pgpt_engine_prefix_cache_blocks_used",
                 "pgpt_time_to_first_token_seconds_bucket", "pgpt_time_per_output_token_seconds_bucket",
                 "pgpt_request_latency_seconds_bucket", "pgpt_warmup_programs_total",
                 "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc"):
        assert name in text, name
    assert 'pgpt_http_requests_total{route="/v1/completions",status="400"}' in text
    assert 'pgpt_http_requests_total{route="/v1/completions",status="200"}' in text


def test_serve_refuses_what_it_cannot_load(capsys):
    from pgpt_jax.cli import build_parser
    from server.serve import serve

    args = build_parser().parse_args(["serve", "--model", "random:no-such-preset", "--port", "0"])
    with pytest.raises(SystemExit, match="unknown preset 'no-such-preset'"):
        serve(args)


def test_serve_names():
    from server.serve import default_model_name

    assert default_model_name(None) == EMBEDDED_NAME
    assert default_model_name("/ckpt/my-model/") == "/ckpt/my-model"
    assert default_model_name("random:gpt2") == "random:gpt2"


def test_compile_cache_directory_flag_then_jax_variable_then_default(monkeypatch):
    """--compile-cache, else JAX's own JAX_COMPILATION_CACHE_DIR, else ~/.cache/pgpt-jax's
    per-CPU directory; --no-compile-cache turns the cache off even where JAX's variable is set."""
    from pgpt_jax import xla_options
    from pgpt_jax.cli import build_parser, compile_cache_from_args

    used = []
    monkeypatch.setattr(xla_options, "use_compile_cache", used.append)
    monkeypatch.setattr(xla_options, "no_compile_cache", lambda: used.append(None))
    monkeypatch.setattr(xla_options, "default_compile_cache_dir", lambda: "/home/u/.cache/pgpt-jax/xla/cpu")
    serve = lambda *flags: build_parser().parse_args(["serve", *flags])  # noqa: E731
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/jax/cache")
    compile_cache_from_args(serve("--compile-cache", "/flag"))
    compile_cache_from_args(serve())
    compile_cache_from_args(serve("--no-compile-cache"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    compile_cache_from_args(serve())
    assert used == ["/flag", "/jax/cache", None, "/home/u/.cache/pgpt-jax/xla/cpu"]


# ----------------------------------------------------------------------------- request lifecycle


def drain(s, timeout):
    """Runs the app's drain on its own event loop (as SIGTERM does in `pgpt-jax serve`)."""
    st = s.app.state.pgpt
    return asyncio.run_coroutine_threadsafe(st.drain(timeout), st.loop)


def test_drain_refuses_new_work_and_ends_streams_with_an_error_and_done():
    engine = FakeEngine(delay=0.05, context_length=4096)
    with ServerThread(create_app(engine, served_model_name=MODEL, ping_interval=0.2)) as s:
        url = s.base_url + "/v1/completions"
        assert httpx.get(s.base_url + "/ready").status_code == 200
        with httpx.stream("POST", url, json={"model": MODEL, "prompt": "a", "max_tokens": 1000, "stream": True},
                          timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            done = drain(s, timeout=2.0)  # long enough for the checks below on a loaded machine
            assert wait_for(lambda: s.app.state.pgpt.draining)
            ready = httpx.get(s.base_url + "/ready")
            assert ready.status_code == 503 and ready.headers["retry-after"]
            assert httpx.get(s.base_url + "/health").json()["status"] == "draining"  # alive: not restarted
            refused = httpx.post(url, json={"model": MODEL, "prompt": "b", "max_tokens": 1})
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert error_of(refused)["code"] == "server_unavailable"
            rest = [line for line in lines if line]
        done.result(timeout=30)
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2][len("data: "):])["error"]
    assert err["code"] == "server_unavailable" and "shutting down" in err["message"]
    assert engine.stopped


def test_drain_lets_requests_in_flight_finish():
    engine = FakeEngine(delay=0.01)
    with ServerThread(create_app(engine, served_model_name=MODEL)) as s:
        pending = threading.Thread(target=lambda: results.append(httpx.post(
            s.base_url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 30}, timeout=30)))
        results: list = []
        pending.start()
        assert wait_for(lambda: engine.active_slots == 1)
        drain(s, timeout=20).result(timeout=30)
        pending.join(30)
    assert results[0].status_code == 200 and len(results[0].json()["choices"][0]["text"]) > 0


def test_a_dead_engine_fails_liveness_and_readiness(fake):
    fake.engine.dead = True
    try:
        assert httpx.get(fake.base_url + "/health").status_code == 503
        assert httpx.get(fake.base_url + "/ready").status_code == 503
        r = post(fake, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 1})
        assert r.status_code == 503 and error_of(r)["code"] == "server_unavailable"
    finally:
        fake.engine.dead = False
    assert httpx.get(fake.base_url + "/ready").status_code == 200


def test_streams_that_wait_get_pings():
    engine = FakeEngine(delay=0.5)
    with ServerThread(create_app(engine, served_model_name=MODEL, ping_interval=0.1)) as s:
        with httpx.stream("POST", s.base_url + "/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": "a", "max_tokens": 2, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert first_data >= 2 and all(line == ": ping" for line in lines[:first_data])
    assert lines[-1] == "data: [DONE]"


def test_a_reader_that_falls_behind_is_aborted_not_buffered():
    # The fake makes tokens as fast as it can; the client reads nothing. Once the socket's
    # buffers are full the stream's events pile up: past `stream_buffer` the run is aborted.
    engine = FakeEngine(delay=0.0, context_length=10**6)
    app = create_app(engine, served_model_name=MODEL, stream_buffer=16)
    with ServerThread(app) as s:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", s.port))
        body = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 500_000, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert wait_for(lambda: engine.aborted == 1, timeout=60)
        assert wait_for(lambda: engine.active_slots == 0)
        sock.settimeout(30)
        data = b""
        while not data.endswith(b"data: [DONE]\n\n") and not data.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
        sock.close()
        assert b"stream_reader_too_slow" in data and b"data: [DONE]" in data
        assert not s.app.state.pgpt.runs  # nothing of it is left in flight
        assert post(s, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 1}, headers={}).status_code == 200


def test_half_open_connections_are_closed_and_do_not_delay_others():
    engine = FakeEngine()
    settings = HTTPSettings(header_timeout=1.0, limit_concurrency=128)
    with ServerThread(create_app(engine, served_model_name=MODEL), settings) as s:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 1}
        client = httpx.Client(base_url=s.base_url, timeout=30)

        def latency() -> float:
            t0 = time.perf_counter()
            assert client.post("/v1/completions", json=body).status_code == 200
            return time.perf_counter() - t0

        alone = min(latency() for _ in range(5))
        socks = []
        for i in range(64):  # slowloris: a request head that never ends
            sk = socket.create_connection(("127.0.0.1", s.port))
            sk.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n" if i % 2 else b"")
            socks.append(sk)
        crowded = min(latency() for _ in range(5))
        assert crowded <= max(2 * alone, alone + 0.05), (alone, crowded)
        for sk in socks:  # the server hangs up on each after the header timeout
            sk.settimeout(10)
            assert sk.recv(1024) == b""
            sk.close()
        client.close()


def test_caps_on_prompts_and_choices(fake):
    engine = FakeEngine()
    with ServerThread(create_app(engine, served_model_name=MODEL)) as s:  # the default 4 MiB body cap
        r = post(s, "/v1/completions", {"model": MODEL, "prompt": ["x"] * 50_000, "max_tokens": 1}, headers={})
        assert r.status_code == 400 and error_of(r)["param"] == "prompt" and "50000 prompts" in error_of(r)["message"]
        assert not engine.submitted
    r = post(fake, "/v1/completions", {"model": MODEL, "prompt": [[1]] * 100, "n": 6, "max_tokens": 1})
    assert r.status_code == 400 and error_of(r)["param"] == "n"
    r = post(fake, "/v1/completions", {"model": MODEL, "prompt": list(range(100)), "max_tokens": 1})
    assert r.status_code == 200  # one prompt of 100 token ids is not 100 prompts


def test_metrics_need_the_api_key_unless_public():
    engine = FakeEngine()
    with ServerThread(create_app(engine, served_model_name=MODEL, api_key=KEY)) as s:
        assert httpx.get(s.base_url + "/metrics").status_code == 401
        assert httpx.get(s.base_url + "/metrics", headers=headers()).status_code == 200
    with ServerThread(create_app(FakeEngine(), served_model_name=MODEL, api_key=KEY, metrics_public=True)) as s:
        assert httpx.get(s.base_url + "/metrics").status_code == 200
