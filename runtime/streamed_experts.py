"""The two DiT experts on a GPU through the streaming engine (`runtime.stream`).

    plans = plan_experts(config, {"high": path_h, "low": path_l}, requests, vram=..., ram=..., info=...)
    experts = StreamedExperts({"high": path_h, "low": path_l}, plans, device=..., dtype=..., ...)
    model = experts.activate("high")    # ... high-noise steps ...
    model = experts.activate("low")     # once, at the boundary
    experts.release_device()            # the VAE decode gets the device memory
    experts.close()

Planning reads only the files' headers, so a request that cannot fit is refused before
anything is loaded. A GGUF expert streams from its file: its blocks are never loaded
into memory by the loader (they stay on the meta device) and only the active expert
needs host memory. Any other format (an official sharded folder, a ComfyUI or diffusers
safetensors file) has no byte layout the engine can read: the expert is loaded into host
memory, its float32 linear weights narrowed to the compute dtype as they are read, and
the engine packs each block from those tensors. Both experts then stay in host memory
for the whole run, which the RAM budget must hold; when it cannot, the request is
refused with the command that converts the experts to GGUF once.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Mapping

import torch

from .stream import AUTO, BlockWeights, DeviceInfo, ExpertSet, FileSource, Plan, PlanError, Request, plan_dit
from .stream.budget import DEFAULT_DEVICE_OVERHEAD, GiB
from .stream.host import _align

ROLES = {"high": "high-noise", "low": "low-noise"}


def is_gguf(source) -> bool:
    path = Path(source)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def budget_arg(value) -> str:
    """A budget as the planner's functions take it: "auto", or bytes spelled "<n>B" (a
    bare number would be read as GiB)."""
    return AUTO if value in (None, AUTO) else f"{int(value)}B"


def device_info(device: torch.device, vram) -> DeviceInfo:
    """The device as the planner sees it: measured on CUDA; without a GPU (planning
    only, or the engine run on the CPU in tests) an empty device of the budget's size."""
    if device.type == "cuda":
        return DeviceInfo.probe(device)
    if vram in (None, AUTO):
        raise PlanError("--vram auto needs a CUDA device to measure; give the budget in GiB (e.g. --vram 8)")
    return DeviceInfo("no GPU (assumed)", int(vram), int(vram) - DEFAULT_DEVICE_OVERHEAD, 0, 0,
                      DEFAULT_DEVICE_OVERHEAD, "assumed")


# ---- what the experts weigh, from their headers ------------------------------------------


def header_weights(source, dtype: torch.dtype) -> BlockWeights:
    """The blocks of one expert as the engine will lay them out, from the checkpoint's
    headers: a GGUF's own file layout (streamable, `reloadable`), else the flat layout of
    the tensors as `load_dit` keeps them (`reloadable` False: host memory must hold them)."""
    if is_gguf(source):
        return BlockWeights.from_gguf(source)
    from quant.checkpoint import open_checkpoint

    from .dit_config import expected_shapes
    from .dit_loading import inspect_checkpoint

    with open_checkpoint(source) as ckpt:
        plan = inspect_checkpoint(ckpt)
        blocks: dict[int, int] = {}
        linears: dict[int, tuple[int, int]] = {}
        types: dict[str, int] = {}
        other = 0
        for name in expected_shapes(plan.config):
            info = ckpt.info(name)
            nbytes = held_bytes(name, info, dtype)
            scale = plan.scales.get(name)
            extra = math.prod(ckpt.info(scale).shape) * 4 if scale else 0  # float32 scales
            parts = name.split(".")
            if parts[0] != "blocks":
                other += nbytes + extra
                continue
            i = int(parts[1])
            blocks[i] = blocks.get(i, 0) + _align(nbytes) + (_align(extra) if extra else 0)
            if _is_block_linear(name, info):
                params, size = linears.get(i, (0, 0))
                linears[i] = (params + math.prod(info.shape), size + nbytes)
                label = _type_label(info, dtype)
                types[label] = types.get(label, 0) + nbytes
    sizes = tuple(blocks[i] for i in range(len(blocks)))
    lin_params = max((p for p, _ in linears.values()), default=0)
    lin_bytes = max((b for _, b in linears.values()), default=0)
    label = max(types, key=types.get) if types else ""
    return BlockWeights(sizes, other, label, False, lin_params, lin_bytes)


def _is_block_linear(name: str, info) -> bool:
    return name.startswith("blocks.") and name.endswith(".weight") and len(info.shape) == 2


def held_bytes(name: str, info, dtype: torch.dtype) -> int:
    """Bytes of one tensor once `load_dit` has placed it for compute in `dtype`: block
    formats, fp8 and 16-bit linear weights as stored, float32 linear weights narrowed to
    a 16-bit compute dtype; other tensors as stored, or float32 when they are decoded."""
    from .dit_loading import FLOAT32_LINEARS
    from .qlinear import FP8_TYPES

    n = math.prod(info.shape)
    linear = name.endswith(".weight") and len(info.shape) == 2
    if linear:
        if info.dtype is None or info.dtype in FP8_TYPES:
            return info.nbytes
        narrow = info.dtype == torch.float32 and dtype != torch.float32 and not name.startswith(FLOAT32_LINEARS)
        return n * 2 if narrow else info.nbytes
    if info.dtype is None or info.dtype in FP8_TYPES or not info.dtype.is_floating_point:
        return n * 4  # decoded once to float32
    return info.nbytes


def _type_label(info, dtype: torch.dtype) -> str:
    if info.dtype is None:
        return info.ggml_type.name.lower()
    held = dtype if info.dtype == torch.float32 and dtype != torch.float32 else info.dtype
    return str(held).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "f16").replace(
        "float32", "f32")


# ---- planning -------------------------------------------------------------------------


def plan_experts(
    config,
    sources: Mapping[str, os.PathLike | str],
    requests: Mapping[str, Request],
    *,
    vram,
    ram,
    info: DeviceInfo,
    dtype: torch.dtype,
    resident: str | int = "auto",
    weights: Mapping[str, BlockWeights] | None = None,
) -> dict[str, Plan]:
    """One plan per expert ("high", "low") for its request (the batch is 2 where it runs
    with CFG), from the headers unless `weights` are given. Raises PlanError, the
    planner's message prefixed with the expert, before anything is loaded; experts that
    cannot stream from a file must fit the RAM budget together."""
    plans: dict[str, Plan] = {}
    weights = dict(weights) if weights is not None else {n: header_weights(sources[n], dtype) for n in requests}
    for name, request in requests.items():
        try:
            plans[name] = plan_dit(config, request, weights=weights[name], vram=budget_arg(vram),
                                   ram=budget_arg(ram), device=info, resident=resident)
        except PlanError as err:
            sep = " " if str(err).startswith("needs ") else ": "
            raise PlanError(f"the {ROLES[name]} expert{sep}{err}", err.needed, err.budget, err.alternatives) from None
    flat = [n for n in requests if not weights[n].reloadable]
    if flat:
        need = sum(weights[n].total for n in flat)
        budget = min(plans[n].ram.budget for n in flat)
        if need > budget:
            label = weights[flat[0]].label or str(dtype).replace("torch.", "")
            commands = "; ".join(
                f"python -m quant.convert {sources[n]} wan2.2-i2v-a14b-{ROLES[n]}-Q8_0.gguf --type q8_0 "
                f"--expert {ROLES[n].replace('-', '_')}" for n in flat)
            raise PlanError(
                f"the experts are not GGUF files, so they cannot stream from disk: both stay in host memory, "
                f"{need / GiB:.1f} GiB in {label}, and the RAM budget is {budget / GiB:.1f} GiB; convert them "
                f"to GGUF once ({commands}), or raise --ram",
                need, budget)
    return plans


# ---- the experts ------------------------------------------------------------------------


class StreamedExperts:
    """The experts seam on a GPU: `activate(name)` returns the model of that expert, its
    blocks streamed per its plan; the switch happens once per video (ExpertSet).

    sources: expert name -> checkpoint; plans / weights: what `plan_experts` made from
    the headers (planned again from the loaded models if their exact sizes differ).
    loras / lora_mode: LoRAs put on each expert before it is attached (their factors
    stream with the blocks)."""

    def __init__(
        self,
        sources: Mapping[str, os.PathLike | str],
        plans: Mapping[str, Plan],
        weights: Mapping[str, BlockWeights],
        *,
        config,
        requests: Mapping[str, Request],
        device: torch.device,
        dtype: torch.dtype,
        vram,
        ram,
        info: DeviceInfo,
        resident: str | int = "auto",
        loras=(),
        lora_mode: str = "auto",
        log: Callable[[str], None] = lambda message: None,
        progress: bool = False,
    ):
        from .dit_loading import check_expert_pair, load_dit

        self.names = list(plans)
        self.plans = dict(plans)
        self.models: dict[str, torch.nn.Module] = {}
        self.sources: dict[str, FileSource | None] = {}
        self.set: ExpertSet | None = None
        try:
            for name in self.names:
                streamable = weights[name].reloadable
                model = load_dit(sources[name], device="cpu", dtype=dtype, expect="i2v", load_blocks=not streamable)
                source = FileSource.from_gguf(sources[name]) if streamable else None
                self.models[name] = model.eval()
                self.sources[name] = self._put_loras(model, name, source, loras, lora_mode, log)
            if len(self.names) == 2:
                check_expert_pair(self.models["high"], self.models["low"])
            exact = {n: BlockWeights.of(self.models[n], self.sources[n]) for n in self.names}
            changed = [n for n in self.names if (exact[n].block_bytes, exact[n].other_bytes)
                       != (weights[n].block_bytes, weights[n].other_bytes)]
            if changed:
                self.plans.update(plan_experts(config, sources, {n: requests[n] for n in changed}, vram=vram,
                                               ram=ram, info=info, dtype=dtype, resident=resident,
                                               weights={n: exact[n] for n in changed}))
                for n in changed:
                    log(f"{ROLES[n]} expert: planned again from the loaded weights (their headers said otherwise)")
                    for line in self.plans[n].describe().splitlines():
                        log(line)
            self.set = ExpertSet({n: (self.models[n], self.sources[n]) for n in self.names}, self.plans,
                                 device=device, progress=progress)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _put_loras(model, name: str, source: FileSource | None, loras, mode: str, log) -> FileSource | None:
        """Apply this expert's LoRAs; the tensors they replace are no longer read from the file."""
        if not loras:
            return source
        from .lora import apply_loras

        state = apply_loras(model, loras, expert=name, mode=mode, log=log)
        if state is None or source is None or not state.merged:
            return source
        replaced = set(state.merged)
        return FileSource(source.path, {k: v for k, v in source.tensors.items() if k not in replaced})

    @property
    def config(self):
        return next(iter(self.models.values())).config

    @property
    def active(self) -> str | None:
        return None if self.set is None else self.set.active

    def activate(self, name: str):
        if name not in self.names:
            raise KeyError(f"no expert named {name!r} was planned; the experts are {', '.join(self.names)}")
        return self.set.activate(name)

    def release_device(self) -> None:
        """Free the device memory (arena, weights outside the blocks, decode scratch) until
        the next activate; host copies are kept."""
        if self.set is not None:
            self.set.release_device()
        for model in self.models.values():
            model.scratch.clear()

    def close(self) -> None:
        if self.set is not None:
            self.set.close()
            self.set = None
        for model in self.models.values():
            model.scratch.clear()
        self.models.clear()
        self.sources.clear()
