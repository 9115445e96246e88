"""Tokenizer wrapper and prompt layouts: the one home of every special id and every template.

Ids are never hard-coded. Each special token is looked up by its string in the checkpoint's
tokenizer, with the checkpoint config as the fallback (spec backbone.md 4.1). Prompts are built the
way the Uni task methods build them (spec 4.3/4.4): pieces concatenated with no separators, each
run of text encoded in one call with ``add_special_tokens=False``, image ids inserted as ids.

User text is encoded like the reference does it, so a special-token string typed by a user
(``<role>`` say) becomes that special token; the edges (CLI, server) decide whether to filter it.
"""

from __future__ import annotations

import json
import logging
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .config import BackboneConfig

if TYPE_CHECKING:
    import tokenizers
    import torch

logger = logging.getLogger(__name__)

# System texts of the hand-built Uni template (spec 4.3); "a interleaved" is the checkpoint's own typo.
SYSTEM_UNDERSTAND = "You are a multimodal understanding assistant."
SYSTEM_T2I = "You are a text-to-image generation assistant."
SYSTEM_T2I_THINKING = "You are a text-to-image generation assistant with a thinking process."
SYSTEM_EDIT = "You are an image editing assistant."
SYSTEM_INTERLEAVED = "You are a interleaved generation assistant."

HUMAN = "<role>HUMAN</role>"
ASSIST = "<role>ASSISTANT</role>"
UNCONDITION = "<uncondition>"

_RESERVED = re.compile(r"<\|reserved_token_(\d+)\|>")

ImageIds = Union[Sequence[int], "torch.Tensor"]
Image = tuple[ImageIds, int, int]  # (image ids = offset + code, grid_h, grid_w)
Piece = Union[str, list[int]]  # text to encode, or ids to insert as they are


def system_turn(text: str) -> str:
    """SYS(x) of spec 4.3: one space after ``</role>`` and one after the system text."""
    return f"<role>SYSTEM</role> {text} "


class TokenError(ValueError):
    """Token ids or a tokenizer that cannot form a valid prompt."""


@dataclass(frozen=True)
class SpecialIds:
    eos: int
    pad: int
    mask: int
    soi: int  # "<|image|>": opens an image block
    eoi: int  # "<|/image|>": closes it
    boi: int  # "<boi>": ends the size header; image ids follow
    role_open: int  # "<role>"
    role_close: int  # "</role>"
    image_offset: int
    image_vocab_size: int

    def is_image(self, token_id: int) -> bool:
        return self.image_offset <= token_id < self.image_offset + self.image_vocab_size


def align_rows(rows: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[int]]:
    """CFG rows brought to the conditional row's length, as the official code does; returns rows and
    left-pad lengths.

    Row 0 (the conditional prompt) keeps its layout. A shorter unconditional row is left-padded
    with ``pad_id`` (callers pass the mask id); a longer one loses its first ids (the official cuts it
    on the left, so a short prompt's uncond row can lose the start of its system turn).
    """
    if not rows:
        return [], []
    width = len(rows[0])
    out, pads = [], []
    for r in rows:
        r = list(r)
        pad = max(0, width - len(r))
        out.append([pad_id] * pad + r[len(r) - width + pad:])
        pads.append(pad)
    return out, pads


def _as_ids(ids: Any) -> list[int]:
    """A list of Python ints from a list, tuple, torch tensor or numpy array (any shape, raster order)."""
    if hasattr(ids, "reshape") and hasattr(ids, "tolist"):
        ids = ids.reshape(-1).tolist()
    out = []
    for i in ids:
        # int() would silently truncate a float code; reject it instead.
        if not isinstance(i, numbers.Integral):
            raise TokenError(f"token ids must be integers, got {type(i).__name__} {i!r}")
        out.append(int(i))
    return out


def _token_name(tokenizer_config: dict, key: str, default: str) -> str:
    value = tokenizer_config.get(key)
    if isinstance(value, dict):  # HF serialises AddedToken as {"content": ...}
        value = value.get("content")
    return value or default


def _lookup(tokenizer: "tokenizers.Tokenizer", what: str, string: str,
            fallback: int | None, config_ids: Sequence[int]) -> int:
    """Id of ``string`` in the tokenizer, else ``fallback`` from the config.

    When both exist and differ the tokenizer wins: it is what encoded the prompts the model saw.
    """
    found = tokenizer.token_to_id(string)
    if found is None:
        if fallback is None:
            raise TokenError(f"the tokenizer has no {string!r} token ({what}) and the config has no "
                             f"id for it; the prompt layouts need it")
        logger.warning("tokenizer has no %r token (%s); using the config's id %d", string, what, fallback)
        return fallback
    if config_ids and found not in config_ids:
        logger.warning("%s: tokenizer has %r = %d but the config says %s; using the tokenizer's id",
                       what, string, found, list(config_ids))
    return found


def _resolve_ids(tokenizer: "tokenizers.Tokenizer", config: BackboneConfig,
                 tokenizer_config: dict) -> SpecialIds:
    cfg_eos = config.eos_token_id
    if cfg_eos is None:
        cfg_eos_list = []
    else:
        cfg_eos_list = list(cfg_eos) if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]
    eos_name = _token_name(tokenizer_config, "eos_token", "<|endoftext|>")
    eos = _lookup(tokenizer, "eos", eos_name,
                  cfg_eos_list[0] if cfg_eos_list else config.pad_token_id, cfg_eos_list)
    pad = _lookup(tokenizer, "pad", _token_name(tokenizer_config, "pad_token", eos_name),
                  config.pad_token_id, [config.pad_token_id])
    mask = _lookup(tokenizer, "mask", _token_name(tokenizer_config, "mask_token", "<|mask|>"),
                   config.mask_token_id, [config.mask_token_id])
    # No config key exists for these: a tokenizer without them cannot build any Uni prompt.
    structural = {name: _lookup(tokenizer, name, string, None, ())
                  for name, string in [("soi", "<|image|>"), ("eoi", "<|/image|>"), ("boi", "<boi>"),
                                       ("role_open", "<role>"), ("role_close", "</role>")]}
    ids = SpecialIds(eos=eos, pad=pad, mask=mask, **structural,
                     image_offset=config.image_token_offset, image_vocab_size=config.image_vocab_size)
    for name in ("eos", "pad", "mask", *structural):
        value = getattr(ids, name)
        if not 0 <= value < ids.image_offset:
            raise TokenError(f"special token {name} = {value} is not a text id "
                             f"(text ids lie below image_token_offset {ids.image_offset})")
    return ids


class Tokens:
    """The tokenizer plus every special id and prompt layout of LLaDA2.0-Uni."""

    def __init__(self, tokenizer: "tokenizers.Tokenizer", config: BackboneConfig,
                 tokenizer_config: dict | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.ids = _resolve_ids(tokenizer, config, tokenizer_config or {})
        self._text_vocab = min(tokenizer.get_vocab_size(with_added_tokens=True), self.ids.image_offset)

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: BackboneConfig) -> "Tokens":
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenError(f"tokenizer file not found: {path}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenError(f"cannot load {path}: {e}") from None
        tokenizer_config = None
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                tokenizer_config = json.loads(config_path.read_text())
            except json.JSONDecodeError as e:
                raise TokenError(f"{config_path} is not valid JSON: {e}") from None
        return cls(tokenizer, config, tokenizer_config)


    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | "torch.Tensor") -> str:
        # Image ids may lie outside the tokenizer's vocabulary (or map to <IMAGEk> strings): drop them first.
        text_ids = [i for i in _as_ids(ids) if 0 <= i < self._text_vocab]
        return self.tokenizer.decode(text_ids, skip_special_tokens=True)

    def _join(self, *pieces: Piece) -> list[int]:
        """Concatenate pieces; adjacent strings are encoded as one run, as the reference encodes one string.

        Wherever a text run meets an id piece, one of the two sides is a special token, so the runs
        split exactly where the reference's single-string encoding splits.
        """
        out: list[int] = []
        run: list[str] = []
        for piece in pieces:
            if isinstance(piece, str):
                run.append(piece)
                continue
            if run:
                out += self.encode("".join(run))
                run = []
            out += piece
        if run:
            out += self.encode("".join(run))
        return out


    def reserved_id(self, n: int) -> int:
        """Id of ``<|reserved_token_n|>``, which encodes a grid side of n tokens in an image header."""
        token_id = self.tokenizer.token_to_id(f"<|reserved_token_{n}|>")
        if token_id is None:
            raise TokenError(f"grid side {n} has no reserved token in this tokenizer "
                             f"(<|reserved_token_{n}|> is missing); resize the image")
        return token_id

    def _reserved_side(self, token_id: int) -> int | None:
        """Inverse of reserved_id: the n of ``<|reserved_token_n|>``, or None for any other id."""
        if token_id < 0:
            return None
        match = _RESERVED.fullmatch(self.tokenizer.id_to_token(int(token_id)) or "")
        return int(match.group(1)) if match else None

    def image_header(self, h: int, w: int) -> list[int]:
        for side in (h, w):
            if not isinstance(side, numbers.Integral) or side < 1:
                raise TokenError(f"image grid sides must be positive integers, got {h}x{w}")
        return [self.ids.soi, self.reserved_id(h), self.reserved_id(w), self.ids.boi]

    def image_block(self, image_ids: ImageIds, h: int, w: int) -> list[int]:
        """Header + h*w image ids (raster order) + ``<|/image|>``; the ids are offset + code."""
        header = self.image_header(h, w)
        ids = _as_ids(image_ids)
        if len(ids) != h * w:
            raise TokenError(f"image has {len(ids)} tokens but a {h}x{w} grid needs {h * w}")
        bad = [i for i in ids if not self.ids.is_image(i)]
        if bad:
            lo, hi = self.ids.image_offset, self.ids.image_offset + self.ids.image_vocab_size
            hint = (f"; they look like raw codes: add image_token_offset {lo}"
                    if all(0 <= i < self.ids.image_vocab_size for i in ids) else "")
            raise TokenError(f"{len(bad)} image ids lie outside the image range [{lo}, {hi}), "
                             f"first {bad[0]}{hint}")
        return header + ids + [self.ids.eoi]

    def parse_image_header(self, ids: Sequence[int]) -> tuple[int, int] | None:
        """(h, w) when the last 4 ids are a complete header ``[soi, r_h, r_w, boi]``, else None."""
        ids = _as_ids(ids)
        if len(ids) < 4 or ids[-4] != self.ids.soi or ids[-1] != self.ids.boi:
            return None
        h, w = self._reserved_side(ids[-3]), self._reserved_side(ids[-2])
        if not h or not w:  # None, or a zero side
            return None
        return h, w

    def _blocks(self, images: Sequence[Image]) -> list[list[int]]:
        blocks = []
        for image in images:
            if len(image) != 3:
                raise TokenError("each image must be a (ids, h, w) tuple")
            blocks.append(self.image_block(*image))
        return blocks


    def understand_prompt(self, images: Sequence[Image], question: str, template: str = "official") -> list[int]:
        """The understanding prompt.

        "official" (the default): what the official ``understand_image`` sends, image block(s) then
        the question, with no system or role turns. Several images: their blocks in order (this
        project's extension). "chat": the same inside the hand-built chat turns (system text,
        HUMAN, ASSISTANT), the layout ``chat_prompt`` continues for multi-turn chat.
        """
        if template == "official":
            return self._join(*self._blocks(images), question)
        if template == "chat":
            return self._join(system_turn(SYSTEM_UNDERSTAND), HUMAN, *self._blocks(images), question, ASSIST)
        raise TokenError(f"unknown understanding template {template!r} (expected 'official' or 'chat')")

    def chat_prompt(self, messages: Sequence[dict], official_single_turn: bool = True) -> list[int]:
        """Multi-turn understanding chat, laid out as SGLang-Omni lays it out (unvalidated against HF).

        With ``official_single_turn`` (the default), a conversation that is one user message holding
        images (system messages aside) is what the official ``understand_image`` sends instead
        (``understand_prompt(..., "official")``: no chat turns); every other conversation uses the
        chat turns below.

        The HF API is single-turn; the multi-turn format (``HUMAN``/``ASSIST`` turns concatenated with
        nothing between them, no EOS after answers) is SGLang-Omni's and is unvalidated. System
        messages are dropped, as SGLang does: the understanding system text is always used. A user
        message puts all its images first, in order, then its text parts joined with nothing between.
        With ``official_single_turn=False``, one user message holding images and a question gives
        ``understand_prompt(..., "chat")``.
        """
        turns = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
        if official_single_turn and len(turns) == 1 and isinstance(turns[0], dict) \
                and turns[0].get("role") == "user":
            images, text = self._content(turns[0].get("content", ""))
            if images:
                return self.understand_prompt(images, text, "official")
        pieces: list[Piece] = [system_turn(SYSTEM_UNDERSTAND)]
        last_role = None
        for message in messages:
            if not isinstance(message, dict):
                raise TokenError(f"chat messages must be dicts with role and content, got {message!r}")
            role = message.get("role")
            if role == "system":
                continue
            images, text = self._content(message.get("content", ""))
            if role == "user":
                pieces += [HUMAN, *self._blocks(images), text]
            elif role == "assistant":
                if images:
                    raise TokenError("assistant messages cannot hold images in a chat prompt")
                pieces += [ASSIST, text]
            else:
                raise TokenError(f"unknown chat role {role!r} (expected system, user or assistant)")
            last_role = role
        if last_role != "user":
            raise TokenError("a chat prompt must end with a user message")
        return self._join(*pieces, ASSIST)

    @staticmethod
    def _content(content: Any) -> tuple[list[Image], str]:
        if isinstance(content, str):
            return [], content
        if not isinstance(content, (list, tuple)):
            raise TokenError(f"message content must be a string or a list of parts, got {type(content).__name__}")
        images, texts = [], []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(part.get("text", ""))
            elif kind == "image":
                try:
                    images.append((part["tokens"], part["h"], part["w"]))
                except KeyError as e:
                    raise TokenError(f"image part is missing {e.args[0]!r} (needs tokens, h, w)") from None
            else:
                raise TokenError(f"unsupported content part {part!r} (expected type text or image)")
        return images, "".join(texts)

    def t2i_prompts(self, prompt: str, grid_h: int, grid_w: int) -> list[list[int]]:
        """Spec 4.4(b): [cond, uncond]; the canvas of grid_h*grid_w masks follows the header."""
        header = self.image_header(grid_h, grid_w)
        sys = system_turn(SYSTEM_T2I)
        return [self._join(sys, HUMAN, prompt, ASSIST, header),
                self._join(sys, HUMAN, UNCONDITION, ASSIST, header)]

    def thinking_prompt(self, prompt: str) -> list[int]:
        """Spec 4.4(c) phase 1: the model writes its reasoning, then ``<boi>`` (or EOS)."""
        return self._join(system_turn(SYSTEM_T2I_THINKING), HUMAN, prompt, ASSIST)

    def _thinking_trace(self, thinking_ids: Any) -> list[int]:
        """Phase-1 ids through the first ``<boi>``, verbatim; a TokenError if there is none before EOS."""
        ids = _as_ids(thinking_ids)
        for i, t in enumerate(ids):
            if t == self.ids.boi:
                return ids[: i + 1]
            if t == self.ids.eos:
                break
        raise TokenError("the thinking phase did not write a <boi> token before it ended; try a larger "
                         "thinking_gen_length or other sampling settings")

    def thinking_text(self, thinking_ids: Any) -> str:
        """The reasoning trace shown to the user: phase-1 output before ``<boi>``, specials skipped."""
        return self.decode(self._thinking_trace(thinking_ids)[:-1])

    def thinking_image_prompts(self, prompt: str, thinking_ids: Any, grid_h: int,
                               grid_w: int) -> list[list[int]]:
        """Thinking phase 2, as the official ``generate_image``: [cond, uncond].

        cond = phase-1 prompt + the phase-1 output verbatim through its first ``<boi>`` (whatever
        header the model wrote, or none); the REQUESTED grid is generated. uncond = the thinking
        system turn with ``<uncondition>`` + the requested header.
        """
        header = self.image_header(grid_h, grid_w)
        cond = self.thinking_prompt(prompt) + self._thinking_trace(thinking_ids)
        uncond = self._join(system_turn(SYSTEM_T2I_THINKING), HUMAN, UNCONDITION, ASSIST, header)
        return [cond, uncond]

    def edit_prompts(self, images: Sequence[Image], instruction: str, grid_h: int, grid_w: int,
                     image_guidance: bool) -> list[list[int]]:
        """Spec 4.4(d): [cond, u (no text)] + [ui (no image)] when image_guidance.

        Multi-reference editing (several images) uses THIS PROJECT'S OWN layout, since no published
        source shows one: each reference is a full image block at the start of the user turn, in
        the given order, and the "ui" row keeps one lone ``<|image|>`` per reference. With one image
        this is exactly the published single-source layout.
        """
        if not images:
            raise TokenError("editing needs at least one source image")
        blocks = self._blocks(images)
        header = self.image_header(grid_h, grid_w)
        sys = system_turn(SYSTEM_EDIT)
        rows = [self._join(sys, HUMAN, *blocks, instruction, ASSIST, header),
                self._join(sys, HUMAN, *blocks, UNCONDITION, ASSIST, header)]
        if image_guidance:
            rows.append(self._join(sys, HUMAN, [self.ids.soi] * len(blocks), instruction, ASSIST, header))
        return rows

    def interleave_prompt(self, text: str) -> list[int]:
        """Spec 4.4(e): the model alternates text and ``header, image ids, <|/image|>`` frames."""
        return self._join(system_turn(SYSTEM_INTERLEAVED), HUMAN, text, ASSIST)

    def interleave_uncond_first(self, grid_h: int, grid_w: int) -> list[int]:
        """Spec 4.4(e), frame 0: the simple-CFG unconditional row."""
        return self._join(system_turn(SYSTEM_INTERLEAVED), HUMAN, UNCONDITION, ASSIST,
                          self.image_header(grid_h, grid_w))

    def interleave_uncond_later(self, history: Sequence[int], current_text: Sequence[int],
                                grid_h: int, grid_w: int) -> list[list[int]]:
        """Spec 4.4(e), later frames: [u, ui] for editing-style CFG.

        ``history`` holds the sequence so far (it must contain an earlier ``<|/image|>``);
        ``current_text`` holds the text ids written since that image. A complete model-written header
        at the end of ``current_text`` is dropped, as the requested header is appended to both rows.
        """
        history = _as_ids(history)
        if self.ids.eoi not in history:
            raise TokenError("interleaved history has no <|/image|>: use interleave_uncond_first")
        end = len(history) - history[::-1].index(self.ids.eoi)  # just past the last <|/image|>
        text = _as_ids(current_text)
        if self.parse_image_header(text) is not None:
            text = text[:-4]
        header = self.image_header(grid_h, grid_w)
        u = self._join(history[:end], UNCONDITION, header)
        ui = self._join(system_turn(SYSTEM_INTERLEAVED), HUMAN, UNCONDITION, ASSIST, text, header)
        return [u, ui]
