"""llada2uni: a fast, faithful implementation of LLaDA2.0-Uni."""

from .pipeline import LLaDA2Uni
from .tiny import make_tiny

__all__ = ["LLaDA2Uni", "make_tiny"]
__version__ = "0.1.0"
