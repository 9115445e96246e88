"""Pure per-step pieces of mask-prediction decoding: vocabulary restriction, sampling, confidence,
and which positions to commit (spec 5.2-5.4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dataclasses import dataclass

from .guidance import Guidance, combine, row_weights


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
        conf = torch.softmax(logits, dim=-1).gather(-1, pred[..., None])[..., 0]
        return pred, conf
    logits = _top_p_filter(_top_k_filter(logits / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    pred = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return pred, probs.gather(-1, pred[:, None])[:, 0]


@dataclass
class VocabMoments:
    """Full-vocabulary moments of logits that are held only over a slice of the vocabulary: per row
    and position the sum over all V logits, and per position the sums of products of every two rows'
    logits. cfg_rescale's stds (over all V ids, spec 5.5) follow for any weighted sum of rows, so a
    step whose canvas may hold only image codes needs the LM head over those alone.

    sums [R, T] fp32, cross [T, R, R] fp32 (row-major over the forward's rows), vocab_size V.
    """

    sums: Tensor
    cross: Tensor
    vocab_size: int

    def select(self, first: int, nrows: int, count: int) -> "VocabMoments":
        """The moments of ``count`` adjacent requests of ``nrows`` rows from row ``first``, laid out as
        a run of them is handed to ``greedy_pick``: sums [nrows, count, T], cross [count, T, nrows, nrows]."""
        t = self.sums.shape[-1]
        sums = self.sums[first:first + nrows * count].view(count, nrows, t).transpose(0, 1)
        idx = first + torch.arange(count, device=self.sums.device)[:, None] * nrows + \
            torch.arange(nrows, device=self.sums.device)[None, :]  # [count, nrows]
        cross = self.cross[:, idx[:, :, None], idx[:, None, :]].permute(1, 0, 2, 3)  # [count, T, n, n]
        return VocabMoments(sums, cross, self.vocab_size)

    def std(self, weights) -> Tensor:
        """Unbiased std over the V logits of sum_i weights[i] * row_i, per position [...].

        weights: Python floats (a short list, one per row). Not a tensor: a CPU tensor would be a
        host-to-device copy, and so a host sync, in every step of the fast path."""
        w = [float(x) for x in weights]
        if len(w) != self.sums.shape[0]:
            raise ValueError(f"{len(w)} weights for {self.sums.shape[0]} rows")
        s = sum(wi * self.sums[i] for i, wi in enumerate(w) if wi)
        q = sum(wi * wj * self.cross[..., i, j] for i, wi in enumerate(w) for j, wj in enumerate(w) if wi and wj)
        v = self.vocab_size
        return ((q - s * s / v) / (v - 1)).clamp_min(0).sqrt()


def rescale_stds(guidance: Guidance, moments: VocabMoments) -> tuple[Tensor, Tensor]:
    """cfg_rescale's full-vocabulary stds of c and of g, [..., 1] each, from a request's moments."""
    n = moments.sums.shape[0]  # the request's rows (guidance may use the first few)
    weights = row_weights(guidance)
    own = [1.0] + [0.0] * (n - 1)
    mix = weights + [0.0] * (n - len(weights))
    return moments.std(own)[..., None], moments.std(mix)[..., None]


def row_moments(logits: Tensor) -> VocabMoments:
    """``VocabMoments`` of full logits [R, T, V] (the reference the fast path's are tested against)."""
    x = logits.float()
    return VocabMoments(x.sum(-1), torch.einsum("itv,jtv->tij", x, x), x.shape[-1])


def greedy_pick(guidance: Guidance, rows: Tensor, vocab: tuple[int, int] | None,
                moments: VocabMoments | None = None) -> tuple[Tensor, Tensor]:
    """A greedy step's choice from a request's CFG rows: rows [R, ..., V] (row 0 conditional) -> (pred
    [...] long, conf [...] fp32) of the guided (and rescaled) logits restricted to ``vocab`` (spec
    5.3-5.5). The reference of the fast path's fused version (``runtime.FusedGreedyPick``).

    With ``moments`` (this request's, ``VocabMoments.select``), rows hold the logits of the ids in
    ``vocab`` only, and the rescale's full-vocabulary stds come from the moments."""
    if moments is None:
        g = combine(guidance, rows)
        if vocab is not None:
            g = restrict_vocab(g, *vocab)
        return sample_tokens(g)
    stds = rescale_stds(guidance, moments) if guidance.kind != "none" and guidance.rescale > 0 else None
    g = combine(guidance, rows, stds)
    pred, conf = sample_tokens(g)
    return pred + vocab[0], conf


def sprint_sample(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SPRINT's token choice, as the official adaptive step makes it: logits [T, V] -> pred [T].

    temperature <= 0: argmax. Otherwise the official Gumbel-style draw: argmax of
    exp(logits) / (-log u) ** temperature in fp64 (u uniform), after top-p then top-k filtering of
    those noisy scores. It differs from the baseline's ``sample_tokens`` at temperature > 0, as the
    official's two loops differ.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits.double()
    u = torch.rand(scores.shape, dtype=torch.float64, device=scores.device, generator=generator)
    scores = scores.exp() / (-torch.log(u)) ** temperature
    scores = _top_k_filter(_top_p_filter(scores, top_p), top_k)
    return scores.argmax(-1)


def sprint_scores(logits: Tensor, pred: Tensor, strategy: str, active: Tensor,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(ranking score, top-1 probability), each [T] fp32, for SPRINT's adaptive step.

    The official definitions: low_confidence = p(pred); top_k_margin = p1 - p2;
    neg_entropy = 1 - H / log V with H = -sum p log(p + 1e-10) over the whole vocabulary;
    random = uniform scores for the active positions. The threshold always tests the top-1
    probability. Inactive positions score -inf.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    top1 = probs.amax(-1)
    if strategy == "low_confidence":
        score = probs.gather(-1, pred[:, None])[:, 0]
    elif strategy == "top_k_margin":
        top2 = probs.topk(2, dim=-1).values
        score = top2[:, 0] - top2[:, 1]
    elif strategy == "neg_entropy":
        vocab = probs.shape[-1]
        entropy = -(probs * torch.log(probs + 1e-10)).sum(-1)
        score = 1.0 - entropy / (math.log(vocab) if vocab > 1 else 1.0)
    elif strategy == "random":
        score = torch.rand(pred.shape, device=pred.device, generator=generator)
    else:
        raise ValueError(f"unknown SPRINT remasking strategy {strategy!r}")
    return score.masked_fill(~active, float("-inf")), top1


def select_transfer(conf: Tensor, active: Tensor, k: int | Tensor, threshold: float,
                    accept: Tensor | None = None) -> Tensor:
    """Positions to commit this step: the k most confident active positions, plus every active
    position with conf > threshold (spec 5.1). conf [T], active [T] bool -> bool [T]; leading batch
    dims ([G, T]) run the same selection per row.

    k is effectively clamped to the number of active positions; inactive positions are never chosen
    whatever their score. Ties go to the lower position (stable sorts), so the result does not depend
    on the device's topk. Sort-based, so no host sync is needed (k may be a 0-d tensor).
    ``accept`` [T], if given, is what the threshold tests instead of conf: SPRINT ranks by margin or
    entropy but accepts by top-1 probability (spec 5.2).
    """
    order = torch.sort(conf, dim=-1, descending=True, stable=True).indices
    # Second stable sort moves active positions in front, keeping their confidence order.
    moved = torch.sort(active.gather(-1, order).to(torch.uint8), dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, moved)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order).contiguous())
    return active & ((rank < k) | ((conf if accept is None else accept) > threshold))
