"""TensorStream: any piece size gives the same file, for pieces read from a file and
for tensors loaded whole; failures reach the writer's thread; the threads always end;
memory stays at a few pieces."""
from __future__ import annotations

import threading

import pytest
import torch

from quant import atomic_file, convert_pipeline
from quant.convert import ConvertOptions, convert
from quant.convert_pipeline import SLOTS, TensorStream
from quant.ggml_types import GGMLType, row_nbytes
from quant.gguf_writer import GGUFWriter
from quant.type_policy import TensorPlan


def _pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("convert-")]


def _convert(src, out, **kw) -> bytes:
    convert(src, out, ConvertOptions(progress=False, **kw))
    return out.read_bytes()


@pytest.fixture
def streams(monkeypatch):
    """Every TensorStream made during a test."""
    made = []
    init = TensorStream.__init__

    def record(self, *args, **kw):
        init(self, *args, **kw)
        made.append(self)

    monkeypatch.setattr(TensorStream, "__init__", record)
    return made


@pytest.mark.golden
@pytest.mark.parametrize("source", ["wan_tiny.safetensors", "wan_tiny-BF16.gguf"])
@pytest.mark.parametrize("target", [GGMLType.Q8_0, GGMLType.Q4_1, GGMLType.BF16])
def test_piece_size_does_not_change_the_file(golden, tmp_path, monkeypatch, streams, source, target):
    """Pieces of a single row (the smallest) against the default, for tensors read piece
    by piece from a safetensors file and tensors a GGUF file hands out whole."""
    src = golden / "gguf/wan_tiny" / source
    whole = _convert(src, tmp_path / "whole.gguf", type=target)
    assert len(streams[0].plans) > 0
    monkeypatch.setattr(convert_pipeline, "PIECE_ELEMENTS", 1)
    pieces = _convert(src, tmp_path / "pieces.gguf", type=target)
    assert pieces == whole
    stream = streams[1]
    from_file = sum(r is not None for r in stream.readers)
    assert from_file == (len(stream.plans) if source.endswith(".safetensors") else 0)
    # memory: SLOTS buffers per stage, each one row at most (plus the alignment slack)
    widest = max(p.shape[-1] for p in stream.plans)
    for buf in stream.read_buffers + stream.out_buffers:
        assert buf.tensor is None or buf.tensor.numel() <= widest * 4 + atomic_file.ALIGN
    assert len(stream.read_buffers) == len(stream.out_buffers) == SLOTS
    assert _pipeline_threads() == []


@pytest.mark.golden
def test_weight_hooks_see_whole_tensors_once(golden, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_pipeline, "PIECE_ELEMENTS", 7)
    seen = []

    def double(name, x):
        seen.append((name, tuple(x.shape)))
        return x * 2

    src = golden / "gguf/wan_tiny/wan_tiny.safetensors"
    doubled = _convert(src, tmp_path / "hooked.gguf", type=GGMLType.Q8_0, weight_hooks=(double,))
    from quant.checkpoint import open_checkpoint

    with open_checkpoint(src) as ckpt:
        assert seen == [(n, ckpt.info(n).shape) for n in ckpt.names()]
    monkeypatch.setattr(convert_pipeline, "PIECE_ELEMENTS", 1 << 20)
    assert _convert(src, tmp_path / "hooked2.gguf", type=GGMLType.Q8_0, weight_hooks=(double,)) == doubled


def _toy_plans(n_tensors: int, rows: int = 5, cols: int = 64) -> list[TensorPlan]:
    return [TensorPlan(f"t{i}", (rows, cols), GGMLType.F32, None, "") for i in range(n_tensors)]


def _toy_stream(plans, *, fail_at=None, where="encode") -> TensorStream:
    calls = []

    def read_whole(plan):
        if where == "read" and plan.name == fail_at:
            raise OSError("disk on fire")
        return torch.full(plan.shape, float(plan.name[1:]) + 0.5)

    def encode(plan, x, out):
        calls.append(plan.name)
        if where == "encode" and plan.name == fail_at:
            raise KeyboardInterrupt
        y = out[: x.numel() * 4].view(torch.float32).view(x.shape)
        return y.copy_(x)

    return TensorStream(plans, read_whole=read_whole, byte_reader=lambda p: None, encode=encode,
                        source_nbytes=lambda p: 5 * 64 * 4, source_dtype=lambda p: torch.float32)


@pytest.mark.parametrize("where", ["read", "encode"])
def test_a_failure_reaches_the_writer_and_the_threads_end(tmp_path, monkeypatch, where):
    monkeypatch.setattr(convert_pipeline, "PIECE_ELEMENTS", 64)  # one row per piece
    plans = _toy_plans(6)
    error = OSError if where == "read" else KeyboardInterrupt
    w = GGUFWriter(tmp_path / "toy.gguf", arch="wan")
    with pytest.raises(error):
        with _toy_stream(plans, fail_at="t3", where=where) as stream:
            for p in plans:
                w.add_tensor(p.name, p.shape, p.ggml_type, stream.producer(p))
            w.write()
    assert list(tmp_path.iterdir()) == []
    assert _pipeline_threads() == []


def test_threads_end_when_the_writer_stops_early(monkeypatch):
    monkeypatch.setattr(convert_pipeline, "PIECE_ELEMENTS", 64)
    plans = _toy_plans(20)
    with _toy_stream(plans) as stream:
        pieces = stream.producer(plans[0])()
        first = next(pieces)
        assert torch.equal(first.reshape(-1), torch.full((64,), 0.5))
        # the reader and encoder are blocked on full buffers now; leaving must free them
    assert _pipeline_threads() == []


def test_pieces_arrive_in_order_with_their_values(monkeypatch):
    monkeypatch.setattr(convert_pipeline, "PIECE_ELEMENTS", 128)  # two rows per piece, a last piece of one
    plans = _toy_plans(4)
    with _toy_stream(plans) as stream:
        for i, p in enumerate(plans):
            got = torch.cat([piece.reshape(-1).view(torch.float32).clone() for piece in stream.producer(p)()])
            assert torch.equal(got, torch.full((5 * 64,), i + 0.5))
    assert _pipeline_threads() == []


def test_pieces_are_placed_for_writing_in_place(monkeypatch):
    """Given the file offsets, each encoded piece lies at its file position's offset
    within a disk block."""
    monkeypatch.setattr(convert_pipeline, "PIECE_ELEMENTS", 128)
    plans = _toy_plans(3)
    offsets = {p.name: 96 + 32 * 13 * i for i, p in enumerate(plans)}  # GGUF aligns tensors to 32 bytes
    row = row_nbytes(GGMLType.F32, 64)
    with _toy_stream(plans) as stream:
        stream.place_for(offsets)
        for p in plans:
            at = offsets[p.name]
            for piece in stream.producer(p)():
                assert (piece.data_ptr() - at) % atomic_file.ALIGN == 0
                at += piece.numel() * piece.element_size()
            assert at == offsets[p.name] + 5 * row


def test_float_pieces_stay_whole_elements_at_any_offset(monkeypatch):
    """An offset that would split float32 elements is not used for placement."""
    monkeypatch.setattr(convert_pipeline, "PIECE_ELEMENTS", 128)
    plans = _toy_plans(3)
    with _toy_stream(plans) as stream:
        stream.place_for({p.name: 96 + 7 * i for i, p in enumerate(plans)})
        for i, p in enumerate(plans):
            got = torch.cat([piece.reshape(-1).view(torch.float32).clone() for piece in stream.producer(p)()])
            assert torch.equal(got, torch.full((5 * 64,), i + 0.5))
