"""Pure per-step pieces of mask-prediction decoding: vocabulary restriction, sampling, confidence,
and which positions to commit (spec 5.2-5.4)."""

from __future__ import annotations

import torch
from torch import Tensor


def restrict_vocab(logits: Tensor, lo: int, hi: int) -> Tensor:
    """-inf outside [lo, hi): an image canvas may only hold image codes, and its confidence is then
    renormalised over the codes alone (spec 5.4)."""
    out = torch.full_like(logits, float("-inf"))
    out[..., lo:hi] = logits[..., lo:hi]
    return out


def _top_k_filter(logits: Tensor, k: int | None) -> Tensor:
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p_filter(logits: Tensor, p: float | None) -> Tensor:
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    mass = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    # Drop a token once the tokens ranked above it already exceed p, so the top-1 always survives.
    drop = torch.zeros_like(mass, dtype=torch.bool)
    drop[..., 1:] = mass[..., :-1] > p
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def sample_tokens(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick a token per position: logits [T, V] -> (pred [T] long, conf [T] fp32).

    temperature <= 0 is greedy: argmax and its softmax probability (the intended behaviour, spec 5.3);
    top-k/top-p cannot change an argmax, so they are ignored there. temperature > 0 follows the
    LLaDA2 family: divide by T, filter, draw, confidence = probability of the drawn token.
    """
    logits = logits.float()
    if temperature <= 0:
        pred = logits.argmax(-1)
        conf = torch.softmax(logits, dim=-1).gather(-1, pred[:, None])[:, 0]
        return pred, conf
    logits = _top_p_filter(_top_k_filter(logits / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    pred = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return pred, probs.gather(-1, pred[:, None])[:, 0]


def confidence_scores(logits: Tensor, pred: Tensor, strategy: str = "low_confidence") -> Tensor:
    """Score each position's prediction, higher = commit sooner. logits [T, V] (log-probabilities work
    too: softmax of log p is p), pred [T] -> [T] fp32.

    low_confidence = p(pred) is the baseline (spec 5.2). top_k_margin = p1 - p2 and
    neg_entropy = sum p log p are SPRINT's other options; no source gives their formulas, these are
    the standard definitions (INFERRED).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if strategy == "low_confidence":
        return probs.gather(-1, pred[:, None])[:, 0]
    if strategy == "top_k_margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if strategy == "neg_entropy":
        # xlogy keeps 0 log 0 = 0 for vocabulary-restricted (-inf) entries.
        return torch.special.xlogy(probs, probs).sum(-1)
    raise ValueError(f"unknown confidence strategy {strategy!r}")


def select_transfer(conf: Tensor, active: Tensor, k: int | Tensor, threshold: float,
                    accept: Tensor | None = None) -> Tensor:
    """Positions to commit this step: the k most confident active positions, plus every active
    position with conf > threshold (spec 5.1). conf [T], active [T] bool -> bool [T].

    k is effectively clamped to the number of active positions; inactive positions are never chosen
    whatever their score. Ties go to the lower position (stable sorts), so the result does not depend
    on the device's topk. Sort-based, so no host sync is needed (k may be a 0-d tensor).
    ``accept`` [T], if given, is what the threshold tests instead of conf: SPRINT ranks by margin or
    entropy but accepts by top-1 probability (spec 5.2).
    """
    order = torch.sort(conf, descending=True, stable=True).indices
    # Second stable sort moves active positions in front, keeping their confidence order.
    order = order[torch.sort(active[order].to(torch.uint8), descending=True, stable=True).indices]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return active & ((rank < k) | ((conf if accept is None else accept) > threshold))
