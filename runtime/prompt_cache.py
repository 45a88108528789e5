"""Text-encoder outputs kept on disk, so an unchanged prompt is never encoded twice.

Key: sha256 over
- the encoder's identity: for each weight file its resolved path, size and mtime in
  nanoseconds. Hashing the content of an 11 GB file would cost more than encoding the
  prompt, and a header hash would confuse two fine-tunes of the same layout. Any
  rewrite of the file changes its mtime; a copy or move is a (harmless) miss.
- the token ids of the prompt (cleaned, `</s>` appended, truncated): they capture the
  prompt, the tokenizer and text_len, so a different tokenizer or a longer prompt
  never reuses an entry, while a prompt whose ids are the same always can;
- the compute dtype, and a version of the numerics of this code. Not the device: an
  entry encoded on the CPU serves a GPU run too (they differ by float rounding only).

Entry: `<root>/prompts/<key>.safetensors`, one tensor `embedding` [len, dim] (CPU, the
encoder's dtype), metadata with the key, cleaned prompt and encoder identity. Written to
a temporary file in the same folder and renamed. A hit refreshes the file's mtime; when
the folder grows past `max_bytes` the least recently used entries are deleted.

The root is `$WANRT_CACHE`, else `$XDG_CACHE_HOME/wanrt`, else `~/.cache/wanrt`. A
cache that cannot be written (read-only disk, permissions) warns once and the encoder
carries on without it; an unreadable entry counts as a miss.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Bump when a change to the encoder code changes its outputs.
NUMERICS_VERSION = "umt5-1"
DEFAULT_MAX_BYTES = 1 << 30  # ~250 full 512-token bf16 entries, thousands of typical prompts


def default_cache_root() -> Path:
    env = os.environ.get("WANRT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "wanrt"


def file_identity(paths: list[str | os.PathLike]) -> str:
    """'path:size:mtime_ns' of each file, joined: changes whenever a file is rewritten."""
    parts = []
    for p in paths:
        p = Path(p).resolve()
        st = p.stat()
        parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


class PromptCache:
    """`key(...)`, `get(key)`, `put(key, embedding, prompt=...)`, `clear()`."""

    def __init__(self, root: str | os.PathLike | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        self.folder = self.root / "prompts"
        self.max_bytes = max_bytes
        self.writable = True
        self.hits = self.misses = 0

    @staticmethod
    def key(encoder_identity: str, ids: list[int], dtype: torch.dtype) -> str:
        payload = json.dumps(
            {"v": NUMERICS_VERSION, "encoder": encoder_identity, "ids": list(map(int, ids)), "dtype": str(dtype)},
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """The stored embedding (CPU) or None."""
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    raise ValueError("entry was written under another key")
                tensor = f.get_tensor("embedding")
        except Exception as e:  # a torn or foreign file: treat as a miss and drop it
            warnings.warn(f"prompt cache: ignoring unreadable entry {path} ({e})", stacklevel=2)
            self._remove(path)
            self.misses += 1
            return None
        try:
            os.utime(path)  # mark as recently used
        except OSError:
            pass
        self.hits += 1
        return tensor

    def put(self, key: str, embedding: torch.Tensor, *, prompt: str = "", encoder: str = "") -> None:
        if not self.writable:
            return
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=self.folder)
            os.close(fd)
            metadata = {"key": key, "prompt": prompt, "encoder": encoder, "version": NUMERICS_VERSION}
            save_file({"embedding": embedding.detach().to("cpu").contiguous()}, tmp, metadata=metadata)
            os.replace(tmp, self._path(key))
            tmp = None
        except OSError as e:
            self.writable = False
            warnings.warn(
                f"prompt cache: cannot write to {self.folder} ({e}); continuing without caching. "
                "Set WANRT_CACHE to a writable folder to cache prompt embeddings.",
                stacklevel=2,
            )
            return
        finally:
            if tmp is not None:
                self._remove(Path(tmp))
        self._trim()

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for path in self.folder.glob("*.safetensors"):
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((st.st_mtime, st.st_size, path))
        return out

    def _trim(self) -> None:
        """Delete least recently used entries until the folder fits max_bytes."""
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            self._remove(path)
            total -= size

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def clear(self) -> None:
        for _, _, path in self._entries():
            self._remove(path)

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"PromptCache({str(self.folder)!r}, max_bytes={self.max_bytes})"
