"""The LLaDA2 MoE backbone of LLaDA2.0-Uni (spec backbone.md section 3).

Plain PyTorch that runs on CPU. Module and parameter names follow the checkpoint
(``model.layers.{L}.attention.query_key_value.weight`` ...), except the routed experts, which are
stacked per layer into ``experts.w13`` [E, 2I, H] (gate rows first, then up) and ``experts.w2``
[E, H, I]; ``remap`` below says which checkpoint tensor fills which slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BackboneConfig
from ..ops.attention import attend
from ..ops.moe import experts_reference, route
from .cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # HF semantics: normalise in fp32, round to the input dtype, then apply the weight.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_cos_sin(positions: Tensor, rotary_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [R, T, rotary_dim] for integer positions [R, T]: fp32 angles, cast to ``dtype``.

    The rotary_dim/2 frequencies are duplicated (not interleaved): NeoX rotate-half layout.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=positions.device,
                                              dtype=torch.float32) / rotary_dim))
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [R, H, T, D]; rotate the first rotary_dim dims, pass the rest through."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.query_key_value = nn.Linear(cfg.hidden_size, cfg.qkv_size, bias=cfg.use_qkv_bias)
        self.query_layernorm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.dense = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, layer: int,
                cache: KVCache | None, start: int) -> Tensor:
        cfg = self.cfg
        r, t, _ = x.shape
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv = self.query_key_value(x).view(r, t, hq + 2 * hkv, d)
        q, k, v = qkv.split([hq, hkv, hkv], dim=2)
        if cfg.use_qk_norm:  # per-head RMSNorm, before RoPE
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [R, H, T, D]
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        out = attend(q, k, v, mask, 1.0 / math.sqrt(d))  # [R, Hq, T, D]
        return self.dense(out.transpose(1, 2).reshape(r, t, hq * d))


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Router: fp32 weight [E, H] and fp32 selection bias [E]."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, dtype=torch.float32))
        self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts, dtype=torch.float32))


class Experts(nn.Module):
    """Stacked expert weights; quantized (``quant.prepare_backbone``), 8-bit with fp32 block scales
    ``w13_scale`` [E, 2I/bm, H/bn] and ``w2_scale`` [E, H/bm, I/bn]."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))
        self.w13_scale = self.w2_scale = None
        self.blocks = None  # (w13 block, w2 block) when quantized

    def quantize_as(self, dtype: torch.dtype, block13: tuple[int, int], block2: tuple[int, int]) -> None:
        e, two_i, h = self.w13.shape
        dev = self.w13.device
        self.w13 = nn.Parameter(torch.empty(e, two_i, h, dtype=dtype, device=dev), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, two_i // 2, dtype=dtype, device=dev), requires_grad=False)
        self.w13_scale = nn.Parameter(torch.empty(e, two_i // block13[0], math.ceil(h / block13[1]),
                                                  device=dev), requires_grad=False)
        self.w2_scale = nn.Parameter(torch.empty(e, h // block2[0], math.ceil(two_i // 2 / block2[1]),
                                                 device=dev), requires_grad=False)
        self.blocks = (block13, block2)

    @property
    def scales(self) -> tuple[Tensor, Tensor, tuple, tuple] | None:
        """(w13_scale, w2_scale, w13 block, w2 block) for the dispatch, None in full precision."""
        return None if self.blocks is None else (self.w13_scale, self.w2_scale, *self.blocks)


class MoE(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)
                               if cfg.num_shared_experts else None)
        # Expert dispatch backend: the clear reference unless ``runtime`` installs a fused kernel.
        self.dispatch = experts_reference

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = F.linear(flat.float(), self.gate.weight)  # router in fp32
        expert_ids, weights = route(logits, self.gate.expert_bias, n_group=cfg.n_group,
                                    topk_group=cfg.topk_group, top_k=cfg.num_experts_per_tok,
                                    routed_scaling_factor=cfg.routed_scaling_factor,
                                    norm_topk_prob=cfg.norm_topk_prob)
        y = self.dispatch(flat, expert_ids, weights, self.experts.w13, self.experts.w2,
                          self.experts.scales).to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else DenseMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: KVCache | None,
                start: int) -> Tensor:
        h = h + self.attention(self.input_layernorm(h), cos, sin, mask, self.layer, cache, start)
        return h + self.mlp(self.post_attention_layernorm(h))


class LLaDA2MoeModel(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLaDA2MoeForLM(nn.Module):
    """``forward(ids, positions, mask, cache, start) -> fp32 logits``.

    ids/positions [R, T] are the physical window [start, start+T); mask [R, 1, T, start+T] is the
    block-causal mask (``ops.attention.block_causal_mask``). With a cache, keys [0, start) come from
    it and the window's KV is written at [start, start+T).
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LLaDA2MoeModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.word_embeddings.weight.device

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        cfg = self.config
        return KVCache(cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len, cfg.head_dim,
                       device=self.device, dtype=self.dtype)

    def forward(self, ids: Tensor, positions: Tensor, mask: Tensor, cache: KVCache | None = None,
                start: int = 0, num_logits: int | None = None,
                vocab: tuple[int, int] | None = None) -> Tensor:
        cfg = self.config
        if cache is None and start != 0:
            raise ValueError("a window that starts after 0 needs the KV cache of [0, start)")
        if cache is not None:  # a SPRINT view of the cache attends to fewer keys than [0, start+T)
            mask = cache.adapt_mask(mask, start)
        h = self.model.word_embeddings(ids)
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask, cache, start)
        if num_logits is not None:
            h = h[:, -num_logits:]
        h = self.model.norm(h)
        weight = self.lm_head.weight
        if vocab is not None:  # only the rows needed (e.g. image codes): a tenth of the head's bytes
            weight = weight[vocab[0]:vocab[1]]
        return F.linear(h, weight).float()


# ---- checkpoint mapping ----

@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: parameter name, index into it (None = whole), shape."""

    param: str
    index: tuple | None
    shape: tuple[int, ...]


FP32_PARAMS = ("mlp.gate.weight", "mlp.gate.expert_bias")
# Absent from some LLaDA2 exports (spec 2.2: presence in the Uni shards is inferred): zeros if missing.
OPTIONAL_SUFFIXES = ("mlp.gate.expert_bias",)


def remap(cfg: BackboneConfig) -> dict[str, Target]:
    """Checkpoint tensor name -> Target, for every tensor the official checkpoint holds."""
    h, v = cfg.hidden_size, cfg.vocab_size
    out: dict[str, Target] = {}

    def same(name: str, shape: tuple[int, ...]) -> None:
        out[name] = Target(name, None, shape)

    same("model.word_embeddings.weight", (v, h))
    same("model.norm.weight", (h,))
    same("lm_head.weight", (v, h))
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        same(p + "input_layernorm.weight", (h,))
        same(p + "post_attention_layernorm.weight", (h,))
        same(p + "attention.query_key_value.weight", (cfg.qkv_size, h))
        if cfg.use_qkv_bias:
            same(p + "attention.query_key_value.bias", (cfg.qkv_size,))
        same(p + "attention.query_layernorm.weight", (cfg.head_dim,))
        same(p + "attention.key_layernorm.weight", (cfg.head_dim,))
        same(p + "attention.dense.weight", (h, cfg.num_attention_heads * cfg.head_dim))
        if cfg.use_bias:
            same(p + "attention.dense.bias", (h,))
        if not cfg.is_moe_layer(layer):
            i = cfg.intermediate_size
            same(p + "mlp.gate_proj.weight", (i, h))
            same(p + "mlp.up_proj.weight", (i, h))
            same(p + "mlp.down_proj.weight", (h, i))
            continue
        i = cfg.moe_intermediate_size
        same(p + "mlp.gate.weight", (cfg.num_experts, h))
        same(p + "mlp.gate.expert_bias", (cfg.num_experts,))
        for e in range(cfg.num_experts):
            q = f"{p}mlp.experts.{e}."
            out[q + "gate_proj.weight"] = Target(p + "mlp.experts.w13", (e, slice(0, i)), (i, h))
            out[q + "up_proj.weight"] = Target(p + "mlp.experts.w13", (e, slice(i, 2 * i)), (i, h))
            out[q + "down_proj.weight"] = Target(p + "mlp.experts.w2", (e,), (h, i))
        if cfg.num_shared_experts:
            si = i * cfg.num_shared_experts
            same(p + "mlp.shared_experts.gate_proj.weight", (si, h))
            same(p + "mlp.shared_experts.up_proj.weight", (si, h))
            same(p + "mlp.shared_experts.down_proj.weight", (h, si))
    return out


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """Router weight and expert bias stay fp32 whatever the model dtype (spec 3.4)."""
    return torch.float32 if name.endswith(FP32_PARAMS) else dtype
