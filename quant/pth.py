"""Reading pickled PyTorch checkpoints (.pth/.pt/.ckpt/.bin) without running their pickle.

A pickle can call any Python function while it loads; a downloaded checkpoint must
not be able to run code. So these files are read only through
`torch.load(weights_only=True)`, whose unpickler accepts tensors and plain containers
and refuses every other global. Zip-format files (torch.save since 1.6) are memory-
mapped, so tensors are read from the file on demand; legacy files are read whole.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

PTH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")

# Keys under which training code nests the weights (city96's convert.py looks for
# "model" and "module"; Lightning checkpoints use "state_dict").
_NESTING_KEYS = ("state_dict", "model", "module")


class UnsafePickleError(ValueError):
    """The file's pickle wants more than tensors and containers: it was not loaded."""


def load_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(name -> tensor in file order, notes) from a pickled checkpoint, loaded with
    weights_only=True. Raises UnsafePickleError when the pickle references anything a
    weights-only load refuses, ValueError when it holds no tensors."""
    path = Path(path)
    notes: list[str] = []
    mmap = zipfile.is_zipfile(path)
    if not mmap:
        notes.append("legacy (non-zip) torch file: read into memory whole")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(
            f"{path}: not loaded: its pickle asks for {_refused_object(e)}, which a weights-only load "
            f"refuses (it could run code); wanrt never executes pickled code. Use a safetensors copy "
            f"of this checkpoint, or re-save it from a source you trust"
        ) from None
    except Exception as e:  # a torn or foreign file fails in many ways (KeyError, EOFError, ...)
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {_first_line(e)})") from None

    for key in _NESTING_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            notes.append(f"weights taken from the checkpoint's {key!r} entry")
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        notes.append(f"{len(skipped)} non-tensor entries ignored ({shown})")
    if not tensors:
        raise ValueError(f"{path}: holds no tensors")
    return tensors, notes


def _refused_object(e: Exception) -> str:
    text = str(e)
    m = re.search(r"unsupported(?: global:)? GLOBAL ([\w.]+)", text, re.IGNORECASE)
    if m:
        return f"'{m.group(1)}'"
    m = re.search(r"Unsupported operand (\d+)", text)
    if m:
        return f"pickle operation {m.group(1)}"
    return "objects other than tensors"


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
