"""Text <-> token ids for the two tokenizer families our models use, behind one small interface.

    SentencePieceTokenizer   Mistral-7B's `tokenizer.model` (what Curie-7B kept unchanged), via `sentencepiece`.
    ByteLevelBPETokenizer    GPT-2-style byte-level BPE, written out here: from a GGUF's `tokenizer.ggml.*` metadata
                             (SmolLM2) or a Hugging Face `tokenizer.json` (SmolLM2, Llama 3, Qwen2 as published).

Both give `encode(text, bos=None, eos=None) -> list[int]`, `decode(ids) -> str`, and `bos_id`, `eos_id`, `pad_id`
(None when the model has none), `vocab_size`, `add_bos`, `add_eos`, `stop_ids`.

Each checkpoint says whether a text starts with BOS and ends with EOS, and we follow it as transformers and
llama.cpp do: `add_bos` / `add_eos` come from the GGUF's `tokenizer.ggml.add_bos_token` / `add_eos_token`, from a
tokenizer.json's post-processor template (transformers 5 ignores tokenizer_config.json's add_bos_token beside a
tokenizer.json), and are True / False for Mistral's SentencePiece model unless a Hugging Face folder's
tokenizer_config.json says otherwise. `encode(text)` follows them; `bos=True/False` (and `eos=`) overrides.
SmolLM2's GGUF says add_bos_token = false: its id 1, `<|im_start|>`, is a chat token, not a document start.
`stop_ids` are the ids generation stops at: generation_config.json's `eos_token_id` (an int or a list) where the
folder has one, else (eos_id,).

Byte-level BPE in four steps (GPT-2, Radford et al. 2019):
  1. special tokens (GGUF token_type CONTROL or USER_DEFINED, e.g. `<|im_end|>`) are cut out of the text whole;
  2. the pre-tokenizer splits the rest into pieces (words with their leading space, digits, punctuation runs...);
     a merge never crosses a piece boundary;
  3. each piece's UTF-8 bytes are spelled as printable characters, one per byte (`_byte_alphabet`);
  4. merges are applied to adjacent symbols, best-ranked (earliest in the file) first, until none applies.
"""
from __future__ import annotations

import functools
import json
import itertools
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
    add_bos: bool                # encode() puts bos_id first unless told otherwise (the checkpoint's convention)
    add_eos: bool
    stop_ids: tuple[int, ...]    # generation stops after any of these

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


# ---------------------------------------------------------------------------------------------- SentencePiece

class SentencePieceTokenizer:
    """Mistral's SentencePiece model (BPE with byte fallback), exactly as the `sentencepiece` library runs it."""

    def __init__(self, path: str | Path, add_bos: bool = True, add_eos: bool = False):
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
        # Mistral's reference code (and transformers' LlamaTokenizer) start every text with <s> and end none with
        # </s>; a Hugging Face folder's tokenizer_config.json may say otherwise (load_tokenizer applies it).
        self.add_bos, self.add_eos = add_bos, add_eos
        self.stop_ids = (self.eos_id,) if self.eos_id is not None else ()

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        ids = self._sp.encode(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if (self.add_eos if eos is None else eos) and self.eos_id is not None:
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
def _category_runs() -> dict[str, list[tuple[int, int]]]:
    """Every Unicode general category (e.g. "Lu", "Nd", "Zs") -> its code points as sorted (first, last) runs, plus
    "space": whitespace as Oniguruma (the reference tokenizers' regex engine) has it: TAB..CR, NEL and the Z*
    categories.

    Python's `re` has no \\p{...}, and its \\s also takes U+001C..U+001F, which Oniguruma's \\s does not, so the
    classes are spelled out from `unicodedata`, once per process (~0.5 s).
    """
    runs: dict[str, list[tuple[int, int]]] = {}
    first = 0
    for category, members in itertools.groupby(map(unicodedata.category, map(chr, range(0x110000)))):
        last = first + len(list(members)) - 1
        runs.setdefault(category, []).append((first, last))
        first = last + 1
    space = [(0x09, 0x0D), (0x85, 0x85)] + [r for category in ("Zs", "Zl", "Zp") for r in runs.get(category, [])]
    runs["space"] = sorted(space)
    return runs


@functools.cache
def _class_body(name: str) -> str:
    """The body of a `re` character class for \\p{name}: a general category ("Lu") or a major class ("L": every
    category starting with L), or "space" (whitespace), as escaped ranges "\\U00000041-\\U0000005A..."."""
    runs = sorted(r for category, spans in _category_runs().items()
                  if category == name or (len(name) == 1 and category[0] == name) for r in spans)
    if not runs:
        raise ValueError(f"\\p{{{name}}} is not a Unicode general category")
    return "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in runs)


def _unicode_classes() -> dict[str, str]:
    """Bodies of `re` character classes for \\p{L} (letters), \\p{N} (numbers) and \\s (whitespace)."""
    return {"L": _class_body("L"), "N": _class_body("N"), "S": _class_body("space")}


def _gpt2_split() -> str:
    # GPT-2's pattern: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    # `\s+(?!\S)` leaves the last space of a run to start the next word: "a   b" -> "a", "  ", " b".
    c = _unicode_classes()
    L, N, S = c["L"], c["N"], c["S"]
    return rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"


def _each_number() -> str:
    return f"[{_unicode_classes()['N']}]"


_ESCAPE = re.compile(r"\\(?:([pP])\{(\w+)\}|([pP])(\w)|([sS]))")


def _oniguruma_to_re(pattern: str) -> str:
    """A tokenizer.json split regex (Oniguruma syntax, as the `tokenizers` library runs it) -> Python `re`.

    Only what `re` spells differently is rewritten: \\p{X} / \\P{X} (Unicode categories) and \\s / \\S (whitespace,
    see _category_runs), inside and outside [...] classes. The rest (alternation, (?i:...), possessive quantifiers,
    lookahead) means the same in both; Python >= 3.11 has possessive quantifiers. Negated escapes inside a class
    ([^\\S...]) have no range form and are refused.
    """
    out, depth, i = [], 0, 0  # depth: inside a [...] class
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            m = _ESCAPE.match(pattern, i)
            if m is None:
                out.append(pattern[i:i + 2])
                i += 2
                continue
            kind, name = (m[1], m[2]) if m[1] else (m[3], m[4]) if m[3] else ("p" if m[5] == "s" else "P", "space")
            body = _class_body(name)
            if depth and kind == "P":
                raise ValueError(f"split pattern {pattern!r}: a negated class escape inside [...] is not supported")
            out.append(body if depth else f"[{body}]" if kind == "p" else f"[^{body}]")
            i = m.end()
            continue
        if ch == "[" and not depth:
            depth = 1
            out.append(ch)
            i += 1
            if pattern[i:i + 1] == "^":
                out.append("^")
                i += 1
            if pattern[i:i + 1] == "]":  # a ']' first in a class is a literal
                out.append("\\]")
                i += 1
            continue
        if ch == "]" and depth:
            depth = 0
        out.append(ch)
        i += 1
    return "".join(out)


# `tokenizer.ggml.pre` -> the splits applied in turn, each cutting every piece so far at its matches (a match and
# the text between matches both become pieces). These follow llama.cpp, which wrote the files; "smollm" is the
# Hugging Face SmolLM2 tokenizer's Digits(individual_digits) then ByteLevel. A new one is one line here.
PRE_TOKENIZERS = {
    "gpt2": (_gpt2_split,),
    "smollm": (_each_number, _gpt2_split),
}

CONTROL, USER_DEFINED = 3, 4  # GGUF token_type values of tokens matched whole in the text


class ByteLevelBPETokenizer:
    """Byte-level BPE from a GGUF's `tokenizer.ggml.*` metadata (`tokenizer.ggml.model == "gpt2"`) or a Hugging Face
    `tokenizer.json` (`tokenizer_from_json`).

    pre: a name in PRE_TOKENIZERS (GGUF's `tokenizer.ggml.pre`), or the split patterns themselves (Python `re`),
    applied in turn. ignore_merges: a piece that is a token as a whole is that token, without merging up from bytes
    (Llama 3's tokenizer.json). normalize: a `unicodedata.normalize` form applied to the text between special tokens
    (Qwen2's NFC), or None. stop_ids: where generation stops (default: eos_id alone).
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None,
                 bos_id: int | None, eos_id: int | None, pad_id: int | None, pre: str | Sequence[str],
                 source: str = "GGUF metadata", add_bos: bool = False, add_eos: bool = False,
                 ignore_merges: bool = False, normalize: str | None = None,
                 stop_ids: Sequence[int] | None = None):
        if isinstance(pre, str) and pre not in PRE_TOKENIZERS:
            raise ValueError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; "
                             f"known: {', '.join(sorted(PRE_TOKENIZERS))}")
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.vocab_size = len(tokens)
        for name, i in (("bos", bos_id), ("eos", eos_id), ("padding", pad_id)):
            if i is not None and not 0 <= i < self.vocab_size:
                raise ValueError(f"{source}: tokenizer.ggml.{name}_token_id {i} outside the {self.vocab_size} tokens")
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.stop_ids = tuple(stop_ids) if stop_ids is not None else (eos_id,) if eos_id is not None else ()
        self._ignore_merges, self._normalize = ignore_merges, normalize

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
            # "a b" (GGUF, older tokenizer.json) or ["a", "b"] (newer tokenizer.json).
            pair = merge.split(" ") if isinstance(merge, str) else list(merge)
            if len(pair) != 2:
                raise ValueError(f"{source}: merges[{rank}] = {merge!r} is not two tokens")
            self._ranks.setdefault((pair[0], pair[1]), rank)
        patterns = [make() for make in PRE_TOKENIZERS[pre]] if isinstance(pre, str) else list(pre)
        self._splits = [re.compile(f"({pattern})") for pattern in patterns]
        # Natural text repeats the same pieces endlessly; remembering the ids of recent ones makes BPE rare.
        self._piece_ids = functools.lru_cache(maxsize=1 << 18)(self._bpe)

    @classmethod
    def from_metadata(cls, metadata: dict, path: str | Path | None = None) -> "ByteLevelBPETokenizer":
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
            pad_id=metadata.get("tokenizer.ggml.padding_token_id"), pre=metadata.get("tokenizer.ggml.pre", "gpt2"),
            source=source,
            # What llama.cpp obeys; absent, a byte-level BPE vocabulary adds neither (transformers' GGUF loader too).
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)))

    @classmethod
    def from_gguf(cls, path: str | Path) -> "ByteLevelBPETokenizer":
        from model.gguf import GGUFFile  # here, so that SentencePiece users never import torch through it
        return cls.from_metadata(GGUFFile(path).metadata, path=path)

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        bos = self.add_bos if bos is None else bos
        eos = self.add_eos if eos is None else eos
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        # re.split with a capture group: odd entries are the special tokens, even ones the text between them.
        parts = self._special_split.split(text) if self._special_split else [text]
        for n, part in enumerate(parts):
            if n % 2:
                ids.append(self._special[part])
            else:
                if self._normalize:
                    part = unicodedata.normalize(self._normalize, part)
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
        # No shortcut for a piece that is itself a token (unless ignore_merges): like the reference, we merge up
        # from bytes.
        spelled = piece.encode("utf-8").decode("latin-1").translate(self._spelling)
        if self._ignore_merges and spelled in self._vocab:
            return (self._vocab[spelled],)
        symbols = list(spelled)
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


GGUFBPETokenizer = ByteLevelBPETokenizer  # the name it had when a GGUF was its only source


# ------------------------------------------------------------------------------ Hugging Face tokenizer.json

def _read_json(path: Path) -> dict | None:
    """A JSON object from `path`, None when there is no such file; an error naming the file when it is broken."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _json_splits(spec: dict | None, source: str) -> tuple[list[str], bool]:
    """tokenizer.json's `pre_tokenizer` -> (split patterns for ByteLevelBPETokenizer, whether a ByteLevel step is
    there, i.e. whether the model works on bytes at all)."""
    if spec is None:
        return [], False
    kind = spec.get("type")
    if kind == "Sequence":
        parts = [_json_splits(step, source) for step in spec.get("pretokenizers", [])]
        return [p for patterns, _ in parts for p in patterns], any(byte_level for _, byte_level in parts)
    if kind == "ByteLevel":
        if spec.get("add_prefix_space"):
            raise ValueError(f"{source}: ByteLevel pre-tokenizer with add_prefix_space is not supported")
        return ([_gpt2_split()] if spec.get("use_regex", True) else []), True
    if kind == "Digits":
        return [_each_number() if spec.get("individual_digits") else _each_number() + "+"], False
    if kind == "Split":
        pattern = spec.get("pattern") or {}
        if spec.get("behavior") != "Isolated" or spec.get("invert"):
            raise ValueError(f"{source}: Split pre-tokenizer with behavior {spec.get('behavior')!r}"
                             f"{' inverted' if spec.get('invert') else ''} is not supported (only 'Isolated')")
        if "Regex" in pattern:
            return [_oniguruma_to_re(pattern["Regex"])], False
        if "String" in pattern:
            return [re.escape(pattern["String"])], False
        raise ValueError(f"{source}: Split pre-tokenizer without a Regex or String pattern: {pattern!r}")
    raise ValueError(f"{source}: pre-tokenizer {kind!r} is not supported (ByteLevel, Digits, Split, Sequence are)")


def _template_specials(spec: dict | None, source: str) -> tuple[list[int], list[int]]:
    """tokenizer.json's `post_processor` -> (ids put before a single text, ids put after it)."""
    if spec is None or spec.get("type") == "ByteLevel":  # ByteLevel only trims offsets
        return [], []
    if spec.get("type") == "Sequence":
        before, after = [], []
        for step in spec.get("processors", []):
            b, a = _template_specials(step, source)
            before, after = before + b, after + a
        return before, after
    if spec.get("type") != "TemplateProcessing":
        raise ValueError(f"{source}: post-processor {spec.get('type')!r} is not supported (TemplateProcessing is)")
    specials = spec.get("special_tokens", {})
    before, after, seen_text = [], [], False
    for item in spec.get("single", []):
        if "Sequence" in item:
            seen_text = True
        elif "SpecialToken" in item:
            name = item["SpecialToken"]["id"]
            if name not in specials:
                raise ValueError(f"{source}: post-processor template names {name!r}, absent from its special_tokens")
            (after if seen_text else before).extend(specials[name]["ids"])
    return before, after


def _hf_token_id(value, token_ids: dict[str, int], key: str, source: Path) -> int | None:
    """tokenizer_config.json's "bos_token" etc. (a string, or an object with "content") -> its id."""
    if value is None:
        return None
    text = value.get("content") if isinstance(value, dict) else value
    if text not in token_ids:
        raise ValueError(f"{source}: {key} {text!r} is not a token of the vocabulary")
    return token_ids[text]


def _hf_stop_ids(folder: Path) -> tuple[int, ...] | None:
    """generation_config.json's eos_token_id (an int or a list: generation stops at any), else config.json's."""
    for name in ("generation_config.json", "config.json"):
        value = (_read_json(folder / name) or {}).get("eos_token_id")
        if value is not None:
            ids = value if isinstance(value, list) else [value]
            if not all(isinstance(i, int) for i in ids):
                raise ValueError(f"{folder / name}: eos_token_id {value!r} is not an integer or a list of them")
            return tuple(ids)
    return None


def tokenizer_from_json(path: str | Path) -> ByteLevelBPETokenizer:
    """A Hugging Face `tokenizer.json` holding a byte-level BPE, with the settings of the folder it lies in.

    Read: the vocabulary, the merges (as "a b" strings or ["a", "b"] pairs), the added tokens (special ones match
    whole and decode to nothing, as control tokens; others match whole and decode to their text), the normaliser
    (none, or a Unicode normal form), the pre-tokenizer's splits (ByteLevel, Digits, Split(Regex) in a Sequence).
    BOS/EOS as transformers 5 decides them: by the post-processor's template alone (transformers drops
    tokenizer_config.json's add_bos_token / add_eos_token when a tokenizer.json is there; no post-processor: none).
    Special ids: tokenizer_config.json's bos_token / eos_token / pad_token, else config.json's ids.
    """
    path = Path(path)
    folder, source = path.parent, str(path)
    spec = _read_json(path)
    if spec is None:
        raise FileNotFoundError(f"{path}: no such tokenizer.json")
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: its model is {model.get('type')!r}; only byte-level BPE tokenizer.json files are "
                         f"read here (give a SentencePiece model's tokenizer.model instead)")
    splits, byte_level = _json_splits(spec.get("pre_tokenizer"), source)
    if not byte_level or model.get("byte_fallback"):
        raise ValueError(f"{path}: a SentencePiece-style BPE (no ByteLevel pre-tokenizer, or byte_fallback); only "
                         f"byte-level BPE is read from tokenizer.json: give the model's tokenizer.model instead")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise ValueError(f"{path}: BPE with {key} = {model[key]!r} is not supported")
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") not in ("NFC", "NFKC", "NFD", "NFKD"):
        raise ValueError(f"{path}: normalizer {normalizer.get('type')!r} is not supported (none, or a Unicode "
                         f"normal form)")

    vocab: dict[str, int] = model.get("vocab") or {}
    added = spec.get("added_tokens") or []
    size = 1 + max([*vocab.values(), *(t["id"] for t in added)], default=-1)
    tokens: list[str | None] = [None] * size
    types = [1] * size
    for token, i in vocab.items():
        tokens[i] = token
    for t in added:
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise ValueError(f"{path}: added token {t['content']!r} strips spaces or matches single words; "
                             f"not supported")
        tokens[t["id"]] = t["content"]
        types[t["id"]] = CONTROL if t.get("special") else USER_DEFINED
    holes = [i for i, t in enumerate(tokens) if t is None]
    if holes:
        raise ValueError(f"{path}: token ids {holes[:8]} have no token (the vocabulary has holes)")
    token_ids = {t: i for i, t in reversed(list(enumerate(tokens)))}

    config = _read_json(folder / "tokenizer_config.json") or {}
    model_config = _read_json(folder / "config.json") or {}
    where = folder / "tokenizer_config.json"
    ids = {key: _hf_token_id(config.get(f"{key}_token"), token_ids, f"{key}_token", where)
           for key in ("bos", "eos", "pad")}
    for key in ("bos", "eos", "pad"):
        if ids[key] is None and isinstance(model_config.get(f"{key}_token_id"), int):
            ids[key] = model_config[f"{key}_token_id"]
    before, after = _template_specials(spec.get("post_processor"), source)
    for side, found in (("bos", before), ("eos", after)):
        if len(found) > 1 or (found and ids[side] is not None and found[0] != ids[side]):
            raise ValueError(f"{path}: the post-processor adds {found} {'before' if side == 'bos' else 'after'} "
                             f"a text, not the single {side} token {ids[side]}; not supported")
        if found:
            ids[side] = found[0]
    add_bos, add_eos = bool(before), bool(after)
    return ByteLevelBPETokenizer(
        tokens=tokens, merges=model.get("merges") or [], token_types=types, bos_id=ids["bos"], eos_id=ids["eos"],
        pad_id=ids["pad"], pre=splits, source=source, add_bos=add_bos, add_eos=add_eos,
        ignore_merges=bool(model.get("ignore_merges")), normalize=normalizer and normalizer["type"],
        stop_ids=_hf_stop_ids(folder))


# --------------------------------------------------------------------------------------------------- loading

def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a SentencePiece model file, a folder holding one (or a Hugging Face tokenizer.json), a
    tokenizer.json, a .gguf file, or a named source. In a folder, tokenizer.model wins over tokenizer.json; a Hugging
    Face folder's generation_config.json (eos_token_id: where generation stops) applies to either, its
    tokenizer_config.json's add_bos_token / add_eos_token to a tokenizer.model (as transformers' LlamaTokenizer)."""
    if sources.is_named_source(path):
        path = sources.resolve(path)
    path = Path(path)
    if path.is_dir():
        candidates = ("tokenizer.model", "tokenizer.model.v1", "tokenizer.json")
        for name in candidates[:2]:
            if (path / name).is_file():
                return _with_folder_settings(SentencePieceTokenizer(path / name), path)
        if (path / "tokenizer.json").is_file():
            return tokenizer_from_json(path / "tokenizer.json")
        raise FileNotFoundError(f"{path}: no tokenizer in this folder (looked for {', '.join(candidates)})")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such tokenizer file or folder")
    if path.suffix == ".gguf":
        return ByteLevelBPETokenizer.from_gguf(path)
    if path.suffix == ".json":
        return tokenizer_from_json(path)
    return SentencePieceTokenizer(path)


def _with_folder_settings(tokenizer: SentencePieceTokenizer, folder: Path) -> SentencePieceTokenizer:
    config = _read_json(folder / "tokenizer_config.json") or {}
    if "add_bos_token" in config:
        tokenizer.add_bos = bool(config["add_bos_token"])
    if "add_eos_token" in config:
        tokenizer.add_eos = bool(config["add_eos_token"])
    stop_ids = _hf_stop_ids(folder)
    if stop_ids is not None:
        tokenizer.stop_ids = stop_ids
    return tokenizer
