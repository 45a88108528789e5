"""Two experts that run one after the other (Wan 2.2 A14B: high noise, then low noise).

Only the active expert needs host memory. When the RAM budget holds both experts' pinned
copies, the next expert is read in a background thread while the active one computes, so
the switch costs only the upload of its resident blocks; otherwise the active expert's
host memory is released at the switch before the next one is read. Both experts use one
device arena (ring slots and resident buffers), allocated once.

    experts = ExpertSet({"high": (high_model, high_source), "low": (low_model, low_source)}, plan)
    model = experts.activate("high")      # starts reading "low" in the background if RAM allows
    ... high-noise steps: model(...) ...
    model = experts.activate("low")       # once, at the boundary
    ... low-noise steps ...
    experts.release_device()              # between videos: the VAE gets the device memory
    experts.close()
"""
from __future__ import annotations

import threading
from typing import Mapping

import torch
from torch import nn

from .device import DeviceArena
from .engine import StreamEngine, move_outside_blocks
from .host import FileSource
from .plan import Plan


class ExpertSet:
    """Experts by name, each a model and the file its weights come from, run per `plan`
    (one Plan for all, or one per name). `prefetch`: True reads the next expert in the
    background whenever one is activated, False never, "auto" when the RAM budget of the
    plan holds both experts' pinned copies at once."""

    def __init__(
        self,
        experts: Mapping[str, tuple[nn.Module, FileSource | None]],
        plan: Plan | Mapping[str, Plan],
        *,
        device: torch.device | str = "cuda",
        blocks: str = "blocks",
        prefetch: bool | str = "auto",
        progress: bool = True,
    ):
        if not experts:
            raise ValueError("an ExpertSet needs at least one expert")
        self.names = list(experts)
        self.plans = {n: plan[n] if isinstance(plan, Mapping) else plan for n in self.names}
        self.models = {n: m for n, (m, _) in experts.items()}
        self.device = torch.device(device)
        self.blocks = blocks
        for n, p in self.plans.items():
            settings = getattr(self.models[n], "settings", None)
            if settings is not None:
                p.apply_chunks(settings)
        self.engines = {
            n: StreamEngine(
                model.get_submodule(blocks), self.plans[n], source=source, prefix=blocks, device=self.device,
                load=False, progress=progress,
            )
            for n, (model, source) in experts.items()
        }
        # One arena for all: the most slots, the largest slot, and per resident position
        # the largest block any expert keeps there.
        needs = [e.needs() for e in self.engines.values()]
        resident: list[int] = []
        for _, _, own in needs:
            own = sorted(own, reverse=True)
            resident = [max(a, b) for a, b in zip(resident, own)] + resident[len(own):] + own[len(resident):]
        self._arena_needs = (max(n[0] for n in needs), max(n[1] for n in needs), resident)
        self.arena: DeviceArena | None = None
        self._allocate_arena()
        if prefetch == "auto":
            budget = min(p.ram.budget for p in self.plans.values())
            both = sum(p.ram.pinned + p.ram.staging for p in self.plans.values())
            prefetch = both <= budget
        self.prefetch = bool(prefetch)
        self.active: str | None = None
        self._parked: str | None = None  # active before release_device(), host copies kept
        self._loader: tuple[str, threading.Thread, threading.Event] | None = None

    def _allocate_arena(self) -> None:
        self.arena = DeviceArena(self.device, *self._arena_needs)
        for engine in self.engines.values():
            engine.use_arena(self.arena)

    @property
    def model(self) -> nn.Module:
        if self.active is None:
            raise RuntimeError("no expert is active: call activate(name) first")
        return self.models[self.active]

    def activate(self, name: str) -> nn.Module:
        """Make `name` the expert that runs; returns its model. The previous expert's host
        memory is given back (unless it is being kept for a later switch back)."""
        if name not in self.engines:
            raise KeyError(f"no expert named {name!r}; the experts are {', '.join(self.names)}")
        if name == self.active:
            return self.models[name]
        if self.active is not None:
            old = self.active
            self.engines[old].deactivate(release_host=True)
            move_outside_blocks(self.models[old], "cpu", self.blocks)
            self.active = None
        parked, self._parked = self._parked, None
        if parked is not None and parked != name:
            self.engines[parked].deactivate(release_host=True)
        if self.arena is None:
            self._allocate_arena()
        self._finish_loader(name)
        move_outside_blocks(self.models[name], self.device, self.blocks)
        self.engines[name].activate()
        self.active = name
        if self.prefetch:
            following = self.names[(self.names.index(name) + 1) % len(self.names)]
            if following != name:
                self._start_loader(following)
        return self.models[name]

    def _start_loader(self, name: str) -> None:
        stop = threading.Event()
        thread = threading.Thread(
            target=self.engines[name].load_host, kwargs={"stop": stop}, name=f"wanrt-load-{name}", daemon=True
        )
        thread.start()
        self._loader = (name, thread, stop)

    def _finish_loader(self, wanted: str | None) -> None:
        """Wait for a background load of `wanted`; stop (and release) one of another expert."""
        if self._loader is None:
            return
        name, thread, stop = self._loader
        if name != wanted:
            stop.set()
        thread.join()
        self._loader = None
        if name != wanted:
            self.engines[name].deactivate(release_host=True)

    def release_device(self) -> None:
        """Give every byte of device memory back until the next `activate` (another stage,
        e.g. a VAE decode, needs it): the active expert stops streaming but keeps its host
        copies (activating it again uploads them, activating the other expert releases
        them), its weights outside the blocks go to the CPU, and the arena is freed. A
        background read of the next expert goes on."""
        if self.active is not None:
            self.engines[self.active].deactivate(release_host=False)
            move_outside_blocks(self.models[self.active], "cpu", self.blocks)
            self._parked, self.active = self.active, None
        if self.arena is not None:
            self.arena.close()
            self.arena = None

    def close(self) -> None:
        self._finish_loader(None)
        for engine in self.engines.values():
            engine.close()
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        self.active = self._parked = None
