"""wanrt runtime: Wan 2.2 models over quantized weights, streamed to fit any GPU.

The public surface is imported lazily so that `import runtime` stays cheap.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "load_dit": "runtime.dit_loading",
    "load_text_encoder": "runtime.t5",
    "load_tokenizer": "runtime.tokenizer",
    "load_vae": "runtime.vae",
    "load_pipeline": "runtime.pipeline",
    "save_video": "runtime.video_io",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
