"""The server's edge (server/net.py, app._Guard): hostile sizes, stalled clients, cross-site requests,
shutdown, remote images, load failures. HTTP over real loopback sockets."""

import http.server
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from llada2uni import LLaDA2Uni  # noqa: E402
from llada2uni.server import ServerConfig, create_app  # noqa: E402
from llada2uni.server.background import serve_in_thread  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "steps": 2}


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return LLaDA2Uni.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def edge(pipe):
    config = ServerConfig(max_chat_chars=1000, max_messages=8, header_timeout=0.5, body_timeout=0.5)
    app = create_app(config, pipe=pipe)
    with serve_in_thread(app) as url:
        yield url, app


def _addr(url):
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _raw(url, data: bytes, wait: float = 3.0) -> bytes:
    """Send ``data`` on a fresh connection; everything the server sends until it closes (or ``wait``)."""
    with socket.create_connection(_addr(url), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except socket.timeout:
            out += b"<still open>"
    return out


# ---- 1. chat text is limited before anything is tokenised ----

def test_chat_text_and_message_limits_come_before_tokenising(edge, pipe, monkeypatch):
    url, app = edge
    calls = []
    real = pipe.tokens.encode
    monkeypatch.setattr(pipe.tokens, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert "5,000 characters" in r.json()["error"]["message"]
        many = [{"role": "user", "content": "a"}] * 50
        r = c.post("/v1/chat/completions", json={**CHAT, "messages": many})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_messages"
        t = time.monotonic()
        r = c.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "a"}] * 100_000})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_messages"
        assert time.monotonic() - t < 2  # refused before 100k messages are parsed into objects
        assert not calls  # none reached the tokenizer
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert calls


# ---- 2. stalled and vanishing clients ----

def test_a_connection_that_never_finishes_its_headers_is_closed(edge):
    t = time.monotonic()
    out = _raw(edge[0], b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n", wait=5)
    assert out == b"" and time.monotonic() - t < 4  # closed by the server at its 0.5 s header deadline


def test_a_body_that_stops_arriving_gets_408(edge):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"messa")
    out = _raw(edge[0], head, wait=5)
    assert out.startswith(b"HTTP/1.1 408") and b"did not arrive within" in out


def test_a_client_leaving_mid_upload_logs_no_traceback(edge, caplog):
    caplog.set_level(logging.DEBUG)
    with socket.create_connection(_addr(edge[0])) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{\"messages\": [")
        time.sleep(0.2)
    time.sleep(0.5)
    with httpx.Client(base_url=edge[0]) as c:
        assert c.get("/health").status_code == 200
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]


# ---- 3. other sites cannot drive a local server ----

def test_cross_site_requests_are_refused(edge):
    url = edge[0]
    with httpx.Client(base_url=url, timeout=30) as c:
        import json
        r = c.post("/v1/chat/completions", content=json.dumps(CHAT), headers={"Content-Type": "text/plain"})
        assert r.status_code == 415, r.text  # a "simple" cross-site POST needs no preflight: refused
        r = c.post("/v1/chat/completions", json=CHAT, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        r = c.post("/v1/images/edits", files={"image": ("a.png", b"x")}, data={"prompt": "p"},
                   headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        r = c.get("/health", headers={"Host": "evil.example"})  # DNS rebinding: another name, same IP
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
        r = c.post("/v1/chat/completions", json=CHAT, headers={"Origin": url})  # the page itself
        assert r.status_code == 200, r.text


def test_allowed_origins_and_any_host(pipe):
    app = create_app(ServerConfig(allowed_hosts=None, allowed_origins=("http://localhost:3000",)), pipe=pipe)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health", headers={"Host": "my-box.lan"}).status_code == 200
        assert c.post("/v1/chat/completions", json=CHAT,
                      headers={"Origin": "http://localhost:3000"}).status_code == 200


# ---- 4. shutdown: waiting work answers 503 at once, running work has a deadline ----

def test_shutdown_answers_waiting_requests_503_and_has_a_deadline(pipe):
    from llada2uni.server.net import uvicorn_config
    app = create_app(ServerConfig(shutdown_timeout=7), pipe=pipe)
    assert uvicorn_config(app, header_timeout=1, shutdown_timeout=7).timeout_graceful_shutdown == 7
    state = app.state.llada2uni
    with serve_in_thread(app) as url:
        state.scheduler.pause()  # nothing starts: the request waits in the queue
        box = {}

        def post():
            with httpx.Client(base_url=url, timeout=30) as c:
                box["r"] = c.post("/v1/chat/completions", json=CHAT)
        thread = threading.Thread(target=post)
        thread.start()
        deadline = time.monotonic() + 10
        while state.scheduler.stats()["in_flight"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t = time.monotonic()
        state.begin_shutdown()  # what SIGTERM does (net.Server.handle_exit -> on_exit)
        thread.join(10)
        assert box["r"].status_code == 503 and time.monotonic() - t < 2
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.post("/v1/chat/completions", json=CHAT).status_code == 503  # and new ones
        state.scheduler.resume()


def test_the_signal_handler_drains_first():
    from llada2uni.server.net import Server
    import uvicorn
    seen = []
    server = Server(uvicorn.Config(lambda *a: None), on_exit=lambda: seen.append("drain"))
    server.handle_exit(15, None)
    assert seen == ["drain"] and server.should_exit


# ---- 5. remote images ----

class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        action = self.routes.get(self.path, ("status", 404))
        if action[0] == "redirect":
            self.send_response(302)
            self.send_header("Location", action[1])
            self.end_headers()
        elif action[0] == "drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        elif action[0] == "body":
            self.send_response(200)
            self.send_header("Content-Length", str(len(action[1])))
            self.end_headers()
            self.wfile.write(action[1])
        else:
            self.send_response(action[1])
            self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def origin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.server_address[1]
    server.shutdown()


def test_remote_fetch_refuses_private_addresses_and_internal_redirects(origin, monkeypatch):
    from llada2uni.server import net
    url, port = origin
    with pytest.raises(net.FetchError, match="private, loopback") as e:
        net.fetch_image(url + "/img", max_bytes=1000)
    assert str(port) not in str(e.value)
    # the first hop passes as public; its redirect to an internal address must not be followed
    real = net.public_address
    monkeypatch.setattr(net, "public_address", lambda host, p: (socket.AF_INET, ("127.0.0.1", p))
                        if p == port else real(host, p))
    _Handler.routes.update({"/img": ("body", b"PNG!"), "/hop": ("redirect", "http://127.0.0.2:9/admin"),
                            "/drip": ("drip",), "/big": ("body", b"x" * 5000)})
    assert net.fetch_image(url + "/img", max_bytes=1000) == b"PNG!"
    with pytest.raises(net.FetchError, match="private, loopback"):
        net.fetch_image(url + "/hop", max_bytes=1000)
    with pytest.raises(net.FetchError, match="larger than") as e:
        net.fetch_image(url + "/big", max_bytes=1000)
    t = time.monotonic()
    with pytest.raises(net.FetchError, match="within 1 s"):  # one deadline, not one per read
        net.fetch_image(url + "/drip", max_bytes=10_000, deadline_s=1.0)
    assert time.monotonic() - t < 2.5
    with pytest.raises(net.FetchError, match="HTTP 404"):
        net.fetch_image(url + "/nothing", max_bytes=1000)


# ---- 7. sizes: zero and empty are errors, not the default ----

def test_zero_or_empty_sizes_are_refused(edge):
    with httpx.Client(base_url=edge[0], timeout=30) as c:
        r = c.post("/v1/images/generations", json={"prompt": "p", "size": "", "response_format": "tokens"})
        assert r.status_code == 400 and "size" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={**CHAT, "modalities": ["image"],
                                                 "image_generation": {"image_h": 0, "image_w": 64}})
        assert r.status_code == 400 and "image_h" in r.json()["error"]["message"], r.text


# ---- 10. a model that fails to load ----

def test_a_failed_load_is_unhealthy_and_reported(pipe):
    failures = []

    def boom():
        raise FileNotFoundError("no checkpoint at /nonexistent")
    app = create_app(ServerConfig(), loader=boom)
    app.state.llada2uni.on_failure = failures.append
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        deadline = time.monotonic() + 10
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "failed"
    assert "no checkpoint" in failures[0]


def test_serve_refuses_a_missing_folder_before_starting(capsys):
    from llada2uni.cli import main
    with pytest.raises(SystemExit, match="no such folder"):
        main(["serve", "--model", "/nonexistent/checkpoint"])
