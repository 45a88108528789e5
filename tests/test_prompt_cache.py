"""The on-disk prompt cache: hits, misses, invalidation, size cap, unwritable folders."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.prompt_cache import PromptCache, default_cache_root
from runtime.t5 import cached_embeddings, load_text_encoder
from runtime.tokenizer import load_tokenizer


@pytest.fixture()
def setup(golden, tmp_path):
    """An encoder file of our own (so it can be rewritten) and the golden tokenizer."""
    t5 = golden / "t5"
    weights = tmp_path / "umt5.safetensors"
    save_file(load_file(str(t5 / "weights.safetensors")), str(weights))
    prompts = json.loads((t5 / "config.json").read_text())["prompts"]
    tok = load_tokenizer(t5 / "tokenizer")
    return weights, tok, prompts, tmp_path / "cache"


def _counting(enc):
    """Record the batch size of every forward pass the encoder makes."""
    batches = []
    run = enc.model.run_block

    def spy(index, x, *args):
        if index == 0:
            batches.append(x.shape[0])
        return run(index, x, *args)

    enc.model.run_block = spy
    return batches


def _load(weights, tok, cache, dtype=torch.float32):
    enc = load_text_encoder(weights, tok, dtype=dtype, cache=cache)
    return enc, _counting(enc)


@pytest.mark.golden
def test_hit_after_miss_and_negative_prompt_encoded_once(setup):
    weights, tok, prompts, root = setup
    negative = "static, blurred details"  # stands for the pipeline's default negative prompt
    enc, batches = _load(weights, tok, PromptCache(root))
    first = enc.encode([prompts[0], negative])
    assert batches == [2]
    again = enc.encode([prompts[1], negative])  # only the new prompt is encoded
    assert batches == [2, 1]
    # a fresh process (new encoder object, same file) reads both from disk
    enc2, batches2 = _load(weights, tok, PromptCache(root))
    cached = enc2.encode([prompts[0], negative, prompts[1]])
    assert batches2 == []
    assert torch.equal(cached[0], first[0]) and torch.equal(cached[1], first[1]) and torch.equal(cached[2], again[0])
    assert enc2.cache.hits == 3
    assert not [p for p in (root / "prompts").iterdir() if not p.name.endswith(".safetensors")]  # no temp files


@pytest.mark.golden
def test_cached_equals_fresh_and_dtype_is_part_of_the_key(setup):
    weights, tok, prompts, root = setup
    fresh = load_text_encoder(weights, tok, dtype=torch.float32, cache=False).encode(prompts)
    enc, _ = _load(weights, tok, PromptCache(root))
    enc.encode(prompts)
    enc2, batches = _load(weights, tok, PromptCache(root))
    for a, b in zip(enc2.encode(prompts), fresh):
        assert torch.equal(a, b)
    assert batches == []
    bf16, batches = _load(weights, tok, PromptCache(root), dtype=torch.bfloat16)
    out = bf16.encode(prompts)
    assert batches == [len(prompts)] and all(o.dtype == torch.bfloat16 for o in out)


@pytest.mark.golden
def test_changed_encoder_file_invalidates(setup):
    weights, tok, prompts, root = setup
    enc, _ = _load(weights, tok, PromptCache(root))
    before = enc.encode(prompts[:1])[0]
    stat = weights.stat()
    state = load_file(str(weights))
    state["norm.weight"] = state["norm.weight"] * 2  # same layout, same size, new values
    save_file(state, str(weights))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # even on coarse-mtime filesystems
    assert weights.stat().st_size == stat.st_size
    enc2, batches = _load(weights, tok, PromptCache(root))
    after = enc2.encode(prompts[:1])[0]
    assert batches == [1]
    torch.testing.assert_close(after, before * 2, rtol=1e-6, atol=1e-6)


@pytest.mark.golden
def test_tokenizer_change_is_a_miss(setup, golden):
    weights, tok, prompts, root = setup
    enc, _ = _load(weights, tok, PromptCache(root))
    enc.encode(prompts)
    short = load_tokenizer(golden / "t5" / "tokenizer", text_len=8)  # truncates: other ids
    enc2, batches = _load(weights, short, PromptCache(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = enc2.encode(prompts)
    assert batches == [len(prompts)] and all(o.shape[0] == 8 for o in out)


@pytest.mark.golden
def test_unwritable_cache_warns_once_and_continues(setup):
    weights, tok, prompts, root = setup
    blocker = root.parent / "a_file"
    blocker.write_text("not a folder")
    enc, batches = _load(weights, tok, PromptCache(blocker / "cache"))
    with pytest.warns(UserWarning, match="cannot write") as caught:
        out = enc.encode(prompts[:1])
    assert len([w for w in caught if "prompt cache" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = enc.encode(prompts[:1])  # no second warning, still encodes
    assert torch.equal(out[0], again[0]) and batches == [1, 1]


@pytest.mark.golden
def test_corrupt_entry_is_a_miss(setup):
    weights, tok, prompts, root = setup
    enc, _ = _load(weights, tok, PromptCache(root))
    ref = enc.encode(prompts[:1])[0]
    (entry,) = (root / "prompts").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:40])
    enc2, batches = _load(weights, tok, PromptCache(root))
    with pytest.warns(UserWarning, match="unreadable entry"):
        out = enc2.encode(prompts[:1])[0]
    assert batches == [1] and torch.equal(out, ref)


def test_size_cap_drops_least_recently_used(tmp_path):
    emb = torch.zeros(100, 64)
    cache = PromptCache(tmp_path, max_bytes=10**9)
    keys = [PromptCache.key("enc", [i, 1], torch.float32) for i in range(4)]
    for t, key in enumerate(keys):
        cache.put(key, emb)
        os.utime(cache._path(key), (1000 + t, 1000 + t))
    entry_size = cache.size_bytes() // 4
    assert cache.get(keys[0]) is not None  # a hit makes keys[0] the most recent
    cache.max_bytes = 3 * entry_size
    cache.put(PromptCache.key("enc", [9, 1], torch.float32), emb)
    assert cache.get(keys[1]) is None  # the oldest unused one went
    assert cache.get(keys[0]) is not None and cache.size_bytes() <= cache.max_bytes
    cache.clear()
    assert cache.size_bytes() == 0


def test_key_depends_on_every_part():
    base = PromptCache.key("enc:1:2", [5, 1], torch.bfloat16)
    assert base == PromptCache.key("enc:1:2", [5, 1], torch.bfloat16)
    assert base != PromptCache.key("enc:1:3", [5, 1], torch.bfloat16)
    assert base != PromptCache.key("enc:1:2", [6, 1], torch.bfloat16)
    assert base != PromptCache.key("enc:1:2", [5, 1], torch.float32)


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("WANRT_CACHE", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c"
    assert PromptCache().folder == tmp_path / "c" / "prompts"
    monkeypatch.delenv("WANRT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_root() == default_cache_root().home() / ".cache" / "wanrt"


@pytest.mark.golden
def test_lookup_without_loading_the_encoder(setup):
    weights, tok, prompts, root = setup
    assert cached_embeddings(weights, tok, prompts, dtype=torch.float32, cache=PromptCache(root)) is None
    enc, _ = _load(weights, tok, PromptCache(root))
    ref = enc.encode(prompts)
    got = cached_embeddings(weights, tok, prompts, dtype=torch.float32, cache=PromptCache(root))
    assert got is not None and all(torch.equal(a, b) for a, b in zip(got, ref))
    assert cached_embeddings(weights, tok, prompts + ["a new prompt"], dtype=torch.float32, cache=PromptCache(root)) is None
    assert cached_embeddings(weights, tok, prompts, dtype=torch.bfloat16, cache=PromptCache(root)) is None
    assert cached_embeddings(weights, tok, prompts, dtype=torch.float32, cache=False) is None
