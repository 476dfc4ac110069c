"""Shared by the server test modules: a real uvicorn server in a thread, and a fake engine.

No tests here. The fake engine follows the engine contract (pgpt_jax/request.py and
Engine's submit/check/abort) with output that can be computed by hand, so the HTTP layer's
edge cases (a failure after the 200, a queue that is full, a slow stream to walk away
from) can be made to happen on demand; the real engine is tested in test_server.py.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Optional

import uvicorn

from pgpt_jax.config import GPTConfig
from pgpt_jax.request import (Choice, Delta, EngineUnavailable, Limits, Logprobs, QueueFull, Request, Result,
                              context_error)
from server.http import HTTPSettings, uvicorn_config
from pgpt_jax.tokenizer import get_tokenizer


class ServerThread:
    """`with ServerThread(app) as s:` serves `app` on 127.0.0.1 at a free port (s.base_url)."""

    def __init__(self, app, settings: HTTPSettings = HTTPSettings()):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.port, settings, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, procs, timeout: float = 500) -> None:
    """Polls `url`/ready until it answers 200; fails with a process's output if one exits first."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            assert p.poll() is None, p.stdout.read()[-3000:]
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} was not ready within {timeout} s")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


WORDS = " the quick brown fox jumps over the lazy dog"


class FakeEngine:
    """The engine contract with hand-computable output and no device.

    Choice i of a request produces the tokens of WORDS starting at word i (cycling), one
    every `delay` seconds, until max_tokens: finish_reason "length", logprobs -1.0 each.
    A request with `seed == FAIL_SEED` fails with a RuntimeError after its first token.
    Each request runs in a thread of its own and holds `best_of` slots while it runs.
    """

    FAIL_SEED = 666

    def __init__(self, *, context_length: int = 128, max_queue: int = 1000, delay: float = 0.0,
                 max_logprobs: int = 5, fim: bool = False, fim_order: str = "psm"):
        self.config = GPTConfig.preset("tiny", fim=fim, vocab_size=50260 if fim else 50257, fim_order=fim_order)
        self.tokenizer = get_tokenizer(fim=fim)
        self.context_length, self.delay = context_length, delay
        self.limits = Limits(max_logprobs=max_logprobs, max_queue=max_queue)
        self.compile_count = 0
        self.submitted: list[Request] = []
        self.aborted = 0
        self._lock = threading.Lock()
        self._active = 0
        self._running: set = set()
        self.started = self.stopped = self.dead = False
        self.words = self.tokenizer.encode(WORDS)

    @property
    def active_slots(self) -> int:
        return self._active

    @property
    def queue_depth(self) -> int:
        return 0

    batch_yields = 0  # no batch work on the fake engine
    prefix_cache_hit_rate = prefix_cache_hit_tokens = prefix_cache_queried_tokens = 0  # no prefix cache
    prefix_cache_blocks_used = prefix_cache_blocks = 0
    spec_proposed_tokens = spec_accepted_tokens = 0  # no speculative decoding

    @property
    def requests_waiting(self) -> int:
        return 0

    @property
    def requests_running(self) -> int:
        return len(self._running)

    @property
    def kv_cache_usage(self) -> float:
        return 0.0

    @property
    def alive(self) -> bool:
        return not self.dead and not self.stopped

    def start(self) -> None:
        self.started = True

    def stop(self, why: str = "The engine stopped.") -> None:
        """Like the engine: every request still running ends with EngineUnavailable(why)."""
        self.stopped = True
        with self._lock:
            running = list(self._running)
        for handle in running:
            handle.fail(EngineUnavailable(why))

    def warmup(self, progress: bool = False) -> float:
        return 0.0

    def check(self, r: Request) -> None:
        err = context_error(self.context_length, len(r.prompt), r.max_tokens or 0)
        if err is not None:
            raise err

    def submit(self, r: Request, callback) -> "FakeHandle":
        return self.submit_all([r], [callback])[0]

    def submit_all(self, requests, callbacks) -> list:
        for r in requests:
            self.check(r)
        with self._lock:
            if self.stopped or self.dead:
                raise EngineUnavailable("The engine stopped.")
            if len(self._running) + len(requests) > self.limits.max_queue:
                raise QueueFull("The engine's queue is full; retry later.")
            handles = []
            for r, cb in zip(requests, callbacks):
                self.submitted.append(r)
                handles.append(FakeHandle(self, cb))
                self._running.add(handles[-1])
        for r, cb, h in zip(requests, callbacks, handles):
            threading.Thread(target=self._run, args=(r, cb, h), daemon=True).start()
        return handles

    def _run(self, r: Request, callback, handle: "FakeHandle") -> None:
        best_of = r.best_of or r.n
        steps = r.max_tokens if r.max_tokens is not None else self.context_length - len(r.prompt)
        with self._lock:
            self._active += best_of
        echo_ids = r.echo_prompt if r.echo_prompt is not None else r.prompt
        prefix = self.tokenizer.decode(echo_ids) if r.echo else ""
        texts = [""] * best_of
        try:
            for k in range(steps):
                if handle.ended:
                    return
                time.sleep(self.delay)
                for i in range(best_of):
                    tok = self.words[(i + k) % len(self.words)]
                    piece = self.tokenizer.decode([tok])
                    texts[i] += piece
                    if r.stream and not handle.ended:
                        text = (prefix if k == 0 else "") + piece
                        lp = self._lp([tok], len(prefix) + len(texts[i]) - len(piece)) if r.logprobs is not None else None
                        callback(Delta(index=i, text=text, logprobs=lp,
                                       finish_reason="length" if k == steps - 1 else None))
                if r.seed == self.FAIL_SEED:
                    handle.finish(RuntimeError("fake engine failure"))
                    return
            choices = []
            for i in range(r.n):
                ids = [self.words[(i + k) % len(self.words)] for k in range(steps)]
                lp = self._lp(ids, len(prefix)) if r.logprobs is not None else None
                choices.append(Choice(index=i, text=prefix + texts[i], token_ids=ids, finish_reason="length",
                                      logprobs=lp))
            handle.finish(Result(choices=choices, prompt_tokens=len(r.prompt), completion_tokens=steps * best_of))
        finally:
            with self._lock:
                self._active -= best_of
                self._running.discard(handle)

    def _lp(self, ids, offset) -> Logprobs:
        lp = Logprobs()
        for t in ids:
            s = self.tokenizer.decode([t])
            lp.tokens.append(s)
            lp.token_logprobs.append(-1.0)
            lp.top_logprobs.append({s: -1.0})
            lp.text_offset.append(offset)
            offset += len(s)
        return lp


class FakeHandle:
    """One request of the fake: it ends once (a Result, an exception, or an abort)."""

    def __init__(self, engine: FakeEngine, callback):
        self.engine, self.callback = engine, callback
        self.aborted = self.ended = False
        self._lock = threading.Lock()

    def abort(self) -> None:
        with self._lock:
            if self.aborted:
                return
            self.aborted = self.ended = True
        with self.engine._lock:
            self.engine.aborted += 1

    def finish(self, event) -> None:
        with self._lock:
            if self.ended:
                return
            self.ended = True
        self.callback(event)

    def fail(self, exc: BaseException) -> None:
        self.finish(exc)


def error_of(response) -> Optional[dict]:
    """The OpenAI error object of an httpx response, asserting its shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    return err
