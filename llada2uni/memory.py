"""Memory tiers: run the model on a GPU smaller than all of it.

The three big parts never run at the same time: the backbone (32.6 GB in bf16, ~17 GB in FP8), the
DiT that turns codes into pixels (12.3 GB / 6.3 GB) and the SigLIP-VQ encoder (2.4 GB). Under a
budget (``Memory(budget_gib=24)``) they take turns in one GPU allocation, the *arena*:

* every tensor of a *group* (a module: "backbone", "dit-turbo", "encoder", ...) lives at a fixed
  offset of the arena, so its address never changes: CUDA graphs captured over the backbone stay
  valid after the DiT has used the same bytes in between;
* the authoritative copy of each group is one flat pinned CPU buffer in the same layout, so bringing
  a group in is one host-to-device copy (nothing is re-read from disk, nothing written back: the
  weights are read-only);
* ``hold(name)`` makes a group resident and keeps it so until the block exits (a lock: the server's
  decode jobs and its backbone steps take turns; each swap costs one copy, ~0.3-1 s).

When even the backbone alone does not fit, the routed experts of some MoE layers are *streamed*:
their weights stay in pinned memory and pass through an arena slot, the next streamed layer's copy
running on a side stream while the resident layers between them compute (``ExpertStream``). The dispatch of such a layer waits
for its slot, so the result is exactly the resident one; the time is the copy's (PCIe), which is
why as few layers as the budget allows are streamed. CUDA graphs are off in that mode (the copies
are launched from Python per layer).

(See ``plan_backbone`` for why one slot.) The tiers users ask for (``TIERS``): "80" (everything resident, no manager), "24" and "16" (the
budget in GiB); any number of GiB is accepted. ``reserve_gib`` is what the budget leaves outside
the arena: the KV cache, activations, the VAE decode at 1024 px, SigVQ and the VAE themselves.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

GIB = 1024 ** 3
ALIGN = 256  # bytes: every tensor starts aligned for the kernels that read it
TIERS = ("80", "24", "16")
# beside the arena: KV cache, activations, the 1024 px decode (DiT activations, VAE), SigVQ, the VAE,
# and the caching allocator's slack; measured at 4.6-5.4 GiB of reserved memory on an H100
# (benchmarks/RESULTS.md, memory tiers)
DEFAULT_RESERVE_GIB = 6.0


class BudgetError(RuntimeError):
    """A budget the model cannot run in (named with the sizes)."""


def parse_tier(memory: str | int | float | None) -> float | None:
    """``--memory`` -> budget in GiB, or None for everything resident ("80", "full", None)."""
    if memory is None:
        return None
    key = str(memory).strip().lower().removesuffix("gb").removesuffix("gib")
    if key in ("80", "full", "resident", "none", ""):
        return None
    try:
        value = float(key)
    except ValueError:
        raise ValueError(f"memory must be one of {', '.join(TIERS)} (GiB of the GPU) or a number of GiB; "
                         f"got {memory!r}") from None
    if not 4 <= value <= 4096:
        raise ValueError(f"memory budget {value:g} GiB is out of range (4 to 4096)")
    return value


def _tensors(module: nn.Module) -> list[tuple[nn.Module, str, Tensor, bool]]:
    """(owner, attribute, tensor, is_parameter) of every parameter and buffer, shared ones once."""
    out, seen = [], set()
    for owner in module.modules():
        for name, p in owner.named_parameters(recurse=False):
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append((owner, name, p, True))
        for name, b in owner.named_buffers(recurse=False):
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                out.append((owner, name, b, False))
    return out


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _view(flat: Tensor, offset: int, like: Tensor) -> Tensor:
    """The bytes [offset, offset + nbytes(like)) of a flat uint8 buffer as a tensor shaped like ``like``."""
    return flat[offset:offset + _nbytes(like)].view(like.dtype).view(like.shape)


def _pin(n: int, device: torch.device) -> Tensor:
    return torch.empty(n, dtype=torch.uint8, pin_memory=device.type == "cuda")


@dataclass
class Group:
    """A module's tensors at fixed arena offsets, with their pinned copy in the same layout."""

    name: str
    module: nn.Module
    nbytes: int
    pinned: Tensor
    entries: list = field(default_factory=list)  # (owner, attr, offset, meta tensor, is_param)
    on_load: list = field(default_factory=list)  # callables run after the group is brought in


class Memory:
    """The arena and its groups (see the module docstring). One per pipeline."""

    def __init__(self, budget_gib: float, device: torch.device | str, *,
                 reserve_gib: float = DEFAULT_RESERVE_GIB) -> None:
        self.device = torch.device(device)
        self.budget = int(budget_gib * GIB)
        self.reserve = int(reserve_gib * GIB)
        self.capacity = self.budget - self.reserve  # the most the arena may take
        if self.capacity <= 0:
            raise BudgetError(f"a {budget_gib:g} GiB budget leaves nothing beside the {reserve_gib:g} GiB reserve")
        self.groups: dict[str, Group] = {}
        self.arena: Tensor | None = None
        self.resident: str | None = None
        self.swaps = 0
        self.swap_bytes = 0
        self.on_move: list = []  # callables run when the arena is reallocated (addresses change)
        self._lock = threading.RLock()

    # ---- placing modules ----

    def add(self, name: str, module: nn.Module, *, extra: int = 0) -> Group:
        """Make ``module`` a group: its tensors move into the pinned copy and become views of the
        arena. ``extra`` bytes at the group's end are scratch for it (the expert stream slots).
        The module may sit anywhere (CPU, GPU); afterwards it is on the device, resident."""
        if name in self.groups:
            raise ValueError(f"memory group {name!r} exists already")
        entries, offset = [], 0
        for owner, attr, t, is_param in _tensors(module):
            entries.append((owner, attr, offset, torch.empty(t.shape, dtype=t.dtype, device="meta"), is_param))
            offset += _aligned(_nbytes(t))
        size = offset + _aligned(extra)
        if size > self.capacity:
            raise BudgetError(
                f"{name} needs {_size(size)} of GPU memory, more than the {_size(self.capacity)} a "
                f"{_size(self.budget)} budget leaves beside its {_size(self.reserve)} reserve "
                "(use a lower-precision quant, or a larger --memory)")
        with self._lock:
            pinned = _pin(size, self.device)
            tensors = _tensors(module)
            for (owner, attr, off, meta, _), (_, _, t, _) in zip(entries, tensors):
                _view(pinned, off, meta).copy_(t.detach())
            group = Group(name, module, size, pinned, entries)
            self.groups[name] = group
            self._ensure_arena(size)
            self._bind(group)
            self._bring(group)
        log.info("memory: %s is %.2f GiB (arena %.2f GiB of a %.0f GiB budget)", name, size / GIB,
                 self.arena.numel() / GIB, self.budget / GIB)
        return group

    def _ensure_arena(self, size: int) -> None:
        if self.arena is not None and self.arena.numel() >= size:
            return
        grown = self.arena is not None
        self.arena = None  # free the old one before the new one exists
        if grown and self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.arena = torch.empty(size, dtype=torch.uint8, device=self.device)
        self.resident = None
        for g in self.groups.values():
            self._bind(g)
        if grown:
            for fn in self.on_move:
                fn()

    def _bind(self, group: Group) -> None:
        """Point every tensor of the group at its arena bytes (same Parameter objects: references
        held elsewhere stay good)."""
        for owner, attr, off, meta, is_param in group.entries:
            view = _view(self.arena, off, meta)
            if is_param:
                getattr(owner, attr).data = view
            else:
                owner._buffers[attr] = view

    def _bring(self, group: Group) -> None:
        self.arena[:group.nbytes].copy_(group.pinned, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.resident = group.name
        self.swaps += 1
        self.swap_bytes += group.nbytes
        for fn in group.on_load:
            fn()

    # ---- taking turns ----

    @contextlib.contextmanager
    def hold(self, name: str):
        """``name`` resident for the block; other groups wait. Re-entrant in one thread."""
        with self._lock:
            if self.resident != name:
                if self.device.type == "cuda":  # what the previous group launched must finish first
                    torch.cuda.synchronize(self.device)
                self._bring(self.groups[name])
            yield

    def holding(self, fn, name: str):
        """``fn`` wrapped so that every call holds ``name`` (attributes pass through)."""
        return Held(fn, self, name)

    def stats(self) -> dict:
        return {"budget_gib": self.budget / GIB, "arena_gib": round((self.arena.numel() if self.arena is not None
                                                                     else 0) / GIB, 2),
                "groups": {n: round(g.nbytes / GIB, 2) for n, g in self.groups.items()},
                "swaps": self.swaps, "swapped_gib": round(self.swap_bytes / GIB, 1), "resident": self.resident}


class Held:
    """A callable (the backbone's ``logits_fn``) whose calls hold a memory group."""

    def __init__(self, fn, memory: Memory, name: str) -> None:
        self.__dict__.update(_fn=fn, _memory=memory, _name=name)

    def __call__(self, *args, **kwargs):
        with self._memory.hold(self._name):
            return self._fn(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self._fn, attr)

    def __setattr__(self, attr, value):
        setattr(self._fn, attr, value)


# ---- the backbone under a budget ----

def expert_layers(model: nn.Module) -> list:
    from .models.backbone import MoE
    return [m for m in model.modules() if isinstance(m, MoE)]


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def plan_backbone(model: nn.Module, capacity: int) -> int:
    """How many MoE layers' routed experts must stream for ``model`` to fit ``capacity`` bytes (0:
    it fits whole). They share one arena slot: the copies are what takes the time (PCIe, ~30x a
    layer's compute), so the fewest streamed layers win, and a second slot would cost a layer."""
    moes = expert_layers(model)
    total = footprint(model)
    if total <= capacity:
        return 0
    per = _aligned(_nbytes(moes[0].experts.w13)) + _aligned(_nbytes(moes[0].experts.w2)) if moes else 0
    base = total - per * len(moes)
    for streamed in range(2, len(moes) + 1):  # one streamed layer in its own slot saves nothing
        if base + per * (len(moes) - streamed + 1) <= capacity:
            return streamed
    raise BudgetError(f"the backbone needs at least {_size(base + per)} with every expert streamed; "
                      f"the budget leaves {_size(capacity)}")


def spread(n: int, k: int) -> list[int]:
    """``k`` of ``n`` layer indices, evenly apart: the resident layers between two streamed ones
    compute while the next copy runs."""
    return sorted({min(n - 1, int((i + 0.5) * n / k)) for i in range(k)})


class ExpertStream:
    """The routed experts of ``moes`` streamed from pinned memory through ``slots`` arena buffers.

    Each streamed layer's dispatch waits for its slot's copy, runs, marks the slot free, and starts
    the copy of the layer ``len(slots)`` ahead (wrapping into the next forward) into it on a side
    stream. ``reset()`` (after the arena held another group) forgets what the slots hold."""

    def __init__(self, moes: list, pinned: list[tuple[Tensor, Tensor]], slots: list[tuple[Tensor, Tensor]],
                 device: torch.device) -> None:
        self.moes, self.pinned, self.slots, self.device = moes, pinned, slots, device
        cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if cuda else None
        self.ready = [torch.cuda.Event() if cuda else None for _ in slots]
        self.free = [torch.cuda.Event() if cuda else None for _ in slots]
        self.used = [False] * len(slots)
        self.holds: list[int | None] = [None] * len(slots)
        self.copies = 0
        for j, moe in enumerate(moes):
            moe.dispatch = self.wrap(j, moe.dispatch)

    def reset(self) -> None:
        self.holds = [None] * len(self.slots)
        self.used = [False] * len(self.slots)

    def _load(self, j: int, slot: int) -> None:
        w13, w2 = self.slots[slot]
        src13, src2 = self.pinned[j]
        if self.side is None:
            w13.copy_(src13)
            w2.copy_(src2)
        else:
            if self.used[slot]:
                self.side.wait_event(self.free[slot])
            with torch.cuda.stream(self.side):
                w13.copy_(src13, non_blocking=True)
                w2.copy_(src2, non_blocking=True)
                self.ready[slot].record(self.side)
        self.holds[slot] = j
        self.copies += 1

    def wrap(self, j: int, inner):
        """Layer ``j``'s dispatch ``inner`` reading its experts from the slots."""
        def dispatch(x, ids, w, w13, w2, scales=None):
            if j in self.holds:
                slot = self.holds.index(j)
            else:  # the first forward (or after a swap): bring it now
                slot = j % len(self.slots)
                self._load(j, slot)
            if self.side is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
            s13, s2 = self.slots[slot]
            y = inner(x, ids, w, s13, s2, scales)
            if self.side is not None:
                self.free[slot].record(torch.cuda.current_stream(self.device))
                self.used[slot] = True
            nxt = (j + len(self.slots)) % len(self.moes)
            if nxt not in self.holds:
                self._load(nxt, slot)
            return y
        dispatch.inner, dispatch.stream, dispatch.layer = inner, self, j
        return dispatch


def place_backbone(memory: Memory, model: nn.Module, name: str = "backbone") -> ExpertStream | None:
    """Put the backbone under ``memory``: whole, or with the routed experts of as many MoE layers as
    needed (``plan_backbone``, spread out) streamed. Returns the stream, or None."""
    stream = _place_backbone(memory, model, name)
    if getattr(model, "quant", None) is not None:  # on the device now: 8-bit linears pick their kernels
        from .quant import finalize
        finalize(model, model.lm_head.weight.dtype)
    return stream


def _place_backbone(memory: Memory, model: nn.Module, name: str) -> ExpertStream | None:
    moes = expert_layers(model)
    streamed = plan_backbone(model, memory.capacity)
    if not streamed:
        memory.add(name, model)
        return None
    chosen = [moes[i] for i in spread(len(moes), streamed)]
    slots = 1
    pinned = []
    for moe in chosen:  # their experts leave the group: pinned per layer, slot views in the arena
        e = moe.experts
        a, b = _pin(_nbytes(e.w13), memory.device), _pin(_nbytes(e.w2), memory.device)
        _view(a, 0, e.w13).copy_(e.w13.detach())
        _view(b, 0, e.w2).copy_(e.w2.detach())
        pinned.append((_view(a, 0, e.w13), _view(b, 0, e.w2)))
    like13, like2 = pinned[0]
    per = _aligned(_nbytes(like13)) + _aligned(_nbytes(like2))
    # the streamed weights are not part of the group: out of the module while it is laid out
    saved = [(m.experts, m.experts.w13, m.experts.w2) for m in chosen]
    for e, _, _ in saved:
        del e._parameters["w13"], e._parameters["w2"]
    try:
        group = memory.add(name, model, extra=per * slots)
    finally:
        for e, w13, w2 in saved:
            e._parameters["w13"], e._parameters["w2"] = w13, w2
    base = group.nbytes - _aligned(per * slots)

    def slot_views():
        out = []
        for s in range(slots):
            off = base + s * per
            out.append((_view(memory.arena, off, like13), _view(memory.arena, off + _aligned(_nbytes(like13)), like2)))
        return out
    stream = ExpertStream(chosen, pinned, slot_views(), memory.device)
    for e, w13, w2 in saved:  # the parameters show slot 0 (shape and dtype; the dispatch reads the slots)
        w13.data, w2.data = stream.slots[0]
    group.on_load.append(stream.reset)

    def moved():  # a reallocated arena: the slots are elsewhere now
        stream.slots = slot_views()
        for e, w13, w2 in saved:
            w13.data, w2.data = stream.slots[0]
    memory.on_move.append(moved)
    log.info("memory: the experts of %d of %d MoE layers stream from pinned memory (%.2f GiB per forward)",
             streamed, len(moes), streamed * per / GIB)
    return stream


def streamed_layers(model: nn.Module) -> int:
    return sum(1 for m in expert_layers(model) if hasattr(m.dispatch, "inner"))


def footprint(module: nn.Module) -> int:
    """Bytes ``module`` takes as a group (each tensor aligned)."""
    return sum(_aligned(_nbytes(t)) for _, _, t, _ in _tensors(module))

