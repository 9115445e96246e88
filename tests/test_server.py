"""The HTTP server on the tiny checkpoint, over real loopback sockets (uvicorn in a thread)."""

import base64
import io
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from llada2uni import LLaDA2Uni  # noqa: E402
from llada2uni.server import ServerConfig, create_app  # noqa: E402
from llada2uni.server.background import serve_in_thread  # noqa: E402

SMALL = {"size": "64x64", "steps": 2, "decoder_steps": 2, "seed": 1}


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return LLaDA2Uni.from_pretrained(tiny_dir, device="cpu")


@contextmanager
def server(pipe, **config):
    app = create_app(ServerConfig(**config), pipe=pipe)
    with serve_in_thread(app) as url:
        yield url, app.state.llada2uni.scheduler


@pytest.fixture(scope="module")
def live(pipe):
    with server(pipe) as (url, scheduler):
        yield url, scheduler


@pytest.fixture
def client(live):
    with httpx.Client(base_url=live[0], timeout=60) as c:
        yield c


def png(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def png_bytes(w=64, h=64, color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def events(response) -> list:
    """The data payloads of a server-sent-event response, in order ("[DONE]" kept as a string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def in_background(fn, *args, **kwargs):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, box


# ---- liveness, models, page ----

def test_health_ready_models_and_page(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["image_input"] and ready["image_output"]
    assert {"in_flight", "batches", "max_queue"} <= set(ready["scheduler"])
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html") and 'id="t2i-go"' in page.text


# ---- images ----

def test_generations_png_and_tokens(client):
    r = client.post("/v1/images/generations", json={"prompt": "a red fox", "n": 2, **SMALL, "size": "64x96"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == "64x96" and len(body["data"]) == 2
    for item in body["data"]:
        assert png(item["b64_json"]).size == (64, 96)  # width x height
    r = client.post("/v1/images/generations", json={"prompt": "a red fox", **SMALL, "size": "64x96",
                                                     "response_format": "tokens"})
    item = r.json()["data"][0]
    assert (item["h"], item["w"]) == (3, 2) and len(item["token_ids"]) == 6
    assert all(0 <= c < 128 for c in item["token_ids"])


def test_generations_stream_order_and_same_image(client):
    body = {"prompt": "a lighthouse", **SMALL}
    plain = client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    with client.stream("POST", "/v1/images/generations", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        evs = events(r)
    assert evs[-1] == "[DONE]"
    kinds = [e["type"] for e in evs[:-1]]
    assert kinds[-1] == "image_generation.completed" and kinds.count("image_generation.completed") == 1
    progress = [e for e in evs[:-1] if e["type"] == "image_generation.progress"]
    stages = [p["stage"] for p in progress]
    assert "tokens" in stages and "decoder" in stages
    assert stages == sorted(stages, key=["tokens", "decoder"].index)  # all token blocks, then the decoder
    for stage in ("tokens", "decoder"):
        done = [p["done"] for p in progress if p["stage"] == stage]
        assert done == sorted(done) and done[-1] == progress[stages.index(stage)]["total"]
    assert evs[-2]["b64_json"] == plain  # same seed, same PNG


def test_generations_thinking_mode(client):
    # the tiny random weights never write <boi>: the official code raises, the server answers 400
    r = client.post("/v1/images/generations", json={"prompt": "a cat", **SMALL, "mode": "thinking",
                                                     "thinking_max_tokens": 40, "thinking_steps": 4})
    assert r.status_code == 400, r.text
    assert "<boi>" in r.json()["error"]["message"]


def test_edits_multipart(client):
    files = [("image", ("a.png", png_bytes(), "image/png"))]
    r = client.post("/v1/images/edits", files=files, data={"prompt": "make it blue", **SMALL})
    assert r.status_code == 200, r.text
    assert png(r.json()["data"][0]["b64_json"]).size == (64, 64)
    # several references; default output grid = the first source's (a 512x512-area crop: 32x32 tokens)
    files = [("image[]", ("a.png", png_bytes(), "image/png")), ("image[]", ("b.png", png_bytes(color=(0, 0, 255)),
                                                                            "image/png"))]
    r = client.post("/v1/images/edits", files=files, data={"prompt": "merge them", "steps": "1",
                                                           "response_format": "tokens"})
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    assert (item["h"], item["w"]) == (32, 32) and len(item["token_ids"]) == 1024
    assert r.json()["size"] == "1024x1024"


def test_edits_stream(client):
    files = [("image", ("a.png", png_bytes(), "image/png"))]
    with client.stream("POST", "/v1/images/edits", files=files,
                       data={"prompt": "make it blue", **SMALL, "stream": "true"}) as r:
        evs = events(r)
    assert evs[-1] == "[DONE]" and evs[-2]["type"] == "image_edit.completed"
    assert any(e["type"] == "image_edit.progress" for e in evs[:-2])
    assert png(evs[-2]["b64_json"]).size == (64, 64)


# ---- chat ----

def chat_body(content="Hello there", **kw):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 40, "steps": 4, **kw}


def test_chat_text(client):
    r = client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 40
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_understands_an_image(client):
    content = [{"type": "image_url", "image_url": {"url": data_uri(png_bytes())}},
               {"type": "text", "text": "What is this?"}]
    with_image = client.post("/v1/chat/completions", json=chat_body(content))
    assert with_image.status_code == 200, with_image.text
    # one user turn with an image: the official layout, header + 64 image tokens (8x8) + <|/image|> +
    # the question, no chat turns
    question = len("What is this?")  # the tiny tokenizer is byte-level
    assert with_image.json()["usage"]["prompt_tokens"] == 4 + 64 + 1 + question


def test_chat_stream_order_matches_plain(client):
    body = chat_body(max_tokens=100)
    plain = client.post("/v1/chat/completions", json=body).json()
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        evs = events(r)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    kinds = ["progress" if "progress" in c else "finish" if c["choices"][0]["finish_reason"] else
             "content" if c["choices"][0]["delta"].get("content") else "other" for c in chunks[1:]]
    assert kinds[-1] == "finish" and kinds.count("finish") == 1
    done = [c["progress"]["done"] for c in chunks if "progress" in c]
    assert done == sorted(done) and done[-1] >= 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == plain["usage"]


def test_chat_image_modality(client):
    opts = {"size": "64x64", "dllm_steps": 2, "decoder_steps": 2, "seed": 3}
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a blue bird"}],
                                                  "modalities": ["image"], "image_generation": opts})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    url = message["images"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and png(url.split(",", 1)[1]).size == (64, 64)
    # an image in the message makes it an edit
    content = [{"type": "image_url", "image_url": {"url": data_uri(png_bytes())}},
               {"type": "text", "text": "make it green"}]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                  "modalities": ["image"], "image_generation": opts})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["images"][0]["image_url"]["url"].startswith("data:image/png")


# ---- scheduler behaviour over HTTP ----

def test_concurrent_requests_batch_and_match_sequential(live, client):
    url, scheduler = live
    bodies = [("/v1/images/generations", {"prompt": "a red fox", **SMALL, "seed": 5, "response_format": "tokens"}),
              ("/v1/images/generations", {"prompt": "two boats on a long river at dawn", **SMALL, "seed": 6,
                                          "size": "96x64", "response_format": "tokens"}),
              ("/v1/chat/completions", chat_body("Hi", seed=7)),
              ("/v1/chat/completions", chat_body("Tell me a much longer story about the sea", seed=8,
                                                 max_tokens=70))]

    def call(path, body):
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post(path, json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            return out["data"] if "data" in out else out["choices"][0]["message"]["content"]

    sequential = [call(*b) for b in bodies]
    before = scheduler.stats()
    scheduler.pause()
    try:
        threads = [in_background(call, *b) for b in bodies]
        wait_for(lambda: scheduler.stats()["waiting_work"] == len(bodies))
    finally:
        scheduler.resume()
    for t, _ in threads:
        t.join(60)
    assert [box["result"] for _, box in threads] == sequential
    after = scheduler.stats()
    assert after["batches"] - before["batches"] == 1  # all four shared every forward
    assert after["max_batch_seen"] >= len(bodies)


def test_queue_limit_429_then_recovery(pipe):
    with server(pipe, max_queue=2) as (url, scheduler), httpx.Client(base_url=url, timeout=60) as c:
        scheduler.pause()
        try:
            threads = [in_background(c.post, "/v1/chat/completions", json=chat_body()) for _ in range(2)]
            wait_for(lambda: scheduler.stats()["in_flight"] == 2)
            r = c.post("/v1/chat/completions", json=chat_body())
            assert r.status_code == 429
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        finally:
            scheduler.resume()
        for t, box in threads:
            t.join(60)
            assert box["result"].status_code == 200
        assert c.post("/v1/chat/completions", json=chat_body()).status_code == 200
        stats = scheduler.stats()
        assert stats["rejected"] == 1 and stats["in_flight"] == 0 and stats["completed"] == 3


def raw_post(url: str, path: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_disconnected_waiting_client_is_cancelled_and_freed(live):
    url, scheduler = live
    before = scheduler.stats()
    scheduler.pause()
    try:
        sock = raw_post(url, "/v1/chat/completions", chat_body())
        wait_for(lambda: scheduler.stats()["in_flight"] == 1 and scheduler.stats()["waiting_work"] == 1)
        sock.close()
        wait_for(lambda: scheduler.stats()["in_flight"] == 0)
        stats = scheduler.stats()
        assert stats["waiting_work"] == 0  # its work was withdrawn before the worker saw it
        assert stats["cancelled"] == before["cancelled"] + 1
    finally:
        scheduler.resume()
    assert scheduler.stats()["batches"] == before["batches"]


def test_disconnected_streaming_client_aborts_its_batch(live):
    url, scheduler = live
    before = scheduler.stats()
    body = chat_body(max_tokens=4000, steps=32, stream=True)
    with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if '"progress"' in line:  # the batch is running: leave
                break
    wait_for(lambda: scheduler.stats()["in_flight"] == 0 and scheduler.stats()["running"] == 0)
    stats = scheduler.stats()
    assert stats["cancelled"] == before["cancelled"] + 1
    assert stats["aborted_batches"] == before["aborted_batches"] + 1  # stopped at a block boundary
    assert stats["batches"] == before["batches"]


def test_request_timeout(pipe):
    with server(pipe, request_timeout=0.3) as (url, scheduler), httpx.Client(base_url=url, timeout=60) as c:
        scheduler.pause()
        try:
            r = c.post("/v1/chat/completions", json=chat_body())
        finally:
            scheduler.resume()
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        wait_for(lambda: scheduler.stats()["in_flight"] == 0)
        assert scheduler.stats()["timed_out"] == 1


def test_worker_fault_fails_only_that_request(live, client):
    url, scheduler = live
    real = scheduler._denoise

    def faulty(requests, *args):
        if any(r.gen_length == 13 for r in requests):
            raise RuntimeError("injected fault")
        return real(requests, *args)

    good = chat_body("Hi", seed=7)
    expected = client.post("/v1/chat/completions", json=good).json()["choices"][0]["message"]["content"]
    before = scheduler.stats()
    scheduler._denoise = faulty
    scheduler.pause()
    try:
        bad_t, bad = in_background(client.post, "/v1/chat/completions", json=chat_body(max_tokens=13))
        good_t, ok = in_background(client.post, "/v1/chat/completions", json=good)
        wait_for(lambda: scheduler.stats()["waiting_work"] == 2)
        scheduler.resume()
        bad_t.join(60)
        good_t.join(60)
    finally:
        scheduler._denoise = real
        scheduler.resume()
    assert bad["result"].status_code == 500
    assert bad["result"].json()["error"]["type"] == "server_error"
    assert ok["result"].status_code == 200
    assert ok["result"].json()["choices"][0]["message"]["content"] == expected
    assert scheduler.stats()["isolated_retries"] == before["isolated_retries"] + 1
    assert client.get("/health").status_code == 200
    assert client.post("/v1/chat/completions", json=good).status_code == 200


# ---- bad input ----

GEN = "/v1/images/generations"
CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("path, body, param, words", [
    (GEN, b"{not json", None, "not valid JSON"),
    (GEN, b"[1, 2]", None, "JSON object"),
    (GEN, {"size": "64x64"}, "prompt", "missing required field 'prompt'"),
    (GEN, {"prompt": "x", "n": "two"}, "n", "valid integer"),
    (GEN, {"prompt": "x", "steps": 1.5}, "steps", "valid integer"),
    (GEN, {"prompt": 3}, "prompt", "valid string"),
    (GEN, {"prompt": "x", "size": "100x100"}, "size", "multiples of 32"),
    (GEN, {"prompt": "x", "size": "big"}, "size", "WIDTHxHEIGHT"),
    (GEN, {"prompt": "x", "size": "4096x4096"}, "size", "limit"),
    (GEN, {"prompt": "x", "n": 50}, "n", "at most"),
    (GEN, {"prompt": "x", "response_format": "url"}, "response_format", "not supported"),
    (GEN, {"prompt": "x", "mode": "dreaming"}, "mode", "'normal' or 'thinking'"),
    (GEN, {"prompt": ""}, "prompt", "at least 1 character"),
    (CHAT, {"model": "x"}, "messages", "missing required field 'messages'"),
    (CHAT, {"messages": []}, "messages", "at least 1 item"),
    (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "'system', 'user' or"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "https://example.com/a.png"}}]}]}, "messages.0.content.0.image_url", "remote image URLs are disabled"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "/etc/passwd"}}]}]}, "messages.0.content.0.image_url", "file paths are not accepted"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,%%%"}}]}]}, "messages.0.content.0.image_url", "malformed"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": data_uri(b"hello, not an image")}}]}]}, "messages.0.content.0.image_url", "not an image"),
    (CHAT, {"messages": [{"role": "assistant", "content": "hi"}]}, None, "must end with a user message"),
    (CHAT, {**chat_body(), "max_tokens": 100000}, "max_tokens", "at most"),
])
def test_bad_json_inputs(client, path, body, param, words):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = client.post(path, **kw)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"], error
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("files, data, words", [
    ([("image", ("notes.txt", b"just some text", "text/plain"))], {"prompt": "x"}, "not an image"),
    ([("image", ("huge.png", None, "image/png"))], {"prompt": "x"}, "more than the limit"),
    ([("note", ("n.txt", b"x", "text/plain"))], {"prompt": "x"}, "missing required field 'image'"),
    ([("image", ("a.png", png_bytes(), "image/png"))], {}, "missing required field 'prompt'"),
    ([("image", ("a.png", png_bytes(), "image/png"))], {"prompt": "x", "steps": "many"}, "valid integer"),
    ([("image", ("a.png", png_bytes(), "image/png")), ("mask", ("m.png", png_bytes(), "image/png"))],
     {"prompt": "x"}, "mask is not supported"),
    ([("image", ("a.png", png_bytes(), "image/png"))], {"prompt": "x", "size": "65x64"}, "multiples of 32"),
])
def test_bad_edit_inputs(client, files, data, words):
    if files and files[0][1][1] is None:  # 5000 x 5000 pixels: a tiny file, too many pixels
        files = [("image", ("huge.png", png_bytes(5000, 5000, 0, mode="1"), "image/png"))]
    r = client.post("/v1/images/edits", files=files, data=data)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_edit_needs_multipart(client):
    r = client.post("/v1/images/edits", json={"prompt": "x"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


def test_unknown_route_and_method(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_body_limit(pipe):
    with server(pipe, max_body_bytes=10_000) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        r = c.post(CHAT, json=chat_body("x" * 20_000))
        assert r.status_code == 413 and "limit of 10,000 bytes" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it streams in
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(30):
                yield b"x" * 1000
            yield b'"}]}'
        r = c.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post(CHAT, json=chat_body()).status_code == 200


def test_api_key(pipe):
    with server(pipe, api_key="s3cret") as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        r = c.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200


def test_loading_then_ready(pipe):
    gate = threading.Event()

    def loader():
        gate.wait(20)
        return pipe
    app = create_app(ServerConfig(), loader=loader)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 503
        r = c.post(CHAT, json=chat_body())
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        gate.set()
        wait_for(lambda: c.get("/ready").status_code == 200)
        assert c.post(CHAT, json=chat_body()).status_code == 200


def test_serve_command_defaults_and_tiny(monkeypatch):
    from llada2uni.cli import build_parser
    from llada2uni.server import main

    args = build_parser().parse_args(["serve", "--model", "tiny"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)
    servers = []
    monkeypatch.setattr("llada2uni.server.net.Server.run", lambda self, *a, **k: servers.append(self))
    monkeypatch.delenv("LLADA2UNI_API_KEY", raising=False)
    assert main.serve(args) == 0
    config = servers[0].config
    assert (config.host, config.port, config.timeout_graceful_shutdown) == ("127.0.0.1", 8000, 30)
    app = config.app
    monkeypatch.undo()  # the real Server.run again, for serve_in_thread
    assert app.state.llada2uni.config.allowed_hosts == ("localhost", "127.0.0.1", "::1")  # loopback bind
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        wait_for(lambda: c.get("/ready").status_code == 200, timeout=120)
        assert c.get("/v1/models").json()["data"][0]["id"] == "llada2uni-tiny"


class _Letters:
    """A mock backbone that writes the byte token of "a" everywhere: readable text, many blocks."""

    def __init__(self, pipe):
        self.vocab, self.token = pipe.config.vocab_size, pipe.tokens.encode("a")[0]
        self.block_length = 32

    def __call__(self, ids, start, pad_lens, cache, num_logits):
        import torch
        out = torch.zeros(ids.shape[0], num_logits, self.vocab)
        out[..., self.token] = 30.0
        return out


def test_chat_stream_is_live(pipe, client, monkeypatch):
    # committed text streams block by block, before the generation ends
    monkeypatch.setattr(pipe, "logits_fn", _Letters(pipe))
    body = chat_body(max_tokens=100)
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = events(r)[:-1]
    kinds = ["progress" if "progress" in c else "finish" if c["choices"][0]["finish_reason"] else
             "content" if c["choices"][0]["delta"].get("content") else "other" for c in chunks[1:]]
    last_progress = max(i for i, k in enumerate(kinds) if k == "progress")
    assert kinds.index("content") < last_progress, kinds  # content arrived while blocks were running
    assert kinds.count("content") >= 3
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "a" * 100


def test_server_warms_up_before_ready_and_reports_it(pipe, monkeypatch):
    import llada2uni.runtime as runtime
    calls = []

    def fake(p, **kw):
        calls.append(kw)
        return {"seconds": 1.5, "backbone": {"graphs": 3}}
    monkeypatch.setattr(runtime, "warm_up", fake)
    with server(pipe, max_batch=4, default_size="96x64", default_max_tokens=100) as (url, _):
        ready = httpx.get(f"{url}/ready").json()
    assert ready["warm_up"] == {"seconds": 1.5, "backbone": {"graphs": 3}}
    # every row bucket a full batch of image requests (two CFG rows each) reaches, the default size as (h, w)
    assert calls == [{"max_rows": 8, "size": (64, 96), "text_tokens": 100}]
    with server(pipe, warm_up=False) as (url, _):
        assert httpx.get(f"{url}/ready").json()["warm_up"] is None
    assert len(calls) == 1
