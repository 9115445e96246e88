"""What one request does, run in its job thread: the pipeline's own task methods, with every piece of
model work handed to the scheduler's worker (see scheduler.py). Returns plain Python values.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from ..pipeline import LLaDA2Uni
from .scheduler import Job


class JobPipeline(LLaDA2Uni):
    """The shared pipeline as one job sees it: same model and tokenizer, but ``_run`` (the one place
    the task methods denoise) hands its requests to the scheduler, which batches them with the
    requests of other jobs. Only token-level inputs reach it: pictures are encoded on the worker first.
    """

    def __init__(self, pipe: LLaDA2Uni, job: Job) -> None:  # noqa: super().__init__ would rebuild state
        self.__dict__.update(pipe.__dict__)
        self.job = job

    def _run(self, requests, block_length, desc="", sprint=None):
        return self.job.denoise(requests, block_length, sprint)


@dataclass
class Picture:
    """An uploaded image, already decoded and size-checked (``preprocess.load_image``)."""
    image: Any  # PIL.Image.Image
    name: str


def encode_pictures(job: Job, pipe: LLaDA2Uni, pictures: list[Picture], mode: str) -> list[tuple]:
    """Pictures -> [(image ids with the LLM offset, grid h, grid w)], on the worker."""
    def run():
        return [pipe.encode_image(p.image, mode=mode, num_images=len(pictures)) for p in pictures]
    return job.call(run) if pictures else []


def decode_png(job: Job, pipe: LLaDA2Uni, result: dict, *, mode: str, steps: int | None,
               seed: int | None, index: int, count: int) -> bytes:
    """Codes -> PNG bytes; the diffusion decoder runs on the worker and reports its steps."""
    def progress(done: int, total: int) -> None:
        job.check()  # a cancelled job's decode stops at its next step
        job.emit({"stage": "decoder", "image": index, "images": count, "done": done, "total": total})

    def run():
        return pipe.image_decoder.decode(result["token_ids"], result["h"], result["w"], mode=mode,
                                         steps=steps, resolution_multiplier=2, seed=seed, progress=progress)
    image = job.call(run)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _seed(seed: int | None, i: int) -> int | None:
    return None if seed is None else seed + i


def _finish_images(job: Job, pipe: LLaDA2Uni, results: list[dict], *, decode: bool, decode_mode: str,
                   decoder_steps: int | None, seed: int | None) -> list[dict]:
    out = []
    for i, r in enumerate(results):
        item = {"token_ids": r["token_ids"], "h": r["h"], "w": r["w"]}
        if "thinking" in r:
            item["thinking"] = r["thinking"]
        if decode:
            item["png"] = decode_png(job, pipe, r, mode=decode_mode, steps=decoder_steps,
                                     seed=_seed(seed, i), index=i, count=len(results))
        out.append(item)
    return out


def text_to_image(job: Job, pipe: LLaDA2Uni, *, prompt: str, width: int, height: int, n: int, steps: int,
                  cfg_scale: float, mode: str, seed: int | None, decode: bool, decode_mode: str,
                  decoder_steps: int | None, thinking_steps: int = 32, thinking_max_tokens: int = 1024,
                  temperature: float = 0.0) -> list[dict]:
    """n images of one prompt: ``[{"token_ids", "h", "w", ["thinking"], ["png"]}]``."""
    view = JobPipeline(pipe, job)
    results = view.generate_image([prompt] * n, height, width, steps=steps, cfg_scale=cfg_scale, mode=mode,
                                  thinking_steps=thinking_steps, thinking_gen_length=thinking_max_tokens,
                                  temperature=temperature, seed=seed)
    return _finish_images(job, pipe, results, decode=decode, decode_mode=decode_mode,
                          decoder_steps=decoder_steps, seed=seed)


def edit(job: Job, pipe: LLaDA2Uni, *, pictures: list[Picture], prompt: str, n: int,
         grid: tuple[int, int] | None, steps: int, cfg_text_scale: float, cfg_image_scale: float,
         seed: int | None, decode: bool, decode_mode: str, decoder_steps: int | None,
         temperature: float = 0.0) -> list[dict]:
    """n edits of the source picture(s); ``grid`` (h, w in tokens) defaults to the first source's."""
    images = encode_pictures(job, pipe, pictures, "edit")
    view = JobPipeline(pipe, job)
    results = [view.edit_image([t for t, _, _ in images], [h for _, h, _ in images], [w for _, _, w in images],
                               instruction=prompt, steps=steps, cfg_text_scale=cfg_text_scale,
                               cfg_image_scale=cfg_image_scale, temperature=temperature,
                               output_h=grid[0] if grid else None, output_w=grid[1] if grid else None,
                               seed=_seed(seed, i))
               for i in range(n)]
    return _finish_images(job, pipe, results, decode=decode, decode_mode=decode_mode,
                          decoder_steps=decoder_steps, seed=seed)


def chat(job: Job, pipe: LLaDA2Uni, *, messages: list[dict], max_tokens: int, steps: int, threshold: float,
         temperature: float, seed: int | None, block_length: int = 32) -> dict:
    """Messages whose content parts are ``{"type": "text"}`` or ``{"type": "picture", "picture"}``.

    Returns ``{"text", "finish_reason", "usage"}``. Streaming clients get the text block by block
    from the scheduler's ``text`` events (the sampler's committed ids), not from here.
    """
    pictures = [part["picture"] for m in messages if isinstance(m["content"], list)
                for part in m["content"] if part["type"] == "picture"]
    encoded = iter(encode_pictures(job, pipe, pictures, "understand"))
    prompt_messages = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", **dict(zip(("tokens", "h", "w"), next(encoded)))}
                       if part["type"] == "picture" else part for part in content]
        prompt_messages.append({"role": m["role"], "content": content})
    view = JobPipeline(pipe, job)
    text = view.chat(prompt_messages, steps=steps, gen_length=max_tokens, block_length=block_length,
                     threshold=threshold, temperature=temperature, seed=seed)
    requests, outputs = job.outputs[-1]
    req, ids = requests[0], outputs[0]
    stopped = bool(ids) and ids[-1] in req.stop_ids
    plen = len(req.rows[0])
    return {"text": text,
            "finish_reason": "stop" if stopped else "length",
            "usage": {"prompt_tokens": plen - req.pad_lens[0], "completion_tokens": len(ids),
                      "total_tokens": plen - req.pad_lens[0] + len(ids)}}
