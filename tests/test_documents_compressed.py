"""Compressed --data: .gz, .xz and .zst (SpeakLeash's .jsonl.zst) give the token file of the plain text; a truncated
or corrupt file is refused with its name; the reading is streamed."""
import gzip
import json
import lzma
import sys

import numpy as np
import pytest

from data.documents import iter_documents, read_documents
from data.tokens import load_tokens, token_file_info, tokenize_to_file

zstandard = pytest.importorskip("zstandard")

DOCS = [f"Dokument {i}: zażółć gęślą jaźń, {i * 37} złotych.\n" * (1 + i % 7) + "😀 koniec" for i in range(150)]
COMPRESS = {".gz": gzip.compress, ".xz": lzma.compress, ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}


class ByteTokenizer:
    bos_id, eos_id, pad_id, vocab_size, add_bos, add_eos, stop_ids = 1, 2, None, 259, False, False, (2,)

    def encode(self, text, bos=None, eos=None):
        return [1] * bool(bos) + [b + 3 for b in text.encode()] + [2] * bool(eos)


def jsonl_bytes(docs) -> bytes:
    # SpeakLeash's layout: the text under "text", metadata beside it.
    return b"".join(json.dumps({"text": t, "meta": {"id": i, "quality": "HIGH"}}, ensure_ascii=False).encode() + b"\n"
                    for i, t in enumerate(docs))


@pytest.mark.parametrize("compression", [".gz", ".xz", ".zst"])
def test_compressed_files_give_the_plain_token_file(tmp_path, compression):
    plain_dir, packed_dir = tmp_path / "plain", tmp_path / "packed"
    plain_dir.mkdir()
    packed_dir.mkdir()
    (plain_dir / "a.jsonl").write_bytes(jsonl_bytes(DOCS[:100]))
    (plain_dir / "b.txt").write_text(DOCS[100])
    (packed_dir / f"a.jsonl{compression}").write_bytes(COMPRESS[compression](jsonl_bytes(DOCS[:100])))
    (packed_dir / f"b.txt{compression}").write_bytes(COMPRESS[compression](DOCS[100].encode()))
    tok = ByteTokenizer()
    plain = tokenize_to_file(iter_documents(plain_dir), tok, tmp_path / "plain.bin")
    packed = tokenize_to_file(iter_documents(packed_dir), tok, tmp_path / "packed.bin")
    assert np.array_equal(load_tokens(plain), load_tokens(packed))
    assert token_file_info(plain)["documents_sha256"] == token_file_info(packed)["documents_sha256"]
    assert token_file_info(packed)["n_documents"] == 101
    assert read_documents(packed_dir / f"a.jsonl{compression}") == DOCS[:100]


def test_several_streams_in_one_file(tmp_path):
    """Concatenated .gz members and zstd frames (what `cat a.gz b.gz` and multi-frame writers make) all count."""
    for suffix in (".gz", ".zst"):
        path = tmp_path / f"x.jsonl{suffix}"
        path.write_bytes(COMPRESS[suffix](jsonl_bytes(DOCS[:10])) + COMPRESS[suffix](jsonl_bytes(DOCS[10:30])))
        assert read_documents(path) == DOCS[:30]


@pytest.mark.parametrize("compression", [".gz", ".xz", ".zst"])
def test_truncated_file_is_refused_with_its_name(tmp_path, compression):
    data = COMPRESS[compression](jsonl_bytes(DOCS))
    path = tmp_path / f"cut.jsonl{compression}"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=rf"cut\.jsonl\{compression}: truncated .* ends at byte {len(data) * 2 // 3}"):
        read_documents(path)
    with pytest.raises(ValueError, match=r"cut\.jsonl"):
        tokenize_to_file(iter_documents(path), ByteTokenizer(), tmp_path / "t.bin")
    assert not (tmp_path / "t.bin").exists()


def test_corrupt_gzip_is_refused_with_its_name_and_offset(tmp_path):
    data = bytearray(gzip.compress(jsonl_bytes(DOCS)))
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz: (corrupt gzip data in compressed bytes 0\.\.\d+|.*line)"):
        read_documents(path)


def test_reading_is_streamed(tmp_path, monkeypatch):
    """The first document comes out after one read of the compressed file, not the whole of it; a file whose tail
    is cut still yields its head first, then fails."""
    import data.documents as documents
    data = gzip.compress(jsonl_bytes(DOCS * 40), compresslevel=1)
    path = tmp_path / "big.jsonl.gz"
    path.write_bytes(data[:-20])
    reads = []

    def spying_open(*args, **kwargs):
        f = open(*args, **kwargs)
        read = f.read
        f_read = lambda n=-1: reads.append(len(chunk := read(n))) or chunk  # noqa: E731
        return type("Spy", (), {"read": staticmethod(f_read), "__enter__": lambda self: self,
                                "__exit__": lambda self, *a: f.close()})()
    monkeypatch.setattr(documents, "open", spying_open, raising=False)
    monkeypatch.setattr(documents, "_CHUNK", 4096)
    docs = iter_documents(path)
    assert next(docs) == DOCS[0]
    assert sum(reads) == 4096 < len(data) // 4
    with pytest.raises(ValueError, match="big.jsonl.gz: truncated"):
        for _ in docs:
            pass
    assert sum(reads) == len(data) - 20


def test_missing_zstandard_names_the_file_and_package(tmp_path, monkeypatch):
    path = tmp_path / "speakleash.jsonl.zst"
    path.write_bytes(COMPRESS[".zst"](jsonl_bytes(DOCS[:3])))
    monkeypatch.setitem(sys.modules, "zstandard", None)          # as if not installed
    with pytest.raises(ValueError, match=r"speakleash\.jsonl\.zst: reading \.zst files needs the `zstandard` package"):
        read_documents(path)


def test_bad_lines_inside_a_compressed_file_name_the_line(tmp_path):
    path = tmp_path / "lines.jsonl.xz"
    path.write_bytes(lzma.compress(jsonl_bytes(DOCS[:3]) + b'{"text": "ok"}\n{"tekst": 1}\n'))
    with pytest.raises(ValueError, match=r'lines\.jsonl\.xz, line 5: expected an object with a "text" string'):
        read_documents(path)
    path.write_bytes(lzma.compress(jsonl_bytes(DOCS[:2]) + b'{"text": "\xc5"}\n'))
    with pytest.raises(ValueError, match=r"lines\.jsonl\.xz, line 3: not valid UTF-8 at byte offset 10"):
        read_documents(path)
