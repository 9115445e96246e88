"""Classifier-free guidance on logits (spec 5.5). Pure; fp32."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("none", "simple", "edit")


def check_scales(**values: float) -> None:
    """Guidance numbers must be finite (nan compares false with everything: unchecked, it turns
    guidance off without a word); ``cfg_rescale`` lies in [0, 1]."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if name == "cfg_rescale" and not 0.0 <= value <= 1.0:
            raise ValueError(f"cfg_rescale must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class Guidance:
    """How a request's CFG rows are combined.

    kind "simple": rows (c, u), g = u + scale (c - u). kind "edit": rows (c, u, n) with
    g = u + text_scale (c - u) + image_scale (u - n); with image_scale == 0 the no-image row is not
    run (its term is exactly 0). rescale > 0 blends in the std-matched g; the official code applies
    0.7 on every text-to-image and editing call.
    """

    kind: str = "none"
    scale: float = 1.0
    text_scale: float = 1.0
    image_scale: float = 0.0
    rescale: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"guidance kind must be one of {KINDS}, got {self.kind!r}")
        check_scales(cfg_scale=self.scale, cfg_text_scale=self.text_scale, cfg_image_scale=self.image_scale,
                     cfg_rescale=self.rescale)

    @property
    def num_rows(self) -> int:
        if self.kind == "none":
            return 1
        if self.kind == "edit" and self.image_scale != 0:
            return 3
        return 2

    def check_rows(self, rows: Tensor) -> None:
        """rows [R, ...]: a clear error when there are fewer CFG rows than this guidance combines."""
        if rows.shape[0] < self.num_rows:
            raise ValueError(f"guidance {self.kind!r} needs {self.num_rows} rows, got {rows.shape[0]}")


# Each formula is evaluated in the official code's order, so that the floats (and therefore near-tied
# argmaxes) are the same. Callers skip guidance at scale 1, where this is c up to rounding.
def cfg_simple(c: Tensor, u: Tensor, scale: float) -> Tensor:
    return u + scale * (c - u)


def cfg_edit(c: Tensor, u: Tensor, n: Tensor, text_scale: float, image_scale: float) -> Tensor:
    # (u - n): u keeps the image and drops the text, n keeps the text and drops the image.
    return u + text_scale * (c - u) + image_scale * (u - n)


def cfg_rescale(g: Tensor, c: Tensor | None, r: float, std_c: Tensor | None = None,
                std_g: Tensor | None = None) -> Tensor:
    """Match g's per-position spread over the vocabulary to c's (unbiased std), blended by r.
    Must run before any vocabulary restriction: the std is over all logits (spec 5.5). ``std_c`` /
    ``std_g`` [..., 1], when given, are those full-vocabulary stds computed elsewhere (from
    ``unmask.VocabMoments``, when g and c hold only a slice of the vocabulary)."""
    if std_c is None:
        std_c = c.std(dim=-1, keepdim=True)
    if std_g is None:
        std_g = g.std(dim=-1, keepdim=True)
    g_r = g * (std_c / (std_g + 1e-6))
    return r * g_r + (1.0 - r) * g


def row_weights(guidance: Guidance) -> list[float]:
    """g as a weighted sum of the request's rows, g = sum_i w_i rows_i (the formulas above expanded):
    the weights that carry g's full-vocabulary moments over from the rows' (``unmask.VocabMoments``)."""
    if guidance.kind == "none":
        return [1.0]
    if guidance.kind == "simple":
        return [guidance.scale, 1.0 - guidance.scale]
    if guidance.num_rows == 3:
        return [guidance.text_scale, 1.0 - guidance.text_scale + guidance.image_scale, -guidance.image_scale]
    return [guidance.text_scale, 1.0 - guidance.text_scale]


def combine(guidance: Guidance, rows: Tensor, stds: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """rows [R, T, V] (0 = conditional, 1 = no-text "u", 2 = no-image "ui") -> guided logits [T, V] fp32.
    ``stds``: the rescale's full-vocabulary (std_c, std_g) when rows hold a slice of the vocabulary."""
    guidance.check_rows(rows)
    rows = rows.float()
    c = rows[0]
    if guidance.kind == "none":
        return c
    if guidance.kind == "simple":
        g = cfg_simple(c, rows[1], guidance.scale)
    elif guidance.num_rows == 3:
        g = cfg_edit(c, rows[1], rows[2], guidance.text_scale, guidance.image_scale)
    else:
        g = cfg_simple(c, rows[1], guidance.text_scale)
    if guidance.rescale > 0:
        g = cfg_rescale(g, c, guidance.rescale, *(stds or ()))
    return g


def cfg_velocity(p: Tensor, n: Tensor, scale: float = 1.0, renorm: bool = True) -> Tensor:
    """CFG on decoder velocities (image spec 8.2): pred = p + scale (p - n), fp32.

    Note the convention: scale 0 is no guidance here (the reference's cfg_scale; its default 1.0
    gives 2p - n), unlike the logits' u + s (c - u). With renorm, a sample whose guided norm exceeds
    ||p|| is scaled back to ||p||; norms are per sample over all non-batch dims (p, n: [B, ...]).
    """
    p, n = p.float(), n.float()
    pred = p + scale * (p - n)
    if not renorm:
        return pred
    dims = tuple(range(1, p.ndim))
    p_norm = torch.linalg.vector_norm(p, dim=dims, keepdim=True)
    pred_norm = torch.linalg.vector_norm(pred, dim=dims, keepdim=True)
    # pred_norm > p_norm >= 0 wherever the factor is used, so the clamp only keeps the other lanes finite.
    factor = torch.where(pred_norm > p_norm, p_norm / pred_norm.clamp_min(torch.finfo(pred.dtype).tiny), 1.0)
    return pred * factor
