"""The fast path, applied from outside the model: grouped-GEMM MoE, static-shape cached steps, CUDA graphs.

``FastBackboneLogits`` is a drop-in ``logits_fn`` for the block sampler. Each cached denoising step
writes the window's K/V into the cache at its physical positions (``index_copy_`` on a device index,
so no Python int reaches the kernels) and attends over the whole preallocated cache with a mask that
hides everything past the window. Shapes then depend only on (rows, window length), so one CUDA graph
per shape replays every step of a generation; the first step of a block (finished block + new block,
64 tokens) and the steady steps (32 tokens) are two graphs. Prefill windows longer than that run
eagerly. ``eager=True`` turns graphs off; the clear ``BackboneLogits`` remains the reference.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from .models.backbone import LLaDA2MoeForLM, MoE, apply_partial_rope, rope_cos_sin
from .models.cache import KVCache
from .ops.attention import attend, block_causal_mask, rope_positions
from .ops.moe import experts_grouped, experts_reference, grouped_supported, route


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


def use_grouped_moe(model: LLaDA2MoeForLM) -> bool:
    """Switch every MoE layer to the grouped-GEMM dispatch when the dtype/shape allow it."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        return False
    probe = torch.empty(1, model.config.hidden_size, dtype=model.dtype, device=model.device)
    ok = grouped_supported(probe, moes[0].experts.w13)
    for m in moes:
        m.dispatch = experts_grouped if ok else experts_reference
    return ok


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    # HF RMSNorm: normalise in fp32, round to the input dtype, then apply the weight
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _attention_part(h, cos, sin, kc, vc, write_index, mask, ln_w, qkv_w, qkv_b, qn_w, kn_w, dense_w,
                    dense_b, post_w, hq: int, hkv: int, d: int, eps: float):
    """Norm, QKV, QK-norm, RoPE, cache write, attention, output projection, residual, post-norm.

    Weights come in as arguments so that one compiled graph serves every layer (same shapes).
    The window's K/V go into the cache at their physical positions (``index_copy_`` on a device index,
    so no Python int reaches the kernels) and attention reads the whole cache under ``mask``.
    """
    r, t, _ = h.shape
    q, k, v = F.linear(_rms(h, ln_w, eps), qkv_w, qkv_b).view(r, t, hq + 2 * hkv, d).split([hq, hkv, hkv], 2)
    if qn_w is not None:  # use_qk_norm
        q, k = _rms(q, qn_w, eps), _rms(k, kn_w, eps)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
    kc.index_copy_(2, write_index, k)
    vc.index_copy_(2, write_index, v)
    out = attend(q, kc, vc, mask, d ** -0.5)
    h = h + F.linear(out.transpose(1, 2).reshape(r, t, hq * d), dense_w, dense_b)
    return h, _rms(h, post_w, eps)


def _router_part(x, gate_w, bias, n_group: int, topk_group: int, top_k: int, scale: float, norm: bool):
    return route(F.linear(x.float(), gate_w), bias, n_group=n_group, topk_group=topk_group, top_k=top_k,
                 routed_scaling_factor=scale, norm_topk_prob=norm)


def _combine_part(h, routed, x, sg, su, sd):
    """Residual + routed (fp32 sum, cast) + shared expert."""
    return h + (routed.to(h.dtype) + F.linear(F.silu(F.linear(x, sg)) * F.linear(x, su), sd))


class StaticStep:
    """One cached forward with static shapes: the same maths as ``model.forward`` with a cache.

    ``step(ids, positions, write_index, mask, cache, num_logits)``: ids/positions [R, T]; write_index
    [T] physical positions of the window; mask [R, 1, T, S_max] over the whole cache. Returns fp32
    logits [R, num_logits, V].

    With ``compile=True`` the three per-layer parts (attention sub-layer, router, residual + shared
    expert) are torch.compile'd once and reused by every layer, since their weights are arguments; the
    expert dispatch and layer 0's dense MLP stay eager. Fused kernels may round fp32 intermediates
    differently, so compiled logits agree to bf16 tolerance, not bit for bit.
    """

    def __init__(self, model: LLaDA2MoeForLM, *, compile: bool = False, backend: str = "inductor") -> None:
        self.model = model
        wrap = (lambda f, dims: _Compiled(f, dims, backend)) if compile else (lambda f, dims: f)
        # h, cos, sin [R, T, .]; caches [R, Hkv, S, D]; write_index [T]; mask [R, 1, T, S]
        self.attention = wrap(_attention_part, {0: (0, 1), 1: (0, 1), 2: (0, 1), 3: (0, 2), 4: (0, 2), 5: (0,),
                                                6: (0, 2, 3)})
        self.router = wrap(_router_part, {0: (0,)})  # x [R*T, H]
        self.combine = wrap(_combine_part, {0: (0, 1), 1: (0, 1), 2: (0, 1)})  # h, routed, x [R, T, H]

    @property
    def compiles(self) -> int:
        """Graphs compiled so far over the three parts (0 when not compiling)."""
        return sum(getattr(p, "compiles", 0) for p in (self.attention, self.router, self.combine))

    def __call__(self, ids, positions, write_index, mask, cache, num_logits) -> Tensor:
        model, cfg = self.model, self.model.config
        hq, hkv, d, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
        r, t = ids.shape
        h = model.model.word_embeddings(ids)
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, h.dtype)
        for i, layer in enumerate(model.model.layers):
            att = layer.attention
            qk_norm = cfg.use_qk_norm
            h, x = self.attention(h, cos, sin, cache.k[i], cache.v[i], write_index, mask,
                                  layer.input_layernorm.weight, att.query_key_value.weight,
                                  att.query_key_value.bias, att.query_layernorm.weight if qk_norm else None,
                                  att.key_layernorm.weight if qk_norm else None, att.dense.weight,
                                  att.dense.bias, layer.post_attention_layernorm.weight, hq, hkv, d, eps)
            mlp = layer.mlp
            if not isinstance(mlp, MoE) or mlp.shared_experts is None:
                h = h + mlp(x)
                continue
            flat = x.reshape(-1, x.shape[-1])
            ids_, w = self.router(flat, mlp.gate.weight, mlp.gate.expert_bias, cfg.n_group, cfg.topk_group,
                                  cfg.num_experts_per_tok, cfg.routed_scaling_factor, cfg.norm_topk_prob)
            routed = mlp.dispatch(flat, ids_, w, mlp.experts.w13, mlp.experts.w2).view(r, t, -1)
            sh = mlp.shared_experts
            h = self.combine(h, routed, x, sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight)
        h = model.model.norm(h[:, -num_logits:])
        return F.linear(h, model.lm_head.weight).float()


class FastBackboneLogits:
    """The backbone as the sampler's ``logits_fn``, fast path. Same contract as ``BackboneLogits``."""

    GRAPH_WINDOWS = (32, 64)

    def __init__(self, model: LLaDA2MoeForLM, block_length: int = 32, *, eager: bool = False,
                 compile: bool = False) -> None:
        self.model = model
        self.block_length = block_length
        self.grouped = use_grouped_moe(model)
        # Graphs need the host-sync-free grouped MoE and a CUDA device.
        self.graphs = (not eager) and self.grouped and model.device.type == "cuda"
        self._graphs: dict = {}
        self.step = StaticStep(model, compile=compile and self.grouped)

    CACHE_QUANTUM = 512
    POOL = 4  # caches (and their graphs) kept for reuse across generations

    @staticmethod
    def row_bucket(rows: int) -> int:
        """Rows are padded to a power of two, as serving engines pad to captured batch sizes: a batch
        of any size reuses the graphs of its bucket."""
        return 1 << max(0, rows - 1).bit_length()

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        """A cache of ``row_bucket(rows)`` rows x ``max_len`` rounded up to CACHE_QUANTUM, taken from a
        small pool so that its CUDA graphs (tied to the cache's buffers) are reused by later
        generations of the same bucket. The rows past ``rows`` are inert padding: their queries see
        nothing and their logits are dropped. Stale entries from an earlier generation are
        harmless: every read is masked to the keys of the current window."""
        max_len = -(-max_len // self.CACHE_QUANTUM) * self.CACHE_QUANTUM
        key = (self.row_bucket(rows), max_len)
        pool = self.__dict__.setdefault("_pool", {})
        cache = pool.pop(key, None)
        if cache is None:
            cache = self.model.new_cache(*key)
            while len(pool) >= self.POOL:  # evict the least recently used, with its graphs
                old = pool.pop(next(iter(pool)))
                self._graphs = {k: v for k, v in self._graphs.items() if k[3] != id(old)}
        pool[key] = cache  # most recently used last
        cache.view = None
        cache.real_rows = rows
        return cache

    def new_rows(self, rows: int, max_len: int) -> KVCache:
        """An unpooled cache for rows joining a running batch (``new_cache`` may hand out its pool)."""
        return self.model.new_cache(rows, -(-max_len // self.CACHE_QUANTUM) * self.CACHE_QUANTUM)

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

    def _inputs(self, ids: Tensor, start: int, pad_lens: Tensor, cache: KVCache):
        end = start + ids.shape[1]
        positions = rope_positions(start, end, pad_lens)
        mask = block_causal_mask(start, end, pad_lens, self.block_length)  # [R, 1, T, end]
        full = torch.zeros(cache.rows, *mask.shape[1:-1], cache.max_len, dtype=torch.bool, device=mask.device)
        full[: mask.shape[0], ..., :end] = mask  # padding rows see nothing
        write_index = torch.arange(start, end, device=ids.device)
        pad = cache.rows - ids.shape[0]
        if pad:
            ids = torch.cat([ids, ids.new_zeros(pad, ids.shape[1])])
            positions = torch.cat([positions, positions.new_zeros(pad, positions.shape[1])])
        return ids, positions, write_index, full

    @torch.inference_mode()
    def __call__(self, ids: Tensor, start: int, pad_lens: Tensor, cache, num_logits: int) -> Tensor:
        if cache is None:  # uncached windows: the clear path
            end = start + ids.shape[1]
            return self.model(ids, rope_positions(start, end, pad_lens),
                              block_causal_mask(start, end, pad_lens, self.block_length),
                              num_logits=num_logits)
        rows = ids.shape[0]
        if rows > cache.rows:
            raise ValueError(f"{rows} rows do not fit a cache of {cache.rows}")
        ids, positions, write_index, mask = self._inputs(ids, start, pad_lens, cache)
        key = (ids.shape[0], ids.shape[1], num_logits, id(cache))
        if not self.graphs or ids.shape[1] not in self.GRAPH_WINDOWS:
            return self.step(ids, positions, write_index, mask, cache, num_logits)[:rows]
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(key, ids, positions, write_index, mask, cache, num_logits)
        static = graph["inputs"]
        for name, value in (("ids", ids), ("positions", positions), ("write_index", write_index),
                            ("mask", mask)):
            static[name].copy_(value)
        graph["graph"].replay()
        return graph["out"][:rows].clone()

    def warm_up(self, rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32), max_len: int = 2048) -> float:
        """Compile and capture the steady and first-of-block steps for these row buckets now (a server
        pays this once at start); returns the seconds it took."""
        import time
        t = time.perf_counter()
        for r in rows:
            cache = self.new_cache(r, max_len)
            ids = torch.zeros(r, self.GRAPH_WINDOWS[-1], dtype=torch.long, device=self.model.device)
            pads = torch.zeros(r, dtype=torch.long, device=self.model.device)
            for window in self.GRAPH_WINDOWS:
                self(ids[:, :window], 0, pads, cache, self.block_length)
            self(ids[:, :48], 0, pads, cache, self.block_length)  # a prefill-length window, compiled
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def _capture(self, key, ids, positions, write_index, mask, cache, num_logits) -> dict:
        # A graph is tied to one cache object (its buffers are baked in); the graphs of a cache leave
        # with it when the pool evicts it, which releases their memory.
        inputs = {"ids": ids.clone(), "positions": positions.clone(), "write_index": write_index.clone(),
                  "mask": mask.clone()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: compilation, allocator and library handles, outside the graph
                self.step(inputs["ids"], inputs["positions"], inputs["write_index"], inputs["mask"], cache,
                          num_logits)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.step(inputs["ids"], inputs["positions"], inputs["write_index"], inputs["mask"], cache,
                            num_logits)
        entry = {"graph": graph, "inputs": inputs, "out": out}
        self._graphs[key] = entry
        return entry


def accelerate(pipe, *, eager: bool = False, compile_step: bool | None = None,
               compile_decoder: bool | None = None) -> bool:
    """Give a pipeline the fast path: grouped MoE, CUDA graphs unless ``eager``, and on CUDA (unless
    switched off) torch.compile of the per-layer step (``StaticStep``) and of the DiT blocks.

    Returns whether the grouped MoE is in use. ``pipe.logits_fn`` can be set back to a
    ``BackboneLogits`` to return to the clear path.
    """
    if compile_step is None:
        compile_step = (not eager) and pipe.model.device.type == "cuda"
    pipe.logits_fn = FastBackboneLogits(pipe.model, eager=eager, compile=compile_step)
    if compile_decoder is None:
        compile_decoder = (not eager) and pipe.image_device.type == "cuda"
    pipe.compile_decoder = compile_decoder
    if pipe._image_decoder is not None:
        pipe._image_decoder.compile_dit = compile_decoder
        for dit in pipe._image_decoder._dits.values():
            if compile_decoder:
                dit.compile_repeated_blocks(fullgraph=True)
    return pipe.logits_fn.grouped
