"""SPRINT, the model's training-free speed-up (spec 6), as options of the one block loop.

No SPRINT source is public; the model card documents its knobs and their intent, the rest is inferred
and marked INFERRED where it is decided. This module holds the parameters and the pure pieces: the
adaptive per-step count, the prefix-importance score and the per-modality choice of kept keys. The
loop in ``block.py`` drives them; the KV cache (``models/cache.py``) does the probing and gathering
through the duck-typed methods listed in ``PrunableCache``.

What is exact and what approximates (see docs/sprint.md):
* Completed blocks: their KV is always computed with full attention, in the first forward of the
  next block (as in the baseline), so reusing it is exact.
* Pruning: after the warm-up steps of a block, its queries attend to a kept subset of the completed
  prefix only: an approximation that keep ratios of 1.0 turn off.
* The block holding the prompt tail: after warm-up, the prompt-tail tokens of that block stop being
  recomputed; their KV is frozen at the last warm-up step, so they no longer see tokens committed
  later in their block. The next block's first forward recomputes them exactly.

Choices no source states (INFERRED, each also noted where it is made):
* Reuse and pruning restart with every block: warm-up steps, then a kept set chosen from that
  block's own attention.
* Importance of a prefix key = the attention probability the block's generated positions (masked
  or already committed) give it, averaged over all layers, heads, those queries and the warm-up
  forwards; divided by the row maximum; blended as alpha * confidence + (1 - alpha) * attention.
* Confidence of a prefix token: its top-1 probability when it was committed; prompt tokens 1.0.
* The per-modality ratios always apply (None -> keep_ratio); ceil(ratio * n) per modality; ties to
  the earlier position; pads are never kept; the frozen prompt tail is never pruned.
* cache_warmup_steps below 1 acts as 1; the threshold tests the top-1 probability whatever the
  ranking; SPRINT state is per row, and rows that keep fewer keys are padded with invisible keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

STRATEGIES = ("low_confidence", "top_k_margin", "neg_entropy")


@dataclass(frozen=True)
class Sprint:
    """SPRINT parameters of one ``generate`` call (spec 6.2).

    Defaults are the values SGLang-Omni passes to the remote-code ``generate_image`` (keep_ratio 0.7,
    cache_warmup_steps 2, confidence_alpha 0.5, remasking "low_confidence"); the model card's
    understanding example uses keep_ratio 0.5, cache_warmup_steps 1, image/text_keep_ratio 1.0 and
    threshold 0.93. Whether these equal the remote code's signature defaults is unknown.
    The acceptance threshold is the request's ``threshold``, the same knob as the baseline's.

    keep_ratio: fraction of the completed prefix kept per modality after warm-up; image_keep_ratio /
        text_keep_ratio override it for image ids (>= the image offset) and text ids; None falls back
        to keep_ratio (INFERRED).
    cache_warmup_steps: steps of each block run against the full prefix (they also measure the
        importance used for pruning); afterwards the pruned prefix is used. Values below 1 act as 1:
        the first forward of a block writes the previous block's final KV and needs the full prefix.
    confidence_alpha: weight of token confidence in the importance score, 1 - alpha weighs attention
        (INFERRED from the name; spec 6.3 writes the opposite; the default 0.5 is the same either way).
    remasking: confidence used to rank positions for the adaptive top-k (spec 5.2).
    """

    use: bool = True
    keep_ratio: float = 0.7
    image_keep_ratio: float | None = None
    text_keep_ratio: float | None = None
    cache_warmup_steps: int = 2
    confidence_alpha: float = 0.5
    remasking: str = "low_confidence"

    def __post_init__(self):
        for name in ("keep_ratio", "image_keep_ratio", "text_keep_ratio", "confidence_alpha"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"SPRINT {name} must lie in [0, 1], got {value}")
        if self.cache_warmup_steps < 0:
            raise ValueError(f"SPRINT cache_warmup_steps must be >= 0, got {self.cache_warmup_steps}")
        if self.remasking not in STRATEGIES:
            raise ValueError(f"SPRINT remasking must be one of {STRATEGIES}, got {self.remasking!r}")

    @property
    def image_ratio(self) -> float:
        return self.keep_ratio if self.image_keep_ratio is None else self.image_keep_ratio

    @property
    def text_ratio(self) -> float:
        return self.keep_ratio if self.text_keep_ratio is None else self.text_keep_ratio

    @property
    def warmup(self) -> int:
        return max(1, self.cache_warmup_steps)

    @property
    def prunes(self) -> bool:
        return min(self.image_ratio, self.text_ratio) < 1.0


@dataclass
class PruneStats:
    """What one block's pruning kept, per stacked row (rows of finished requests keep nothing)."""

    block: int
    text_kept: list[int]
    text_total: list[int]
    image_kept: list[int]
    image_total: list[int]


class PrunableCache(Protocol):
    """The KV-cache methods SPRINT's prefix reuse and pruning need (``models.cache.KVCache``)."""

    def begin_probe(self, queries: Tensor, num_keys: int) -> None:
        """Accumulate, over the next forwards, the attention mass that the last queries.shape[1]
        window positions (those with queries[r, t] True) give to keys [0, num_keys)."""

    def end_probe(self) -> Tensor:
        """Stop probing; mean attention probability per key [R, num_keys] fp32."""

    def set_view(self, start: int, end: int, keep: Tensor | None, frozen: Tensor | None) -> None:
        """From now on the window is [start, end): its queries see the prefix keys with keep[r, j]
        True (all of [0, start) if keep is None), at their original positions, plus the window;
        window columns with frozen[r, t] True keep their cached KV instead of being written."""

    def clear_view(self) -> None:
        """Back to the plain cache: keys [0, end) as written."""


def supports(guidance_kind: str) -> bool:
    """SPRINT works without CFG and with simple CFG; editing CFG falls back to the baseline (spec 6.1)."""
    return guidance_kind != "edit"


def adaptive_k(masked_left: Tensor, steps: int, step: int) -> Tensor:
    """k = ceil(masked_left / steps_left) (spec 6.1): with a fixed number of steps per block the block
    still finishes in time, but the count follows what is left instead of a fixed schedule."""
    steps_left = max(steps - step, 1)
    return (masked_left + steps_left - 1) // steps_left


def importance(attn: Tensor, conf: Tensor, candidate: Tensor, alpha: float) -> Tensor:
    """Blend attention received and token confidence into one score per prefix key (INFERRED).

    attn [R, N] (mean attention probability from the active block), conf [R, N] in [0, 1],
    candidate [R, N] bool. Attention is normalised by its row maximum over the candidates so that
    both terms span [0, 1] before blending: raw attention mass is O(1/N) and would otherwise be
    swamped by confidence.
    """
    attn = attn.masked_fill(~candidate, 0.0)
    top = attn.amax(-1, keepdim=True)
    attn = torch.where(top > 0, attn / top.clamp_min(torch.finfo(attn.dtype).tiny), 0.0)
    return alpha * conf + (1.0 - alpha) * attn


def keep_count(n: Tensor, ratio: float) -> Tensor:
    """ceil(ratio * n) per row, robust to float error (0.7 * 10 must give 7, not 8)."""
    return torch.ceil(n.double() * ratio - 1e-9).clamp_min(0).long()


def _top_fraction(score: Tensor, member: Tensor, ratio: float) -> Tensor:
    """The ceil(ratio * n) highest-scoring members of each row; ties to the lower position."""
    k = keep_count(member.sum(-1), ratio)  # [R]
    order = torch.sort(score.masked_fill(~member, float("-inf")), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return member & (rank < k[:, None])


def select_kept(score: Tensor, candidate: Tensor, is_image: Tensor, image_ratio: float,
                text_ratio: float) -> Tensor:
    """Keep ceil(ratio * n_modality) of each row's candidate keys per modality, by score (INFERRED:
    the per-modality ratios always apply; a None override was already replaced by keep_ratio).
    score/candidate/is_image [R, N] -> keep [R, N] bool."""
    image, text = candidate & is_image, candidate & ~is_image
    return _top_fraction(score, image, image_ratio) | _top_fraction(score, text, text_ratio)


def prune_stats(block: int, keep: Tensor, candidate: Tensor, is_image: Tensor) -> PruneStats:
    def count(t: Tensor) -> list[int]:
        return t.sum(-1).tolist()
    return PruneStats(block, count(keep & ~is_image), count(candidate & ~is_image),
                      count(keep & is_image), count(candidate & is_image))
