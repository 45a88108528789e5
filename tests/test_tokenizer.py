"""The umt5 tokenizer against the golden cases made with Wan's own tokenizer wrapper."""
from __future__ import annotations

import json
import shutil
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from runtime.tokenizer import load_tokenizer

pytestmark = pytest.mark.golden


@pytest.fixture(scope="module")
def cases(golden):
    folder = golden / "t5" / "tokenizer"
    data = json.loads((folder / "cases.json").read_text(encoding="utf-8"))
    return folder, data["meta"], data["cases"]


def _expected(untruncated_with_eos: list[int], text_len: int, eos: int, pad: int) -> tuple[list[int], list[int]]:
    """What Wan's call gives for these untruncated ids: cut to text_len - 1 + </s>, padded."""
    pieces = untruncated_with_eos[:-1][: text_len - 1] + [eos]
    return pieces + [pad] * (text_len - len(pieces)), [1] * len(pieces) + [0] * (text_len - len(pieces))


def _call_quietly(tok, texts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok(texts)


def test_cleaning_matches_wan(cases):
    folder, meta, items = cases
    tok = load_tokenizer(folder, text_len=meta["text_len"])
    for case in items:
        assert tok.clean(case["text"]) == case["cleaned"], case["name"]


def test_tokenizer_json_ids_and_mask(cases, golden):
    folder, meta, items = cases
    tok = load_tokenizer(folder, text_len=meta["text_len"])
    assert tok.backend.kind == "tokenizers"
    ids, mask = _call_quietly(tok, [c["text"] for c in items])
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert ids.shape == mask.shape == (len(items), meta["text_len"])
    assert ids.tolist() == [c["ids"] for c in items]
    assert mask.tolist() == [c["mask"] for c in items]
    ref = load_file(str(folder / "cases.safetensors"))
    assert torch.equal(ids, ref["ids"]) and torch.equal(mask, ref["mask"])


def test_default_text_len_is_wan_512(cases):
    folder, _, items = cases
    tok = load_tokenizer(folder)
    ids, mask = tok(items[0]["text"])  # a single string is a batch of one
    assert ids.shape == (1, 512)
    n = items[0]["n_tokens_untruncated_incl_eos"]
    assert ids[0, :n].tolist() == items[0]["ids_untruncated"] and int(mask.sum()) == n


def test_byte_fallback_variant_follows_its_flag(cases):
    folder, meta, items = cases
    variant = folder / "byte_fallback_variant" / "tokenizer.json"
    assert json.loads(variant.read_text(encoding="utf-8"))["model"]["byte_fallback"] is True
    tok = load_tokenizer(variant, text_len=meta["text_len"])
    ids, mask = _call_quietly(tok, [c["text"] for c in items])
    differs = 0
    for row, row_mask, case in zip(ids.tolist(), mask.tolist(), items):
        want_ids, want_mask = _expected(
            case["byte_fallback_variant_ids_untruncated"], meta["text_len"], meta["eos_id"], meta["pad_id"]
        )
        assert row == want_ids and row_mask == want_mask, case["name"]
        differs += case["byte_fallback_variant_ids_untruncated"] != case["ids_untruncated"]
    assert differs > 0, "the cases should exercise characters outside the vocabulary"


def test_sentencepiece_backend_when_only_spiece_model(cases, tmp_path):
    folder, meta, items = cases
    shutil.copy(folder / "spiece.model", tmp_path / "spiece.model")
    tok = load_tokenizer(tmp_path, text_len=meta["text_len"])
    assert tok.backend.kind == "sentencepiece"
    ids, mask = _call_quietly(tok, [c["text"] for c in items])
    for row, row_mask, case in zip(ids.tolist(), mask.tolist(), items):
        want_ids, want_mask = _expected(
            case["sentencepiece_ids_untruncated_plus_eos"], meta["text_len"], meta["eos_id"], meta["pad_id"]
        )
        assert row == want_ids and row_mask == want_mask, case["name"]


def test_missing_sentencepiece_names_the_install(cases, tmp_path, monkeypatch):
    folder, _, _ = cases
    shutil.copy(folder / "spiece.model", tmp_path / "spiece.model")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        load_tokenizer(tmp_path)


def test_truncation_warns_once_with_the_dropped_count(cases):
    folder, meta, items = cases
    tok = load_tokenizer(folder, text_len=meta["text_len"])
    long = [c for c in items if c["truncated"]]
    assert len(long) >= 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok([c["text"] for c in long[:2]])
    assert len(caught) == 1
    message = str(caught[0].message)
    for c in long[:2]:
        assert f"last {c['n_tokens_untruncated_incl_eos'] - meta['text_len']} dropped" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok([c["text"] for c in items if not c["truncated"]])  # no warning when all fit


def test_unpadded_ids_end_with_eos(cases):
    folder, meta, items = cases
    tok = load_tokenizer(folder, text_len=meta["text_len"])
    rows = [r for r in _ids_quietly(tok, [c["text"] for c in items])]
    for row, case in zip(rows, items):
        assert row == case["ids"][: case["n_valid"]]


def _ids_quietly(tok, texts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok.ids(texts)


def test_clear_errors_for_wrong_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="umt5-xxl"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor spiece.model"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_tokenizer_from_gguf_metadata(cases, golden):
    folder, meta, items = cases
    gguf = golden / "t5" / json.loads((golden / "t5" / "gguf_tensors.json").read_text())["file"]
    tok = load_tokenizer(gguf, text_len=meta["text_len"])
    assert tok.eos_id == meta["eos_id"] and tok.pad_id == meta["pad_id"]
    rows = _ids_quietly(tok, [c["text"] for c in items])
    checked = 0
    for row, case in zip(rows, items):
        if "<extra_id_" in case["cleaned"]:  # not in GGUF vocabularies
            continue
        # SentencePiece's pieces with byte fallback, special-token literals matched as
        # Wan's tokenizer matches them: the byte-fallback variant of tokenizer.json.
        want, _ = _expected(case["byte_fallback_variant_ids_untruncated"], meta["text_len"], meta["eos_id"], meta["pad_id"])
        assert row == want[: len(row)] and len(row) == min(len(case["byte_fallback_variant_ids_untruncated"]), meta["text_len"]), case["name"]
        checked += 1
    assert checked >= len(items) - 1
    literal = next(c for c in items if "</s>" in c["cleaned"])
    (row,) = _ids_quietly(load_tokenizer(gguf), [literal["text"]])
    assert row[:-1].count(meta["eos_id"]) == literal["cleaned"].count("</s>")  # matched, not spelled out
