"""The pure torch decoder equals gguf-py for every type it supports, legacy and K-quants."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quant.dequant_torch import BLOCK_DECODERS, K_QUANT_DECODERS, PLAIN_DTYPES, dequantize
from quant.ggml_types import GGMLType, traits

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

# Byte offsets of the fp16 scale fields in each block (ggml-common.h).
FP16_FIELDS = {
    GGMLType.Q8_0: (0,),
    GGMLType.Q4_0: (0,),
    GGMLType.Q4_1: (0, 2),
    GGMLType.Q5_0: (0,),
    GGMLType.Q5_1: (0, 2),
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
}
BLOCK_TYPES = sorted({*BLOCK_DECODERS, *K_QUANT_DECODERS})


def random_blocks(t: GGMLType, n_blocks: int, seed: int, valid: bool = True) -> np.ndarray:
    """Random block bytes; `valid` puts finite fp16 scales of mixed magnitude in place."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, traits(t).type_size), dtype=np.uint8)
    if valid:
        for at in FP16_FIELDS[t]:
            scale = (rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-6, 3, n_blocks)).astype("<f2")
            blocks[:, at : at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def reference(blocks: np.ndarray, t: GGMLType, shape) -> torch.Tensor:
    with np.errstate(invalid="ignore", over="ignore"):
        return torch.from_numpy(gguf_quants.dequantize(blocks, GGMLQuantizationType(int(t))).reshape(shape))


def test_fp16_field_table_covers_every_decoder():
    assert set(FP16_FIELDS) == set(BLOCK_TYPES)


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
def test_block_types_match_gguf_py(t):
    block = traits(t).block_size
    shape = (5, 3 * block)  # odd row count, several blocks per row
    for valid in (True, False):
        blocks = random_blocks(t, 15, seed=int(t), valid=valid)
        got = dequantize(torch.from_numpy(blocks.reshape(-1)), t, shape)
        expected = reference(blocks, t, shape)
        if valid:
            assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lower_precision_rounds_once_from_float32(t, dtype):
    shape = (2, traits(t).block_size)
    blocks = random_blocks(t, 2, seed=100 + int(t))
    data = torch.from_numpy(blocks.reshape(-1))
    expected = dequantize(data, t, shape).to(dtype)
    assert torch.equal(dequantize(data, t, shape, dtype), expected)
    out = torch.empty(shape, dtype=dtype)
    assert dequantize(data, t, shape, dtype, out=out) is out
    assert torch.equal(out, expected)


@pytest.mark.parametrize("t", sorted(PLAIN_DTYPES), ids=lambda t: t.name)
def test_plain_float_types_match_gguf_py(t):
    values = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).to(PLAIN_DTYPES[t])
    data = values.reshape(-1).view(torch.uint8)
    got = dequantize(data, t, (3, 8))
    if t == GGMLType.BF16:
        expected = torch.from_numpy(gguf_quants.dequantize(data.numpy().reshape(3, 16), GGMLQuantizationType.BF16))
    else:
        expected = torch.from_numpy(gguf_quants.dequantize(data.numpy(), GGMLQuantizationType(int(t))).reshape(3, 8))
    assert torch.equal(got, expected.float())


def test_wrong_sizes_and_types_are_refused():
    with pytest.raises(ValueError, match="needs 144 bytes, got 143"):
        dequantize(torch.zeros(143, dtype=torch.uint8), GGMLType.Q4_K, (1, 256))
    with pytest.raises(ValueError, match="blocks of 256"):
        dequantize(torch.zeros(72, dtype=torch.uint8), GGMLType.Q4_K, (1, 128))
    with pytest.raises(NotImplementedError, match="IQ2_XXS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), GGMLType.IQ2_XXS, (1, 256))
