"""The tasks of LLaDA2.0-Uni on one object: ``LLaDA2Uni``.

Method names, arguments and return values follow the model card's remote-code API
(``understand_image`` ...), so switching from the remote code means changing the import.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .config import BackboneConfig
from .models.backbone import LLaDA2MoeForLM
from .ops.attention import block_causal_mask, rope_positions
from .sampling.block import DenoiseRequest, generate
from .tokens import Tokens, TokenError, align_left
from .weights import load_backbone, resolve_checkpoint, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

BLOCK_LENGTH = 32


class BackboneLogits:
    """The backbone as the sampler's ``logits_fn``: builds positions and the block-causal mask."""

    def __init__(self, model: LLaDA2MoeForLM, block_length: int = BLOCK_LENGTH) -> None:
        self.model = model
        self.block_length = block_length

    def new_cache(self, rows: int, max_len: int):
        return self.model.new_cache(rows, max_len)

    @torch.inference_mode()
    def __call__(self, ids: Tensor, start: int, pad_lens: Tensor, cache, num_logits: int) -> Tensor:
        end = start + ids.shape[1]
        positions = rope_positions(start, end, pad_lens)
        mask = block_causal_mask(start, end, pad_lens, self.block_length)
        return self.model(ids, positions, mask, cache=cache, start=start, num_logits=num_logits)


ImageInput = Tensor | Sequence[int]


class LLaDA2Uni:
    """LLaDA2.0-Uni: backbone, tokenizer and (later) the image side, loaded once."""

    def __init__(self, model: LLaDA2MoeForLM, tokens: Tokens, path: Path | None = None) -> None:
        self.model = model
        self.tokens = tokens
        self.config: BackboneConfig = model.config
        self.path = path
        self.logits_fn = BackboneLogits(model)
        self.use_cache = True

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, revision: str | None = None) -> "LLaDA2Uni":
        """Load from a local folder or a Hub repo id. ``dtype`` defaults to bfloat16 (float32 on CPU)."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, default=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        directory = resolve_checkpoint(path_or_repo, revision=revision)
        model = load_backbone(directory, device=dev, dtype=dt)
        tokens = Tokens.from_pretrained(directory, model.config)
        return cls(model, tokens, directory)

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

    def _denoise_text(self, prompt: list[int], *, gen_length: int, steps: int, block_length: int,
                      threshold: float, temperature: float, seed: int | None,
                      stop_ids: frozenset[int]) -> list[int]:
        if gen_length < 1:
            raise ValueError(f"gen_length must be >= 1, got {gen_length}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self._check_length(len(prompt), gen_length)
        rows, pads = align_left([prompt], self.tokens.ids.mask)
        req = DenoiseRequest(rows=rows, pad_lens=pads, gen_length=gen_length, steps=steps,
                             threshold=threshold, stop_ids=stop_ids, temperature=temperature,
                             generator=self._generator(seed))
        out = generate(self.logits_fn, [req], mask_id=self.tokens.ids.mask, block_length=block_length,
                       use_cache=self.use_cache, device=self.device)
        return out.tokens[0]

    # ---- tasks ----

    def understand_image(self, image_tokens: ImageInput | list[ImageInput], h: int | list[int] | None = None,
                         w: int | list[int] | None = None, question: str = "", *, steps: int = 32,
                         gen_length: int = 2048, block_length: int = BLOCK_LENGTH, threshold: float = 0.95,
                         temperature: float = 0.0, seed: int | None = None) -> str:
        """Answer ``question`` about one or several images given as image tokens.

        ``image_tokens`` are encoder codes already offset by ``image_token_offset`` (as in the
        model card), in raster order, ``h * w`` of them. Several images: pass lists of tokens, h, w.
        """
        if isinstance(image_tokens, (list, tuple)) and image_tokens and not isinstance(image_tokens[0], int):
            hs = h if isinstance(h, (list, tuple)) else [h] * len(image_tokens)
            ws = w if isinstance(w, (list, tuple)) else [w] * len(image_tokens)
            if len(hs) != len(image_tokens) or len(ws) != len(image_tokens):
                raise ValueError("pass one h and one w per image")
            images = [self._image_item(t, a, b) for t, a, b in zip(image_tokens, hs, ws)]
        else:
            images = [self._image_item(image_tokens, h, w)]
        prompt = self.tokens.understand_prompt(images, question)
        ids = self._denoise_text(prompt, gen_length=gen_length, steps=steps, block_length=block_length,
                                 threshold=threshold, temperature=temperature, seed=seed,
                                 stop_ids=frozenset({self.tokens.ids.eos}))
        return self.tokens.decode(ids)

    def chat(self, messages: list[dict] | str, *, steps: int = 32, gen_length: int = 2048,
             block_length: int = BLOCK_LENGTH, threshold: float = 0.95, temperature: float = 0.0,
             seed: int | None = None) -> str:
        """Text (and image-token) chat; ``messages`` as ``[{"role": ..., "content": ...}]`` or a string."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        prompt = self.tokens.chat_prompt(messages)
        ids = self._denoise_text(prompt, gen_length=gen_length, steps=steps, block_length=block_length,
                                 threshold=threshold, temperature=temperature, seed=seed,
                                 stop_ids=frozenset({self.tokens.ids.eos}))
        return self.tokens.decode(ids)
