"""The CLIP BPE tokenizer, on HuggingFace's `tokenizers` library, giving the same ids as
transformers' CLIPTokenizer called the way SD pipelines call it
(`padding="max_length", max_length=77, truncation=True`):

    [<|startoftext|>, up to 75 text tokens, <|endoftext|>, pad, pad, ...]   (77 ids)

The pad token is the folder's tokenizer_config.json / special_tokens_map.json `pad_token`
(SD 1.x: <|endoftext|>, the default; SD 2.x's OpenCLIP tokenizer: "!").

The pipeline is transformers 5's CLIPTokenizer's (which has no ftfy step): NFC, runs of
whitespace -> one space, lowercase; the CLIP regex split (contractions, letter runs, single
digits, runs of other non-space characters); byte-level mapping; BPE with the `</w>`
end-of-word suffix. <|startoftext|> / <|endoftext|> written in a caption are matched as the
special tokens, as transformers does.

Files: vocab.json + merges.txt (what SD 1.5's tokenizer/ ships), else tokenizer.json, which
is used with the pipeline it records (its padding, truncation and post-processing are
replaced by the framing above).
"""
from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from flame.ir.errors import FlameError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TokenizerError(FlameError):
    pass


def clip_bpe(vocab: dict, merges: list) -> Tokenizer:
    """A tokenizers.Tokenizer with CLIP's pipeline around a BPE model of vocab and merges."""
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


class CLIPTokenizer:
    """encode(list of captions) -> int64 [B, max_length]; encode(one caption) -> int64 [1, max_length]."""

    def __init__(self, tokenizer: Tokenizer, pad_token: str = EOS, max_length: int = 77, source: str = ""):
        self.tokenizer = tokenizer
        tokenizer.no_padding()
        tokenizer.no_truncation()
        # in the vocabulary itself: add_special_tokens would give a missing one a new id past
        # the end of the text encoder's embedding table
        ids = {t: tokenizer.model.token_to_id(t) for t in (BOS, EOS, pad_token)}
        absent = [t for t, i in ids.items() if i is None]
        if absent:
            raise TokenizerError(f"{source or 'tokenizer'}: the vocabulary has no {', '.join(absent)}")
        # matched whole in captions, before normalisation, as transformers registers them
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                      for t in dict.fromkeys((BOS, EOS, pad_token))])
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[pad_token]
        self.max_length = max_length

    @classmethod
    def from_files(cls, vocab_file: str, merges_file: str, **kw) -> "CLIPTokenizer":
        vocab, merges = BPE.read_file(vocab_file, merges_file)
        return cls(clip_bpe(vocab, merges), source=vocab_file, **kw)

    def encode(self, texts, max_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        n = max_length or self.max_length
        out = np.full((len(texts), n), self.pad_id, np.int64)
        for row, enc in zip(out, self.tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            ids = [self.bos_id] + enc.ids[:n - 2] + [self.eos_id]
            row[:len(ids)] = ids
        return out

    __call__ = encode

    def decode(self, ids) -> str:
        """The caption back (lowercased, normalised), special and pad tokens dropped."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if i not in (self.bos_id, self.eos_id, self.pad_id)]
        return self.tokenizer.decode(ids).replace("</w>", " ").strip()


def _special(folder: str, name: str):
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        p = os.path.join(folder, f)
        if os.path.exists(p):
            with open(p, encoding="utf-8") as fh:
                v = json.load(fh).get(name)
            if v is not None:
                return v["content"] if isinstance(v, dict) else v
    return None


def load_tokenizer(path, max_length: int = 77) -> CLIPTokenizer:
    """The CLIP tokenizer in `path`: a tokenizer folder (vocab.json + merges.txt, or
    tokenizer.json) or a diffusers pipeline root (its tokenizer/ folder)."""
    path = os.fspath(path)
    folder = path
    names = ("vocab.json", "merges.txt", "tokenizer.json")
    if not any(os.path.exists(os.path.join(path, f)) for f in names) and os.path.isdir(os.path.join(path, "tokenizer")):
        folder = os.path.join(path, "tokenizer")
    if not os.path.isdir(folder):
        raise TokenizerError(f"{path}: no such folder")
    kw = {"pad_token": _special(folder, "pad_token") or EOS, "max_length": max_length}
    vocab, merges, tj = (os.path.join(folder, f) for f in names)
    if os.path.exists(vocab) and os.path.exists(merges):
        return CLIPTokenizer.from_files(vocab, merges, **kw)
    if os.path.exists(tj):
        return CLIPTokenizer(Tokenizer.from_file(tj), source=tj, **kw)
    raise TokenizerError(f"{folder}: no vocab.json + merges.txt nor tokenizer.json here "
                         "(nor a tokenizer/ subfolder of a diffusers pipeline)")
