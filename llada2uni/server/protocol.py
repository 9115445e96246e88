"""The HTTP side of the API: request bodies, their validation, and OpenAI-style errors.

Bodies follow OpenAI's images and chat APIs; fields marked "extension" are this server's (the
generation knobs of LLaDA2.0-Uni, named as in the pipeline and in SGLang-Omni's ``image_generation``).
Unknown fields are ignored, so OpenAI clients that send ``user`` or ``quality`` keep working; a known
field of the wrong type or out of range is a 400 naming it.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


Seed = Annotated[int, Field(ge=0, lt=2 ** 63)]
Steps = Annotated[int, Field(ge=1, le=256)]
Scale = Annotated[float, Field(ge=0.0, le=100.0)]
DecoderSteps = Annotated[int, Field(ge=1, le=200)]
DecodeMode = Literal["turbo", "normal", "decoder-turbo"]  # "decoder-turbo": SGLang-Omni's name for turbo


class ImageGenerationBody(_Body):
    prompt: Annotated[str, Field(min_length=1, max_length=32_000)]
    model: str | None = None
    n: Annotated[int, Field(ge=1)] = 1
    size: str | None = None  # "WIDTHxHEIGHT", multiples of 32
    response_format: str = "b64_json"  # b64_json, or "tokens" (extension: codes only, no decoding)
    seed: Seed | None = None
    stream: bool = False
    # extensions (defaults: the official generate_image's)
    steps: Steps = 16
    cfg_scale: Scale = 4.0
    mode: Literal["normal", "thinking"] = "normal"
    thinking_steps: Steps = 32
    thinking_max_tokens: Annotated[int, Field(ge=1, le=8192)] = 1024
    decode_mode: DecodeMode = "turbo"
    decoder_steps: DecoderSteps | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0


class ImageEditBody(BaseModel):
    """The non-file fields of a multipart edit; form values are strings, so types are coerced."""
    model_config = ConfigDict(extra="ignore")

    prompt: Annotated[str, Field(min_length=1, max_length=32_000)]
    model: str | None = None
    n: Annotated[int, Field(ge=1)] = 1
    size: str | None = None  # output size; default: the (first) source's grid
    response_format: str = "b64_json"
    seed: Seed | None = None
    stream: bool = False
    steps: Steps = 8
    cfg_text_scale: Scale = 4.0
    cfg_image_scale: Scale = 0.0
    decode_mode: DecodeMode = "turbo"
    decoder_steps: DecoderSteps | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str
    detail: str | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class ImageOptions(_Body):
    """``image_generation`` of a chat request with ``modalities: ["image"]`` (SGLang-Omni's names)."""
    mode: Literal["normal", "thinking"] = "normal"
    decode_mode: DecodeMode = "turbo"
    decoder_steps: DecoderSteps | None = None
    seed: Seed | None = None
    cfg_scale: Scale = 4.0
    cfg_text_scale: Scale = 4.0
    cfg_image_scale: Scale = 0.0
    image_h: int | None = None
    image_w: int | None = None
    size: str | None = None
    dllm_steps: Steps | None = None  # default: the official 16 (generation) / 8 (editing)


class ChatBody(_Body):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str | None = None
    stream: bool = False
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    seed: Seed | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    modalities: list[Literal["text", "image"]] = ["text"]
    image_generation: ImageOptions | None = None
    # extensions: denoising steps per block and the commit threshold
    steps: Steps = 32
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95


def _where(loc: tuple) -> str:
    """pydantic's error location as a field path: messages.0.content, without union branch names."""
    parts = [str(p) for p in loc if isinstance(p, int) or ("[" not in str(p) and p not in ("str", "ImageURL"))]
    return ".".join(parts)


def validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err['msg'].removeprefix('Invalid JSON: ')}")
    where = _where(err["loc"])
    if not where:
        return APIError(400, f"the request body must be a JSON object ({err['msg']})")
    if err["type"] == "missing":
        return APIError(400, f"missing required field '{where}'", param=where)
    got = err.get("input")
    shown = repr(got) if isinstance(got, (int, float, str, bool)) and len(repr(got)) < 60 else type(got).__name__
    return APIError(400, f"{where}: {err['msg']} (got {shown})", param=where)


def parse_json(model: type[BaseModel], raw: bytes) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from None


def parse_form(model: type[BaseModel], fields: dict[str, str]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        raise validation_error(e) from None


def parse_size(size: str, *, max_side: int, param: str = "size") -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height); sides positive multiples of 32, at most ``max_side``."""
    try:
        w, h = (int(s) for s in size.lower().split("x"))
    except ValueError:
        raise APIError(400, f"{param} must look like '1024x1024' (WIDTHxHEIGHT), got {size!r}", param=param) from None
    check_sides(w, h, max_side=max_side, param=param)
    return w, h


def check_sides(w: int, h: int, *, max_side: int, param: str = "size") -> None:
    for side in (w, h):
        if side < 32 or side % 32:
            raise APIError(400, f"{param}: width and height must be positive multiples of 32, got {w}x{h}",
                           param=param)
        if side > max_side:
            raise APIError(400, f"{param}: {w}x{h} is larger than this server's limit of {max_side} "
                           "pixels a side", param=param)


def data_uri_bytes(url: str, param: str) -> bytes:
    """The bytes of a ``data:[type];base64,...`` URI."""
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise APIError(400, f"{param}: expected a base64 data URI like 'data:image/png;base64,...'", param=param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data URI's base64 payload is malformed", param=param) from None
