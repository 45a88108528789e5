"""Show what a GGUF file holds, and optionally check that every value decodes finite.

    python -m quant.inspect FILE.gguf [--verify] [--json]

Prints the header, the metadata (long arrays summarised), one line per tensor
(name, type, torch shape, bytes), totals per type, bytes per transformer block
(`blocks.N.*`) and overall totals. `--verify` decodes every tensor and checks that
all values are finite. Exit codes: 0 fine, 1 non-finite or undecodable tensors,
2 the file cannot be read (one line on stderr says why).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from typing import Any

import torch

from .ggml_types import TRAITS, GGMLType
from .gguf_format import FILE_TYPE_NAMES, ValueType
from .gguf_reader import GGUFError, GGUFFile, GGUFTensorInfo

_ARRAY_HEAD = 8  # array elements shown before "..."
_STRING_MAX = 80
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.F64)
_CHUNK_ELEMENTS = 1 << 24  # decode at most this many values at once while verifying


# -- summary --------------------------------------------------------------------------


def _short(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _STRING_MAX:
        return value[: _STRING_MAX - 3] + "..."
    return value


def _metadata_entry(key: str, value: Any, types: tuple[ValueType, ValueType | None]) -> dict:
    vtype, item_type = types
    entry: dict[str, Any] = {"key": key, "type": vtype.name}
    if vtype == ValueType.ARRAY:
        entry["item_type"] = item_type.name
        entry["count"] = len(value)
        if len(value) > _ARRAY_HEAD:
            entry["head"] = [_short(v) for v in value[:_ARRAY_HEAD]]
        else:
            entry["value"] = [_short(v) for v in value]
    else:
        entry["value"] = _short(value)
    if key == "general.file_type" and isinstance(value, int):
        entry["meaning"] = FILE_TYPE_NAMES.get(value, "unknown")
    return entry


def summarize(f: GGUFFile) -> dict:
    """Everything the report shows, as plain JSON-ready data."""
    per_type: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "elements": 0, "bytes": 0})
    per_block: dict[int, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    tensors = []
    for info in f.tensors.values():
        tensors.append(
            {
                "name": info.name,
                "type": info.ggml_type.name,
                "shape": list(info.shape),
                "ne": list(info.ne),
                "offset": info.offset,
                "bytes": info.nbytes,
            }
        )
        row = per_type[info.ggml_type.name]
        row["tensors"] += 1
        row["elements"] += info.n_elements
        row["bytes"] += info.nbytes
        m = _BLOCK.match(info.name)
        if m:
            block = per_block[int(m.group(1))]
            block["tensors"] += 1
            block["bytes"] += info.nbytes
    block_bytes = sum(b["bytes"] for b in per_block.values())
    total_bytes = sum(t["bytes"] for t in tensors)
    return {
        "file": str(f.path),
        "file_size": f.file_size,
        "version": f.version,
        "alignment": f.alignment,
        "data_offset": f.data_offset,
        "data_end": f.data_end,
        "missing_bytes": f.missing_bytes,
        "architecture": f.architecture,
        "metadata": [_metadata_entry(k, v, f.metadata_types[k]) for k, v in f.metadata.items()],
        "tensors": tensors,
        "per_type": [{"type": k, **v} for k, v in sorted(per_type.items(), key=lambda kv: -kv[1]["bytes"])],
        "per_block": [{"block": k, **v} for k, v in sorted(per_block.items())],
        "totals": {
            "tensors": len(tensors),
            "elements": sum(v["elements"] for v in per_type.values()),
            "bytes": total_bytes,
            "block_bytes": block_bytes,
            "other_bytes": total_bytes - block_bytes,
        },
    }


# -- text ---------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _value_text(entry: dict) -> str:
    if entry["type"] == "ARRAY":
        items = entry.get("value", entry.get("head"))
        shown = ", ".join(json.dumps(v, ensure_ascii=False) for v in items)
        more = ", ..." if "head" in entry else ""
        return f"[{entry['item_type']} x {entry['count']:,}: {shown}{more}]"
    text = json.dumps(entry["value"], ensure_ascii=False) if entry["type"] == "STRING" else str(entry["value"])
    if "meaning" in entry:
        text += f" ({entry['meaning']})"
    return text


def format_text(s: dict) -> str:
    out = [
        f"file          {s['file']}",
        f"size          {s['file_size']:,} bytes ({_size(s['file_size'])})",
        f"GGUF          version {s['version']}, alignment {s['alignment']}, data at byte {s['data_offset']:,}",
        f"architecture  {s['architecture'] if s['architecture'] is not None else '(none)'}",
    ]
    if s["missing_bytes"]:
        out.append(
            f"TRUNCATED     tensor data needs the file to reach byte {s['data_end']:,}; "
            f"{s['missing_bytes']:,} bytes ({_size(s['missing_bytes'])}) are missing"
        )
    out.append("")
    out.append(f"metadata ({len(s['metadata'])})")
    key_w = max((len(e["key"]) for e in s["metadata"]), default=0)
    for e in s["metadata"]:
        out.append(f"  {e['key']:<{key_w}}  {e['type']:<7}  {_value_text(e)}")

    out.append("")
    out.append(f"tensors ({len(s['tensors'])})")
    name_w = max((len(t["name"]) for t in s["tensors"]), default=4)
    shape_w = max((len(str(t["shape"])) for t in s["tensors"]), default=5)
    out.append(f"  {'name':<{name_w}}  {'type':<7}  {'shape':<{shape_w}}  {'bytes':>15}")
    for t in s["tensors"]:
        out.append(f"  {t['name']:<{name_w}}  {t['type']:<7}  {str(t['shape']):<{shape_w}}  {t['bytes']:>15,}")

    out.append("")
    out.append("per type")
    out.append(f"  {'type':<7}  {'tensors':>7}  {'parameters':>16}  {'bytes':>17}")
    for row in s["per_type"]:
        out.append(
            f"  {row['type']:<7}  {row['tensors']:>7}  {row['elements']:>16,}  {row['bytes']:>17,}  ({_size(row['bytes'])})"
        )

    if s["per_block"]:
        out.append("")
        out.append(f"per transformer block ({len(s['per_block'])} blocks)")
        out.append(f"  {'block':>5}  {'tensors':>7}  {'bytes':>15}")
        for row in s["per_block"]:
            out.append(f"  {row['block']:>5}  {row['tensors']:>7}  {row['bytes']:>15,}  ({_size(row['bytes'])})")

    tot = s["totals"]
    out.append("")
    out.append(
        f"total         {tot['tensors']:,} tensors, {tot['elements']:,} parameters, "
        f"{tot['bytes']:,} bytes of tensor data ({_size(tot['bytes'])})"
    )
    if s["per_block"]:
        out.append(
            f"              blocks {tot['block_bytes']:,} bytes ({_size(tot['block_bytes'])}), "
            f"other tensors {tot['other_bytes']:,} bytes ({_size(tot['other_bytes'])})"
        )
    return "\n".join(out)


# -- verify --------------------------------------------------------------------------------


def _decoder():
    """quant.codecs when it is available, else the pure torch decoder."""
    from . import dequant_torch

    try:
        from . import codecs
    except ImportError:
        return None, dequant_torch.dequantize
    return codecs.dequantize, dequant_torch.dequantize


def _count_nonfinite(f: GGUFFile, info: GGUFTensorInfo, decoders) -> int:
    """Non-finite values of one tensor, decoded a chunk of whole rows at a time."""
    if info.ggml_type in _FLOAT_TYPES:
        values = f.load(info.name).reshape(-1)
        n = values.numel()
        return sum(int((~torch.isfinite(values[i : i + _CHUNK_ELEMENTS])).sum()) for i in range(0, n, _CHUNK_ELEMENTS))
    data = f.raw(info.name)
    if info.ggml_type not in TRAITS or TRAITS[info.ggml_type].block_size == 1:
        return 0  # integer tensors are always finite
    row_len = info.ne[0]
    n_rows = info.n_elements // row_len
    rows = data.view(n_rows, info.nbytes // n_rows)
    step = max(1, _CHUNK_ELEMENTS // row_len)
    bad = 0
    native, reference = decoders
    for i in range(0, n_rows, step):
        chunk = rows[i : i + step].reshape(-1)
        shape = (min(step, n_rows - i), row_len)
        values = None
        if native is not None:
            try:
                values = native(chunk, info.ggml_type, shape, dtype=torch.float32)
            except (NotImplementedError, ValueError, KeyError):
                values = None
        if values is None:
            values = reference(chunk, info.ggml_type, shape, torch.float32)
        bad += int((~torch.isfinite(values)).sum())
    return bad


def verify(f: GGUFFile, progress: bool = True) -> list[dict]:
    """Decode every tensor; return one entry per tensor that is not all finite or
    cannot be decoded."""
    from tqdm import tqdm

    decoders = _decoder()
    problems = []
    total = sum(t.nbytes for t in f.tensors.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="verifying", disable=not progress, file=sys.stderr) as bar:
        for info in f.tensors.values():
            try:
                bad = _count_nonfinite(f, info, decoders)
            except NotImplementedError:
                problems.append({"name": info.name, "type": info.ggml_type.name, "problem": "no decoder for this type"})
            else:
                if bad:
                    problems.append(
                        {
                            "name": info.name,
                            "type": info.ggml_type.name,
                            "problem": f"{bad:,} of {info.n_elements:,} values are not finite",
                            "nonfinite": bad,
                        }
                    )
            bar.update(info.nbytes)
    return problems


# -- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="a .gguf file")
    parser.add_argument("--verify", action="store_true", help="decode every tensor and check all values are finite")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    try:
        with GGUFFile(args.file, require_data=False) as f:
            summary = summarize(f)
            truncated = f.missing_bytes > 0
            if truncated and args.verify:
                first = min((t for t in f.tensors.values() if t.end > f.file_size), key=lambda t: t.offset)
                f.raw(first.name)  # raises the truncation error
            problems = verify(f, progress=True) if args.verify else None
    except GGUFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.file}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    if problems is not None:
        summary["verify"] = {"checked": len(summary["tensors"]), "problems": problems}
    if args.json:
        print(json.dumps(summary, indent=1, ensure_ascii=False))
    else:
        print(format_text(summary))
        if problems is not None:
            print()
            if problems:
                print(f"verify: {len(problems)} of {len(summary['tensors'])} tensors FAILED")
                for p in problems:
                    print(f"  {p['name']} ({p['type']}): {p['problem']}")
            else:
                print(f"verify: all {len(summary['tensors'])} tensors decode to finite values")
    if truncated:
        what = (
            f"the file is truncated: its tensor data runs to byte {summary['data_end']}, "
            f"{summary['missing_bytes']:,} bytes are missing"
        )
        print(f"error: {GGUFError(args.file, what, summary['file_size'])}", file=sys.stderr)
        return 2
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
