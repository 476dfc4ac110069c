"""The bridge between the engine thread and asyncio: one `_Run` per HTTP request in flight.

The engine runs its host loop in its own thread and answers each request through a
callback on that thread. The callback never touches asyncio objects directly: it hands
the event to the server's event loop with `loop.call_soon_threadsafe`, which puts it on
the run's `asyncio.Queue`. A handler then awaits the queue (every final event for a
non-streaming request; deltas as they come for a stream), while also watching for the
client going away: a client that disconnects aborts its engine work (`handle.abort()`),
so its slots are free at the engine's next iteration.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from typing import Any, Callable, Optional

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response, StreamingResponse

from pgpt_jax.request import Delta, QueueFull, RequestError, Result
from server import responses
from server.metrics import Metrics
from server.protocol import APIError, Job

log = logging.getLogger("pgpt_jax.server")


def json_response(obj: Any, status: int = 200, headers: Optional[dict] = None) -> Response:
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _from_engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, RequestError):
        return APIError(400, exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, QueueFull):
        return APIError(429, f"{exc} The server is at capacity.", type="server_overloaded", code="queue_full",
                        headers={"Retry-After": "1"})
    log.error("engine failed a request: %r", exc)
    return APIError(500, f"The engine failed this request: {exc}", type="server_error", code="engine_error")


async def _disconnected(receive) -> None:
    """Returns when the client has gone away (the body is already read, so nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass



class _Run:
    """A Job's engine requests in flight, and the queue their callbacks feed (see the module docstring)."""

    def __init__(self, job: Job, engine, loop: asyncio.AbstractEventLoop):
        self.job, self.engine, self.loop = job, engine, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles: list = []
        self.open: set[int] = set()  # prompts whose final event has not arrived
        self.start = time.perf_counter()

    def submit(self) -> None:
        # Every prompt is checked before any is submitted: a bad third prompt must not leave
        # the first two generating for nobody.
        for r in self.job.requests:
            self.engine.check(r)
        try:
            for i, r in enumerate(self.job.requests):
                self.handles.append(self.engine.submit(r, functools.partial(self._post, i)))
                self.open.add(i)
        except BaseException:
            self.abort()
            raise

    def _post(self, i: int, event) -> None:  # runs on the engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def abort(self) -> None:
        for i in sorted(self.open):
            self.handles[i].abort()
        self.open.clear()

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
            get = asyncio.ensure_future(run.queue.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done():
                get.cancel()
                return None
            i, event = get.result()
            if isinstance(event, Delta):
                continue
            run.finished(i)
            if isinstance(event, BaseException):
                raise _from_engine_error(event)
            results[i] = event
    finally:
        gone.cancel()
        run.abort()  # whatever is still open when we stop waiting
    _account(metrics, run, results)
    return results


async def _stream_events(metrics: Metrics, run: _Run):
    """SSE bytes as the engine produces them; events that queued up together go out in one write."""
    job = run.job
    fmt = responses.StreamFormatter(job)
    results: list[Optional[Result]] = [None] * len(job.requests)
    first = None
    try:
        while run.open:
            batch = [await run.queue.get()]
            while not run.queue.empty():
                batch.append(run.queue.get_nowait())
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
                else:  # the engine failed this request after the 200 went out: say so in-band
                    run.finished(i)
                    out.append(_sse(_from_engine_error(event).body()))
                    yield b"".join(out)
                    return
            if out:
                yield b"".join(out)
        if job.include_usage:
            yield _sse(responses.usage_chunk(job, results))
        yield b"data: [DONE]\n\n"
        _account(metrics, run, results)
        if first is not None:
            per_choice = sum(r.completion_tokens for r in results) / (len(results) * job.n)
            if per_choice > 1:
                metrics.tpot.observe((time.perf_counter() - first) / (per_choice - 1))
    finally:
        run.abort()


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


async def run_job(request: HTTPRequest, metrics: Metrics, engine, job: Job) -> Response:
    """Submits `job`'s requests and answers: JSON when all are done, or an event stream."""
    run = _Run(job, engine, asyncio.get_running_loop())
    try:
        run.submit()
    except (RequestError, QueueFull) as exc:
        raise _from_engine_error(exc) from None
    if job.stream:
        return _EventStream(_stream_events(metrics, run), on_close=run.abort)
    results = await _collect(metrics, run, request)
    if results is None:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    if job.kind == "completion":
        return json_response(responses.completion_response(job, results))
    return json_response(responses.chat_response(job, results[0]))
