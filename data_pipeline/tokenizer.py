"""Tokenizers behind one small interface: HF `tokenizer.json` files, or raw UTF-8 bytes.

The loader needs only `vocab_size`, `bos_id` and `eos_id`; prepare needs `encode_batch`; the
manifest needs an identity (`kind` + sha256) so a prepared dir always names the tokenizer it used.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders

from data_pipeline.errors import DataInputError

BOS_CANDIDATES = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "[BOS]")
EOS_CANDIDATES = ("<|eos|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[EOS]")
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class TokenizerIdentity:
    """What the manifest records: enough to detect a mismatched tokenizer later."""

    kind: str  # "hf" or "byte"
    sha256: str
    vocab_size: int
    bos_id: int
    eos_id: int


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS=256 and EOS=257: needs no training and no files."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[int]:
        """The UTF-8 bytes each id stands for: 1, and 0 for BOS/EOS."""
        return [1] * 256 + [0, 0]

    @property
    def identity(self) -> TokenizerIdentity:
        return TokenizerIdentity("byte", "byte", self.vocab_size, self.bos_id, self.eos_id)


class JsonTokenizer:
    """A HF `tokenizers` tokenizer.json; BOS/EOS are found among its special tokens by name, or,
    where a manifest `recorded` this file, are the ids prepare used (whatever names it was given)."""

    def __init__(self, path: Path, bos_token: str | None = None, eos_token: str | None = None,
                 recorded: TokenizerIdentity | None = None):
        self.path = Path(path)
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise DataInputError(
                self.path, "tokenizer", f"not a loadable tokenizer.json ({exc})",
                "pass a HF tokenizers tokenizer.json or 'byte'") from None
        # A document that spells a special token ("<|eos|>" in code or a web page) is text: encoded as
        # the special id it would put a false document boundary inside the document.
        self._tok.encode_special_tokens = True
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # ids may have gaps (tokens removed by hand): the embedding needs one row past the largest id
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        self._sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        if recorded is not None and recorded.kind == "hf":
            if recorded.sha256 != self._sha256:
                raise DataInputError(self.path, "sha256", "not the tokenizer.json the data was prepared with "
                                     "(its manifest records another)", "use the one the shards were prepared with")
            self.bos_id, self.eos_id = recorded.bos_id, recorded.eos_id
        else:
            self.eos_id = self._find(vocab, eos_token, EOS_CANDIDATES, "eos_token")
            # GPT-2 style vocabularies have one <|endoftext|> that serves as both BOS and EOS.
            self.bos_id = self._find(vocab, bos_token, BOS_CANDIDATES, "bos_token", fallback=self.eos_id)

    def __setstate__(self, state: dict) -> None:  # prepare's worker processes: tokenizers does not pickle the flag
        self.__dict__.update(state)
        self._tok.encode_special_tokens = True

    def _find(self, vocab: dict[str, int], name: str | None, candidates: tuple[str, ...],
              field: str, fallback: int | None = None) -> int:
        option = "--" + field.replace("_", "-")
        if name:  # given by the user: a plain vocabulary entry would also be the id of text spelling it
            special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
            if name not in special:
                raise DataInputError(self.path, field, f"{name!r} is not a special token of this tokenizer (text "
                                     "spelling it would encode to it and cut documents there)",
                                     f"pass {option} one of {sorted(special)}" if special else
                                     "add special tokens to the tokenizer")
            return special[name]
        for cand in candidates:
            if cand in vocab:
                return vocab[cand]
        if fallback is not None:
            return fallback
        raise DataInputError(self.path, field, f"no special token among {list(candidates)}",
                             f"pass prepare's {option} with one of its special tokens, or add one to the tokenizer")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> list[int]:
        """The UTF-8 bytes each id stands for (special tokens: 0), so that a text's bytes are the
        sum over its tokens even where a character's bytes are split between tokens: decoding such
        a token alone gives U+FFFD. Byte-level BPE spells each byte as one character of its token;
        byte-fallback tokens (<0xE3>) are one byte; other tokens count their text, SentencePiece's
        word marker as the space it stands for."""
        added = self._tok.get_added_tokens_decoder()
        byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)
        out = []
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i) or ""
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                out.append(1)
            elif i in added:
                out.append(0 if added[i].special else len(added[i].content.encode("utf-8")))
            elif byte_level:
                out.append(len(token))
            else:
                out.append(len(token.replace("\u2581", " ").encode("utf-8")))
        return out

    @property
    def identity(self) -> TokenizerIdentity:
        return TokenizerIdentity("hf", self._sha256, self.vocab_size, self.bos_id, self.eos_id)


Tokenizer = ByteTokenizer | JsonTokenizer


def load_tokenizer(source: str | Path, bos_token: str | None = None, eos_token: str | None = None,
                   recorded: TokenizerIdentity | None = None) -> Tokenizer:
    """Load "byte", a tokenizer.json, or the tokenizer of a prepared dir as its manifest records it.
    `bos_token`/`eos_token` name BOS/EOS in a tokenizer.json (default: the usual names); a
    tokenizer.json checked against `recorded` (a manifest's identity) has that record's ids."""
    if str(source) == "byte":
        return ByteTokenizer()
    path = Path(source)
    if path.is_dir():
        from data_pipeline.manifest import read_manifest  # local: manifest imports this module

        manifest = read_manifest(path)
        if manifest.tokenizer.kind == "byte":
            return ByteTokenizer()
        return JsonTokenizer(path / TOKENIZER_FILE, recorded=manifest.tokenizer)
    if not path.exists():
        raise DataInputError(path, "tokenizer", "no such file or directory",
                             "pass 'byte', a tokenizer.json or a prepared data dir")
    return JsonTokenizer(path, bos_token, eos_token, recorded)
