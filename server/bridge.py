"""The bridge between the engine thread and asyncio: one `_Run` per HTTP request in flight.

The engine runs its host loop in its own thread and answers each request through a
callback on that thread. The callback never touches asyncio objects directly: it hands
the event to the server's event loop with `loop.call_soon_threadsafe`, which puts it on
the run's queue. A handler then awaits the queue (every final event for a non-streaming
request; deltas as they come for a stream), while also watching for the client going
away: a client that disconnects aborts its engine work (`handle.abort()`), so its slots
are free at the engine's next iteration.

Every run ends with an answer. Non-streaming: the JSON body, or an OpenAI error object
with its status. Streaming: chunks, then `data: [DONE]`; when the request fails after the
200 went out, an `error` event comes first. A stream that waits sends `: ping` comments
so that proxies keep the connection; a reader that falls more than `stream_buffer` events
behind is aborted (its slots freed) rather than allowed to grow the server's memory.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import deque
from typing import Any, Callable, Optional

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response, StreamingResponse

from pgpt_jax import timeline
from pgpt_jax.request import Delta, EngineUnavailable, QueueFull, RequestError, RequestTimeout, Result
from server import responses
from server.metrics import Metrics
from server.protocol import APIError, Job

log = logging.getLogger("pgpt_jax.server")

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"


class StreamOverflow(RuntimeError):
    """The client read a stream too slowly: its work was aborted."""


def json_response(obj: Any, status: int = 200, headers: Optional[dict] = None) -> Response:
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def engine_error(exc: BaseException) -> APIError:
    """An engine-side ending -> the OpenAI error object and status a client gets."""
    if isinstance(exc, RequestError):
        return APIError(400, exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, QueueFull):
        return APIError(429, f"{exc} The server is at capacity.", type="server_overloaded", code="queue_full",
                        headers={"Retry-After": "1"})
    if isinstance(exc, EngineUnavailable):
        return APIError(503, str(exc), type="server_error", code="server_unavailable", headers={"Retry-After": "5"})
    if isinstance(exc, RequestTimeout) and exc.where == "queue":
        return APIError(503, str(exc), type="server_overloaded", code="queue_timeout", headers={"Retry-After": "1"})
    if isinstance(exc, RequestTimeout):
        return APIError(504, str(exc), type="timeout", code="request_timeout")
    if isinstance(exc, StreamOverflow):
        return APIError(400, str(exc), code="stream_reader_too_slow")
    log.error("engine failed a request: %r", exc)
    return APIError(500, f"The engine failed this request: {exc}", type="server_error", code="engine_error")


async def _disconnected(receive) -> None:
    """Returns when the client has gone away (the body is already read, so nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _Run:
    """A Job's engine requests in flight, and the bounded queue their callbacks feed."""

    def __init__(self, job: Job, engine, loop: asyncio.AbstractEventLoop, runs: set, buffer: int,
                 marks: Optional[dict] = None):
        self.job, self.engine, self.loop, self.runs, self.buffer = job, engine, loop, runs, buffer
        self.marks = marks  # timeline.py's server-side marks (PGPT_TIMELINE), else None
        self.events: deque = deque()
        self.ready = asyncio.Event()
        self.handles: list = []
        self.open: set[int] = set()  # prompts whose final event has not arrived
        self.start = time.perf_counter()

    def submit(self) -> None:
        """All prompts or none (a bad third prompt must not leave the first two generating for nobody)."""
        callbacks = [functools.partial(self._post, i) for i in range(len(self.job.requests))]
        self.handles = self.engine.submit_all(self.job.requests, callbacks)
        timeline.mark(self.marks, "accepted")
        self.open = set(range(len(self.job.requests)))
        self.runs.add(self)

    def _post(self, i: int, event) -> None:  # runs on the engine thread
        try:
            self.loop.call_soon_threadsafe(self._put, i, event)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _put(self, i: int, event) -> None:  # runs on the event loop
        if i not in self.open:
            return  # ended already (aborted, overflowed): drop what was still in flight
        if isinstance(event, Delta) and len(self.events) >= self.buffer:
            # The reader is too slow: stop generating for it instead of buffering without end.
            self.events.clear()
            self.abort()
            self.events.append((i, StreamOverflow(
                f"The client read the stream too slowly ({self.buffer} events behind); it was aborted.")))
            self.open = {i}  # the overflow is the one event left to see
        else:
            self.events.append((i, event))
            if self.marks is not None and isinstance(event, Delta):
                timeline.mark(self.marks, "on_loop")
        self.ready.set()

    async def next_batch(self, timeout: Optional[float] = None) -> list:
        """Every event queued now (waiting for one first, up to `timeout`: [] when none came)."""
        if not self.events:
            self.ready.clear()
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        batch = list(self.events)
        self.events.clear()
        return batch

    def abort(self) -> None:
        for i in sorted(self.open):
            self.handles[i].abort()
        self.open.clear()

    def close(self) -> None:
        """However the run ends: abort what is still open and leave the server's in-flight set."""
        self.abort()
        self.runs.discard(self)

    def finished(self, i: int) -> None:
        self.open.discard(i)


def _account(metrics: Metrics, run: _Run, results: list[Result]) -> None:
    metrics.prompt_tokens.inc(sum(r.prompt_tokens for r in results))
    metrics.generation_tokens.inc(sum(r.completion_tokens for r in results))
    metrics.latency.observe(time.perf_counter() - run.start)


async def _collect(metrics: Metrics, run: _Run, request: HTTPRequest) -> Optional[list[Result]]:
    """Every prompt's Result, or None when the client left first (its work is then aborted)."""
    results: list[Optional[Result]] = [None] * len(run.job.requests)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        while run.open:
            batch = asyncio.ensure_future(run.next_batch())
            await asyncio.wait({batch, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done():
                batch.cancel()
                return None
            for i, event in batch.result():
                if isinstance(event, Delta):
                    continue
                run.finished(i)
                if isinstance(event, BaseException):
                    raise engine_error(event)
                results[i] = event
    finally:
        gone.cancel()
        run.close()  # whatever is still open when we stop waiting
    _account(metrics, run, results)
    return results


async def _stream_events(metrics: Metrics, run: _Run, ping_interval: float):
    """SSE bytes as the engine produces them; events that queued up together go out in one write."""
    job = run.job
    fmt = responses.StreamFormatter(job)
    results: list[Optional[Result]] = [None] * len(job.requests)
    first = None
    writes = [] if run.marks is not None else None  # timeline: [time, tokens] of each SSE write
    try:
        while run.open:
            batch = await run.next_batch(timeout=ping_interval)
            if not batch:
                yield PING  # nothing for a while: keep proxies and clients from timing out
                continue
            out = []
            for i, event in batch:
                if isinstance(event, Delta):
                    if first is None and event.text:
                        first = time.perf_counter()
                        metrics.ttft.observe(first - run.start)
                    out += [_sse(c) for c in fmt.delta(i, event)]
                elif isinstance(event, Result):
                    run.finished(i)
                    results[i] = event
                    out += [_sse(c) for c in fmt.result(i, event)]
                else:  # the request failed after the 200 went out: say so in-band, then end
                    run.close()
                    out += [_sse(engine_error(event).body()), DONE]
                    yield b"".join(out)
                    return
            if out:
                if writes is not None:
                    writes.append([time.perf_counter(), sum(len(e.token_ids) for _, e in batch
                                                            if isinstance(e, Delta))])
                    if first is not None:
                        timeline.mark(run.marks, "first_write", writes[-1][0])
                yield b"".join(out)
        if job.include_usage:
            yield _sse(responses.usage_chunk(job, results))
        yield DONE
        _account(metrics, run, results)
        if first is not None:
            per_choice = sum(r.completion_tokens for r in results) / (len(results) * job.n)
            if per_choice > 1:
                metrics.tpot.observe((time.perf_counter() - first) / (per_choice - 1))
        if writes is not None:
            timeline.record(run.marks, run.handles[0].marks, writes, job.requests[0].seed)
    finally:
        run.close()


class _EventStream(StreamingResponse):
    """text/event-stream that notices a client leaving even while no token is due.

    Starlette only listens for `http.disconnect` under ASGI < 2.4, and a generator
    parked at `yield` is not closed when the write is cancelled; so this listens
    itself and calls `on_close` (which aborts the engine work) however the stream ends.
    """

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        listen = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, listen}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, listen):
                task.cancel()
            await asyncio.gather(stream, listen, return_exceptions=True)
            self.on_close()
            await self.body_iterator.aclose()
        if not stream.cancelled() and stream.exception() is not None and not isinstance(stream.exception(), OSError):
            raise stream.exception()  # a bug, not a client leaving: let it be logged


async def run_job(request: HTTPRequest, engine, job: Job, *, metrics: Metrics, runs: set,
                  ping_interval: float = 5.0, stream_buffer: int = 256, marks: Optional[dict] = None) -> Response:
    """Submits `job`'s requests and answers: JSON when all are done, or an event stream.
    `runs` is the server's set of runs in flight (a drain waits for it to empty); `marks`
    the request's timeline so far (timeline.py; None when it is off)."""
    run = _Run(job, engine, asyncio.get_running_loop(), runs, stream_buffer, marks)
    try:
        run.submit()
    except (RequestError, QueueFull, EngineUnavailable) as exc:
        raise engine_error(exc) from None
    if job.stream:
        return _EventStream(_stream_events(metrics, run, ping_interval), on_close=run.close)
    results = await _collect(metrics, run, request)
    if results is None:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    if job.kind == "completion":
        body = await asyncio.to_thread(responses.completion_response, job, results)
    else:
        body = responses.chat_response(job, results[0])
    return await asyncio.to_thread(json_response, body)  # a long echo's JSON is off the event loop
