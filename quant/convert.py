"""python -m quant.convert: a Wan DiT checkpoint in any format -> GGUF, and back.

    python -m quant.convert SRC OUT.gguf --type q8_0
    python -m quant.convert shard1.safetensors shard2.safetensors OUT.gguf --type q4_0
    python -m quant.convert --dequantize IN.gguf OUT.safetensors --dtype bf16

SRC is anything `open_checkpoint` reads (official expert folder, ComfyUI or diffusers
file, GGUF, .pth). Tensor types follow `type_policy` (city96's layout). By default the
block weights are quantized from the source's own precision; `--via f16` (or bf16)
takes city96's route instead, quantizing from an F16 (BF16) base, which reproduces his
files byte for byte.

The file holds what city96 writes for Wan (`general.architecture`,
`general.quantization_version`, `general.file_type`) and, unless
`--no-extra-metadata`, two keys the runtime can use: `wan.expert` (high_noise /
low_noise, from the source's path or `--expert`) and `wan.attention.head_count` (from
config.json or `--num-heads`; inferred from the width only for official Wan widths,
and said so). Without the extras the output is byte-identical to city96's route.

Memory stays near a few pieces of ~16 MB: tensors are read, quantized and written in
pieces of whole rows, the three at once on separate threads (`convert_pipeline`),
into a file written past the page cache to a temporary name beside OUT and renamed
when complete (`atomic_file`). Sources that hand out whole tensors (GGUF, .pth, a
LoRA being merged) hold one tensor more.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import codecs
from .checkpoint import EXPERTS, Checkpoint, CheckpointError, open_checkpoint
from .convert_pipeline import TensorStream
from .fp8_scaled import FP8Scales, ScaledFP8Error, find_fp8_scales, scaled_value
from .ggml_types import FLOAT_TYPES, LEGACY_QUANTS, GGMLType, parse_type, row_nbytes
from .gguf_writer import GGUFWriter
from .packed import PackedTensor
from .safetensors_io import TensorToWrite, write_safetensors
from .type_policy import Override, TensorPlan, base_float_type, parse_override, plan_tensor
from .wan_names import KIND_DESCRIPTIONS, WAN_DIT

ARCH = "wan"
EXPERT_KEY = "wan.expert"
HEAD_COUNT_KEY = "wan.attention.head_count"
# Every official Wan DiT has heads of 128 (1.3B: 1536 = 12 x 128, TI2V-5B: 3072 = 24 x 128,
# 14B / A14B: 5120 = 40 x 128); other widths are not guessed.
_OFFICIAL_HEADS = {1536: 12, 3072: 24, 5120: 40}

# A hook sees every tensor, by official name, in float32 before it is typed and
# quantized, and returns the tensor to write (same shape). LoRA baking plugs in here.
WeightHook = Callable[[str, torch.Tensor], torch.Tensor]

DEQUANT_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


class ConvertError(ValueError):
    """A conversion that cannot be done as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ConvertOptions:
    type: GGMLType
    via: GGMLType | None = None  # F16/BF16: city96's route through a float base
    keep: tuple[Override, ...] = ()
    expert: str | None = None  # "high_noise", "low_noise", "none" (omit), None (from the source)
    num_heads: int | None = None
    extra_metadata: bool = True
    force: bool = False
    threads: int | None = None
    progress: bool = True
    weight_hooks: tuple[WeightHook, ...] = ()


@dataclass
class ConvertResult:
    path: Path
    plans: list[TensorPlan]
    metadata: dict
    source_bytes: int
    output_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


# ---- conversion -----------------------------------------------------------------------

def convert(source, out: str | Path, options: ConvertOptions) -> ConvertResult:
    """Convert a Wan DiT checkpoint (path, folder or list of shards) to a GGUF file."""
    out = Path(out)
    target = parse_type(options.type)
    if target not in (*LEGACY_QUANTS, *FLOAT_TYPES):
        raise ConvertError(f"cannot write {target.name} files; expected one of {_type_names()}")
    if options.via not in (None, GGMLType.F16, GGMLType.BF16):
        raise ConvertError(f"--via must be f16 or bf16, got {options.via.name.lower()}")
    _check_output(out, options.force, _source_paths(source))

    t0 = time.perf_counter()
    with open_checkpoint(source) as ckpt:
        _require_wan_dit(ckpt)
        notes = list(ckpt.notes)
        fp8 = _fp8_scales(ckpt, notes)
        plans = _plan(ckpt, target, options, skip=fp8.extra)
        metadata = _metadata(ckpt, options, notes)

        writer = GGUFWriter(out, arch=ARCH, overwrite=options.force)
        writer.add_quantization_info(target)
        for key, (value, vtype) in metadata.items():
            writer.add_metadata(key, value, vtype)
        source_bytes = sum(ckpt.info(p.name).nbytes for p in plans)
        bar = None
        if options.progress:
            from tqdm import tqdm

            bar = tqdm(total=source_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                       desc=f"converting -> {out.name}", dynamic_ncols=True)
        try:
            with _stream(ckpt, plans, options, fp8.scales, bar.update if bar is not None else None) as stream:
                for plan in plans:
                    writer.add_tensor(plan.name, plan.shape, plan.ggml_type, stream.producer(plan))
                stream.place_for(writer.tensor_offsets())
                writer.write()
        finally:
            if bar is not None:
                bar.close()
    seconds = time.perf_counter() - t0
    return ConvertResult(out, plans, metadata, source_bytes, out.stat().st_size, seconds, notes)


def _fp8_scales(ckpt: Checkpoint, notes: list[str]) -> FP8Scales:
    """ComfyUI's scaled fp8 layout, if the file has it, with a note of what it changes."""
    try:
        fp8 = find_fp8_scales(ckpt)
    except ScaledFP8Error as e:
        raise ConvertError(str(e)) from None
    if fp8:
        others = sorted(fp8.extra - set(fp8.scales.values()))
        notes.append(
            f"ComfyUI scaled fp8: {len(fp8.scales)} weights are written as fp8 value x scale (formed in float32)"
            + (f"; left out {len(others)} tensors that only serve ComfyUI's fp8 matmul ({_names(others)})"
               if others else ""))
    return fp8


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _plan(ckpt: Checkpoint, target: GGMLType, options: ConvertOptions, skip=frozenset()) -> list[TensorPlan]:
    dtypes = {n: _source_dtype(ckpt, n) for n in ckpt.names() if n not in skip}
    bad = [f"{n} ({d})" for n, d in dtypes.items() if not d.is_floating_point]
    if bad:
        raise ConvertError(f"{ckpt.path}: non-float tensors cannot be converted: {', '.join(bad[:4])}")
    base = base_float_type(target, options.via)
    return [
        plan_tensor(n, ckpt.info(n).shape, dtypes[n], target=target, base=base, via=options.via, overrides=options.keep)
        for n in dtypes
    ]


def _source_dtype(ckpt: Checkpoint, name: str) -> torch.dtype:
    # A block-quantized tensor is requantized from its exact float32 decoding.
    return ckpt.info(name).dtype or torch.float32


def _metadata(ckpt: Checkpoint, options: ConvertOptions, notes: list[str]) -> dict:
    """The extra metadata keys (name -> (value, GGUF value type))."""
    if not options.extra_metadata:
        return {}
    meta = {}
    expert = ckpt.expert if options.expert is None else options.expert
    if expert in EXPERTS:
        meta[EXPERT_KEY] = (expert, "STRING")
    heads = _head_count(ckpt, options, notes)
    if heads is not None:
        meta[HEAD_COUNT_KEY] = (heads, "UINT32")
    return meta


def _head_count(ckpt: Checkpoint, options: ConvertOptions, notes: list[str]) -> int | None:
    dim = ckpt.info("patch_embedding.weight").shape[0] if "patch_embedding.weight" in ckpt else None
    config = ckpt.config or {}
    for heads, where in (
        (options.num_heads, "--num-heads"),
        (config.get("num_heads") or config.get("num_attention_heads"), "config.json"),
        (ckpt.metadata.get(HEAD_COUNT_KEY), f"the source's {HEAD_COUNT_KEY}"),
    ):
        if heads is None:
            continue
        heads = int(heads)
        if heads <= 0 or (dim is not None and dim % heads):
            raise ConvertError(f"{heads} heads (from {where}) do not divide the model width {dim}")
        return heads
    if dim in _OFFICIAL_HEADS:
        heads = _OFFICIAL_HEADS[dim]
        notes.append(
            f"head count not given: assumed {heads} heads of 128, as in every official Wan model of width {dim} "
            f"(pass --num-heads to set it)"
        )
        return heads
    notes.append(f"head count unknown for width {dim} (no config.json): not recorded; pass --num-heads to record it")
    return None


def _stream(ckpt: Checkpoint, plans: list[TensorPlan], options: ConvertOptions, scales: dict[str, str],
            progress: Callable[[int], None] | None) -> TensorStream:
    """The pipeline that reads, encodes and hands each tensor to the writer in pieces.
    `scales`: weight name -> the name of its scale (ComfyUI's scaled fp8)."""
    hooks = options.weight_hooks
    # By default the codec gets every core: the reader and the writer mostly wait on
    # the disk and on memory copies, so the codec is what needs the cores.
    threads = options.threads

    def read_whole(plan: TensorPlan) -> torch.Tensor:
        return _apply_hooks(plan.name, _as_float(_load(ckpt, plan.name, scales), threads), hooks)

    def byte_reader(plan: TensorPlan):
        if hooks or plan.name in scales or ckpt.info(plan.name).dtype not in _TORCH_FLOATS.values():
            return None
        return ckpt.byte_reader(plan.name)

    def encode(plan: TensorPlan, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return tensor_bytes(plan, x, threads=threads, out=out)

    return TensorStream(plans, read_whole=read_whole, byte_reader=byte_reader, encode=encode,
                        source_nbytes=lambda p: ckpt.info(p.name).nbytes,
                        source_dtype=lambda p: ckpt.info(p.name).dtype, progress=progress)


def _load(ckpt: Checkpoint, name: str, scales: dict[str, str]):
    """The tensor as stored, or value x scale in float32 for a scaled fp8 weight."""
    x = ckpt.load(name)
    return scaled_value(x, ckpt.load(scales[name])) if name in scales else x


# Input bytes per codec call on the route through a float base: each chunk is rounded
# into a scratch buffer of this size, reused, then quantized.
_CHUNK_BYTES = 8 << 20

_TORCH_FLOATS = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


def tensor_bytes(plan: TensorPlan, x, *, hooks: Sequence[WeightHook] = (), threads: int | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The stored form of one tensor under its plan: uint8 blocks for a block type, a
    float tensor for F32/F16/BF16 (identical to gguf-py's conversion of the same data).
    `out`, a uint8 buffer of at least the stored size, is used instead of new memory."""
    x = _apply_hooks(plan.name, _as_float(x, threads), hooks)
    if plan.ggml_type in LEGACY_QUANTS:
        return _quantize(x, plan.ggml_type, plan.round_via, threads, out)
    return cast_float(x, plan.ggml_type, out=out)


def _apply_hooks(name: str, x: torch.Tensor, hooks: Sequence[WeightHook]) -> torch.Tensor:
    if hooks:
        x = x.to(torch.float32)
        for hook in hooks:
            y = hook(name, x)
            if tuple(y.shape) != tuple(x.shape):
                raise ConvertError(f"{name}: a weight hook changed the shape {list(x.shape)} -> {list(y.shape)}")
            x = y
    return x


def _quantize(x: torch.Tensor, ggml_type: GGMLType, round_via: GGMLType | None, threads: int | None,
              out: torch.Tensor | None) -> torch.Tensor:
    """Quantize into one byte tensor (`out` when given), in one codec call, or with
    `round_via` chunk by chunk, each chunk first rounded to that float type (city96's
    route reads an F16/BF16 base)."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    row_bytes = row_nbytes(ggml_type, n)
    nbytes = rows.shape[0] * row_bytes
    dst = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
    dst2 = dst.view(rows.shape[0], row_bytes)
    if round_via is None:
        codecs.quantize(rows, ggml_type, threads=threads, out=dst2)
        return dst
    itemsize = _TORCH_FLOATS[round_via].itemsize
    step = max(1, _CHUNK_BYTES // (n * itemsize))
    scratch = torch.empty(min(step, rows.shape[0]) * n * itemsize, dtype=torch.uint8)
    for r in range(0, rows.shape[0], step):
        chunk = cast_float(rows[r : r + step], round_via, out=scratch)
        codecs.quantize(chunk, ggml_type, threads=threads, out=dst2[r : r + step])
    return dst


def _as_float(x, threads: int | None) -> torch.Tensor:
    """A float32/float16/bfloat16 CPU tensor of the stored values (exact widening)."""
    if isinstance(x, PackedTensor):
        if x.ggml_type in LEGACY_QUANTS:
            return codecs.dequantize(x.data, x.ggml_type, x.shape, dtype=torch.float32, threads=threads)
        return x.dequantize(torch.float32)  # K-quants and others: the torch decoder
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return x
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return x.to(torch.float16)  # exact, as city96's convert.py widens fp8
    return x.to(torch.float32)


def cast_float(x: torch.Tensor, ggml_type: GGMLType, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Round to F32/F16/BF16 as gguf-py does: round to nearest even; for BF16 a NaN
    keeps its sign and top bits and is made quiet (torch would canonicalize it). A
    tensor already of the type is returned as is; otherwise the result is written
    into `out` (a uint8 buffer) when given."""
    if ggml_type not in _TORCH_FLOATS:
        raise ValueError(f"not a float type: {ggml_type.name}")
    dtype = _TORCH_FLOATS[ggml_type]
    if x.dtype == dtype:
        y = x
    else:
        nbytes = x.numel() * dtype.itemsize
        y = torch.empty(x.shape, dtype=dtype) if out is None else out[:nbytes].view(dtype).view(x.shape)
        y.copy_(x)
    if dtype == torch.bfloat16 and _any_nan(x):
        bits = x.view(torch.int16) if x.dtype == torch.bfloat16 else (x.float().view(torch.int32) >> 16).to(torch.int16)
        y = torch.where(torch.isnan(x), bits | 0x40, y.view(torch.int16)).view(torch.bfloat16)
    return y


def _any_nan(x: torch.Tensor) -> bool:
    # max() propagates NaN: one vectorized pass, no mask allocated (10x isnan().any()).
    return x.numel() > 0 and bool(torch.isnan(x.max()))


# ---- back to safetensors ------------------------------------------------------------

def dequantize_to_safetensors(source, out: str | Path, *, dtype: torch.dtype = torch.bfloat16, force: bool = False,
                              progress: bool = True, threads: int | None = None) -> Path:
    """Write every tensor of a checkpoint (GGUF or any other format) as `dtype` to a
    safetensors file under official names."""
    out = Path(out)
    _check_output(out, force, _source_paths(source))
    with open_checkpoint(source) as ckpt:
        fp8 = _fp8_scales(ckpt, [])
        names = [n for n in ckpt.names() if n not in fp8.extra]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(names), unit="tensor", desc=f"dequantizing -> {out.name}", dynamic_ncols=True)

        def produce(name: str) -> Callable[[], torch.Tensor]:
            def f() -> torch.Tensor:
                x = _load(ckpt, name, fp8.scales)
                if isinstance(x, PackedTensor) and x.ggml_type in LEGACY_QUANTS:
                    # the codec rounds its float32 values once to dtype, as .to(dtype) would
                    return codecs.dequantize(x.data, x.ggml_type, x.shape, dtype=dtype, threads=threads)
                return _as_float(x, threads).to(dtype)
            return f

        tensors = [TensorToWrite(n, dtype, ckpt.info(n).shape, produce(n)) for n in names]
        meta = {"format": "pt", "source": Path(ckpt.path).name}
        if ckpt.expert:
            meta[EXPERT_KEY] = ckpt.expert
        try:
            write_safetensors(out, tensors, meta, overwrite=force, on_tensor=(lambda t: bar.update(1)) if bar else None)
        finally:
            if bar is not None:
                bar.close()
    return out


# ---- checks -----------------------------------------------------------------------

def _source_paths(source) -> list[Path]:
    if isinstance(source, (str, Path)):
        return [Path(source)]
    return [Path(s) for s in source]


def _check_output(out: Path, force: bool, sources: list[Path]) -> None:
    for src in sources:
        if not src.exists():
            raise CheckpointError(f"{src}: no such file or folder")
        if out.exists() and out.resolve() == src.resolve():
            raise ConvertError(f"{out}: the output would replace the input; choose another output name")
    if out.is_dir():
        raise ConvertError(f"{out} is a folder; give the output file name, e.g. {out / 'model-Q8_0.gguf'}")
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists; pass --force to replace it")
    parent = out.parent
    if not parent.exists():
        raise ConvertError(f"cannot write {out}: folder {parent} does not exist")
    if not parent.is_dir():
        raise ConvertError(f"cannot write {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConvertError(f"cannot write {out}: no permission to create files in {parent}")


def _require_wan_dit(ckpt: Checkpoint) -> None:
    if ckpt.kind != WAN_DIT:
        raise ConvertError(
            f"{ckpt.path}: this is {KIND_DESCRIPTIONS[ckpt.kind]}, not a Wan DiT; quant.convert converts the "
            f"diffusion transformer (one expert's folder or file)"
        )


def _type_names() -> str:
    return ", ".join(t.name.lower() for t in (*LEGACY_QUANTS, *FLOAT_TYPES))


# ---- command line -----------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m quant.convert",
        description="Convert a Wan 2.2 DiT checkpoint (official folder, ComfyUI/diffusers safetensors, GGUF, "
        ".pth) to GGUF, or a checkpoint back to safetensors with --dequantize.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="SRC [SRC ...] OUT: the source (file, folder, or several shard files) and the output file")
    p.add_argument("--type", default=None, help=f"tensor type of the block weights: {_type_names()}")
    p.add_argument("--via", choices=["f16", "bf16"], default=None,
                   help="city96's route: quantize from an F16/BF16 base instead of the source precision "
                   "(reproduces his files byte for byte)")
    p.add_argument("--keep", action="append", default=[], metavar="PATTERN=TYPE",
                   help="override the type of tensors whose official name matches PATTERN (fnmatch), e.g. "
                   "'blocks.0.*=q8_0'; several allowed, the last match wins")
    p.add_argument("--expert", choices=[*EXPERTS, "none"], default=None,
                   help="record which expert this is (default: from the source's path or metadata)")
    p.add_argument("--num-heads", type=int, default=None, help="record the attention head count (default: config.json)")
    p.add_argument("--no-extra-metadata", action="store_true",
                   help="write only the keys city96 writes (architecture, quantization version, file type)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--threads", type=int, default=None, help="codec threads (default: every core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="print every tensor's type and why")
    p.add_argument("--lora", action="append", default=[], metavar="[EXPERT=]PATH[:STRENGTH]",
                   help="merge a LoRA into the weights (float32) before they are quantized, e.g. "
                   "lightx2v_high.safetensors:1.0; several allowed; high=/low= bakes it into that expert only")
    p.add_argument("--dequantize", action="store_true", help="SRC OUT.safetensors: write the tensors as floats")
    p.add_argument("--dtype", choices=list(DEQUANT_DTYPES), default="bf16",
                   help="with --dequantize: float type of the output (default bf16)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if len(args.paths) < 2:
        _parser().error("give a source and an output: SRC [SRC ...] OUT")
    *sources, out = args.paths
    source = sources[0] if len(sources) == 1 else sources
    try:
        if args.dequantize and args.lora:
            raise ConvertError("--lora bakes LoRAs into a GGUF conversion; it does not apply with --dequantize")
        if args.dequantize:
            path = dequantize_to_safetensors(source, out, dtype=DEQUANT_DTYPES[args.dtype], force=args.force,
                                             progress=not args.quiet, threads=args.threads)
            print(f"wrote {path} ({_size(path.stat().st_size)}, {args.dtype})")
            return 0
        if args.type is None:
            raise ConvertError(f"--type is required: one of {_type_names()}")
        hooks = ()
        if args.lora:
            from .lora_bake import bake_hook

            bake = bake_hook(source, args.lora, expert=args.expert)
            for note in bake.notes:
                print(f"note: {note}")
            hooks = (bake,)
        options = ConvertOptions(
            type=parse_type(args.type),
            via=parse_type(args.via) if args.via else None,
            keep=tuple(parse_override(k) for k in args.keep),
            expert=args.expert,
            num_heads=args.num_heads,
            extra_metadata=not args.no_extra_metadata,
            force=args.force,
            threads=args.threads,
            progress=not args.quiet,
            weight_hooks=hooks,
        )
        result = convert(source, out, options)
    except KeyboardInterrupt:
        print(f"error: interrupted; {out} was not written", file=sys.stderr)
        return 130
    except (CheckpointError, ConvertError, ValueError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    _report(result, args.verbose)
    return 0


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def _report(r: ConvertResult, verbose: bool) -> None:
    for note in r.notes:
        print(f"note: {note}")
    if verbose:
        width = max(len(p.name) for p in r.plans)
        for p in r.plans:
            via = f" (via {p.round_via.name})" if p.round_via else ""
            print(f"  {p.name:<{width}}  {p.ggml_type.name:<5}{via}  {p.reason}")
    counts: dict[str, int] = {}
    for p in r.plans:
        counts[p.ggml_type.name] = counts.get(p.ggml_type.name, 0) + 1
    types = ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    extras = ", ".join(f"{k}={v[0]}" for k, v in r.metadata.items()) or "none"
    rate = r.source_bytes / r.seconds / 1e9 if r.seconds > 0 else float("inf")
    print(
        f"wrote {r.path}: {len(r.plans)} tensors ({types}), {_size(r.output_bytes)} from {_size(r.source_bytes)} "
        f"in {r.seconds:.1f} s ({rate:.2f} GB/s); extra metadata: {extras}"
    )


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


if __name__ == "__main__":
    sys.exit(main())
