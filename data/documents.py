"""Documents for training and evaluation: a split of our Polish corpus, or the user's own text files.

Every script that reads text (train.py, eval_ppl.py) takes one `spec` and calls iter_documents(spec) (or
read_documents, its list):

    "train", "validation", "test"   that split of the Polish corpus (data/polish.py), built on first use
    notes.txt                       ONE document: the whole file. Blank lines inside it are paragraph breaks, not
                                    document boundaries; to give several documents, give several files (a folder)
                                    or a .jsonl file
    docs.jsonl                      one document per line: a JSON object with a "text" string (other keys, such as
                                    our corpus's "id" and "source" or SpeakLeash's metadata, are ignored); blank
                                    lines are skipped
    x.txt.gz, x.jsonl.zst, ...      the same, compressed: .gz (gzip) and .xz (xz) through the standard library, .zst
                                    (Zstandard: SpeakLeash's .jsonl.zst, Curie's own data) through the optional
                                    `zstandard` package
    a folder                        every such file under it, in sorted path order

Files are read streamed: decompressed and split into lines a chunk at a time, so a .jsonl.zst of many GB is never
whole in memory (a .txt is one document, so it is). A document is the unit the token file separates with EOS
(data/tokens.py) and the unit our splits never cut. Documents whose text is empty or only whitespace are skipped, and
so are empty files in a folder; a spec that yields no document at all is an error. Files must be UTF-8; anything
unreadable, a truncated or corrupt compressed file included, raises an error that names the file and the byte offset
or line, rather than training on mangled or silently shortened text.
"""
from __future__ import annotations

import json
import lzma
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from data.polish import SPLITS, build_corpus

KINDS = (".txt", ".jsonl")
COMPRESSIONS = ("", ".gz", ".xz", ".zst")
SUFFIXES = tuple(kind + compression for kind in KINDS for compression in COMPRESSIONS)
_CHUNK = 1 << 20  # compressed bytes read at a time


def iter_documents(spec: str | Path) -> Iterator[str]:
    """The documents `spec` names (see the module docstring), one at a time; raises if it names none."""
    n = 0
    if isinstance(spec, str) and spec in SPLITS:
        path = build_corpus() / f"{spec}.jsonl"
        files, empty = [path], f"{path}: no documents (every text is empty)"
    elif (path := Path(spec)).is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise ValueError(f"{path}: folder holds no .txt or .jsonl files (plain, .gz, .xz or .zst)")
        # An empty file among others holds no document and is skipped, like an empty line of a .jsonl file.
        empty = f"{path}: no documents in its {len(files)} .txt/.jsonl files (all empty)"
    elif path.exists():
        files = [path]
        empty = (f"{path}: empty file (no document)" if _kind(path)[0] == ".txt" else
                 f"{path}: no documents (empty file, or every text is empty)")
    else:
        raise FileNotFoundError(f"{spec}: no such file or folder (nor a corpus split: {', '.join(SPLITS)})")
    for f in files:
        for doc in _read_file(f):
            n += 1
            yield doc
    if not n:
        raise ValueError(empty)


def read_documents(spec: str | Path) -> list[str]:
    """iter_documents(spec) as a list."""
    return list(iter_documents(spec))


def _kind(path: Path) -> tuple[str, str]:
    """("".txt" or ".jsonl", "" or ".gz" / ".xz" / ".zst") from the file name."""
    for kind in KINDS:
        for compression in COMPRESSIONS:
            if path.name.endswith(kind + compression):
                return kind, compression
    raise ValueError(f"{path}: unknown kind of file; expected .txt (one document) or .jsonl (one per line), "
                     f"optionally compressed as .gz, .xz or .zst")


def _read_file(path: Path) -> Iterator[str]:
    """The file's documents; none for an empty one (the caller decides whether that is an error)."""
    kind, compression = _kind(path)
    chunks = _decompressed(path, compression)
    if kind == ".txt":
        text = _utf8(b"".join(chunks), path)
        if text.strip():
            yield text
    else:
        yield from _read_jsonl(path, chunks)


def _decompressed(path: Path, compression: str) -> Iterator[bytes]:
    """The file's bytes, decompressed, a chunk at a time. Every stream (gzip member, xz stream, zstd frame) must end
    where it should: one cut short is an error naming the file and the offset, never a silently short corpus."""
    if compression == "":
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk
        return
    new, errors, name = _DECOMPRESSORS[compression](path)
    with open(path, "rb") as f:
        offset, d = 0, None
        while chunk := f.read(_CHUNK):
            data = chunk
            while data:  # a file may hold several streams back to back (concatenated .gz files, zstd frames)
                d = d or new()
                try:
                    out = d.decompress(data)
                except errors as e:
                    raise ValueError(f"{path}: corrupt {name} data in compressed bytes {offset}..{offset + len(chunk)}"
                                     f" ({e})") from None
                if out:
                    yield out
                data, d = (d.unused_data, None) if d.eof else (b"", d)
            offset += len(chunk)
        if d is not None:
            raise ValueError(f"{path}: truncated {name} file: it ends at byte {offset}, inside a compressed stream "
                             f"(an interrupted download or copy?)")


def _gzip(path: Path):
    return (lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)), zlib.error, "gzip"


def _xz(path: Path):
    return lzma.LZMADecompressor, lzma.LZMAError, "xz"


def _zstd(path: Path):
    try:
        import zstandard
    except ModuleNotFoundError:
        raise ValueError(f"{path}: reading .zst files needs the `zstandard` package (pip install zstandard)") from None
    return (lambda: zstandard.ZstdDecompressor().decompressobj()), zstandard.ZstdError, "zstd"


_DECOMPRESSORS: dict[str, Callable] = {".gz": _gzip, ".xz": _xz, ".zst": _zstd}


def _utf8(data: bytes, path: Path, where: str = "") -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}{where}: not valid UTF-8 at byte offset {e.start} "
                         f"(bytes {data[e.start:e.start + 4]!r})") from None
    return text.removeprefix("\ufeff")       # a byte-order mark some editors write is not part of the text


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines (without their newline) from a stream of chunks."""
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    yield rest


def _read_jsonl(path: Path, chunks: Iterator[bytes]) -> Iterator[str]:
    for number, raw in enumerate(_lines(chunks), start=1):
        line = _utf8(raw, path, f", line {number}")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}, line {number}: expected an object with a "text" string, got {line[:80]!r}')
        try:  # JSON's \uXXXX escapes can spell a lone surrogate, which no UTF-8 text (nor tokenizer) can hold
            record["text"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{path}, line {number}: the text holds {record['text'][e.start]!r} at character "
                             f"{e.start}, a lone UTF-16 surrogate (a broken \\u escape), not a character") from None
        if record["text"].strip():
            yield record["text"]
