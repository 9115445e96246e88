"""Golden token ids from the official LLaDA2.0-Uni remote code, run on this project's tiny checkpoints.

``tests/golden/official_parity.json`` was written by this script; ``tests/test_parity.py`` replays
every case through ``llada2uni`` and asserts the same ids, without needing the official code.

How it was produced (see the JSON's ``meta`` for the exact versions):

    # the official code: GitHub CCAAttking7/LLaDA2.0-Uni, folder llada_model_code/ (commit in meta)
    git clone https://github.com/CCAAttking7/LLaDA2.0-Uni /tmp/LLaDA2.0-Uni
    python3 -m venv /tmp/offvenv
    /tmp/offvenv/bin/pip install torch==2.13.0 'transformers==4.57.*' safetensors accelerate 'huggingface-hub<1.0'
    PYTHONPATH=. /tmp/offvenv/bin/python tools/official_parity.py \
        --official /tmp/LLaDA2.0-Uni/llada_model_code --out tests/golden/official_parity.json

What it does: writes the project's tiny checkpoints (``llada2uni.tiny.make_tiny``, seeded; some
with boosted EOS / ``<boi>`` head rows so that stops happen), copies them into a folder beside the
official ``modeling_llada2uni_moe.py`` / ``configuration_llada2uni_moe.py`` (nothing of that code
is stored in this repository), loads that folder with ``trust_remote_code`` in float32 on the CPU
and calls the official task methods: ``understand_image``, ``generate_image``, ``edit_image`` and
``generate_bd``. The official loops hard-code the real checkpoint's EOS and mask ids, so the tiny
checkpoint's ids are passed in from outside (``generate_bd`` / ``generate_bd_image`` are wrapped to
add them). Every inner call's prompt rows and output are recorded, so a failing test shows whether
the prompt layout or the decoding differs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llada2uni.tiny import TINY_IMAGE_CODES, TINY_IMAGE_OFFSET, TINY_SPECIALS, make_tiny  # noqa: E402

EOS, MASK = TINY_SPECIALS["<|endoftext|>"], TINY_SPECIALS["<|mask|>"]

# Checkpoints: seed and boosted head rows (llada2uni.tiny.boost_tokens).
CHECKPOINTS = {
    "plain": {"seed": 0, "boosts": {}},
    "eos": {"seed": 1, "boosts": {"<|endoftext|>": 1.1}},
    "boi": {"seed": 2, "boosts": {"<boi>": 2.7}},
}


def image_ids(seed: int, h: int, w: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return (TINY_IMAGE_OFFSET + torch.randint(0, TINY_IMAGE_CODES, (h * w,), generator=gen)).tolist()


README_SPRINT = {"use_sprint": True, "threshold": 0.93, "keep_ratio": 0.5, "cache_warmup_steps": 1,
                 "image_keep_ratio": 1.0, "text_keep_ratio": 1.0}
QUESTION = "Describe this picture in detail, please, with every object you can see."


def cases() -> list[dict]:
    """Each case: a name, the checkpoint, the task and the official method's arguments."""
    img8 = image_ids(10, 8, 8)
    img6 = image_ids(11, 6, 6)
    img4x5 = image_ids(12, 4, 5)
    out = []

    def add(name, ckpt, task, **args):
        if task == "t2i" and name != "t2i_short":  # the default canvas (1088) only once: it is slow
            args.setdefault("gen_length", (args["image_h"] // 2 // 16) * (args["image_w"] // 2 // 16))
        out.append({"name": name, "checkpoint": ckpt, "task": task, "args": args})

    # understanding: official prompt layout, then SPRINT variants
    und = dict(image_tokens=img8, image_h=8, image_w=8, question=QUESTION, gen_length=64)
    add("understand", "plain", "understand", **und)
    add("understand_eos", "eos", "understand", **und)
    add("understand_sprint_readme", "plain", "understand", **und, **README_SPRINT)
    add("understand_sprint_kr05_w2", "plain", "understand", **und, use_sprint=True, keep_ratio=0.5,
        cache_warmup_steps=2)
    add("understand_sprint_kr05_w2_text05", "plain", "understand", **und, use_sprint=True, keep_ratio=0.5,
        cache_warmup_steps=2, text_keep_ratio=0.5)
    add("understand_sprint_kr1_w1", "plain", "understand", **und, use_sprint=True, keep_ratio=1.0,
        cache_warmup_steps=1)
    add("understand_sprint_img1_text05", "plain", "understand", **und, use_sprint=True, keep_ratio=0.7,
        cache_warmup_steps=1, image_keep_ratio=1.0, text_keep_ratio=0.5)
    add("understand_sprint_w0", "plain", "understand", **und, use_sprint=True, keep_ratio=0.5,
        cache_warmup_steps=0)
    # text-to-image: short prompt (uncond row longer than cond), long prompt (uncond padded)
    add("t2i_short", "plain", "t2i", prompt="a fox", image_h=256, image_w=256)
    add("t2i_long", "plain", "t2i", prompt="A watercolor painting of a small red fox sleeping under a "
        "snowy pine tree at dusk, soft light", image_h=256, image_w=256)
    add("t2i_odd_size", "plain", "t2i", prompt="a lighthouse on a cliff", image_h=200, image_w=328)
    add("t2i_cfg_below_1", "plain", "t2i", prompt="a lighthouse on a cliff", image_h=128, image_w=192,
        cfg_scale=0.5)
    add("t2i_no_cfg", "plain", "t2i", prompt="a lighthouse on a cliff", image_h=128, image_w=192,
        cfg_scale=1.0)
    add("t2i_steps8", "plain", "t2i", prompt="a quiet harbour at dawn", image_h=192, image_w=192, steps=8)
    t2i_sprint = dict(prompt="A watercolor painting of a small red fox sleeping under a snowy pine tree",
                      image_h=256, image_w=256)
    add("t2i_sprint_default", "plain", "t2i", **t2i_sprint, use_sprint=True)
    add("t2i_sprint_kr05_w1", "plain", "t2i", **t2i_sprint, use_sprint=True, keep_ratio=0.5,
        cache_warmup_steps=1)
    add("t2i_sprint_kr05_w2_text05", "plain", "t2i", **t2i_sprint, use_sprint=True, keep_ratio=0.5,
        cache_warmup_steps=2, text_keep_ratio=0.5)
    add("t2i_sprint_kr1_w2", "plain", "t2i", **t2i_sprint, use_sprint=True, keep_ratio=1.0,
        cache_warmup_steps=2, image_keep_ratio=1.0)
    add("t2i_sprint_kr07_text05", "plain", "t2i", **t2i_sprint, use_sprint=True, keep_ratio=0.7,
        cache_warmup_steps=1, text_keep_ratio=0.5)
    add("t2i_sprint_short", "plain", "t2i", prompt="a fox", image_h=192, image_w=192, use_sprint=True,
        keep_ratio=0.5, cache_warmup_steps=1, text_keep_ratio=0.5)
    # thinking: phase 1 writes text then <boi>; phase 2 continues from it verbatim
    add("t2i_thinking", "boi", "t2i", prompt="a fox in the snow", image_h=128, image_w=128, mode="thinking",
        thinking_gen_length=96)
    add("t2i_thinking_sprint", "boi", "t2i", prompt="a fox in the snow", image_h=128, image_w=128,
        mode="thinking", thinking_gen_length=96, use_sprint=True, keep_ratio=0.5, cache_warmup_steps=1)
    # editing: two-way (cfg_image_scale 0) and three-way
    edit = dict(image_tokens=img6, image_h=6, image_w=6, instruction="make the sky purple and add a moon")
    add("edit", "plain", "edit", **edit)
    add("edit_image_cfg", "plain", "edit", **edit, cfg_image_scale=1.5)
    add("edit_rect", "plain", "edit", image_tokens=img4x5, image_h=4, image_w=5, instruction="more red",
        cfg_text_scale=3.0, cfg_image_scale=1.2, steps=4)
    add("edit_steps_clamp", "plain", "edit", image_tokens=image_ids(13, 2, 3), image_h=2, image_w=3,
        instruction="turn it into a night scene", steps=8, cfg_image_scale=1.0)
    # plain text generation (generate_bd) with EOS, steps clamp, SPRINT
    text = "The quick brown fox jumps over the lazy dog. " * 2
    add("text_eos", "eos", "text", prompt=text, gen_length=128, steps=32)
    add("text_plain", "plain", "text", prompt=text, gen_length=64, steps=16)
    add("text_steps_clamp", "plain", "text", prompt=text, gen_length=8, steps=32)
    add("text_sprint_readme", "plain", "text", prompt=text, gen_length=96, steps=32, use_sprint=True,
        threshold=0.93, keep_ratio=0.5, cache_warmup_steps=1, image_keep_ratio=1.0, text_keep_ratio=1.0)
    add("text_sprint_kr05_w2_text05", "plain", "text", prompt=text, gen_length=96, steps=32, use_sprint=True,
        keep_ratio=0.5, cache_warmup_steps=2, text_keep_ratio=0.5)
    add("text_sprint_minimal_topk", "plain", "text", prompt=text, gen_length=96, steps=32, use_sprint=True,
        keep_ratio=0.5, cache_warmup_steps=1, text_keep_ratio=0.5, minimal_topk=3)
    add("text_sprint_steps_clamp", "plain", "text", prompt=text, gen_length=16, steps=32, use_sprint=True,
        keep_ratio=0.5, cache_warmup_steps=1, text_keep_ratio=0.5)
    add("text_sprint_eos", "eos", "text", prompt=text, gen_length=128, steps=32, use_sprint=True,
        keep_ratio=0.7, cache_warmup_steps=2)
    return out


def hf_folder(tiny: Path, official: Path, dest: Path) -> Path:
    """The tiny checkpoint as a trust_remote_code folder next to the official modeling files."""
    dest.mkdir(parents=True)
    for f in tiny.iterdir():
        if f.is_file():
            shutil.copy(f, dest / f.name)
    for name in ("modeling_llada2uni_moe.py", "configuration_llada2uni_moe.py"):
        shutil.copy(official / name, dest / name)
    config = json.loads((tiny / "config.json").read_text())
    config.update({"model_type": "llada2_moe", "architectures": ["LLaDA2MoeModelLM"], "auto_map": {
        "AutoConfig": "configuration_llada2uni_moe.LLaDA2MoeConfig",
        "AutoModel": "modeling_llada2uni_moe.LLaDA2MoeModelLM",
        "AutoModelForCausalLM": "modeling_llada2uni_moe.LLaDA2MoeModelLM"}})
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


class Recorder:
    """Wraps the official inner loops: adds the tiny EOS/mask ids and records rows and outputs."""

    def __init__(self, model):
        self.calls: list[dict] = []
        for name in ("generate_bd", "generate_bd_image"):
            setattr(model, name, self._wrap(name, getattr(model, name)))

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def run(data=None, **kw):
            kw.setdefault("eos_id", EOS)
            kw.setdefault("mask_id", MASK)
            out = fn(data=data, **kw)
            rows = {k: (v[0].tolist() if torch.is_tensor(v) else list(v)) for k, v in data.items()}
            self.calls.append({"fn": name, "rows": rows, "output": out[0].tolist(),
                               "kwargs": {k: v for k, v in kw.items() if isinstance(v, (int, float, str))}})
            return out
        return run


def run_case(model, tok, rec: Recorder, case: dict) -> dict:
    rec.calls = []
    args = dict(case["args"])
    task = case["task"]
    result: dict = {}
    try:
        if task == "understand":
            text = model.understand_image(tokenizer=tok, **args)
            result["text"] = text
        elif task == "t2i":
            out = model.generate_image(args.pop("prompt"), tokenizer=tok, **args)
            result.update(out)
        elif task == "edit":
            out = model.edit_image(tokenizer=tok, **args)
            result.update(out)
        elif task == "text":
            ids = tok(args.pop("prompt")).input_ids
            model.generate_bd(data={"input_ids": torch.tensor([ids])}, **args)
        else:
            raise ValueError(task)
    except Exception as e:  # recorded: e.g. the thinking phase without <boi>
        result["error"] = f"{type(e).__name__}: {e}"
    result["calls"] = rec.calls
    return result


def git_head(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="the official llada_model_code/ folder")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--commit", default=None, help="the official repository commit (default: git HEAD)")
    ap.add_argument("--only", nargs="*", help="case names to run (default: all)")
    a = ap.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    modeling = (a.official / "modeling_llada2uni_moe.py").read_bytes()
    meta = {
        "official_repository": "github.com/CCAAttking7/LLaDA2.0-Uni",
        "official_commit": a.commit or git_head(a.official),
        "modeling_sha256": hashlib.sha256(modeling).hexdigest(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "device": "cpu", "dtype": "float32",
        "eos_id": EOS, "mask_id": MASK, "checkpoints": CHECKPOINTS,
        "produced_by": "tools/official_parity.py",
    }
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for key, spec in CHECKPOINTS.items():
            tiny = make_tiny(Path(tmp) / f"tiny-{key}", seed=spec["seed"], boosts=spec["boosts"] or None,
                             image_side=False)
            folder = hf_folder(tiny, a.official, Path(tmp) / f"hf-{key}")
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
            model.eval()
            models[key] = (model, AutoTokenizer.from_pretrained(folder), Recorder(model))
        for case in cases():
            if a.only and case["name"] not in a.only:
                continue
            model, tok, rec = models[case["checkpoint"]]
            res = run_case(model, tok, rec, case)
            print(case["name"], "error" if "error" in res else "ok", res.get("error", ""), flush=True)
            results.append({**case, "official": res})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": meta, "cases": results}, separators=(",", ":")) + "\n")
    print(f"wrote {len(results)} cases to {a.out}")


if __name__ == "__main__":
    main()
