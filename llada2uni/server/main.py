"""``llada2uni serve``: load the model once, then run the app under uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
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


def serve(args) -> int:
    try:
        import uvicorn

        from .app import ServerConfig, create_app
    except ImportError as e:
        raise SystemExit(f"error: the server needs the [server] extra ({e.name} is missing): "
                         "pip install 'llada2uni[server]'") from None
    api_key = args.api_key or os.environ.get("LLADA2UNI_API_KEY") or None
    if not _is_loopback(args.host) and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    model_id = args.served_model_name or ("llada2uni-tiny" if args.model == "tiny" else
                                          Path(args.model.rstrip("/")).name)
    config = ServerConfig(model_id=model_id, api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                          batch_linger_s=args.batch_linger_ms / 1e3,
                          request_timeout=args.request_timeout, max_body_bytes=int(args.max_body_mb * 2 ** 20),
                          max_image_pixels=args.max_image_pixels, default_size=args.default_size,
                          allow_remote_images=args.allow_remote_images,
                          warm_up=getattr(args, "warm_up", True))
    app = create_app(config, loader=partial(load_model, args.model, device=args.device, dtype=args.dtype,
                                            low_memory=args.low_memory, quant=getattr(args, "quant", None),
                                            decoder_quant=getattr(args, "decoder_quant", None),
                                            memory=getattr(args, "memory", None)))
    print(f"llada2uni: serving {model_id} on http://{args.host}:{args.port}/ (model loading; GET /ready)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0
