"""HTTP server for LLaDA2.0-Uni: an OpenAI-compatible API and a web page, over one batching scheduler.

``llada2uni serve --model PATH_OR_ID`` runs it (needs the ``[server]`` extra: fastapi, uvicorn,
python-multipart). Layout: ``scheduler`` (the model-owning worker, batching, admission, cancellation),
``tasks`` (what one request does), ``protocol`` (request bodies and errors), ``app`` (the routes),
``static/index.html`` (the page). docs/server.md describes the API.
"""

from .main import load_model, serve

__all__ = ["ServerConfig", "create_app", "load_model", "serve"]


def __getattr__(name):  # create_app and ServerConfig import FastAPI: only when asked for
    if name in ("create_app", "ServerConfig"):
        from . import app
        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
