"""Text <-> token ids for the two tokenizer families our models use, behind one small interface.

    SentencePieceTokenizer   Mistral-7B's `tokenizer.model` (what Curie-7B kept unchanged), via `sentencepiece`.
    GGUFBPETokenizer         the GPT-2-style byte-level BPE stored inside a GGUF (SmolLM2), written out here.

Both give `encode(text, bos=True, eos=False) -> list[int]`, `decode(ids) -> str`, and `bos_id`, `eos_id`, `pad_id`
(None when the model has none), `vocab_size`.

`bos=True` puts `bos_id` first and `eos=True` puts `eos_id` last, whenever the model has them: the caller decides.
(A GGUF's `tokenizer.ggml.add_bos_token`, which llama.cpp obeys, is not consulted; SmolLM2's is false, yet scoring
a document's first token needs a token before it.)

Byte-level BPE in four steps (GPT-2, Radford et al. 2019):
  1. special tokens (GGUF token_type CONTROL or USER_DEFINED, e.g. `<|im_end|>`) are cut out of the text whole;
  2. the pre-tokenizer splits the rest into pieces (words with their leading space, digits, punctuation runs...);
     a merge never crosses a piece boundary;
  3. each piece's UTF-8 bytes are spelled as printable characters, one per byte (`_byte_alphabet`);
  4. merges are applied to adjacent symbols, best-ranked (earliest in the file) first, until none applies.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece

from model import sources


class Tokenizer(Protocol):
    """What every tokenizer here offers; the rest of minicurie relies on nothing else."""
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    vocab_size: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


# ---------------------------------------------------------------------------------------------- SentencePiece

class SentencePieceTokenizer:
    """Mistral's SentencePiece model (BPE with byte fallback), exactly as the `sentencepiece` library runs it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: SentencePiece model file not found")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a SentencePiece model ({e})") from None
        # sentencepiece reports a token the model lacks as -1.
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        self.vocab_size = self._sp.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        # Control tokens (<s>, </s>) decode to nothing, as in sentencepiece.
        return self._sp.decode(list(ids))


# ---------------------------------------------------------------------------------------- byte-level BPE (GGUF)

def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68 bytes (controls,
    space, soft hyphen...) are moved to U+0100 onwards, so every token is a string of visible characters and a
    leading space shows as 'Ġ' (U+0120)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    table.update((b, chr(256 + n)) for n, b in enumerate(shifted))
    return table


@functools.cache
def _unicode_classes() -> dict[str, str]:
    """Bodies of `re` character classes for \\p{L} (letters), \\p{N} (numbers) and \\s (whitespace).

    Python's `re` has no \\p{...}, and its \\s also takes U+001C..U+001F, which the reference's (Oniguruma's)
    \\s does not. So the three classes are listed out as code point ranges from `unicodedata`, once per process
    (~0.4 s). Whitespace is Oniguruma's: TAB..CR, NEL and the Z* (separator) categories.
    """
    members: dict[str, list[int]] = {"L": [], "N": [], "S": []}
    for cp in range(0x110000):
        category = unicodedata.category(chr(cp))
        if category[0] in "LN":
            members[category[0]].append(cp)
        elif category[0] == "Z" or 0x09 <= cp <= 0x0D or cp == 0x85:
            members["S"].append(cp)
    return {name: _ranges(cps) for name, cps in members.items()}


def _ranges(cps: list[int]) -> str:
    # Sorted code points -> "\U00000041-\U0000005A\U00000061-..." (escapes, so no character needs quoting).
    out, start = [], cps[0]
    for prev, cp in zip(cps, cps[1:] + [-1]):
        if cp != prev + 1:
            out.append(f"\\U{start:08x}-\\U{prev:08x}")
            start = cp
    return "".join(out)


def _gpt2_split() -> str:
    # GPT-2's pattern: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    # `\s+(?!\S)` leaves the last space of a run to start the next word: "a   b" -> "a", "  ", " b".
    c = _unicode_classes()
    L, N, S = c["L"], c["N"], c["S"]
    return rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"


def _each_number() -> str:
    return f"[{_unicode_classes()['N']}]"


# `tokenizer.ggml.pre` -> the splits applied in turn, each cutting every piece so far at its matches (a match and
# the text between matches both become pieces). These follow llama.cpp, which wrote the files; "smollm" is the
# Hugging Face SmolLM2 tokenizer's Digits(individual_digits) then ByteLevel. A new one is one line here.
PRE_TOKENIZERS = {
    "gpt2": (_gpt2_split,),
    "smollm": (_each_number, _gpt2_split),
}

CONTROL, USER_DEFINED = 3, 4  # GGUF token_type values of tokens matched whole in the text


class GGUFBPETokenizer:
    """Byte-level BPE from a GGUF's `tokenizer.ggml.*` metadata (`tokenizer.ggml.model == "gpt2"`)."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None,
                 bos_id: int | None, eos_id: int | None, pad_id: int | None, pre: str,
                 source: str = "GGUF metadata"):
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; "
                             f"known: {', '.join(sorted(PRE_TOKENIZERS))}")
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.vocab_size = len(tokens)
        for name, i in (("bos", bos_id), ("eos", eos_id), ("padding", pad_id)):
            if i is not None and not 0 <= i < self.vocab_size:
                raise ValueError(f"{source}: tokenizer.ggml.{name}_token_id {i} outside the {self.vocab_size} tokens")

        alphabet = _byte_alphabet()
        # str.translate table: the latin-1 character of byte b (chr(b)) -> that byte's alphabet character.
        self._spelling = str.maketrans({chr(b): c for b, c in alphabet.items()})
        unspell = {c: b for b, c in alphabet.items()}
        types = list(token_types) if token_types is not None else [1] * self.vocab_size
        if len(types) != self.vocab_size:
            raise ValueError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for "
                             f"{self.vocab_size} tokens")

        self._vocab: dict[str, int] = {}
        self._id_to_bytes: list[bytes] = []  # what each id decodes to
        self._special: dict[str, int] = {}   # tokens matched whole in the text -> id
        for i, (token, kind) in enumerate(zip(tokens, types)):
            if kind in (CONTROL, USER_DEFINED):
                if token:  # an empty one would match everywhere
                    self._special.setdefault(token, i)
                # Control tokens (BOS, EOS, <|im_start|>...) decode to nothing, as in sentencepiece; user-defined
                # ones (e.g. <think>) stand for their own text.
                self._id_to_bytes.append(b"" if kind == CONTROL else token.encode("utf-8"))
            elif all(ch in unspell for ch in token):
                self._vocab.setdefault(token, i)
                self._id_to_bytes.append(bytes(unspell[ch] for ch in token))
            else:
                # A token written as plain text rather than in the byte alphabet: respell it so BPE can reach it.
                self._vocab.setdefault(token.encode("utf-8").decode("latin-1").translate(self._spelling), i)
                self._id_to_bytes.append(token.encode("utf-8"))
        # One alternation, longest first so that a special token extending another wins; the capture group makes
        # re.split keep the tokens it cuts at.
        longest_first = sorted(self._special, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None

        self._ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            pair = merge.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{source}: tokenizer.ggml.merges[{rank}] = {merge!r} is not two tokens")
            self._ranks.setdefault((pair[0], pair[1]), rank)
        self._splits = [re.compile(f"({make()})") for make in PRE_TOKENIZERS[pre]]
        # Natural text repeats the same pieces endlessly; remembering the ids of recent ones makes BPE rare.
        self._piece_ids = functools.lru_cache(maxsize=1 << 18)(self._bpe)

    @classmethod
    def from_metadata(cls, metadata: dict, path: str | Path | None = None) -> "GGUFBPETokenizer":
        """`metadata`: a GGUF's key/value pairs (strings as str, arrays as lists); `path` only names the file in
        error messages."""
        source = str(path) if path is not None else "GGUF metadata"

        def need(key: str):
            if key not in metadata:
                raise ValueError(f"{source}: metadata key {key} is missing")
            return metadata[key]

        model = need("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}; GGUFBPETokenizer reads only 'gpt2' "
                             f"(byte-level BPE)")
        return cls(
            tokens=need("tokenizer.ggml.tokens"), merges=need("tokenizer.ggml.merges"),
            token_types=metadata.get("tokenizer.ggml.token_type"),
            bos_id=metadata.get("tokenizer.ggml.bos_token_id"), eos_id=metadata.get("tokenizer.ggml.eos_token_id"),
            pad_id=metadata.get("tokenizer.ggml.padding_token_id"), pre=metadata.get("tokenizer.ggml.pre", "gpt2"), source=source)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "GGUFBPETokenizer":
        from model.gguf import GGUFFile  # here, so that SentencePiece users never import torch through it
        return cls.from_metadata(GGUFFile(path).metadata, path=path)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        # re.split with a capture group: odd entries are the special tokens, even ones the text between them.
        parts = self._special_split.split(text) if self._special_split else [text]
        for n, part in enumerate(parts):
            if n % 2:
                ids.append(self._special[part])
            else:
                for piece in self._pre_tokenize(part):
                    ids.extend(self._piece_ids(piece))
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:8]} outside the vocabulary of {self.vocab_size}")
        # Ids may end mid-character (e.g. a sample cut short): show such bytes as U+FFFD rather than fail.
        return b"".join(self._id_to_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def _pre_tokenize(self, text: str) -> list[str]:
        pieces = [text] if text else []
        for split in self._splits:
            pieces = [p for piece in pieces for p in split.split(piece) if p]
        return pieces

    def _bpe(self, piece: str) -> tuple[int, ...]:
        # UTF-8 bytes -> one alphabet character each ("ż" = C5 BC -> "Å¼"); latin-1 maps byte b to chr(b).
        # No shortcut for a piece that is itself a token: like the reference, we always merge up from bytes.
        symbols = list(piece.encode("utf-8").decode("latin-1").translate(self._spelling))
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self._ranks.get(pair, len(self._ranks)))
            if best not in self._ranks:
                break  # no adjacent pair has a merge
            # Merge every occurrence of the best pair, left to right ("a a a" -> "aa a").
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        # A byte with no token of its own (SmolLM2 has none for rare controls like \x04, nor for the UTF-8 lead
        # bytes F1/F2 of unassigned planes) is dropped, as transformers and llama.cpp both do.
        return tuple(self._vocab[s] for s in symbols if s in self._vocab)


# --------------------------------------------------------------------------------------------------- loading

def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a SentencePiece model file, a folder holding one, a .gguf file, or a named source."""
    if sources.is_named_source(path):
        path = sources.resolve(path)
    path = Path(path)
    if path.is_dir():
        candidates = ("tokenizer.model", "tokenizer.model.v1")
        for name in candidates:
            if (path / name).is_file():
                return SentencePieceTokenizer(path / name)
        hint = ("; its tokenizer.json (Hugging Face `tokenizers`) is not read here, pass a SentencePiece "
                "tokenizer.model or load with require_tokenizer=False") if (path / "tokenizer.json").is_file() else ""
        raise FileNotFoundError(f"{path}: no tokenizer in this folder (looked for {', '.join(candidates)}){hint}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such tokenizer file or folder")
    if path.suffix == ".gguf":
        return GGUFBPETokenizer.from_gguf(path)
    return SentencePieceTokenizer(path)
