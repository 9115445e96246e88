"""Pure schedules for the samplers."""

from __future__ import annotations


def tokens_per_step(block_length: int, steps: int) -> list[int]:
    """How many masked positions of one block to commit at each denoising step (sums to block_length).

    steps is clamped to [1, block_length]: a step beyond block_length would be scheduled to commit
    0 tokens (a wasted forward), and at least one step is needed to fill the block (SGLang clamps
    the same way, spec 5.1).
    """
    steps = max(1, min(steps, block_length))
    base, extra = divmod(block_length, steps)
    return [base + (i < extra) for i in range(steps)]
