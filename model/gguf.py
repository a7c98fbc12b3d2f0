"""A GGUF reader: llama.cpp's single-file checkpoint format, parsed by hand and dequantised with torch.

We read GGUF to start LAPT from the small quantised SmolLM2 checkpoint and to take its tokenizer from the metadata.
A GGUF file is, in order (all little-endian):

    "GGUF"  version:u32  n_tensors:u64  n_kv:u64
    n_kv     x  key:string  value_type:u32  value          (the metadata; string = len:u64 + UTF-8 bytes)
    n_tensors x  name:string  n_dims:u32  ne:u64[n_dims]  ggml_type:u32  offset:u64
    padding to `general.alignment` (default 32), then the data section; each tensor's `offset` is relative to it.

ggml lists dimensions fastest-first (`ne[0]` is the row length), so a PyTorch [rows, cols] weight has
ne = [cols, rows]. Quantised types pack `block_size` consecutive values of a row into `type_size` bytes; the block
layouts below follow llama.cpp's ggml-common.h (the structs) and ggml-quants.c (`dequantize_row_*`). Every
dequantiser does its float32 arithmetic in the same order as the reference, so results match it bit for bit.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # version 1 had 32-bit counts; 2 and 3 differ only in allowing big-endian files
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                 # GGML_MAX_DIMS

# ggml type id -> (name, values per block, bytes per block). All types ggml knows, so that any valid file parses;
# `dequantize` handles the ones in _DEQUANTIZERS (and the plain floats).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# GGUF metadata value types: id -> (name, struct format) for the fixed-size scalars.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"), 4: ("uint32", "<I"),
    5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"), 10: ("uint64", "<Q"), 11: ("int64", "<q"),
    12: ("float64", "<d"),
}
_STRING, _ARRAY = 8, 9


# ----------------------------------------------------------------------------------------------------------------
# Dequantisation. Each function takes the packed blocks as a uint8 tensor [n_blocks, type_size] and returns
# float32 [n_blocks, block_size]. QK_K = 256 for the k-quants ("super-blocks" of 8 or 16 sub-blocks).
# ----------------------------------------------------------------------------------------------------------------

def _f16(field: torch.Tensor) -> torch.Tensor:
    """A little-endian fp16 stored in two bytes: uint8 [n, 2] -> float32 [n, 1]."""
    return field.contiguous().view(torch.float16).float()


def _bits(x: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Split every byte of x[..., L] into `count` fields of `width` bits, lowest bits first -> [..., count, L].

    ggml packs sub-blocks this way: field k of byte l belongs to value l of the k-th group of L values.
    """
    shifts = torch.arange(0, width * count, width, dtype=torch.uint8)[:, None]  # [count, 1]
    return (x.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # block_q4_0: d:f16, qs:u8[16]; value l is the low nibble of qs[l] (l < 16) or the high one of qs[l-16].
    n = b.shape[0]
    q = _bits(b[:, 2:], 4, 2).reshape(n, 32).float().sub_(8)
    return q.mul_(_f16(b[:, :2]))   # in place: one float32 buffer of the tensor's size, not two


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    # block_q4_1: d:f16, m:f16, qs:u8[16]; x = d * q + m with q in 0..15.
    n = b.shape[0]
    q = _bits(b[:, 4:], 4, 2).reshape(n, 32).float()
    return q.mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """qh: uint8 [n, 4], a little-endian u32 whose bit l is the fifth bit of value l -> uint8 [n, 32]."""
    word = qh.contiguous().view(torch.int32)                                   # [n, 1]
    return ((word >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)  # [n, 32]


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    # block_q5_0: d:f16, qh:u32, qs:u8[16]; q = nibble | fifth_bit << 4, centred by -16.
    n = b.shape[0]
    q = _bits(b[:, 6:], 4, 2).reshape(n, 32) | (_fifth_bits(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    # block_q5_1: d:f16, m:f16, qh:u32, qs:u8[16]; x = d * q + m with q in 0..31.
    n = b.shape[0]
    q = (_bits(b[:, 8:], 4, 2).reshape(n, 32) | (_fifth_bits(b[:, 4:8]) << 4)).float()
    return q.mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # block_q8_0: d:f16, qs:i8[32].
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b[:, :2]))   # in place, as in _q4_1


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    # block_q2_K: scales:u8[16] (low nibble: scale, high: min of each 16-value sub-block), qs:u8[64], d, dmin:f16.
    # Each 32-byte half of qs holds 4 groups of 32 values at 2 bits each.
    n = b.shape[0]
    scales = b[:, :16]
    dl = (_f16(b[:, 80:82]) * (scales & 0xF).float())[..., None]  # [n, 16, 1]
    ml = (_f16(b[:, 82:84]) * (scales >> 4).float())[..., None]
    q = _bits(b[:, 16:80].reshape(n, 2, 32), 2, 4).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    # block_q3_K: hmask:u8[32], qs:u8[64], scales:u8[12], d:f16. Values are 2 low bits from qs and a high bit from
    # hmask; a *clear* high bit means "subtract 4" (q in -4..3). The sixteen 6-bit scales are stored as 16 low
    # nibbles in bytes 0..7 and 16 two-bit tops in bytes 8..11, then centred by -32.
    n = b.shape[0]
    packed = b[:, 96:108]
    low = _bits(packed[:, :8], 4, 2).reshape(n, 16)
    high = _bits(packed[:, 8:], 2, 4).reshape(n, 16)
    scales = (low | (high << 4)).float() - 32
    dl = (_f16(b[:, 108:110]) * scales)[..., None]                       # [n, 16, 1]
    ql = _bits(b[:, 32:96].reshape(n, 2, 32), 2, 4).reshape(n, 16, 16)
    hbit = _bits(b[:, :32], 1, 8).reshape(n, 16, 16)
    q = ql.float() - 4 * (1 - hbit).float()
    return (dl * q).reshape(n, 256)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit (scale, min) pairs of a Q4_K/Q5_K super-block, from 12 bytes (get_scale_min_k4).

    Bytes 0-3 hold scales 0-3, bytes 4-7 mins 0-3 (low 6 bits each); bytes 8-11 hold the low 4 bits of scales 4-7
    (low nibble) and mins 4-7 (high nibble), whose top 2 bits are the spare top bits of bytes 0-3 / 4-7.
    """
    p = packed.reshape(-1, 3, 4)
    sc, mn, extra = p[:, 0], p[:, 1], p[:, 2]
    scale = torch.cat([sc & 0x3F, (extra & 0xF) | ((sc >> 2) & 0x30)], dim=-1)   # [n, 8]
    min_ = torch.cat([mn & 0x3F, (extra >> 4) | ((mn >> 2) & 0x30)], dim=-1)
    return scale, min_


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # block_q4_K: d, dmin:f16, scales:u8[12], qs:u8[128]; 8 sub-blocks of 32, x = d*scale * q - dmin*min.
    n = b.shape[0]
    scale, min_ = _k_scales(b[:, 4:16])
    d = (_f16(b[:, :2]) * scale.float())[..., None]       # [n, 8, 1]
    dm = (_f16(b[:, 2:4]) * min_.float())[..., None]
    q = _bits(b[:, 16:].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    # block_q5_K: Q4_K's layout plus qh:u8[32] (before qs) whose bit k of byte l is the fifth bit of value
    # 32k + l.
    n = b.shape[0]
    scale, min_ = _k_scales(b[:, 4:16])
    d = (_f16(b[:, :2]) * scale.float())[..., None]
    dm = (_f16(b[:, 2:4]) * min_.float())[..., None]
    ql = _bits(b[:, 48:].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], 1, 8).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (d * q - dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # block_q6_K: ql:u8[128] (low 4 bits), qh:u8[64] (high 2 bits), scales:i8[16], d:f16; 16 sub-blocks of 16,
    # q centred by -32. Each 128-value half uses 64 bytes of ql (two nibble planes) and 32 of qh (four 2-bit planes).
    n = b.shape[0]
    d = (_f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float())[..., None]   # [n, 16, 1]
    ql = _bits(b[:, :128].reshape(n, 2, 64), 4, 2).reshape(n, 8, 32)
    qh = _bits(b[:, 128:192].reshape(n, 2, 32), 2, 4).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).float() - 32).reshape(n, 16, 16)
    return (d * q).reshape(n, 256)


_DEQUANTIZERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0,
    10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k, 14: _q6_k,
}
SUPPORTED_TYPES: tuple[int, ...] = (0, 1, 30, *_DEQUANTIZERS)


def dequantize(data: Any, ggml_type: int, n_elements: int) -> torch.Tensor:
    """Packed ggml data (bytes-like or a uint8 numpy array) -> a new flat float32 tensor of n_elements values."""
    if ggml_type not in GGML_TYPES:
        raise ValueError(f"unknown ggml type id {ggml_type}")
    name, block_size, type_size = GGML_TYPES[ggml_type]
    if ggml_type not in SUPPORTED_TYPES:
        supported = ", ".join(GGML_TYPES[t][0] for t in SUPPORTED_TYPES)
        raise ValueError(f"cannot dequantise ggml type {name} (id {ggml_type}); supported: {supported}")
    if n_elements % block_size:
        raise ValueError(f"{n_elements} values is not a whole number of {name} blocks of {block_size}")
    raw = np.frombuffer(data, dtype=np.uint8)
    n_blocks = n_elements // block_size
    if raw.size != n_blocks * type_size:
        raise ValueError(f"{n_elements} {name} values take {n_blocks * type_size} bytes, got {raw.size}")
    # Plain floats convert in numpy, which also makes the promised copy of read-only input.
    if name == "F32":
        return torch.from_numpy(raw.view("<f4").astype(np.float32))
    if name == "F16":
        return torch.from_numpy(raw.view("<f2").astype(np.float32))
    if name == "BF16":  # bf16 is the top half of an fp32: shift the 16 bits into place
        return torch.from_numpy((raw.view("<i2").astype(np.int32) << 16).view(np.float32))
    # torch will not wrap read-only memory (bytes, a read-only mmap) without a warning; the packed bytes are 4-8x
    # smaller than the float32 result, so copying them costs little.
    blocks = torch.from_numpy(raw.copy()).reshape(n_blocks, type_size)
    return _DEQUANTIZERS[ggml_type](blocks).reshape(n_elements)


# ----------------------------------------------------------------------------------------------------------------
# The file.
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # PyTorch order: ggml's ne reversed
    ggml_type: int
    type_name: str
    offset: int             # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Reads little-endian fields from a buffer, failing with the file name and section when the file ends."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.path, self.pos = buf, path, 0
        self.section = "header"

    def take(self, n: int) -> int:
        """Reserve n bytes; returns their start."""
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise ValueError(f"{self.path}: file ends inside the {self.section} (needs {n} bytes at offset {start},"
                             f" file has {len(self.buf)}); truncated GGUF?")
        self.pos += n
        return start

    def unpack(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        start = self.take(n)
        try:
            return str(self.buf[start:start + n], "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: invalid UTF-8 string at offset {start} in the {self.section} ({e})") \
                from None

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype][1])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _SCALARS:  # one numpy read instead of `count` struct calls (token scores, types)
                fmt = _SCALARS[etype][1]
                start = self.take(count * struct.calcsize(fmt))
                arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=start)
                return (arr != 0).tolist() if etype == 7 else arr.tolist()
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown metadata value type {vtype} in the {self.section}")


class GGUFFile:
    """A GGUF checkpoint: metadata and tensor table parsed on open, tensor data memory-mapped and read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        if self.path.stat().st_size < 24:  # numpy cannot map an empty file; 24 bytes is the fixed header
            raise ValueError(f"{self.path}: only {self.path.stat().st_size} bytes, too short to be a GGUF file")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._data), self.path)

        magic = bytes(cur.buf[:4])
        cur.take(4)
        if magic != GGUF_MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        self.version: int = cur.unpack("<I")
        if self.version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            hint = f" (a big-endian version {swapped} file?)" if swapped in SUPPORTED_VERSIONS else ""
            raise ValueError(f"{self.path}: GGUF version {self.version}{hint} is not supported; "
                             f"supported: {', '.join(map(str, SUPPORTED_VERSIONS))}")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")

        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            cur.section = f"metadata (key/value #{i})"
            key = cur.string()
            cur.section = f"metadata (value of {key!r})"
            if key in self.metadata:
                raise ValueError(f"{self.path}: metadata key {key!r} appears twice")
            self.metadata[key] = cur.value(cur.unpack("<I"))

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"{self.path}: general.alignment = {alignment!r} is not a power of two")

        infos = []
        for i in range(n_tensors):
            cur.section = f"tensor table (entry #{i})"
            name = cur.string()
            cur.section = f"tensor table (entry {name!r})"
            n_dims = cur.unpack("<I")
            if n_dims > MAX_DIMS:
                raise ValueError(f"{self.path}: tensor {name!r} has {n_dims} dimensions, ggml allows {MAX_DIMS}")
            ne = [cur.unpack("<Q") for _ in range(n_dims)]
            infos.append((name, ne, cur.unpack("<I"), cur.unpack("<Q")))

        # The data section starts at the first aligned offset after the tensor table.
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, ne, ggml_type, rel_offset in infos:
            self.tensors[name] = self._tensor_info(name, ne, ggml_type, data_start + rel_offset)

    def _tensor_info(self, name: str, ne: list[int], ggml_type: int, offset: int) -> GGUFTensor:
        if name in self.tensors:
            raise ValueError(f"{self.path}: tensor {name!r} appears twice in the tensor table")
        if ggml_type not in GGML_TYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unknown ggml type id {ggml_type}")
        type_name, block_size, type_size = GGML_TYPES[ggml_type]
        # Blocks never straddle rows, so the row length must be a whole number of blocks.
        row = ne[0] if ne else 1
        if row % block_size:
            raise ValueError(f"{self.path}: tensor {name!r} has rows of {row} values, not a multiple of "
                             f"{type_name}'s block size {block_size}")
        n_bytes = math.prod(ne) // block_size * type_size
        if offset + n_bytes > self._data.size:
            raise ValueError(f"{self.path}: data of tensor {name!r} (bytes {offset}..{offset + n_bytes}) runs past "
                             f"the end of the file ({self._data.size} bytes); truncated GGUF?")
        return GGUFTensor(name, tuple(reversed(ne)), ggml_type, type_name, offset, n_bytes)

    def raw(self, name: str) -> torch.Tensor:
        """One tensor's bytes as stored (its packed blocks), read into a new buffer: uint8 [n_bytes]."""
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        t = self.tensors[name]
        return torch.from_numpy(self._read(t))

    def _read(self, t: GGUFTensor) -> np.ndarray:
        """A tensor's bytes, read from the file into a new buffer (uint8 [n_bytes]). Not a slice of the memory map:
        every mapped page read stays in the process's resident memory until the map is closed, so loading a whole
        model through the map would hold the file in RAM (on top of the float32 weights) until the end."""
        out = np.empty(t.n_bytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            if f.readinto(memoryview(out)) != t.n_bytes:
                raise ValueError(f"{self.path}: data of tensor {t.name!r} ends early (file changed while reading?)")
        return out

    def load_tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantise one tensor into a new tensor of `dtype`, in PyTorch's shape (e.g. [rows, cols])."""
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        t = self.tensors[name]
        if t.ggml_type not in SUPPORTED_TYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has ggml type {t.type_name} (id {t.ggml_type}), which "
                             f"we cannot dequantise")
        raw = self._read(t)
        return dequantize(raw, t.ggml_type, t.n_elements).reshape(t.shape).to(dtype)
