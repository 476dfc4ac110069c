"""HTTP routes: `create_app(engine) -> Starlette` over a ready engine, or over a loader run in the background.

Handlers only translate: authorize, read the JSON body, let `protocol` validate it into
engine Requests, hand them to the bridge (bridge.py: the engine thread <-> asyncio) and
return what it formats (responses.py). Nothing here knows about models.

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
import time
from typing import Any, Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response
from starlette.routing import Route

from pgpt_jax.request import Limits
from server import protocol, responses
from server.bridge import json_response, run_job
from server.metrics import CountRequests, Metrics
from server.protocol import APIError

log = logging.getLogger("pgpt_jax.server")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


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
        self.metrics = Metrics(lambda: self.engine)

    def attach(self, engine) -> None:
        self.info = protocol.ModelInfo(
            name=self.served_model_name, vocab_size=engine.config.vocab_size,
            context_length=engine.context_length, fim=bool(engine.config.fim),
            limits=engine.limits, tokenizer=engine.tokenizer)
        self.engine = engine

    def ready_engine(self):
        if self.engine is None:
            why = f"failed to load: {self.load_error}" if self.load_error else "is loading"
            raise APIError(503, f"The model {why}; retry shortly.", type="server_error", code="model_not_ready",
                           headers={"Retry-After": "5"})
        return self.engine


def _state(request: HTTPRequest) -> ServerState:
    return request.app.state.pgpt


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



# ----------------------------------------------------------------------------- handlers


async def _generation(request: HTTPRequest, parse) -> Response:
    """Authorize, read and validate the body with `parse`, then run it on the engine."""
    st = _state(request)
    _authorize(request, st)
    engine = st.ready_engine()
    body = await _read_json(request, st.max_body_bytes)
    job = parse(body, st.info, request.path_params.get("deployment"))
    return await run_job(request, st.metrics, engine, job)


async def completions(request: HTTPRequest) -> Response:
    """POST /v1/completions and /openai/deployments/{deployment}/completions."""
    return await _generation(request, protocol.parse_completion)


async def chat_completions(request: HTTPRequest) -> Response:
    """POST /v1/chat/completions and /openai/deployments/{deployment}/chat/completions."""
    return await _generation(request, protocol.parse_chat)


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
    st = _state(request)
    if st.engine is not None:
        return json_response({"status": "ok", "model": st.served_model_name})
    if st.load_error is not None:
        return json_response({"status": "failed", "error": str(st.load_error)}, 503)
    return json_response({"status": "loading"}, 503)


async def metrics(request: HTTPRequest) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


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
        routes=routes, lifespan=lifespan, middleware=[Middleware(CountRequests, metrics=st.metrics)],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error},
    )
    app.state.pgpt = st
    return app
