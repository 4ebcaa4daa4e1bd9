"""``minicpm serve``: uvicorn over :func:`~minicpm.server.app.build_app`, with a graceful drain.

Contract: :func:`serve` loads the model, starts one engine thread and serves until SIGTERM or
SIGINT. On the first signal the server stops admitting (new requests and ``/health`` answer 503),
lets running requests finish for up to ``shutdown_timeout`` seconds, aborts the rest and exits
0; a second signal exits at once. An answer the drain cuts is never passed off as complete: a
stream ends with ``finish_reason: "abort"`` and an error frame (503) before ``[DONE]``; a
non-streaming request gets 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import uvicorn

from .app import ServerState, build_app

log = logging.getLogger("minicpm.server")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self._drain: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.state.draining:  # a second signal: stop now
            self.force_exit = True
            self.should_exit = True
            return
        self.state.draining = True
        log.info("draining: %d requests in flight, up to %.0f s", self.state.in_flight, self.shutdown_timeout)
        self._drain = asyncio.get_event_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while self.state.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.in_flight:
            log.info("aborting %d requests still running", self.state.in_flight)
        await asyncio.to_thread(self.state.engine.close)  # aborts whatever is left
        await asyncio.sleep(0.05)  # let the aborted streams end their responses
        self.should_exit = True


def serve(state: ServerState, host: str, port: int, shutdown_timeout: float, log_level: str = "info") -> int:
    app = build_app(state)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off")
    server = _DrainingServer(config, state, shutdown_timeout)
    log.info(
        "serving %s on http://%s:%d (max_model_len %d)", ", ".join(state.served_names), host, port, state.max_model_len
    )
    if state.web:
        log.info("chat page: http://%s:%d/", host if ":" not in host else f"[{host}]", port)
    server.run()
    state.engine.close()  # a no-op after a drain
    return 0
