"""``llada2uni serve``: load the model once, then run the app under uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

log = logging.getLogger(__name__)


def load_model(model: str, *, device: str | None = None, dtype: str | None = None, low_memory: bool = False,
               quant: str | None = None, decoder_quant: str | None = None, memory: str | None = None):
    """``model``: a checkpoint folder, a Hub repo id, or ``tiny`` (a tiny random checkpoint made now,
    on the CPU unless a device is given); ``quant``, ``decoder_quant``, ``memory``: as
    ``LLaDA2Uni.from_pretrained``. Returns (pipe, cleanup)."""
    from ..pipeline import LLaDA2Uni

    cleanup = None
    if model == "tiny":
        from ..tiny import make_tiny
        tmp = tempfile.mkdtemp(prefix="llada2uni-tiny-")
        cleanup = partial(shutil.rmtree, tmp, ignore_errors=True)
        model = str(make_tiny(Path(tmp) / "tiny"))
        device = device or "cpu"
    try:
        pipe = LLaDA2Uni.from_pretrained(model, device=device, dtype=dtype, keep_decoder=not low_memory,
                                         quant=quant, decoder_quant=decoder_quant, memory=memory)
    except BaseException:
        if cleanup:
            cleanup()
        raise
    return pipe, cleanup


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _missing_local_path(model: str) -> bool:
    """A model argument that names a local folder (not 'tiny', not a Hub id like 'org/name') that is
    not there: refused before the server starts."""
    if model == "tiny" or Path(model).exists():
        return False
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model) is not None and not model.startswith(".")
    return not hub_id


def serve(args) -> int:
    try:
        from .app import ServerConfig, create_app
        from .net import Server, uvicorn_config
    except ImportError as e:
        raise SystemExit(f"error: the server needs the [server] extra ({e.name} is missing): "
                         "pip install 'llada2uni[server]'") from None
    if _missing_local_path(args.model):
        raise SystemExit(f"error: model {args.model!r}: no such folder (give a checkpoint folder, a Hugging "
                         "Face repo id like inclusionAI/LLaDA2.0-Uni, or 'tiny')")
    api_key = args.api_key or os.environ.get("LLADA2UNI_API_KEY") or None
    loopback = _is_loopback(args.host)
    if not loopback and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    model_id = args.served_model_name or ("llada2uni-tiny" if args.model == "tiny" else
                                          Path(args.model.rstrip("/")).name)
    hosts = getattr(args, "allowed_hosts", None)
    if hosts:
        allowed_hosts = None if hosts == ["*"] else tuple(h.lower() for h in hosts)
    else:  # a loopback server answers to loopback names only (DNS rebinding); others to any name
        allowed_hosts = ServerConfig.allowed_hosts if loopback else None
    config = ServerConfig(model_id=model_id, api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                          batch_linger_s=args.batch_linger_ms / 1e3,
                          request_timeout=args.request_timeout, max_body_bytes=int(args.max_body_mb * 2 ** 20),
                          max_image_pixels=args.max_image_pixels, default_size=args.default_size,
                          allow_remote_images=args.allow_remote_images,
                          warm_up=getattr(args, "warm_up", True), allowed_hosts=allowed_hosts,
                          allowed_origins=tuple(getattr(args, "allowed_origins", None) or ()),
                          shutdown_timeout=getattr(args, "shutdown_timeout", 30.0))
    app = create_app(config, loader=partial(load_model, args.model, device=args.device, dtype=args.dtype,
                                            low_memory=args.low_memory, quant=getattr(args, "quant", None),
                                            decoder_quant=getattr(args, "decoder_quant", None),
                                            memory=getattr(args, "memory", None)))
    state = app.state.llada2uni
    server = Server(uvicorn_config(app, header_timeout=config.header_timeout, shutdown_timeout=config.shutdown_timeout,
                                   host=args.host, port=args.port, log_level="warning" if args.quiet else "info"),
                    on_exit=state.begin_shutdown)
    failed = []

    def on_failure(error: str) -> None:  # the load failed: nothing to serve, so exit (status 1)
        failed.append(error)
        server.should_exit = True
    state.on_failure = on_failure
    print(f"llada2uni: serving {model_id} on http://{args.host}:{args.port}/ (model loading; GET /ready)",
          flush=True)
    server.run()
    if failed:
        print(f"error: the model failed to load: {failed[0]}", file=sys.stderr)
        return 1
    return 0
