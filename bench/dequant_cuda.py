"""Benchmark decoding weights on the GPU: the native CUDA kernels vs the torch twin.

Decodes one Wan-FFN-shaped weight (13824 x 5120 by default) of each block type to
bf16 on the current device, timing both paths with CUDA events in the same run, and
checks that they give the same values. GB/s counts packed bytes read plus decoded
bytes written.

    python bench/dequant_cuda.py [--rows 13824] [--cols 5120] [--dtype bf16] [--repeat 20] [--out dequant_cuda.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant import _native  # noqa: E402
from quant.dequant_torch import dequantize as torch_dequantize  # noqa: E402
from quant.ggml_types import LEGACY_QUANTS, GGMLType, tensor_nbytes, traits  # noqa: E402

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
OUT_IDS = {torch.float32: GGMLType.F32, torch.float16: GGMLType.F16, torch.bfloat16: GGMLType.BF16}


def gpu_time(fn, repeat: int) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / repeat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=13824)
    p.add_argument("--cols", type=int, default=5120)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    if not _native.cuda_ready():
        sys.exit(f"the CUDA library cannot run: {_native.cuda_unready_reason()}")

    dtype = DTYPES[args.dtype]
    shape = (args.rows, args.cols)
    stream = torch.cuda.current_stream().cuda_stream
    results = {"device": torch.cuda.get_device_name(), "shape": list(shape), "dtype": args.dtype, "types": {}}
    for t in LEGACY_QUANTS:
        n_blocks = tensor_nbytes(t, shape) // traits(t).type_size
        data = torch.randint(0, 256, (n_blocks, traits(t).type_size), dtype=torch.uint8, device="cuda")
        n_scales = 2 if t in (GGMLType.Q4_1, GGMLType.Q5_1) else 1
        data[:, : 2 * n_scales] = (torch.randn(n_blocks, n_scales, device="cuda") * 0.01).half().view(torch.uint8)
        data = data.reshape(-1)
        out = torch.empty(shape, dtype=dtype, device="cuda")

        def native():
            _native.cuda_dequantize(0, t, data.data_ptr(), OUT_IDS[dtype], out.data_ptr(), out.numel(), stream)

        native_s = gpu_time(native, args.repeat)
        torch_s = gpu_time(lambda: torch_dequantize(data, t, shape, dtype), args.repeat)
        native()
        same = torch.equal(out, torch_dequantize(data, t, shape, dtype))
        moved = data.numel() + out.numel() * out.element_size()
        results["types"][t.name] = {
            "native_s": native_s,
            "torch_s": torch_s,
            "native_GBps": moved / native_s / 1e9,
            "torch_GBps": moved / torch_s / 1e9,
            "speedup": torch_s / native_s,
            "same_values": same,
        }
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(f"{results['device']}: {shape[0]}x{shape[1]} -> {args.dtype}")
    print(f"{'type':6} {'native':>18} {'torch':>18} {'speedup':>8} {'same':>5}")
    for name, r in results["types"].items():
        print(f"{name:6} {r['native_s'] * 1e6:8.1f}us {r['native_GBps']:6.0f}GB/s {r['torch_s'] * 1e6:8.1f}us "
              f"{r['torch_GBps']:6.0f}GB/s {r['speedup']:7.1f}x {str(r['same_values']):>5}")


if __name__ == "__main__":
    main()
