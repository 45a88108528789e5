"""Attention: SDPA against softmax written out, k_lens semantics of the official varlen
call, head chunking, kernel selection."""
from __future__ import annotations

import math

import pytest
import torch

from runtime import attention as attn


def written_out(q, k, v, k_lens=None):
    """The official semantics, spelled out: sample i attends to its first k_lens[i] keys;
    every query row is computed."""
    B, Lq, N, D = q.shape
    out = torch.empty_like(q)
    for i in range(B):
        n = k.shape[1] if k_lens is None else k_lens[i]
        s = torch.einsum("qnd,knd->nqk", q[i].double(), k[i, :n].double()) / math.sqrt(D)
        out[i] = torch.einsum("nqk,knd->qnd", s.softmax(-1), v[i, :n].double()).to(q.dtype)
    return out


def qkv(B=2, Lq=37, Lk=37, N=4, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Lq, N, D, generator=g), torch.randn(B, Lk, N, D, generator=g), torch.randn(B, Lk, N, D, generator=g))


def test_unmasked_matches_softmax():
    q, k, v = qkv(Lk=23)
    assert torch.allclose(attn.attention(q, k, v), written_out(q, k, v), atol=1e-5)


def test_key_lengths_exclude_padding_and_keep_every_query_row():
    q, k, v = qkv()
    lens = [37, 20]
    out = attn.attention(q, k, v, lens)
    assert torch.allclose(out, written_out(q, k, v, lens), atol=1e-5)
    # Padding keys are ignored whatever they hold; padding query rows are computed.
    k2, v2 = k.clone(), v.clone()
    k2[1, 20:] = 1e3
    v2[1, 20:] = -1e3
    assert torch.allclose(attn.attention(q, k2, v2, lens), out, atol=1e-5)
    assert torch.isfinite(out[1, 20:]).all() and out[1, 20:].abs().sum() > 0


def test_full_lengths_take_the_batched_call(monkeypatch):
    calls = []
    monkeypatch.setitem(attn.KERNELS, "sdpa", lambda q, k, v: calls.append(q.shape[0]) or attn.sdpa(q, k, v))
    q, k, v = qkv()
    attn.attention(q, k, v, [37, 37])
    assert calls == [2]
    calls.clear()
    attn.attention(q, k, v, [37, 10])
    assert calls == [1, 1]


def test_head_chunks_give_the_same_result():
    q, k, v = qkv(N=5)
    lens = [30, 37]
    whole = attn.attention(q, k, v, lens)
    for step in (1, 2, 5, 9):
        assert torch.allclose(attn.attention(q, k, v, lens, heads_per_chunk=step), whole, atol=1e-6)


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv("WANRT_ATTENTION", raising=False)
    assert attn.resolve_kernel(None) == "sdpa"
    monkeypatch.setenv("WANRT_ATTENTION", "nope")
    with pytest.raises(ValueError, match="unknown attention kernel 'nope'"):
        attn.resolve_kernel(None)
    monkeypatch.setitem(attn.KERNELS, "mine", lambda q, k, v: written_out(q, k, v))
    assert attn.resolve_kernel("mine") == "mine"
    q, k, v = qkv()
    assert torch.allclose(attn.attention(q, k, v, [37, 12], kernel="mine"), written_out(q, k, v, [37, 12]), atol=1e-5)


def test_sage_without_the_package_is_explained(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sage(name, *args, **kwargs):
        if name == "sageattention":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sage)
    with pytest.raises(ValueError, match="pip install sageattention"):
        attn.resolve_kernel("sage")


def test_backend_name_on_cpu():
    assert attn.sdpa_backend_name(torch.device("cpu"), torch.float32, 32) in ("flash", "math")


@pytest.mark.gpu
def test_cuda_backends_agree():
    dev = torch.device("cuda")
    q, k, v = (t.to(dev, torch.bfloat16) for t in qkv(Lq=300, Lk=300, D=128))
    ref = written_out(q.float(), k.float(), v.float(), [300, 150])
    out = attn.attention(q, k, v, [300, 150])
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    assert attn.sdpa_backend_name(dev, torch.bfloat16, 128) in ("cudnn", "flash", "mem-efficient", "math")
