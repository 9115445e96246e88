"""Pure schedules for the samplers."""

from __future__ import annotations

import torch


def tokens_per_step(block_length: int, steps: int) -> list[int]:
    """How many masked positions of one block to commit at each denoising step (sums to block_length).

    As the official ``_get_num_transfer_tokens``: steps beyond block_length get 0 (such a step still
    commits whatever passes the threshold, but the block is full by step block_length anyway).
    Callers clamp steps to gen_length // minimal_topk first, as the official does.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    base, extra = divmod(block_length, steps)
    return [base + (i < extra) for i in range(steps)]


def normal_time_grid(num_steps: int, shift: float = 6.0) -> torch.Tensor:
    """The normal decoder's flow time grid (image spec 8.2): N points, t = 0 (noise) to 1 (data).

    s = linspace(0, 1, N) in fp32, then the static shift t = s / (s + shift - shift s), evaluated in
    the reference's order so the grid is bit-identical to it. N points give N - 1 Euler steps.
    """
    if num_steps < 2:
        raise ValueError(f"the normal decoder needs num_steps >= 2 (N points, N - 1 steps), got {num_steps}")
    if shift <= 0:
        raise ValueError(f"time shift must be > 0, got {shift}")
    s = torch.linspace(0, 1, num_steps, dtype=torch.float32)
    return s / (s + shift - shift * s)


def turbo_time_grid(num_steps: int) -> torch.Tensor:
    """The turbo decoder's grid (image spec 8.3): linspace(0, 1, N + 1) built in fp64, then cast to
    fp32 as the reference does (it casts to the fp32 noise); no shift. N evaluations at t_0..t_{N-1}."""
    if num_steps < 1:
        raise ValueError(f"the turbo decoder needs num_steps >= 1, got {num_steps}")
    return torch.linspace(0, 1, num_steps + 1, dtype=torch.float64).to(torch.float32)
