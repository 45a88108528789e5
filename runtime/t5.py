"""The umt5-xxl text encoder as Wan 2.2 runs it (official `wan/modules/t5.py`, `T5Encoder`
built by `umt5_xxl(encoder_only=True)`, wrapped by `T5EncoderModel`).

Per block (pre-norm residual), for x [B, L, dim]:
    h = x + o(attention(q(n1(x)), k(n1(x)), v(n1(x)), bias = position bias + mask))
    y = h + fc2(fc1(n2(h)) * gelu_tanh(gate(n2(h))))
then a final RMS norm. T5 conventions: no 1/sqrt(head_dim) scaling, no biases, a
relative-position bias table in every block (umt5: not shared), softmax in float32.

The 24 blocks sit in `UMT5Encoder.blocks` and are all called through
`UMT5Encoder.run_block`, so a streaming engine can bring each block's buffers in just
before it runs. Every weight is a registered buffer of its block: linears are
`QLinear`s (quantized weights stay packed until the matmul), norms and bias tables
plain buffers. The token embedding may be packed too; a lookup decodes only the rows
it reads.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from quant import fp8_scaled
from quant.ggml_types import GGMLType, row_nbytes
from quant.gguf_reader import GGUFFile
from quant.packed import PackedTensor
from quant.pth import load_state_dict
from quant.t5_names import is_decoder_part, official_name, official_names

from .dequant import decode
from .prompt_cache import PromptCache, file_identity
from .qlinear import FP8_TYPES, QLinear
from .tokenizer import Tokenizer, load_gguf_tokenizer, load_tokenizer


@dataclass(frozen=True)
class T5Config:
    """umt5-xxl as Wan uses it; smaller shapes come from the weights (`from_shapes`)."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128  # fixed in Wan's T5RelativeEmbedding
    eps: float = 1e-6  # fixed in Wan's T5LayerNorm

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], source: str) -> "T5Config":
        """Dimensions from tensor shapes (official names), depth from block indices."""
        layers = {int(m.group(1)) for n in shapes if (m := re.match(r"blocks\.(\d+)\.", n))}
        needed = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
                  "blocks.0.pos_embedding.embedding.weight")
        absent = [n for n in needed if n not in shapes]
        if absent:
            raise ValueError(
                f"{source}: not a umt5 text encoder: no {', '.join(absent)} (under its official, "
                "Hugging Face or llama.cpp name); expected models_t5_umt5-xxl-enc-bf16.pth, a "
                "UMT5EncoderModel safetensors file or a umt5-xxl-encoder GGUF"
            )
        vocab, dim = shapes["token_embedding.weight"]
        num_buckets, num_heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        cfg = cls(
            vocab=vocab,
            dim=dim,
            dim_attn=shapes["blocks.0.attn.q.weight"][0],
            dim_ffn=shapes["blocks.0.ffn.fc1.weight"][0],
            num_heads=num_heads,
            num_layers=max(layers) + 1,
            num_buckets=num_buckets,
        )
        if cfg.dim_attn % cfg.num_heads:
            raise ValueError(f"{source}: attention width {cfg.dim_attn} does not split into {num_heads} heads")
        return cfg

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Official name -> torch shape of every tensor of this encoder."""
        per_block = {
            "norm1.weight": (self.dim,),
            "attn.q.weight": (self.dim_attn, self.dim),
            "attn.k.weight": (self.dim_attn, self.dim),
            "attn.v.weight": (self.dim_attn, self.dim),
            "attn.o.weight": (self.dim, self.dim_attn),
            "pos_embedding.embedding.weight": (self.num_buckets, self.num_heads),
            "norm2.weight": (self.dim,),
            "ffn.gate.0.weight": (self.dim_ffn, self.dim),
            "ffn.fc1.weight": (self.dim_ffn, self.dim),
            "ffn.fc2.weight": (self.dim, self.dim_ffn),
        }
        out = {"token_embedding.weight": (self.vocab, self.dim), "norm.weight": (self.dim,)}
        for i in range(self.num_layers):
            out.update({f"blocks.{i}.{k}": v for k, v in per_block.items()})
        return out


# -- building blocks ------------------------------------------------------------------


def position_buckets(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of each relative position rel = key_pos - query_pos.

    Half the buckets per direction (+half when rel > 0); |rel| below a quarter of
    the buckets maps to itself, larger distances log-spaced up to max_distance, then
    clamped to the last bucket. Same float32 arithmetic as Wan, so boundaries agree.
    """
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    # clamp_min only keeps log() finite where the exact branch is taken anyway
    log_ratio = torch.log(dist.clamp_min(1).float() / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (half - exact)).long()
    large = large.clamp_max(half - 1)
    return buckets + torch.where(dist < exact, dist, large)


def fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """Wan's overflow guard: only in fp16, only when an inf appeared."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # Spelled out as in Wan (op by op, in the compute dtype) rather than F.gelu, which
    # rounds once from float32 internally and so differs in bf16.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)  # float32
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.type_as(self.weight)
        return self.weight * y


class Embedding(nn.Module):
    """A lookup table whose `weight` buffer is dense [num, dim] or packed ggml bytes."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.num, self.dim = num, dim
        self.ggml_type: GGMLType | None = None
        self.register_buffer("weight", torch.empty(num, dim))

    def set_weight(self, weight: torch.Tensor | PackedTensor) -> None:
        if tuple(weight.shape) != (self.num, self.dim):
            raise ValueError(f"table of shape {list(weight.shape)} given to an embedding of {[self.num, self.dim]}")
        if isinstance(weight, PackedTensor):
            self.ggml_type, self.weight = weight.ggml_type, weight.data
        else:
            self.ggml_type, self.weight = None, weight

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` in `dtype`, looked up where the table is, returned where `ids` are."""
        where = ids.device
        ids = ids.to(self.weight.device)
        if self.ggml_type is None:
            rows = F.embedding(ids, self.weight)
            return rows.to(device=where, dtype=dtype)
        used, inverse = torch.unique(ids, return_inverse=True)
        packed = self.weight.view(self.num, row_nbytes(self.ggml_type, self.dim))[used]
        dense = decode(packed.reshape(-1), self.ggml_type, (used.numel(), self.dim), dtype)
        return dense.to(where)[inverse.to(where)]


class RelativePositionBias(nn.Module):
    """One learned bias per head for each relative-position bucket (every umt5 block has its own)."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """buckets [Lq, Lk] -> bias [1, heads, Lq, Lk]."""
        return self.embedding(buckets, dtype).permute(2, 0, 1).unsqueeze(0)


class SelfAttention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = QLinear(cfg.dim, cfg.dim_attn, bias=False)
        self.k = QLinear(cfg.dim, cfg.dim_attn, bias=False)
        self.v = QLinear(cfg.dim, cfg.dim_attn, bias=False)
        self.o = QLinear(cfg.dim_attn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor, masked_keys: torch.Tensor | None) -> torch.Tensor:
        b, l, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, dim_attn] -> [B, H, L, d]
            return t.view(b, l, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q @ k.transpose(-1, -2) + pos_bias  # [B, H, L, L]; T5: no 1/sqrt(d)
        if masked_keys is not None:
            # The dtype's minimum: after the float32 softmax a masked key weighs exactly 0.
            scores = scores.masked_fill(masked_keys, torch.finfo(scores.dtype).min)
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        out = (weights @ v).transpose(1, 2).reshape(b, l, -1)  # [B, L, dim_attn]
        return self.o(out)


class FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gate = nn.ModuleList([QLinear(cfg.dim, cfg.dim_ffn, bias=False)])  # gate.0: the GELU branch
        self.fc1 = QLinear(cfg.dim, cfg.dim_ffn, bias=False)
        self.fc2 = QLinear(cfg.dim_ffn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * gelu_tanh(self.gate[0](x)))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = FeedForward(cfg)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, masked_keys: torch.Tensor | None) -> torch.Tensor:
        pos_bias = self.pos_embedding(buckets, x.dtype)
        x = fp16_clamp(x + self.attn(self.norm1(x), pos_bias, masked_keys))
        x = fp16_clamp(x + self.ffn(self.norm2(x)))
        return x


class UMT5Encoder(nn.Module):
    """ids [B, L] (+ mask [B, L]) -> hidden states [B, L, dim] in `dtype`."""

    def __init__(self, cfg: T5Config, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.token_embedding = Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Runs on the device of `ids`; positions where mask == 0 are never attended to."""
        b, l = ids.shape
        # 1. token embedding (the table may live elsewhere, e.g. in host memory)
        x = self.token_embedding(ids, self.dtype)  # [B, L, dim]
        # 2. relative-position buckets, shared by all blocks; masked keys [B, 1, 1, L]
        pos = torch.arange(l, device=ids.device)
        buckets = position_buckets(pos[None, :] - pos[:, None], self.cfg.num_buckets, self.cfg.max_distance)
        masked_keys = None if mask is None else (mask.to(ids.device) == 0).view(b, 1, 1, l)
        # 3. the blocks
        for index in range(len(self.blocks)):
            x = self.run_block(index, x, buckets, masked_keys)
        # 4. final norm
        return self.norm(x)

    def run_block(self, index: int, x: torch.Tensor, buckets: torch.Tensor, masked_keys: torch.Tensor | None) -> torch.Tensor:
        """The single point through which every block runs: a streaming engine overrides
        it (subclass or instance attribute) to bring block `index` in and out."""
        return self.blocks[index](x, buckets, masked_keys)


# -- reading checkpoints ----------------------------------------------------------------

OFFICIAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"  # in every Wan 2.2 checkpoint folder
TOKENIZER_SUBDIR = Path("google") / "umt5-xxl"  # beside it


def _sniff(path: Path) -> str:
    """'gguf', 'safetensors' or 'pth' from the first bytes (names lie, magic does not)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip, or a legacy pickle
        return "pth"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise ValueError(
        f"{path}: not a GGUF, safetensors or torch file (starts with {head[:8]!r}); expected "
        f"{OFFICIAL_FILE}, a Hugging Face UMT5EncoderModel safetensors file or a umt5-xxl-encoder GGUF"
    )


def _weight_files(path: Path) -> list[Path]:
    """The file(s) to read for `path`: a file, a Wan checkpoint folder, or a Hugging
    Face folder (model.safetensors or a sharded index)."""
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; expected the umt5 encoder weights ({OFFICIAL_FILE}, .safetensors or .gguf)")
    if (path / OFFICIAL_FILE).is_file():
        return [path / OFFICIAL_FILE]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    raise FileNotFoundError(
        f"{path}: a folder without {OFFICIAL_FILE}, model.safetensors or model.safetensors.index.json; "
        "pass the text encoder's weight file"
    )


def _read_tensors(path: Path, stack: contextlib.ExitStack) -> dict[str, tuple[tuple[int, ...], Callable]]:
    """name (as stored) -> (torch shape, loader) for every tensor of one file."""
    kind = _sniff(path)
    if kind == "gguf":
        gguf = stack.enter_context(GGUFFile(path))
        if gguf.architecture not in ("t5encoder", "t5"):
            raise ValueError(
                f"{path}: GGUF architecture {gguf.architecture!r}, expected 't5encoder' "
                "(a umt5-xxl-encoder GGUF); this file is not a text encoder"
            )
        return {name: (info.shape, functools.partial(gguf.load, name)) for name, info in gguf.tensors.items()}
    if kind == "safetensors":
        handle = stack.enter_context(safe_open(str(path), framework="pt"))
        return {
            name: (tuple(handle.get_slice(name).get_shape()), functools.partial(handle.get_tensor, name))
            for name in handle.keys()
        }
    tensors, _notes = load_state_dict(path)
    return {name: (tuple(t.shape), (lambda t=t: t)) for name, t in tensors.items()}


def _check_decodable(name: str, packed: PackedTensor, source: Path) -> None:
    """Fail at load, not at the first prompt, for a block type no decoder handles."""
    row = row_nbytes(packed.ggml_type, packed.shape[-1])
    try:
        decode(packed.data[:row], packed.ggml_type, (1, packed.shape[-1]), torch.float32)
    except NotImplementedError:
        raise ValueError(
            f"{source}: tensor {name} is stored as {packed.ggml_type.name}, which wanrt cannot compute with "
            "yet; use a Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16 or BF16 encoder file"
        ) from None


def _load_weights(
    model: UMT5Encoder, cfg: T5Config, found: dict, scales: dict, source: Path, device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Fill every buffer of `model` (built on the meta device) from `found`."""
    checked: set[GGMLType] = set()
    for name in official_names(cfg.num_layers):
        stored_name, loader = found[name]
        value = loader()
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        # The token table stays in host memory: a lookup reads a few hundred of its
        # 256k rows, so keeping it off the GPU saves 2.1 GB of VRAM in bf16 (1.1 GB
        # in Q8_0) for the copy of a [B, L, dim] activation.
        where = torch.device("cpu") if name == "token_embedding.weight" else device
        if name in scales:
            scale = scales[name]().to(torch.float32)
            if isinstance(module, QLinear) and value.dtype in FP8_TYPES:
                module.set_weight(value.to(where), scale.to(where))  # fp8 stays fp8 until the matmul
                continue
            value = fp8_scaled.scaled_value(value, scale)
        if isinstance(value, PackedTensor):
            if not hasattr(module, "set_weight"):  # norms and bias tables are tiny: decode them
                value = value.dequantize(torch.float32)
            else:
                if value.ggml_type not in checked:
                    _check_decodable(stored_name, value, source)
                    checked.add(value.ggml_type)
                module.set_weight(value.to(where))
                continue
        value = value.to(device=where, dtype=dtype)
        if hasattr(module, "set_weight"):
            module.set_weight(value)
        else:
            setattr(module, attr, value)


# -- the text encoder ---------------------------------------------------------------------


class TextEncoder:
    """umt5 encoder + tokenizer + prompt cache, as Wan's `T5EncoderModel`.

    `encode(prompts)` -> one [len_i, dim] tensor per prompt (len_i counts `</s>`), on
    `device` in `dtype`; `forward(ids, mask)` -> the full [B, L, dim] output.
    """

    max_batch = 8  # prompts per forward pass: bounds the [B, heads, L, L] score tensors

    def __init__(self, model: UMT5Encoder, tokenizer: Tokenizer | None, *, device: torch.device,
                 cache: PromptCache | None, identity: str, source: str):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.cache = cache
        self.identity = identity
        self.source = source

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def config(self) -> T5Config:
        return self.model.cfg

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(f"ids must be [batch, length], got shape {list(ids.shape)}")
        if int(ids.max()) >= self.config.vocab or int(ids.min()) < 0:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab}), got [{int(ids.min())}, {int(ids.max())}]")
        ids = ids.to(self.device)
        mask = None if mask is None else mask.to(self.device)
        return self.model(ids, mask)

    def encode(self, prompts: str | list[str]) -> list[torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError(
                f"{self.source}: no tokenizer found beside the weights; pass tokenizer=<the google/umt5-xxl "
                "folder of the Wan checkpoint> to load_text_encoder"
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = self.tokenizer.ids(prompts)
        out: list[torch.Tensor | None] = [None] * len(rows)
        keys = [PromptCache.key(self.identity, r, self.dtype) for r in rows] if self.cache else [None] * len(rows)
        todo: dict[tuple[int, ...], list[int]] = {}  # distinct uncached id rows -> prompt indices
        for i, (row, key) in enumerate(zip(rows, keys)):
            hit = self.cache.get(key) if self.cache and tuple(row) not in todo else None
            if hit is not None and hit.shape == (len(row), self.config.dim):
                out[i] = hit.to(device=self.device, dtype=self.dtype)
            else:
                todo.setdefault(tuple(row), []).append(i)
        # Longest first, so each batch pads little; a batch runs at its longest prompt's
        # length: pad keys get weight 0 and positions are relative, so rows are the same.
        pending = sorted(todo.items(), key=lambda kv: -len(kv[0]))
        for start in range(0, len(pending), self.max_batch):
            chunk = pending[start : start + self.max_batch]
            ids, mask = self.tokenizer.pad([list(r) for r, _ in chunk], length=len(chunk[0][0]))
            hidden = self.forward(ids, mask)
            for b, (row, indices) in enumerate(chunk):
                emb = hidden[b, : len(row)].clone()
                for j, i in enumerate(indices):  # a prompt given twice gets its own copy
                    out[i] = emb if j == 0 else emb.clone()
                if self.cache:
                    self.cache.put(keys[indices[0]], emb, prompt=self.tokenizer.clean(prompts[indices[0]]),
                                   encoder=self.identity)
        return out

    def __repr__(self) -> str:
        c = self.config
        return (f"TextEncoder({self.source}: {c.num_layers} blocks, dim {c.dim}, {self.dtype}, {self.device}, "
                f"tokenizer={self.tokenizer!r}, cache={self.cache!r})")


def _default_tokenizer(weights: Path, files: list[Path]) -> Tokenizer | None:
    """The tokenizer where Wan and Hugging Face keep it relative to the weights, else
    the one a GGUF carries in its metadata, else None."""
    base = weights if weights.is_dir() else weights.parent
    for folder in (base / TOKENIZER_SUBDIR, base):
        if (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file():
            return load_tokenizer(folder)
    if len(files) == 1 and _sniff(files[0]) == "gguf":
        try:
            tok = load_gguf_tokenizer(files[0])
        except ValueError:
            return None
        warnings.warn(
            f"no google/umt5-xxl tokenizer folder beside {weights}: using the tokenizer stored in the GGUF. "
            "It gives Wan's ids for ordinary text, but may differ on characters outside the vocabulary "
            "and has no <extra_id_n> tokens; pass tokenizer=<google/umt5-xxl folder> for Wan's own.",
            stacklevel=3,
        )
        return tok
    return None


def load_text_encoder(
    weights: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    cache: bool | str | os.PathLike | PromptCache = True,
) -> TextEncoder:
    """The umt5 text encoder from the official .pth, a Hugging Face UMT5EncoderModel
    safetensors file/folder, or a llama.cpp t5encoder GGUF (quantized weights stay packed).

    tokenizer: a google/umt5-xxl folder, a Tokenizer, or None to look beside the weights.
    cache: True for the default prompt cache, False for none, a folder, or a PromptCache.
    """
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16 (Wan's), torch.float32 or torch.float16, got {dtype}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but torch sees no CUDA device; pass device='cpu'")
    path = Path(weights).expanduser()
    files = _weight_files(path)
    with contextlib.ExitStack() as stack:
        found: dict[str, tuple[str, Callable]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        scales: dict[str, Callable] = {}  # ComfyUI scaled fp8: weight = fp8 values * its scale
        unknown: list[str] = []
        for file in files:
            for stored, (shape, loader) in _read_tensors(file, stack).items():
                if stored in fp8_scaled.MARKERS or stored.endswith(
                        (*fp8_scaled.INPUT_SCALE_SUFFIXES, fp8_scaled.LAYER_DESCRIPTION_SUFFIX)):
                    continue  # a format marker or layer description; activation scales for fp8 matmuls
                if stored.endswith(fp8_scaled.WEIGHT_SCALE_SUFFIXES):
                    name = official_name(stored.rsplit(".", 1)[0] + ".weight")
                    if name is not None:
                        scales[name] = loader
                        continue
                name = official_name(stored)
                if name is None:
                    if not is_decoder_part(stored):
                        unknown.append(stored)
                    continue
                if name not in found:  # HF files may hold the tied embedding twice
                    found[name], shapes[name] = (stored, loader), shape
        cfg = T5Config.from_shapes(shapes, str(path))
        _check_complete(cfg, shapes, unknown, str(path))
        with torch.device("meta"):
            model = UMT5Encoder(cfg, dtype)
        _load_weights(model, cfg, found, scales, path, device, dtype)
    model.eval().requires_grad_(False)

    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        tok = _default_tokenizer(path, files)
    return TextEncoder(model, tok, device=device, cache=_as_cache(cache), identity=file_identity(files),
                       source=str(path))


def _as_cache(cache: bool | str | os.PathLike | PromptCache | None) -> PromptCache | None:
    if cache is True:
        return PromptCache()
    if cache is False or cache is None:
        return None
    return cache if isinstance(cache, PromptCache) else PromptCache(cache)


def cached_embeddings(
    weights: str | os.PathLike,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    dtype: torch.dtype = torch.bfloat16,
    cache: bool | str | os.PathLike | PromptCache = True,
) -> list[torch.Tensor] | None:
    """The embeddings `load_text_encoder(weights, ...).encode(prompts)` would give, read
    from the prompt cache without loading the encoder (CPU tensors); None unless every
    prompt is there. The long-prompt warning is given only on success: on None the
    encoder will run and give it."""
    cache = _as_cache(cache)
    if cache is None:
        return None
    try:
        identity = file_identity(_weight_files(Path(weights).expanduser()))
    except (OSError, ValueError):
        return None  # the loader will say what is wrong with the file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = tokenizer.ids(prompts)
    out = []
    for row in rows:
        hit = cache.get(PromptCache.key(identity, row, dtype))
        if hit is None or hit.shape[0] != len(row):
            return None
        out.append(hit)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


def _check_complete(cfg: T5Config, shapes: dict, unknown: list[str], source: str) -> None:
    expected = cfg.shapes()
    missing = [n for n in expected if n not in shapes]
    if missing:
        hint = " (a T5 without per-block position biases? Wan needs umt5)" if any("pos_embedding" in n for n in missing) else ""
        raise ValueError(f"{source}: {len(missing)} encoder tensors missing, e.g. {', '.join(missing[:4])}{hint}")
    extra = [n for n in shapes if n not in expected] + unknown
    if extra:
        raise ValueError(
            f"{source}: tensors that a {cfg.num_layers}-block umt5 encoder does not have, e.g. "
            f"{', '.join(extra[:4])}; is this the text encoder file?"
        )
    wrong = [f"{n} {list(shapes[n])} (expected {list(s)})" for n, s in expected.items() if tuple(shapes[n]) != s]
    if wrong:
        raise ValueError(f"{source}: tensors of unexpected shape: {'; '.join(wrong[:4])}")
