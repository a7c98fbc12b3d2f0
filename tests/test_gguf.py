"""model/gguf.py against the `gguf` package (llama.cpp's own Python reader and writer), used here as the oracle.

Dequantisation must equal `gguf.quants.dequantize` bit for bit on random blocks of every type we support. Files are
written with `gguf.GGUFWriter`, then read by us; the real SmolLM2 GGUF is read by both and compared; broken files are
made by truncating or patching good ones.
"""
from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from model.gguf import GGML_TYPES, SUPPORTED_TYPES, GGUFFile, dequantize

T = gguf.GGMLQuantizationType

# Byte ranges of each block's fp16 scale fields (ggml-common.h); they get random *finite* halves, every other byte
# is uniformly random.
FP16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def random_finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    is_special = (bits & 0x7C00) == 0x7C00          # exponent all ones: inf or NaN
    return np.where(is_special, bits & 0x83FF, bits).astype("<u2").view(np.uint8).reshape(n, 2)


def random_blocks(rng: np.random.Generator, type_name: str, n_blocks: int) -> np.ndarray:
    """uint8 [n_blocks, type_size]: valid blocks of `type_name` with random content."""
    _, type_size = gguf.GGML_QUANT_SIZES[T[type_name]]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for start in FP16_FIELDS.get(type_name, []):
        raw[:, start:start + 2] = random_finite_f16(rng, n_blocks)
    return raw


def bits(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float32 values as their int32 bit patterns: exact comparison that also covers NaN payloads and -0.0."""
    t = torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x  # np.array: a writable copy
    assert t.dtype == torch.float32
    return t.view(torch.int32)


# ---------------------------------------------------------------------------------------------------------------
# Dequantisation.
# ---------------------------------------------------------------------------------------------------------------

def test_type_table_matches_ggml():
    for type_id, (name, block_size, type_size) in GGML_TYPES.items():
        assert T(type_id).name == name
        assert gguf.GGML_QUANT_SIZES[T(type_id)] == (block_size, type_size), name


@pytest.mark.parametrize("type_name", [GGML_TYPES[t][0] for t in SUPPORTED_TYPES])
def test_dequantize_equals_gguf_exactly(type_name: str):
    rng = np.random.default_rng(sum(map(ord, type_name)))
    block_size, _ = gguf.GGML_QUANT_SIZES[T[type_name]]
    n_blocks = 8192 // block_size + 3               # an odd count, a few thousand values
    raw = random_blocks(rng, type_name, n_blocks)
    expected = gguf.quants.dequantize(raw, T[type_name]).reshape(-1)
    ours = dequantize(raw.tobytes(), T[type_name].value, n_blocks * block_size)
    assert ours.dtype == torch.float32 and ours.shape == (n_blocks * block_size,)
    if type_name in FP16_FIELDS:
        assert torch.isfinite(ours).all()
    assert torch.equal(bits(ours), bits(expected))


def test_dequantize_accepts_numpy_and_returns_a_copy():
    rng = np.random.default_rng(1)
    raw = rng.standard_normal(64).astype(np.float32).view(np.uint8)
    before = raw.copy()
    ours = dequantize(raw, T.F32.value, 64)
    assert torch.equal(ours, torch.from_numpy(before.view(np.float32)))
    ours.zero_()  # must not write through to the caller's bytes
    assert np.array_equal(raw, before)


def test_dequantize_rejects_bad_requests():
    q8 = T.Q8_0.value
    with pytest.raises(ValueError, match="not a whole number of Q8_0 blocks of 32"):
        dequantize(bytes(34), q8, 33)
    with pytest.raises(ValueError, match="take 68 bytes, got 34"):
        dequantize(bytes(34), q8, 64)
    with pytest.raises(ValueError, match="unknown ggml type id 99"):
        dequantize(bytes(4), 99, 1)
    with pytest.raises(ValueError, match="cannot dequantise ggml type IQ2_XXS"):
        dequantize(bytes(66), T.IQ2_XXS.value, 256)


# ---------------------------------------------------------------------------------------------------------------
# Files written by gguf.GGUFWriter.
# ---------------------------------------------------------------------------------------------------------------

V = gguf.GGUFValueType


def _metadata(rng: np.random.Generator) -> dict[str, tuple[object, gguf.GGUFValueType]]:
    """One key per GGUF value type, random values."""
    f32 = float(np.float32(rng.standard_normal()))  # exactly representable, so it survives the round trip
    return {
        "test.uint8": (int(rng.integers(0, 256)), V.UINT8),
        "test.int8": (int(rng.integers(-128, 128)), V.INT8),
        "test.uint16": (int(rng.integers(0, 1 << 16)), V.UINT16),
        "test.int16": (int(rng.integers(-(1 << 15), 1 << 15)), V.INT16),
        "test.uint32": (int(rng.integers(0, 1 << 32)), V.UINT32),
        "test.int32": (int(rng.integers(-(1 << 31), 1 << 31)), V.INT32),
        "test.uint64": ((1 << 63) + int(rng.integers(0, 1 << 62)), V.UINT64),
        "test.int64": (-int(rng.integers(0, 1 << 62)), V.INT64),
        "test.float32": (f32, V.FLOAT32),
        "test.float64": (float(rng.standard_normal()), V.FLOAT64),
        "test.bool": (bool(rng.integers(0, 2)), V.BOOL),
        "test.string": ("zażółć gęślą jaźń " + str(rng.integers(0, 1000)), V.STRING),
        "test.ints": (rng.integers(-1000, 1000, size=7).tolist(), V.ARRAY),
        "test.floats": ([float(np.float32(x)) for x in rng.standard_normal(5)], V.ARRAY),
        "test.bools": ([bool(b) for b in rng.integers(0, 2, size=9)], V.ARRAY),
        "test.strings": (["", "Ġ t", "<0x0A>", "ąę" * int(rng.integers(1, 4))], V.ARRAY),
        "test.nested": ([[1, 2, 3], [int(rng.integers(0, 9))]], V.ARRAY),
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict, dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]]:
    """A GGUF with every metadata type, a non-default alignment and tensors of several types and ranks."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("gguf") / "written.gguf"
    meta = _metadata(rng)
    tensors = {  # name -> (what GGUFWriter gets: floats, or raw bytes per row for a packed type; its type)
        "vec.f32": (rng.standard_normal(96).astype(np.float32), T.F32),
        "cube.f32": (rng.standard_normal((2, 3, 32)).astype(np.float32), T.F32),
        "mat.f16": (rng.standard_normal((5, 32)).astype(np.float16), T.F16),
        "mat.bf16": (rng.integers(0, 1 << 16, size=(3, 64), dtype=np.uint16).view(np.uint8), T.BF16),
        "mat.q8_0": (gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), T.Q8_0), T.Q8_0),
        "mat.q4_k": (random_blocks(rng, "Q4_K", 6).reshape(3, -1), T.Q4_K),
        "mat.q6_k": (random_blocks(rng, "Q6_K", 2).reshape(2, -1), T.Q6_K),
        "mat.iq2_xxs": (rng.integers(0, 256, size=(2, 66), dtype=np.uint8), T.IQ2_XXS),
    }
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_custom_alignment(64)
    for key, (value, vtype) in meta.items():
        w.add_key_value(key, value, vtype)
    for name, (array, qtype) in tensors.items():
        packed = qtype not in (T.F32, T.F16)
        w.add_tensor(name, array, raw_dtype=qtype if packed else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, meta, tensors


def test_reads_metadata_of_every_type(written):
    path, meta, _ = written
    f = GGUFFile(path)
    assert f.path == path and f.version == 3
    assert f.metadata["general.architecture"] == "llama"
    assert f.metadata["general.alignment"] == 64
    for key, (value, _) in meta.items():
        assert f.metadata[key] == value, key
        assert type(f.metadata[key]) is type(value), key


def test_reads_tensors_like_gguf_reader(written):
    path, _, tensors = written
    f = GGUFFile(path)
    reader = gguf.GGUFReader(path)
    assert set(f.tensors) == set(tensors) == {t.name for t in reader.tensors}
    for rt in reader.tensors:
        ours = f.tensors[rt.name]
        assert ours.name == rt.name
        assert ours.shape == tuple(int(n) for n in reversed(rt.shape))
        assert (ours.ggml_type, ours.type_name) == (rt.tensor_type.value, rt.tensor_type.name)
        assert (ours.offset, ours.n_bytes, ours.n_elements) == (rt.data_offset, rt.n_bytes, rt.n_elements)
        assert ours.offset % 64 == 0  # the custom alignment was honoured
        if ours.ggml_type not in SUPPORTED_TYPES:
            continue
        array, qtype = tensors[rt.name]
        if qtype in (T.F32, T.F16):
            expected = array.astype(np.float32)
        else:
            expected = gguf.quants.dequantize(array, qtype)
        loaded = f.load_tensor(rt.name)
        assert loaded.shape == expected.shape
        assert torch.equal(bits(loaded), bits(expected)), rt.name
        assert f.load_tensor(rt.name, dtype=torch.float64).dtype == torch.float64


def test_unsupported_type_names_tensor_and_type(written):
    path, _, _ = written
    with pytest.raises(ValueError, match=r"written\.gguf: tensor 'mat\.iq2_xxs' has ggml type IQ2_XXS \(id 16\)"):
        GGUFFile(path).load_tensor("mat.iq2_xxs")
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        GGUFFile(path).load_tensor("nope")


def test_version_2_reads_the_same(written, tmp_path):
    path, _, _ = written
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(data)
    a, b = GGUFFile(path), GGUFFile(v2)
    assert b.version == 2 and a.metadata == b.metadata and a.tensors == b.tensors


# ---------------------------------------------------------------------------------------------------------------
# Broken files.
# ---------------------------------------------------------------------------------------------------------------

def _tensor_entry(data: bytes, name: str) -> tuple[int, int]:
    """(offset of ne[0], offset of the ggml type) in `name`'s tensor-table entry."""
    key = struct.pack("<Q", len(name)) + name.encode()
    start = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, start)[0]
    return start + 4, start + 4 + 8 * n_dims


def _broken(tmp_path: Path, source: Path, data: bytes | bytearray) -> Path:
    path = tmp_path / ("broken-" + source.name)
    path.write_bytes(data)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        GGUFFile(tmp_path / "nothing.gguf")


def test_bad_magic_says_what_it_found(written, tmp_path):
    path, _, _ = written
    data = bytearray(path.read_bytes())
    data[:4] = b"GGML"
    with pytest.raises(ValueError, match=r"broken-written\.gguf: not a GGUF file \(starts with b'GGML'"):
        GGUFFile(_broken(tmp_path, path, data))
    with pytest.raises(ValueError, match="too short"):
        GGUFFile(_broken(tmp_path, path, data[:10]))


@pytest.mark.parametrize("version, message", [(1, "GGUF version 1 is not supported"),
                                              (0x03000000, r"GGUF version 50331648 \(a big-endian version 3 file\?\)")])
def test_unsupported_version(written, tmp_path, version, message):
    path, _, _ = written
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", version)
    with pytest.raises(ValueError, match=r"broken-written\.gguf: " + message):
        GGUFFile(_broken(tmp_path, path, data))


def test_truncated_metadata(written, tmp_path):
    path, _, _ = written
    data = path.read_bytes()
    cut = data.index(b"test.strings") + 20  # inside that key's value
    with pytest.raises(ValueError, match=r"broken-written\.gguf: file ends inside the metadata \(value of "
                                         r"'test\.strings'\)"):
        GGUFFile(_broken(tmp_path, path, data[:cut]))


def test_truncated_tensor_table(written, tmp_path):
    path, _, _ = written
    data = path.read_bytes()
    ne0, _ = _tensor_entry(data, "mat.q8_0")
    with pytest.raises(ValueError, match=r"broken-written\.gguf: file ends inside the tensor table \(entry "
                                         r"'mat\.q8_0'\)"):
        GGUFFile(_broken(tmp_path, path, data[:ne0 + 3]))


def test_truncated_tensor_data_names_the_tensor(written, tmp_path):
    path, _, _ = written
    data = path.read_bytes()
    last = max(gguf.GGUFReader(path).tensors, key=lambda t: t.data_offset)
    with pytest.raises(ValueError, match=rf"broken-written\.gguf: data of tensor '{last.name}' .* runs past the end"):
        GGUFFile(_broken(tmp_path, path, data[:last.data_offset + last.n_bytes - 5]))


def test_unknown_type_id_names_tensor_and_id(written, tmp_path):
    path, _, _ = written
    data = bytearray(path.read_bytes())
    _, type_at = _tensor_entry(data, "mat.f16")
    data[type_at:type_at + 4] = struct.pack("<I", 99)
    with pytest.raises(ValueError, match=r"broken-written\.gguf: tensor 'mat\.f16' has unknown ggml type id 99"):
        GGUFFile(_broken(tmp_path, path, data))


def test_row_not_whole_blocks_names_the_tensor(written, tmp_path):
    path, _, _ = written
    data = bytearray(path.read_bytes())
    ne0, _ = _tensor_entry(data, "mat.q8_0")
    data[ne0:ne0 + 8] = struct.pack("<Q", 48)
    with pytest.raises(ValueError, match=r"broken-written\.gguf: tensor 'mat\.q8_0' has rows of 48 values, not a "
                                         r"multiple of Q8_0's block size 32"):
        GGUFFile(_broken(tmp_path, path, data))


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 file.
# ---------------------------------------------------------------------------------------------------------------

def test_real_smollm2_gguf(smollm2_gguf):
    f = GGUFFile(smollm2_gguf)
    reader = gguf.GGUFReader(smollm2_gguf)
    expected_meta = {k: field.contents() for k, field in reader.fields.items() if not k.startswith("GGUF.")}
    assert f.metadata == expected_meta
    assert len(f.metadata["tokenizer.ggml.tokens"]) == f.metadata["llama.vocab_size"] == 49152

    assert [t.name for t in reader.tensors] == list(f.tensors)
    for rt in reader.tensors:
        ours = f.tensors[rt.name]
        assert ours.shape == tuple(int(n) for n in reversed(rt.shape)) and ours.ggml_type == rt.tensor_type.value
        assert (ours.offset, ours.n_bytes) == (rt.data_offset, rt.n_bytes)
    assert {t.type_name for t in f.tensors.values()} == {"F32", "Q4_1", "Q8_0"}
    for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight", "output_norm.weight"]:
        rt = next(t for t in reader.tensors if t.name == name)
        expected = gguf.quants.dequantize(rt.data, rt.tensor_type)
        assert torch.equal(bits(f.load_tensor(name)), bits(expected)), name
