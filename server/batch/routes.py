"""OpenAI's Files and Batches routes over a `BatchStore` (see docs/api.md, "Batch API").

    POST /v1/files                 multipart: file (JSONL), purpose=batch
    GET  /v1/files                 list (?purpose=)
    GET  /v1/files/{id}            the file object
    GET  /v1/files/{id}/content    the bytes
    DELETE /v1/files/{id}
    POST /v1/batches               {input_file_id, endpoint, completion_window, metadata}
    GET  /v1/batches               list, newest first (?after=, ?limit=)
    GET  /v1/batches/{id}
    POST /v1/batches/{id}/cancel

An upload is checked line by line before it is stored: a malformed file is a 400 naming its
first bad line. The handlers do their disk and SQLite work in worker threads.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from typing import Any, Optional

from starlette.requests import Request as HTTPRequest
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from server import protocol
from server.batch.lines import ENDPOINTS, read_input
from server.batch.store import BatchStore
from server.bridge import json_response
from server.protocol import APIError, invalid

DEFAULT_MAX_FILE_BYTES = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
_WINDOW = re.compile(r"^([1-9][0-9]{0,3})h$")  # OpenAI takes "24h"; any whole number of hours here


def _not_found(what: str, ident: str, param: Optional[str] = None) -> APIError:
    return APIError(404, f"No such {what}: '{ident}'.", param=param, code="not_found")


class BatchRoutes:
    """The handlers; `auth(request)` checks the API key, `read_body(request)` reads a JSON
    body within the server's limits, `runner()` is the running BatchRunner (None until the
    model is loaded), `max_file_bytes` bounds an upload and `upload_timeout` its arrival."""

    def __init__(self, store: BatchStore, auth, read_body, runner, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 upload_timeout: float = 600.0):
        self.store, self.auth, self.read_body, self.runner = store, auth, read_body, runner
        self.max_file_bytes, self.upload_timeout = max_file_bytes, upload_timeout

    def routes(self) -> list[Route]:
        return [
            Route("/v1/files", self.upload, methods=["POST"]),
            Route("/v1/files", self.list_files, methods=["GET"]),
            Route("/v1/files/{file_id}", self.get_file, methods=["GET"]),
            Route("/v1/files/{file_id}", self.delete_file, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", self.file_content, methods=["GET"]),
            Route("/v1/batches", self.create_batch, methods=["POST"]),
            Route("/v1/batches", self.list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self.get_batch, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self.cancel_batch, methods=["POST"]),
        ]

    # ------------------------------------------------------------------ files

    async def upload(self, request: HTTPRequest) -> Response:
        self.auth(request)
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise APIError(415, "Upload a file as multipart/form-data with fields 'file' and 'purpose'.",
                           code="unsupported_media_type")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_file_bytes + 64 * 1024:
            raise APIError(413, f"The file is larger than {self.max_file_bytes} bytes.", param="file",
                           code="file_too_large")
        try:
            form = await asyncio.wait_for(request.form(max_files=1, max_fields=8), self.upload_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, "The upload did not arrive in time.", code="request_timeout") from None
        except Exception as err:  # the multipart parser's errors: a malformed body
            raise invalid(f"The multipart body could not be read: {err}") from None
        try:
            purpose, upload = form.get("purpose"), form.get("file")
            if purpose != "batch":
                raise invalid(f"'purpose' must be 'batch' (got {purpose!r}).", param="purpose")
            if upload is None or isinstance(upload, str):
                raise invalid("The form has no 'file' part.", param="file")
            return json_response(await asyncio.to_thread(self._store_upload, upload))
        finally:
            await form.close()

    def _store_upload(self, upload: Any) -> dict:
        fd, tmp = tempfile.mkstemp(dir=self.store.dir / "files", suffix=".upload")
        try:
            with os.fdopen(fd, "wb") as out:
                upload.file.seek(0)
                size = 0
                while chunk := upload.file.read(1 << 20):
                    size += len(chunk)
                    if size > self.max_file_bytes:
                        raise APIError(413, f"The file is larger than {self.max_file_bytes} bytes.",
                                       param="file", code="file_too_large")
                    out.write(chunk)
            with open(tmp, "rb") as f:
                try:
                    read_input(f)
                except ValueError as err:
                    raise invalid(str(err), param="file", code="invalid_file") from None
            return self.store.add_file("batch", os.path.basename(upload.filename or "input.jsonl"), src=tmp)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    async def list_files(self, request: HTTPRequest) -> Response:
        self.auth(request)
        files = await asyncio.to_thread(self.store.files, request.query_params.get("purpose"))
        return json_response({"object": "list", "data": files, "has_more": False})

    async def get_file(self, request: HTTPRequest) -> Response:
        self.auth(request)
        return json_response(self._file(request.path_params["file_id"]))

    def _file(self, file_id: str) -> dict:
        f = self.store.file(file_id)
        if f is None:
            raise _not_found("file", file_id, "file_id")
        return f

    async def file_content(self, request: HTTPRequest) -> Response:
        self.auth(request)
        f = self._file(request.path_params["file_id"])
        return FileResponse(self.store.path(f["id"]), media_type="application/jsonl", filename=f["filename"])

    async def delete_file(self, request: HTTPRequest) -> Response:
        self.auth(request)
        file_id = request.path_params["file_id"]
        if not await asyncio.to_thread(self.store.delete_file, file_id):
            raise _not_found("file", file_id, "file_id")
        return json_response({"id": file_id, "object": "file", "deleted": True})

    # ------------------------------------------------------------------ batches

    async def create_batch(self, request: HTTPRequest) -> Response:
        self.auth(request)
        data = protocol.parse_json(await self.read_body(request))
        if not isinstance(data, dict):
            raise invalid("The request body must be a JSON object.")
        endpoint, window = data.get("endpoint"), data.get("completion_window")
        file_id, metadata = data.get("input_file_id"), data.get("metadata")
        if endpoint not in ENDPOINTS:
            raise invalid(f"'endpoint' must be one of {', '.join(ENDPOINTS)} (got {endpoint!r}).", param="endpoint")
        match = _WINDOW.match(window) if isinstance(window, str) else None
        if match is None:
            raise invalid(f"'completion_window' must be '24h' (or another whole number of hours; got {window!r}).",
                          param="completion_window")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items())):
            raise invalid("'metadata' must be at most 16 string pairs (keys up to 64 chars, values up to 512).",
                          param="metadata")
        if not isinstance(file_id, str):
            raise invalid("'input_file_id' is required.", param="input_file_id")

        def create() -> dict:
            f = self.store.file(file_id)
            if f is None or f["purpose"] != "batch":
                raise _not_found("file with purpose 'batch'", file_id, "input_file_id")
            with open(self.store.path(file_id), "rb") as fh:
                try:
                    lines = read_input(fh, endpoint)
                except ValueError as err:
                    raise invalid(str(err), param="input_file_id", code="invalid_file") from None
            return self.store.create_batch(endpoint, file_id, int(match.group(1)) * 3600, window, metadata,
                                           [(line.number, line.custom_id, text) for line, text in lines])

        batch = await asyncio.to_thread(create)
        runner = self.runner()
        if runner is not None:
            runner.wake()
        return json_response(batch)

    async def _batch(self, request: HTTPRequest) -> dict:
        """The authorized request's batch (`batch_id` in the path), or a 404."""
        self.auth(request)
        batch_id = request.path_params["batch_id"]
        batch = await asyncio.to_thread(self.store.batch, batch_id)
        if batch is None:
            raise _not_found("batch", batch_id, "batch_id")
        return batch

    async def get_batch(self, request: HTTPRequest) -> Response:
        return json_response(await self._batch(request))

    async def list_batches(self, request: HTTPRequest) -> Response:
        self.auth(request)
        q = request.query_params
        try:
            limit = int(q.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise invalid("'limit' must be an integer from 1 to 100.", param="limit")
        page, more = await asyncio.to_thread(self.store.batches, q.get("after"), limit)
        return json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                              "last_id": page[-1]["id"] if page else None, "has_more": more})

    async def cancel_batch(self, request: HTTPRequest) -> Response:
        batch = await self._batch(request)
        batch_id = batch["id"]
        if batch["status"] in ("validating", "in_progress"):
            await asyncio.to_thread(self.store.set_status, batch_id, "cancelling", "cancelling_at",
                                    ("validating", "in_progress"))
            runner = self.runner()
            if runner is not None:
                runner.wake()
        elif batch["status"] not in ("cancelling", "cancelled"):
            raise APIError(409, f"Cannot cancel a batch that is {batch['status']}.", param="batch_id",
                           code="batch_not_cancellable")
        return json_response(await asyncio.to_thread(self.store.batch, batch_id))
