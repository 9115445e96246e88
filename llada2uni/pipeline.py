"""The tasks of LLaDA2.0-Uni on one object: ``LLaDA2Uni``.

Method names, arguments and return values follow the model card's remote-code API
(``understand_image`` ...), so switching from the remote code means changing the import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .config import BackboneConfig
from .models.backbone import LLaDA2MoeForLM
from .ops.attention import block_causal_mask, rope_positions
from .quant import decoder_mode
from .sampling.block import DenoiseRequest, generate
from .sampling.guidance import Guidance, check_scales
from .sampling.sprint import Sprint, supports
from .tokens import Tokens, TokenError, align_rows
from .weights import backbone_quant, load_backbone, resolve_checkpoint, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from .memory import Memory

log = logging.getLogger(__name__)

BLOCK_LENGTH = 32
# The official generate_image's canvas (gen_length): steps are clamped to it // minimal_topk.
T2I_GEN_LENGTH = 1088


CPU_THREADS_MAX = 8


def cap_cpu_threads() -> int:
    """torch's CPU thread pool, sized to the cores this process may use, at most ``CPU_THREADS_MAX``:
    torch's default (every core of the machine) oversubscribes a busy or shared machine, and runs
    there were 8-50x slower than on an idle one. Done once per process, and never when
    ``OMP_NUM_THREADS`` is set (then that is the choice). Returns the thread count in use."""
    if "OMP_NUM_THREADS" in os.environ or getattr(cap_cpu_threads, "done", False):
        return torch.get_num_threads()
    cap_cpu_threads.done = True
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    want = max(1, min(usable, CPU_THREADS_MAX))
    if torch.get_num_threads() > want:
        torch.set_num_threads(want)
    return torch.get_num_threads()


class BackboneLogits:
    """The backbone as the sampler's ``logits_fn``: builds positions and the block-causal mask."""

    # model.forward honours the cache's SPRINT view (the pruned prefix).
    sprint_views = True

    def __init__(self, model: LLaDA2MoeForLM, block_length: int = BLOCK_LENGTH) -> None:
        self.model = model
        self.block_length = block_length

    def new_cache(self, rows: int, max_len: int):
        return self.model.new_cache(rows, max_len)

    @staticmethod
    def extend_cache(cache, extra):
        return cache.extend(extra)

    @staticmethod
    def retire_rows(cache, keep):
        return cache.select_rows(keep)

    @torch.inference_mode()
    def __call__(self, ids: Tensor, start: int, pad_lens: Tensor, cache, num_logits: int) -> Tensor:
        end = start + ids.shape[1]
        positions = rope_positions(start, end, pad_lens)
        mask = block_causal_mask(start, end, pad_lens, self.block_length)
        return self.model(ids, positions, mask, cache=cache, start=start, num_logits=num_logits)


ImageInput = Tensor | Sequence[int]


def _is_picture(item) -> bool:
    """A PIL image, an image file path or encoded bytes (as opposed to a token list / tensor)."""
    from PIL import Image
    return isinstance(item, (Image.Image, bytes, bytearray, str, Path))


class LLaDA2Uni:
    """LLaDA2.0-Uni: backbone, tokenizer and (later) the image side, loaded once."""

    def __init__(self, model: LLaDA2MoeForLM, tokens: Tokens, path: Path | None = None, *,
                 image_dtype: torch.dtype | None = None, keep_decoder: bool = True,
                 image_device: str | torch.device | None = None, memory=None) -> None:
        self.model = model
        self.memory = memory  # a ``memory.Memory`` under a GPU budget, else None (everything resident)
        self.decoder_quant = None  # the DiT's ``quant.QuantMode`` (from_pretrained's decoder_quant)
        self.tokens = tokens
        self.config: BackboneConfig = model.config
        self.path = path
        # Image-side components load on first use and stay resident (keep_decoder=False frees the
        # DiT after each decode, for small GPUs).
        self.image_dtype = image_dtype or model.dtype
        self.keep_decoder = keep_decoder
        # A second GPU can hold the image side (SigLIP-VQ, SigVQ, DiT, VAE) next to the backbone.
        self.image_device = resolve_device(image_device) if image_device is not None else model.device
        self.compile_decoder = False  # runtime.accelerate turns on regional torch.compile of the DiT
        self._image_tokenizer = None
        self._image_decoder = None
        self.logits_fn = BackboneLogits(model)
        self.use_cache = True
        # tqdm bars over blocks and decoder steps: on when stderr is a terminal (a notebook or a shell),
        # off in logs and servers; set it either way
        self.progress = sys.stderr is not None and sys.stderr.isatty()
        self.last_stats: dict = {}

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, revision: str | None = None,
                        keep_decoder: bool = True, image_device: str | torch.device | None = None,
                        fast: bool = True, quant: str | None = None, decoder_quant: str | None = None,
                        memory: "str | int | float | Memory | None" = None,
                        reserve_gib: float | None = None) -> "LLaDA2Uni":
        """Load from a local folder or a Hub repo id. ``dtype`` defaults to bfloat16 (float32 on CPU).

        ``quant``: how the backbone's linear weights are kept ("auto": an FP8 checkpoint as FP8, a
        bf16 one as bf16; "none": full precision; "fp8", "fp8-channel", "int8": quantized while
        loading, see ``quant.py``). ``decoder_quant`` ("none", "fp8"; default: "fp8" when the
        backbone is FP8): the DiT's block linears in FP8 (W8A8).
        ``memory`` (GiB of the GPU: "80" everything resident, "24", "16", or any number): under a
        budget the backbone, DiT and encoder take turns in one GPU arena, and the experts of some
        layers stream from pinned memory if the backbone alone does not fit (``memory.py``);
        ``reserve_gib`` is what the budget keeps outside the arena (default 6). A ``memory.Memory``
        may be passed instead, for a budget and reserve of one's own."""
        from .memory import DEFAULT_RESERVE_GIB, Memory, parse_tier, place_backbone

        dev = resolve_device(device)
        if dev.type == "cpu":
            cap_cpu_threads()
        dt = resolve_dtype(dtype, default=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        mem = memory if isinstance(memory, Memory) else None
        budget = None if mem is not None else parse_tier(memory)
        if budget is not None and dev.type != "cuda":
            log.warning("memory=%s is a GPU budget: ignored on %s (everything stays where it is)", memory, dev)
        elif budget is not None:
            mem = Memory(budget, dev, reserve_gib=DEFAULT_RESERVE_GIB if reserve_gib is None else reserve_gib)
        directory = resolve_checkpoint(path_or_repo, revision=revision)
        mode = backbone_quant(directory, quant, dev)
        dit_mode = decoder_mode(decoder_quant, mode, dev)
        precompile = None
        if fast and dev.type == "cuda":  # the fast path's compile runs while the weights load
            from .config import BackboneConfig
            from .runtime import Precompile
            precompile = Precompile(BackboneConfig.from_file(directory / "config.json"), dev, dt, quant=mode)
        # under a budget: on the CPU first (8-bit weights quantized on the device), then the arena
        model = load_backbone(directory, device=torch.device("cpu") if mem is not None else dev, dtype=dt,
                              quant=mode or "none", quant_device=dev if mem is not None else None)
        stream = place_backbone(mem, model) if mem is not None else None
        tokens = Tokens.from_pretrained(directory, model.config)
        pipe = cls(model, tokens, directory, keep_decoder=keep_decoder, image_device=image_device, memory=mem)
        pipe.decoder_quant = dit_mode
        if fast and dev.type == "cuda":  # the fast path; fast=False keeps the clear eager path
            pipe.speed_up(precompile=precompile, streamed=stream is not None)
        return pipe

    def speed_up(self, *, precompile=None, streamed: bool = False) -> None:
        """``runtime.accelerate`` with the backbone held. ``streamed``: experts stream per layer
        (copies launched from Python): compiled, without CUDA graphs."""
        from .runtime import accelerate
        with self.holding("backbone"):
            accelerate(self, precompile=precompile, eager=streamed, compile_step=True if streamed else None,
                       compile_decoder=True if streamed and self.image_device.type == "cuda" else None)

    def holding(self, group: str):
        """A context in which the memory ``group`` ("backbone", "encoder", "dit-turbo", ...) is resident
        (a no-op without a memory budget)."""
        return self.memory.hold(group) if self.memory is not None else contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def image_token_offset(self) -> int:
        return self.tokens.ids.image_offset

    # ---- helpers ----

    def _check_length(self, prompt_len: int, gen_length: int) -> None:
        limit = self.config.max_position_embeddings
        if prompt_len + gen_length > limit:
            raise ValueError(f"prompt ({prompt_len} tokens) + generation ({gen_length} tokens) = "
                             f"{prompt_len + gen_length} exceeds the model's context of {limit} tokens")

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _image_item(self, tokens: ImageInput, h: int | None, w: int | None) -> tuple[list[int], int, int]:
        if isinstance(tokens, Tensor):
            tokens = tokens.flatten().tolist()
        tokens = list(tokens)
        if h is None or w is None:
            raise TokenError("image tokens need their grid size: pass h and w")
        self.tokens.image_block(tokens, h, w)  # validates range and count
        return tokens, int(h), int(w)

    def _request(self, rows: list[list[int]], *, gen_length: int, steps: int, threshold: float,
                 guidance: Guidance = Guidance(), image: bool = False, stop_ids: frozenset[int] = frozenset(),
                 temperature: float = 0.0, generator: torch.Generator | None = None, minimal_topk: int = 1,
                 top_k: int | None = None, top_p: float | None = None,
                 clamp_length: int | None = None) -> DenoiseRequest:
        """One denoising request: CFG rows aligned to the conditional row (``align_rows``).

        Steps are clamped to ``clamp_length // minimal_topk`` (default gen_length), as the official
        loops clamp them to their gen_length.
        """
        if gen_length < 1:
            raise ValueError(f"gen_length must be >= 1, got {gen_length}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not isinstance(minimal_topk, int) or minimal_topk < 1:
            raise ValueError(f"minimal_topk must be an integer >= 1, got {minimal_topk!r}")
        clamp = clamp_length if clamp_length is not None else gen_length
        if clamp < minimal_topk:
            raise ValueError(f"gen_length {clamp} is below minimal_topk {minimal_topk}: no denoising step")
        if not 0.0 <= threshold:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        rows, pads = align_rows(rows, self.tokens.ids.mask)
        self._check_length(len(rows[0]), gen_length)
        vocab = (self.tokens.ids.image_offset, self.config.vocab_size) if image else None
        return DenoiseRequest(rows=rows, pad_lens=pads, gen_length=gen_length,
                              steps=min(steps, clamp // minimal_topk), threshold=threshold, guidance=guidance,
                              vocab=vocab, stop_ids=stop_ids, temperature=temperature, generator=generator,
                              minimal_topk=minimal_topk, top_k=top_k, top_p=top_p)

    @staticmethod
    def _sprint(use_sprint: bool, keep_ratio: float, cache_warmup_steps: int, image_keep_ratio: float | None,
                text_keep_ratio: float | None, confidence_alpha: float, remasking: str) -> Sprint | None:
        """The task methods' SPRINT keywords (spec 6.2) -> the sampler's parameters (None when off)."""
        if not use_sprint:
            return None
        return Sprint(keep_ratio=keep_ratio, image_keep_ratio=image_keep_ratio, text_keep_ratio=text_keep_ratio,
                      cache_warmup_steps=cache_warmup_steps, confidence_alpha=confidence_alpha,
                      remasking=remasking)

    def _run(self, requests: list[DenoiseRequest], block_length: int, desc: str,
             sprint: Sprint | None = None, on_block: Callable[[int, int], None] | None = None,
             on_tokens: Callable[[int, list[int]], None] | None = None,
             on_finish: Callable[[int, list[int]], None] | None = None,
             admit: Callable[..., list] | None = None) -> list[list[int]]:
        # on_block(done, total): the sampler's per-block callback (the server's progress and abort);
        # on_tokens(request, ids): each request's committed ids after every block (streaming);
        # on_finish(request, ids): a request's result at the block boundary where it completes;
        # admit(block, canvas_length, fits): requests joining the running batch at that block's
        # boundary (fits None) or between its steps (those fits(request) accepts; sampling.block)
        if block_length < 1:
            raise ValueError(f"block_length must be >= 1, got {block_length}")
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(desc=desc, unit="block", leave=False)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
        logits_fn = self.logits_fn
        if getattr(logits_fn, "block_length", block_length) != block_length:
            logits_fn.block_length = block_length  # the attention mask's blocks follow the sampler's
        if (sprint is not None and not getattr(logits_fn, "sprint_views", False)
                and all(supports(r.guidance.kind) for r in requests)):
            # SPRINT's pruned steps need a logits_fn that honours the cache view.
            log.info("SPRINT runs on the clear backbone path: this logits_fn does not support cache views")
            logits_fn = BackboneLogits(self.model, block_length)
        if self.memory is not None:  # every forward holds the backbone (the decoder may take turns)
            logits_fn = self.memory.holding(logits_fn, "backbone")
        out = generate(logits_fn, requests, mask_id=self.tokens.ids.mask, block_length=block_length,
                       use_cache=self.use_cache, device=self.device,
                       progress=on_block or (progress if bar is not None else None),
                       sprint=sprint, image_offset=self.tokens.ids.image_offset, on_tokens=on_tokens,
                       on_finish=on_finish, admit=admit)
        if bar is not None:
            bar.close()
        self.last_stats = {"forwards": out.forwards, "steps_per_block": out.steps_per_block,
                           "pruned": out.pruned, "row_forwards": out.row_forwards}
        return out.tokens

    def _denoise_text(self, prompt: list[int], *, gen_length: int, steps: int, block_length: int,
                      threshold: float, temperature: float, seed: int | None,
                      stop_ids: frozenset[int], desc: str = "text", sprint: Sprint | None = None,
                      minimal_topk: int = 1, top_k: int | None = None, top_p: float | None = None) -> list[int]:
        req = self._request([prompt], gen_length=gen_length, steps=steps, threshold=threshold,
                            stop_ids=stop_ids, temperature=temperature, generator=self._generator(seed),
                            minimal_topk=minimal_topk, top_k=top_k, top_p=top_p)
        return self._run([req], block_length, desc, sprint)[0]

    def _codes(self, ids: list[int]) -> list[int]:
        """LLM image ids -> raw codes 0..K-1 (the model card's ``token_ids``: no offset)."""
        offset = self.tokens.ids.image_offset
        codes = [t - offset for t in ids]
        if any(not 0 <= c < self.config.image_vocab_size for c in codes):
            raise RuntimeError("an image canvas produced a non-image id; this is a bug")
        return codes

    # ---- tasks ----

    @staticmethod
    def _alias(name: str, value, official_name: str, official_value):
        """The official keyword (image_h / image_w) as an alias of the project's (h / w)."""
        if official_value is None:
            return value
        if value is not None and value != official_value:
            raise ValueError(f"{name}={value!r} and {official_name}={official_value!r} disagree; pass one")
        return official_value

    def understand_image(self, image_tokens: ImageInput | list[ImageInput], h: int | list[int] | None = None,
                         w: int | list[int] | None = None, question: str = "", *,
                         image_h: int | list[int] | None = None, image_w: int | list[int] | None = None,
                         template: str = "official", steps: int = 32,
                         gen_length: int = 2048, block_length: int = BLOCK_LENGTH, threshold: float = 0.95,
                         temperature: float = 0.0, minimal_topk: int = 1, seed: int | None = None,
                         use_sprint: bool = False, keep_ratio: float = 0.7, cache_warmup_steps: int = 2,
                         image_keep_ratio: float | None = None, text_keep_ratio: float | None = None,
                         confidence_alpha: float = 0.5, remasking: str = "low_confidence") -> str:
        """Answer ``question`` about one or several images; returns the answer text.

        ``image_tokens`` are encoder codes already offset by ``image_token_offset`` (as in the
        model card), in raster order, ``h * w`` of them (``image_h`` / ``image_w`` are the official
        names); or a PIL image (or path / bytes), encoded with the understanding resize. Several
        images: pass lists (of tokens, h, w, or pictures). ``template="official"`` sends what the
        official ``understand_image`` sends (image block, question, no chat turns); ``"chat"`` wraps
        it in the system/HUMAN/ASSISTANT turns. Unlike the official method, the returned text is the
        answer alone (the official decode also returns the question). ``use_sprint`` and the keywords
        after it turn on SPRINT (docs/sprint.md); the model card's example uses threshold 0.93,
        keep_ratio 0.5, cache_warmup_steps 1, image/text_keep_ratio 1.0.
        """
        h = self._alias("h", h, "image_h", image_h)
        w = self._alias("w", w, "image_w", image_w)
        sprint = self._sprint(use_sprint, keep_ratio, cache_warmup_steps, image_keep_ratio, text_keep_ratio,
                              confidence_alpha, remasking)
        if image_tokens is None or (isinstance(image_tokens, (list, tuple)) and not image_tokens):
            raise ValueError("understand_image needs an image (tokens, or a picture), or a non-empty list of them")
        images = self._image_list(image_tokens, h, w, mode="understand")
        prompt = self.tokens.understand_prompt(images, question, template)
        ids = self._denoise_text(prompt, gen_length=gen_length, steps=steps, block_length=block_length,
                                 threshold=threshold, temperature=temperature, seed=seed,
                                 stop_ids=frozenset({self.tokens.ids.eos}), sprint=sprint,
                                 minimal_topk=minimal_topk)
        return self.tokens.decode(ids)

    def generate_text(self, prompt: str | Sequence[int], *, gen_length: int = 2048, steps: int = 32,
                      block_length: int = BLOCK_LENGTH, threshold: float = 0.95, temperature: float = 0.0,
                      top_k: int | None = None, top_p: float | None = None, minimal_topk: int = 1,
                      eos_early_stop: bool = True, seed: int | None = None, use_sprint: bool = False,
                      keep_ratio: float = 0.7, cache_warmup_steps: int = 2,
                      image_keep_ratio: float | None = None, text_keep_ratio: float | None = None,
                      confidence_alpha: float = 0.5, remasking: str = "low_confidence") -> list[int]:
        """Raw block-diffusion continuation of a prompt (a string, encoded as is, or token ids): the
        official ``generate_bd``. Returns the generated ids, through the first EOS (inclusive) when
        ``eos_early_stop``; decode them with ``pipe.tokens.decode``."""
        ids = self.tokens.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt must hold at least one token")
        sprint = self._sprint(use_sprint, keep_ratio, cache_warmup_steps, image_keep_ratio, text_keep_ratio,
                              confidence_alpha, remasking)
        stops = frozenset({self.tokens.ids.eos}) if eos_early_stop else frozenset()
        return self._denoise_text(ids, gen_length=gen_length, steps=steps, block_length=block_length,
                                  threshold=threshold, temperature=temperature, seed=seed, stop_ids=stops,
                                  sprint=sprint, minimal_topk=minimal_topk, top_k=top_k, top_p=top_p)

    def chat(self, messages: list[dict] | str, *, steps: int = 32, gen_length: int = 2048,
             block_length: int = BLOCK_LENGTH, threshold: float = 0.95, temperature: float = 0.0,
             seed: int | None = None) -> str:
        """Text (and image-token) chat; ``messages`` as ``[{"role": ..., "content": ...}]`` or a string."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("chat needs a message string or a non-empty list of {'role', 'content'} dicts")
        prompt = self.tokens.chat_prompt(messages)
        ids = self._denoise_text(prompt, gen_length=gen_length, steps=steps, block_length=block_length,
                                 threshold=threshold, temperature=temperature, seed=seed,
                                 stop_ids=frozenset({self.tokens.ids.eos}))
        return self.tokens.decode(ids)

    # ---- text-to-image ----

    @staticmethod
    def _grid(image_h: int, image_w: int, strict: bool = False) -> tuple[int, int]:
        """T2I grid = (side // 2) // 16 per side, as the official ``generate_image`` computes it, so any
        side >= 32 works (1000 px gives 31 tokens, which decode to 992 px). ``strict`` asks for
        multiples of 32 instead (no silent rounding down)."""
        for name, side in (("image_h", image_h), ("image_w", image_w)):
            if not isinstance(side, int) or isinstance(side, bool) or side < 32:
                raise ValueError(f"{name} must be an integer >= 32 pixels, got {side!r}")
            if strict and side % 32:
                raise ValueError(f"{name} must be a multiple of 32 with strict_sizes=True, got {side}")
        return image_h // 2 // 16, image_w // 2 // 16

    @staticmethod
    def _check_prompt(prompt: str, what: str = "prompt") -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{what} must be a non-empty string")

    def generate_image(self, prompt: str | list[str], image_h: int = 1024, image_w: int = 1024, *,
                       steps: int = 16, cfg_scale: float = 4.0, block_length: int = BLOCK_LENGTH,
                       gen_length: int = T2I_GEN_LENGTH, mode: str = "normal", thinking_steps: int = 32,
                       thinking_gen_length: int = 4096, thinking_temperature: float = 0.0,
                       thinking_top_p: float | None = None, thinking_top_k: int | None = None,
                       threshold: float = 0.95, cfg_rescale: float = 0.7, temperature: float = 0.0,
                       minimal_topk: int = 1, strict_sizes: bool = False, seed: int | None = None,
                       use_sprint: bool = False, keep_ratio: float = 0.7, cache_warmup_steps: int = 2,
                       image_keep_ratio: float | None = None, text_keep_ratio: float | None = None,
                       confidence_alpha: float = 0.5, remasking: str = "low_confidence") -> dict | list[dict]:
        """Text to an image-code grid: ``{"token_ids", "h", "w"}`` (+ ``"thinking"`` in thinking mode).

        ``token_ids`` are raw codes (no offset), raster order, ``h * w`` of them; h, w = (side // 2) // 16.
        Defaults are the official ``generate_image``'s: steps 16, cfg_scale 4.0, cfg_rescale 0.7,
        1024 px. Guidance runs whenever cfg_scale != 1 (below 1 too, as the official does). Only the
        blocks the grid needs are generated; ``gen_length`` (the official canvas, 1088) only clamps
        steps to gen_length // minimal_topk, and grows to the grid when the grid is larger.
        ``strict_sizes`` rejects sides that are not multiples of 32. The canvas is restricted to
        image codes. A list of prompts is generated as one batch. ``use_sprint`` and the keywords
        after it turn on SPRINT (docs/sprint.md), in both phases of thinking mode.

        mode "thinking": phase 1 writes a reasoning trace (``thinking_*`` settings) that must reach
        a ``<boi>``; phase 2 continues that output verbatim (through its first ``<boi>``) and fills
        the requested grid, as the official code does.
        """
        sprint_kw = dict(use_sprint=use_sprint, keep_ratio=keep_ratio, cache_warmup_steps=cache_warmup_steps,
                         image_keep_ratio=image_keep_ratio, text_keep_ratio=text_keep_ratio,
                         confidence_alpha=confidence_alpha, remasking=remasking)
        sprint = self._sprint(**sprint_kw)
        if isinstance(prompt, (list, tuple)):
            if mode == "thinking":
                return [self.generate_image(p, image_h, image_w, steps=steps, cfg_scale=cfg_scale,
                                            block_length=block_length, gen_length=gen_length, mode=mode,
                                            thinking_steps=thinking_steps,
                                            thinking_gen_length=thinking_gen_length,
                                            thinking_temperature=thinking_temperature,
                                            thinking_top_p=thinking_top_p, thinking_top_k=thinking_top_k,
                                            threshold=threshold, cfg_rescale=cfg_rescale, temperature=temperature,
                                            minimal_topk=minimal_topk, strict_sizes=strict_sizes,
                                            seed=None if seed is None else seed + i, **sprint_kw)
                        for i, p in enumerate(prompt)]
            prompts = list(prompt)
            if not prompts:
                raise ValueError("generate_image needs a prompt, or a non-empty list of prompts")
        else:
            prompts = [prompt]
        for p in prompts:
            self._check_prompt(p)
        if mode not in ("normal", "thinking"):
            raise ValueError(f"mode must be 'normal' or 'thinking', got {mode!r}")
        check_scales(cfg_scale=cfg_scale, cfg_rescale=cfg_rescale)
        gh, gw = self._grid(image_h, image_w, strict_sizes)
        guidance = (Guidance("simple", scale=cfg_scale, rescale=cfg_rescale) if cfg_scale != 1.0
                    else Guidance())
        thinking = None
        if mode == "thinking":
            phase1 = self._denoise_text(self.tokens.thinking_prompt(prompts[0]), gen_length=thinking_gen_length,
                                        steps=thinking_steps, block_length=block_length, threshold=threshold,
                                        temperature=thinking_temperature, seed=seed,
                                        stop_ids=frozenset({self.tokens.ids.boi, self.tokens.ids.eos}),
                                        desc="thinking", sprint=sprint, minimal_topk=minimal_topk,
                                        top_k=thinking_top_k, top_p=thinking_top_p)
            thinking = phase1
            all_rows = [self.tokens.thinking_image_prompts(prompts[0], phase1, gh, gw)]
        else:
            all_rows = [self.tokens.t2i_prompts(p, gh, gw) for p in prompts]
        gen = self._generator(seed)
        requests = [self._request(rows if guidance.kind != "none" else rows[:1], gen_length=gh * gw,
                                  steps=steps, threshold=threshold, guidance=guidance, image=True,
                                  temperature=temperature, generator=gen, minimal_topk=minimal_topk,
                                  clamp_length=max(gen_length, gh * gw))
                    for rows in all_rows]
        outs = self._run(requests, block_length, "image tokens", sprint)
        results = [{"token_ids": self._codes(ids), "h": gh, "w": gw} for ids in outs]
        if thinking is not None:
            results[0]["thinking"] = self.tokens.thinking_text(thinking)
        return results if isinstance(prompt, (list, tuple)) else results[0]

    # ---- editing ----

    def _image_list(self, image_tokens, h, w, mode: str = "understand") -> list[tuple[list[int], int, int]]:
        """One image or a list of images (tokens with offset; PIL images once the encoder is loaded)."""
        many = isinstance(image_tokens, (list, tuple)) and image_tokens and not isinstance(image_tokens[0], int)
        items = list(image_tokens) if many else [image_tokens]
        hs = h if isinstance(h, (list, tuple)) else [h] * len(items)
        ws = w if isinstance(w, (list, tuple)) else [w] * len(items)
        if len(hs) != len(items) or len(ws) != len(items):
            raise ValueError(f"{len(items)} images but {len(hs)} heights and {len(ws)} widths")
        return [self._image_input(t, a, b, mode, len(items)) for t, a, b in zip(items, hs, ws)]

    def _image_input(self, item, h, w, mode: str = "understand", count: int = 1) -> tuple[list[int], int, int]:
        """Tokens (with offset) as given, or a PIL image / path / bytes encoded by the SigLIP-VQ tokenizer."""
        if _is_picture(item):
            tokens, gh, gw = self.encode_image(item, mode=mode, num_images=count)
            return tokens, gh, gw
        return self._image_item(item, h, w)

    def edit_image(self, image_tokens, h: int | list[int] | None = None, w: int | list[int] | None = None,
                   instruction: str = "", *, image_h: int | list[int] | None = None,
                   image_w: int | list[int] | None = None, steps: int = 8, block_length: int = BLOCK_LENGTH,
                   cfg_text_scale: float = 4.0, cfg_image_scale: float = 0.0, threshold: float = 0.95,
                   cfg_rescale: float = 0.7, temperature: float = 0.0, minimal_topk: int = 1,
                   output_h: int | None = None, output_w: int | None = None, seed: int | None = None,
                   use_sprint: bool = False, keep_ratio: float = 0.7, cache_warmup_steps: int = 2,
                   image_keep_ratio: float | None = None, text_keep_ratio: float | None = None,
                   confidence_alpha: float = 0.5, remasking: str = "low_confidence") -> dict:
        """Edit one image, or several references, following ``instruction``: ``{"token_ids", "h", "w"}``.

        Three-way CFG ``u + t (c - u) + i (u - n)`` with the official defaults (steps 8, text scale
        4.0, image scale 0.0, cfg_rescale 0.7); the no-image row runs only when cfg_image_scale != 0
        (its term is zero otherwise), and with both scales <= 0 no guidance runs, as in the official
        code. ``image_h`` / ``image_w`` are the official names of h / w (grid sides). The output
        grid is the (first) source grid unless output_h/output_w (grid sides in tokens) are given.
        Multi-reference layout: see ``Tokens.edit_prompts``. The SPRINT keywords are accepted, but
        editing guidance runs the baseline loop, as in the official code.
        """
        h = self._alias("h", h, "image_h", image_h)
        w = self._alias("w", w, "image_w", image_w)
        sprint = self._sprint(use_sprint, keep_ratio, cache_warmup_steps, image_keep_ratio, text_keep_ratio,
                              confidence_alpha, remasking)
        self._check_prompt(instruction, "instruction")
        check_scales(cfg_text_scale=cfg_text_scale, cfg_image_scale=cfg_image_scale, cfg_rescale=cfg_rescale)
        if image_tokens is None or (isinstance(image_tokens, (list, tuple)) and not image_tokens):
            raise ValueError("editing needs at least one source image")
        images = self._image_list(image_tokens, h, w, mode="edit")
        gh = output_h if output_h is not None else images[0][1]
        gw = output_w if output_w is not None else images[0][2]
        rows = self.tokens.edit_prompts(images, instruction, gh, gw, image_guidance=cfg_image_scale != 0)
        if cfg_text_scale > 0 or cfg_image_scale > 0:
            guidance = Guidance("edit", text_scale=cfg_text_scale, image_scale=cfg_image_scale,
                                rescale=cfg_rescale)
        else:
            guidance, rows = Guidance(), rows[:1]
        req = self._request(rows, gen_length=gh * gw, steps=steps, threshold=threshold, guidance=guidance,
                            image=True, temperature=temperature, generator=self._generator(seed),
                            minimal_topk=minimal_topk)
        ids = self._run([req], block_length, "edit tokens", sprint)[0]
        return {"token_ids": self._codes(ids), "h": gh, "w": gw}

    # ---- interleaved ----

    def interleave(self, prompt: str, *, max_frames: int = 10, steps: int = 32, image_steps: int = 32,
                   text_gen_length: int = 1024, block_length: int = BLOCK_LENGTH, cfg_scale: float = 7.5,
                   cfg_text_scale: float = 7.5, cfg_image_scale: float = 1.5, cfg_rescale: float = 0.7,
                   threshold: float = 0.95, temperature: float = 0.0, seed: int | None = None) -> list[dict]:
        """Interleaved text and images, in model order: ``[{"type": "text", "text"}, {"type": "image",
        "token_ids", "h", "w"}, ...]`` (spec 4.4e; defaults from SGLang-Omni's interleaved pipeline).

        Each text phase stops at EOS or at a model-written image header ``<|image|> r_h r_w <boi>``;
        the image phase then fills exactly that grid with image codes. Frame 0 uses simple CFG, later
        frames editing-style CFG against the history. A ``<boi>`` without a valid header, or a header
        after ``max_frames`` images, ends the generation (its text is kept).
        """
        self._check_prompt(prompt)
        if max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        check_scales(cfg_scale=cfg_scale, cfg_text_scale=cfg_text_scale,
                          cfg_image_scale=cfg_image_scale, cfg_rescale=cfg_rescale)
        ids = self.tokens.ids
        gen = self._generator(seed)
        history = self.tokens.interleave_prompt(prompt)
        segments: list[dict] = []
        frames = 0
        limit = self.config.max_position_embeddings
        while True:
            budget = min(text_gen_length, limit - len(history))
            if budget < 1:
                break
            req = self._request([history], gen_length=budget, steps=steps, threshold=threshold,
                                stop_ids=frozenset({ids.eos, ids.boi}), temperature=temperature, generator=gen)
            out = self._run([req], block_length, "text")[0]
            header = self.tokens.parse_image_header(out) if out and out[-1] == ids.boi else None
            text_ids = out[:-4] if header else [t for t in out if t not in (ids.eos, ids.boi)]
            text = self.tokens.decode(text_ids)
            if text:
                segments.append({"type": "text", "text": text})
            if header is None or frames >= max_frames:
                break
            gh, gw = header
            cond = history + out
            if frames == 0:
                rows = [cond, self.tokens.interleave_uncond_first(gh, gw)]
                guidance = Guidance("simple", scale=cfg_scale, rescale=cfg_rescale)
            else:
                rows = [cond, *self.tokens.interleave_uncond_later(history, out, gh, gw)]
                guidance = Guidance("edit", text_scale=cfg_text_scale, image_scale=cfg_image_scale,
                                    rescale=cfg_rescale)
                if cfg_image_scale <= 0:
                    rows = rows[:2]
            if len(cond) + gh * gw + 1 > limit:
                log.warning("interleave: no room for a %dx%d image in the context; stopping", gh, gw)
                break
            req = self._request(rows, gen_length=gh * gw, steps=image_steps, threshold=threshold,
                                guidance=guidance, image=True, temperature=temperature, generator=gen)
            image_ids = self._run([req], block_length, "image tokens")[0]
            segments.append({"type": "image", "token_ids": self._codes(image_ids), "h": gh, "w": gw})
            history = cond + image_ids + [ids.eoi]
            frames += 1
        return segments

    # ---- image side: pixels <-> codes ----

    def _image_root(self) -> Path:
        if self.path is None:
            raise RuntimeError("this pipeline was built without a checkpoint folder: no image components")
        return self.path

    @property
    def image_tokenizer(self):
        """The SigLIP-VQ encoder from ``image_tokenizer/``, loaded on first use and kept."""
        if self._image_tokenizer is None:
            from .models.image_tokenizer import ImageTokenizer
            folder = self._image_root() / "image_tokenizer"
            if self.memory is None:
                self._image_tokenizer = ImageTokenizer.from_pretrained(folder, device=self.image_device,
                                                                       dtype=self.image_dtype)
            else:  # loaded on the CPU, then a group of the arena
                tok = ImageTokenizer.from_pretrained(folder, device="cpu", dtype=self.image_dtype)
                self.memory.add("encoder", tok)
                self._image_tokenizer = tok
        return self._image_tokenizer

    @property
    def image_decoder(self):
        """SigVQ + Z-Image DiT (normal and/or turbo) + VAE, loaded on first use and kept."""
        if self._image_decoder is None:
            from .models.decoder import ImageDecoder
            self._image_decoder = ImageDecoder.from_pretrained(
                self._image_root(), device=self.image_device, dtype=self.image_dtype,
                keep_resident=self.keep_decoder)
            self._image_decoder.compile_dit = self.compile_decoder
            self._image_decoder.memory, self._image_decoder.quant = self.memory, self.decoder_quant
        return self._image_decoder

    def encode_image(self, image, *, mode: str = "understand", num_images: int = 1) -> tuple[list[int], int, int]:
        """A picture (PIL image, path or bytes) -> (image tokens WITH the LLM offset, h, w).

        mode "understand": smart resize within the pixel budget (one image: up to 800x800;
        several: 448x448); "edit": the reference's centre crop to a ~512x512-area candidate size.
        """
        from .preprocess import load_image
        picture = load_image(image)
        tokenizer = self.image_tokenizer
        with self.holding("encoder"):
            codes, grids = tokenizer.encode([picture], mode=mode, num_images=num_images)
        h, w = grids[0]
        return (codes[0] + self.tokens.ids.image_offset).tolist(), h, w

    def decode_tokens(self, token_ids, h: int, w: int, mode: str = "turbo", steps: int | None = None,
                      resolution_multiplier: int = 2, seed: int | None = None):
        """Raw codes (no offset, raster order) of an h x w grid -> PIL image of
        (w * 16 * rm) x (h * 16 * rm) pixels. mode "turbo" (8 steps, decoder-turbo/) or "normal"
        (50-point grid = 49 Euler steps with CFG, decoder/)."""
        if isinstance(token_ids, Tensor):
            token_ids = token_ids.flatten().tolist()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(desc=f"decoder ({mode})", unit="step", leave=False)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
        try:
            return self.image_decoder.decode(list(token_ids), h, w, mode=mode, steps=steps,
                                             resolution_multiplier=resolution_multiplier, seed=seed,
                                             progress=progress if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()

    def text_to_image(self, prompt: str, image_h: int = 1024, image_w: int = 1024, *,
                      decode_mode: str = "turbo", decoder_steps: int | None = None,
                      resolution_multiplier: int = 2, seed: int | None = None, **kwargs):
        """Prompt -> PIL image in one call (tokens with ``generate_image``, then ``decode_tokens``)."""
        result = self.generate_image(prompt, image_h, image_w, seed=seed, **kwargs)
        return self.decode_tokens(result["token_ids"], result["h"], result["w"], mode=decode_mode,
                                  steps=decoder_steps, resolution_multiplier=resolution_multiplier, seed=seed)

    def edit(self, image, instruction: str, *, decode_mode: str = "turbo", decoder_steps: int | None = None,
             resolution_multiplier: int = 2, seed: int | None = None, **kwargs):
        """Picture(s) + instruction -> edited PIL image in one call."""
        result = self.edit_image(image, instruction=instruction, seed=seed, **kwargs)
        return self.decode_tokens(result["token_ids"], result["h"], result["w"], mode=decode_mode,
                                  steps=decoder_steps, resolution_multiplier=resolution_multiplier, seed=seed)
