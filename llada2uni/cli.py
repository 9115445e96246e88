"""Command line: ``llada2uni <subcommand>``. A thin adapter over ``LLaDA2Uni``; no tensor code."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _load(args):
    from .pipeline import LLaDA2Uni
    return LLaDA2Uni.from_pretrained(args.model_path, device=args.device, dtype=args.dtype)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="checkpoint folder or Hugging Face repo id")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on GPU, fp32 on CPU)")


def _load_image_token_file(path: str):
    """An official ``--image_token`` file: a .pt dict with ``semantic_token_ids`` (codes, no offset)
    and ``metadata.processed_size`` (pixels); grid = size // 16 (spec 7.5)."""
    import torch
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: image token file not found: {path}") from None
    except Exception as e:
        raise SystemExit(f"error: cannot read image token file {path}: {e}") from None
    try:
        codes = torch.as_tensor(data["semantic_token_ids"]).flatten().tolist()
        size = data["metadata"]["processed_size"]
    except (KeyError, TypeError) as e:
        raise SystemExit(f"error: {path} lacks semantic_token_ids / metadata.processed_size ({e})") from None
    width, height = (int(size[0]), int(size[1]))
    return codes, height // 16, width // 16


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny
    path = make_tiny(args.dir, seed=args.seed, overwrite=args.overwrite)
    print(f"tiny checkpoint written to {path}")
    return 0


def cmd_understand(args) -> int:
    pipe = _load(args)
    if args.image_token:
        codes, h, w = _load_image_token_file(args.image_token)
        tokens = [c + pipe.image_token_offset for c in codes]
    else:
        raise SystemExit("error: pass --image_token (pixel images arrive with the image-side components)")
    answer = pipe.understand_image(tokens, h, w, question=args.question, steps=args.steps,
                                   gen_length=args.gen_length, block_length=args.block_length,
                                   threshold=args.threshold, seed=args.seed)
    print(answer)
    return 0


def cmd_chat(args) -> int:
    pipe = _load(args)
    print(pipe.chat(args.message, steps=args.steps, gen_length=args.gen_length,
                    block_length=args.block_length, seed=args.seed))
    return 0


def cmd_demo(args) -> int:
    """Every task that exists so far, offline, on a tiny checkpoint made on the spot."""
    import torch

    from .pipeline import LLaDA2Uni
    from .tiny import make_tiny

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "tiny-checkpoint"
    if not (ckpt / "config.json").exists():
        make_tiny(ckpt, seed=args.seed, overwrite=True)
    pipe = LLaDA2Uni.from_pretrained(ckpt, device=args.device, dtype=args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    h, w = 4, 4
    codes = torch.randint(0, pipe.config.image_vocab_size, (h * w,), generator=g)
    image_tokens = (codes + pipe.image_token_offset).tolist()
    question = "What is in this image?"
    answer = pipe.understand_image(image_tokens, h, w, question=question, steps=8, gen_length=64)
    result = {"task": "understand_image", "grid": [h, w], "question": question, "answer": answer,
              "note": "random tiny weights: the answer is gibberish by design"}
    (out / "understand.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"outputs in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada2uni", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the official layout")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("understand", help="answer a question about an image")
    _add_model_args(p)
    p.add_argument("--image_token", help=".pt file with semantic_token_ids and metadata.processed_size")
    p.add_argument("--question", default="")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--block_length", type=int, default=32)
    p.add_argument("--gen_length", type=int, default=2048)
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_understand)

    p = sub.add_parser("chat", help="one text message in, one answer out")
    _add_model_args(p)
    p.add_argument("message")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--block_length", type=int, default=32)
    p.add_argument("--gen_length", type=int, default=2048)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", help="run every task offline on a tiny checkpoint it makes")
    p.add_argument("--output_dir", default="demo_output")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .config import ConfigError
    from .tokens import TokenError
    from .weights import CheckpointError
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, TokenError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
