"""Token files: a set of documents tokenized once, stored as one flat array that training reads through np.memmap.

Layout: the documents' token ids back to back, with the tokenizer's EOS after each document:

    doc0 tokens, EOS, doc1 tokens, EOS, ..., docN tokens, EOS

Training cuts this one stream into fixed-length windows regardless of document boundaries ("packing", as in Mistral's
and Curie's pre-training), so no window is wasted on padding; the EOS tells the model that what follows is unrelated
to what came before. Each document starts with BOS when the checkpoint's tokenizer adds one (`tokenizer.add_bos`:
Mistral yes, SmolLM2 no), as transformers' packing recipe (tokenise each text, concatenate, cut) has it, so that a
document start looks as it does at inference; the blocks themselves start wherever the cut falls.

The array is uint16 when every id fits (vocab_size <= 65536: Mistral's 32000, SmolLM2's 49152), else uint32: half
the disk and page cache of int32 for every model we use. Beside `x.bin` lies the sidecar `x.bin.json`, which says
how to read it (dtype, n_tokens) and what it holds (n_documents, eos_id, tokenizer, source spec, sha256 of the input
documents). load_tokens() trusts neither file alone: the sidecar must exist and agree with the array's length.

Writing is atomic: both files are written under temporary names in the same folder and renamed into place, the old
sidecar removed first and the new one renamed last, so a crash at any moment leaves either the old complete pair,
or an array without a sidecar (refused by load_tokens, rebuilt by cached_token_file), never a wrong pair.

One process does the encoding: both our tokenizers get through the whole ~6 M-character corpus in seconds (Mistral's
SentencePiece ~3 s, SmolLM2's BPE ~10 s on one core), and on 2 cores a pool would mostly add the cost of shipping
the tokenizer and the documents to the workers.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from data.documents import iter_documents
from model.sources import cache_dir
from model.tokenizer import Tokenizer

FORMAT = "minicurie-tokens-v1"


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def documents_sha256(documents: Iterable[str]) -> str:
    """A digest of the documents and of where each one ends (each is prefixed by its length in bytes)."""
    digest = hashlib.sha256()
    for doc in documents:
        _digest_document(digest, doc)
    return digest.hexdigest()


def _digest_document(digest, doc: str) -> None:
    data = doc.encode("utf-8")
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def tokenize_to_file(documents: Iterable[str], tokenizer: Tokenizer, path: str | Path, *, source: str = "",
                     tokenizer_name: str | None = None) -> Path:
    """Encode `documents` into the token file `path` (and its sidecar); see the module docstring. Returns path.
    `documents` may be any iterable (iter_documents streams a compressed corpus): it is read once."""
    path = Path(path)
    if tokenizer.eos_id is None:
        raise ValueError(f"{path}: the tokenizer has no EOS token, which token files put between documents")
    vocab_size, eos_id = int(tokenizer.vocab_size), int(tokenizer.eos_id)
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"{path}: tokenizer eos_id={eos_id} is outside its vocabulary of {vocab_size}")
    add_bos = bool(tokenizer.add_bos)
    n_tokens, n_documents, digest = 0, 0, hashlib.sha256()

    def encoded() -> Iterator[bytes]:
        nonlocal n_tokens, n_documents
        for i, doc in enumerate(tqdm(documents, desc=f"tokenizing {path.name}", unit="doc", disable=None)):
            _digest_document(digest, doc)
            n_documents += 1
            ids = np.asarray(tokenizer.encode(doc, bos=add_bos, eos=False), dtype=np.int64)
            outside = ids[(ids < 0) | (ids >= vocab_size)]
            if outside.size:
                raise ValueError(f"{path}: document {i} encoded to id {outside[0]}, outside the vocabulary of "
                                 f"{vocab_size}")
            n_tokens += ids.size + 1
            yield np.append(ids, eos_id).astype(dtype).tobytes()

    path.parent.mkdir(parents=True, exist_ok=True)
    array_tmp = _write_temporary(path, encoded())
    sidecar_tmp = None
    try:
        if not n_documents:
            raise ValueError(f"{path}: no documents to tokenize")
        sidecar = {
            "format": FORMAT, "dtype": dtype.name, "n_tokens": n_tokens, "n_documents": n_documents,
            "eos_id": eos_id, "bos": add_bos, "tokenizer": {"name": tokenizer_name or type(tokenizer).__name__,
                                            "vocab_size": vocab_size},
            "source": source, "documents_sha256": digest.hexdigest(),
        }
        sidecar_tmp = _write_temporary(path, [(json.dumps(sidecar, indent=2) + "\n").encode()])
        sidecar_path(path).unlink(missing_ok=True)
        os.replace(array_tmp, path)
        os.replace(sidecar_tmp, sidecar_path(path))
    finally:
        # Both are gone after a successful os.replace; these only clean up after a failure.
        array_tmp.unlink(missing_ok=True)
        if sidecar_tmp is not None:
            sidecar_tmp.unlink(missing_ok=True)
    return path


def _write_temporary(path: Path, chunks: Iterable[bytes]) -> Path:
    """Write `chunks` to a new temporary file beside `path` (so os.replace onto it is atomic); removed on failure."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def token_file_info(path: str | Path) -> dict:
    """The sidecar of token file `path`, checked against the array's size on disk."""
    path = Path(path)
    meta_path = sidecar_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: token file not found")
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{meta_path}: sidecar missing, so {path} is not a complete token file "
                                f"(an interrupted write?); tokenize again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a {FORMAT} sidecar")
    if meta.get("dtype") not in ("uint16", "uint32") or not isinstance(meta.get("n_tokens"), int):
        raise ValueError(f"{meta_path}: bad dtype {meta.get('dtype')!r} or n_tokens {meta.get('n_tokens')!r}")
    expected = meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(f"{path}: {actual} bytes, but its sidecar {meta_path.name} says {meta['n_tokens']} "
                         f"{meta['dtype']} tokens = {expected} bytes; the pair is inconsistent, tokenize again")
    return meta


def load_tokens(path: str | Path) -> np.memmap:
    """The token ids of token file `path`, memory-mapped read-only, [n_tokens] of uint16 or uint32."""
    meta = token_file_info(path)
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))


def cached_token_file(spec: str | Path, tokenizer: Tokenizer, tokenizer_key: str) -> Path:
    """The token file of read_documents(spec) under `tokenizer`, made once and kept in $MINICURIE_CACHE/tokens/.

    `tokenizer_key` names the tokenizer (e.g. "mistral-7b-v0.1") and must change whenever the tokenizer does. The
    file name also carries a digest of the documents, so editing a user's text file gives a new token file.
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]+", tokenizer_key or ""):
        raise ValueError(f"tokenizer_key {tokenizer_key!r} must be a non-empty name of letters, digits, '.', '_', '-'")
    # Two streamed passes over the documents (digest, then tokens if needed) instead of holding them all: a
    # SpeakLeash .jsonl.zst can be many times the memory.
    digest = documents_sha256(iter_documents(spec))
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec).name or str(spec))
    path = cache_dir() / "tokens" / tokenizer_key / f"{label}-{digest[:16]}.bin"
    try:
        meta = token_file_info(path)
    except (FileNotFoundError, ValueError):
        return tokenize_to_file(iter_documents(spec), tokenizer, path, source=str(spec), tokenizer_name=tokenizer_key)
    if meta.get("documents_sha256") != digest or meta.get("eos_id") != tokenizer.eos_id \
            or meta.get("bos", False) != bool(tokenizer.add_bos) \
            or meta.get("tokenizer", {}).get("vocab_size") != tokenizer.vocab_size:
        raise ValueError(f"{path}: cached tokens do not match this tokenizer or these documents, yet carry the same "
                         f"key {tokenizer_key!r}; give each tokenizer its own key, or delete the file")
    return path
