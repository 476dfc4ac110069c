"""Soak test: minutes of mixed, partly hostile traffic against `pgpt-jax serve`, then its targets.

    python scripts/soak.py                                   # 5 min against random:gpt2, 32 slots
    python scripts/soak.py --model random:tiny --slots 8 --minutes 1
    python scripts/soak.py --url http://127.0.0.1:8000 --pid 1234 --slots 32   # a running server

By default it starts `python -m pgpt_jax.cli serve --model M --slots S` on 127.0.0.1 and a free
port (more flags with --server-args), waits for /ready (or /health where there is no /ready),
runs the traffic, lets the server idle a few seconds, reads /metrics and the server's RSS,
stops the server with SIGTERM and reports how it exited. Loopback only: any other host is
refused. Bounded: every request has a client timeout, the traffic stops at --minutes, what is
still in flight a client timeout later is cut off, and a hard deadline (ready timeout +
minutes + drain + a margin) cancels everything and kills the server.

Roles. `--concurrency` workers each draw a kind of request from a seeded RNG and send it when
their last one has ended (so the load is bounded by the workers, never by arrivals); a burst
task fires `--burst` long streaming requests at once every `--burst-every` seconds; a sampler
reads VmRSS from /proc every few seconds. The kinds:

  normal / stream / chat   completions (n, logprobs, stop, temperature, echo, best_of mixed)
                           and chat, JSON or SSE; a stream must end with `data: [DONE]`
  bad                      invalid JSON, wrong types, unknown fields, out-of-range values,
                           unknown model or path, wrong content type: a 4xx error object
  oversized_prompt         a prompt (or prompt + max_tokens) past the context: 400
                           context_length_exceeded; oversized_body: a body past
                           --max-body-bytes: 413
  disconnect               hang up after the first chunk, while a JSON answer is pending, or
                           in the middle of sending the body
  slow                     read a long stream through a 4 KiB receive buffer, 1 KiB a second,
                           for up to 30 s, then finish it or hang up
  burst                    streams of n=4 with max_tokens up to the context, held for a few
                           seconds then closed; 3 x slots of them pass the server's default
                           queue budget (8 x slots x context tokens), so some must be refused:
                           429 with an error object and Retry-After is an answer

Every request ends in one of: answered (a complete 2xx body with every choice finished, or a
stream whose choices all finished before [DONE]), error (a 4xx/5xx with an OpenAI error object
{"error": {"message", "type", "param", "code"}}, or an in-stream error event then [DONE]),
abandoned (we hung up on purpose), lost (anything else: a reset we did not cause, no answer
within --timeout, a malformed body, a stream without [DONE]).

Targets: 0 lost; 0 5xx from bad input (bad, oversized_*); RSS at the end (idle after the
traffic) at most 1.10x the RSS at minute 1 (at half the run for runs under 2 minutes); every
slot free at the end (/metrics: pgpt_engine_active_slots 0 and pgpt_engine_queue_depth 0).
Prints a summary and one JSON line (--json FILE appends it); exits 0 when every target passes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import ipaddress
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import httpx

from bench_serving import EOS, make_prompts
from bench_serving import percentiles_ms  # nearest-rank p50/p90/p99/mean, in ms

REPO = Path(__file__).resolve().parent.parent
KINDS = {"normal": 30, "stream": 22, "chat": 14, "bad": 12, "oversized_prompt": 5, "oversized_body": 2,
         "disconnect": 8, "slow": 4}  # weights of the workers' draw; bursts run on a timer
LATENCY_KINDS = ("normal", "stream", "chat")
BAD_INPUT_KINDS = ("bad", "oversized_prompt", "oversized_body")
OUTCOMES = ("answered", "error", "abandoned", "lost")
ERROR_FIELDS = {"message", "type", "param", "code"}
WORDS = ("the a river stone light window city morning quiet number paper garden music north old "
         "small bright under between after letter voice table green silver winter field road").split()
RSS_EVERY_S = 2.0
SETTLE_S = 5.0  # idle time after the traffic before the end figures are read
SLOW_HOLD_S = 30.0
BURST_HOLD_S = 10.0
BURST_N = 4  # choices per burst request: 3 x slots requests cost 12 x slots x context tokens
STOP_TIMEOUT_S = 30.0


class SoakError(Exception):
    """The soak cannot go on (the server did not start, or is not ours to test)."""


# ----------------------------------------------------------------------------- judging answers


class Attempt:
    """One request: its kind, and how it ended (see the module docstring for the outcomes)."""

    __slots__ = ("kind", "detail", "outcome", "reason", "status", "code", "seconds", "note")

    def __init__(self, kind: str):
        self.kind, self.detail = kind, ""
        self.outcome = self.reason = self.status = self.code = self.seconds = self.note = None

    def settle(self, outcome: str, reason: str = "") -> None:
        self.outcome, self.reason = outcome, reason


def is_error_object(body) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and ERROR_FIELDS <= err.keys() and isinstance(err["message"], str)


def judge_json(a: Attempt, status: int, headers, raw: bytes, choices: int) -> None:
    """A non-streamed answer (or a stream refused before it began)."""
    a.status = status
    try:
        body = json.loads(raw)
    except ValueError:
        return a.settle("lost", f"HTTP {status}: a body that is not JSON")
    if 200 <= status < 300:
        got = body.get("choices") if isinstance(body, dict) else None
        if isinstance(got, list) and len(got) == choices and all(
                isinstance(c, dict) and c.get("finish_reason") for c in got):
            return a.settle("answered")
        return a.settle("lost", f"HTTP {status}: an incomplete body")
    if not is_error_object(body):
        return a.settle("lost", f"HTTP {status} without an OpenAI error object")
    a.code = body["error"]["code"]
    if status == 429 and "retry-after" not in headers:
        a.note = "429 without Retry-After"
    a.settle("error")


class StreamCheck:
    """What an SSE client must see: JSON chunks, a finish_reason for every choice, then [DONE]."""

    def __init__(self, choices: int):
        self.choices, self.chunks, self.done = choices, 0, False
        self.finished: set = set()
        self.error: Optional[dict] = None
        self.bad: Optional[str] = None

    def line(self, line: str) -> bool:
        """Takes one line; True once [DONE] has arrived."""
        if not line or line.startswith(":"):  # blank separators and SSE comments (keep-alives)
            return False
        data = line[5:].strip() if line.startswith("data:") else None
        if data == "[DONE]":
            self.done = True
            return True
        try:
            chunk = json.loads(data) if data is not None else None
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            self.bad = self.bad or "a stream line that is not a JSON data event"
        elif "error" in chunk:
            if is_error_object(chunk):
                self.error = chunk["error"]
            else:
                self.bad = self.bad or "an error event without an OpenAI error object"
        else:
            self.chunks += 1
            choices = chunk.get("choices")
            self.finished |= {c.get("index") for c in (choices if isinstance(choices, list) else [])
                              if isinstance(c, dict) and c.get("finish_reason")}
        return False

    def judge(self, a: Attempt) -> None:
        if self.bad:
            return a.settle("lost", self.bad)
        if not self.done:
            after = " (after an error event)" if self.error else ""
            return a.settle("lost", f"a stream that ended without [DONE]{after}")
        if self.error is not None:
            a.code = self.error.get("code")
            return a.settle("error")
        if self.finished != set(range(self.choices)):
            return a.settle("lost", "[DONE] before every choice had a finish_reason")
        a.settle("answered")


def expect(a: Attempt, statuses: range | set, code: Optional[str] = None) -> None:
    """Notes (not a target) a bad request answered otherwise than the issue asks."""
    if a.status is not None and (a.status not in statuses or (code is not None and a.code != code)):
        a.note = f"{a.kind} ({a.detail}): HTTP {a.status} {a.code or ''}".rstrip()


# ----------------------------------------------------------------------------- the server under test


@dataclasses.dataclass
class Target:
    """The server under test, as the clients see it."""

    host: str
    port: int
    headers: dict  # the API key, when there is one
    client: httpx.AsyncClient
    timeout: float
    max_body: int
    model: str = ""
    context: int = 0
    bad: list = dataclasses.field(default_factory=list)  # bad_bodies(self), once the model is known

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.netloc}{path}"


def loopback(url: str) -> tuple[str, int]:
    """(host, port) of `url`, or SoakError when it is not a loopback address."""
    parts = urlsplit(url if "//" in url else "http://" + url)
    host = parts.hostname or ""
    try:
        addrs = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            addrs = {ipaddress.ip_address(i[4][0]) for i in socket.getaddrinfo(host, None)}
        except OSError as exc:
            raise SoakError(f"cannot resolve {host!r}: {exc}") from None
    if parts.scheme != "http" or not addrs or not all(a.is_loopback for a in addrs):
        raise SoakError(f"{url} is not a plain-HTTP loopback address: the soak test only runs on this machine")
    return host, parts.port or 80


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: Optional[int]) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        pass
    return None


async def wait_ready(t: Target, proc: Optional[subprocess.Popen], timeout: float) -> str:
    """Polls /ready (where the server has one) or else /health until it answers 200; the path."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise SoakError(f"the server exited with code {proc.returncode} before it was ready")
        for path in ("/ready", "/health"):
            try:
                r = await t.client.get(t.url(path), headers=t.headers, timeout=5)
            except httpx.HTTPError:
                break  # not listening yet
            if r.status_code == 200:
                return path
            if r.status_code != 404:
                break  # this path exists and says "not yet"
        await asyncio.sleep(1.0)
    raise SoakError(f"the server was not ready after {timeout:.0f} s")


async def model_info(t: Target) -> tuple[str, int]:
    r = await t.client.get(t.url("/v1/models"), headers=t.headers)
    if r.status_code != 200:
        raise SoakError(f"GET /v1/models answered {r.status_code}: {r.text[:200]}")
    card = r.json()["data"][0]
    return card["id"], int(card.get("context_length") or 1024)


async def gauges(t: Target) -> dict[str, float]:
    """The unlabelled samples of /metrics (the engine's gauges among them)."""
    r = await t.client.get(t.url("/metrics"), headers=t.headers, timeout=10)
    r.raise_for_status()
    out = {}
    for line in r.text.splitlines():
        name, _, value = line.rpartition(" ")
        if line and not line.startswith("#") and "{" not in name:
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


# ----------------------------------------------------------------------------- request bodies


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def completion_body(t: Target, rng: random.Random, stream: bool) -> tuple[dict, int]:
    """A well-formed completion that fits the context; (body, choices expected)."""
    draw, prompts = rng.random(), 1
    if draw < 0.5:
        prompt = words(rng, 2, 12)
    elif draw < 0.75:
        prompt = make_prompts(1, rng.randint(4, 32), seed=rng.randrange(1 << 30))[0]
    else:
        prompt, prompts = [words(rng, 2, 8) for _ in range(2)], 2
    n = rng.choice((1, 1, 1, 2, 3))
    body = {"model": t.model, "prompt": prompt, "n": n, "max_tokens": rng.randint(8, min(64, t.context // 2)),
            "temperature": rng.choice((0.0, 0.7, 1.0)), "seed": rng.randrange(1 << 31)}
    if rng.random() < 0.3:
        body["logprobs"] = rng.randint(0, 2)
    if rng.random() < 0.3:
        body["stop"] = rng.choice(("\n", [".", "!"], " the"))
    if rng.random() < 0.2:
        body["top_p"] = 0.9
    if rng.random() < 0.1:
        body["echo"] = True
    if stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    elif rng.random() < 0.1:
        body["best_of"] = n + 1
    return body, prompts * n


def chat_body(t: Target, rng: random.Random, stream: bool) -> tuple[dict, int]:
    messages = [{"role": "user", "content": words(rng, 2, 12)}]
    if rng.random() < 0.4:
        messages.insert(0, {"role": "system", "content": words(rng, 2, 6)})
    n = rng.choice((1, 1, 2))
    body = {"model": t.model, "messages": messages, "n": n, "max_tokens": rng.randint(8, min(64, t.context // 2)),
            "temperature": rng.choice((0.0, 0.7, 1.0)), "stream": stream}
    if rng.random() < 0.3:
        body.update(logprobs=True, top_logprobs=rng.randint(0, 2))
    return body, n


def bad_bodies(t: Target) -> list[tuple[str, str, str, bytes, dict]]:
    """(what, method, path, body, extra headers): each must get a 4xx with an error object."""
    m, C, CH = t.model, "/v1/completions", "/v1/chat/completions"
    hello = [{"role": "user", "content": "hi"}]

    def j(**fields) -> bytes:  # a good completion body with `fields` changed (... drops a field)
        return json.dumps({k: v for k, v in {"model": m, "prompt": "hello", **fields}.items() if v is not ...}).encode()

    def chat(**fields) -> bytes:
        return json.dumps({"model": m, "messages": hello, **fields}).encode()

    rows = [
        ("truncated JSON", "POST", C, j()[:-3], {}),
        ("not an object", "POST", C, b"[1, 2, 3]", {}),
        ("NaN", "POST", C, j()[:-1] + b', "temperature": NaN}', {}),
        ("not UTF-8", "POST", C, b'\xff\xfe{"model"', {}),
        ("deep nesting", "POST", C, b"[" * 100_000, {}),
        ("empty body", "POST", C, b"", {}),
        ("max_tokens a string", "POST", C, j(max_tokens="16"), {}),
        ("prompt an object", "POST", C, j(prompt={"a": 1}), {}),
        ("unknown field", "POST", C, j(max_token=16), {}),
        ("temperature 5", "POST", C, j(temperature=5), {}),
        ("n 0", "POST", C, j(n=0), {}),
        ("logprobs 99", "POST", C, j(logprobs=99), {}),
        ("top_p 2", "POST", C, j(top_p=2), {}),
        ("max_tokens -1", "POST", C, j(max_tokens=-1), {}),
        ("seed 2**70", "POST", C, j(seed=2 ** 70), {}),
        ("logit_bias key outside the vocabulary", "POST", C, j(logit_bias={"9999999": 1}), {}),
        ("logit_bias value 500", "POST", C, j(logit_bias={"11": 500}), {}),
        ("token id outside the vocabulary", "POST", C, j(prompt=[10 ** 7]), {}),
        ("empty prompt array", "POST", C, j(prompt=[]), {}),
        ("five stop strings", "POST", C, j(stop=list("abcde")), {}),
        ("best_of < n", "POST", C, j(n=3, best_of=2), {}),
        ("stream_options without stream", "POST", C, j(stream_options={"include_usage": True}), {}),
        ("unknown model", "POST", C, j(model="no-such-model"), {}),
        ("no model", "POST", C, j(model=...), {}),
        ("text/plain", "POST", C, j(), {"Content-Type": "text/plain"}),
        ("chat: no messages", "POST", CH, chat(messages=[]), {}),
        ("chat: unknown role", "POST", CH, chat(messages=[{"role": "robot", "content": "hi"}]), {}),
        ("chat: content a number", "POST", CH, chat(messages=[{"role": "user", "content": 5}]), {}),
        ("chat: top_logprobs without logprobs", "POST", CH, chat(top_logprobs=2), {}),
        ("GET on a POST route", "GET", C, b"", {}),
        ("unknown path", "POST", "/v1/nothing-here", j(), {}),
    ]
    if t.headers:
        rows.append(("wrong API key", "POST", C, j(), {"Authorization": "Bearer not-the-key"}))
    return rows


# ----------------------------------------------------------------------------- clients: httpx


async def post_json(t: Target, a: Attempt, path: str, body: dict, choices: int) -> None:
    r = await t.client.post(t.url(path), json=body, headers=t.headers)
    judge_json(a, r.status_code, r.headers, r.content, choices)


async def stream(t: Target, a: Attempt, path: str, body: dict, choices: int, *,
                 hold: Optional[float] = None, first_only: bool = False) -> None:
    """Reads an SSE answer; hangs up after `hold` seconds or the first chunk when asked to."""
    async with t.client.stream("POST", t.url(path), json=body, headers=t.headers) as r:
        if r.status_code != 200:
            return judge_json(a, r.status_code, r.headers, await r.aread(), choices)
        a.status, check = 200, StreamCheck(choices)
        try:
            async with asyncio.timeout(hold):
                async for line in r.aiter_lines():
                    if check.line(line):
                        break
                    if first_only and check.chunks:
                        return a.settle("abandoned")
        except TimeoutError:  # only `hold` raises it here: httpx's timeouts are its own exceptions
            return a.settle("abandoned")
        check.judge(a)


# ----------------------------------------------------------------------------- clients: raw sockets
# For what httpx cannot do on purpose: read through a tiny receive window, stop mid-body, and
# wait for a 413 before sending a body the server will refuse. HTTP/1.0, so the answer is
# framed by the connection's end (uvicorn never sends chunked framing to a 1.0 client).


async def raw_open(t: Target, rcvbuf: Optional[int] = None):
    sock = socket.socket(socket.AF_INET6 if ":" in t.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf:  # before connect, so the window the server sees is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (t.host, t.port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


def request_head(t: Target, path: str, length: int) -> bytes:
    lines = [f"POST {path} HTTP/1.0", f"Host: {t.netloc}", "Content-Type: application/json",
             f"Content-Length: {length}", *(f"{k}: {v}" for k, v in t.headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict]:
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if ":" in x)}
    return int(lines[0].split()[1]), headers


async def read_rest(t: Target, reader: asyncio.StreamReader, headers: dict) -> bytes:
    """Everything up to the server's close, with --timeout for each read (not for the whole)."""
    data = bytearray()
    while chunk := await asyncio.wait_for(reader.read(1 << 16), t.timeout):
        data += chunk
    return dechunk(bytes(data)) if headers.get("transfer-encoding", "").lower() == "chunked" else bytes(data)


def dechunk(data: bytes) -> bytes:
    """HTTP/1.1 chunked framing -> the body (raises ValueError when it is cut short)."""
    out, i = [], 0
    while True:
        j = data.index(b"\r\n", i)
        size = int(data[i:j].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        if j + 2 + size > len(data):
            raise ValueError("a chunk cut short")
        out.append(data[j + 2:j + 2 + size])
        i = j + 4 + size


async def slow_reader(t: Target, a: Attempt, rng: random.Random, until: float) -> None:
    """A long stream read 1 KiB a second through a 4 KiB window, then finished or dropped."""
    body = json.dumps({"model": t.model, "prompt": make_prompts(1, 8, seed=rng.randrange(1 << 30))[0],
                       "max_tokens": min(256, t.context - 16), "n": 2, "logprobs": 2, "stream": True,
                       "logit_bias": {str(EOS): -100}, "seed": rng.randrange(1 << 31)}).encode()
    reader, writer = await raw_open(t, rcvbuf=4096)
    try:
        writer.write(request_head(t, "/v1/completions", len(body)) + body)
        await writer.drain()
        status, headers = await asyncio.wait_for(read_head(reader), t.timeout)
        if status != 200:
            return judge_json(a, status, headers, await read_rest(t, reader, headers), 2)
        a.status, data = 200, bytearray()
        hold_until = time.monotonic() + min(rng.uniform(5, SLOW_HOLD_S), max(1.0, until - time.monotonic()))
        while time.monotonic() < hold_until:
            chunk = await asyncio.wait_for(reader.read(1024), t.timeout)
            if not chunk:
                break
            data += chunk
            await asyncio.sleep(1.0)
        else:
            if rng.random() < 0.5:
                return a.settle("abandoned")
        data += await read_rest(t, reader, {})
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = bytearray(dechunk(bytes(data)))
        check = StreamCheck(2)
        for line in data.decode("utf-8", "replace").splitlines():
            if check.line(line):
                break
        check.judge(a)
    finally:
        writer.close()


async def oversized_body(t: Target, a: Attempt, rng: random.Random) -> None:
    """Content-Length past --max-body-bytes: the body is sent only if no answer comes first."""
    length = t.max_body + 1 + rng.randrange(4096)
    reader, writer = await raw_open(t)
    try:
        writer.write(request_head(t, "/v1/completions", length))
        await writer.drain()
        try:
            status, headers = await asyncio.wait_for(read_head(reader), 2.0)
        except TimeoutError:  # this server reads before it counts: send the body, 64 KiB at a time
            piece = b" " * (1 << 16)
            for start in range(0, length, len(piece)):
                writer.write(piece[:length - start])
                await writer.drain()
            status, headers = await asyncio.wait_for(read_head(reader), t.timeout)
        judge_json(a, status, headers, await read_rest(t, reader, headers), 1)
    finally:
        writer.close()


async def cut_body(t: Target, a: Attempt, rng: random.Random) -> None:
    """Declares a body, sends part of it, hangs up."""
    _, writer = await raw_open(t)
    try:
        writer.write(request_head(t, "/v1/completions", 2000) + b'{"model": "' + t.model.encode() + b'", "pro')
        await writer.drain()
        await asyncio.sleep(rng.uniform(0.0, 0.5))
    finally:
        writer.close()
    a.settle("abandoned")


# ----------------------------------------------------------------------------- the kinds


async def send(t: Target, kind: str, rng: random.Random, a: Attempt, until: float) -> None:
    """Sends one request of `kind` and settles `a`."""
    if kind in ("normal", "stream"):
        body, choices = completion_body(t, rng, stream=kind == "stream")
        if kind == "stream":
            return await stream(t, a, "/v1/completions", body, choices)
        return await post_json(t, a, "/v1/completions", body, choices)
    if kind == "chat":
        body, choices = chat_body(t, rng, stream=rng.random() < 0.5)
        if body["stream"]:
            return await stream(t, a, "/v1/chat/completions", body, choices)
        return await post_json(t, a, "/v1/chat/completions", body, choices)
    if kind == "bad":
        a.detail, method, path, content, extra = rng.choice(t.bad)
        headers = {**t.headers, "Content-Type": "application/json", **extra}
        r = await t.client.request(method, t.url(path), content=content, headers=headers)
        judge_json(a, r.status_code, r.headers, r.content, 1)
        return expect(a, range(400, 500))
    if kind == "oversized_prompt":
        too_long = make_prompts(1, t.context + rng.randint(1, 64), seed=rng.randrange(1 << 30))[0]
        a.detail, path, body = rng.choice((
            ("prompt past the context", "/v1/completions", {"prompt": too_long}),
            ("prompt past the context, streamed", "/v1/completions", {"prompt": too_long, "stream": True}),
            ("max_tokens past the context", "/v1/completions", {"prompt": "hello", "max_tokens": t.context + 1}),
            ("chat past the context", "/v1/chat/completions",
             {"messages": [{"role": "user", "content": " ".join(WORDS[i % len(WORDS)] for i in range(t.context))}]}),
        ))
        body = {"model": t.model, **body}
        await (stream if body.get("stream") else post_json)(t, a, path, body, 1)
        return expect(a, {400}, "context_length_exceeded")
    if kind == "oversized_body":
        a.detail = "body past --max-body-bytes"
        await oversized_body(t, a, rng)
        return expect(a, {413})
    if kind == "disconnect":
        a.detail = rng.choice(("after the first chunk", "while waiting", "mid-body"))
        if a.detail == "mid-body":
            return await cut_body(t, a, rng)
        body, choices = completion_body(t, rng, stream=a.detail == "after the first chunk")
        body["max_tokens"] = t.context // 2  # long enough to be still running when we leave
        if a.detail == "after the first chunk":
            return await stream(t, a, "/v1/completions", body, choices, first_only=True)
        try:
            return await asyncio.wait_for(post_json(t, a, "/v1/completions", body, choices), rng.uniform(0.05, 1.0))
        except TimeoutError:
            return a.settle("abandoned")
    if kind == "slow":
        return await slow_reader(t, a, rng, until)
    if kind == "burst":
        body = {"model": t.model, "prompt": make_prompts(1, 8, seed=rng.randrange(1 << 30))[0], "max_tokens": None,
                "n": BURST_N, "stream": True, "logit_bias": {str(EOS): -100}}  # max_tokens null: up to the context
        return await stream(t, a, "/v1/completions", body, BURST_N, hold=rng.uniform(2.0, BURST_HOLD_S))
    raise ValueError(kind)


async def attempt(t: Target, kind: str, rng: random.Random, attempts: list, until: float) -> None:
    """One request, counted as sent before it goes and settled however it ends."""
    a = Attempt(kind)
    attempts.append(a)
    t0 = time.perf_counter()
    try:
        await send(t, kind, rng, a, until)
    except asyncio.CancelledError:
        a.settle("lost", "cut off by the soak's deadline")
        raise
    except (TimeoutError, httpx.TimeoutException):
        a.settle("lost", f"no answer within {t.timeout:.0f} s")
    except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
        a.settle("lost", f"{type(exc).__name__}: {str(exc)[:80]}")
    except Exception as exc:  # noqa: BLE001 - a bug of ours must not end a worker: it shows as a reason
        a.settle("lost", f"soak client bug? {type(exc).__name__}: {str(exc)[:80]}")
    finally:
        a.seconds = time.perf_counter() - t0


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """What the soak has seen so far: kept outside the coroutine so a deadline still reports it."""

    attempts: list = dataclasses.field(default_factory=list)
    rss: list = dataclasses.field(default_factory=list)  # (seconds into the traffic, MB)
    pid: Optional[int] = None
    model: str = ""
    ready_path: str = ""
    ready_s: Optional[float] = None
    traffic_s: Optional[float] = None
    rss_idle: Optional[float] = None
    rss_end: Optional[float] = None
    gauges: Optional[dict] = None
    gauges_error: str = ""
    deadline_hit: bool = False


async def traffic(t: Target, run: Run, args) -> None:
    seconds = args.minutes * 60
    t0 = time.monotonic()
    until = t0 + seconds
    slow_readers = asyncio.Semaphore(max(1, args.concurrency // 8))

    async def worker(i: int) -> None:
        rng = random.Random(f"{args.seed}-{i}")
        kinds, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < until:
            kind = rng.choices(kinds, weights)[0]
            if kind == "slow" and slow_readers.locked():
                kind = "stream"
            if kind == "slow":
                async with slow_readers:
                    await attempt(t, kind, rng, run.attempts, until)
            else:
                await attempt(t, kind, rng, run.attempts, until)

    async def bursts() -> None:
        rng = random.Random(f"{args.seed}-burst")
        at = t0 + min(20.0, seconds / 3)
        while at < until:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            await asyncio.gather(*(attempt(t, "burst", rng, run.attempts, until) for _ in range(args.burst)))
            at = max(at + args.burst_every, time.monotonic())

    async def sample_rss() -> None:
        while True:
            mb = rss_mb(run.pid)
            if mb is not None:
                run.rss.append((time.monotonic() - t0, mb))
            await asyncio.sleep(RSS_EVERY_S)

    sampler = asyncio.create_task(sample_rss())
    tasks = [asyncio.create_task(worker(i)) for i in range(args.concurrency)] + [asyncio.create_task(bursts())]
    try:
        while time.monotonic() < until:
            await asyncio.sleep(min(30.0, until - time.monotonic()))
            counts = collections.Counter(a.outcome or "in flight" for a in run.attempts)
            mb = rss_mb(run.pid)
            print(f"soak: {time.monotonic() - t0:5.0f} s  sent {len(run.attempts)}  {dict(counts)}"
                  + (f"  rss {mb:.0f} MB" if mb else ""), file=sys.stderr, flush=True)
        # What is in flight finishes on its own within a client timeout; then it is cut off.
        _, pending = await asyncio.wait(tasks, timeout=t.timeout + 15)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        run.traffic_s = time.monotonic() - t0
        run.rss_idle = rss_mb(run.pid)
        await asyncio.sleep(SETTLE_S)
    finally:
        for task in tasks + [sampler]:
            task.cancel()
        await asyncio.gather(*tasks, sampler, return_exceptions=True)


async def soak(args, run: Run, proc: Optional[subprocess.Popen], host: str, port: int) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    room = args.concurrency + args.burst + 16
    limits = httpx.Limits(max_connections=room, max_keepalive_connections=room,
                          keepalive_expiry=2.0)  # below uvicorn's 5 s: never reuse a connection it is closing
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        t = Target(host, port, headers, client, args.timeout, args.max_body_bytes)
        t0 = time.monotonic()
        print(f"soak: waiting for the server on {t.url('')} (warm-up) ...", file=sys.stderr, flush=True)
        run.ready_path = await wait_ready(t, proc, args.ready_timeout)
        run.ready_s = time.monotonic() - t0
        t.model, t.context = await model_info(t)
        t.bad, run.model = bad_bodies(t), t.model
        print(f"soak: {run.ready_path} said ready after {run.ready_s:.0f} s; serving {t.model!r} "
              f"(context {t.context}); {args.minutes:g} min of traffic", file=sys.stderr, flush=True)
        await traffic(t, run, args)
        run.rss_end = rss_mb(run.pid)
        try:
            run.gauges = await gauges(t)
        except httpx.HTTPError as exc:
            run.gauges_error = f"{type(exc).__name__}: {exc}"


def start_server(args, port: int, log) -> tuple[subprocess.Popen, list[str]]:
    cmd = [sys.executable, "-m", "pgpt_jax.cli", "serve", "--model", args.model, "--slots", str(args.slots),
           "--host", "127.0.0.1", "--port", str(port), "--max-body-bytes", str(args.max_body_bytes),
           *shlex.split(args.server_args)]
    env = dict(os.environ)
    if args.api_key:
        env["PGPT_API_KEY"] = args.api_key  # not on the command line, where `ps` shows it
    # A session of its own: a Ctrl-C at the terminal is ours to handle, and we stop the server.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, cmd


def stop_server(proc: subprocess.Popen) -> dict:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S: how it exited and how long it took."""
    if proc.poll() is not None:
        return {"exit_code": proc.returncode, "stop_s": 0.0, "died_before_stop": True}
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(STOP_TIMEOUT_S)
        killed = False
    except subprocess.TimeoutExpired:
        proc.kill()
        code, killed = proc.wait(), True
    return {"exit_code": code, "stop_s": round(time.monotonic() - t0, 1), "killed_after_timeout": killed}


# ----------------------------------------------------------------------------- the report


def summarize(args, run: Run, command: list[str], server_cmd: Optional[list[str]], server: Optional[dict]) -> dict:
    attempts = run.attempts
    for a in attempts:
        if a.outcome is None:
            a.settle("lost", "never settled")
    outcomes = collections.Counter(a.outcome for a in attempts)
    by_kind = {k: dict(collections.Counter(a.outcome for a in attempts if a.kind == k))
               for k in [*KINDS, "burst"] if any(a.kind == k for a in attempts)}
    statuses = collections.Counter(str(a.status) for a in attempts if a.status is not None)
    server_errors = [a for a in attempts if a.status is not None and a.status >= 500]
    bad_5xx = [a for a in server_errors if a.kind in BAD_INPUT_KINDS]
    latency = {k: {q: v for q, v in percentiles_ms([a.seconds for a in attempts
                                                    if a.kind == k and a.outcome == "answered"]).items()
                   if q in ("p50", "p99")} for k in LATENCY_KINDS}

    # RSS at minute 1: the first sample from 60 s on (half the run when it is under 2 minutes).
    at = min(60.0, args.minutes * 30)
    minute1 = next((mb for s, mb in run.rss if s >= at), None)
    peak = max([mb for _, mb in run.rss] + [x for x in (run.rss_end,) if x is not None], default=None)
    ratio = round(run.rss_end / minute1, 3) if minute1 and run.rss_end else None
    g = run.gauges or {}
    slots = int(g.get("pgpt_engine_slots", args.slots))
    active, queued = g.get("pgpt_engine_active_slots"), g.get("pgpt_engine_queue_depth")
    free = None if active is None else int(slots - active)

    def verdict(ok: Optional[bool]) -> str:
        return "SKIP" if ok is None else ("PASS" if ok else "FAIL")

    targets = {
        "0 lost": verdict(outcomes["lost"] == 0 and not run.deadline_hit),
        "0 5xx from bad input": verdict(not bad_5xx),
        "RSS at the end within 10% of minute 1": verdict(None if run.pid is None else bool(ratio and ratio <= 1.10)),
        "all slots free at the end": verdict(active == 0 and queued in (0, None)),
    }
    return {
        "command": shlex.join(command), "server_command": shlex.join(server_cmd) if server_cmd else None,
        "model": run.model, "slots": slots, "concurrency": args.concurrency, "seed": args.seed,
        "minutes": args.minutes, "ready_via": run.ready_path,
        "ready_s": None if run.ready_s is None else round(run.ready_s, 1),
        "traffic_s": None if run.traffic_s is None else round(run.traffic_s, 1),
        "deadline_hit": run.deadline_hit,
        "sent": len(attempts), **{o: outcomes[o] for o in OUTCOMES}, "by_kind": by_kind,
        "status_counts": dict(sorted(statuses.items())),
        "5xx": len(server_errors), "5xx_from_bad_input": len(bad_5xx),
        "5xx_examples": sorted({f"{a.kind} ({a.detail}): {a.status} {a.code}" for a in server_errors})[:5],
        "lost_reasons": dict(collections.Counter(f"{a.kind}: {a.reason}" for a in attempts if a.outcome == "lost")),
        "unexpected_answers": dict(collections.Counter(a.note for a in attempts if a.note)),
        "latency_ms": latency,
        "rss_mb": {"minute1": minute1 and round(minute1, 1), "minute1_at_s": at, "peak": peak and round(peak, 1),
                   "idle_after_traffic": run.rss_idle and round(run.rss_idle, 1),
                   "end": run.rss_end and round(run.rss_end, 1), "end_over_minute1": ratio},
        "active_slots_end": active, "queue_depth_end": queued, "free_slots_end": free,
        "metrics_error": run.gauges_error or None,
        "server_stop": server,
        "targets": targets, "pass": all(v != "FAIL" for v in targets.values()),
    }


def print_summary(r: dict) -> None:
    def mb(x) -> str:
        return "n/a" if x is None else f"{x:.0f} MB"

    lat = "  ".join(f"{k} {v.get('p50')}/{v.get('p99')}" for k, v in r["latency_ms"].items())
    rss = r["rss_mb"]
    lines = [
        f"soak: {r['traffic_s']} s of traffic against {r['model']} ({r['slots']} slots), "
        f"{r['concurrency']} clients, seed {r['seed']}" + ("  [HARD DEADLINE HIT]" if r["deadline_hit"] else ""),
        f"  requests   sent {r['sent']}  answered {r['answered']}  error {r['error']}  "
        f"abandoned {r['abandoned']}  lost {r['lost']}",
        *(f"    {k:17s}{v}" for k, v in r["by_kind"].items()),
        f"  status     {r['status_counts']}",
        f"  5xx        {r['5xx']} ({r['5xx_from_bad_input']} from bad input) {r['5xx_examples'] or ''}",
        f"  latency    p50/p99 ms of answered requests: {lat}",
        f"  rss        minute 1 (at {rss['minute1_at_s']:.0f} s) {mb(rss['minute1'])}, peak {mb(rss['peak'])}, "
        f"idle after traffic {mb(rss['idle_after_traffic'])}, end {mb(rss['end'])} ({rss['end_over_minute1']}x)",
        f"  slots      {r['free_slots_end']} of {r['slots']} free at the end, queue {r['queue_depth_end']}"
        + (f" ({r['metrics_error']})" if r["metrics_error"] else ""),
        f"  server     {r['server_stop'] or 'not ours: left running'}",
    ]
    lines += [f"  lost       {n}x {why}" for why, n in r["lost_reasons"].items()]
    lines += [f"  unexpected {n}x {what}" for what, n in r["unexpected_answers"].items()]
    lines += [f"  {v}       {k}" for k, v in r["targets"].items()]
    print("\n".join(lines), flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="how long the traffic runs")
    p.add_argument("--model", default="random:gpt2", help="--model of the server this starts")
    p.add_argument("--slots", type=int, default=32, help="--slots of the server (and the free-slot target)")
    p.add_argument("--server-args", default="", help="more flags for `pgpt-jax serve`, one string")
    p.add_argument("--url", default=None, help="a running server instead (loopback only), e.g. http://127.0.0.1:8000")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for its RSS")
    p.add_argument("--api-key", default=os.environ.get("PGPT_API_KEY"), help="sent with every request")
    p.add_argument("--concurrency", type=int, default=32, help="workers, each with one request in flight")
    p.add_argument("--burst", type=int, default=None, help="requests per burst (default 3 x slots)")
    p.add_argument("--burst-every", type=float, default=60.0, help="seconds between bursts")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="the server's body limit")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per read, seconds")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-log", default=None, help="the started server's output (default: a temp file)")
    p.add_argument("--json", default=None, help="append the JSON line to this file")
    args = p.parse_args(argv)
    args.burst = args.burst if args.burst is not None else 3 * args.slots
    command = [os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "soak.py", *(argv or sys.argv[1:])]

    run, proc, server_cmd, server, log = Run(), None, None, None, None
    try:
        if args.url:
            host, port = loopback(args.url)
            run.pid = args.pid
        else:
            host, port = "127.0.0.1", free_port()
            log_path = args.server_log or tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1]
            log = open(log_path, "w")
            proc, server_cmd = start_server(args, port, log)
            run.pid = proc.pid
            print(f"soak: started {shlex.join(server_cmd)} (pid {proc.pid}, log {log_path})", file=sys.stderr)
        deadline = args.ready_timeout + args.minutes * 60 + args.timeout + 15 + SETTLE_S + 60
        try:
            asyncio.run(asyncio.wait_for(soak(args, run, proc, host, port), deadline))
        except TimeoutError:
            run.deadline_hit = True
            print(f"soak: hard deadline of {deadline:.0f} s hit: everything cancelled", file=sys.stderr)
    except SoakError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        if proc is not None:
            print(f"soak: server stopped: {stop_server(proc)}; its log ({log_path}) ends with:\n"
                  + Path(log_path).read_text()[-3000:], file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            server = stop_server(proc)  # whatever happened above: never leave it running
        if log is not None:
            log.close()
    report = summarize(args, run, command, server_cmd, server)
    print_summary(report)
    line = json.dumps(report)
    print(line, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return 0 if report["pass"] and not run.deadline_hit else 1


if __name__ == "__main__":
    sys.exit(main())
