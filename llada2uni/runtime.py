"""The fast path, applied from outside the model: fused MoE, window attention, static-shape cached steps,
CUDA graphs.

``FastBackboneLogits`` is a drop-in ``logits_fn`` for the block sampler. Each cached denoising step
writes the window's K/V into the cache at its physical positions (``index_copy_`` on a device index,
so no Python int reaches the kernels) and attends to the keys the window may see, given as two small
device tensors (``key_ok`` per key, ``kv_lim`` per query; ``ops/attention_triton.py``), so the
kernel reads only those keys however long the preallocated cache. Shapes then depend only on (rows,
window length), so one CUDA graph per shape replays every step of a generation; the first step of a
block (finished block + new block, 64 tokens) and the steady steps (32 tokens) are two graphs.
Prefill windows longer than that run eagerly. ``eager=True`` turns graphs off; the clear
``BackboneLogits`` remains the reference.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from .models.backbone import LLaDA2MoeForLM, MoE, apply_partial_rope, rope_cos_sin
from .models.cache import KVCache
from .ops.attention import block_causal_mask, rope_positions
from .ops.attention_triton import window_attention, window_attention_reference, window_limits
from .ops.moe import experts_grouped, experts_reference, grouped_supported, route
from .ops.moe_triton import route_supported, route_triton
from .ops.qmm import qlinear
from .quant import QuantLinear
from .sampling.guidance import Guidance, cfg_edit, cfg_rescale, cfg_simple
from .sampling.unmask import VocabMoments, greedy_pick, rescale_stds

log = logging.getLogger(__name__)


class _Compiled:
    """``torch.compile`` of one step part, for the shapes real traffic sends.

    Activation sizes are symbolic, so every row count, window length (32/64-token steps and prefill
    windows of any length) and cache size shares one graph; only Dynamo's 0/1 size specialisation
    adds a second (one row). Should compilation still fail (the recompile limit, an unsupported op),
    the part falls back to eager for good, with one warning, instead of failing the request.
    ``compiles`` counts the graphs Dynamo handed to the backend.
    """

    def __init__(self, fn, dims: dict[int, tuple[int, ...]], backend="inductor") -> None:
        self.eager = fn
        self.dims = dims  # argument index -> its sizes that vary with traffic (rows, tokens, cache)
        self.compiles = 0

        def counting(gm, example_inputs):
            self.compiles += 1
            if backend == "eager":
                return gm.forward
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, example_inputs)
        self.fn = torch.compile(fn, dynamic=False, fullgraph=True, backend=counting)
        self.failed = False

    def _mark(self, args) -> None:
        # Only the traffic sizes are symbolic; weights, head counts and widths stay static, so the
        # kernels still specialise on the model's own sizes.
        for i, dims in self.dims.items():
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(args[i], dim)

    def __call__(self, *args):
        if self.failed:
            return self.eager(*args)
        try:
            self._mark(args)
            # No duck sizing: a window length equal to, say, the row count must not tie the two.
            with torch.fx.experimental._config.patch(use_duck_shape=False):
                return self.fn(*args)
        # unsupported ops and backend failures (TorchDynamoException); the recompile limit
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as e:
            self._fall_back(e)
        return self.eager(*args)

    def _fall_back(self, error: Exception) -> None:
        self.failed = True
        log.warning("torch.compile of %s failed (%s: %s); running it eagerly from now on",
                    getattr(self.eager, "__name__", "a step part"), type(error).__name__, str(error)[:200])


_SHARED: dict[tuple, _Compiled] = {}


def _shared_compiled(fn, dims: dict[int, tuple[int, ...]], backend: str) -> _Compiled:
    """One ``_Compiled`` per (step part, backend) for the whole process. Dynamo keeps its graphs per
    function, and each new ``torch.compile`` wrapper of the same function adds its own entries, so
    per-instance wrappers (a benchmark's variants, a second pipeline) would reach the recompile limit
    and fall back to eager; shared, every StaticStep reuses the same graphs."""
    key = (fn, backend)
    if key not in _SHARED:
        _SHARED[key] = _Compiled(fn, dims, backend)
    return _SHARED[key]


def reset_compiled() -> None:
    """Forget every compiled step part (and Dynamo's caches): the next step compiles afresh."""
    _SHARED.clear()
    torch._dynamo.reset()


MOE_BACKENDS = ("auto", "triton", "grouped", "reference")


class _FastView:
    """A SPRINT view for the fast path: the kept prefix keys gathered into a persistent buffer of the
    cache's own shape (kept keys at [0, kept), the window after them), so every pruned step of every
    block has the same shapes and replays one CUDA graph; only ``visible`` and the window's write
    positions change, and they are graph inputs."""

    def __init__(self, start: int, end: int, idx: Tensor, valid: Tensor, visible: Tensor, k: Tensor,
                 v: Tensor) -> None:
        self.start, self.end, self.kept = start, end, valid.shape[1]
        self.idx, self.valid = idx, valid  # as KVCache's view: [layers, R, kept], [R, kept]
        self.visible = visible  # [cache rows, max_len] bool: kept keys of each row, then the window
        self.k, self.v = k, v


class PooledCache(KVCache):
    """The fast path's cache: a ``KVCache`` whose SPRINT view (``set_view``) gathers into buffers
    allocated once per cache (only when SPRINT is used) instead of per block."""

    def set_view(self, start: int, end: int, idx: Tensor, valid: Tensor) -> None:
        layers, rows, heads, max_len, dim = self.k.shape
        r, kept = valid.shape
        if idx.shape != (layers, r, kept) or r > rows:
            raise ValueError(f"view indices {tuple(idx.shape)} / valid {tuple(valid.shape)} do not fit "
                             f"a cache of {layers} layers and {rows} rows")
        if kept + end - start > max_len:
            raise ValueError(f"a view of {kept} kept keys and a {end - start}-token window exceeds the cache "
                             f"({max_len})")
        if getattr(self, "_view_k", None) is None:
            self._view_k, self._view_v = torch.zeros_like(self.k), torch.zeros_like(self.v)
        gather = idx[:, :, None, :, None].expand(layers, r, heads, kept, dim)
        self._view_k[:, :r, :, :kept] = self.k[:, :r].gather(3, gather)
        self._view_v[:, :r, :, :kept] = self.v[:, :r].gather(3, gather)
        visible = torch.zeros(rows, max_len, dtype=torch.bool, device=self.k.device)
        visible[:r, :kept] = valid
        visible[:r, kept:kept + end - start] = True
        self.view = _FastView(start, end, idx, valid, visible, self._view_k, self._view_v)


def use_fast_moe(model: LLaDA2MoeForLM, backend: str = "auto") -> str | None:
    """Switch every MoE layer to a host-sync-free dispatch: the fused Triton kernels
    (``ops/moe_triton.py``) on CUDA where their tiles fit, else the grouped GEMM where dtype and shape
    allow it. Returns the backend in use, or None when only the reference dispatch fits (no graphs).
    ``backend`` forces one ("reference" turns the fast dispatch off)."""
    from .ops import moe_triton
    if backend not in MOE_BACKENDS:
        raise ValueError(f"moe backend must be one of {MOE_BACKENDS}, got {backend!r}")
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        return None
    probe = torch.empty(1, model.config.hidden_size, dtype=model.dtype, device=model.device)
    w13, w2, scales = moes[0].experts.w13, moes[0].experts.w2, moes[0].experts.scales
    usable = {"triton": moe_triton.supported(probe, w13, w2, scales),
              "grouped": scales is None and grouped_supported(probe, w13)}
    if backend == "auto":
        backend = next((b for b in ("triton", "grouped") if usable[b]), "reference")
    elif backend != "reference" and not usable[backend]:
        raise ValueError(f"the {backend} MoE dispatch does not support this model's dtype/device/shapes")
    dispatch = {"triton": moe_triton.experts_fused, "grouped": experts_grouped,
                "reference": experts_reference}[backend]
    for m in moes:
        old = m.dispatch  # a streamed layer's (``memory.ExpertStream``) keeps streaming around the new one
        m.dispatch = old.stream.wrap(old.layer, dispatch) if hasattr(old, "stream") else dispatch
    return None if backend == "reference" else backend


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    # HF RMSNorm: normalise in fp32, round to the input dtype, then apply the weight
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _linear(x, w, b, s, q):
    """F.linear, or the quantized linear (``ops.qmm``) when the weight has scales ``s``; ``q`` is
    (block, kernel), constants of the layer."""
    return F.linear(x, w, b) if s is None else qlinear(x, w, s, q[0], b, q[1])


def _quant_args(linear) -> tuple:
    """(scale, (block, kernel)) of a ``QuantLinear``; (None, None) for an ``nn.Linear``."""
    return (linear.weight_scale, (linear.block, linear.kernel)) if isinstance(linear, QuantLinear) else (None, None)


def _attention_part(h, cos, sin, kc, vc, write_index, key_ok, kv_lim, ln_w, qkv_w, qkv_b, qn_w, kn_w, dense_w,
                    dense_b, post_w, hq: int, hkv: int, d: int, eps: float, attention=window_attention,
                    qkv_s=None, qkv_q=None, dense_s=None, dense_q=None):
    """Norm, QKV, QK-norm, RoPE, cache write, attention, output projection, residual, post-norm.

    Weights come in as arguments so that one compiled graph serves every layer (same shapes); 8-bit
    weights come with their scales (``*_s``) and (block, kernel) (``*_q``).
    The window's K/V go into the cache at their physical positions (``index_copy_`` on a device index,
    so no Python int reaches the kernels); attention reads the keys that ``key_ok`` [R, S] and
    ``kv_lim`` [T] let each query see (``ops.attention_triton.window_attention``).
    """
    r, t, _ = h.shape
    q, k, v = _linear(_rms(h, ln_w, eps), qkv_w, qkv_b, qkv_s, qkv_q).view(r, t, hq + 2 * hkv, d).split(
        [hq, hkv, hkv], 2)
    if qn_w is not None:  # use_qk_norm
        q, k = _rms(q, qn_w, eps), _rms(k, kn_w, eps)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
    kc.index_copy_(2, write_index, k)
    vc.index_copy_(2, write_index, v)
    out = attention(q, kc, vc, key_ok, kv_lim, d ** -0.5)
    h = h + _linear(out.transpose(1, 2).reshape(r, t, hq * d), dense_w, dense_b, dense_s, dense_q)
    return h, _rms(h, post_w, eps)


def _router_part(x, gate_w, bias, n_group: int, topk_group: int, top_k: int, scale: float, norm: bool):
    return route(F.linear(x.float(), gate_w), bias, n_group=n_group, topk_group=topk_group, top_k=top_k,
                 routed_scaling_factor=scale, norm_topk_prob=norm)


def router_logits(x: Tensor, gate_w: Tensor) -> Tensor:
    """fp32 router logits x [N, H] @ gate_w [E, H].T. A ``gate_w`` in x's dtype (bf16) holds the fp32
    weight's exact values (``StaticStep`` keeps such a copy only when the cast is lossless): the
    products of two bf16 numbers are exact in fp32 and the tensor cores accumulate them in fp32, so
    this is the fp32 GEMM up to summation order, without the fp32 SIMT kernel and the cast of x."""
    if gate_w.dtype == x.dtype and x.is_cuda and x.dtype != torch.float32:
        return torch.mm(x, gate_w.t(), out_dtype=torch.float32)
    return F.linear(x.float(), gate_w.float())


def _fused_router(x, gate_w, bias, n_group: int, topk_group: int, top_k: int, scale: float, norm: bool):
    """``_router_part`` with the top-k selection in one Triton launch (``moe_triton.route_triton``)."""
    return route_triton(router_logits(x, gate_w), bias, n_group=n_group, topk_group=topk_group, top_k=top_k,
                        routed_scaling_factor=scale, norm_topk_prob=norm)


def _lossless_gate(gate_w: Tensor, dtype: torch.dtype) -> Tensor:
    """The router weight in ``dtype`` when that cast loses nothing (a bf16 checkpoint's values), else
    the fp32 weight itself."""
    low = gate_w.to(dtype)
    return low if dtype != torch.float32 and torch.equal(low.float(), gate_w) else gate_w


def _combine_part(h, routed, x, sg, su, sd, ss=(None, None, None), sq=(None, None, None)):
    """Residual + routed (fp32 sum, cast) + shared expert (``ss``/``sq``: its scales and (block, kernel)
    when 8-bit)."""
    gate, up = _linear(x, sg, None, ss[0], sq[0]), _linear(x, su, None, ss[1], sq[1])
    return h + (routed.to(h.dtype) + _linear(F.silu(gate) * up, sd, None, ss[2], sq[2]))


# ---- the greedy choice, fused (``sampling.unmask.greedy_pick`` is the reference) ----
#
# A T2I step of 32 requests hands the sampler 64 x 32 x 173568 logits; the reference's chain (fp32
# copy, CFG, two stds, rescale, the -inf canvas of the restriction, softmax, argmax) reads and writes
# ~20 GB of fp32 per step, about as long as the forward itself. Compiled, each kind of guidance is a
# few fused reductions over the bf16 logits. The restriction is a mask on [lo, hi) (0-d tensors, as
# are the scales), so no value of a request specialises the graph; each kind is its own function,
# so that each gets its own compile cache. Same formulas in the same order; confidence is
# 1 / sum(exp(g - max)) over the allowed ids, which is softmax's value at the argmax.

def _pick(g: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    ids = torch.arange(g.shape[-1], device=g.device)
    g = torch.where((ids >= lo) & (ids < hi), g, float("-inf"))
    top = g.amax(-1, keepdim=True)
    return g.argmax(-1), 1.0 / torch.exp(g - top).sum(-1)


def _pick_none(rows, lo, hi):
    return _pick(rows[0].float(), lo, hi)


def _pick_simple(rows, scale, rescale, lo, hi, do_rescale: bool, stds=None):
    # stds: (std_c, std_g) of the full vocabulary when rows hold a slice of it (VocabMoments)
    rows = rows.float()
    g = cfg_simple(rows[0], rows[1], scale)
    return _pick(cfg_rescale(g, rows[0], rescale, *(stds or ())) if do_rescale else g, lo, hi)


def _pick_edit(rows, text_scale, image_scale, rescale, lo, hi, do_rescale: bool, stds=None):
    rows = rows.float()
    c = rows[0]
    g = cfg_edit(c, rows[1], rows[2], text_scale, image_scale) if rows.shape[0] == 3 else \
        cfg_simple(c, rows[1], text_scale)
    return _pick(cfg_rescale(g, c, rescale, *(stds or ())) if do_rescale else g, lo, hi)


class FusedGreedyPick:
    """``greedy_pick``'s contract, each guidance kind compiled once (``_Compiled``: the request batch
    and block sizes symbolic, eager if compilation fails). rows [R, G, B, V] or [R, B, V].

    A lone request's step (G = 1) takes the reference: its chain is short (~0.1 ms for 2 x 32 x
    173568 logits on an H200), and so the first request of a process pays no compilation; runs of
    several requests (the server's batches; ``FastBackboneLogits.warm_up`` compiles them) are fused.
    """

    def __init__(self, backend: str = "inductor") -> None:
        dims = {0: (1, 2)}  # rows [R, G, B, V]: G requests, B positions
        self.parts = {kind: _shared_compiled(fn, dims, backend)
                      for kind, fn in (("none", _pick_none), ("simple", _pick_simple), ("edit", _pick_edit))}
        self._consts: dict = {}

    def _const(self, value, device) -> Tensor:
        # 0-d device tensors made once per value: a fresh torch.tensor(..., device=cuda) per step
        # would be a host-to-device copy each time
        key = (value, str(device))
        if key not in self._consts:
            self._consts[key] = torch.tensor(value, device=device)
        return self._consts[key]

    def __call__(self, guidance: Guidance, rows: Tensor, vocab: tuple[int, int] | None,
                 moments: VocabMoments | None = None):
        """With ``moments``, rows hold the logits of the ids in ``vocab`` only (``greedy_pick``)."""
        guidance.check_rows(rows)
        if rows.dim() == 3 or rows.shape[1] < 2:
            return greedy_pick(guidance, rows, vocab, moments)
        dev = rows.device
        rescale = guidance.rescale > 0
        stds, offset = None, 0
        if moments is not None:  # the slice is the whole choice; the rescale's stds from the moments
            offset, (lo, hi) = vocab[0], (0, rows.shape[-1])
            if guidance.kind != "none" and rescale:
                stds = rescale_stds(guidance, moments)  # [G, B, 1] each: the run and block symbolic too
                for t in stds:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                    torch._dynamo.maybe_mark_dynamic(t, 1)
        else:
            lo, hi = vocab if vocab is not None else (0, rows.shape[-1])
        lo, hi = self._const(int(lo), dev), self._const(int(hi), dev)
        r = self._const(float(guidance.rescale), dev)
        if guidance.kind == "none":
            pred, conf = self.parts["none"](rows[:1], lo, hi)
        elif guidance.kind == "simple":
            pred, conf = self.parts["simple"](rows[:2], self._const(float(guidance.scale), dev), r, lo, hi, rescale,
                                              stds)
        else:
            pred, conf = self.parts["edit"](rows[:guidance.num_rows], self._const(float(guidance.text_scale), dev),
                                            self._const(float(guidance.image_scale), dev), r, lo, hi, rescale, stds)
        return pred + offset, conf


class StaticStep:
    """One cached forward with static shapes: the same maths as ``model.forward`` with a cache.

    ``step(ids, positions, write_index, key_ok, kv_lim, cache, num_logits)``: ids/positions [R, T];
    write_index [T] physical positions of the window; key_ok [R, S_max] the cache's real keys; kv_lim
    [T] int32, query t sees keys j < kv_lim[t] (``ops.attention_triton``). Returns fp32
    logits [R, num_logits, V] (``fp32=False``: in the model's dtype, the same values before the cast).

    With ``compile=True`` the three per-layer parts (attention sub-layer, router, residual + shared
    expert) are torch.compile'd once and reused by every layer, since their weights are arguments; the
    expert dispatch and layer 0's dense MLP stay eager. Fused kernels may round fp32 intermediates
    differently, so compiled logits agree to bf16 tolerance, not bit for bit.
    """

    ATTENTION = {"auto": window_attention, "sdpa": window_attention_reference}

    def __init__(self, model: LLaDA2MoeForLM, *, compile: bool = False, backend: str = "inductor",
                 attention: str = "auto", fused_router: bool = False) -> None:
        self.model = model
        if attention not in self.ATTENTION:
            raise ValueError(f"attention must be one of {tuple(self.ATTENTION)}, got {attention!r}")
        # "auto": the Triton window kernels where supported, else SDPA; "sdpa": SDPA under the full
        # mask (the baseline the kernels are measured against)
        self.attend = self.ATTENTION[attention]
        wrap = (lambda f, dims: _shared_compiled(f, dims, backend)) if compile else (lambda f, dims: f)
        # h, cos, sin [R, T, .]; caches [R, Hkv, S, D]; write_index [T]; key_ok [R, S]; kv_lim [T]
        self.attention = wrap(_attention_part, {0: (0, 1), 1: (0, 1), 2: (0, 1), 3: (0, 2), 4: (0, 2), 5: (0,),
                                                6: (0, 1), 7: (0,)})
        # fused_router: the Triton top-k (CUDA), with the fused MoE dispatch; else torch's (compiled)
        self.router = _fused_router if fused_router else wrap(_router_part, {0: (0,)})  # x [R*T, H]
        # the fused router's GEMM reads the gate weight in the model's dtype where that is lossless
        dtype = model.model.word_embeddings.weight.dtype
        self.gates = [_lossless_gate(layer.mlp.gate.weight, dtype) if fused_router and isinstance(layer.mlp, MoE)
                      else getattr(getattr(layer.mlp, "gate", None), "weight", None) for layer in model.model.layers]
        self.combine = wrap(_combine_part, {0: (0, 1), 1: (0, 1), 2: (0, 1)})  # h, routed, x [R, T, H]

    @property
    def compiles(self) -> int:
        """Graphs compiled so far over the three parts, process-wide: the compiled parts are shared by
        every StaticStep (0 when not compiling)."""
        return sum(getattr(p, "compiles", 0) for p in (self.attention, self.router, self.combine))

    def lm_head_moments(self) -> tuple[Tensor, Tensor]:
        """(Gram W^T W [H, H], column sums sum_v W_v [H]) of the LM head, fp32, made once: with them
        the moments of all V logits l = W h follow from h alone (sum l = h . s, sum l^2 = h^T G h)."""
        if getattr(self, "_gram", None) is None:
            w = self.model.lm_head.weight
            gram = torch.zeros(w.shape[1], w.shape[1], device=w.device, dtype=torch.float32)
            for chunk in w.split(8192):  # fp32 in pieces: the whole head in fp32 would be 1.4 GB
                c = chunk.float()
                gram.addmm_(c.T, c)
            self._gram, self._wsum = gram, w.float().sum(0)
        return self._gram, self._wsum

    def __call__(self, ids, positions, write_index, key_ok, kv_lim, cache, num_logits,
                 fp32: bool = True, vocab: tuple[int, int] | None = None):
        """``vocab`` = (lo, hi): logits of those ids only, returned with their full-vocabulary
        moments as (logits [R, T, hi - lo], sums [R, T], cross [T, R, R]) (``unmask.VocabMoments``)."""
        model, cfg = self.model, self.model.config
        hq, hkv, d, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
        r, t = ids.shape
        h = model.model.word_embeddings(ids)
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, h.dtype)
        for i, layer in enumerate(model.model.layers):
            att = layer.attention
            qk_norm = cfg.use_qk_norm
            h, x = self.attention(h, cos, sin, cache.k[i], cache.v[i], write_index, key_ok, kv_lim,
                                  layer.input_layernorm.weight, att.query_key_value.weight,
                                  att.query_key_value.bias, att.query_layernorm.weight if qk_norm else None,
                                  att.key_layernorm.weight if qk_norm else None, att.dense.weight,
                                  att.dense.bias, layer.post_attention_layernorm.weight, hq, hkv, d, eps,
                                  self.attend, *_quant_args(att.query_key_value), *_quant_args(att.dense))
            mlp = layer.mlp
            if not isinstance(mlp, MoE) or mlp.shared_experts is None:
                h = h + mlp(x)
                continue
            flat = x.reshape(-1, x.shape[-1])
            ids_, w = self.router(flat, self.gates[i], mlp.gate.expert_bias, cfg.n_group, cfg.topk_group,
                                  cfg.num_experts_per_tok, cfg.routed_scaling_factor, cfg.norm_topk_prob)
            routed = mlp.dispatch(flat, ids_, w, mlp.experts.w13, mlp.experts.w2, mlp.experts.scales).view(r, t, -1)
            sh = mlp.shared_experts
            lins = (sh.gate_proj, sh.up_proj, sh.down_proj)
            if isinstance(sh.gate_proj, QuantLinear):
                quant = tuple(zip(*(_quant_args(lin) for lin in lins)))
                h = self.combine(h, routed, x, *(lin.weight for lin in lins), *quant)
            else:
                h = self.combine(h, routed, x, *(lin.weight for lin in lins))
        h = model.model.norm(h[:, -num_logits:])
        if vocab is not None:
            gram, wsum = self.lm_head_moments()
            logits = F.linear(h, model.lm_head.weight[vocab[0]:vocab[1]])
            hf = h.float()
            cross = torch.einsum("ith,jth->tij", hf @ gram, hf)
            return (logits.float() if fp32 else logits), hf @ wsum, cross
        logits = F.linear(h, model.lm_head.weight)
        return logits.float() if fp32 else logits  # fp32=False: the model's dtype (half the memory)


class FastBackboneLogits:
    """The backbone as the sampler's ``logits_fn``, fast path. Same contract as ``BackboneLogits``."""

    GRAPH_WINDOWS = (32, 64)
    sprint_views = True  # SPRINT's pruned steps run here too (``PooledCache.set_view``)

    def __init__(self, model: LLaDA2MoeForLM, block_length: int = 32, *, eager: bool = False,
                 compile: bool = False, moe: str = "auto", attention: str = "auto",
                 vocab_slices: bool = True, compile_backend: str = "inductor") -> None:
        self.model = model
        # vocab_slices: the sampler may ask an image canvas's step for the image ids' logits alone
        # (``__call__``'s vocab): measured faster at 1 and 32 requests (benchmarks/RESULTS.md)
        self.vocab_slices = vocab_slices
        self.block_length = block_length
        self.moe = use_fast_moe(model, moe)  # the dispatch in use; None: the reference (syncs)
        self.grouped = self.moe is not None
        # Graphs need a host-sync-free MoE dispatch and a CUDA device.
        self.graphs = (not eager) and self.grouped and model.device.type == "cuda"
        self._graphs: dict = {}
        self.step = StaticStep(model, compile=compile and self.grouped, backend=compile_backend, attention=attention,
                               fused_router=self.moe == "triton" and route_supported(model.config.num_experts,
                                                                                     model.config.n_group))
        # the sampler's greedy choice, compiled with the step (``generate`` looks for greedy_pick)
        self.greedy_pick = FusedGreedyPick(compile_backend) if compile and self.grouped else None
        self.precompiled: dict | None = None  # a background ``Precompile``'s report (``accelerate``)

    CACHE_QUANTUM = 512
    POOL = 4  # caches (and their graphs) kept for reuse across generations; warm_up raises it

    @staticmethod
    def row_bucket(rows: int) -> int:
        """Rows are padded to a power of two, as serving engines pad to captured batch sizes: a batch
        of any size reuses the graphs of its bucket."""
        return 1 << max(0, rows - 1).bit_length()

    @classmethod
    def length_bucket(cls, max_len: int) -> int:
        """Cache lengths are CACHE_QUANTUM times a power of two (512, 1024, 2048, ...): few distinct
        caches, so few graphs to capture, at most twice the length asked for."""
        return cls.CACHE_QUANTUM * cls.row_bucket(-(-max_len // cls.CACHE_QUANTUM))

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        """A cache of ``row_bucket(rows)`` rows x ``length_bucket(max_len)``, taken from a small pool
        so that its CUDA graphs (tied to the cache's buffers) are reused by later generations of the
        same bucket. The rows past ``rows`` are inert padding: their queries see nothing and their
        logits are dropped. Stale entries from an earlier generation are harmless: every read is
        masked to the keys of the current window."""
        key = (self.row_bucket(rows), self.length_bucket(max_len))
        pool = self.__dict__.setdefault("_pool", {})
        cache = pool.pop(key, None)
        if cache is None:
            while len(pool) >= self.POOL:  # evict the least recently used, with its graphs
                old = pool.pop(next(iter(pool)))
                gone = {id(old.k), id(getattr(old, "_view_k", None))}  # its own and its SPRINT view's
                self._graphs = {k: v for k, v in self._graphs.items() if k[3] not in gone}
            cache = self._cache(*key)
        pool[key] = cache  # most recently used last
        cache.view = None
        cache.real_rows = rows
        return cache

    def _cache(self, rows: int, max_len: int) -> PooledCache:
        cfg = self.model.config
        return PooledCache(cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len, cfg.head_dim,
                           device=self.model.device, dtype=self.model.dtype)

    def new_rows(self, rows: int, max_len: int) -> KVCache:
        """An unpooled cache for rows joining a running batch (``new_cache`` may hand out its pool).
        Its prefill runs without a CUDA graph: a graph is tied to its cache's buffers, and this one is
        used once."""
        cache = self._cache(rows, self.length_bucket(max_len))
        cache.graphed = False
        return cache

    def extend_cache(self, cache: KVCache, extra: KVCache) -> KVCache:
        """The running batch's cache plus the joining rows: in place when they fit its row bucket (its
        graphs stay valid), else a pooled cache of the larger bucket."""
        ra, rb = cache.real_rows, extra.real_rows
        if ra + rb <= cache.rows and extra.max_len <= cache.max_len:
            target = cache
        else:
            target = self.new_cache(ra + rb, max(cache.max_len, extra.max_len))
            target.k[:, :ra, :, : cache.max_len] = cache.k[:, :ra]
            target.v[:, :ra, :, : cache.max_len] = cache.v[:, :ra]
        target.k[:, ra:ra + rb, :, : extra.max_len] = extra.k[:, :rb]
        target.v[:, ra:ra + rb, :, : extra.max_len] = extra.v[:, :rb]
        target.real_rows = ra + rb
        target.length = cache.length
        return target

    def retire_rows(self, cache: KVCache, keep: list[int]) -> KVCache:
        """Only these rows of the cache, in this order, at its front (finished requests leave the
        batch): in place while they need the same row bucket, else in a pooled cache of the smaller
        bucket, whose graphs are cheaper to replay."""
        m = len(keep)
        target = self.new_cache(m, cache.max_len) if self.row_bucket(m) < cache.rows else cache
        if target is not cache or keep != list(range(m)):
            idx = torch.tensor(keep, dtype=torch.long, device=cache.k.device)
            target.k[:, :m] = cache.k.index_select(1, idx)  # a copy first: safe in place
            target.v[:, :m] = cache.v.index_select(1, idx)
        target.real_rows = m
        target.length = cache.length
        return target

    @staticmethod
    def canvas_limit(cache: KVCache, length: int) -> int:
        """How long a running batch's canvas may grow for joining requests: what its cache holds
        (length buckets leave room; no reallocation, no new graphs)."""
        return max(length, cache.max_len)

    @staticmethod
    def _pad_rows(ids: Tensor, positions: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """ids/positions padded with zero rows up to the cache's row bucket (inert: they see nothing)."""
        pad = rows - ids.shape[0]
        if pad:
            ids = torch.cat([ids, ids.new_zeros(pad, ids.shape[1])])
            positions = torch.cat([positions, positions.new_zeros(pad, positions.shape[1])])
        return ids, positions

    def _inputs(self, ids: Tensor, start: int, pad_lens: Tensor, cache: KVCache):
        """The window [start, end) sees its row's real keys (not left padding) in its own and earlier
        blocks (spec 3.3): key j < kv_lim[t] = min(end, (block of query t + 1) * B)."""
        end = start + ids.shape[1]
        dev = ids.device
        positions = rope_positions(start, end, pad_lens)
        key_ok = torch.zeros(cache.rows, cache.max_len, dtype=torch.bool, device=dev)  # padding rows: nothing
        key_ok[: ids.shape[0]] = torch.arange(cache.max_len, device=dev)[None, :] >= pad_lens[:, None]
        kv_lim = window_limits(start, end, self.block_length, dev)
        write_index = torch.arange(start, end, device=dev)
        return (*self._pad_rows(ids, positions, cache.rows), write_index, key_ok, kv_lim)

    def _view_inputs(self, ids: Tensor, start: int, pad_lens: Tensor, cache: KVCache, view: _FastView):
        """A pruned step: the window [start, end) attends to the kept keys and the whole window (the
        official SPRINT step), its K/V written after the kept keys; RoPE keeps the true positions."""
        end = start + ids.shape[1]
        if (start, end) != (view.start, view.end):
            raise ValueError(f"the cache view is of [{view.start}, {view.end}), the window [{start}, {end})")
        positions = rope_positions(start, end, pad_lens)
        t = ids.shape[1]
        kv_lim = torch.full((t,), view.kept + t, dtype=torch.int32, device=ids.device)
        write_index = torch.arange(view.kept, view.kept + t, device=ids.device)
        return (*self._pad_rows(ids, positions, cache.rows), write_index, view.visible, kv_lim)

    @torch.inference_mode()
    def __call__(self, ids: Tensor, start: int, pad_lens: Tensor, cache, num_logits: int,
                 vocab: tuple[int, int] | None = None):
        """The window's logits, or with ``vocab`` = (lo, hi) (a cached window) the logits of ids
        [lo, hi) only and their full-vocabulary ``VocabMoments``: (logits, moments). A T2I canvas
        may hold only image codes (16384 of 173568 ids), so its LM head shrinks ~10x; cfg_rescale's
        stds over every id come from the moments (the LM head's Gram matrix, ``lm_head_moments``)."""
        if cache is None:  # uncached windows: the clear path
            if vocab is not None:
                raise ValueError("vocab slices need a cache (the fast path's cached step)")
            end = start + ids.shape[1]
            return self.model(ids, rope_positions(start, end, pad_lens),
                              block_causal_mask(start, end, pad_lens, self.block_length),
                              num_logits=num_logits)
        rows = ids.shape[0]
        if rows > cache.rows:
            raise ValueError(f"{rows} rows do not fit a cache of {cache.rows}")
        graphed = self.graphs and getattr(cache, "graphed", True) and ids.shape[1] in self.GRAPH_WINDOWS
        view = cache.view
        if view is not None:
            if not isinstance(view, _FastView):
                raise ValueError("this cache's SPRINT view is not the fast path's: use a cache from new_cache")
            ids, positions, write_index, key_ok, kv_lim = self._view_inputs(ids, start, pad_lens, cache, view)
            cache = view  # the step reads and writes .k / .v: the view's buffers
        else:
            ids, positions, write_index, key_ok, kv_lim = self._inputs(ids, start, pad_lens, cache)
        if vocab is not None:
            vocab = (int(vocab[0]), int(vocab[1]))
            if not 0 <= vocab[0] < vocab[1] <= self.model.config.vocab_size:
                raise ValueError(f"vocab slice {vocab} is not a range of ids in [0, {self.model.config.vocab_size})")
            self.step.lm_head_moments()  # made once, outside any graph capture
        # A graph is tied to the K/V buffers it was captured on (a cache's, or its SPRINT view's).
        key = (ids.shape[0], ids.shape[1], num_logits, id(cache.k), vocab)
        if not graphed:
            out = self.step(ids, positions, write_index, key_ok, kv_lim, cache, num_logits, fp32=False, vocab=vocab)
        else:
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._capture(key, ids, positions, write_index, key_ok, kv_lim, cache, num_logits, vocab)
            static = graph["inputs"]
            for name, value in (("ids", ids), ("positions", positions), ("write_index", write_index),
                                ("key_ok", key_ok), ("kv_lim", kv_lim)):
                static[name].copy_(value)
            graph["graph"].replay()
            # The logits stay in the model's dtype (the sampler computes in fp32; an fp32 copy of 64 x
            # 32 x 173568 logits would be 1.4 GB a step) and are the graph's own buffer: valid until
            # the next call.
            out = graph["out"]
        if vocab is None:
            return out[:rows]
        logits, sums, cross = out
        return logits[:rows], VocabMoments(sums[:rows], cross[:, :rows, :rows], self.model.config.vocab_size)

    def warm_up(self, rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32), lengths: tuple[int, ...] = (2048,),
                image_lengths: tuple[int, ...] = ()) -> dict:
        """Compile and capture, now, the steps a generation replays (first-of-block and steady windows)
        for these row buckets and cache lengths, and one prefill-length window (compiled, eager); at
        ``image_lengths`` also the image canvas's steps (logits of the image ids only); a server pays
        this once at start. The pool grows to hold every warmed cache, so none of their graphs is
        evicted. Returns what was done: seconds, graphs, compiled graphs, caches."""
        import time
        t = time.perf_counter()
        keys = {(self.row_bucket(r), self.length_bucket(n)) for r in rows for n in (*lengths, *image_lengths)}
        image_keys = {(self.row_bucket(r), self.length_bucket(n)) for r in rows for n in image_lengths}
        self.POOL = max(self.POOL, len(keys) + 2)  # + room for the odd other size
        device = self.model.device
        cfg = self.model.config
        image = (cfg.image_token_offset, cfg.vocab_size)
        for r, n in sorted(keys):
            cache = self.new_cache(r, n)
            ids = torch.zeros(r, self.GRAPH_WINDOWS[-1], dtype=torch.long, device=device)
            pads = torch.zeros(r, dtype=torch.long, device=device)
            image_steps = [image] if (r, n) in image_keys and self.vocab_slices else []
            # full-vocabulary steps too: a batch mixing text and image requests at an image length
            for vocab in [None] + image_steps:
                for window in self.GRAPH_WINDOWS:
                    self(ids[:, :window], 0, pads, cache, self.block_length, vocab=vocab)
            self(ids[:, :48], 0, pads, cache, self.block_length)  # a prefill-length window
        if self.greedy_pick is not None:  # the batched greedy choice of each guidance kind
            for guidance, vocab in ((Guidance(), None), (Guidance("simple", scale=4.0, rescale=0.7), image),
                                    (Guidance("edit", text_scale=4.0, rescale=0.7), image)):
                # laid out as the sampler hands a run over (two requests' rows in a row, viewed as
                # [rows, requests, B, V]): another layout would be a new graph at the first real batch
                n = guidance.num_rows
                # Inference tensors, as the step returns (made under inference mode; the pick runs
                # outside it): Dynamo guards on the autograd dispatch key, so ordinary tensors here
                # would leave graphs that the first real batch does not match.
                with torch.inference_mode():
                    flat = torch.zeros(2 * n, self.block_length, cfg.vocab_size, device=device,
                                       dtype=self.model.model.word_embeddings.weight.dtype)
                self.greedy_pick(guidance, flat.view(2, n, *flat.shape[1:]).transpose(0, 1), vocab)
                if vocab is not None and self.vocab_slices:  # and over the image ids alone
                    with torch.inference_mode():
                        # contiguous, as the sliced step returns them (a slice of ``flat`` has other strides)
                        part = flat[..., vocab[0]:vocab[1]].contiguous()
                        sums = torch.zeros(2 * n, self.block_length, device=device)
                        cross = torch.zeros(self.block_length, 2 * n, 2 * n, device=device)
                    moments = VocabMoments(sums, cross, cfg.vocab_size).select(0, n, 2)
                    self.greedy_pick(guidance, part.view(2, n, *part.shape[1:]).transpose(0, 1), vocab, moments)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {"seconds": round(time.perf_counter() - t, 2), "graphs": len(self._graphs),
                "compiled": self.step.compiles, "caches": sorted(keys)}

    def _capture(self, key, ids, positions, write_index, key_ok, kv_lim, cache, num_logits, vocab=None) -> dict:
        # A graph is tied to one cache's buffers (baked in); the graphs of a cache leave with it when
        # the pool evicts it. All graphs share one memory pool: they never run concurrently, and each
        # one's output stays allocated (held here), so no capture can reuse another's output.
        inputs = {"ids": ids.clone(), "positions": positions.clone(), "write_index": write_index.clone(),
                  "key_ok": key_ok.clone(), "kv_lim": kv_lim.clone()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: compilation, allocator and library handles, outside the graph
                self.step(*(inputs[n] for n in ("ids", "positions", "write_index", "key_ok", "kv_lim")), cache,
                          num_logits, fp32=False, vocab=vocab)
        torch.cuda.current_stream().wait_stream(stream)
        if getattr(self, "_mempool", None) is None:
            self._mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            out = self.step(*(inputs[n] for n in ("ids", "positions", "write_index", "key_ok", "kv_lim")), cache,
                            num_logits, fp32=False, vocab=vocab)
        entry = {"graph": graph, "inputs": inputs, "out": out}
        self._graphs[key] = entry
        return entry


class Precompile:
    """The step parts' torch.compile, and the first builds of the fused Triton kernels, done in a
    background thread on a small random model of the checkpoint's shapes (its dense layers and one
    MoE layer, a tiny vocabulary) while the real weights load.

    Cold, compiling the attention part alone takes ~14 s on an H200 host, the first request's largest
    cost (benchmarks/RESULTS.md). The compiled parts are process-wide (``_shared_compiled``) and take
    each layer's weights as arguments, so their guards see only shapes, dtypes and devices: the real
    model's steps find these graphs and compile nothing. ``rows`` are the row buckets to compile, as
    Dynamo specialises one row (a chat, an understanding) apart from several (CFG rows, batches);
    the windows are the graph steps (32, 64 tokens) and one long prefill (the fused MoE's larger
    tiles). Nothing here is captured in a CUDA graph: a capture would forbid the loading thread's
    CUDA calls. ``join()`` waits and returns a report; failures are logged and reported, never raised
    (the real steps then compile as they would have).
    """

    def __init__(self, config, device: torch.device | str, dtype: torch.dtype, *, moe: str = "auto",
                 rows: tuple[int, ...] = (2, 1), backend: str = "inductor", prefill: int = 1040,
                 quant=None) -> None:
        import threading
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.quant = quant  # the real model's ``quant.QuantMode``: its 8-bit linears compile differently
        self.moe, self.rows, self.backend, self.prefill = moe, tuple(rows), backend, prefill
        self.report: dict = {}
        self._thread = threading.Thread(target=self._run, name="llada2uni-precompile", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import dataclasses
        import time

        from .weights import random_backbone
        t = time.perf_counter()
        try:
            cfg = self.config
            small = dataclasses.replace(cfg, num_hidden_layers=cfg.first_k_dense_replace + 1, vocab_size=64,
                                        image_token_offset=32)
            model = random_backbone(small, device=self.device, dtype=self.dtype, quant=self.quant)
            fast = FastBackboneLogits(model, eager=True, compile=True, moe=self.moe,
                                      compile_backend=self.backend)
            b = fast.block_length
            for rows in self.rows:
                cache = fast.new_cache(rows, self.prefill + 2 * b)
                ids = torch.zeros(rows, self.prefill, dtype=torch.long, device=self.device)
                pads = torch.zeros(rows, dtype=torch.long, device=self.device)
                for window in (self.prefill, 2 * b, b):
                    fast(ids[:, :window], 0, pads, cache, b)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.report = {"seconds": round(time.perf_counter() - t, 2), "compiled": fast.step.compiles}
        except Exception as e:  # noqa: BLE001 - an optimisation: the real steps compile on their own
            log.warning("background precompile failed (%s: %s); the first steps will compile instead",
                        type(e).__name__, str(e)[:200])
            self.report = {"seconds": round(time.perf_counter() - t, 2), "error": f"{type(e).__name__}: {e}"}

    def join(self, timeout: float | None = None) -> dict:
        """Wait for the background compile; its report (seconds, compiled graphs, or error)."""
        self._thread.join(timeout)
        return self.report


def accelerate(pipe, *, eager: bool = False, compile_step: bool | None = None,
               compile_decoder: bool | None = None, moe: str = "auto",
               precompile: Precompile | None = None) -> bool:
    """Give a pipeline the fast path: the fused (Triton) or grouped MoE dispatch (``moe``, see
    ``use_fast_moe``), CUDA graphs unless ``eager``, and on CUDA (unless switched off) torch.compile
    of the per-layer step (``StaticStep``) and of the DiT blocks.

    ``precompile``: a ``Precompile`` started while the weights loaded; waited for here, so that no
    step compiles while it still runs (its report: ``pipe.logits_fn.precompiled``).

    Returns whether a host-sync-free MoE dispatch is in use. ``pipe.logits_fn`` can be set back to a
    ``BackboneLogits`` to return to the clear path.
    """
    if compile_step is None:
        compile_step = (not eager) and pipe.model.device.type == "cuda"
    report = precompile.join() if precompile is not None else None
    pipe.logits_fn = FastBackboneLogits(pipe.model, eager=eager, compile=compile_step, moe=moe)
    pipe.logits_fn.precompiled = report or None
    if compile_decoder is None:
        compile_decoder = (not eager) and pipe.image_device.type == "cuda"
    pipe.compile_decoder = compile_decoder
    if pipe._image_decoder is not None:
        pipe._image_decoder.compile_dit = compile_decoder
        for dit in pipe._image_decoder._dits.values():
            if compile_decoder:
                dit.compile_repeated_blocks(fullgraph=True)
    return pipe.logits_fn.grouped


def warm_up(pipe, *, max_rows: int = 64, size: tuple[int, int] | None = (1024, 1024),
            text_tokens: int = 512) -> dict:
    """What a server pays once at start, so that no request pays it: compile the step and capture
    its CUDA graphs for every row bucket up to ``max_rows`` at the cache lengths of a ``size``
    (height, width) T2I canvas and a ``text_tokens`` answer, and compile the DiT for ``size`` (one
    turbo decode). Other sizes still work: their graphs are captured when first seen (no compile).
    Returns what was done, with seconds; {} when the pipeline has no fast path."""
    import time
    fn = pipe.logits_fn
    if not isinstance(fn, FastBackboneLogits) or not fn.graphs:
        return {}
    t = time.perf_counter()
    rows = tuple(1 << i for i in range(FastBackboneLogits.row_bucket(max_rows).bit_length()))
    lengths = [text_tokens + 256]  # a chat prompt and its answer
    image_lengths = []
    grid = None
    if size is not None:
        grid = (size[0] // 32, size[1] // 32)  # 16 px per code, x2 by the decoder
        header = len(pipe.tokens.t2i_prompts("warm up", *grid)[0])
        image_lengths.append(header + grid[0] * grid[1] + 2 * fn.block_length)
    with pipe.holding("backbone"):  # under a memory budget the DiT may hold the arena
        report = {"backbone": fn.warm_up(rows, tuple(lengths), tuple(image_lengths))}
    if fn.precompiled:  # the step's compile, done in the background while the weights loaded
        report["precompiled"] = fn.precompiled
    if grid is not None and getattr(pipe, "compile_decoder", False):
        try:
            decoder = pipe.image_decoder
        except Exception:  # noqa: BLE001 - a backbone-only checkpoint has no decoder to warm
            decoder = None
        if decoder is not None:
            t_dec = time.perf_counter()
            pipe.decode_tokens([0] * (grid[0] * grid[1]), *grid, mode="turbo", seed=0)
            report["decoder_seconds"] = round(time.perf_counter() - t_dec, 2)
    report["seconds"] = round(time.perf_counter() - t, 2)
    return report
