"""Why logits agreement on *random* weights says little about 8-bit fidelity: error through depth.

    python benchmarks/fidelity_depth.py [--layers 20] [--experts 32] [--quant fp8,int8]

A random backbone of the real widths (hidden 2048, the real expert size; fewer experts and a small
vocabulary so it runs on a CPU) in float32, and the same weights quantized. For each quantization
and for a control (the float32 weights times (1 + 1e-3 noise), a perturbation ~30x smaller than
FP8's rounding) it reports, after each layer, the relative error of the hidden states against the
float32 run ("carried": each run feeds itself, as inference does) and the error one layer adds on
the float32 run's input ("local"), then the argmax agreement of the final logits. If the control's
carried error also grows to O(1), the random network is chaotic and end-to-end agreement on it does
not measure the quantization; the local error is what the quantization itself costs per layer.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import torch

from llada2uni.config import BackboneConfig
from llada2uni.models.backbone import rope_cos_sin
from llada2uni.ops.attention import block_causal_mask, rope_positions
from llada2uni.quant import quantize_backbone, resolve_mode
from llada2uni.weights import random_backbone


def trace(model, ids, positions, mask, inputs=None):
    """Hidden states after each layer (and the final logits). ``inputs``: per layer, the input to
    use instead of the previous layer's output (the local error)."""
    cfg = model.config
    with torch.no_grad():
        h = model.model.word_embeddings(ids)
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, h.dtype)
        outs, ins = [], []
        for i, layer in enumerate(model.model.layers):
            x = h if inputs is None else inputs[i]
            ins.append(x)
            h = layer(x, cos, sin, mask, None, 0)
            outs.append(h)
        logits = model(ids, positions, mask)
    return ins, outs, logits


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quant", default="fp8,int8")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = dataclasses.replace(BackboneConfig(), num_hidden_layers=args.layers, num_experts=args.experts,
                              n_group=1, topk_group=1, vocab_size=4096, image_token_offset=2048)
    ref = random_backbone(cfg, device="cpu", dtype=torch.float32, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    pads = torch.zeros(1, dtype=torch.long)
    positions, mask = rope_positions(0, args.tokens, pads), block_causal_mask(0, args.tokens, pads, 32)
    ins, outs, logits = trace(ref, ids, positions, mask)
    rows = []
    variants = [("control 1e-3", None)] + [(q, q) for q in args.quant.split(",")]
    for name, quant in variants:
        model = copy.deepcopy(ref)
        if quant is None:
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim >= 2:
                        p.mul_(1 + 1e-3 * torch.randn(p.shape, generator=gen))
        else:
            quantize_backbone(model, resolve_mode(quant))
        _, carried, got = trace(model, ids, positions, mask)
        _, local, _ = trace(model, ids, positions, mask, inputs=ins)
        row = {"variant": name,
               "carried": [round(rel(c, o), 4) for c, o in zip(carried, outs)],
               "local": [round(rel(c, o), 4) for c, o in zip(local, outs)],
               "logits_rel_err": round(rel(got, logits), 4),
               "argmax_agree": round((got.argmax(-1) == logits.argmax(-1)).float().mean().item(), 3)}
        rows.append(row)
        del model
    depths = [d for d in (1, 2, 5, 10, 15, 20, args.layers) if d <= args.layers]
    depths = sorted(set(depths))
    print(f"hidden-state relative error after layer d (float32 reference; {args.layers} layers, {args.experts} experts)")
    print(f"{'variant':14s} {'kind':8s} " + " ".join(f"{'d=' + str(d):>8s}" for d in depths) + "  logits  agree")
    for r in rows:
        for kind in ("carried", "local"):
            vals = " ".join(f"{r[kind][d - 1]:8.4f}" for d in depths)
            tail = f"  {r['logits_rel_err']:.4f}  {r['argmax_agree']:.3f}" if kind == "carried" else ""
            print(f"{r['variant']:14s} {kind:8s} {vals}{tail}")
    print(json.dumps({"bench": "fidelity_depth", "layers": args.layers, "experts": args.experts, "rows": rows}))


if __name__ == "__main__":
    main()
