"""The HTTP server: OpenAI-compatible routes over the scheduler, plus the web page at ``/``.

A thin adapter (no tensor code): it validates requests, turns uploads into checked PIL images, admits a
job running one of ``tasks``' functions, and answers with its result as JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import secrets
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from . import tasks
from .protocol import (APIError, ChatBody, ImageEditBody, ImageGenerationBody, ImageOptions, check_sides,
                       data_uri_bytes, parse_form, parse_json, parse_size)
from .scheduler import Cancelled, JobTimeout, QueueFull, Scheduler, SchedulerConfig, ShuttingDown

log = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "static" / "index.html"
_TOKEN_FORMAT = "tokens"  # response_format extension: image codes, no decoding


@dataclass
class ServerConfig:
    model_id: str = "llada2uni"
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_batch: int = 32  # denoising requests sharing one forward
    max_queue: int = 64  # requests in flight at once; more get 429
    batch_linger_s: float = 0.02  # a new batch waits this long at most for requests still arriving
    request_timeout: float = 600.0  # seconds
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096  # per uploaded image, checked before decoding it
    max_images: int = 4  # uploaded images per request
    max_side: int = 2048  # generated image side, pixels
    max_n: int = 4  # images per request
    max_tokens: int = 4096  # chat answer length cap
    default_max_tokens: int = 512
    default_size: str = "1024x1024"
    allow_remote_images: bool = False  # fetch http(s) image_url in chat messages
    warm_up: bool = True  # compile and capture the fast path's shapes before /ready (runtime.warm_up)
    # chat text, checked before anything is tokenised: a request's messages and their characters
    max_messages: int = 256
    max_chat_chars: int = 256 * 1024
    # slow or stalled clients: request line + headers (net.GuardedH11Protocol), then the whole body
    header_timeout: float = 15.0
    body_timeout: float = 60.0
    # SIGTERM/SIGINT: waiting requests get 503 at once, running ones this long before they are cancelled
    shutdown_timeout: float = 30.0
    # Host headers accepted (None: any; the default, loopback names, stops DNS rebinding of a local
    # server); Origins accepted beside the server's own for requests that change state ("*": any)
    allowed_hosts: tuple[str, ...] | None = ("localhost", "127.0.0.1", "::1")
    allowed_origins: tuple[str, ...] = ()
    # --allow-remote-images: one deadline per fetch, fetches at once (their own threads)
    remote_timeout: float = 15.0
    remote_fetches: int = 4
    remote_allow_private: bool = False  # tests only: fetch from loopback/private addresses


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def _host_name(value: str) -> str:
    """'example.com:8000' / '[::1]:8000' -> the host name, lower case, without the port."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class _Guard:
    """ASGI middleware at the edge of the app:

    * the Host header must be one of ``allowed_hosts`` (DNS rebinding of a local server);
    * a state-changing request (not GET/HEAD/OPTIONS) with an Origin header must come from the
      server's own origin or one of ``allowed_origins`` (another site's page cannot drive it);
    * the body may not exceed ``max_bytes`` (by Content-Length or as it streams in: 413) and must
      arrive within ``body_timeout`` seconds (408).
    """

    def __init__(self, app, config: ServerConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        c = self.config
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if c.allowed_hosts is not None and _host_name(host) not in c.allowed_hosts:
            return await _send_error(send, APIError(
                403, f"Host {host!r} is not one this server answers to (allowed: {', '.join(c.allowed_hosts)}; "
                "serve --allowed-hosts adds names)", type="permission_error", code="host_not_allowed"))
        origin = headers.get(b"origin")
        if origin is not None and scope["method"] not in _SAFE_METHODS:
            origin = origin.decode("latin-1")
            own = urllib.parse.urlsplit(origin).netloc.lower() == host.lower()
            if not own and origin not in c.allowed_origins and "*" not in c.allowed_origins:
                return await _send_error(send, APIError(
                    403, f"cross-origin request from {origin!r} refused (serve --allowed-origins allows one)",
                    type="permission_error", code="origin_not_allowed"))
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_error(send, APIError(400, "invalid Content-Length header"))
            if int(length) > c.max_body_bytes:
                return await _send_error(send, _too_large(c.max_body_bytes))
        seen, done = 0, False
        deadline = time.monotonic() + c.body_timeout

        async def limited():
            nonlocal seen, done
            if done:  # the body is in: what follows is the disconnect, which may take as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTimeout() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > c.max_body_bytes:
                    raise BodyTooLarge()
                done = not message.get("more_body", False)
            else:
                done = True
            return message
        await self.app(scope, limited, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit:,} bytes",
                    code="request_too_large")


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _State:
    """The model and its scheduler, loaded at startup (in a thread when a loader is given)."""

    def __init__(self, config: ServerConfig, pipe, loader: Callable[[], Any] | None) -> None:
        self.config = config
        self.pipe = pipe
        self.loader = loader
        self.scheduler: Scheduler | None = None
        self.error: str | None = None
        self.can_encode = self.can_decode = False
        self.cleanup: Callable[[], None] | None = None
        self.warm_up: dict | None = None
        self.on_failure: Callable[[str], None] | None = None  # serve: the model failed to load -> exit

    def start(self) -> None:
        if self.pipe is not None:
            self._prepare()
        else:
            threading.Thread(target=self._load, name="llada2uni-load", daemon=True).start()

    def _load(self) -> None:
        try:
            loaded = self.loader()
            self.pipe, self.cleanup = loaded if isinstance(loaded, tuple) else (loaded, None)
            self._prepare()
        except Exception as e:  # noqa: BLE001 - reported by /health and /ready, then serve exits
            log.error("loading the model failed: %s: %s", type(e).__name__, e)
            log.debug("the load's traceback", exc_info=True)
            self.error = f"{type(e).__name__}: {e}"
            if self.on_failure is not None:
                self.on_failure(self.error)

    def _prepare(self) -> None:
        """Load the image side now, so that the first request does not pay for it."""
        for attr, flag in (("image_tokenizer", "can_encode"), ("image_decoder", "can_decode")):
            try:
                getattr(self.pipe, attr)
                setattr(self, flag, True)
            except Exception as e:  # noqa: BLE001 - a backbone-only checkpoint serves text
                log.warning("no %s: %s (image %s requests will be refused)", attr, e,
                            "input" if attr == "image_tokenizer" else "output")
        c = self.config
        if c.warm_up:
            from ..runtime import warm_up
            w, h = parse_size(c.default_size, max_side=c.max_side, param="default_size")
            log.info("warming up the fast path (compile and CUDA-graph capture)")
            # every row bucket a full batch reaches: CFG gives an image request two rows; the image
            # canvas's steps even without a decoder (response_format "tokens" needs none)
            self.warm_up = warm_up(self.pipe, max_rows=2 * c.max_batch, size=(h, w),
                                   text_tokens=c.default_max_tokens)
            if self.warm_up:
                log.info("warm-up done in %.1f s", self.warm_up["seconds"])
        self.scheduler = Scheduler(self.pipe, SchedulerConfig(max_batch=c.max_batch, max_queue=c.max_queue,
                                                              request_timeout=c.request_timeout,
                                                              batch_linger_s=c.batch_linger_s)).start()

    def begin_shutdown(self) -> None:
        """A shutdown signal: waiting requests answer 503 now, new ones too; running ones go on."""
        if self.scheduler is not None:
            ended = self.scheduler.drain()
            log.info("shutting down: %d waiting request(s) answered 503; running ones get up to %g s",
                     ended, self.config.shutdown_timeout)

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.cleanup is not None:
            self.cleanup()

    def ready(self) -> tuple[Any, Scheduler]:
        if self.scheduler is None:
            if self.error:
                raise APIError(503, f"the model failed to load: {self.error}", type="server_error")
            raise APIError(503, "the model is still loading; retry shortly", type="service_unavailable",
                           headers={"Retry-After": "5"})
        return self.pipe, self.scheduler


def create_app(config: ServerConfig | None = None, *, pipe=None, loader: Callable[[], Any] | None = None) -> FastAPI:
    """The app serving ``pipe`` (loaded) or what ``loader()`` returns (a pipe, or (pipe, cleanup))."""
    if (pipe is None) == (loader is None):
        raise ValueError("pass exactly one of pipe and loader")
    config = config or ServerConfig()
    parse_size(config.default_size, max_side=config.max_side, param="default_size")
    state = _State(config, pipe, loader)

    @asynccontextmanager
    async def lifespan(app):
        state.start()
        yield
        state.stop()
        fetch_pool.shutdown(wait=False)

    app = FastAPI(title="llada2uni", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llada2uni = state
    app.add_middleware(_Guard, config=config)
    # remote image fetches wait on other servers: their own threads, so that they cannot hold up the
    # default pool that decodes uploads
    fetch_pool = ThreadPoolExecutor(max_workers=max(1, config.remote_fetches), thread_name_prefix="llada2uni-fetch")

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request, e):
        return _error_response(_too_large(config.max_body_bytes))

    @app.exception_handler(BodyTimeout)
    async def _body_timeout(request, e):
        log.info("%s: the request body did not arrive within %g s", request.url.path, config.body_timeout)
        return _error_response(APIError(408, f"the request body did not arrive within {config.body_timeout:g} s",
                                        code="request_timeout", headers={"Connection": "close"}))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request, e):  # the client left mid-upload: nobody to answer, nothing to log loudly
        log.debug("%s: the client disconnected before its request was read", request.url.path)
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return _error_response(APIError(e.status_code, message, type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return _error_response(APIError(400, str(e)))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.error("unhandled error on %s", request.url.path, exc_info=e)
        return _error_response(APIError(500, f"internal server error ({type(e).__name__})", type="server_error"))

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           type="authentication_error", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorize)]

    # ---- liveness, readiness, models, page ----

    @app.get("/health")
    async def health():
        if state.error:  # the model failed to load: not healthy (serve exits too)
            return JSONResponse({"status": "failed", "error": state.error}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.scheduler is None:
            status = "failed" if state.error else "loading"
            return JSONResponse({"status": status, "error": state.error}, status_code=503,
                                headers={"Retry-After": "5"})
        return {"status": "ready", "model": config.model_id, "device": str(state.pipe.device),
                "image_input": state.can_encode,
                "image_output": state.can_decode, "warm_up": state.warm_up or None,
                "scheduler": state.scheduler.stats()}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": 0,
                                            "owned_by": "llada2uni"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    # ---- helpers ----

    def admit(task: Callable, *, stream: bool):
        """Admit a job; for streaming, also return the asyncio queue its events arrive on."""
        _, scheduler = state.ready()
        events = None
        on_event = None
        if stream:
            loop = asyncio.get_running_loop()
            events = asyncio.Queue()
            on_event = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ("event", ev))  # noqa: E731
        try:
            job = scheduler.submit(task, on_event=on_event)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", type="service_unavailable") from None
        if stream:
            job.future.add_done_callback(
                lambda f: loop.call_soon_threadsafe(events.put_nowait, ("done", None)))
        return job, events

    def job_error(e: BaseException) -> APIError:
        if isinstance(e, JobTimeout):
            return APIError(504, str(e), type="timeout", code="request_timeout")
        if isinstance(e, ShuttingDown):
            return APIError(503, str(e), type="service_unavailable")
        if isinstance(e, Cancelled):
            return APIError(499, f"request cancelled: {e}", code="cancelled")
        if isinstance(e, ValueError):  # the pipeline's validation (TokenError, ImageInputError, ...)
            return APIError(400, str(e))
        log.error("request failed", exc_info=e)
        return APIError(500, f"the request failed inside the model worker ({type(e).__name__}); "
                        "the server is still running", type="server_error")

    async def result_of(request: Request, job) -> Any:
        """The job's result; cancels the job when the client disconnects while it waits."""
        fut = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.1)
            if done:
                break
            if await request.is_disconnected():
                job.cancel("client disconnected")
                break
        try:
            return await fut
        except Exception as e:  # noqa: BLE001
            raise job_error(e) from None

    def sse(job, events: asyncio.Queue, progress: Callable[[dict], dict], finish: Callable[[Any], list[dict]],
            first: list[dict] = ()) -> StreamingResponse:
        async def stream():
            try:
                for chunk in first:
                    yield _sse_line(chunk)
                while True:
                    try:
                        kind, event = await asyncio.wait_for(events.get(), timeout=10)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if kind == "done":
                        break
                    chunk = progress(event)
                    if chunk is not None:  # None: an event with nothing new to send
                        yield _sse_line(chunk)
                try:
                    result = job.future.result()
                except Exception as e:  # noqa: BLE001 - the status is sent already: the error is an event
                    yield _sse_line(job_error(e).body())
                else:
                    for chunk in finish(result):
                        yield _sse_line(chunk)
                yield "data: [DONE]\n\n"
            finally:
                if not job.future.done():
                    job.cancel("client disconnected")
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def read_picture(data: bytes, name: str, param: str) -> tasks.Picture:
        from ..preprocess import ImageInputError, load_image
        try:
            image = await asyncio.to_thread(load_image, data, max_pixels=config.max_image_pixels)
        except ImageInputError as e:
            raise APIError(400, f"{param} ({name}): {e}", param=param, code="invalid_image") from None
        return tasks.Picture(image, name)

    async def fetch_remote(url: str, param: str) -> bytes:
        from .net import FetchError, fetch_image
        fetch = partial(fetch_image, url, max_bytes=config.max_body_bytes, deadline_s=config.remote_timeout,
                        allow_private=config.remote_allow_private)
        try:
            return await asyncio.get_running_loop().run_in_executor(fetch_pool, fetch)
        except FetchError as e:
            raise APIError(400, f"{param}: cannot fetch the image: {e}", param=param) from None
        except Exception as e:  # noqa: BLE001 - details (ports, addresses) stay in the log
            log.info("fetching %s failed: %s: %s", url, type(e).__name__, e)
            raise APIError(400, f"{param}: cannot fetch the image", param=param) from None

    def image_items(results: list[dict], fmt: str) -> list[dict]:
        items = []
        for r in results:
            item = ({"b64_json": base64.b64encode(r["png"]).decode()} if fmt == "b64_json" else
                    {"token_ids": r["token_ids"], "h": r["h"], "w": r["w"]})
            if "thinking" in r:
                item["thinking"] = r["thinking"]
            items.append(item)
        return items

    def pixel_size(result: dict) -> str:
        return f"{result['w'] * 32}x{result['h'] * 32}"  # decoded at resolution multiplier 2

    def check_output(fmt: str, n: int) -> None:
        if fmt == "url":
            raise APIError(400, "response_format 'url' is not supported (this server stores no files); "
                           "use 'b64_json'", param="response_format")
        if fmt not in ("b64_json", _TOKEN_FORMAT):
            raise APIError(400, f"response_format must be 'b64_json' or '{_TOKEN_FORMAT}', got {fmt!r}",
                           param="response_format")
        if fmt == "b64_json" and not state.can_decode:
            raise APIError(400, "this checkpoint has no image decoder; use response_format "
                           f"'{_TOKEN_FORMAT}' for the image codes", param="response_format")
        if n > config.max_n:
            raise APIError(400, f"n: at most {config.max_n} images per request, got {n}", param="n")

    def decode_mode(mode: str) -> str:
        return "turbo" if mode == "decoder-turbo" else mode

    def image_sse(job, events, kind: str, fmt: str) -> StreamingResponse:
        def progress(ev):
            if ev.get("stage") == "text":  # a thinking trace's committed ids: not part of image streams
                return None
            return {"type": f"{kind}.progress", **ev}

        def finish(results):
            created = int(time.time())
            return [{"type": f"{kind}.completed", "index": i, "created": created, "size": pixel_size(r),
                     "output_format": "png" if fmt == "b64_json" else fmt, **item}
                    for i, (r, item) in enumerate(zip(results, image_items(results, fmt)))]
        return sse(job, events, progress, finish)

    # ---- images ----

    def require_json(request: Request) -> None:
        """JSON routes take only application/json: a form or text/plain POST from another site's page
        (which needs no CORS preflight) is refused before it is read."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(415, f"send the request body as JSON with 'Content-Type: application/json' "
                           f"(got {kind or 'no content type'!r})", code="unsupported_media_type")

    async def json_body(request: Request, model, precheck: Callable[[bytes], None] | None = None):
        """The body as ``model``, parsed off the event loop (a large body must not hold up /health and
        the other requests); ``precheck(raw)`` may refuse it before it is parsed."""
        require_json(request)
        raw = await request.body()
        if precheck is not None:
            precheck(raw)
        return await asyncio.to_thread(parse_json, model, raw)

    def few_messages(raw: bytes) -> None:
        # every message has a "role" key, so far more of those than the message limit is refused
        # unparsed (900,000 tiny messages cost seconds and a GB of objects to validate; the x4 leaves
        # room for the word inside texts, where it is escaped anyway)
        if raw.count(b'"role"') > 4 * config.max_messages:
            raise APIError(400, f"messages: at most {config.max_messages} per request", param="messages",
                           code="too_many_messages")

    @app.post("/v1/images/generations", dependencies=auth)
    async def images_generations(request: Request):
        state.ready()
        body = await json_body(request, ImageGenerationBody)
        check_output(body.response_format, body.n)
        width, height = parse_size(config.default_size if body.size is None else body.size, max_side=config.max_side)
        task = partial(tasks.text_to_image, pipe=state.pipe, prompt=body.prompt, width=width, height=height,
                       n=body.n, steps=body.steps, cfg_scale=body.cfg_scale, mode=body.mode, seed=body.seed,
                       decode=body.response_format == "b64_json", decode_mode=decode_mode(body.decode_mode),
                       decoder_steps=body.decoder_steps, thinking_steps=body.thinking_steps,
                       thinking_max_tokens=body.thinking_max_tokens, temperature=body.temperature)
        job, events = admit(task, stream=body.stream)
        if body.stream:
            return image_sse(job, events, "image_generation", body.response_format)
        results = await result_of(request, job)
        return {"created": int(time.time()), "data": image_items(results, body.response_format),
                "size": f"{width}x{height}", "output_format": "png" if body.response_format == "b64_json"
                else _TOKEN_FORMAT}

    @app.post("/v1/images/edits", dependencies=auth)
    async def images_edits(request: Request):
        state.ready()
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "send edits as multipart/form-data with 'image' file(s) and a 'prompt' field")
        try:
            form = await request.form(max_files=config.max_images + 1, max_fields=64)
        except MultiPartException as e:
            raise APIError(400, f"malformed multipart body: {e.message}") from None
        if "mask" in form:
            raise APIError(400, "mask is not supported: describe the region to change in the prompt",
                           param="mask")
        uploads, fields = [], {}
        for key, value in form.multi_items():
            if key in ("image", "image[]"):
                if not isinstance(value, UploadFile):
                    raise APIError(400, "image must be a file upload (no paths or URLs)", param="image")
                uploads.append(value)
            elif isinstance(value, str):
                fields[key] = value
        body = parse_form(ImageEditBody, fields)
        if not uploads:
            raise APIError(400, "missing required field 'image' (one or more image files)", param="image")
        if len(uploads) > config.max_images:
            raise APIError(400, f"image: at most {config.max_images} images per request, got {len(uploads)}",
                           param="image")
        if not state.can_encode:
            raise APIError(400, "this checkpoint has no image tokenizer: editing is unavailable")
        check_output(body.response_format, body.n)
        grid = None
        if body.size is not None:
            w, h = parse_size(body.size, max_side=config.max_side)
            grid = (h // 32, w // 32)
        pictures = [await read_picture(await f.read(), f.filename or f"image {i}", f"image[{i}]")
                    for i, f in enumerate(uploads)]
        task = partial(tasks.edit, pipe=state.pipe, pictures=pictures, prompt=body.prompt, n=body.n, grid=grid,
                       steps=body.steps, cfg_text_scale=body.cfg_text_scale, cfg_image_scale=body.cfg_image_scale,
                       seed=body.seed, decode=body.response_format == "b64_json",
                       decode_mode=decode_mode(body.decode_mode), decoder_steps=body.decoder_steps,
                       temperature=body.temperature)
        job, events = admit(task, stream=body.stream)
        if body.stream:
            return image_sse(job, events, "image_edit", body.response_format)
        results = await result_of(request, job)
        return {"created": int(time.time()), "data": image_items(results, body.response_format),
                "size": pixel_size(results[0]),
                "output_format": "png" if body.response_format == "b64_json" else _TOKEN_FORMAT}

    # ---- chat ----

    async def chat_messages(body: ChatBody) -> list[dict]:
        """OpenAI messages -> the tasks' messages: text parts and decoded, checked pictures. The text's
        size is checked first: nothing is tokenised (in the model worker, holding it) unless it is
        within the limits."""
        if len(body.messages) > config.max_messages:
            raise APIError(400, f"messages: at most {config.max_messages} per request, got {len(body.messages)}",
                           param="messages", code="too_many_messages")
        chars = sum(len(m.content) if isinstance(m.content, str) else
                    sum(len(p.text) for p in m.content if p.type == "text") for m in body.messages)
        if chars > config.max_chat_chars:
            raise APIError(400, f"messages: {chars:,} characters of text; this server takes at most "
                           f"{config.max_chat_chars:,} per request", param="messages", code="context_length_exceeded")
        out, count = [], 0
        for i, m in enumerate(body.messages):
            if isinstance(m.content, str):
                out.append({"role": m.role, "content": m.content})
                continue
            parts = []
            for j, part in enumerate(m.content):
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                    continue
                param = f"messages.{i}.content.{j}.image_url"
                count += 1
                if count > config.max_images:
                    raise APIError(400, f"at most {config.max_images} images per request", param=param)
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                if url.startswith("data:"):
                    data = data_uri_bytes(url, param)
                elif url.startswith(("http://", "https://")):
                    if not config.allow_remote_images:
                        raise APIError(400, f"{param}: remote image URLs are disabled on this server; send a "
                                       "base64 data URI", param=param)
                    data = await fetch_remote(url, param)
                else:
                    raise APIError(400, f"{param}: expected a base64 data URI (file paths are not accepted)",
                                   param=param)
                parts.append({"type": "picture", "picture": await read_picture(data, f"image {count}", param)})
            out.append({"role": m.role, "content": parts})
        if count and not state.can_encode:
            raise APIError(400, "this checkpoint has no image tokenizer: image inputs are unavailable")
        return out

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request):
        state.ready()
        body = await json_body(request, ChatBody, precheck=few_messages)
        messages = await chat_messages(body)
        chat_id = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        head = {"id": chat_id, "created": created, "model": config.model_id}
        if "image" in body.modalities:
            return await chat_image(request, body, messages, head)
        max_tokens = body.max_completion_tokens or body.max_tokens or config.default_max_tokens
        if max_tokens > config.max_tokens:
            raise APIError(400, f"max_tokens: at most {config.max_tokens}, got {max_tokens}", param="max_tokens")
        task = partial(tasks.chat, pipe=state.pipe, messages=messages, max_tokens=max_tokens, steps=body.steps,
                       threshold=body.threshold, temperature=body.temperature, seed=body.seed)
        job, events = admit(task, stream=body.stream)
        if body.stream:
            sent = [""]  # text already streamed: committed blocks, decoded as they finish

            def progress(ev):
                if ev.get("stage") != "text":
                    return _chunk(head, {}, progress=ev)
                # a block can end inside a multi-byte character: hold the partial character back
                now = state.pipe.tokens.decode(ev["ids"]).rstrip("\ufffd")
                if len(now) <= len(sent[0]) or not now.startswith(sent[0]):
                    return None
                delta, sent[0] = now[len(sent[0]):], now
                return _chunk(head, {"content": delta})

            def finish(result):
                text = result["text"]
                if text.startswith(sent[0]):
                    rest = [text[len(sent[0]):]] if len(text) > len(sent[0]) else []
                else:  # cannot happen with a prefix-stable decode; never drop text
                    log.warning("streamed text diverged from the answer; sending the answer's tail")
                    rest = [text[len(sent[0]):]]
                return ([_chunk(head, {"content": c}) for c in rest] +
                        [_chunk(head, {}, result["finish_reason"], usage=result["usage"])])
            return sse(job, events, progress, finish,
                       first=[_chunk(head, {"role": "assistant", "content": ""})])
        result = await result_of(request, job)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": result["finish_reason"]}],
                "usage": result["usage"]}

    async def chat_image(request: Request, body: ChatBody, messages: list[dict], head: dict):
        """modalities ["image"]: the last user message's text is the prompt; its images make it an edit."""
        opts = body.image_generation or ImageOptions()
        last = next((m for m in reversed(messages) if m["role"] == "user"), None)
        if last is None:
            raise APIError(400, "image generation needs a user message", param="messages")
        content = last["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        prompt = "".join(p["text"] for p in parts if p["type"] == "text")
        pictures = [p["picture"] for p in parts if p["type"] == "picture"]
        if not prompt.strip():
            raise APIError(400, "image generation needs text in the last user message", param="messages")
        if not state.can_decode:
            raise APIError(400, "this checkpoint has no image decoder: image output is unavailable")
        seed = opts.seed if opts.seed is not None else body.seed
        if opts.size is not None:
            width, height = parse_size(opts.size, max_side=config.max_side, param="image_generation.size")
        elif opts.image_h is not None or opts.image_w is not None:
            default_w, default_h = parse_size(config.default_size, max_side=config.max_side)
            height = default_h if opts.image_h is None else opts.image_h
            width = default_w if opts.image_w is None else opts.image_w
            check_sides(width, height, max_side=config.max_side, param="image_generation.image_h/image_w")
        else:
            width, height = parse_size(config.default_size, max_side=config.max_side)
        steps = opts.dllm_steps if opts.dllm_steps is not None else (8 if pictures else 16)
        common = dict(pipe=state.pipe, prompt=prompt, n=1, steps=steps, seed=seed, decode=True,
                      decode_mode=decode_mode(opts.decode_mode), decoder_steps=opts.decoder_steps,
                      temperature=body.temperature)
        if pictures:
            explicit = opts.size is not None or opts.image_h is not None or opts.image_w is not None
            task = partial(tasks.edit, pictures=pictures, grid=(height // 32, width // 32) if explicit else None,
                           cfg_text_scale=opts.cfg_text_scale, cfg_image_scale=opts.cfg_image_scale, **common)
        else:
            task = partial(tasks.text_to_image, width=width, height=height, cfg_scale=opts.cfg_scale,
                           mode=opts.mode, **common)
        job, events = admit(task, stream=body.stream)

        def message(results) -> dict:
            r = results[0]
            url = "data:image/png;base64," + base64.b64encode(r["png"]).decode()
            return {"content": r.get("thinking", ""), "images": [{"type": "image_url", "image_url": {"url": url}}]}
        if body.stream:
            return sse(job, events, lambda ev: None if ev.get("stage") == "text" else _chunk(head, {}, progress=ev),
                       lambda results: [_chunk(head, message(results)), _chunk(head, {}, "stop")],
                       first=[_chunk(head, {"role": "assistant", "content": ""})])
        results = await result_of(request, job)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", **message(results)},
                             "finish_reason": "stop"}]}

    return app


def _sse_line(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _chunk(head: dict, delta: dict, finish: str | None = None, **extra) -> dict:
    """One chat.completion.chunk (extra: this server's ``progress`` and the final ``usage``)."""
    return {**head, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
