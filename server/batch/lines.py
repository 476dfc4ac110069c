"""The Batch API's line formats, and one input line run on the engine.

Input (one JSON object a line, OpenAI's):
    {"custom_id": "a-1", "method": "POST", "url": "/v1/completions", "body": {...}}
A file whose lines break that shape (not JSON, no custom_id, a custom_id seen before, another
method or url) is refused whole with a 400 naming the line (`read_input`). A line whose body
is wrong (a bad parameter, another model) is not the file's fault: it runs and answers with
that request's own error, as the same body sent to the endpoint would.

Output (one line a request, OpenAI's):
    {"id": "batch_req_...", "custom_id": "a-1",
     "response": {"status_code": 200, "request_id": "cmpl-...", "body": {...}}, "error": null}
A request that got an error answer has its status and error object in `response`; one that
never ran (the batch was cancelled or expired first) has `response: null` and
`error: {"code", "message"}`.

`LineRun` submits one line's requests as background work (batch work yields to interactive
work, see pgpt_jax/scheduler.py) and, when the engine has ended them all, builds the output
line. The server's runner and `pgpt-jax run-batch` both use it.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any, BinaryIO, Callable, Iterable, Optional

from pgpt_jax.request import EngineUnavailable, RequestError, Result
from server import chat_protocol, protocol, responses
from server.batch.store import new_id
from server.bridge import engine_error
from server.protocol import APIError, ModelInfo

ENDPOINTS = {"/v1/completions": protocol.parse_completion, "/v1/chat/completions": chat_protocol.parse_chat}


@dataclasses.dataclass
class Line:
    number: int  # 1-based, in its file
    custom_id: str
    url: str
    body: Any


def parse_line(text: str, number: int, endpoint: Optional[str] = None) -> Line:
    """One input line -> a Line; ValueError (whose message names the line) when it breaks the shape."""
    def bad(why: str) -> ValueError:
        return ValueError(f"Line {number} of the input file {why}.")

    try:
        obj = json.loads(text)
    except ValueError as err:
        raise bad(f"is not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise bad("is not a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise bad("has no custom_id (a non-empty string)")
    if obj.get("method") != "POST":
        raise bad("has a method other than POST")
    url = obj.get("url")
    if url not in ENDPOINTS:
        raise bad(f"has url {url!r}; supported: {', '.join(ENDPOINTS)}")
    if endpoint is not None and url != endpoint:
        raise bad(f"has url {url!r} but the batch's endpoint is {endpoint!r}")
    if not isinstance(obj.get("body"), dict):
        raise bad("has no body object")
    return Line(number, cid, url, obj["body"])


def read_input(lines: Iterable[bytes], endpoint: Optional[str] = None) -> list[tuple[Line, str]]:
    """Every line of an input file (blank lines skipped) with its text; ValueError naming the
    first bad line, or a custom_id used twice."""
    out, seen = [], {}
    for number, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"Line {number} of the input file is not UTF-8.") from None
        if not text:
            continue
        line = parse_line(text, number, endpoint)
        if line.custom_id in seen:
            raise ValueError(f"Line {number} of the input file repeats custom_id {line.custom_id!r} "
                             f"(line {seen[line.custom_id]}); each must be unique.")
        seen[line.custom_id] = number
        out.append((line, text))
    if not out:
        raise ValueError("The input file has no requests.")
    return out


def check_file(f: BinaryIO, endpoint: Optional[str] = None) -> int:
    """The number of requests in an uploaded file; ValueError as `read_input`."""
    return len(read_input(f, endpoint))


def output_line(custom_id: str, status: int, body: dict, request_id: Optional[str] = None) -> dict:
    return {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id or new_id("req_"), "body": body},
            "error": None}


def unrun_line(custom_id: str, code: str, message: str) -> dict:
    """A line the batch ended before running (cancelled, expired)."""
    return {"id": new_id("batch_req_"), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


class LineRun:
    """One input line on the engine. `done(run)` is called once (on the engine thread, or at
    once for a body the endpoint refuses) when `output` and `ok` are set, or `lost` is: the
    engine stopped before it ended, and the line must run again later."""

    def __init__(self, line: Line, info: ModelInfo, done: Callable[["LineRun"], None], batch_id: str = ""):
        self.line, self.info, self.done, self.batch_id = line, info, done, batch_id
        self.job: Optional[protocol.Job] = None
        self.handles: list = []
        self.events: list = []
        self.ok = False
        self.lost = False
        self.output: Optional[dict] = None
        self.tokens = 0  # generated, for progress
        self._lock = threading.Lock()

    def submit(self, engine) -> None:
        """Submits the line's requests as background work; a body the endpoint refuses ends the
        run at once. QueueFull and EngineUnavailable propagate (the caller retries later)."""
        try:
            job = ENDPOINTS[self.line.url](self.line.body, self.info, None)
            if job.stream:
                raise APIError(400, "Batch requests cannot stream.", param="stream")
        except APIError as err:
            return self._finish_error(err)
        self.job = job
        self.events = [None] * len(job.requests)
        requests = [dataclasses.replace(r, background=True) for r in job.requests]
        callbacks = [(lambda ev, i=i: self._event(i, ev)) for i in range(len(requests))]
        try:
            self.handles = engine.submit_all(requests, callbacks)
        except RequestError as err:
            self._finish_error(engine_error(err))

    def abort(self) -> None:
        for h in self.handles:
            h.abort()

    def _event(self, i: int, event) -> None:
        if not isinstance(event, (Result, BaseException)):
            return  # batch requests never stream
        with self._lock:
            self.events[i] = event
            if any(e is None for e in self.events):
                return
        failures = [e for e in self.events if isinstance(e, BaseException)]
        if any(isinstance(e, EngineUnavailable) for e in failures):
            self.lost = True
            self.done(self)
        elif failures:
            self._finish_error(engine_error(failures[0]))
        else:
            self.tokens = sum(r.completion_tokens for r in self.events)
            self.ok = True
            self.done(self)

    def format(self) -> dict:
        """The output line of a run that ended well (kept off the engine thread: a long echo's
        body takes a while)."""
        if self.output is None:
            job, results = self.job, self.events
            body = (responses.completion_response(job, results) if job.kind == "completion"
                    else responses.chat_response(job, results[0]))
            self.output = output_line(self.line.custom_id, 200, body, job.id)
        return self.output

    def _finish_error(self, err: APIError) -> None:
        self.output = output_line(self.line.custom_id, err.status, err.body())
        self.ok = False
        self.done(self)
