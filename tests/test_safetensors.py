"""model/safetensors.py against the official `safetensors` package: each reads the other's files, and our writer
produces the same bytes as theirs. Broken files are built by hand to check every error names the file and tensor."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from model.safetensors import DTYPES, SafeTensorsFile, load_file, read_header, save_file


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) < 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, dtype=torch.float64) * 10).to(dtype)
    info = torch.iinfo(dtype)  # the whole range, so sign and byte order both matter
    return torch.randint(info.min, info.max, shape, dtype=torch.int64).to(dtype)


def random_tensors() -> dict[str, torch.Tensor]:
    tensors = {f"t.{name.lower()}": random_tensor(dtype, tuple(torch.randint(1, 6, (int(torch.randint(1, 4, ())),))
                                                                    .tolist()))
               for name, dtype in DTYPES.items()}
    tensors["scalar"] = random_tensor(torch.float32, ())
    tensors["empty"] = torch.empty(0, 3, dtype=torch.bfloat16)
    tensors["zażółć"] = random_tensor(torch.float16, (4,))  # non-ASCII names are raw UTF-8 in the header
    return tensors


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


# ---------------------------------------------------------------------------------------------------------------
# Interchange with the official package.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_our_bytes_equal_official_writer(tmp_path, metadata):
    tensors = random_tensors()
    save_file(tensors, tmp_path / "ours.safetensors", metadata)
    safetensors.torch.save_file(tensors, tmp_path / "theirs.safetensors", metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_official_reads_our_files(tmp_path):
    tensors = random_tensors()
    tensors["transposed"] = torch.randn(5, 7).T  # not contiguous: must be written in logical (row-major) order
    metadata = {"format": "pt", "note": "zażółć gęślą jaźń", "n": str(torch.randint(0, 99, ()).item())}
    path = tmp_path / "ours.safetensors"
    save_file(tensors, path, metadata)
    assert_same(safetensors.torch.load_file(path), tensors)
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() == metadata


def test_we_read_official_files(tmp_path):
    tensors = random_tensors()
    metadata = {"format": "pt", "k": str(torch.rand(()).item())}
    path = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(tensors, path, metadata)
    assert_same(load_file(path), tensors)
    with SafeTensorsFile(path) as ours, safetensors.safe_open(path, framework="pt") as theirs:
        assert ours.metadata == theirs.metadata()
        assert sorted(ours.keys()) == sorted(theirs.keys())
        for name in theirs.keys():
            assert ours.shape(name) == tuple(theirs.get_slice(name).get_shape())
            assert ours.dtype(name) == tensors[name].dtype
            assert torch.equal(ours.get_tensor(name), theirs.get_tensor(name))


def test_header_without_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.randn(3)}, path)
    header, data_start = read_header(path)
    assert "__metadata__" not in header and data_start % 8 == 0
    assert SafeTensorsFile(path).metadata == {}


def test_tensors_are_views_of_the_file_map(tmp_path):
    tensors = {"a": torch.randn(16, 8), "b": torch.randn(32), "c": torch.randn(3, 3)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    header, _ = read_header(path)
    before = path.read_bytes()
    with SafeTensorsFile(path) as f:
        loaded = {name: f.get_tensor(name) for name in f.keys()}
    # A copy would land anywhere; views into one map sit exactly as far apart as the data in the file.
    for name in ("b", "c"):
        assert (loaded[name].data_ptr() - loaded["a"].data_ptr()
                == header[name]["data_offsets"][0] - header["a"]["data_offsets"][0])
    loaded["a"] += 1  # after close: still valid, and writes stay in memory (copy-on-write)
    assert torch.equal(loaded["a"], tensors["a"] + 1)
    assert path.read_bytes() == before


def test_save_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    old = {"w": torch.randn(4)}
    save_file(old, path)
    save_file({"v": torch.randn(2)}, path)  # overwriting an existing file works
    assert set(load_file(path)) == {"v"}
    save_file(old, path)

    def crash(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_file({"new": torch.randn(1000)}, path)
    monkeypatch.undo()
    assert_same(load_file(path), old)                    # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # and no temp file is left behind


def test_save_rejects_what_the_format_cannot_hold(tmp_path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match=r"bad\.safetensors: tensor 'c' has dtype torch\.complex64"):
        save_file({"c": torch.randn(2, dtype=torch.complex64)}, path)
    with pytest.raises(ValueError, match="metadata must map strings to strings"):
        save_file({"w": torch.randn(2)}, path, metadata={"step": 3})
    with pytest.raises(ValueError, match="invalid tensor name '__metadata__'"):
        save_file({"__metadata__": torch.randn(2)}, path)
    assert not path.exists()


# ---------------------------------------------------------------------------------------------------------------
# Broken files.
# ---------------------------------------------------------------------------------------------------------------

def write_raw(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors: no such safetensors file"):
        load_file(tmp_path / "nothing.safetensors")


def test_shorter_than_8_bytes(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    with pytest.raises(ValueError, match=r"short\.safetensors: only 3 bytes, too short"):
        load_file(path)


def test_header_length_past_end(tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b'{"a": 1}')
    with pytest.raises(ValueError, match=r"long\.safetensors: header length 1000 runs past the end of the file "
                                         r"\(16 bytes\)"):
        load_file(path)


@pytest.mark.parametrize("raw", [b'{"w": {"dtype": "F32",', b"[1, 2]", b"\xff\xfe{}"])
def test_bad_json(tmp_path, raw):
    path = write_raw(tmp_path / "json.safetensors", raw)
    with pytest.raises(ValueError, match=r"json\.safetensors: header is"):
        load_file(path)


def test_unknown_dtype_names_tensor(tmp_path):
    path = write_raw(tmp_path / "dtype.safetensors",
                     {"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(ValueError, match=r"dtype\.safetensors: tensor 'w': unknown dtype 'C64'"):
        load_file(path)


def test_offsets_inconsistent_with_shape_names_tensor(tmp_path):
    path = write_raw(tmp_path / "offsets.safetensors",
                     {"ok": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [8, 18]}}, bytes(24))
    with pytest.raises(ValueError, match=r"offsets\.safetensors: tensor 'w': data_offsets \[8, 18\] span 10 bytes, "
                                         r"but shape \[2, 3\] of BF16 needs 12"):
        load_file(path)


def test_truncated_file_names_tensor(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"first": torch.randn(8, dtype=torch.float64), "last": torch.randn(5)}, good)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"cut\.safetensors: tensor 'last': data .* runs past the end of the file"):
        SafeTensorsFile(path)


def test_unknown_tensor_name(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(2)}, path)
    with SafeTensorsFile(path) as f, pytest.raises(KeyError, match=r"w\.safetensors: no tensor 'v'"):
        f.get_tensor("v")


@pytest.mark.parametrize("shape", [[True, 2], [2, False], [2.0]])
def test_shape_of_non_integers_names_tensor(tmp_path, shape):
    # JSON true is a Python bool, which isinstance(.., int) accepts; the official reader wants usize.
    path = write_raw(tmp_path / "shape.safetensors", {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}},
                     bytes(8))
    with pytest.raises(ValueError, match=r"shape\.safetensors: tensor 'w': shape .* is not a list of non-negative "
                                         r"integers"):
        load_file(path)
    with pytest.raises(safetensors.SafetensorError):
        safetensors.safe_open(str(path), "pt")


def test_overlapping_tensors_name_both(tmp_path):
    path = write_raw(tmp_path / "overlap.safetensors",
                     {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))
    with pytest.raises(ValueError, match=r"overlap\.safetensors: tensor 'b': data_offsets \[4, 12\] overlap those of "
                                         r"'a', which end at 8"):
        load_file(path)
    with pytest.raises(safetensors.SafetensorError, match="invalid offset"):   # the official reader agrees
        safetensors.safe_open(str(path), "pt")
    # The same bytes twice under two names is an overlap too.
    path = write_raw(tmp_path / "alias.safetensors",
                     {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(ValueError, match=r"alias\.safetensors: tensor 'b': .* overlap those of 'a'"):
        load_file(path)
