"""The fused block stages: each CUDA kernel against its torch twin on fresh random inputs
of real and odd sizes (`python -m pytest tests/test_fused.py -m gpu`), the twins against
float64 math, and the dispatch (twins off CUDA or when disabled).

Kernel and twin do the same operations; they may differ where a float32 sum over a row
is added up in another order. Bounds: float32 results within a few float32 ulps; bf16
results identical in at least 99.9% of the values and never off by more than one bf16
step of the largest value (a flipped rounding, carried through a product or rotation)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from quant import _native
from runtime import fused
from runtime.dit import Block, BlockInputs, ComputeSettings, Segment, TimeEmbedding
from runtime.dit_config import DiTConfig
from runtime.rope import RopeTable

BF16_STEP = 2.0**-7  # one bf16 step, relative to the value (8 significant bits, upper bound)

needs_kernels = pytest.mark.skipif(
    not _native.cuda_available(), reason=f"CUDA library absent ({_native.cuda_load_error()})"
)


@pytest.fixture
def twins_only():
    """Run a block of code on the torch twins; restores the setting after."""

    class Switch:
        def __enter__(self):
            self.saved = fused.set_enabled(False)

        def __exit__(self, *exc):
            fused.set_enabled(self.saved)

    return Switch()


def rand(*shape, dtype=torch.float32, device="cuda", gen=None, scale=1.0, offset=0.0):
    return (torch.randn(*shape, device=device, generator=gen) * scale + offset).to(dtype)


def random_rotations(rows: int, pairs: int, device, gen) -> torch.Tensor:
    """complex128 [rows, pairs] unit rotations."""
    angles = torch.rand(rows, pairs, dtype=torch.float64, device=device, generator=gen) * (2 * math.pi)
    return torch.polar(torch.ones_like(angles), angles)


def check_agree(native: torch.Tensor, twin: torch.Tensor, *, exact_bf16: bool) -> dict:
    """native vs twin within the module's bounds; returns the agreement numbers."""
    assert native.dtype == twin.dtype and native.shape == twin.shape
    assert torch.isfinite(native).all(), "unwritten (poisoned) or non-finite values"
    a, b = native.double(), twin.double()
    diff = (a - b).abs()
    top = b.abs().max().item()
    same = (native == twin).float().mean().item()
    if native.dtype == torch.bfloat16 and exact_bf16:
        assert same >= 0.999, f"only {same:.5f} of bf16 values identical"
        assert diff.max().item() <= BF16_STEP * top, (diff.max().item(), top)
    else:  # float32 from float32 work: a few ulps (8 ulps of the largest value)
        assert diff.max().item() <= 8 * 2.0**-23 * top, (diff.max().item(), top)
    return {"identical": same, "max_abs": diff.max().item()}


# ---- dispatch and twins (any machine) ------------------------------------------------------


def test_twins_run_off_cuda_and_when_disabled(twins_only):
    x = torch.randn(4, 8)
    assert not fused.takes(x)
    if torch.cuda.is_available():
        xc = x.cuda()
        with twins_only:
            assert not fused.takes(xc)
        assert not fused.takes(xc.double())  # a dtype the kernels do not take
        assert not fused.takes(xc.t())  # not dense


def test_rms_norm_rope_twin_against_float64():
    gen = torch.Generator().manual_seed(3)
    T, heads, head_dim, n = 9, 3, 10, 6
    D = heads * head_dim
    x = torch.randn(T, D, generator=gen)
    w = 1 + 0.1 * torch.randn(D, generator=gen)
    rot = random_rotations(n, head_dim // 2, "cpu", gen)
    got = fused.rms_norm_rope_(x.clone(), w, 1e-6, rot)
    v = x.double()
    y = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    pairs = torch.view_as_complex(y[:n].reshape(n, heads, head_dim // 2, 2).contiguous())
    want = torch.cat([torch.view_as_real(pairs * rot[:, None, :]).reshape(n, D), y[n:]])
    assert (got.double() - want).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="rotations for"):
        fused.rms_norm_rope_(x[:3].clone(), w, 1e-6, rot)


def test_modulated_layer_norm_twin_rounds_a_bf16_norm_first():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    scale1p, shift = 1 + 0.1 * torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    out = fused.modulated_layer_norm(x, scale1p, shift, 1e-6, torch.empty(5, 64))
    n = F.layer_norm(x.float(), (64,), eps=1e-6).to(torch.bfloat16).float()
    assert torch.equal(out, n * scale1p + shift)


# ---- kernels against twins (GPU) -------------------------------------------------------------

# (rows, dim): a real 480p slice, widths off the 16-byte vector (narrow kernels), tiny rows.
LN_SIZES = [(2048, 5120), (37, 5120), (19, 120), (9, 100), (5, 33), (3, 1)]


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("rows,dim", LN_SIZES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_row", [False, True])
def test_modulated_layer_norm_kernel_equals_twin(rows, dim, x_dtype, out_dtype, per_row, twins_only):
    gen = torch.Generator(device="cuda").manual_seed(rows * dim + per_row)
    x = rand(rows, dim, dtype=x_dtype, gen=gen, scale=3.0, offset=0.5)
    vec = (rows, dim) if per_row else (dim,)
    scale1p, shift = rand(*vec, gen=gen, scale=0.2, offset=1.0), rand(*vec, gen=gen, scale=0.5)
    out = torch.full((rows, dim), float("nan"), dtype=out_dtype, device="cuda")
    assert fused.takes(x, out, scale1p, shift)
    native = fused.modulated_layer_norm(x, scale1p, shift, 1e-6, out)
    with twins_only:
        twin = fused.modulated_layer_norm(x, scale1p, shift, 1e-6, torch.empty_like(out))
    if out_dtype == torch.bfloat16 or x_dtype == torch.float32:
        check_agree(native, twin, exact_bf16=True)
    else:  # float32 out of a bf16 norm: a flipped bf16 rounding of LN(x) inside shows as one bf16 step
        assert torch.isfinite(native).all()
        diff, top = (native - twin).abs(), twin.abs().max().item()
        assert (diff <= 8 * 2.0**-23 * top).float().mean().item() >= 0.999
        assert diff.max().item() <= BF16_STEP * top


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("rows,dim", LN_SIZES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_affine_layer_norm_kernel_equals_twin(rows, dim, out_dtype, twins_only):
    gen = torch.Generator(device="cuda").manual_seed(rows + dim)
    x = rand(rows, dim, gen=gen, scale=2.0, offset=-0.3)
    w, b = rand(dim, gen=gen, scale=0.1, offset=1.0), rand(dim, gen=gen, scale=0.1)
    out = torch.full((rows, dim), float("nan"), dtype=out_dtype, device="cuda")
    native = fused.affine_layer_norm(x, w, b, 1e-6, out)
    with twins_only:
        twin = fused.affine_layer_norm(x, w, b, 1e-6, torch.empty_like(out))
    check_agree(native, twin, exact_bf16=True)


# (rows, rotated rows, heads, head_dim): the real head layout with padding rows; small heads
# that several vectors of one thread share; heads of 6 (a 16-byte vector spans two heads);
# a width off the vector (pairs kernel); no rope.
RMS_CASES = [
    (1024, 1000, 40, 128), (50, 45, 64, 16), (77, 77, 40, 6), (33, 20, 3, 10), (40, 0, 40, 128), (11, 0, 1, 33)
]


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("rows,n_rot,heads,head_dim", RMS_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_rope_kernel_equals_twin(rows, n_rot, heads, head_dim, dtype, twins_only):
    gen = torch.Generator(device="cuda").manual_seed(rows * heads + head_dim)
    D = heads * head_dim
    x = rand(rows, D, dtype=dtype, gen=gen, scale=4.0, offset=0.2)
    w = rand(D, gen=gen, scale=0.1, offset=1.0).to(torch.float16)  # stored half weights, as in GGUF files
    rot = random_rotations(n_rot, head_dim // 2, "cuda", gen) if n_rot else None
    assert fused.takes(x)
    native = fused.rms_norm_rope_(x.clone(), w, 1e-6, rot)
    with twins_only:
        twin = fused.rms_norm_rope_(x.clone(), w, 1e-6, rot)
    check_agree(native, twin, exact_bf16=True)


@pytest.mark.gpu
@needs_kernels
def test_rms_norm_rope_kernel_with_the_model_rope_table(twins_only):
    """The real 3-axis table of a 21x30x52 grid, tokens from the middle of it."""
    table = RopeTable(128, "cuda").for_grid(21, 30, 52)[9000:11000]
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = rand(2000, 5120, dtype=torch.bfloat16, gen=gen)
    w = rand(5120, gen=gen, scale=0.1, offset=1.0)
    native = fused.rms_norm_rope_(x.clone(), w, 1e-6, table)
    with twins_only:
        twin = fused.rms_norm_rope_(x.clone(), w, 1e-6, table)
    check_agree(native, twin, exact_bf16=True)


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("rows,dim", [(1024, 5120), (7, 33), (5, 6)])
@pytest.mark.parametrize("y_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gate_kind", ["vector", "per_row", "none"])
def test_gated_add_kernel_equals_twin(rows, dim, y_dtype, gate_kind, twins_only):
    gen = torch.Generator(device="cuda").manual_seed(rows + dim)
    x = rand(rows, dim, gen=gen, scale=10.0)
    y = rand(rows, dim, dtype=y_dtype, gen=gen)
    gate = {"vector": lambda: rand(dim, gen=gen), "per_row": lambda: rand(rows, dim, gen=gen), "none": lambda: None}
    g = gate[gate_kind]()
    native = fused.gated_add_(x.clone(), y, g)
    with twins_only:
        twin = fused.gated_add_(x.clone(), y, g)
    check_agree(native, twin, exact_bf16=False)


@pytest.mark.gpu
@needs_kernels
def test_kernels_report_bad_arguments():
    x = torch.zeros(4, 8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(_native.NativeError, match="rotated rows"):
        _native.cuda_rms_norm_rope(0, 0, x.data_ptr(), 4, 8, x.data_ptr(), 1e-6, x.data_ptr(), 5, 8, stream)
    with pytest.raises(_native.NativeError, match="head size"):
        _native.cuda_rms_norm_rope(0, 0, x.data_ptr(), 4, 8, x.data_ptr(), 1e-6, x.data_ptr(), 2, 3, stream)
    wide = torch.zeros(1, 40000, device="cuda")
    with pytest.raises(_native.NativeError, match="WANRT_ERR_UNSUPPORTED"):
        _native.cuda_layer_norm_mul_add(0, 0, wide.data_ptr(), 0, wide.data_ptr(), 1, 40000, wide.data_ptr(),
                                        wide.data_ptr(), 0, 1e-6, False, stream)


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_with_kernels_equals_block_with_twins(dtype, twins_only):
    """One block (CFG batch of 2, the second sample padded) with and without the kernels."""
    cfg = DiTConfig(model_type="t2v", in_dim=16, out_dim=16, dim=512, ffn_dim=1024, freq_dim=256, text_dim=64,
                    num_heads=4, num_layers=1, patch_size=(1, 2, 2), heads_source="argument")
    gen = torch.Generator(device="cuda").manual_seed(6)
    block = Block(cfg, device="cuda")
    for name, buf in block.named_buffers():
        fresh = torch.randn(buf.shape, device="cuda", generator=gen)
        if buf.dim() == 2:  # linear weights
            fresh *= buf.shape[1] ** -0.5
        elif buf.dim() == 3:  # modulation
            fresh /= math.sqrt(cfg.dim)
        elif name.endswith("weight"):  # norms
            fresh = 1 + 0.1 * fresh
        else:  # biases
            fresh *= 0.02
        buf.copy_(fresh)
    grid = (3, 8, 10)
    S = math.prod(grid)
    rope = RopeTable(cfg.head_dim, "cuda").for_grid(*grid)
    time = TimeEmbedding(torch.zeros(1, cfg.dim, device="cuda"), 0.1 * torch.randn(1, 6, cfg.dim, device="cuda",
                         generator=gen), [Segment(0, 2 * S, 0)])
    context = torch.randn(2, cfg.text_len, cfg.dim, device="cuda", generator=gen).to(dtype)
    ctx = BlockInputs(time, context, [S, S - 50], [rope, rope[: S - 50]], ComputeSettings(dtype=dtype))
    x = torch.randn(2, S, cfg.dim, device="cuda", generator=gen)
    native = block(x.clone(), ctx)
    with twins_only:
        twin = block(x.clone(), ctx)
    rel = ((native - twin).norm() / twin.norm()).item()
    assert rel <= (1e-3 if dtype == torch.bfloat16 else 1e-5), rel
