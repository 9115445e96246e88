"""The network edge: connections that stall, a shutdown with a deadline, remote images under rules.

* ``GuardedH11Protocol``: uvicorn's HTTP/1.1 protocol, closing a connection whose request line and
  headers have not all arrived ``header_timeout`` seconds after it opened (or after its previous
  response): uvicorn alone waits forever for them (slowloris). Bodies are timed in the app
  (``app._Guard``).
* ``Server``: ``uvicorn.Server`` that calls ``on_exit`` when SIGINT/SIGTERM arrives (the app drains its
  queue: waiting requests get 503 at once) and gives running requests ``timeout_graceful_shutdown``
  seconds before uvicorn cancels them.
* ``fetch_image``: an http(s) GET for ``--allow-remote-images`` that connects only to public addresses
  (the host is resolved once and the connection goes to the checked address: no DNS rebinding),
  follows at most ``MAX_REDIRECTS`` redirects under the same rule, stops at ``max_bytes`` and at one
  total deadline, and reports failures without the details a prober could use (ports, sizes).
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import time
import urllib.parse
from typing import Callable

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a deadline for each request's line and headers (``header_timeout``)."""

    header_timeout: float = 15.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _waiting_for_request(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request's headers are in: its body is the app's to time
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._waiting_for_request() and not self.transport.is_closing():
            log.debug("closing a connection whose request headers did not arrive in %.0f s", self.header_timeout)
            self.transport.close()


def guarded_protocol(header_timeout: float) -> type[GuardedH11Protocol]:
    """A ``GuardedH11Protocol`` subclass with this header deadline (uvicorn takes a class)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": float(header_timeout)})


class Server(uvicorn.Server):
    """``uvicorn.Server`` telling ``on_exit`` when a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        if self.on_exit is not None and not self.should_exit:
            try:
                self.on_exit()
            except Exception:  # noqa: BLE001 - the shutdown goes on
                log.exception("draining at shutdown failed")
        super().handle_exit(sig, frame)


def uvicorn_config(app, *, header_timeout: float, shutdown_timeout: float, log_level: str = "info",
                   **kwargs) -> uvicorn.Config:
    """The one uvicorn configuration (``serve`` and ``background.serve_in_thread``)."""
    return uvicorn.Config(app, http=guarded_protocol(header_timeout), lifespan="on", log_level=log_level,
                          timeout_graceful_shutdown=max(1, round(shutdown_timeout)), timeout_keep_alive=5,
                          **kwargs)


# ---- remote images ----

class FetchError(Exception):
    """A remote image that cannot be fetched; the message is safe to show the client."""


def _resolve(host: str, port: int) -> list[tuple]:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise FetchError("its host name does not resolve") from None


def public_address(host: str, port: int) -> tuple[int, tuple]:
    """Resolve ``host``; (family, sockaddr) of its first address, if every address is public."""
    infos = _resolve(host, port)
    for family, _, _, _, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast:
            raise FetchError("it points at a private, loopback or reserved address, which this server "
                             "does not fetch")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _connection(scheme: str, host: str, port: int, family: int, sockaddr: tuple,
                timeout: float) -> http.client.HTTPConnection:
    """An http.client connection to an address checked beforehand (TLS still verifies the host name)."""
    def pinned() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except OSError:
            sock.close()
            raise
        return sock

    if scheme == "https":
        class Conn(http.client.HTTPSConnection):
            def connect(self):
                self.sock = ssl.create_default_context().wrap_socket(pinned(), server_hostname=host)
        return Conn(host, port, timeout=timeout)

    class Plain(http.client.HTTPConnection):
        def connect(self):
            self.sock = pinned()
    return Plain(host, port, timeout=timeout)


def fetch_image(url: str, *, max_bytes: int, deadline_s: float = 15.0, allow_private: bool = False) -> bytes:
    """GET ``url`` (see the module doc). Raises ``FetchError`` with a client-safe message."""
    deadline = time.monotonic() + deadline_s

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(f"it did not arrive within {deadline_s:g} s")
        return remaining

    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError("only http(s) URLs with a host are fetched")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if allow_private:
            info = _resolve(parts.hostname, port)[0]
            family, sockaddr = info[0], info[4]
        else:
            family, sockaddr = public_address(parts.hostname, port)
        conn = _connection(parts.scheme, parts.hostname, port, family, sockaddr, min(5.0, left()))
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request("GET", path, headers={"User-Agent": "llada2uni", "Accept": "image/*"})
                response = conn.getresponse()
            except (OSError, http.client.HTTPException):
                left()  # a deadline passed is reported as such
                raise FetchError("the connection failed") from None
            if response.status in (301, 302, 303, 307, 308) and response.getheader("location"):
                url = urllib.parse.urljoin(url, response.getheader("location"))
                continue
            if response.status != 200:
                raise FetchError(f"the server answered HTTP {response.status}")
            # the body: socket waits of at most a second, the deadline checked between them (the socket
            # is the response's now: http.client may have let go of it)
            sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
            if sock is not None:
                sock.settimeout(1.0)
            chunks, size = [], 0
            while True:
                try:
                    chunk = response.read1(65536)  # what has arrived: a drip cannot hold a read open
                except socket.timeout:
                    left()
                    continue
                except (OSError, http.client.HTTPException):
                    left()
                    raise FetchError("the connection failed while reading") from None
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"it is larger than this server's limit of {max_bytes:,} bytes")
                chunks.append(chunk)
                left()
        finally:
            conn.close()
    raise FetchError(f"it redirects more than {MAX_REDIRECTS} times")
