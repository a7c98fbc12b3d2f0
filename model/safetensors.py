"""safetensors, read and written by hand: the format Hugging Face, Mistral and peft ship weights in.

A safetensors file is

    N: u64 little-endian | N bytes of UTF-8 JSON (padded with spaces to a multiple of 8) | data

The JSON maps each tensor name to {"dtype": "F32", "shape": [rows, cols], "data_offsets": [begin, end]}, byte
offsets into the data section; an optional "__metadata__" entry maps strings to strings. The data is raw
little-endian, C-contiguous, with nothing between tensors. Because there is nothing to decode, a tensor can be a
view straight into a memory map of the file: loading a 14 GB checkpoint costs no copy, and only the pages actually
used are read from disk.
"""
from __future__ import annotations

import json
import math
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The dtype names of the format, in the order of safetensors' own `Dtype` enum (by item size). The official writer
# lays tensors out from the last of these to the first, then by name; we do the same, so every tensor starts at a
# multiple of its item size and our files are byte-identical to the official ones.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
}
_DTYPE_NAMES = {t: name for name, t in DTYPES.items()}
_LAYOUT_RANK = {name: i for i, name in enumerate(DTYPES)}
_METADATA_KEY = "__metadata__"


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the byte offset where the data section starts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path}: only {size} bytes, too short for a safetensors file (it starts with an 8-byte "
                         f"header length)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise ValueError(f"{path}: header length {n} runs past the end of the file ({size} bytes); "
                             f"not a safetensors file, or truncated")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    return header, 8 + n


class SafeTensorsFile:
    """One safetensors file, memory-mapped: open once, then pull tensors one at a time.

    Tensors are views into a copy-on-write map of the file: free to create, writable, and a write changes only the
    tensor in memory, never the file. They stay valid after the file is closed.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.device = torch.device(device)
        header, self._data_start = read_header(self.path)
        metadata = header.pop(_METADATA_KEY, {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError(f"{self.path}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = metadata
        size = self.path.stat().st_size
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {
            name: self._check_entry(name, entry, size) for name, entry in header.items()}
        # No two tensors may share bytes (the official reader insists, and a write through one view would change
        # the other): sorted by offset, each must begin at or after the end of the one before.
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in self._entries.items())
        for (_, prev_end, prev), (begin, end, name) in zip(spans, spans[1:]):
            if begin < prev_end:
                raise ValueError(f"{self.path}: tensor {name!r}: data_offsets [{begin}, {end}] overlap those of "
                                 f"{prev!r}, which end at {prev_end}")
        # Mapped on the first get_tensor: a reader that only copies tensors out (read_tensor) never maps the file,
        # so nothing of it can stay mapped (and resident) in the process once the copies are made.
        self._map: np.memmap | None = None
        self._closed = False

    def _check_entry(self, name: str, entry: Any, size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ValueError(f"{where}: header entry must have dtype, shape and data_offsets, found {entry!r}")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype_name not in DTYPES:
            raise ValueError(f"{where}: unknown dtype {dtype_name!r}; supported: {', '.join(DTYPES)}")
        # type(...) is int, not isinstance: JSON true/false are Python bools, which are ints too.
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
        dtype = DTYPES[dtype_name]
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise ValueError(f"{where}: data_offsets {offsets} span {end - begin} bytes, but shape {shape} of "
                             f"{dtype_name} needs {expected}")
        if self._data_start + end > size:
            raise ValueError(f"{where}: data (bytes {self._data_start + begin}..{self._data_start + end}) runs past "
                             f"the end of the file ({size} bytes); truncated?")
        return dtype, tuple(shape), begin, end

    def __enter__(self) -> "SafeTensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        # Tensors already handed out keep their part of the map alive; we only drop our own reference.
        self._map = None
        self._closed = True

    def keys(self) -> list[str]:
        return list(self._entries)

    def _entry(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[0]

    def get_tensor(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entry(name)
        if self._closed:
            raise ValueError(f"{self.path}: file is closed")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        raw = torch.from_numpy(self._map[self._data_start + begin:self._data_start + end])  # uint8 view, no copy
        return raw.view(dtype).reshape(shape).to(self.device)

    def read_tensor(self, name: str) -> torch.Tensor:
        """A copy that owns its memory, read with plain file reads instead of through the map.

        For a tensor about to be converted (float32 -> bf16) this matters: pages read through the map stay in this
        process until the whole map goes, so a converting loader would briefly hold the file *and* the model; pages
        read with read() stay in the kernel's page cache only.
        """
        dtype, shape, begin, end = self._entry(name)
        if self._closed:
            raise ValueError(f"{self.path}: file is closed")
        out = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(memoryview(out.numpy())) != end - begin:
                raise ValueError(f"{self.path}: tensor {name!r} is truncated")
        return out.view(dtype).reshape(shape).to(self.device)


def load_file(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the file, by name (memory-mapped on the CPU, see SafeTensorsFile)."""
    with SafeTensorsFile(path, device) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` in the official layout, atomically: a crash leaves the old file or the new one."""
    path = Path(path)
    for name, t in tensors.items():
        if not isinstance(name, str) or name == _METADATA_KEY:
            raise ValueError(f"{path}: invalid tensor name {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{path}: {name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store here; "
                             f"supported: {', '.join(DTYPES)}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: metadata must map strings to strings")

    # Largest item size first: with the header padded to 8 bytes, every tensor is then aligned to its item size.
    order = sorted(tensors, key=lambda name: (-_LAYOUT_RANK[_DTYPE_NAMES[tensors[name].dtype]], name))
    header: dict[str, Any] = {} if metadata is None else {_METADATA_KEY: metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        n_bytes = t.numel() * t.dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    # Compact separators and raw UTF-8: the bytes the official (serde_json) writer produces.
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for name in order:
                # Flatten to raw bytes: a uint8 view of the contiguous CPU data (0-d tensors become 1 element).
                data = tensors[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(data.numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
