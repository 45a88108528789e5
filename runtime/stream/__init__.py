"""Streaming of large modules between host and GPU: any VRAM budget, copies hidden
behind compute, one expert in RAM.

    from runtime.stream import FileSource, BlockWeights, Request, plan_dit, attach

    source = FileSource.from_gguf("high-Q8_0.gguf")
    weights = BlockWeights.of(model, source)                  # model's blocks may be on meta
    plan = plan_dit(model.config, Request(832, 480, 81), weights=weights, vram="auto", ram="auto")
    print(plan.describe())
    engine = attach(model, plan, source=source)               # model(...) now streams
    ...
    engine.close()

The umt5 encoder streams the same way: `plan_t5(encoder.model.cfg, weights=...)`, then
`attach(encoder.model, plan, source=FileSource.from_gguf(path, rename=official_name),
exclude=("token_embedding",))` (its token table stays in host memory).

Two experts that run one after the other share one device arena and, when RAM is short,
one expert's worth of host memory: `ExpertSet({"high": (m1, s1), "low": (m2, s2)}, plan)`,
then `experts.activate("high")` ... `experts.activate("low")`.

A request that cannot fit raises `PlanError` (a ValueError) before any work, with the
numbers and the ways out. Budgets: `parse_memory("auto" | "8" | "7.5GiB")`.
"""
from .budget import AUTO, GiB, DeviceInfo, parse_memory, pinned_bytes
from .engine import StreamEngine, attach, move_outside_blocks
from .experts import ExpertSet
from .host import FileSource
from .activations import dit_activation_bytes, t5_activation_bytes
from .plan import BlockWeights, Plan, PlanError, Request, plan_blocks, plan_dit, plan_t5

__all__ = [
    "AUTO",
    "BlockWeights",
    "DeviceInfo",
    "ExpertSet",
    "FileSource",
    "GiB",
    "Plan",
    "PlanError",
    "Request",
    "StreamEngine",
    "attach",
    "dit_activation_bytes",
    "move_outside_blocks",
    "parse_memory",
    "pinned_bytes",
    "plan_blocks",
    "plan_dit",
    "plan_t5",
    "t5_activation_bytes",
]
