"""Device side of streaming: memory allocated once, a copy stream, one event pair per slot.

`DeviceArena` holds every byte of device memory a plan gives to weights: one buffer per
resident block (bound once) and a ring of equal slots that streamed blocks pass through.
The arena outlives a model: the two experts of an A14B run use the same arena one after
the other, so the device memory is allocated once per process, not once per expert.

`DeviceRing` hands out slots. A copy into a slot waits (on the copy stream) for the event
"slot consumed", recorded on the compute stream after the last block that read it; the
block that needs the slot waits (on the compute stream) for "slot filled". Nothing here
blocks the host: both waits are stream waits. On a CPU device (tests, no GPU) the same
code runs with plain synchronous copies and no events.
"""
from __future__ import annotations

from collections import deque

import torch


class DeviceArena:
    """Ring slots and resident-block buffers on `device`, allocated at construction."""

    def __init__(self, device: torch.device | str, ring_slots: int, slot_bytes: int, resident_bytes: list[int]):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.slot_bytes = int(slot_bytes)
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(ring_slots)]
        self.resident = [torch.empty(int(n), dtype=torch.uint8, device=self.device) for n in resident_bytes]
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.filled = [torch.cuda.Event() for _ in self.slots] if self.cuda else [None] * ring_slots
        self.consumed = [torch.cuda.Event() for _ in self.slots] if self.cuda else [None] * ring_slots

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self.slots) + sum(t.numel() for t in self.resident)

    def fits(self, ring_slots: int, slot_bytes: int, resident_bytes: list[int]) -> bool:
        """Whether a plan with these needs can use this arena as it is."""
        if ring_slots > len(self.slots) or (ring_slots and slot_bytes > self.slot_bytes):
            return False
        have = sorted((t.numel() for t in self.resident), reverse=True)
        need = sorted(resident_bytes, reverse=True)
        return len(need) <= len(have) and all(n <= h for n, h in zip(need, have))

    def synchronize(self) -> None:
        """Wait for every copy in flight (at a boundary, never inside a forward)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()

    def close(self) -> None:
        self.synchronize()
        self.slots, self.resident = [], []
        self.filled, self.consumed = [], []


class DeviceRing:
    """The slots of an arena as a FIFO of prefetched blocks.

    `queue` lists slots whose copy is enqueued, in the order their blocks will run;
    `current` is the slot the running block reads. A slot is free when it is neither."""

    def __init__(self, arena: DeviceArena, n_slots: int):
        self.arena = arena
        self.n = n_slots
        self.holds: list[int | None] = [None] * n_slots  # block whose bytes are (or will be) in the slot
        self.queue: deque[int] = deque()
        self.current: int | None = None
        self._next = 0
        self.copies = 0
        self.bytes_copied = 0

    def free_slot(self) -> int | None:
        busy = set(self.queue)
        if self.current is not None:
            busy.add(self.current)
        for step in range(self.n):
            s = (self._next + step) % self.n
            if s not in busy:
                self._next = (s + 1) % self.n
                return s
        return None

    def n_free(self) -> int:
        return self.n - len(self.queue) - (self.current is not None)

    def copy_in(self, slot: int, block: int, src: torch.Tensor, done=None) -> None:
        """Enqueue the copy of `src` (the block's bytes on the host) into `slot`. `done`,
        an event, is recorded after the copy (to release a staging buffer); on CPU the
        copy is finished on return."""
        arena = self.arena
        dst = arena.slots[slot][: src.numel()]
        if arena.cuda:
            stream = arena.copy_stream
            stream.wait_event(arena.consumed[slot])
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
            arena.filled[slot].record(stream)
            if done is not None:
                done.record(stream)
        else:
            dst.copy_(src)
        self.holds[slot] = block
        self.queue.append(slot)
        self.copies += 1
        self.bytes_copied += src.numel()

    def drop_queue(self) -> None:
        """Forget prefetched blocks (their copies may still land; the slots are reused
        behind them on the same stream)."""
        for s in self.queue:
            self.holds[s] = None
        self.queue.clear()

    def acquire(self, block: int) -> int | None:
        """The slot holding `block` at the head of the queue, made current and waited for
        on the compute stream; None when the head holds something else."""
        if not self.queue or self.holds[self.queue[0]] != block:
            return None
        s = self.queue.popleft()
        if self.arena.cuda:
            torch.cuda.current_stream(self.arena.device).wait_event(self.arena.filled[s])
        self.current = s
        return s

    def release(self) -> None:
        """The running block has been enqueued on the compute stream: its slot is reusable
        once the stream gets past this point."""
        s = self.current
        if s is None:
            return
        if self.arena.cuda:
            self.arena.consumed[s].record(torch.cuda.current_stream(self.arena.device))
        self.current = None
