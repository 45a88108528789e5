"""QLinear: every stored format decodes at the matmul to the dense result, into a shared
scratch, and oversized weights go through in row chunks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quant.dequant_torch import BLOCK_DECODERS
from quant.ggml_types import GGMLType, row_nbytes, traits
from quant.packed import PackedTensor
from runtime.qlinear import QLinear, ScratchPool, attach_scratch


# Byte offsets of the fp16 scale fields in each block format (ggml-common.h).
FP16_FIELDS = {
    GGMLType.Q8_0: (0,), GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
    GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,),
}


def random_blocks(ggml_type: GGMLType, rows: int, cols: int, seed: int = 0) -> PackedTensor:
    """Valid random blocks: random quant bytes with small finite fp16 scales."""
    g = torch.Generator().manual_seed(seed)
    t = traits(ggml_type)
    n_blocks = rows * cols // t.block_size
    data = torch.randint(0, 256, (n_blocks, t.type_size), generator=g, dtype=torch.uint8)
    for at in FP16_FIELDS[ggml_type]:
        scale = (torch.rand(n_blocks, 1, generator=g) * 0.01).to(torch.float16)
        data[:, at : at + 2] = scale.view(torch.uint8)
    return PackedTensor(data.reshape(-1), ggml_type, (rows, cols))


@pytest.mark.parametrize("ggml_type", sorted(t for t in BLOCK_DECODERS if t in FP16_FIELDS))
def test_packed_weight_equals_dense(ggml_type):
    packed = random_blocks(ggml_type, 48, 256)
    lin = QLinear(256, 48)
    lin.set_weight(packed)
    lin.bias = torch.randn(48)
    x = torch.randn(3, 5, 256)
    dense = packed.dequantize(torch.float32)
    assert torch.isfinite(dense).all()
    assert torch.allclose(lin(x), F.linear(x, dense, lin.bias), atol=1e-5)
    assert lin.weight.dtype == torch.uint8 and lin.weight.numel() == 48 * row_nbytes(ggml_type, 256)


def test_packed_weight_decoded_in_chunks(monkeypatch):
    import runtime.qlinear as qlinear

    monkeypatch.setattr(qlinear, "DECODE_CHUNK_VALUES", 3 * 64)  # three rows per decode call
    packed = random_blocks(GGMLType.Q4_0, 10, 64)
    lin = QLinear(64, 10)
    lin.set_weight(packed)
    assert torch.equal(lin.dense_weight(torch.float32), packed.dequantize(torch.float32))


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_float_weights(stored, compute):
    w = torch.randn(16, 32).to(stored)
    lin = QLinear(32, 16)
    lin.set_weight(w)
    lin.scratch = ScratchPool()
    x = torch.randn(4, 32).to(compute)
    assert torch.equal(lin(x), F.linear(x, w.to(compute), lin.bias.to(compute)))
    assert lin.dense_weight(stored) is lin.weight  # no copy when the dtype already fits


def test_fp8_with_scale():
    w = torch.randn(16, 32)
    s = w.abs().max() / 448
    w8 = (w / s).to(torch.float8_e4m3fn)
    for scale in (s.reshape(()), s.reshape(1), torch.full((16,), float(s))):
        lin = QLinear(32, 16)
        lin.set_weight(w8, scale)
        x = torch.randn(4, 32)
        assert torch.allclose(lin(x), F.linear(x, w8.float() * s, lin.bias), atol=1e-6)
    with pytest.raises(ValueError, match="needs scale"):
        QLinear(32, 16).set_weight(w8)
    with pytest.raises(ValueError, match="takes no scale"):
        QLinear(32, 16).set_weight(w, s)


def test_scratch_is_shared_and_reused():
    pool = ScratchPool()
    model = torch.nn.Sequential(QLinear(64, 64), QLinear(64, 32))
    for i, m in enumerate(model):
        m.set_weight(random_blocks(GGMLType.Q8_0, m.out_features, 64, seed=i))
    attach_scratch(model, pool)
    x = torch.randn(2, 64)
    model(x)
    size = pool.nbytes()
    assert size == 64 * 64 * 4  # one buffer, sized for the largest weight
    w0 = model[0].dense_weight(torch.float32)
    w1 = model[1].dense_weight(torch.float32)
    assert w0.data_ptr() == w1.data_ptr()  # the same slot, reused
    assert model[1].dense_weight(torch.float32, slot=1).data_ptr() != w1.data_ptr()
    model(x)
    assert pool.nbytes() == size + 32 * 64 * 4  # slot 1 added above, nothing new since


def test_row_chunks_when_larger_than_the_scratch_limit():
    packed = random_blocks(GGMLType.Q4_0, 100, 64)
    lin = QLinear(64, 100)
    lin.set_weight(packed)
    lin.bias = torch.randn(100)
    lin.scratch = ScratchPool(limit_bytes=64 * 4 * 30)  # 30 float32 rows at a time
    x = torch.randn(7, 64)
    assert torch.allclose(lin(x), F.linear(x, packed.dequantize(), lin.bias), atol=1e-6)
    assert lin.scratch.nbytes() <= 64 * 4 * 30


def test_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        QLinear(64, 32).set_weight(torch.zeros(64, 64))
