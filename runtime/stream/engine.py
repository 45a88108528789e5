"""The streaming engine: a module's blocks run on the GPU whatever their total size.

    plan = plan_dit(model.config, request, vram="auto", ram="auto", weights=...)
    engine = attach(model, plan, source=FileSource.from_gguf(path))
    model(...)          # streams transparently; both CFG passes share each block's trip
    engine.close()      # hands device and host memory back

`attach` moves everything outside the blocks to the device once, sets the model's
chunking to the plan's, and builds a `StreamEngine` over `model.blocks`. The engine
registers a forward pre-hook and a forward hook on every block. Resident blocks were
bound to their device buffers once and cost nothing per call. Before a streamed block
runs, the compute stream waits for the event "slot filled" of its ring slot (a stream
wait, never a host sync), the block's weights are pointed at views into the slot, and the
copies of the next blocks are enqueued on the copy stream behind "slot consumed" events.
After the block, "slot consumed" is recorded. Blocks run in index order, forward after
forward, so the first blocks of the next forward are prefetched during the last ones of
this forward; a call out of order (a forward cut short by an error) costs a wait, not a
wrong result.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import nn

from .device import DeviceArena, DeviceRing
from .host import DROPPED, PINNED, FileSource, HostStore, PinnedBuffer, StagingReader, bind, build_layouts
from .plan import Plan


class StreamEngine:
    """Runs `blocks` (an nn.ModuleList whose weights are buffers or parameters) on
    `device` with the residency, ring and host placement of `plan`.

    source: where the weights' bytes lie in a file (`FileSource`); tensors on the meta
        device must be there. Without it every weight must be in memory.
    prefix: the name of `blocks` inside its model (file names are `<prefix>.<i>.<...>`).
    arena: device memory to share (with the other expert), else one is allocated at the
        first `activate()`; `needs()` says what it must hold.
    load: read the host copies now (True) or leave it to `load()` (an expert loaded in the
        background calls it from another thread).
    host: a HostStore of these blocks to use instead of making one (several plans over one
        model, e.g. a benchmark, share one set of pinned copies); it is neither loaded
        again nor released by this engine. Streamed blocks it holds are copied from it,
        the others are staged from the file.
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        plan: Plan,
        *,
        source: FileSource | None = None,
        prefix: str = "blocks",
        device: torch.device | str = "cuda",
        arena: DeviceArena | None = None,
        load: bool = True,
        progress: bool = False,
        host: HostStore | None = None,
    ):
        if len(blocks) != plan.n_blocks:
            raise ValueError(f"the plan is for {plan.n_blocks} blocks, the module has {len(blocks)}")
        self.blocks = blocks
        self.plan = plan
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.progress = progress
        self.layouts = build_layouts(blocks, prefix, source)
        self.resident = tuple(plan.resident)
        self.streamed = tuple(plan.streamed)
        self._is_resident = [False] * plan.n_blocks
        for i in self.resident:
            self._is_resident[i] = True
        self._order_pos = {b: k for k, b in enumerate(self.streamed)}
        for i in self.streamed:
            if self.layouts[i].nbytes > plan.slot_bytes:
                raise ValueError(
                    f"block {i} takes {self.layouts[i].nbytes:,} bytes but the plan's ring slots hold "
                    f"{plan.slot_bytes:,}: make the plan from this model's weights (BlockWeights.of)"
                )
        placement = list(plan.host)
        for i, where in enumerate(placement):
            if where == DROPPED and not self._is_resident[i]:
                raise ValueError(f"block {i} is streamed, so its host copy cannot be dropped")
        if host is not None:
            if [l.nbytes for l in host.layouts] != [l.nbytes for l in self.layouts]:
                raise ValueError("the host store given holds other blocks than these")
            self.store, self._own_store = host, False
        else:
            self.store, self._own_store = HostStore(self.layouts, placement, source, pin=self.cuda), True
        self.source = source
        self.arena: DeviceArena | None = None
        self._own_arena = False
        self.ring: DeviceRing | None = None
        if arena is not None:
            self.use_arena(arena)
        self._views: list[dict] = [{} for _ in self.layouts]
        self._hooks: list = []
        self._last: tuple[int, int] | None = None  # (block, slot) of the last streamed block run
        self.reader: StagingReader | None = None
        self.misses = 0  # streamed blocks that were not prefetched when they were needed
        self.active = False
        self.closed = False
        self._host_lock = threading.Lock()
        if load:
            self.load()

    # -- setup ----------------------------------------------------------------------

    def load(self) -> None:
        """`load_host()` then `activate()`."""
        self.load_host()
        self.activate()

    def load_host(self, stop: threading.Event | None = None) -> None:
        """Read the host copies the plan pins (safe to run in a background thread while
        another engine computes; `stop` ends it early)."""
        with self._host_lock:
            todo = [l for l in self.layouts if self.store.placement[l.index] == PINNED and l.index not in self.store.buffers]
            bar = self._bar(sum(l.nbytes for l in todo))
            self.store.load(progress=None if bar is None else bar.update, stop=stop)
            if bar is not None:
                bar.close()

    def needs(self) -> tuple[int, int, list[int]]:
        """(ring slots, bytes per slot, bytes of each resident block) for a DeviceArena."""
        return self.plan.ring_slots, self.plan.slot_bytes, [self.layouts[i].nbytes for i in self.resident]

    def use_arena(self, arena: DeviceArena) -> None:
        """Use `arena` (shared, not freed by `close`) for the device memory."""
        if self.active:
            raise RuntimeError("cannot change the arena of an active engine")
        if not arena.fits(*self.needs()):
            raise ValueError("the device arena given is too small for this plan")
        self.arena, self._own_arena = arena, False
        self.ring = DeviceRing(arena, self.plan.ring_slots)

    def activate(self) -> None:
        """Upload the resident blocks into the arena, bind, start the staging reader and
        install the hooks: from here on the blocks run on the device."""
        if self.closed:
            raise RuntimeError("this engine was closed")
        if self.active:
            return
        if self.arena is None:
            self.arena = DeviceArena(self.device, *self.needs())
            self._own_arena = True
            self.ring = DeviceRing(self.arena, self.plan.ring_slots)
        self.load_host()
        self._upload_resident()
        for i in self.streamed:
            bind(self.layouts[i], self.store.view(i) if i in self.store.buffers else None, self._views[i])
        staged = [i for i in self.streamed if i not in self.store.buffers]
        if staged:
            self.reader = StagingReader(
                self.store, staged, self.plan.staging_slots, self.plan.slot_bytes, pin=self.cuda, events=self.cuda
            )
            self.reader.start(staged[0])
        for i, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(self._pre_hook(i)))
            self._hooks.append(block.register_forward_hook(self._post_hook(i)))
        self._last = None
        self.active = True

    def _bar(self, total: int):
        if not self.progress or total == 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, unit="B", unit_scale=True, desc="loading blocks", leave=False)

    def _upload_resident(self) -> None:
        staging = None
        todo = [i for i in self.resident if i not in self.store.buffers]
        bar = self._bar(sum(self.layouts[i].nbytes for i in todo))
        # the largest blocks into the largest buffers (a shared arena fits every expert)
        by_size = sorted(self.resident, key=lambda i: self.layouts[i].nbytes, reverse=True)
        buffers = sorted(self.arena.resident, key=lambda t: t.numel(), reverse=True)
        for i, dst in zip(by_size, buffers):
            layout = self.layouts[i]
            if i in self.store.buffers:
                src = self.store.view(i)
            else:
                if staging is None:
                    staging = PinnedBuffer(max(self.layouts[j].nbytes for j in todo), pin=self.cuda)
                self.store.fill(i, staging.tensor)
                src = staging.tensor[: layout.nbytes]
                if bar is not None:
                    bar.update(layout.nbytes)
            dst[: layout.nbytes].copy_(src)  # synchronous: setup, not the hot loop
            bind(layout, dst, self._views[i])
        if bar is not None:
            bar.close()
        if staging is not None:
            staging.close()

    # -- the hot path ------------------------------------------------------------------

    def _pre_hook(self, i: int) -> Callable:
        def hook(module, args):
            if not self._is_resident[i]:
                self._before(i)

        return hook

    def _post_hook(self, i: int) -> Callable:
        def hook(module, args, output):
            if not self._is_resident[i]:
                self._last = (i, self.ring.current)
                self.ring.release()

        return hook

    def _before(self, i: int) -> None:
        ring = self.ring
        last = self._last
        if last is not None and last[0] == i and ring.holds[last[1]] == i and last[1] not in ring.queue:
            ring.current = last[1]  # the same block again (CFG passes run one by one)
        else:
            slot = ring.acquire(i)
            if slot is None:  # not prefetched: first call, or called out of order
                self.misses += 1
                ring.drop_queue()
                self._issue(i, wait=True)
                slot = ring.acquire(i)
            bind(self.layouts[i], self.arena.slots[slot], self._views[i])
        self._prefetch_after(i)

    def _issue(self, i: int, wait: bool) -> bool:
        """Enqueue the copy of streamed block i into a free slot; False if its bytes are
        not on the host yet and `wait` is False."""
        if i in self.store.buffers:
            self.ring.copy_in(self.ring.free_slot(), i, self.store.view(i))
            return True
        taken = self.reader.take(i, wait)
        if taken is None:
            return False
        k, buf = taken
        self.ring.copy_in(self.ring.free_slot(), i, buf[: self.layouts[i].nbytes], done=self.reader.done_event(k))
        self.reader.release(k)
        return True

    def _prefetch_after(self, i: int) -> None:
        """Keep the ring full with the streamed blocks that follow block i (cyclically)."""
        ring, order = self.ring, self.streamed
        n, pos = len(order), self._order_pos[i]
        depth = min(ring.n - 1, n - 1) if n > 1 else 0
        expected = [order[(pos + 1 + k) % n] for k in range(depth)]
        queued = [ring.holds[s] for s in ring.queue]
        if queued != expected[: len(queued)]:
            ring.drop_queue()
            queued = []
        for b in expected[len(queued) :]:
            if ring.n_free() == 0 or not self._issue(b, wait=False):
                break

    # -- teardown ------------------------------------------------------------------------

    def stats(self) -> dict:
        return {
            "copies": 0 if self.ring is None else self.ring.copies,
            "bytes_copied": 0 if self.ring is None else self.ring.bytes_copied,
            "misses": self.misses,
            "disk_waits": 0 if self.reader is None else self.reader.waits,
            "host_pinned_bytes": self.store.pinned_bytes + (0 if self.reader is None else self.reader.pinned_bytes),
        }

    def deactivate(self, release_host: bool = True) -> None:
        """Stop streaming: wait for copies in flight (a boundary, not the hot loop), point
        the block weights that the file holds at the meta device (the others at their own
        tensors in memory), and with `release_host` give the pinned host memory back (it is
        read from the file again by the next `activate`)."""
        if self.active:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            if self.reader is not None:
                self.reader.close()
                self.reader = None
            if self.arena is not None:
                self.arena.synchronize()
            for layout in self.layouts:
                bind(layout, None)
            self._views = [{} for _ in self.layouts]
            self.ring.drop_queue()
            self.ring.current = None
            self.active = False
        if release_host and self._own_store and self.store.reloadable:
            with self._host_lock:
                self.store.release()

    def close(self) -> None:
        """Deactivate and give every byte back: pinned copies, and the device arena if this
        engine allocated it. The engine cannot be used again; the model can, by a new
        engine, when its weights are in the file (or in memory). A model whose weights
        existed only in the pinned copies (no file) is left on the meta device."""
        if self.closed:
            return
        self.deactivate(release_host=False)
        if self._own_store:
            self.store.close()
        if self._own_arena and self.arena is not None:
            self.arena.close()
        self.arena = self.ring = None
        self.closed = True


def move_outside_blocks(model: nn.Module, device, blocks: str = "blocks", exclude: tuple[str, ...] = ()) -> int:
    """Move every parameter and buffer of `model` that is not inside `model.<blocks>` (nor
    inside a submodule named in `exclude`) to `device`; returns the bytes moved."""
    skip = {id(m) for m in model.get_submodule(blocks).modules()}
    for name in exclude:
        skip |= {id(m) for m in model.get_submodule(name).modules()}
    moved = 0
    for mod_name, mod in model.named_modules():
        if id(mod) in skip:
            continue
        for table in (mod._parameters, mod._buffers):
            for attr, t in table.items():
                if t is None:
                    continue
                if t.is_meta:
                    raise ValueError(f"{mod_name + '.' if mod_name else ''}{attr} was never loaded (meta tensor)")
                if t.device != torch.device(device):
                    moved_t = t.detach().to(device)
                    table[attr] = nn.Parameter(moved_t, requires_grad=False) if table is mod._parameters else moved_t
                moved += t.numel() * t.element_size()
    return moved


def attach(
    model: nn.Module,
    plan: Plan,
    *,
    source: FileSource | None = None,
    device: torch.device | str = "cuda",
    blocks: str = "blocks",
    exclude: tuple[str, ...] = (),
    progress: bool = True,
    host: HostStore | None = None,
) -> StreamEngine:
    """Make `model(...)` run on `device` per `plan`: the weights outside `model.<blocks>`
    move there once (except submodules named in `exclude`), the model's chunk settings
    (`model.settings.attn_chunk_tokens` / `ffn_chunk_tokens` / `attn_heads_per_chunk`,
    where it has them) are set to the plan's (`Plan.apply_chunks`), and the blocks stream. Returns the engine; `engine.close()` undoes
    the streaming and frees its memory. `host`: see StreamEngine."""
    settings = getattr(model, "settings", None)
    if settings is not None:
        plan.apply_chunks(settings)
    move_outside_blocks(model, device, blocks, exclude)
    return StreamEngine(
        model.get_submodule(blocks), plan, source=source, prefix=blocks, device=device, progress=progress, host=host
    )
