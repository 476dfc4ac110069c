"""HTTP for the engine: `create_app(engine) -> Starlette`, and `serve(args)` for `pgpt-jax serve`.

Handlers only translate: authorize, read the JSON body, let `protocol` validate it into
engine Requests, submit them, and format what comes back. Nothing here knows about models.

Threads. The engine runs its host loop in its own thread and answers each request
through a callback on that thread. The callback never touches asyncio objects directly:
it hands the event to the server's event loop with `loop.call_soon_threadsafe`, which
puts it on the request's `asyncio.Queue`. A handler then awaits the queue (every final
event for a non-streaming request; deltas as they come for a stream), while also
watching for the client going away: a client that disconnects aborts its engine work
(`handle.abort()`), so its slots are free at the engine's next iteration.

Loading. `serve()` starts listening at once and loads and warms up the model in a
background thread: `/health` answers 503 until the engine is ready (200 after), and the
API routes answer 503 meanwhile. `create_app(engine)` with a ready engine (tests) skips that.

Every error is OpenAI's error object; whatever a client sends, the answer is a 4xx, not a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from pgpt_jax.request import Delta, QueueFull, RequestError, Result
from server import protocol
from server.protocol import APIError, Job

log = logging.getLogger("pgpt_jax.server")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

# Buckets: a tiny model on CPU answers in milliseconds, GPT-2 at batch 32 in tens of ms per token.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


# ----------------------------------------------------------------------------- state and metrics


class Metrics:
    """Prometheus metrics in a registry of their own: several apps can live in one process (tests)."""

    def __init__(self, state: "ServerState"):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pgpt_http_requests", "HTTP requests by route and status code.",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("pgpt_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("pgpt_generation_tokens",
                                         "Generated tokens of finished requests (best_of candidates included).",
                                         registry=r)
        self.ttft = Histogram("pgpt_time_to_first_token_seconds",
                              "Streaming requests: arrival to the first text chunk.", buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("pgpt_time_per_output_token_seconds",
                              "Streaming requests: (last chunk - first chunk) / (tokens per choice - 1).",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.latency = Histogram("pgpt_request_latency_seconds", "Completed requests: arrival to the last byte.",
                                 buckets=_LATENCY_BUCKETS, registry=r)

        def engine_value(name: str) -> Callable[[], float]:
            return lambda: float(getattr(state.engine, name)) if state.engine is not None else 0.0

        for name, doc in (("queue_depth", "Choices waiting for a slot."),
                          ("active_slots", "Slots generating now."),
                          ("compile_count", "XLA compilations by the engine (flat after warm-up).")):
            Gauge(f"pgpt_engine_{name}", doc, registry=r).set_function(engine_value(name))
        Gauge("pgpt_ready", "1 once the model is loaded and warmed up.", registry=r).set_function(
            lambda: float(state.engine is not None))


@dataclasses.dataclass(eq=False)
class ServerState:
    """What the handlers share; lives at `app.state.pgpt`."""

    served_model_name: str
    api_key: Optional[str]
    max_body_bytes: int
    engine: Any = None  # pgpt_jax.engine.Engine once loaded
    info: Optional[protocol.ModelInfo] = None
    load_error: Optional[BaseException] = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    metrics: Metrics = dataclasses.field(init=False)

    def __post_init__(self):
        self.metrics = Metrics(self)

    def attach(self, engine) -> None:
        self.info = protocol.ModelInfo(
            name=self.served_model_name, vocab_size=engine.config.vocab_size,
            context_length=engine.context_length, fim=bool(engine.config.fim),
            max_logprobs=engine.max_logprobs, tokenizer=engine.tokenizer)
        self.engine = engine

    def ready_engine(self):
        if self.engine is None:
            why = f"failed to load: {self.load_error}" if self.load_error else "is loading"
            raise APIError(503, f"The model {why}; retry shortly.", type="server_error", code="model_not_ready",
                           headers={"Retry-After": "5"})
        return self.engine


def _state(request: HTTPRequest) -> ServerState:
    return request.app.state.pgpt


# ----------------------------------------------------------------------------- small helpers


def _json(obj: Any, status: int = 200, headers: Optional[dict] = None) -> Response:
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _authorize(request: HTTPRequest, st: ServerState) -> None:
    """OpenAI's `Authorization: Bearer KEY` or Azure's `api-key: KEY`, when a key is configured."""
    if st.api_key is None:
        return
    want = st.api_key.encode()
    given = []
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        given.append(auth[7:].strip())
    if "api-key" in request.headers:
        given.append(request.headers["api-key"].strip())
    # compare_digest for every candidate: no early exit that would time the key
    if not any([hmac.compare_digest(g.encode(), want) for g in given]):
        what = "Incorrect API key provided." if given else (
            "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' or 'api-key: KEY'.")
        raise APIError(401, what, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _read_json(request: HTTPRequest, limit: int) -> Any:
    ctype = request.headers.get("content-type")
    if ctype is not None:
        media = ctype.split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise APIError(415, f"Unsupported Content-Type {media!r}: send application/json.",
                           code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return protocol.parse_json(b"".join(chunks))


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


# ----------------------------------------------------------------------------- one job in flight


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


def _account(st: ServerState, run: _Run, results: list[Result]) -> None:
    st.metrics.prompt_tokens.inc(sum(r.prompt_tokens for r in results))
    st.metrics.generation_tokens.inc(sum(r.completion_tokens for r in results))
    st.metrics.latency.observe(time.perf_counter() - run.start)


async def _collect(st: ServerState, run: _Run, request: HTTPRequest) -> Optional[list[Result]]:
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
    _account(st, run, results)
    return results


async def _stream_events(st: ServerState, run: _Run):
    """SSE bytes as the engine produces them; events that queued up together go out in one write."""
    job = run.job
    fmt = protocol.StreamFormatter(job)
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
                        st.metrics.ttft.observe(first - run.start)
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
            yield _sse(protocol.usage_chunk(job, results))
        yield b"data: [DONE]\n\n"
        _account(st, run, results)
        if first is not None:
            per_choice = sum(r.completion_tokens for r in results) / (len(results) * job.n)
            if per_choice > 1:
                st.metrics.tpot.observe((time.perf_counter() - first) / (per_choice - 1))
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


async def _run_job(request: HTTPRequest, st: ServerState, engine, job: Job) -> Response:
    run = _Run(job, engine, asyncio.get_running_loop())
    try:
        run.submit()
    except (RequestError, QueueFull) as exc:
        raise _from_engine_error(exc) from None
    if job.stream:
        return _EventStream(_stream_events(st, run), on_close=run.abort)
    results = await _collect(st, run, request)
    if results is None:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    if job.kind == "completion":
        return _json(protocol.completion_response(job, results))
    return _json(protocol.chat_response(job, results[0]))


# ----------------------------------------------------------------------------- handlers


async def _generation(request: HTTPRequest, parse) -> Response:
    """Authorize, read and validate the body with `parse`, then run it on the engine."""
    st = _state(request)
    _authorize(request, st)
    engine = st.ready_engine()
    body = await _read_json(request, st.max_body_bytes)
    job = parse(body, st.info, request.path_params.get("deployment"))
    return await _run_job(request, st, engine, job)


async def completions(request: HTTPRequest) -> Response:
    """POST /v1/completions and /openai/deployments/{deployment}/completions."""
    return await _generation(request, protocol.parse_completion)


async def chat_completions(request: HTTPRequest) -> Response:
    """POST /v1/chat/completions and /openai/deployments/{deployment}/chat/completions."""
    return await _generation(request, protocol.parse_chat)


async def list_models(request: HTTPRequest) -> Response:
    st = _state(request)
    _authorize(request, st)
    return _json(protocol.models_list(_model_info(st), st.created))


async def get_model(request: HTTPRequest) -> Response:
    st = _state(request)
    _authorize(request, st)
    model_id = request.path_params["model"]
    if model_id != st.served_model_name:
        raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
    return _json(protocol.model_card(_model_info(st), st.created))


def _model_info(st: ServerState) -> protocol.ModelInfo:
    # While loading, the name is known but not the context length: report it as 0.
    return st.info or protocol.ModelInfo(st.served_model_name, 0, 0, False, 0, None)


async def health(request: HTTPRequest) -> Response:
    st = _state(request)
    if st.engine is not None:
        return _json({"status": "ok", "model": st.served_model_name})
    if st.load_error is not None:
        return _json({"status": "failed", "error": str(st.load_error)}, 503)
    return _json({"status": "loading"}, 503)


async def metrics(request: HTTPRequest) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ----------------------------------------------------------------------------- errors and middleware


async def _api_error(request: HTTPRequest, exc: APIError) -> Response:
    return _json(exc.body(), exc.status, exc.headers)


async def _http_error(request: HTTPRequest, exc: HTTPException) -> Response:
    # Unknown paths (404) and wrong methods (405) get an error object too.
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    err = APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=code)
    return _json(err.body(), exc.status_code, dict(exc.headers or {}))


async def _server_error(request: HTTPRequest, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    err = APIError(500, "The server had an error while processing your request.", type="server_error")
    return _json(err.body(), 500)


class _CountRequests:
    """Counts requests by route template (not raw path: bounded label values) and status."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the outer error middleware sends if the app raises

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.state.metrics.requests.labels(route, str(status)).inc()


def create_app(engine=None, *, served_model_name: str, api_key: Optional[str] = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               loader: Optional[Callable[[], Any]] = None) -> Starlette:
    """The OpenAI-compatible app over `engine` (or over what `loader()` returns, loaded in the background).

    The lifespan starts the engine's thread (a no-op if it runs already) and stops it at shutdown.
    """
    if (engine is None) == (loader is None):
        raise ValueError("pass exactly one of engine and loader")
    st = ServerState(served_model_name=served_model_name, api_key=api_key or None, max_body_bytes=max_body_bytes)

    async def load_in_background() -> None:
        try:
            loaded = await asyncio.to_thread(loader)
        except BaseException as exc:  # noqa: BLE001 - reported on /health and by serve()
            st.load_error = exc
            log.error("could not load the model: %s", exc)
            return
        loaded.start()
        st.attach(loaded)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        task = None
        if engine is not None:
            engine.start()
            st.attach(engine)
        else:
            task = asyncio.create_task(load_in_background())
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()  # the loading thread itself runs on; the process is ending
            if st.engine is not None:
                await asyncio.to_thread(st.engine.stop)

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/openai/deployments/{deployment}/completions", completions, methods=["POST"]),
        Route("/openai/deployments/{deployment}/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, middleware=[Middleware(_CountRequests, state=st)],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error},
    )
    app.state.pgpt = st
    return app


# ----------------------------------------------------------------------------- pgpt-jax serve


RANDOM_PREFIX = "random:"


def load_model_for_serving(source: Optional[str], dtype: Optional[str], mesh=None):
    """`--model` -> (model, a line saying what is served).

    `random:PRESET` serves random weights of a preset (benchmarks, smoke tests). When the
    embedded model is missing this refuses rather than quietly serving noise.
    """
    import pgpt_jax

    if source and source.startswith(RANDOM_PREFIX):
        preset = source[len(RANDOM_PREFIX):]
        model = pgpt_jax.init_model(preset, dtype=dtype, mesh=mesh)
        return model, f"RANDOM weights of the {preset!r} preset (its text is noise)"
    try:
        model = pgpt_jax.load_model(source, dtype=dtype, shardings=mesh)
    except Exception as exc:
        if source is None:
            raise RuntimeError(
                f"the embedded model could not be loaded ({exc}). Pass --model with an orbax "
                "checkpoint dir, an HF dir or hub id, or --model random:tiny (or random:gpt2) "
                "to serve random weights of a preset.") from exc
        raise
    return model, f"{source or 'the embedded model'} ({model.config.name}, {model.config.n_layer} layers)"


def default_model_name(source: Optional[str]) -> str:
    return "pgpt-tiny" if source is None else source.rstrip("/")


def _engine_from_args(args, mesh):
    from pgpt_jax.engine import Engine
    from pgpt_jax.tokenizer import get_tokenizer

    model, what = load_model_for_serving(args.model, args.dtype, mesh)
    engine = Engine(model, get_tokenizer(fim=model.config.fim), slots=args.slots,
                    decode_steps=args.decode_steps, max_queue=args.max_queue,
                    max_logprobs=args.max_logprobs, mesh=mesh)
    return engine, what


def serve(args) -> None:
    """`pgpt-jax serve`: listen at once, load and warm up in the background, then serve.

    Multi-host (--coordinator/--num-processes/--process-id, or --distributed): every process
    loads the model onto one mesh over all processes' devices; process 0 serves HTTP and
    broadcasts each engine iteration's admissions, the others run the engine loop only and
    exit when process 0's engine stops.
    """
    import uvicorn

    from pgpt_jax.cli import init_distributed, mesh_from_args

    init_distributed(args)
    import jax

    mesh = mesh_from_args(args)
    if mesh is None and jax.process_count() > 1:
        from pgpt_jax import sharding

        mesh = sharding.make_mesh(model=1)  # every device on the data axis
    if jax.process_index() != 0:
        engine, what = _engine_from_args(args, mesh)
        print(f"pgpt-jax: process {jax.process_index()} follows process 0 ({what})", file=sys.stderr, flush=True)
        engine.warmup(progress=False)
        engine.run_follower()
        return

    api_key = args.api_key or os.environ.get("PGPT_API_KEY") or None
    name = args.served_model_name or default_model_name(args.model)
    server: Optional[uvicorn.Server] = None

    def load():
        try:
            engine, what = _engine_from_args(args, mesh)
            print(f"pgpt-jax: serving {what} as {name!r}", file=sys.stderr, flush=True)
            secs = engine.warmup(progress=True)
            print(f"pgpt-jax: ready after {secs:.1f} s of warm-up (compiled {engine.compile_count} programs); "
                  f"http://{args.host}:{args.port}/v1 {'(API key required)' if api_key else ''}",
                  file=sys.stderr, flush=True)
            return engine
        except BaseException:
            server.should_exit = True  # nothing to serve: stop listening, serve() reports why
            raise

    app = create_app(served_model_name=name, api_key=api_key, max_body_bytes=args.max_body_bytes, loader=load)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=10))
    server.run()
    err = app.state.pgpt.load_error
    if err is not None:
        raise SystemExit(f"pgpt-jax serve: {err}")
