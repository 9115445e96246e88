"""The decoder's flow samplers, time grids and velocity CFG (image spec 8), with mock velocities."""

import math

import pytest
import torch

from llada2uni.sampling.flow import sample_normal, sample_turbo
from llada2uni.sampling.guidance import cfg_velocity
from llada2uni.sampling.schedules import normal_time_grid, turbo_time_grid

SHAPE = (1, 4, 1, 3, 5)  # [B, C, F, H, W] like the decoder's latents


def test_normal_grid_is_the_shifted_linspace():
    grid = normal_time_grid(50)
    assert grid.dtype == torch.float32 and grid.shape == (50,)
    s = [i / 49 for i in range(50)]
    expected = torch.tensor([x / (x + 6 - 6 * x) for x in s], dtype=torch.float64)
    torch.testing.assert_close(grid.double(), expected, rtol=0, atol=3e-7)  # fp32 arithmetic
    assert grid[0] == 0 and grid[-1] == 1 and bool((grid.diff() > 0).all())
    for i, value in ((1, 0.00346), (24, 0.1379), (47, 0.797), (48, 0.8889)):  # spec 8.2 sample values
        assert math.isclose(grid[i].item(), value, abs_tol=5e-4), (i, grid[i].item())
    torch.testing.assert_close(normal_time_grid(2), torch.tensor([0.0, 1.0]))
    # shift 1 is the plain linspace
    torch.testing.assert_close(normal_time_grid(5, shift=1.0), torch.linspace(0, 1, 5))
    with pytest.raises(ValueError, match="num_steps >= 2"):
        normal_time_grid(1)


def test_turbo_grid_is_k_over_n():
    grid = turbo_time_grid(8)
    assert grid.dtype == torch.float32 and grid.shape == (9,)
    assert grid.tolist() == [k / 8 for k in range(9)]
    torch.testing.assert_close(turbo_time_grid(3), torch.linspace(0, 1, 4, dtype=torch.float64).float(),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_steps >= 1"):
        turbo_time_grid(0)


def test_cfg_velocity_is_2p_minus_n_when_not_larger():
    p = torch.randn(2, 4, 1, 3, 5)
    n = p * 1.2  # 2p - n = 0.8 p: smaller than p, so no clamp
    torch.testing.assert_close(cfg_velocity(p, n), 2 * p - n)
    torch.testing.assert_close(cfg_velocity(p, n, scale=0.5), p + 0.5 * (p - n))
    torch.testing.assert_close(cfg_velocity(p, n, scale=0.0), p)


def test_cfg_velocity_clamps_to_the_conditional_norm_per_sample():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(2, 4, 1, 3, 5, generator=gen)
    n = torch.stack([torch.randn(4, 1, 3, 5, generator=gen) * 3, p[1] * 1.5])  # row 0 clamps, row 1 not
    g = cfg_velocity(p, n)
    raw = 2 * p - n
    norm = lambda x: torch.linalg.vector_norm(x.flatten(1), dim=1)  # noqa: E731
    assert norm(raw)[0] > norm(p)[0]
    torch.testing.assert_close(norm(g)[0], norm(p)[0])  # rescaled to ||p||
    torch.testing.assert_close(g[0], raw[0] * norm(p)[0] / norm(raw)[0])  # same direction
    torch.testing.assert_close(g[1], raw[1])  # the other sample is untouched
    torch.testing.assert_close(cfg_velocity(p, n, renorm=False), raw)
    for _ in range(20):
        p, n = torch.randn(3, 8, generator=gen), 4 * torch.randn(3, 8, generator=gen)
        assert bool((norm(cfg_velocity(p, n, scale=3.0)) <= norm(p) * (1 + 1e-6)).all())
    zero = torch.zeros(1, 4)
    assert torch.equal(cfg_velocity(zero, zero), zero)  # no 0/0


class Recorder:
    """velocity_fn mock: a smooth function of x and t; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return (torch.sin(x) * (1 - t.view(-1, *[1] * (x.ndim - 1))) + 0.3).float()


def test_sample_normal_is_plain_euler_on_the_grid():
    grid = normal_time_grid(7)
    x0 = torch.randn(SHAPE)
    fn = Recorder()
    out = sample_normal(fn, x0, grid, cfg_scale=0.0)
    assert len(fn.calls) == 6  # N - 1 evaluations
    x = x0.clone()
    for i, (xc, tc) in enumerate(fn.calls):
        assert tc.dtype == torch.float32 and tc.shape == (1,) and tc.item() == grid[i].item()  # t_0..t_{N-2}
        assert xc.dtype == torch.float32
        torch.testing.assert_close(xc, x)
        x = x + (grid[i + 1] - grid[i]) * (torch.sin(x) * (1 - grid[i]) + 0.3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x)


def test_sample_normal_cfg_batches_both_rows_in_one_call():
    grid = normal_time_grid(4)
    x0 = torch.randn(2, 4, 1, 3, 5)
    calls = []

    def fn(x, t):
        calls.append((x.clone(), t.clone()))
        B = x.shape[0] // 2
        assert torch.equal(x[:B], x[B:]) and torch.equal(t[:B], t[B:])
        return torch.cat([torch.cos(x[:B]), 0.5 * torch.sin(x[B:])])  # (cond, uncond) rows

    out = sample_normal(fn, x0, grid, cfg_scale=1.0)
    assert len(calls) == 3 and all(c[0].shape[0] == 4 for c in calls)
    x = x0.clone()
    for i in range(3):
        x = x + (grid[i + 1] - grid[i]) * cfg_velocity(torch.cos(x), 0.5 * torch.sin(x))
    torch.testing.assert_close(out, x)


def test_sample_normal_progress():
    seen = []
    sample_normal(Recorder(), torch.zeros(SHAPE), normal_time_grid(5), cfg_scale=0.0,
                  progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_sample_turbo_evaluations_and_final_clean_estimate():
    grid = turbo_time_grid(8)
    fn = Recorder()
    out = sample_turbo(fn, torch.randn(SHAPE), grid, torch.Generator().manual_seed(0))
    assert len(fn.calls) == 8
    assert [tc.item() for _, tc in fn.calls] == [k / 8 for k in range(8)]
    assert all(xc.dtype == torch.float64 and tc.dtype == torch.float64 for xc, tc in fn.calls)
    x_last, t_last = fn.calls[-1]
    v_last = (torch.sin(x_last) * (1 - t_last.view(-1, 1, 1, 1, 1)) + 0.3).float().double()
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x_last + (1 - 7 / 8) * v_last, rtol=0, atol=0)


def test_sample_turbo_renoises_from_the_clean_estimate():
    grid = turbo_time_grid(2)  # 0, 1/2, 1
    x0 = torch.randn(SHAPE)
    fn = Recorder()
    sample_turbo(fn, x0, grid, torch.Generator().manual_seed(7))
    eps = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x = x0.double()
    x1 = x + 1.0 * (torch.sin(x) + 0.3).float().double()
    torch.testing.assert_close(fn.calls[1][0], 0.5 * x1 + 0.5 * eps, rtol=0, atol=0)


def test_sample_turbo_is_reproducible_by_seed():
    x0 = torch.randn(SHAPE)
    run = lambda seed: sample_turbo(Recorder(), x0, turbo_time_grid(8), torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
