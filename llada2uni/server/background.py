"""Run an app under uvicorn in a background thread (tests, the in-process load test, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 30.0,
                    log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` on ``host:port`` (0: a free port) until the block exits; yields the base URL."""
    from .net import Server, uvicorn_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    from .app import ServerConfig
    state = getattr(app.state, "llada2uni", None)
    config = state.config if state is not None else ServerConfig()
    server = Server(uvicorn_config(app, header_timeout=config.header_timeout, shutdown_timeout=config.shutdown_timeout,
                                   log_level=log_level),
                    on_exit=state.begin_shutdown if state is not None else None)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
