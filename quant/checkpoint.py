"""Open any Wan checkpoint and see it under the official Wan names.

`open_checkpoint(source)` reads:

* a GGUF file (ours or city96's),
* a `.safetensors` file (official names, ComfyUI's `model.diffusion_model.` prefix, or
  diffusers names),
* an official sharded folder (`*.safetensors.index.json` + shards + `config.json`), or
  the shards given as a list of paths,
* a diffusers `WanTransformer3DModel` folder or file,
* a pickled `.pth/.pt/.ckpt/.bin`, only through `torch.load(weights_only=True)`.

Tensors are listed from headers and read one at a time on `load(name)`, so a 57 GB
checkpoint costs one tensor of memory. Names are translated at this edge
(`wan_names`); what was dropped or assumed is kept in `notes`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from . import wan_names
from .ggml_types import GGMLType
from .gguf_reader import GGUFError, GGUFFile
from .packed import PackedTensor
from .pth import PTH_SUFFIXES, load_state_dict
from .safetensors_io import SafetensorsError, SafetensorsFile

_GGML_OF_DTYPE = {torch.float32: GGMLType.F32, torch.float16: GGMLType.F16, torch.bfloat16: GGMLType.BF16}
_PLAIN_OF_GGML = {v: k for k, v in _GGML_OF_DTYPE.items()}
_SHARD_NAME = re.compile(r"-\d+-of-\d+\.safetensors$")
_CONFIG_CLASSES = ("WanModel", "WanTransformer3DModel")

GGUF = "gguf"
SAFETENSORS = "safetensors"
SHARDED = "sharded-safetensors"
PTH = "pth"


class CheckpointError(ValueError):
    """A checkpoint that cannot be opened as asked; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str  # official Wan name (or the file's name for models wanrt does not rename)
    source_name: str  # name inside the file
    shape: tuple[int, ...]  # torch order
    dtype: torch.dtype | None  # dtype of load() for plain tensors; None for block formats
    ggml_type: GGMLType | None  # stored ggml type, when the stored dtype has one
    nbytes: int  # stored bytes
    file: Path


class _Store:
    """One file: raw name -> TensorInfo (with the raw name as name), and a reader."""

    path: Path
    infos: dict[str, TensorInfo]

    def read(self, raw_name: str, buffer: torch.Tensor | None = None):
        raise NotImplementedError

    def close(self) -> None:
        pass


class _SafetensorsStore(_Store):
    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = SafetensorsFile(path)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        self.metadata = self.file.metadata
        self.infos = {
            n: TensorInfo(n, n, e.shape, e.dtype, _GGML_OF_DTYPE.get(e.dtype), e.nbytes, path)
            for n, e in self.file.entries.items()
        }

    def read(self, raw_name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self.file.read(raw_name, buffer)

    def close(self) -> None:
        self.file.close()


class _GGUFStore(_Store):
    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = GGUFFile(path)
        except GGUFError as e:
            raise CheckpointError(str(e)) from None
        self.metadata = dict(self.file.metadata)
        self.infos = {
            n: TensorInfo(n, n, t.shape, _PLAIN_OF_GGML.get(t.ggml_type), t.ggml_type, t.nbytes, path)
            for n, t in self.file.tensors.items()
        }

    def read(self, raw_name: str, buffer: torch.Tensor | None = None) -> torch.Tensor | PackedTensor:
        return self.file.load(raw_name)  # a view of the file mapping already

    def close(self) -> None:
        self.file.close()


class _PthStore(_Store):
    def __init__(self, path: Path):
        self.path = path
        try:
            self.tensors, self.notes = load_state_dict(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        self.metadata: dict = {}
        self.infos = {
            n: TensorInfo(n, n, tuple(t.shape), t.dtype, _GGML_OF_DTYPE.get(t.dtype), t.numel() * t.element_size(), path)
            for n, t in self.tensors.items()
        }

    def read(self, raw_name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self.tensors[raw_name]  # memory-mapped (zip format) or already in memory

    def close(self) -> None:
        self.tensors = {}


@dataclass
class Checkpoint:
    """An opened checkpoint. `names()` are official Wan names for a Wan DiT (the file's
    own names for other models); `load(name)` reads one tensor (a torch tensor, or a
    PackedTensor for GGUF block types)."""

    path: Path  # the file or folder given
    format: str  # GGUF, SAFETENSORS, SHARDED or PTH (the container)
    naming: str  # "official", "comfyui" (prefix stripped) or "diffusers"
    kind: str  # wan_names.WAN_DIT, T5, VAE or UNKNOWN
    metadata: dict
    config: dict | None  # the folder's config.json (WanModel / WanTransformer3DModel), if any
    expert: str | None  # "high_noise" / "low_noise" when the metadata or the path says so
    notes: list[str] = field(default_factory=list)
    _infos: dict[str, TensorInfo] = field(default_factory=dict, repr=False)
    _stores: dict[str, _Store] = field(default_factory=dict, repr=False)
    _all_stores: list[_Store] = field(default_factory=list, repr=False)

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r} ({len(self._infos)} tensors)") from None

    def load(self, name: str, *, buffer: torch.Tensor | None = None) -> torch.Tensor | PackedTensor:
        """The tensor as stored. `buffer` (a 1-D uint8 CPU tensor of at least
        `info(name).nbytes`) lets a caller reuse memory: tensors read from a file are
        read into it and the result views it; formats that return views of a mapping
        ignore it."""
        info = self.info(name)
        return self._stores[name].read(info.source_name, buffer)

    def byte_reader(self, name: str):
        """For a tensor stored as plain bytes in a file (safetensors), a function
        `read(start, out, threads=None)` that copies its stored bytes [start, start +
        out.nbytes) into the CPU tensor `out`, to read a large tensor in pieces; None
        for formats that hand out whole tensors."""
        store = self._stores[self.info(name).name]
        if not isinstance(store, _SafetensorsStore):
            return None
        raw = self.info(name).source_name
        return lambda start, out, threads=None: store.file.read_range(raw, start, out, threads=threads)

    def describe(self) -> str:
        what = wan_names.KIND_DESCRIPTIONS[self.kind]
        return f"{self.format} checkpoint with {len(self._infos)} tensors in {self.naming} naming: {what}"

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def close(self) -> None:
        for store in self._all_stores:
            store.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(source: str | Path | Iterable[str | Path]) -> Checkpoint:
    """Open a checkpoint file, folder, or list of shard files. Raises CheckpointError
    (a ValueError) with a message that names the file and the problem."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        if path.is_dir():
            return _open_folder(path)
        return _open_file(path)
    paths = [Path(p) for p in source]
    if not paths:
        raise CheckpointError("no checkpoint files given")
    if len(paths) == 1:
        return open_checkpoint(paths[0])
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"{p}: no such file")
    if any(p.suffix != ".safetensors" for p in paths):
        raise CheckpointError(f"several files can only be read as safetensors shards; got {[p.name for p in paths]}")
    return _assemble(paths[0].parent, SHARDED, [_SafetensorsStore(p) for p in paths], config_dir=paths[0].parent)


# ---- files and folders ----------------------------------------------------------------

def _open_file(path: Path) -> Checkpoint:
    suffix = path.suffix.lower()
    if suffix == ".json" and path.name.endswith(".index.json"):
        return _open_index(path)
    fmt = {".gguf": GGUF, ".safetensors": SAFETENSORS, **{s: PTH for s in PTH_SUFFIXES}}.get(suffix) or _sniff(path)
    store = {GGUF: _GGUFStore, SAFETENSORS: _SafetensorsStore, PTH: _PthStore}[fmt](path)
    return _assemble(path, fmt, [store], config_dir=path.parent)


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"GGUF":
        return GGUF
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip (torch.save) or a raw pickle
        return PTH
    if len(head) >= 9 and head[8:9] == b"{":
        return SAFETENSORS
    raise CheckpointError(
        f"{path}: unknown checkpoint format (expected a .gguf, .safetensors, .pth/.pt/.ckpt/.bin file, "
        f"or a folder with a *.safetensors.index.json)"
    )


def _open_folder(folder: Path) -> Checkpoint:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _open_index(indexes[0])
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several index files ({', '.join(p.name for p in indexes)}); pass one of them")
    singles = sorted(folder.glob("*.safetensors"))
    if len(singles) == 1:
        return _assemble(folder, SAFETENSORS, [_SafetensorsStore(singles[0])], config_dir=folder)
    if singles and all(_SHARD_NAME.search(p.name) for p in singles):
        return _assemble(folder, SHARDED, [_SafetensorsStore(p) for p in singles], config_dir=folder)
    others = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in (".gguf", *PTH_SUFFIXES)]
    if not singles and len(others) == 1:
        return _open_file(others[0])
    experts = [d.name for d in (folder / "high_noise_model", folder / "low_noise_model") if d.is_dir()]
    if experts:
        raise CheckpointError(
            f"{folder}: this is a Wan 2.2 checkpoint folder with one DiT per expert; "
            f"pass one expert's folder: {', '.join(str(folder / e) for e in experts)}"
        )
    if (folder / "model_index.json").is_file():
        subs = [d.name for d in (folder / "transformer", folder / "transformer_2") if d.is_dir()]
        raise CheckpointError(
            f"{folder}: this is a diffusers pipeline folder; pass its transformer folder"
            + (f" ({', '.join(str(folder / s) for s in subs)})" if subs else "")
        )
    found = singles + others
    if found:
        raise CheckpointError(
            f"{folder}: holds {len(found)} checkpoint files ({', '.join(p.name for p in found[:6])}) and no "
            f"*.safetensors.index.json; pass the file to convert"
        )
    raise CheckpointError(
        f"{folder}: no checkpoint found (expected *.safetensors with an index json, a .safetensors, "
        f".gguf or .pth file)"
    )


def _open_index(index_path: Path) -> Checkpoint:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index (needs a 'weight_map' object: {e})") from None
    folder = index_path.parent
    shard_names = sorted(set(weight_map.values()))
    missing = [s for s in shard_names if not (folder / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path}: {len(missing)} shard file(s) named in the index are missing from {folder}: "
            f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}"
        )
    stores = {s: _SafetensorsStore(folder / s) for s in shard_names}
    try:
        for name, shard in weight_map.items():
            if name not in stores[shard].infos:
                raise CheckpointError(f"{index_path}: the index puts {name!r} in {shard}, which does not hold it")
        # Keep only what the index lists, each from the shard it names.
        for s, store in stores.items():
            store.infos = {n: i for n, i in store.infos.items() if weight_map.get(n) == s}
        checkpoint = _assemble(folder, SHARDED, list(stores.values()), config_dir=folder)
    except BaseException:
        for store in stores.values():
            store.close()
        raise
    if isinstance(index.get("metadata"), dict):
        checkpoint.metadata = {**index["metadata"], **checkpoint.metadata}
    return checkpoint


# ---- names, kind, config ----------------------------------------------------------------

def _assemble(path: Path, fmt: str, stores: list[_Store], *, config_dir: Path) -> Checkpoint:
    try:
        return _build(path, fmt, stores, config_dir)
    except BaseException:
        for store in stores:
            store.close()
        raise


def _build(path: Path, fmt: str, stores: list[_Store], config_dir: Path) -> Checkpoint:
    owner: dict[str, _Store] = {}
    for store in stores:
        for raw in store.infos:
            if raw in owner:
                raise CheckpointError(f"tensor {raw!r} is in both {owner[raw].path} and {store.path}")
            owner[raw] = store
    notes = [n for store in stores for n in getattr(store, "notes", [])]

    strip = wan_names.strip_prefix(list(owner))
    naming = "official"
    if strip.prefix is not None:
        naming = "comfyui"
        notes.append(f"removed the prefix {strip.prefix!r} from {len(strip.kept)} tensor names")
        if strip.dropped:
            shown = ", ".join(strip.dropped[:4]) + (", ..." if len(strip.dropped) > 4 else "")
            notes.append(f"dropped {len(strip.dropped)} tensors without that prefix (other models in the file: {shown})")
    kind = wan_names.detect_model_kind(strip.kept)
    official = dict(strip.kept)  # official name -> raw name
    if kind == wan_names.WAN_DIT_DIFFUSERS:
        naming = "diffusers"
        kind = wan_names.WAN_DIT
        official, unknown = {}, []
        for name, raw in strip.kept.items():
            mapped = wan_names.diffusers_to_official(name)
            if mapped is None:
                unknown.append(name)
            else:
                official[mapped] = raw
        if unknown:
            raise CheckpointError(
                f"{path}: diffusers Wan checkpoint with {len(unknown)} tensor(s) that have no official Wan name: "
                f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''} (a Wan variant wanrt does not read)"
            )
    # Safetensors tensors are listed in name order (as safetensors' own loaders and
    # city96's converter do); GGUF and pickles keep the file's order.
    names = sorted(official) if fmt in (SAFETENSORS, SHARDED) else list(official)

    infos, by_name = {}, {}
    for name in names:
        raw = official[name]
        store = owner[raw]
        i = store.infos[raw]
        infos[name] = TensorInfo(name, raw, i.shape, i.dtype, i.ggml_type, i.nbytes, i.file)
        by_name[name] = store

    metadata: dict = {}
    for store in stores:
        metadata.update(getattr(store, "metadata", {}))
    config = _read_config(config_dir, notes)
    expert = _expert(metadata, path, notes)
    return Checkpoint(path, fmt, naming, kind, metadata, config, expert, notes, infos, by_name, list(stores))


def _read_config(folder: Path, notes: list[str]) -> dict | None:
    """The folder's config.json when it describes a Wan DiT (WanModel or diffusers
    WanTransformer3DModel); a config.json of something else is not ours to read."""
    p = folder / "config.json"
    if not p.is_file():
        return None
    try:
        config = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        notes.append(f"ignored {p}: not valid JSON ({e})")
        return None
    if not isinstance(config, dict) or config.get("_class_name") not in _CONFIG_CLASSES:
        return None
    return config


EXPERT_KEY = "wan.expert"
EXPERTS = ("high_noise", "low_noise")


def _expert(metadata: dict, path: Path, notes: list[str]) -> str | None:
    value = metadata.get(EXPERT_KEY)
    if value in EXPERTS:
        return value
    found = expert_from_path(path)
    if found is not None:
        notes.append(f"expert {found!r} taken from the path {path}")
    return found


def expert_from_path(path: Path) -> str | None:
    """'high_noise' / 'low_noise' when the file or folder name says so (the official
    folders high_noise_model/, community files *HighNoise*.gguf), else None."""
    path = Path(path).resolve()
    for part in (path.name, path.parent.name):
        flat = re.sub(r"[^a-z]", "", part.lower())
        hits = [e for e in EXPERTS if e.replace("_", "") in flat]
        if len(hits) == 1:
            return hits[0]
    return None
