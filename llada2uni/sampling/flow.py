"""The image decoder's flow samplers (image spec 8): t = 0 is noise, t = 1 is data, and the model's
velocity points toward the data. Two loops, each one readable function; the model enters as a callable.

velocity_fn(x, t) -> v: x [R, ...] (the state's dtype: fp32 normal, fp64 turbo), t [R] (same dtype);
returns v [R, ...], fp32. The callable casts x and t for the model itself (the reference feeds bf16
latents and fp32 times). With CFG the sampler doubles the batch: rows [0, B) are conditioned and rows
[B, 2B) unconditioned (the caller's callable pairs each row with its conditioning), so one forward
serves both, as in the reference.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .guidance import cfg_velocity

VelocityFn = Callable[[Tensor, Tensor], Tensor]


def sample_normal(
    velocity_fn: VelocityFn,
    x0: Tensor,
    grid: Tensor,
    *,
    cfg_scale: float = 1.0,
    renorm: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Euler ODE integration over ``grid`` (N points -> N - 1 evaluations at t_0..t_{N-2}), fp32 state.

    x0: noise [B, ...]. cfg_scale > 0 guides every step with the norm-clamped p + s (p - n) from one
    doubled forward; cfg_scale == 0 runs the conditioned rows only (the reference's turbo wiring).
    Returns the state at t_{N-1} = 1, fp32.
    """
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"the time grid needs >= 2 points, got shape {list(grid.shape)}")
    x = x0.float()
    grid = grid.to(device=x.device, dtype=torch.float32)
    B, steps = x.shape[0], grid.numel() - 1
    for i in range(steps):
        t = grid[i].expand(B)
        if cfg_scale > 0:
            v = velocity_fn(torch.cat([x, x]), torch.cat([t, t])).float()  # [2B, ...]
            v = cfg_velocity(v[:B], v[B:], cfg_scale, renorm)
        else:
            v = velocity_fn(x, t).float()
        # torchdiffeq's fixed-grid Euler: y + (t1 - t0) f(t0, y), dt taken in the grid's fp32
        x = x + (grid[i + 1] - grid[i]) * v
        if progress is not None:
            progress(i + 1, steps)
    return x


def sample_turbo(
    velocity_fn: VelocityFn,
    x0: Tensor,
    grid: Tensor,
    generator: torch.Generator | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """The distilled decoder's stochastic sampler (spec 8.3): at each grid point t (next t') predict the
    clean latent x1 = x + (1 - t) v, then re-noise x = t' x1 + (1 - t') eps. fp64 state, times and noise.

    The reference draws eps with randn_like from the global RNG; here it comes from ``generator``
    (None: the global one), one draw per step including the last, where it is weighted by 0. With a
    generator on the same device seeded like the reference's global RNG, the streams are identical.
    Returns x1 from the last evaluation, fp64.
    """
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"the time grid needs >= 2 points, got shape {list(grid.shape)}")
    x = x0.to(torch.float64)
    grid = grid.to(device=x.device).to(torch.float64)
    B, steps = x.shape[0], grid.numel() - 1
    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        v = velocity_fn(x, t.expand(B)).to(torch.float64)
        x1 = x + (1 - t) * v
        eps = torch.randn(x.shape, dtype=torch.float64, device=x.device, generator=generator)
        x = t_next * x1 + (1 - t_next) * eps
        if progress is not None:
            progress(i + 1, steps)
    return x
