"""The umt5 tokenizer as Wan calls it.

Wan cleans every prompt (ftfy, HTML entities, whitespace), then tokenizes it with the
`google/umt5-xxl` tokenizer: `</s>` appended, no BOS, truncated to `text_len` - 1
pieces + `</s>`, padded with 0 to `text_len` (512), mask 1 on the tokens incl. `</s>`.

Backends, in order of preference:
1. `tokenizer.json` through the `tokenizers` library (what Wan's AutoTokenizer runs).
   Characters outside the vocabulary follow the file's own `byte_fallback` flag:
   one fused `<unk>` when false, `<0xNN>` byte pieces when true.
2. `spiece.model` through `sentencepiece` (optional dependency), when that is all a
   folder holds. SentencePiece differs from (1) on literal special-token text such as
   "</s>" (split into characters rather than matched) and, when the tokenizer.json
   has byte_fallback false, on characters outside the vocabulary.
3. The `tokenizer.ggml.*` metadata of a t5encoder GGUF (llama.cpp's copy of
   spiece.model), rebuilt as a `tokenizers` Unigram model. Same ids as SentencePiece
   for ordinary text; literal `</s>`/`<pad>`/`<unk>` matched as (1) does; the
   `<extra_id_n>` tokens are not in such files.
"""
from __future__ import annotations

import html
import re
import warnings
from pathlib import Path

import torch

TEXT_LEN = 512  # umt5 context length Wan uses (`text_len` of every Wan 2.2 config)

# Unicode White_Space, the `\s` of the `regex` module Wan cleans with; Python's `re`
# `\s` also matches U+001C..U+001F, which Wan leaves alone.
_WHITESPACE_RUN = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (`whitespace_clean(basic_clean(text))`)."""
    try:
        import ftfy
    except ImportError:
        raise ImportError("prompt cleaning needs the ftfy package: pip install ftfy") from None
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()


class _TokenizersBackend:
    kind = "tokenizers"

    def __init__(self, tokenizer, source: str):
        self.tokenizer = tokenizer
        self.source = source
        eos = tokenizer.token_to_id("</s>")
        if eos is None:
            raise ValueError(f"{source}: no '</s>' token; expected the google/umt5-xxl tokenizer")
        self.eos_id = eos
        pad = tokenizer.token_to_id("<pad>")
        self.pad_id = 0 if pad is None else pad

    @classmethod
    def from_file(cls, path: Path) -> "_TokenizersBackend":
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises bare Exceptions on malformed JSON
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
        # Truncation, padding and `</s>` are applied here, the same for every backend.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return cls(tokenizer, str(path))

    def pieces(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


class _SentencePieceBackend:
    kind = "sentencepiece"

    def __init__(self, path: Path):
        try:
            import sentencepiece
        except ImportError:
            raise ImportError(
                f"{path.parent} holds spiece.model but no tokenizer.json; reading spiece.model needs "
                "the sentencepiece package: pip install sentencepiece "
                "(or add the folder's tokenizer.json from google/umt5-xxl)"
            ) from None
        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a readable SentencePiece model ({e})") from None
        self.source = str(path)
        self.eos_id = self.processor.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"{path}: the model defines no '</s>'; expected the google/umt5-xxl spiece.model")
        self.pad_id = max(self.processor.pad_id(), 0)

    def pieces(self, text: str) -> list[int]:
        return self.processor.encode(text, out_type=int)


# llama.cpp token types (gguf-py `TokenType`)
_CONTROL, _UNUSED, _BYTE = 3, 5, 6


def _backend_from_gguf(path: Path) -> _TokenizersBackend:
    """A Unigram tokenizer rebuilt from the SentencePiece model that llama.cpp's
    converter copies into `tokenizer.ggml.*` (pieces, scores, types, normalizer map)."""
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import Unigram

    from quant.gguf_reader import GGUFFile

    with GGUFFile(path, require_data=False) as f:
        md = f.metadata
    if md.get("tokenizer.ggml.model") != "t5" or "tokenizer.ggml.tokens" not in md:
        raise ValueError(
            f"{path}: holds no t5 tokenizer (tokenizer.ggml.model = {md.get('tokenizer.ggml.model')!r}); "
            "pass the google/umt5-xxl tokenizer folder instead"
        )
    tokens, types = md["tokenizer.ggml.tokens"], md.get("tokenizer.ggml.token_type") or []
    scores = md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if not (len(tokens) == len(scores) and (not types or len(types) == len(tokens))):
        raise ValueError(f"{path}: tokenizer.ggml tokens, scores and token_type differ in length")
    never = min(scores) - 100.0  # vocabulary padding ([PADn]) must never be chosen
    vocab = [(t, never if ty == _UNUSED else float(s)) for t, s, ty in zip(tokens, scores, types or [1] * len(tokens))]
    unk = int(md.get("tokenizer.ggml.unknown_token_id", 2))
    # SentencePiece adds <0xNN> pieces only when it was trained to fall back to bytes.
    tokenizer = HFTokenizer(Unigram(vocab, unk_id=unk, byte_fallback=_BYTE in types))
    steps = []
    charsmap = md.get("tokenizer.ggml.precompiled_charsmap")
    if charsmap:
        steps.append(normalizers.Precompiled(bytes(charsmap)))
    if md.get("tokenizer.ggml.remove_extra_whitespaces", True):
        steps += [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "\u2581")]
    if steps:
        tokenizer.normalizer = normalizers.Sequence(steps)
    prepend = "always" if md.get("tokenizer.ggml.add_space_prefix", True) else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend, split=True)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, ty in zip(tokens, types) if ty == _CONTROL])
    return _TokenizersBackend(tokenizer, f"{path} (tokenizer.ggml metadata)")


class Tokenizer:
    """Wan's umt5 tokenizer: `tok(prompts) -> (ids [B, text_len] int64, mask [B, text_len] int64)`."""

    def __init__(self, backend, text_len: int = TEXT_LEN):
        if text_len < 1:
            raise ValueError(f"text_len must be at least 1 (room for '</s>'), got {text_len}")
        self.backend = backend
        self.text_len = text_len
        self.eos_id = backend.eos_id
        self.pad_id = backend.pad_id

    @property
    def source(self) -> str:
        return self.backend.source

    def clean(self, text: str) -> str:
        return clean_prompt(text)

    def ids(self, prompts: str | list[str]) -> list[list[int]]:
        """Unpadded ids per prompt: cleaned, `</s>` appended, cut to `text_len`.
        Warns once per call when prompts were longer than the encoder reads."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out, dropped = [], []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is a {type(prompt).__name__}, expected str")
            pieces = self.backend.pieces(self.clean(prompt))
            keep = self.text_len - 1
            if len(pieces) > keep:
                dropped.append((i, len(pieces) + 1, len(pieces) - keep))
                pieces = pieces[:keep]
            out.append(pieces + [self.eos_id])
        if dropped:
            parts = "; ".join(f"prompt {i} has {n} tokens, the last {d} dropped" for i, n, d in dropped)
            warnings.warn(
                f"the text encoder reads at most {self.text_len} tokens (incl. '</s>'): {parts}. "
                "Shorten the prompt to keep all of it.",
                stacklevel=2,
            )
        return out

    def pad(self, ids: list[list[int]], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-prompt ids -> (ids, mask) [B, length] int64, padded with `pad_id`."""
        length = self.text_len if length is None else length
        batch = torch.full((len(ids), length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(ids), length), dtype=torch.int64)
        for b, row in enumerate(ids):
            assert len(row) <= length, "rows longer than the padded length"
            batch[b, : len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[b, : len(row)] = 1
        return batch, mask

    def __call__(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pad(self.ids(prompts))

    def __repr__(self) -> str:
        return f"Tokenizer({self.backend.kind}: {self.source}, text_len={self.text_len})"


def load_tokenizer(folder: str | Path, *, text_len: int = TEXT_LEN) -> Tokenizer:
    """The umt5 tokenizer from a `google/umt5-xxl` folder (tokenizer.json, else
    spiece.model), from one of those files given directly, or from the tokenizer
    metadata of a t5encoder GGUF."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such tokenizer folder; expected the google/umt5-xxl folder of the Wan "
            "checkpoint (it holds tokenizer.json and spiece.model)"
        )
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        elif (path / "spiece.model").is_file():
            path = path / "spiece.model"
        else:
            raise FileNotFoundError(
                f"{path}: holds neither tokenizer.json nor spiece.model; expected the google/umt5-xxl "
                "folder of the Wan checkpoint"
            )
    if path.suffix == ".json":
        return Tokenizer(_TokenizersBackend.from_file(path), text_len)
    if path.suffix == ".model":
        return Tokenizer(_SentencePieceBackend(path), text_len)
    if path.suffix == ".gguf":
        return load_gguf_tokenizer(path, text_len=text_len)
    raise ValueError(f"{path}: not a tokenizer file; expected a folder, tokenizer.json, spiece.model or a .gguf")


def load_gguf_tokenizer(path: str | Path, *, text_len: int = TEXT_LEN) -> Tokenizer:
    """The tokenizer a t5encoder GGUF carries in its `tokenizer.ggml.*` metadata."""
    return Tokenizer(_backend_from_gguf(Path(path)), text_len)
