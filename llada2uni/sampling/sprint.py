"""SPRINT, the model's training-free speed-up, as the official remote code runs it (docs/sprint.md).

The official HF code (``generate_bd`` / ``generate_bd_image``) is the reference; ``tests/test_parity.py``
holds golden ids from it. This module holds the parameters and the pure pieces; the loop in
``block.py`` drives them, and the KV cache (``models/cache.py``) gathers the kept keys.

Per block, with W = ``cache_warmup_steps``:
* steps 0 .. W-1 are ordinary forwards against the full prefix; step W-1 also picks, per layer and
  per row, the prefix keys to keep (W = 0 never picks: the block never prunes);
* steps W .. forward only the block, against the kept prefix keys (all of them visible) and the
  block itself (all of it visible);
* every step commits k = clamp(ceil(masked / steps left), minimal_topk, masked) positions ranked by
  ``remasking``, plus every masked position whose top-1 probability exceeds the threshold.

Which keys a layer keeps (``keep_mask``): importance = the key's L2 norm (post-norm, post-RoPE) mean
over KV heads, normalised by its mean over the prefix and blended with the token's confidence (the
max softmax probability of the raw logits at that position) as alpha * norm + (1 - alpha) * conf.
Text keys are pinned (always kept) when ``text_keep_ratio`` is None or >= 1, image keys when
``image_keep_ratio`` >= 1; other values of the two ratios do nothing. keep = max(int(L * keep_ratio),
pinned) keys (all of them when keep_ratio >= 1 or everything is pinned).

Official quirks reproduced on purpose (each surprising, each kept for token parity):
* Pinning marks pinned keys +inf before the blend; the mean then is +inf, so pinned keys get NaN and
  every unpinned key gets 0 * norm: with any pin, unpinned keys are ranked by confidence ALONE, and
  the NaN keys rank first (as torch.topk ranks NaN).
* The pad keys of a left-padded CFG row are mask-id tokens, so they count as text: pinned by default,
  and visible to the block's queries after warm-up (the warm-up forward hides them, as always).
* Inside the block every key is visible to every query after warm-up, the pads of a padded row too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

STRATEGIES = ("low_confidence", "top_k_margin", "neg_entropy", "random")


@dataclass(frozen=True)
class Sprint:
    """SPRINT parameters of one ``generate`` call; defaults are the official signature's.

    The acceptance threshold is the request's ``threshold`` and the step floor its
    ``minimal_topk``, the same knobs as the baseline's.

    keep_ratio: fraction of the prefix keys each layer keeps after warm-up (>= 1: keep all, still
        reusing the cache). image_keep_ratio / text_keep_ratio: only pin a modality (>= 1; text
        also when None), as the official code does.
    cache_warmup_steps: full-prefix steps of each block; the last of them picks the kept keys.
        0 never prunes (the official loop's condition ``step == cache_warmup_steps - 1`` never holds).
    confidence_alpha: weight of the key-norm term; 1 - alpha weighs token confidence.
    remasking: ranking of the adaptive top-k.
    """

    use: bool = True
    keep_ratio: float = 0.7
    image_keep_ratio: float | None = None
    text_keep_ratio: float | None = None
    cache_warmup_steps: int = 2
    confidence_alpha: float = 0.5
    remasking: str = "low_confidence"

    def __post_init__(self):
        for name in ("keep_ratio", "image_keep_ratio", "text_keep_ratio"):
            value = getattr(self, name)
            if value is not None and not value >= 0.0:
                raise ValueError(f"SPRINT {name} must be >= 0, got {value}")
        if self.cache_warmup_steps < 0:
            raise ValueError(f"SPRINT cache_warmup_steps must be >= 0, got {self.cache_warmup_steps}")
        if self.remasking not in STRATEGIES:
            raise ValueError(f"SPRINT remasking must be one of {STRATEGIES}, got {self.remasking!r}")

    @property
    def pin_text(self) -> bool:
        return self.text_keep_ratio is None or self.text_keep_ratio >= 1.0

    @property
    def pin_image(self) -> bool:
        return self.image_keep_ratio is not None and self.image_keep_ratio >= 1.0

    @property
    def alpha(self) -> float:
        return float(max(0.0, min(1.0, self.confidence_alpha)))  # clamped, as the official does


@dataclass
class PruneStats:
    """What one block kept after warm-up: per stacked row, keys kept (every layer keeps as many)
    out of the prefix length."""

    block: int
    kept: list[int]
    total: list[int]


class PrunableCache(Protocol):
    """The KV-cache methods SPRINT needs (``models.cache.KVCache``)."""

    k: Tensor  # [layers, R, Hkv, max_len, D], post-RoPE keys

    def set_view(self, start: int, end: int, idx: Tensor, valid: Tensor) -> None:
        """From now on the window is [start, end): its queries see, per layer, the prefix keys
        idx [layers, R, K] where valid [R, K], then the whole window; nothing else."""

    def clear_view(self) -> None:
        """Back to the plain cache."""


def supports(guidance_kind: str) -> bool:
    """SPRINT runs without CFG and with simple CFG; editing CFG runs the baseline (as the official)."""
    return guidance_kind != "edit"


def adaptive_k(masked_left: Tensor, steps: int, step: int, minimal_topk: int = 1) -> Tensor:
    """k = clamp(ceil(masked / steps left), minimal_topk, masked): the block ends by its last step."""
    steps_left = max(steps - step, 1)
    k = (masked_left + steps_left - 1) // steps_left
    return torch.minimum(torch.clamp(k, min=int(minimal_topk)), masked_left)


def max_prob(logits: Tensor) -> Tensor:
    """Max softmax probability per position, fp32: [..., V] -> [...] (the confidence of a prefix key)."""
    logits = logits.float()
    return torch.exp(logits.amax(-1) - torch.logsumexp(logits, dim=-1))


def pins(prefix_ids: Tensor, image_offset: int | None, sprint: Sprint) -> Tensor:
    """Pinned prefix keys [R, L] bool: text ids (pads are mask ids, so text) and/or image ids."""
    is_image = (prefix_ids >= image_offset if image_offset is not None
                else torch.zeros_like(prefix_ids, dtype=torch.bool))
    pin = torch.zeros_like(is_image)
    if sprint.pin_text:
        pin |= ~is_image
    if sprint.pin_image:
        pin |= is_image
    return pin


def keep_counts(prefix_len: int, pinned: Tensor, keep_ratio: float) -> Tensor:
    """Keys kept per row [R]: max(int(L * keep_ratio) or 1, pinned), L when keep_ratio >= 1 or all
    are pinned. Python float arithmetic, as the official's ``int(prefix_len * keep_ratio)``."""
    base = prefix_len if keep_ratio >= 1.0 else max(1, int(prefix_len * keep_ratio))
    return torch.clamp(pinned, min=base).clamp(max=prefix_len)


def keep_mask(keys: Tensor, conf: Tensor, pin: Tensor, keep: Tensor, alpha: float) -> Tensor:
    """The kept prefix keys of one layer: keys [R, Hkv, L, D], conf [R, L] fp32, pin [R, L] bool,
    keep [R] counts -> [R, L] bool. The official importance, NaN quirk included (module docstring).
    Leading dims of keys (every layer at once: [layers, R, Hkv, L, D] -> [layers, R, L]) run the same
    selection per layer, in one launch per op instead of one per layer."""
    score = keys.float().norm(dim=-1).mean(dim=-2)  # [..., R, L]
    score = score.masked_fill(pin, float("inf"))
    if alpha < 1.0:
        mean = score.mean(dim=-1, keepdim=True).clamp_min(1e-6)  # +inf as soon as one key is pinned
        score = alpha * (score / mean) + (1.0 - alpha) * conf
    # NaN (pinned, once blended) ranks first, as in torch.topk; ties go to the lower position.
    score = torch.where(torch.isnan(score), float("inf"), score)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank < keep[:, None]
