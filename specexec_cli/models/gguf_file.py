"""Read a GGUF file's metadata and tensors directly, fast.

GGUF (llama.cpp's format, spec in ggml's docs/gguf.md): a header ("GGUF", version, tensor count,
key/value count), the key/value pairs (typed scalars, strings and arrays: the tokenizer's 150k
tokens and merges live here), one info record per tensor (name, dims with the fastest-varying first,
ggml type, offset), then the tensor data from an aligned offset. Parsing that with `struct` takes a
fraction of a second; `gguf.GGUFReader` builds a numpy view per array element and takes ~17 s on the
Qwen vocabulary. Tensors are dequantized with the `gguf` package's numpy codecs.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specexec_cli.errors import SpecexecError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# value types with a struct format; 8 is a string, 9 an array
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest-varying first): reversed GGUF dims
    ggml_type: int
    offset: int  # absolute file offset of the data
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    kv_ranges: dict[str, tuple[int, int]]  # key -> (start, end) byte range of its value in the file

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def digest(self, prefix: str) -> str:
        """sha256 of the raw bytes of every key/value whose key starts with `prefix` (e.g. the tokenizer)."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for key in sorted(k for k in self.kv_ranges if k.startswith(prefix)):
                start, end = self.kv_ranges[key]
                f.seek(start)
                h.update(key.encode())
                h.update(f.read(end - start))
        return h.hexdigest()

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes as uint8 [rows..., bytes per row] (a copy, not a file view)."""
        from gguf import GGML_QUANT_SIZES

        info = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[info.ggml_type]
        row_bytes = info.shape[-1] // block * type_size
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            data = np.frombuffer(m, dtype=np.uint8, count=info.nbytes, offset=info.offset).copy()
        return data.reshape(*info.shape[:-1], row_bytes)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy order."""
        from gguf import GGMLQuantizationType, dequantize

        info = self.tensors[name]
        values = dequantize(self.raw(name), GGMLQuantizationType(info.ggml_type))
        return values.reshape(info.shape).astype(np.float32, copy=False)


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.take("<I"), self.take("<Q")
            if item_type in _SCALARS:  # one unpack for the whole array
                fmt = _SCALARS[item_type]
                size = struct.calcsize(fmt)
                values = list(struct.unpack_from(f"<{count}{fmt[1:]}", self.buf, self.pos))
                self.pos += size * count
                return values
            return [self.value(item_type) for _ in range(count)]
        raise SpecexecError(f"unknown GGUF value type {vtype}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header, metadata and tensor infos of a GGUF v2/v3 file (no tensor data is read)."""
    from gguf import GGML_QUANT_SIZES

    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        if buf[:4] != MAGIC:
            raise SpecexecError(f"{path} is not a GGUF file")
        cur.pos = 4
        version = cur.take("<I")
        if version < 2:
            raise SpecexecError(f"{path}: GGUF version {version} is not supported (2 or 3 is)")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        metadata: dict[str, Any] = {}
        ranges: dict[str, tuple[int, int]] = {}
        for _ in range(n_kv):
            key = cur.string()
            start = cur.pos
            metadata[key] = cur.value(cur.take("<I"))
            ranges[key] = (start, cur.pos)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
            ggml_type, offset = cur.take("<I"), cur.take("<Q")
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // alignment) * alignment
        size = len(buf)
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        if ggml_type not in GGML_QUANT_SIZES:
            raise SpecexecError(f"{path}: tensor {name} has unknown ggml type {ggml_type}")
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        numel = int(np.prod(shape)) if shape else 1
        nbytes = numel // block * type_size
        if data_start + offset + nbytes > size:
            raise SpecexecError(f"{path} is truncated: tensor {name} ends past the end of the file")
        tensors[name] = TensorInfo(name, shape, ggml_type, data_start + offset, nbytes)
    return GGUFFile(path, metadata, tensors, ranges)
