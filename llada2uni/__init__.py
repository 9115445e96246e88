"""llada2uni: a fast, faithful implementation of LLaDA2.0-Uni."""

from __future__ import annotations

import importlib

# Loaded on first use: ``import llada2uni`` (and ``llada2uni --help``) must not pay for torch.
_EXPORTS = {"LLaDA2Uni": ".pipeline", "Sprint": ".sampling.sprint", "make_tiny": ".tiny", "make_random": ".weights"}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llada2uni' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
