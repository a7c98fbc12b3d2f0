"""Documents for training and evaluation: a split of our Polish corpus, or the user's own text files.

Every script that reads text (train.py, eval_ppl.py) takes one `spec` and calls read_documents(spec):

    "train", "validation", "test"   that split of the Polish corpus (data/polish.py), built on first use
    notes.txt                       ONE document: the whole file. Blank lines inside it are paragraph breaks, not
                                    document boundaries; to give several documents, give several files (a folder)
                                    or a .jsonl file
    docs.jsonl                      one document per line: a JSON object with a "text" string (other keys, such as
                                    our corpus's "id" and "source", are ignored); blank lines are skipped
    a folder                        every .txt and .jsonl file under it, in sorted path order

A document is the unit the token file separates with EOS (data/tokens.py) and the unit our splits never cut.
Documents whose text is empty or only whitespace are skipped, and so are empty files in a folder; a spec that
yields no document at all is an error. Files must be UTF-8; anything unreadable raises an error that names the file
and the byte offset or line, rather than training on mangled text.
"""
from __future__ import annotations

import json
from pathlib import Path

from data.polish import SPLITS, build_corpus


def read_documents(spec: str | Path) -> list[str]:
    """The documents `spec` names (see the module docstring); raises if it names none."""
    if isinstance(spec, str) and spec in SPLITS:
        path = build_corpus() / f"{spec}.jsonl"
        documents, empty = _read_jsonl(path), f"{path}: no documents (every text is empty)"
    elif (path := Path(spec)).is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if not files:
            raise ValueError(f"{path}: folder holds no .txt or .jsonl files")
        # An empty file among others holds no document and is skipped, like an empty line of a .jsonl file.
        documents = [doc for f in files for doc in _read_file(f)]
        empty = f"{path}: no documents in its {len(files)} .txt/.jsonl files (all empty)"
    elif path.exists():
        documents = _read_file(path)
        empty = (f"{path}: empty file (no document)" if path.suffix == ".txt" else
                 f"{path}: no documents (empty file, or every text is empty)")
    else:
        raise FileNotFoundError(f"{spec}: no such file or folder (nor a corpus split: {', '.join(SPLITS)})")
    if not documents:
        raise ValueError(empty)
    return documents


def _read_file(path: Path) -> list[str]:
    """The file's documents; [] for an empty one (the caller decides whether that is an error)."""
    if path.suffix == ".txt":
        text = _read_utf8(path)
        return [text] if text.strip() else []
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    raise ValueError(f"{path}: unknown kind of file; expected .txt (one document) or .jsonl (one per line)")


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 at byte offset {e.start} "
                         f"(bytes {data[e.start:e.start + 4]!r})") from None
    return text.removeprefix("\ufeff")       # a byte-order mark some editors write is not part of the text


def _read_jsonl(path: Path) -> list[str]:
    documents = []
    for number, line in enumerate(_read_utf8(path).split("\n"), start=1):
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
            documents.append(record["text"])
    return documents
