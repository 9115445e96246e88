"""llada2uni: a fast, faithful implementation of LLaDA2.0-Uni."""

from .pipeline import LLaDA2Uni
from .sampling.sprint import Sprint
from .tiny import make_tiny
from .weights import make_random

__all__ = ["LLaDA2Uni", "Sprint", "make_tiny", "make_random"]
__version__ = "0.1.0"
