"""HTTP routes: `create_app(engine) -> Starlette` over a ready engine, or over a loader run in the background.

Handlers only translate: authorize, read the JSON body, let `protocol` validate it into
engine Requests, hand them to the bridge (bridge.py: the engine thread <-> asyncio) and
return what it formats (responses.py). Nothing here knows about models. vLLM's `/tokenize`
and `/detokenize` involve no engine work: `protocol` validates and encodes, and the handler
shapes the tokenizer's answer.

Loading. With a `loader` the app starts listening at once and loads and warms up the
model in a background thread: `/health` answers 503 until the engine is ready (200 after),
and the API routes answer 503 meanwhile (`serve.py` runs it that way). `create_app(engine)`
with a ready engine (tests) skips that.

Every error is OpenAI's error object; whatever a client sends, the answer is a 4xx, not a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import threading
import time
from typing import Any, Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response
from starlette.routing import Route

from pgpt_jax import timeline
from pgpt_jax.request import Limits
from server import chat_protocol, protocol, responses
from server.batch.routes import DEFAULT_MAX_FILE_BYTES, BatchRoutes
from server.batch.runner import BatchRunner
from server.batch.store import BatchDirBusy, BatchStore
from server.bridge import json_response, run_job
from server.metrics import CountRequests, Metrics
from server.protocol import APIError

log = logging.getLogger("pgpt_jax.server")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DRAIN_FLUSH_S = 5.0  # after a drain ends what remained, the time its runs get to send their last bytes


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """How the HTTP side behaves (the `pgpt-jax serve` flags of the same names)."""

    api_key: Optional[str] = None  # required on every route but the probes, when set
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout: float = 30.0  # seconds to receive a whole request body (a slow sender gets 408)
    metrics_public: bool = False  # /metrics without the API key
    ping_interval: float = 5.0  # seconds between ": ping" comments while a stream waits
    stream_buffer: int = 256  # events a stream may hold for a slow reader before it is aborted
    shutdown_timeout: float = 30.0  # a drain lets in-flight requests finish this long
    batch_dir: Optional[str] = None  # the Batch API's files and SQLite state; None: no Batch API
    batch_window: int = 0  # batch lines in flight at once; 0: twice the engine's slots
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # the largest batch input file


@dataclasses.dataclass(eq=False)
class ServerState:
    """What the handlers share; lives at `app.state.pgpt`."""

    served_model_name: str
    options: ServerOptions
    engine: Any = None  # pgpt_jax.engine.Engine once loaded
    info: Optional[protocol.ModelInfo] = None
    load_error: Optional[BaseException] = None
    draining: bool = False  # set by drain(): no new work, readiness 503
    loop: Any = None  # the event loop serving the app (set by the lifespan)
    warmup: tuple = (0, 0)  # programs compiled by the warm-up, programs in all (set by the loader)
    runs: set = dataclasses.field(default_factory=set)  # requests in flight (bridge._Run)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    batches: Optional[BatchStore] = None  # the Batch API's state (with --batch-dir)
    batch_runner: Optional[BatchRunner] = None  # feeds batch lines to the engine once it is loaded
    metrics: Metrics = dataclasses.field(init=False)

    def __post_init__(self):
        self.metrics = Metrics(lambda: self.engine, lambda: self.warmup, lambda: self.batch_runner)

    def attach(self, engine) -> None:
        self.info = protocol.ModelInfo(
            name=self.served_model_name, vocab_size=engine.config.vocab_size,
            context_length=engine.context_length, fim=bool(engine.config.fim), fim_order=engine.config.fim_order,
            limits=engine.limits, tokenizer=engine.tokenizer)
        self.engine = engine
        if self.batches is not None:
            self.batch_runner = BatchRunner(self.batches, engine, self.info,
                                            self.options.batch_window or 2 * engine.slots,
                                            on_line=self.metrics.batch_line)
            self.batch_runner.start()

    def stop_batches(self) -> None:
        """After the engine stopped: the batch runner records what ended and stops (lines the
        stop cut short run again after a restart)."""
        if self.batch_runner is not None:
            self.batch_runner.stop()

    def not_ready(self) -> Optional[str]:
        """Why the server takes no new work (None: it does)."""
        if self.draining:
            return "The server is shutting down; retry on another replica."
        if self.engine is None:
            return f"The model failed to load: {self.load_error}" if self.load_error else "The model is loading."
        if not self.engine.alive:
            return "The engine is not running; the server must restart."
        return None

    def ready_engine(self):
        why = self.not_ready()
        if why is not None:
            code = "model_not_ready" if self.engine is None and not self.draining else "server_unavailable"
            raise APIError(503, f"{why} Retry shortly.", type="server_error", code=code,
                           headers={"Retry-After": "5"})
        return self.engine

    async def drain(self, timeout: Optional[float] = None) -> None:
        """Stops taking work (503 + Retry-After; /ready 503), lets requests in flight finish for
        up to `timeout` seconds (default: the shutdown timeout), then ends what remains: streams
        get an error event and `data: [DONE]`, the others a 503."""
        loop = asyncio.get_running_loop()
        timeout = self.options.shutdown_timeout if timeout is None else timeout
        self.draining = True
        if self.batch_runner is not None:
            self.batch_runner.pause()  # batch lines that end meanwhile are still recorded
        log.info("draining: %d request(s) in flight, %.0f s to finish", len(self.runs), timeout)
        deadline = loop.time() + timeout
        while self.runs and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop, "The server is shutting down; retry on another replica.")
        await asyncio.to_thread(self.stop_batches)
        deadline = loop.time() + DRAIN_FLUSH_S  # the ended runs send their last bytes
        while self.runs and loop.time() < deadline:
            await asyncio.sleep(0.05)


def _state(request: HTTPRequest) -> ServerState:
    return request.app.state.pgpt


def _authorize(request: HTTPRequest, st: ServerState) -> None:
    """OpenAI's `Authorization: Bearer KEY` or Azure's `api-key: KEY`, when a key is configured."""
    if st.options.api_key is None:
        return
    want = st.options.api_key.encode()
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


async def _read_body(request: HTTPRequest, limit: int, timeout: float) -> bytes:
    """The raw body: 415 unless JSON, 413 over `limit` bytes, 408 when it takes over `timeout` seconds."""
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
    chunks = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout:g} s.", code="request_timeout") from None
    return b"".join(chunks)



# ----------------------------------------------------------------------------- handlers


async def _accept(request: HTTPRequest) -> tuple[ServerState, bytes]:
    """What every body-taking route does first: 401 without the key, 503 while the model
    loads, then the raw body (415, 413, 408)."""
    st = _state(request)
    _authorize(request, st)
    st.ready_engine()
    return st, await _read_body(request, st.options.max_body_bytes, st.options.body_timeout)


async def _generation(request: HTTPRequest, parse) -> Response:
    """Authorize, read and validate the body with `parse`, then run it on the engine."""
    marks = timeline.marks()
    timeline.mark(marks, "arrive")
    st, raw = await _accept(request)
    timeline.mark(marks, "body")
    deployment = request.path_params.get("deployment")
    # JSON parsing and tokenising (a 4 MB prompt takes a good part of a second) run in a worker
    # thread, so the event loop keeps serving every other stream meanwhile.
    job = await asyncio.to_thread(lambda: parse(protocol.parse_json(raw), st.info, deployment))
    timeline.mark(marks, "parsed")
    o = st.options
    return await run_job(request, st.ready_engine(), job, metrics=st.metrics, runs=st.runs,
                         ping_interval=o.ping_interval, stream_buffer=o.stream_buffer, marks=marks)


async def completions(request: HTTPRequest) -> Response:
    """POST /v1/completions and /openai/deployments/{deployment}/completions."""
    return await _generation(request, protocol.parse_completion)


async def chat_completions(request: HTTPRequest) -> Response:
    """POST /v1/chat/completions and /openai/deployments/{deployment}/chat/completions."""
    return await _generation(request, chat_protocol.parse_chat)


async def tokenize(request: HTTPRequest) -> Response:
    """POST /tokenize (vLLM's): a prompt, or a conversation in the chat template, -> token ids."""
    st, raw = await _accept(request)
    info = st.info

    def answer() -> Response:  # BPE over a 4 MB body, and its JSON, take a worker thread
        ids, with_strs = chat_protocol.parse_tokenize(protocol.parse_json(raw), info)
        strs = [info.tokenizer.token_str(t) for t in ids] if with_strs else None
        return json_response({"count": len(ids), "max_model_len": info.context_length, "tokens": ids,
                              "token_strs": strs})

    return await asyncio.to_thread(answer)


async def detokenize(request: HTTPRequest) -> Response:
    """POST /detokenize (vLLM's): token ids -> their text."""
    st, raw = await _accept(request)
    info = st.info

    def answer() -> Response:
        ids = chat_protocol.parse_detokenize(protocol.parse_json(raw), info)
        return json_response({"prompt": info.tokenizer.decode(ids)})

    return await asyncio.to_thread(answer)


async def list_models(request: HTTPRequest) -> Response:
    st = _state(request)
    _authorize(request, st)
    return json_response(responses.models_list(_model_info(st), st.created))


async def get_model(request: HTTPRequest) -> Response:
    st = _state(request)
    _authorize(request, st)
    model_id = request.path_params["model"]
    if model_id != st.served_model_name:
        raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
    return json_response(responses.model_card(_model_info(st), st.created))


def _model_info(st: ServerState) -> protocol.ModelInfo:
    # While loading, the name is known but not the context length: report it as 0.
    return st.info or protocol.ModelInfo(st.served_model_name, 0, 0, False, Limits(), None)


async def health(request: HTTPRequest) -> Response:
    """Liveness: 200 while the process and its engine loop are alive (draining included);
    503 while loading, after a failed load, or once the engine loop died or hung."""
    st = _state(request)
    if st.load_error is not None:
        return json_response({"status": "failed", "error": str(st.load_error)}, 503)
    if st.engine is None:
        return json_response({"status": "loading"}, 503)
    if not st.engine.alive:
        return json_response({"status": "dead", "error": str(st.engine.dead or "the engine stopped")}, 503)
    return json_response({"status": "draining" if st.draining else "ok", "model": st.served_model_name})


async def ready(request: HTTPRequest) -> Response:
    """Readiness: 200 when warm-up is done, the engine is alive and the server is not draining."""
    why = _state(request).not_ready()
    if why is not None:
        return json_response({"status": "not ready", "reason": why}, 503, {"Retry-After": "5"})
    return json_response({"status": "ready"})


async def metrics(request: HTTPRequest) -> Response:
    st = _state(request)
    if not st.options.metrics_public:
        _authorize(request, st)
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ----------------------------------------------------------------------------- errors


async def _api_error(request: HTTPRequest, exc: APIError) -> Response:
    return json_response(exc.body(), exc.status, exc.headers)


async def _http_error(request: HTTPRequest, exc: HTTPException) -> Response:
    # Unknown paths (404) and wrong methods (405) get an error object too.
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    err = APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=code)
    return json_response(err.body(), exc.status_code, dict(exc.headers or {}))


async def _server_error(request: HTTPRequest, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    err = APIError(500, "The server had an error while processing your request.", type="server_error")
    return json_response(err.body(), 500)


def create_app(engine=None, *, served_model_name: str, loader: Optional[Callable[[], Any]] = None,
               **options) -> Starlette:
    """The OpenAI-compatible app over `engine` (or over what `loader()` returns, loaded in the
    background); `options` are `ServerOptions` fields. `app.state.pgpt.drain()` drains it.

    The lifespan starts the engine's thread (a no-op if it runs already) and stops it at shutdown.
    """
    if (engine is None) == (loader is None):
        raise ValueError("pass exactly one of engine and loader")
    opts = ServerOptions(**options)
    st = ServerState(served_model_name=served_model_name, options=dataclasses.replace(opts, api_key=opts.api_key or None))
    if opts.batch_dir:
        try:
            st.batches = BatchStore(opts.batch_dir)
        except BatchDirBusy as exc:  # serve anyway: interactive work does not need it
            log.warning("the Batch API is off: %s", exc)

    async def load_in_background() -> None:
        # A daemon thread, not asyncio.to_thread: a SIGTERM during warm-up must not wait for
        # the warm-up to end before the process can exit.
        done: asyncio.Future = asyncio.get_running_loop().create_future()

        def run() -> None:
            try:
                result = loader()
            except BaseException as exc:  # noqa: BLE001 - reported on /health and by serve()
                st.loop.call_soon_threadsafe(lambda e=exc: done.done() or done.set_exception(e))
            else:
                st.loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

        threading.Thread(target=run, name="pgpt-loader", daemon=True).start()
        try:
            loaded = await done
        except asyncio.CancelledError:
            raise  # shutting down while loading: not a load failure
        except BaseException as exc:  # noqa: BLE001
            st.load_error = exc
            log.error("could not load the model: %s", exc)
            return
        if st.draining:  # a drain began while the model loaded: never start serving
            return
        loaded.start()
        st.attach(loaded)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        st.loop = asyncio.get_running_loop()
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
            await asyncio.to_thread(st.stop_batches)
            if st.batches is not None:
                st.batches.close()

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),  # vLLM's paths, and under /v1 as well
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/v1/tokenize", tokenize, methods=["POST"]),
        Route("/v1/detokenize", detokenize, methods=["POST"]),
        Route("/openai/deployments/{deployment}/completions", completions, methods=["POST"]),
        Route("/openai/deployments/{deployment}/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    if st.batches is not None:
        async def read_body(request: HTTPRequest) -> bytes:
            return await _read_body(request, st.options.max_body_bytes, st.options.body_timeout)

        routes += BatchRoutes(st.batches, lambda request: _authorize(request, st), read_body,
                              lambda: st.batch_runner, max_file_bytes=opts.max_file_bytes).routes()
    app = Starlette(
        routes=routes, lifespan=lifespan, middleware=[Middleware(CountRequests, metrics=st.metrics)],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error},
    )
    app.state.pgpt = st
    return app
