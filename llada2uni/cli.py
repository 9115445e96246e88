"""Command line: ``llada2uni <subcommand>``. A thin adapter over ``LLaDA2Uni``; no tensor code.

Subcommands mirror the official scripts (``t2i_generate.py``, ``mmu_understand.py``,
``image_edit.py``) with their option names and defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _load(args):
    from .pipeline import LLaDA2Uni
    pipe = LLaDA2Uni.from_pretrained(args.model_path, device=args.device, dtype=args.dtype,
                                     keep_decoder=not getattr(args, "low_memory", False),
                                     image_device=getattr(args, "image_device", None),
                                     fast=not getattr(args, "eager", False), **_memory_kwargs(args))
    pipe.progress = not args.quiet
    return pipe


QUANT_HELP = ("backbone weights: auto (an FP8 checkpoint stays FP8, bf16 stays bf16), none, fp8 (128x128 "
              "blocks), fp8-channel, int8 (weight-only; also what fp8 becomes on GPUs without FP8)")
MEMORY_HELP = ("GPU memory tier in GiB: 80 (everything resident), 24 (backbone, decoder and encoder take turns), "
               "16 (and experts stream from pinned CPU memory), or any number of GiB")


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    """--quant, --decoder_quant, --memory (``_both_spellings`` adds --decoder-quant)."""
    p.add_argument("--quant", default="auto", choices=["auto", "none", "fp8", "fp8-channel", "int8"],
                   help=QUANT_HELP)
    p.add_argument("--decoder_quant", default="auto", choices=["auto", "none", "fp8"],
                   help="DiT block linears: fp8 (W8A8), none, auto (fp8 when the backbone is FP8)")
    p.add_argument("--memory", default=None, help=MEMORY_HELP)


def _memory_kwargs(args) -> dict:
    return {"quant": getattr(args, "quant", None), "decoder_quant": getattr(args, "decoder_quant", None),
            "memory": getattr(args, "memory", None)}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="checkpoint folder or Hugging Face repo id")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--low_memory", action="store_true", help="free the diffusion decoder after each image")
    p.add_argument("--image_device", default=None, help="put the image side on another GPU, e.g. cuda:1")
    p.add_argument("--eager", action="store_true", help="clear eager path: no CUDA graphs, no compile")
    _add_memory_args(p)


def _add_decode_args(p: argparse.ArgumentParser, *, default_mode: str = "normal") -> None:
    p.add_argument("--decode_mode", choices=["normal", "turbo"], default=default_mode,
                   help="normal: decoder/ with CFG; turbo: decoder-turbo/, 8 steps")
    p.add_argument("--decoder_steps", type=int, default=None,
                   help="decoder steps (default: 50 normal, 8 turbo)")
    p.add_argument("--resolution_multiplier", type=int, default=2)


def _check_output(path: str | Path | None) -> None:
    """Refuse an output file path that cannot be written, before any model work."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"error: --output {path} is a folder; give a file name like {path / 'image.png'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SystemExit(f"error: --output {path}: {parent} is a file, not a folder")
            break


def _save(image, path: Path) -> Path:
    _check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        image.save(tmp, format="PNG")
        tmp.replace(path)  # never leave a half-written PNG under the final name
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _load_image_token_file(path: str):
    """An official ``--image_token`` file: a .pt dict with ``semantic_token_ids`` (codes, no offset)
    and ``metadata.processed_size`` (pixels, width x height); grid = size // 16 (spec 7.5)."""
    import torch
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: image token file not found: {path}") from None
    except Exception as e:  # torch's own message advises weights_only=False: never for a file from elsewhere
        raise SystemExit(f"error: cannot read image token file {path}: not a PyTorch file of tensors, lists "
                         f"and numbers ({type(e).__name__})") from None
    try:
        codes = torch.as_tensor(data["semantic_token_ids"]).flatten().tolist()
        size = data["metadata"]["processed_size"]
    except (KeyError, TypeError) as e:
        raise SystemExit(f"error: {path} lacks semantic_token_ids / metadata.processed_size ({e})") from None
    width, height = (int(size[0]), int(size[1]))
    return codes, height // 16, width // 16


def _sources(pipe, args) -> tuple[list, list, list]:
    """--image (repeatable) or --image_token -> lists (items, hs, ws) for the pipeline (a list of one
    image is one image)."""
    if args.image_token:
        codes, h, w = _load_image_token_file(args.image_token)
        return [[c + pipe.image_token_offset for c in codes]], [h], [w]
    if not args.image:
        raise SystemExit("error: pass --image PATH (repeatable) or --image_token FILE")
    return list(args.image), [None] * len(args.image), [None] * len(args.image)


def _add_sprint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SPRINT", "training-free acceleration (docs/sprint.md)")
    g.add_argument("--use_sprint", action="store_true", help="adaptive unmasking + prefix KV reuse and pruning")
    g.add_argument("--keep_ratio", type=float, default=0.7, help="fraction of the prefix KV kept after warm-up")
    g.add_argument("--cache_warmup_steps", type=int, default=2,
                   help="steps of each block run against the full prefix")
    g.add_argument("--image_keep_ratio", type=float, default=None,
                   help=">= 1 pins (always keeps) image keys; other values do nothing (as the official)")
    g.add_argument("--text_keep_ratio", type=float, default=None,
                   help="unset or >= 1 pins text keys; other values unpin them (as the official)")
    g.add_argument("--confidence_alpha", type=float, default=0.5,
                   help="weight of the key-norm term in the importance score (1 - alpha: confidence)")
    g.add_argument("--minimal_topk", type=int, default=1, help="least positions a step commits")
    g.add_argument("--remasking", choices=["low_confidence", "top_k_margin", "neg_entropy", "random"],
                   default="low_confidence", help="confidence that ranks the positions to commit")


def _sprint_kwargs(args) -> dict:
    return dict(use_sprint=args.use_sprint, keep_ratio=args.keep_ratio,
                cache_warmup_steps=args.cache_warmup_steps, image_keep_ratio=args.image_keep_ratio,
                text_keep_ratio=args.text_keep_ratio, confidence_alpha=args.confidence_alpha,
                remasking=args.remasking, minimal_topk=args.minimal_topk)


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny
    path = make_tiny(args.dir, seed=args.seed, overwrite=args.overwrite, fp8=args.fp8)
    print(f"tiny checkpoint written to {path}")
    return 0


def cmd_t2i(args) -> int:
    prompts = [args.prompt] if args.prompt else []
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except OSError as e:
            raise SystemExit(f"error: cannot read prompts file: {e}") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SystemExit("error: pass --prompt or --prompts_file")
    if args.output and len(prompts) > 1:
        raise SystemExit("error: --output names one file; use --output_dir for several prompts")
    _check_output(args.output)
    pipe = _load(args)
    kw = dict(steps=args.steps, cfg_scale=args.cfg_scale, mode=args.mode, block_length=args.block_length,
              thinking_steps=args.thinking_steps, thinking_gen_length=args.thinking_gen_length,
              threshold=args.threshold, cfg_rescale=args.cfg_rescale, strict_sizes=args.strict_sizes,
              **_sprint_kwargs(args))
    results = []
    if args.mode == "thinking":
        results = [pipe.generate_image(p, args.image_h, args.image_w, seed=args.seed, **kw) for p in prompts]
    else:  # all prompts in one batch of shared forwards
        results = pipe.generate_image(prompts, args.image_h, args.image_w, seed=args.seed, **kw)
    out_dir = Path(args.output_dir)
    for i, (prompt, r) in enumerate(zip(prompts, results)):
        image = pipe.decode_tokens(r["token_ids"], r["h"], r["w"], mode=args.decode_mode,
                                   steps=args.decoder_steps, resolution_multiplier=args.resolution_multiplier,
                                   seed=args.seed)
        path = _save(image, Path(args.output) if args.output else out_dir / f"{i:03d}.png")
        print(f"{path}  ({image.width}x{image.height})  {prompt!r}")
        if "thinking" in r:
            print(f"thinking: {r['thinking']}")
    return 0


def cmd_understand(args) -> int:
    pipe = _load(args)
    items, hs, ws = _sources(pipe, args)
    answer = pipe.understand_image(items, hs, ws, question=args.question, steps=args.steps, template=args.template,
                                   gen_length=args.gen_length, block_length=args.block_length,
                                   threshold=args.threshold, seed=args.seed, **_sprint_kwargs(args))
    print(answer)
    return 0


def cmd_edit(args) -> int:
    _check_output(args.output)
    pipe = _load(args)
    items, hs, ws = _sources(pipe, args)
    r = pipe.edit_image(items, hs, ws, instruction=args.instruction, steps=args.steps,
                        block_length=args.block_length, cfg_text_scale=args.cfg_text_scale,
                        cfg_image_scale=args.cfg_image_scale, cfg_rescale=args.cfg_rescale, seed=args.seed)
    image = pipe.decode_tokens(r["token_ids"], r["h"], r["w"], mode=args.decode_mode, steps=args.decoder_steps,
                               resolution_multiplier=args.resolution_multiplier, seed=args.seed)
    print(f"{_save(image, Path(args.output))}  ({image.width}x{image.height})")
    return 0


def cmd_interleave(args) -> int:
    pipe = _load(args)
    segments = pipe.interleave(args.prompt, max_frames=args.max_frames, steps=args.steps,
                               image_steps=args.image_steps, text_gen_length=args.gen_length, seed=args.seed)
    out_dir = Path(args.output_dir)
    record, frame = [], 0
    for seg in segments:
        if seg["type"] == "text":
            print(seg["text"])
            record.append(seg)
            continue
        image = pipe.decode_tokens(seg["token_ids"], seg["h"], seg["w"], mode=args.decode_mode,
                                   steps=args.decoder_steps, resolution_multiplier=args.resolution_multiplier,
                                   seed=args.seed)
        path = _save(image, out_dir / f"frame_{frame:02d}.png")
        print(f"[image {path}]")
        record.append({"type": "image", "path": path.name, "h": seg["h"], "w": seg["w"]})
        frame += 1
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "segments.json").write_text(json.dumps(record, indent=2))
    return 0


def cmd_demo(args) -> int:
    """Every task offline on a tiny checkpoint made on the spot; outputs written to a folder."""
    import torch

    from .pipeline import LLaDA2Uni
    from .tiny import make_tiny
    from .tokens import TokenError

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "tiny-checkpoint"
    # Random weights almost never write <boi>; a boosted head row lets the thinking phase reach it.
    make_tiny(ckpt, seed=args.seed, overwrite=True, boosts={"<boi>": 4.0}, fp8=getattr(args, "fp8", False))
    pipe = LLaDA2Uni.from_pretrained(ckpt, device=args.device, dtype=args.dtype)
    pipe.progress = not args.quiet
    report: dict = {"note": "random tiny weights: texts and images are noise by design"}

    side = args.size
    if side < 64 or side % 32:
        raise SystemExit(f"error: --size must be a multiple of 32 of at least 64, got {side}")
    t2i = pipe.generate_image("a lighthouse at dusk", side, side, steps=4, cfg_scale=2.0, seed=args.seed)
    image = pipe.decode_tokens(t2i["token_ids"], t2i["h"], t2i["w"], mode="turbo", seed=args.seed)
    _save(image, out / "t2i_turbo.png")
    normal = pipe.decode_tokens(t2i["token_ids"], t2i["h"], t2i["w"], mode="normal", steps=6, seed=args.seed)
    _save(normal, out / "t2i_normal.png")
    report["t2i"] = {"grid": [t2i["h"], t2i["w"]], "files": ["t2i_turbo.png", "t2i_normal.png"],
                     "size": list(image.size)}

    try:
        think = pipe.generate_image("a cat", 64, 64, steps=4, mode="thinking", thinking_steps=8,
                                    thinking_gen_length=64, seed=args.seed)
    except TokenError as e:  # another seed's weights may never write <boi>: the official errors too
        report["t2i_thinking"] = {"error": str(e)}
    else:
        _save(pipe.decode_tokens(think["token_ids"], think["h"], think["w"], seed=args.seed),
              out / "t2i_thinking.png")
        report["t2i_thinking"] = {"thinking": think["thinking"], "file": "t2i_thinking.png"}

    g = torch.Generator().manual_seed(args.seed)
    codes = torch.randint(0, pipe.config.image_vocab_size, (16,), generator=g)
    tokens = (codes + pipe.image_token_offset).tolist()
    report["understand_tokens"] = pipe.understand_image(tokens, 4, 4, question="What is in this image?",
                                                        steps=8, gen_length=64)
    report["understand_image"] = pipe.understand_image(image, question="Describe it.", steps=8, gen_length=64)

    # the output grid of the t2i picture's size (the edit resize alone would make it 32x32 codes)
    edited = pipe.edit_image(image, instruction="make the sky red", steps=4, seed=args.seed,
                             output_h=side // 16, output_w=side // 16)
    _save(pipe.decode_tokens(edited["token_ids"], edited["h"], edited["w"], seed=args.seed), out / "edit.png")
    report["edit"] = {"grid": [edited["h"], edited["w"]], "file": "edit.png"}

    segments = pipe.interleave("Tell a short story in pictures.", max_frames=2, steps=8, image_steps=4,
                               text_gen_length=64, seed=args.seed)
    report["interleave"] = [s if s["type"] == "text" else {"type": "image", "grid": [s["h"], s["w"]]}
                            for s in segments]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"outputs in {out}")
    return 0


def cmd_serve(args) -> int:
    from .server import serve  # lazy: the server needs the [server] extra
    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada2uni", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the official layout")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--fp8", action="store_true",
                   help="the backbone in the FP8 checkpoint's layout (block FP8 e4m3, 128x128 scale_inv)")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("t2i", help="text to image (defaults of the official t2i_generate.py)")
    _add_model_args(p)
    p.add_argument("--prompt")
    p.add_argument("--prompts_file", help="one prompt per line")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--cfg_scale", type=float, default=4.0, help="guidance runs whenever it is not 1")
    p.add_argument("--cfg_rescale", type=float, default=0.7, help="std rescale of the guided logits, 0..1")
    p.add_argument("--strict_sizes", action="store_true",
                   help="reject sides that are not multiples of 32 (default: grid = side // 32, as the official)")
    p.add_argument("--image_h", type=int, default=512)
    p.add_argument("--image_w", type=int, default=512)
    p.add_argument("--block_length", type=int, default=32)
    p.add_argument("--mode", choices=["normal", "thinking"], default="normal")
    p.add_argument("--thinking_steps", type=int, default=32)
    p.add_argument("--thinking_gen_length", type=int, default=4096)
    p.add_argument("--threshold", type=float, default=0.95, help="commit every token above this probability")
    _add_sprint_args(p)
    _add_decode_args(p)
    p.add_argument("--output_dir", default="./t2i_output")
    p.add_argument("--output", help="single output file (one prompt)")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=cmd_t2i)

    p = sub.add_parser("understand", help="answer a question about an image")
    _add_model_args(p)
    p.add_argument("--image", action="append", help="image file (repeatable for several images)")
    p.add_argument("--image_token", help=".pt file with semantic_token_ids and metadata.processed_size")
    p.add_argument("--question", default="")
    p.add_argument("--template", choices=["official", "chat"], default="official",
                   help="official: image then question, as the official code; chat: inside chat turns")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--block_length", type=int, default=32)
    p.add_argument("--gen_length", type=int, default=2048)
    p.add_argument("--threshold", type=float, default=0.95, help="commit every token above this probability")
    _add_sprint_args(p)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_understand)

    p = sub.add_parser("edit", help="edit an image with an instruction (defaults of image_edit.py)")
    _add_model_args(p)
    p.add_argument("--image", action="append", help="source image (repeat for multi-reference editing)")
    p.add_argument("--image_token", help=".pt file with semantic_token_ids and metadata.processed_size")
    p.add_argument("--instruction", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--block_length", type=int, default=32)
    p.add_argument("--cfg_text_scale", type=float, default=4.0)
    p.add_argument("--cfg_image_scale", type=float, default=0.0)
    p.add_argument("--cfg_rescale", type=float, default=0.7, help="std rescale of the guided logits, 0..1")
    _add_decode_args(p)
    p.add_argument("--output", default="edited.png")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("interleave", help="interleaved text and images")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_frames", type=int, default=10)
    p.add_argument("--steps", type=int, default=32, help="denoising steps per block, text phases")
    p.add_argument("--image_steps", type=int, default=32, help="denoising steps per block, image phases")
    p.add_argument("--gen_length", type=int, default=1024, help="token budget of each text phase")
    _add_decode_args(p, default_mode="turbo")
    p.add_argument("--output_dir", default="./interleave_output")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=cmd_interleave)

    p = sub.add_parser("chat", help="one text message in, one answer out")
    _add_model_args(p)
    p.add_argument("message")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--block_length", type=int, default=32)
    p.add_argument("--gen_length", type=int, default=2048)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=lambda a: print(_load(a).chat(a.message, steps=a.steps, gen_length=a.gen_length,
                                                      block_length=a.block_length, seed=a.seed)) or 0)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API and web page (docs/server.md)")
    p.add_argument("--model", required=True, help="checkpoint folder, Hugging Face repo id, or 'tiny'")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--low-memory", action="store_true", help="free the diffusion decoder after each image")
    _add_memory_args(p)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $LLADA2UNI_API_KEY)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-batch", type=int, default=32, help="denoising requests sharing one forward")
    p.add_argument("--max-queue", type=int, default=64, help="requests in flight; more get 429")
    p.add_argument("--batch-linger-ms", type=float, default=20.0,
                   help="a new batch waits up to this long for requests still arriving (0: never)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    p.add_argument("--max-body-mb", type=float, default=32.0)
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="per uploaded image")
    p.add_argument("--default-size", default="1024x1024", help="image size when a request gives none")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image_url in chat (public addresses only, one deadline per fetch)")
    p.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                   help="Host header names answered (default: loopback names on a loopback bind, any otherwise; "
                        "'*': any)")
    p.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="other web origins allowed to send requests (e.g. http://localhost:3000; '*': any)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get after SIGTERM (waiting ones get 503 at once)")
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                   help="skip compiling and capturing the fast path at start (the first requests pay it)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="run every task offline on a tiny checkpoint it makes")
    p.add_argument("--output_dir", default="demo_output")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp8", action="store_true", help="the tiny backbone in the FP8 checkpoint's layout")
    p.add_argument("--size", type=int, default=512,
                   help="text-to-image side in pixels")
    p.set_defaults(func=cmd_demo)
    for p in sub.choices.values():
        # the global flags also after the subcommand (SUPPRESS: an absent one keeps the global value)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level")
        p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
        _both_spellings(p)
    return parser


def _both_spellings(parser: argparse.ArgumentParser) -> None:
    """``--low_memory`` and ``--low-memory`` alike for every option (the official scripts use
    underscores, ``serve`` dashes): the other spelling is added where it is free."""
    for action in list(parser._actions):
        for option in list(action.option_strings):
            if not option.startswith("--"):
                continue
            other = "--" + (option[2:].replace("_", "-") if "_" in option else option[2:].replace("-", "_"))
            if other != option and other not in parser._option_string_actions:
                action.option_strings.append(other)
                parser._option_string_actions[other] = action


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .config import ConfigError
    from .tokens import TokenError
    from .weights import CheckpointError
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, TokenError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
