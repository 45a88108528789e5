"""The planner: from the budgets, the block sizes and the request, where every byte goes.

    weights = BlockWeights.of(model, source)            # or BlockWeights.from_gguf(path)
    plan = plan_dit(model.config, Request(832, 480, 81), weights=weights, vram="auto", ram="auto")
    print(plan.describe())

A plan says which blocks stay resident on the GPU, how many ring slots stream the rest,
where each block's host copy lives (pinned in RAM, or staged from the file when RAM is
short) and how the model must split its work (attention query chunk, FFN token chunk,
attention head chunk; the engine sets them into the model's settings). What it promises
is what the driver shows: the CUDA context and library kernels (measured), the
weights outside the blocks, the decode scratch, the activation peak of the request (a
formula in the model's sizes, `dit_activation_bytes`), workspaces and fragmentation.

A request that cannot fit raises `PlanError` before any work, with the numbers and the
ways out, computed: a lighter quantization, fewer frames, a smaller size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import nn

from quant.ggml_types import GGMLType, parse_type, traits

from .activations import (
    DEFAULT_CHUNK_VALUES,
    Chunks,
    dit_activation_bytes,
    dit_chunk_cost,
    dit_chunk_options,
    dit_flops_per_block,
    dit_scratch_bytes,
    t5_activation_bytes,
    t5_flops_per_block,
)
from .budget import AUTO, AUTO_RAM_MARGIN, DEFAULT_DEVICE_OVERHEAD, GiB, MiB, DeviceInfo, host_available

# Bytes the allocator needs beyond the tensors it hands out: cuBLAS/cuDNN workspaces
# (allocated through torch) and fragmentation of the activation traffic.
WORKSPACE_BYTES = 256 * MiB
FRAGMENTATION = 0.08  # of the activation peak
# A device's bf16 FLOP/s divided by its pinned host-to-device bytes/s, for deciding how
# many blocks must stay resident for copies to hide behind compute. H200: ~790 TFLOP/s
# and ~54 GB/s; an RTX 4060 on PCIe 4.0 x8: ~65 TFLOP/s and ~12 GB/s. The larger
# figure is the cautious one.
DEVICE_BALANCE = 15_000.0  # FLOP per byte copied
OVERLAP_SHARE = 0.7  # share of compute time the copies may take

PINNED, STAGED, DROPPED = "pinned", "staged", "dropped"


class PlanError(ValueError):
    """A request that does not fit its budgets: the message says by how much and what to
    change. `needed` and `budget` are bytes (driver view); `alternatives` are strings."""

    def __init__(self, message: str, needed: int = 0, budget: int = 0, alternatives: Sequence[str] = ()):
        super().__init__(message)
        self.needed = needed
        self.budget = budget
        self.alternatives = tuple(alternatives)


# -- what is generated -----------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A video size and how many samples go through each block together (2 with CFG:
    the conditional and unconditional pass share every block's trip to the GPU)."""

    width: int
    height: int
    frames: int
    batch: int = 2
    dtype: torch.dtype = torch.bfloat16
    vae_stride: tuple[int, int, int] = (4, 8, 8)

    def grid(self, patch: Sequence[int]) -> tuple[int, int, int]:
        """Tokens per axis (frames, rows, columns) after the VAE and the patch embedding."""
        st, sh, sw = self.vae_stride
        lat = ((self.frames - 1) // st + 1, self.height // sh, self.width // sw)
        return tuple(n // p for n, p in zip(lat, patch))

    def tokens(self, patch: Sequence[int]) -> int:
        return math.prod(self.grid(patch))

    def describe(self) -> str:
        return f"{self.width}×{self.height}×{self.frames}"


# -- what the weights weigh --------------------------------------------------------------


@dataclass(frozen=True)
class BlockWeights:
    """Bytes of each block as the engine lays it out, bytes outside the blocks (kept on the
    device), and what the 2-D linears of a block weigh (to price another quantization)."""

    block_bytes: tuple[int, ...]
    other_bytes: int
    label: str = ""  # the blocks' main weight type, e.g. "q8_0"
    reloadable: bool = True  # the bytes can be read again from a file
    linear_params: int = 0  # per block
    linear_bytes: int = 0  # per block, as stored (largest block)

    @property
    def largest(self) -> int:
        return max(self.block_bytes) if self.block_bytes else 0

    @property
    def total(self) -> int:
        return sum(self.block_bytes) + self.other_bytes

    @classmethod
    def of(cls, model: nn.Module, source=None, prefix: str = "blocks", exclude: Sequence[str] = ()) -> "BlockWeights":
        """Exact sizes of `model`'s blocks (`model.<prefix>`, an nn.ModuleList) as the
        engine will lay them out, reading from `source` (a FileSource) where it can;
        `exclude` names submodules that stay off the device (as in `attach`)."""
        from .host import build_layouts

        blocks = model.get_submodule(prefix)
        layouts = build_layouts(blocks, prefix, source)
        kept = [blocks, *(model.get_submodule(n) for n in exclude)]
        inside = {id(t) for m in kept for t in (*m.parameters(), *m.buffers())}
        other = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if id(t) not in inside)
        types: dict[str, int] = {}
        lin_params = lin_bytes = 0
        for layout in layouts:
            params = nbytes = 0
            for p in layout.places:
                gt = getattr(p.module, "ggml_type", None) if p.attr == "weight" else None
                if gt is not None or (p.attr == "weight" and len(p.shape) == 2):
                    n_in = getattr(p.module, "in_features", None)
                    n_out = getattr(p.module, "out_features", None)
                    params += n_in * n_out if n_in and n_out else math.prod(p.shape)
                    nbytes += p.nbytes
                    name = GGMLType(gt).name.lower() if gt is not None else str(p.dtype).replace("torch.", "")
                    types[name] = types.get(name, 0) + p.nbytes
            lin_params, lin_bytes = max(lin_params, params), max(lin_bytes, nbytes)
        label = max(types, key=types.get) if types else ""
        # with a file, tensors packed from the module stay referenced: every block can be
        # rebuilt without keeping a host copy of it
        return cls(tuple(l.nbytes for l in layouts), other, label, source is not None, lin_params, lin_bytes)

    @classmethod
    def from_gguf(cls, path, prefix: str = "blocks") -> "BlockWeights":
        """Sizes read from a GGUF file's tensor table, for planning before a model exists
        (exact when the model keeps every tensor in the file's types)."""
        from quant.gguf_reader import GGUFFile

        from .host import _RUN_GAP, _align

        blocks: dict[int, list] = {}
        other = 0
        with GGUFFile(path, require_data=False) as f:
            infos = list(f.tensors.values())
        for info in infos:
            parts = info.name.split(".")
            if parts[0] == prefix and len(parts) > 2 and parts[1].isdigit():
                blocks.setdefault(int(parts[1]), []).append(info)
            else:
                other += info.nbytes
        sizes, types = [], {}
        lin_params = lin_bytes = 0
        for i in range(len(blocks)):
            if i not in blocks:
                raise ValueError(f"{path}: block {i} is missing")
            size, end, params, nbytes = 0, None, 0, 0
            for info in sorted(blocks[i], key=lambda t: t.offset):
                if end is not None and (info.offset - end > _RUN_GAP or info.offset < end):
                    size = _align(size)
                    end = None
                size += info.nbytes if end is None else info.offset - end + info.nbytes
                end = info.end
                if len(info.shape) == 2:
                    params += math.prod(info.shape)
                    nbytes += info.nbytes
                    types[info.ggml_type.name.lower()] = types.get(info.ggml_type.name.lower(), 0) + info.nbytes
            sizes.append(_align(size))
            lin_params, lin_bytes = max(lin_params, params), max(lin_bytes, nbytes)
        label = max(types, key=types.get) if types else ""
        return cls(tuple(sizes), other, label, True, lin_params, lin_bytes)

    def with_linear_type(self, ggml_type) -> "BlockWeights":
        """The same model with every block linear stored as `ggml_type` (an estimate for
        suggesting a lighter file)."""
        t = traits(parse_type(ggml_type))
        new_linear = self.linear_params * t.type_size // t.block_size
        delta = new_linear - self.linear_bytes
        return replace(
            self,
            block_bytes=tuple(b + delta for b in self.block_bytes),
            label=t.name.lower(),
            linear_bytes=new_linear,
        )


# -- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceBudget:
    """The device side of a plan, in bytes. `driver_peak` is what nvidia-smi should show."""

    budget: int | None  # None: --vram auto
    room: int  # what the plan may take in torch's allocator
    overhead: int  # CUDA context and library kernels (outside the allocator)
    overhead_source: str
    preexisting: int  # tensors allocated before the plan (other stages' weights)
    other_weights: int
    scratch: int
    resident: int
    ring: int
    activations: int
    margin: int  # workspaces + fragmentation

    @property
    def allocator_peak(self) -> int:
        return self.other_weights + self.scratch + self.resident + self.ring + self.activations + self.margin

    @property
    def driver_peak(self) -> int:
        return self.overhead + self.preexisting + self.allocator_peak


@dataclass(frozen=True)
class HostBudget:
    budget: int
    pinned: int  # bytes of pinned block copies
    staging: int  # bytes of the pinned staging ring
    transient: int  # a staging buffer used once to upload resident blocks from the file


@dataclass(frozen=True)
class Plan:
    """Where each block lives and how the model computes. Built by `plan_blocks` or
    `plan_dit`; read by the engine (`attach`, `StreamEngine`) and printed by `describe`."""

    n_blocks: int
    resident: tuple[int, ...]
    ring_slots: int
    slot_bytes: int
    host: tuple[str, ...]  # per block: "pinned", "staged" (from the file) or "dropped" (resident only)
    staging_slots: int
    device: DeviceBudget
    ram: HostBudget
    ffn_chunk: int | None = None  # tokens per FFN chunk (None: all at once)
    head_chunk: int | None = None  # heads per attention chunk (None: all at once)
    title: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    attn_chunk: int | None = None  # queries per attention call, one sample at a time (None: a whole sample)

    @property
    def chunks(self) -> Chunks:
        return Chunks(self.attn_chunk, self.ffn_chunk, self.head_chunk)

    def apply_chunks(self, settings) -> None:
        """Make a model's settings (runtime.dit.ComputeSettings) split its work as the
        activation estimate of this plan assumed; settings without such fields are left."""
        for name, value in (("attn_chunk_tokens", self.attn_chunk), ("ffn_chunk_tokens", self.ffn_chunk),
                            ("attn_heads_per_chunk", self.head_chunk)):
            if hasattr(settings, name):
                setattr(settings, name, value)

    @property
    def streamed(self) -> tuple[int, ...]:
        res = set(self.resident)
        return tuple(i for i in range(self.n_blocks) if i not in res)

    def describe(self) -> str:
        d, r = self.device, self.ram
        g = lambda n: f"{n / GiB:6.2f} GiB"  # noqa: E731
        budget = "auto" if d.budget is None else f"{d.budget / GiB:.2f} GiB"
        n_pinned = sum(1 for i in self.streamed if self.host[i] == PINNED)
        n_staged = sum(1 for i in self.streamed if self.host[i] == STAGED)
        chunks = ", ".join(
            [f"attention {self.attn_chunk:,} queries at a time" if self.attn_chunk else "attention whole samples"]
            + [f"FFN {self.ffn_chunk:,} tokens at a time" if self.ffn_chunk else "FFN whole"]
            + ([f"{self.head_chunk} heads at a time"] if self.head_chunk else [])
        )
        ring = f"{self.ring_slots} slots × {self.slot_bytes / MiB:.0f} MiB" if self.ring_slots else "none"
        lines = [
            f"streaming plan: {self.title}" if self.title else "streaming plan",
            f"  GPU   budget {budget}, predicted peak {d.driver_peak / GiB:.2f} GiB (driver view)",
            f"    CUDA context + libraries  {g(d.overhead)}  ({d.overhead_source})",
        ]
        if d.preexisting:
            lines.append(f"    tensors already there     {g(d.preexisting)}")
        lines += [
            f"    weights outside blocks    {g(d.other_weights)}",
            f"    decode scratch            {g(d.scratch)}",
            f"    resident blocks           {g(d.resident)}  ({len(self.resident)} of {self.n_blocks})",
            f"    ring                      {g(d.ring)}  ({ring}, {len(self.streamed)} blocks streamed)",
            f"    activations               {g(d.activations)}  ({chunks})",
            f"    workspace + fragmentation {g(d.margin)}",
            f"  host  budget {r.budget / GiB:.2f} GiB: {n_pinned} blocks pinned {r.pinned / GiB:.2f} GiB, "
            f"{n_staged} staged from disk through {r.staging / GiB:.2f} GiB",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# -- the generic planner -------------------------------------------------------------------



def _spread(n: int, k: int) -> tuple[int, ...]:
    """k of n indices, evenly spaced (resident blocks between streamed ones give the copies
    more time)."""
    if k <= 0:
        return ()
    if k >= n:
        return tuple(range(n))
    return tuple(sorted({min(n - 1, int((j + 0.5) * n / k)) for j in range(k)}))


def _device_info(device, vram) -> DeviceInfo:
    if isinstance(device, DeviceInfo):
        return device
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        return DeviceInfo.probe(dev)
    if vram == AUTO:
        raise PlanError("--vram auto needs a CUDA device to measure; give the budget in GiB (e.g. --vram 8)")
    # Planning without a GPU (a dry run, a CPU device): assume an empty device of that size.
    total = int(vram)
    return DeviceInfo("no GPU (assumed)", total, total - DEFAULT_DEVICE_OVERHEAD, 0, 0, DEFAULT_DEVICE_OVERHEAD, "assumed")


def plan_blocks(
    weights: BlockWeights,
    *,
    activation: Callable[[int | None, int | None], int],
    chunk_options: Sequence[tuple[int | None, int | None]] = ((None, None),),
    flops_per_block: float | None = None,
    scratch_bytes: int = 0,
    vram="auto",
    ram="auto",
    device=None,
    prefetch_depth: int = 1,
    staging_slots: int = 2,
    resident: str | int = "auto",
    title: str = "",
) -> Plan:
    """Plan any module of equal-ish blocks.

    activation(ffn_chunk, head_chunk) -> bytes of the activation peak; chunk_options,
    (ffn_chunk, head_chunk) pairs, are tried in order (cheapest first) and the first that
    fits is used.
    flops_per_block: compute of one block per forward, to decide how many blocks must stay
    resident so that copies hide behind compute (resident="auto"); "max" keeps as many as
    fit, an int asks for that many (as far as they fit).
    vram / ram: AUTO or bytes (see budget.parse_memory). device: a DeviceInfo, a device,
    or None (the current CUDA device)."""
    from .budget import parse_memory

    vram, ram = parse_memory(vram, "--vram"), parse_memory(ram, "--ram")
    options = [Chunks(None, ffn, heads) for ffn, heads in chunk_options]
    return _plan(
        weights, lambda o: activation(o.ffn, o.heads), options, flops_per_block, scratch_bytes, vram, ram,
        _device_info(device, vram), prefetch_depth, staging_slots, resident, title,
    )


def _plan(
    weights, activation, chunk_options, flops_per_block, scratch_bytes, vram, ram, info: DeviceInfo,
    prefetch_depth, staging_slots, resident, title,
) -> Plan:
    """plan_blocks with the budgets parsed (AUTO or bytes) and the device measured;
    activation(Chunks) -> bytes, chunk_options: Chunks."""
    room = info.room(vram)
    n = len(weights.block_bytes)
    sizes = weights.block_bytes

    def device_budget(act: int, res: Sequence[int], slots: int, slot_bytes: int) -> DeviceBudget:
        return DeviceBudget(
            None if vram == AUTO else int(vram), room, info.overhead, info.overhead_source, info.allocated,
            weights.other_bytes, scratch_bytes, sum(sizes[i] for i in res), slots * slot_bytes, act,
            WORKSPACE_BYTES + int(FRAGMENTATION * act),
        )

    # 1. the least chunking that fits with every block streamed through the smallest ring
    min_slots = min(2, n)
    chosen = None
    best = None
    for option in chunk_options:
        act = activation(option)
        need = device_budget(act, (), min_slots, weights.largest)
        if best is None or need.allocator_peak < best[1].allocator_peak:
            best = (option, need)
        if need.allocator_peak <= room:
            chosen = (option, act)
            break
    if chosen is None:
        need = best[1]
        budget = need.budget if need.budget is not None else room + info.overhead + info.allocated
        raise PlanError(
            f"needs {need.driver_peak / GiB:.1f} GiB of GPU memory; the budget is {budget / GiB:.1f} GiB",
            need.driver_peak, budget,
        )
    option, act = chosen
    base = device_budget(act, (), 0, 0).allocator_peak

    # 2. residency: everything if it fits, else what the policy asks within what fits
    asked_all = resident in ("auto", "max") or int(resident) >= n
    if asked_all and base + sum(sizes) <= room:
        res: tuple[int, ...] = tuple(range(n))
    else:
        slots = min(prefetch_depth + 1, n)
        left = room - base - slots * weights.largest
        fit = 0
        for s in sorted(sizes):
            if s > left:
                break
            left -= s
            fit += 1
        fit = min(fit, n - 1)
        if resident == "max":
            want = fit
        elif resident == "auto":
            want = n
            if flops_per_block is not None:
                hidden = OVERLAP_SHARE * n * (flops_per_block / max(1, weights.largest)) / DEVICE_BALANCE
                want = max(0, n - int(hidden))
        else:
            want = int(resident)
        res = _spread(n, min(fit, want))
    streamed = [i for i in range(n) if i not in set(res)]
    slots = min(prefetch_depth + 1, len(streamed)) if streamed else 0
    slot_bytes = max((sizes[i] for i in streamed), default=0)
    dev = device_budget(act, res, slots, slot_bytes)

    # 3. host: pin what the RAM budget holds, stage the rest from the file
    ram_budget = host_available() - AUTO_RAM_MARGIN if ram == AUTO else int(ram)
    host = [PINNED] * n
    keep_resident = not weights.reloadable
    need_all = sum(sizes[i] for i in streamed) + (sum(sizes[i] for i in res) if keep_resident else 0)
    staging = 0
    if need_all <= ram_budget:
        pinned = need_all
    elif not weights.reloadable:
        raise PlanError(
            f"the weights need {need_all / GiB:.1f} GiB of host memory and are not in a file to stream from; "
            f"the RAM budget is {ram_budget / GiB:.1f} GiB: load them from a GGUF file, or raise --ram",
            need_all, ram_budget,
        )
    else:
        staging = staging_slots * slot_bytes
        left = ram_budget - staging
        if left < 0:
            raise PlanError(
                f"the RAM budget {ram_budget / GiB:.2f} GiB is below the staging ring it needs "
                f"({staging_slots} × {slot_bytes / MiB:.0f} MiB): raise --ram",
                staging, ram_budget,
            )
        pinned = 0
        for i in streamed:
            if sizes[i] <= left:
                left -= sizes[i]
                pinned += sizes[i]
            else:
                host[i] = STAGED
                left = -1  # keep pinned blocks a prefix: staged ones follow in order
    if not keep_resident:
        for i in res:
            host[i] = DROPPED
    transient = max((sizes[i] for i in res), default=0) if not keep_resident else 0
    notes = []
    if any(h == STAGED for h in host):
        notes.append("blocks staged from disk are read every forward: a fast SSD keeps up, a slow disk will not")
    return Plan(
        n_blocks=n, resident=res, ring_slots=slots, slot_bytes=slot_bytes, host=tuple(host),
        staging_slots=staging_slots if staging else 0, device=dev,
        ram=HostBudget(ram_budget, pinned, staging, transient),
        ffn_chunk=option.ffn, head_chunk=option.heads, attn_chunk=option.attn, title=title, notes=tuple(notes),
    )


# -- the Wan DiT ----------------------------------------------------------------------------


def fused_kernels_ready() -> bool:
    """Whether a DiT on the CUDA device runs its norms, rope and residual adds as the
    fused kernels (runtime/fused.py), which keep no temporaries."""
    if not torch.cuda.is_available():
        return False
    from quant import _native

    from .. import fused

    return fused.enabled() and _native.cuda_ready()


def plan_dit(
    config,
    request: Request,
    *,
    weights: BlockWeights,
    vram="auto",
    ram="auto",
    device=None,
    prefetch_depth: int = 1,
    staging_slots: int = 2,
    resident: str | int = "auto",
    chunk_values: int = DEFAULT_CHUNK_VALUES,
    fused: bool | None = None,
) -> Plan:
    """Plan one Wan DiT expert (`config` a runtime.dit_config.DiTConfig) for `request`.
    `fused`: whether the block's norms, rope and residual adds run as CUDA kernels
    (None: as they will in this process on a CUDA device). Raises PlanError, with
    computed ways out, when it cannot fit."""
    e = torch.empty((), dtype=request.dtype).element_size()
    if fused is None:
        fused = fused_kernels_ready()

    def attempt(req: Request, w: BlockWeights) -> Plan:
        tokens = req.tokens(config.patch_size)
        if tokens < 1:
            raise ValueError(f"{req.describe()} gives no tokens; the smallest size is 16×16×1")
        act = lambda o: dit_activation_bytes(  # noqa: E731
            dim=config.dim, ffn_dim=config.ffn_dim, heads=config.num_heads, tokens=tokens,
            text_len=config.text_len, batch=req.batch, dtype_bytes=e, attn_chunk=o.attn, ffn_chunk=o.ffn,
            head_chunk=o.heads, chunk_values=chunk_values, fused=fused,
            head_out=math.prod(config.patch_size) * config.out_dim,
        )
        flops = dit_flops_per_block(
            dim=config.dim, ffn_dim=config.ffn_dim, tokens=tokens, text_len=config.text_len, batch=req.batch
        )
        title = (
            f"{req.describe()} ({tokens:,} tokens × {req.batch}, {str(req.dtype).replace('torch.', '')}), "
            f"{len(w.block_bytes)} blocks of {w.largest / MiB:.0f} MiB {w.label}".rstrip()
        )
        # the cheapest chunking first, and among equally cheap ones the leanest
        options = sorted(dit_chunk_options(tokens, req.batch), key=lambda o: (dit_chunk_cost(o, tokens, req.batch), act(o)))
        return _plan(
            w, act, options, flops,
            dit_scratch_bytes(config.dim, config.ffn_dim), vram, ram, info, prefetch_depth, staging_slots, resident,
            title,
        )

    from .budget import parse_memory

    vram, ram = parse_memory(vram, "--vram"), parse_memory(ram, "--ram")
    info = _device_info(device, vram)
    try:
        return attempt(request, weights)
    except PlanError as err:
        if err.needed == 0 or "GPU memory" not in str(err):
            raise
        ways = _ways_out(attempt, request, weights)
        what = f"{request.describe()} with {weights.label}" if weights.label else request.describe()
        msg = f"needs {err.needed / GiB:.1f} GiB at {what}; the budget is {err.budget / GiB:.1f} GiB"
        msg += ": " + _or(ways) if ways else " and no smaller setting fits: free GPU memory or use a larger GPU"
        raise PlanError(msg, err.needed, err.budget, ways) from None


def _fits(attempt, req: Request, w: BlockWeights) -> bool:
    try:
        attempt(req, w)
        return True
    except PlanError:
        return False


def _ways_out(attempt, req: Request, w: BlockWeights) -> list[str]:
    ways = []
    # a lighter file
    if w.linear_params:
        for t in ("q5_0", "q4_0"):
            lighter = w.with_linear_type(t)
            if lighter.largest < w.largest and _fits(attempt, req, lighter):
                ways.append(f"use {t}")
                break
    # fewer frames (4k+1)
    k_max = (req.frames - 1) // 4
    lo, hi, best = 0, k_max - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if _fits(attempt, replace(req, frames=4 * mid + 1), w):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best is not None:
        ways.append(f"{req.frames}→{4 * best + 1} frames")
    # a smaller size, same aspect ratio, multiples of 16
    for step in range(1, 15):
        s = 1.0 - 0.05 * step
        w16, h16 = max(16, round(req.width * s / 16) * 16), max(16, round(req.height * s / 16) * 16)
        if (w16, h16) == (req.width, req.height):
            continue
        if _fits(attempt, replace(req, width=w16, height=h16), w):
            ways.append(f"{w16}×{h16}")
            break
    return ways


def _or(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


# -- the umt5 text encoder ----------------------------------------------------------------------


def plan_t5(
    config,
    *,
    weights: BlockWeights,
    tokens: int = 512,
    batch: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    vram="auto",
    ram="auto",
    device=None,
    prefetch_depth: int = 1,
    staging_slots: int = 2,
    resident: str | int = "auto",
) -> Plan:
    """Plan the umt5 encoder (`config` a runtime.t5.T5Config) for `batch` prompts of up
    to `tokens` tokens. Its token table stays in host memory (attach with
    exclude=("token_embedding",)) and `weights` is `BlockWeights.of(model, source,
    exclude=("token_embedding",))`: only what goes to the device counts."""
    from .budget import parse_memory

    vram, ram = parse_memory(vram, "--vram"), parse_memory(ram, "--ram")
    e = torch.empty((), dtype=dtype).element_size()
    act = t5_activation_bytes(
        dim=config.dim, dim_attn=config.dim_attn, dim_ffn=config.dim_ffn, heads=config.num_heads,
        tokens=tokens, batch=batch, dtype_bytes=e,
    )
    flops = t5_flops_per_block(
        dim=config.dim, dim_attn=config.dim_attn, dim_ffn=config.dim_ffn, tokens=tokens, batch=batch
    )
    title = f"umt5 encoder, {batch} prompts × {tokens} tokens, {len(weights.block_bytes)} blocks of " \
            f"{weights.largest / MiB:.0f} MiB {weights.label}".rstrip()
    try:
        return _plan(
            weights, lambda o: act, (Chunks(),), flops, 0, vram, ram, _device_info(device, vram),
            prefetch_depth, staging_slots, resident, title,
        )
    except PlanError as err:
        if "GPU memory" not in str(err):
            raise
        raise PlanError(
            f"the text encoder {err}: encode fewer prompts at once, or encode on the CPU", err.needed, err.budget
        ) from None
