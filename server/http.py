"""The HTTP server around the app: uvicorn with hardened settings, a header timeout, and a drain on SIGTERM.

uvicorn's own settings bound what a client can hold: `limit_concurrency` (connections and
requests at once; past it uvicorn answers 503), `timeout_keep_alive` (an idle connection
after a response), `h11_max_incomplete_event_size` (the request head's size); the app caps
the body. What uvicorn lacks is a limit on how long a client may take to send its request
head: a slowloris client that connects and trickles (or never sends) its headers would hold
a connection, and a place under `limit_concurrency`, forever. `HeaderTimeoutH11Protocol`
closes a connection whose request head is not complete `header_timeout` seconds after it
opened (or after its previous response).

`DrainingServer` turns SIGTERM/SIGINT into a drain instead of uvicorn's immediate close:
the listener stays open (new requests get 503 + Retry-After, readiness 503) while the app's
`drain()` lets requests in flight finish; then the server exits (status 0). A second signal
exits at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Awaitable, Callable, Optional

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("pgpt_jax.server")


@dataclasses.dataclass(frozen=True)
class HTTPSettings:
    """The `pgpt-jax serve` flags of the same names."""

    limit_concurrency: int = 512  # connections (idle ones included) and requests at once
    timeout_keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    header_timeout: float = 10.0  # seconds a client has to send a complete request head
    max_header_bytes: int = 64 * 1024  # the largest request head accepted (431/400 beyond)
    graceful_exit: float = 5.0  # after a drain, seconds uvicorn waits for connections to close


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that take too long to send a request head."""

    header_timeout = HTTPSettings.header_timeout  # set per server by `uvicorn_config`

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # a keep-alive connection's next request head gets the same time

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _disarm_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timeout_expired(self) -> None:
        self._header_timer = None
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT runs `drain()` and then exits; a second exits at once."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]):
        super().__init__(config)
        self._drain = drain
        self._draining = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        # Runs in the signal handler, on the event loop's thread. Not recorded as a captured
        # signal, so uvicorn does not re-raise it after the drain: the process exits with 0.
        if self._draining or self._loop is None or not self.started:
            self.should_exit = True
            self.force_exit = self._draining
            return
        log.info("signal %s: draining", sig)
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        finally:
            self.should_exit = True


def uvicorn_config(app, host: str, port: int, settings: HTTPSettings = HTTPSettings(), **kwargs) -> uvicorn.Config:
    """uvicorn.Config with the hardened settings and the header-timeout protocol."""
    protocol = type("HeaderTimeoutH11", (HeaderTimeoutH11Protocol,), {"header_timeout": settings.header_timeout})
    return uvicorn.Config(app, host=host, port=port, http=protocol,
                          limit_concurrency=settings.limit_concurrency,
                          timeout_keep_alive=settings.timeout_keep_alive,
                          h11_max_incomplete_event_size=settings.max_header_bytes,
                          timeout_graceful_shutdown=settings.graceful_exit, **kwargs)
