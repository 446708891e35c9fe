"""Running the application under uvicorn: in the foreground (`tunelab serve`), or on a thread for tests and the
benchmark (`running`), on loopback unless told otherwise."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from tunelab.serve.app import create_app
from tunelab.serve.pool import ModelPool

STARTUP_TIMEOUT_S = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _config(pool: ModelPool, host: str, port: int, max_batch: int, max_waiting: int) -> uvicorn.Config:
    # log_config=None: tunelab's own logging (one line per request), not uvicorn's access log
    return uvicorn.Config(create_app(pool, max_batch, max_waiting), host=host, port=port, log_config=None,
                          access_log=False, timeout_graceful_shutdown=5)


def serve_forever(pool: ModelPool, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32,
                  max_waiting: int = 64) -> None:
    """Serve until interrupted (Ctrl-C)."""
    uvicorn.Server(_config(pool, host, port, max_batch, max_waiting)).run()


@dataclass
class Running:
    url: str  # http://host:port
    app: FastAPI  # its state holds the pool and the batcher


@contextmanager
def running(pool: ModelPool, host: str = "127.0.0.1", port: int | None = None, max_batch: int = 32,
            max_waiting: int = 64) -> Iterator[Running]:
    """A server on a thread for the block."""
    server = uvicorn.Server(_config(pool, host, port or free_port(host), max_batch, max_waiting))
    thread = threading.Thread(target=server.run, name="tunelab-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{server.config.port}")
        time.sleep(0.02)
    try:
        yield Running(f"http://{host}:{server.config.port}", server.config.app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
